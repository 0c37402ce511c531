/*
 * rfm.c
 *	  RFM scoring: recency, frequency and monetary value per customer, their
 *	  tie-aware quintile scores, and the named segment of each RFM cell.
 *
 *	- rfm_agg(order_ts, amount): an aggregate over one row per order, with a
 *	  concrete fixed-size state type (rfm_state) and a combine function, so
 *	  it runs in parallel and can be pushed down by Citus.  Money is summed
 *	  exactly, in int64 units of 0.0001.
 *	- quintile_breaks(float8): the four cut points percentile_disc(0.2, 0.4,
 *	  0.6, 0.8) would give, as one parallel-safe aggregate (its state, all
 *	  the values, is a concrete varlena type); quintile_score() scores a
 *	  value against them so that equal values always get the same score.
 *	- rfm(): the whole job in one call.  It scans the source table itself,
 *	  collapses order lines into orders and customer versions (SCD2) into
 *	  customers, then scores; three NTILE passes over a GROUP BY are what it
 *	  replaces.
 *
 * What counts, in rfm_agg and rfm() alike: a row without a timestamp is not
 * an order; a NULL amount is an order worth 0; a negative amount is a
 * return: it nets against monetary but is not a purchase and moves neither
 * the first nor the last order.  rfm() on the star schema counts completed
 * order lines only (cancelled ones never happened, returned ones came
 * back), of known customers, up to as_of; a credit note's line (negative
 * quantity) is such a return, and one worth nothing does not count.
 */
#include "postgres.h"

#include <math.h>

#include "access/htup_details.h"
#include "access/relation.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "common/int.h"
#include "common/shortest_dec.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "parser/parse_relation.h"
#include "parser/scansup.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/datum.h"
#include "utils/float.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/rel.h"
#include "utils/rls.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"

#include "citus_guard.h"
#include "customer_analytics.h"
#include "pg_compat.h"
#include "utils.h"

PG_FUNCTION_INFO_V1(ca_rfm_state_in);
PG_FUNCTION_INFO_V1(ca_rfm_state_out);
PG_FUNCTION_INFO_V1(ca_rfm_agg_sfunc);
PG_FUNCTION_INFO_V1(ca_money_units);
PG_FUNCTION_INFO_V1(ca_rfm_agg_combine);
PG_FUNCTION_INFO_V1(ca_rfm_agg_final);
PG_FUNCTION_INFO_V1(ca_quantile_state_in);
PG_FUNCTION_INFO_V1(ca_quantile_state_out);
PG_FUNCTION_INFO_V1(ca_quintile_breaks_sfunc);
PG_FUNCTION_INFO_V1(ca_quintile_breaks_combine);
PG_FUNCTION_INFO_V1(ca_quintile_breaks_final);
PG_FUNCTION_INFO_V1(ca_quintile_score);
PG_FUNCTION_INFO_V1(ca_rfm_from_rollup);
PG_FUNCTION_INFO_V1(ca_reference_time);
PG_FUNCTION_INFO_V1(ca_rfm);
PG_FUNCTION_INFO_V1(ca_rfm_rollup_rows);

#define MONEY_SCALE 4			/* money is summed in units of 0.0001 */
#define MONEY_UNIT INT64CONST(10000)

/* settings */
static char *rfm_segment_map = NULL;
static char *as_of_setting = NULL;
static int	top_customers = 100;

/*
 * A value that is no time would only fail later, inside whichever view
 * first reads it, with an error that does not name the setting.  Infinite
 * times are refused too: recency from infinity is no answer.
 */
static bool
check_as_of(char **newval, void **extra, GucSource source)
{
	char		workbuf[MAXDATELEN + MAXDATEFIELDS];
	char	   *field[MAXDATEFIELDS];
	int			ftype[MAXDATEFIELDS];
	int			nf;
	int			dtype;
	struct pg_tm tm;
	fsec_t		fsec;
	int			tz;

	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	if (ParseDateTime(*newval, workbuf, sizeof(workbuf), field, ftype, MAXDATEFIELDS, &nf) == 0 &&
		ca_DecodeDateTime(field, ftype, nf, &dtype, &tm, &fsec, &tz) == 0 &&
		(dtype == DTK_DATE || dtype == DTK_NOW || dtype == DTK_EPOCH))
		return true;
	GUC_check_errdetail("\"%s\" is neither a timestamp nor \"now\".", *newval);
	GUC_check_errhint("Use a time such as '2011-12-10', 'now' for the wall clock, "
					  "or '' (RESET) for the end of the data.");
	return false;
}

void
ca_rfm_init(void)
{
	DefineCustomStringVariable(CA_GUC_PREFIX ".rfm_segment_map",
							   "Which map of customer_analytics.rfm_segment_rule names the RFM segments.",
							   NULL,
							   &rfm_segment_map,
							   "default",
							   PGC_USERSET, 0,
							   NULL, NULL, NULL);
	DefineCustomStringVariable(CA_GUC_PREFIX ".as_of",
							   "Reference time for recency, CLV and the last complete day; empty means the end of the data.",
							   "Empty: the day after the last completed order line, or now if that is later; "
							   "'now': the wall clock; else a timestamp, e.g. '2011-12-10'.",
							   &as_of_setting,
							   "",
							   PGC_USERSET, 0,
							   check_as_of, NULL, NULL);
	DefineCustomIntVariable(CA_GUC_PREFIX ".top_customers",
							"How many customers the top_customers view keeps.",
							NULL,
							&top_customers,
							100, 1, 1000000,
							PGC_USERSET, 0,
							NULL, NULL, NULL);
}

/* ---------------------------------------------------------------------
 * Exact money: numeric -> int64 units of 0.0001
 * ---------------------------------------------------------------------
 *
 * Converting through numeric arithmetic costs allocations per row, more
 * than the rest of the work.  The numeric on-disk format is stable (it has
 * to be, for pg_upgrade), so where int128 is available it is read directly
 * here: a 16-bit header (short or long form), then base-10000 digits; the
 * macros are those of numeric.c, which keeps them private.  Elsewhere, and
 * to check the fast path against (money_units(amount, true)), the same
 * result comes from numeric's public functions.  Both give the same answer
 * in the same order of checks: not finite; 10^20 or more; more than four
 * decimals; more than int64 units.
 */
typedef enum MoneyResult
{
	MONEY_OK,
	MONEY_TOO_PRECISE,
	MONEY_OUT_OF_RANGE,
	MONEY_NOT_FINITE
} MoneyResult;

#ifdef HAVE_INT128
#define NBASE 10000
#define NUMERIC_SIGN_MASK 0xC000
#define NUMERIC_NEG 0x4000
#define NUMERIC_SHORT 0x8000
#define NUMERIC_SPECIAL 0xC000
#define NUMERIC_SHORT_SIGN_MASK 0x2000
#define NUMERIC_SHORT_WEIGHT_SIGN_MASK 0x0040
#define NUMERIC_SHORT_WEIGHT_MASK 0x003F

static MoneyResult
numeric_to_units_fast(Datum value, int64 *units)
{
	struct varlena *v = (struct varlena *) PG_DETOAST_DATUM_PACKED(value);
	const char *data = VARDATA_ANY(v);
	int			len = VARSIZE_ANY_EXHDR(v);
	uint16		header;
	int			weight;
	bool		negative;
	int			ndigits;
	const char *digits;
	int128		acc = 0;
	MoneyResult result = MONEY_OK;

	memcpy(&header, data, sizeof(uint16));
	if ((header & NUMERIC_SIGN_MASK) == NUMERIC_SPECIAL)
		result = MONEY_NOT_FINITE;
	else
	{
		if ((header & NUMERIC_SIGN_MASK) == NUMERIC_SHORT)
		{
			negative = (header & NUMERIC_SHORT_SIGN_MASK) != 0;
			weight = header & NUMERIC_SHORT_WEIGHT_MASK;
			if (header & NUMERIC_SHORT_WEIGHT_SIGN_MASK)
				weight |= ~NUMERIC_SHORT_WEIGHT_MASK;
			digits = data + sizeof(uint16);
			ndigits = (len - sizeof(uint16)) / sizeof(int16);
		}
		else
		{
			int16		w;

			negative = (header & NUMERIC_SIGN_MASK) == NUMERIC_NEG;
			memcpy(&w, data + sizeof(uint16), sizeof(int16));
			weight = w;
			digits = data + 2 * sizeof(uint16);
			ndigits = (len - 2 * sizeof(uint16)) / sizeof(int16);
		}

		/* digit i is worth NBASE^(weight - i); a unit is NBASE^-1 */
		for (int i = 0; i < ndigits && result == MONEY_OK; i++)
		{
			int16		d;
			int			exponent = weight - i + 1;	/* in powers of NBASE */
			int128		term;

			memcpy(&d, digits + i * sizeof(int16), sizeof(int16));
			if (d == 0)
				continue;
			if (exponent < 0)
				result = MONEY_TOO_PRECISE;
			else if (exponent > 5)
				result = MONEY_OUT_OF_RANGE;
			else
			{
				term = d;
				for (int e = 0; e < exponent; e++)
					term *= NBASE;
				acc += term;
			}
		}
		if (result == MONEY_OK && acc > PG_INT64_MAX)
			result = MONEY_OUT_OF_RANGE;
		if (result == MONEY_OK)
			*units = negative ? -(int64) acc : (int64) acc;
	}
	if ((Pointer) v != DatumGetPointer(value))
		pfree(v);
	return result;
}
#endif							/* HAVE_INT128 */

static MoneyResult
numeric_to_units_public(Datum value, int64 *units)
{
	Numeric		num = DatumGetNumeric(value);
	Datum		magnitude;
	Datum		scaled;
	Datum		limit;

	if (numeric_is_nan(num) || numeric_is_inf(num))
		return MONEY_NOT_FINITE;
	magnitude = DirectFunctionCall1(numeric_abs, value);
	limit = DirectFunctionCall3(numeric_in, CStringGetDatum("1e20"),
								ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1));
	if (DatumGetInt32(DirectFunctionCall2(numeric_cmp, magnitude, limit)) >= 0)
		return MONEY_OUT_OF_RANGE;
	scaled = DirectFunctionCall2(numeric_mul, magnitude,
								 NumericGetDatum(int64_to_numeric(MONEY_UNIT)));
	if (DatumGetInt32(DirectFunctionCall2(numeric_cmp, scaled,
										  DirectFunctionCall2(numeric_trunc, scaled, Int32GetDatum(0)))) != 0)
		return MONEY_TOO_PRECISE;
	if (DatumGetInt32(DirectFunctionCall2(numeric_cmp, scaled,
										  NumericGetDatum(int64_to_numeric(PG_INT64_MAX)))) > 0)
		return MONEY_OUT_OF_RANGE;
	*units = DatumGetInt64(DirectFunctionCall1(numeric_int8, scaled));
	if (DatumGetInt32(DirectFunctionCall2(numeric_cmp, value, magnitude)) < 0)
		*units = -*units;		/* below its magnitude: negative */
	return MONEY_OK;
}

/* a numeric amount in units, or the error that says why not */
static int64
numeric_units(Datum value, bool public_api)
{
	int64		units = 0;
	MoneyResult result;

#ifdef HAVE_INT128
	result = public_api ? numeric_to_units_public(value, &units) : numeric_to_units_fast(value, &units);
#else
	result = numeric_to_units_public(value, &units);
#endif
	switch (result)
	{
		case MONEY_OK:
			break;
		case MONEY_TOO_PRECISE:
			ereport(ERROR,
					(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
					 errmsg("amount %s has more than %d decimal places",
							DatumGetCString(DirectFunctionCall1(numeric_out, value)), MONEY_SCALE),
					 errdetail("Monetary values are summed exactly to %d decimal places.", MONEY_SCALE),
					 errhint("Round the amounts first, e.g. round(amount, %d).", MONEY_SCALE)));
			break;
		case MONEY_NOT_FINITE:
			ereport(ERROR,
					(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
					 errmsg("amount %s is not a finite number",
							DatumGetCString(DirectFunctionCall1(numeric_out, value)))));
			break;
		case MONEY_OUT_OF_RANGE:
			ereport(ERROR,
					(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
					 errmsg("amount %s is too large",
							DatumGetCString(DirectFunctionCall1(numeric_out, value))),
					 errdetail("Monetary sums are kept below 922,337,203,685,477 in units of 0.0001.")));
			break;
	}
	return units;
}

/*
 * money_units(amount numeric, public_api boolean) -> bigint: internal, for
 * sql/21_rfm_numeric, which checks that both conversions agree.
 */
Datum
ca_money_units(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64(numeric_units(PG_GETARG_DATUM(0), PG_GETARG_BOOL(1)));
}

/*
 * A numeric amount in units of 0.0001 (exact; an error when it has more
 * decimals or is out of range): clv_summary() sums revenue with it.
 */
int64
ca_numeric_money_units(Datum value, int *scale)
{
	*scale = MONEY_SCALE;
	return numeric_units(value, false);
}

static int64
amount_units(Datum value, Oid type)
{
	int64		units = 0;

	switch (type)
	{
		case NUMERICOID:
			return numeric_units(value, false);
		case INT2OID:
			return (int64) DatumGetInt16(value) * MONEY_UNIT;
		case INT4OID:
			return (int64) DatumGetInt32(value) * MONEY_UNIT;
		case INT8OID:
			if (pg_mul_s64_overflow(DatumGetInt64(value), MONEY_UNIT, &units))
				ereport(ERROR,
						(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
						 errmsg("amount " INT64_FORMAT " is too large", DatumGetInt64(value))));
			return units;
		case FLOAT4OID:
		case FLOAT8OID:
			{
				double		d = type == FLOAT4OID ? DatumGetFloat4(value) : DatumGetFloat8(value);

				if (isnan(d) || fabs(d) * MONEY_UNIT >= 9.2e18)
					ereport(ERROR,
							(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
							 errmsg("amount %g cannot be summed", d)));
				return (int64) llround(d * MONEY_UNIT);
			}
		default:
			elog(ERROR, "unsupported amount type %u", type);
	}
	return 0;
}

static Datum
units_to_numeric(int64 units)
{
	return NumericGetDatum(int64_div_fast_to_numeric(units, MONEY_SCALE));
}

static void
add_units(int64 *sum, int64 units)
{
	if (pg_add_s64_overflow(*sum, units, sum))
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("monetary sum out of range"),
				 errdetail("Monetary sums are kept below 922,337,203,685,477 in units of 0.0001.")));
}

/* ---------------------------------------------------------------------
 * rfm_state and rfm_agg
 * ---------------------------------------------------------------------
 */
typedef struct RfmState
{
	int64		frequency;		/* purchases: rows with a non-negative or NULL
								 * amount */
	int64		monetary;		/* sum of amounts, units of 0.0001 */
	TimestampTz first_order;	/* of purchases; valid if frequency > 0 */
	TimestampTz last_order;
	int64		returns;		/* rows with a negative amount */
} RfmState;

StaticAssertDecl(sizeof(RfmState) == 40, "rfm_state is declared with INTERNALLENGTH = 40");

/* one row into the state: the rules in the file header */
static inline void
rfm_add(RfmState *s, TimestampTz ts, bool amount_null, int64 units)
{
	if (!amount_null && units < 0)
	{
		add_units(&s->monetary, units);
		s->returns++;
		return;
	}
	if (!amount_null)
		add_units(&s->monetary, units);
	if (s->frequency == 0 || ts < s->first_order)
		s->first_order = ts;
	if (s->frequency == 0 || ts > s->last_order)
		s->last_order = ts;
	s->frequency++;
}

static void
rfm_merge(RfmState *a, const RfmState *b)
{
	if (b->frequency > 0)
	{
		if (a->frequency == 0 || b->first_order < a->first_order)
			a->first_order = b->first_order;
		if (a->frequency == 0 || b->last_order > a->last_order)
			a->last_order = b->last_order;
	}
	a->frequency += b->frequency;
	a->returns += b->returns;
	add_units(&a->monetary, b->monetary);
}

Datum
ca_rfm_state_in(PG_FUNCTION_ARGS)
{
	char	   *str = PG_GETARG_CSTRING(0);
	RfmState   *s = palloc0(sizeof(RfmState));
	long long	freq,
				ret,
				first,
				last,
				money;

	if (sscanf(str, "(%lld,%lld,%lld,%lld,%lld)", &freq, &money, &first, &last, &ret) != 5)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("invalid input syntax for type rfm_state: \"%s\"", str),
				 errdetail("Expected (frequency,monetary units,first order,last order,returns) as integers.")));
	s->frequency = freq;
	s->monetary = money;
	s->first_order = first;
	s->last_order = last;
	s->returns = ret;
	PG_RETURN_POINTER(s);
}

Datum
ca_rfm_state_out(PG_FUNCTION_ARGS)
{
	RfmState   *s = (RfmState *) PG_GETARG_POINTER(0);

	PG_RETURN_CSTRING(psprintf("(" INT64_FORMAT "," INT64_FORMAT "," INT64_FORMAT "," INT64_FORMAT "," INT64_FORMAT ")",
							   s->frequency, s->monetary, s->first_order, s->last_order, s->returns));
}

/*
 * The transition functions update their state in place, which only an
 * aggregate may do.  A new state is made in the per-call context: these
 * are ordinary (not internal) types, so whenever the returned pointer
 * differs from the old state the executor copies the new one into the
 * aggregate context and frees the old one itself.
 */
/* rfm_agg(order_ts timestamptz, amount numeric) transition */
Datum
ca_rfm_agg_sfunc(PG_FUNCTION_ARGS)
{
	RfmState   *s;

	(void) ca_aggregate_context(fcinfo, "rfm_agg");
	if (PG_ARGISNULL(0))
		s = palloc0(sizeof(RfmState));
	else
		s = (RfmState *) PG_GETARG_POINTER(0);
	if (!PG_ARGISNULL(1))
	{
		bool		amount_null = PG_ARGISNULL(2);

		rfm_add(s, PG_GETARG_TIMESTAMPTZ(1), amount_null,
				amount_null ? 0 : amount_units(PG_GETARG_DATUM(2), NUMERICOID));
	}
	Assert(s->frequency >= 0 && s->returns >= 0);
	PG_RETURN_POINTER(s);
}

Datum
ca_rfm_agg_combine(PG_FUNCTION_ARGS)
{
	RfmState   *a;

	(void) ca_aggregate_context(fcinfo, "rfm_agg");
	if (PG_ARGISNULL(1))
	{
		if (PG_ARGISNULL(0))
			PG_RETURN_NULL();
		PG_RETURN_POINTER(PG_GETARG_POINTER(0));
	}
	if (PG_ARGISNULL(0))
	{
		a = palloc(sizeof(RfmState));
		memcpy(a, PG_GETARG_POINTER(1), sizeof(RfmState));
		PG_RETURN_POINTER(a);
	}
	a = (RfmState *) PG_GETARG_POINTER(0);
	rfm_merge(a, (RfmState *) PG_GETARG_POINTER(1));
	PG_RETURN_POINTER(a);
}

/* -> rfm_summary (first_order, last_order, frequency, monetary, returns) */
Datum
ca_rfm_agg_final(PG_FUNCTION_ARGS)
{
	RfmState   *s;
	TupleDesc	tupdesc;
	Datum		values[5];
	bool		nulls[5] = {false, false, false, false, false};

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	s = (RfmState *) PG_GETARG_POINTER(0);
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "rfm_agg must return a composite type");
	tupdesc = BlessTupleDesc(tupdesc);
	values[0] = TimestampTzGetDatum(s->first_order);
	values[1] = TimestampTzGetDatum(s->last_order);
	nulls[0] = nulls[1] = (s->frequency == 0);
	values[2] = Int64GetDatum(s->frequency);
	values[3] = units_to_numeric(s->monetary);
	values[4] = Int64GetDatum(s->returns);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* ---------------------------------------------------------------------
 * quantile_state and quintile_breaks
 * ---------------------------------------------------------------------
 */
typedef struct QuantileState
{
	int32		vl_len_;
	int32		padding;
	int64		count;			/* values held */
	float8		values[FLEXIBLE_ARRAY_MEMBER];	/* room for more: see varsize */
} QuantileState;

#define QS_HEADER offsetof(QuantileState, values)
#define QS_CAPACITY(qs) ((VARSIZE(qs) - QS_HEADER) / sizeof(float8))
#define QS_MAX_VALUES ((MaxAllocSize - QS_HEADER) / sizeof(float8))

static QuantileState *
qs_make(MemoryContext cxt, int64 capacity)
{
	QuantileState *qs;

	if (capacity > (int64) QS_MAX_VALUES)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("quintile_breaks cannot hold more than %zu values", (size_t) QS_MAX_VALUES),
				 errhint("Compute the breaks on a sample, or per partition.")));
	qs = MemoryContextAlloc(cxt, QS_HEADER + capacity * sizeof(float8));
	SET_VARSIZE(qs, QS_HEADER + capacity * sizeof(float8));
	qs->padding = 0;
	qs->count = 0;
	return qs;
}

/*
 * Text form: the values as a float8 array literal, "{v1,v2,...}", each in
 * the shortest form that reads back to the same bits (whatever
 * extra_float_digits says).  Citus ships partial aggregate states between
 * nodes as text, so quintile_breaks can only be pushed down to the workers
 * if this round-trips exactly.
 */
Datum
ca_quantile_state_in(PG_FUNCTION_ARGS)
{
	char	   *str = PG_GETARG_CSTRING(0);
	char	   *p = str;
	int64		n = 0;
	QuantileState *qs;

	while (scanner_isspace(*p))
		p++;
	if (*p != '{')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("invalid input syntax for type quantile_state: \"%s\"", str),
				 errdetail("A quantile_state is written as a list of float8 values in braces, such as {1.5,2,3}.")));
	p++;
	/* one value more than there are commas, unless the braces are empty */
	for (char *q = p; *q; q++)
		n += (*q == ',');
	qs = qs_make(CurrentMemoryContext, Max(n + 1, 1));
	while (scanner_isspace(*p))
		p++;
	if (*p != '}')
	{
		for (;;)
		{
			char	   *start = p;
			char		saved;

			while (*p && *p != ',' && *p != '}')
				p++;
			if (*p == '\0')
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
						 errmsg("invalid input syntax for type quantile_state: \"%s\"", str),
						 errdetail("The closing brace is missing.")));
			saved = *p;
			*p = '\0';
			/* float8in reports a malformed or out-of-range value itself */
			qs->values[qs->count++] = DatumGetFloat8(DirectFunctionCall1(float8in, CStringGetDatum(start)));
			*p = saved;
			if (*p++ == '}')
				break;
		}
	}
	else
		p++;
	while (scanner_isspace(*p))
		p++;
	if (*p != '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("invalid input syntax for type quantile_state: \"%s\"", str),
				 errdetail("Junk follows the closing brace.")));
	PG_RETURN_POINTER(qs);
}

Datum
ca_quantile_state_out(PG_FUNCTION_ARGS)
{
	QuantileState *qs = (QuantileState *) PG_DETOAST_DATUM(PG_GETARG_DATUM(0));
	StringInfoData buf;
	char		num[DOUBLE_SHORTEST_DECIMAL_LEN];

	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	for (int64 i = 0; i < qs->count; i++)
	{
		if (i > 0)
			appendStringInfoChar(&buf, ',');
		double_to_shortest_decimal_buf(qs->values[i], num);
		appendStringInfoString(&buf, num);
	}
	appendStringInfoChar(&buf, '}');
	PG_RETURN_CSTRING(buf.data);
}

/* quintile_breaks(value float8) transition: NULLs are skipped */
Datum
ca_quintile_breaks_sfunc(PG_FUNCTION_ARGS)
{
	QuantileState *qs = PG_ARGISNULL(0) ? NULL : (QuantileState *) PG_GETARG_POINTER(0);

	if (PG_ARGISNULL(1))
	{
		if (qs == NULL)
			PG_RETURN_NULL();
		PG_RETURN_POINTER(qs);
	}

	/*
	 * growing makes a new state (see above ca_rfm_agg_sfunc); repalloc would
	 * free the old one twice
	 */
	(void) ca_aggregate_context(fcinfo, "quintile_breaks");
	if (qs == NULL)
		qs = qs_make(CurrentMemoryContext, 64);
	else if (qs->count == (int64) QS_CAPACITY(qs))
	{
		int64		capacity = Min((int64) QS_CAPACITY(qs) * 2, (int64) QS_MAX_VALUES);
		QuantileState *grown;

		if (capacity <= qs->count)
			qs_make(CurrentMemoryContext, capacity + 1);	/* reports the limit */
		grown = qs_make(CurrentMemoryContext, capacity);
		memcpy(grown->values, qs->values, qs->count * sizeof(float8));
		grown->count = qs->count;
		qs = grown;
	}
	qs->values[qs->count++] = PG_GETARG_FLOAT8(1);
	PG_RETURN_POINTER(qs);
}

Datum
ca_quintile_breaks_combine(PG_FUNCTION_ARGS)
{
	QuantileState *a = PG_ARGISNULL(0) ? NULL : (QuantileState *) PG_GETARG_POINTER(0);
	QuantileState *b = PG_ARGISNULL(1) ? NULL : (QuantileState *) PG_DETOAST_DATUM(PG_GETARG_DATUM(1));
	QuantileState *r;

	(void) ca_aggregate_context(fcinfo, "quintile_breaks");
	if (b == NULL || b->count == 0)
	{
		if (a == NULL)
			PG_RETURN_NULL();
		PG_RETURN_POINTER(a);
	}
	r = qs_make(CurrentMemoryContext, (a ? a->count : 0) + b->count);
	if (a)
		memcpy(r->values, a->values, a->count * sizeof(float8));
	memcpy(r->values + (a ? a->count : 0), b->values, b->count * sizeof(float8));
	r->count = (a ? a->count : 0) + b->count;
	PG_RETURN_POINTER(r);
}

static int
compare_float8(const void *a, const void *b)
{
	return float8_cmp_internal(*(const float8 *) a, *(const float8 *) b);
}

static int
compare_int64(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return x < y ? -1 : x > y ? 1 : 0;
}

/*
 * percentile_disc(p) of n sorted values: the first value whose position is
 * at least p * n (1-based), as PostgreSQL computes it.
 */
static inline int64
disc_position(double p, int64 n)
{
	int64		row = (int64) ceil(p * n);

	return Max(row, 1) - 1;
}

static const double quintile_fractions[4] = {0.2, 0.4, 0.6, 0.8};

/* -> float8[4]: the values at 0.2, 0.4, 0.6 and 0.8; sorts the state */
Datum
ca_quintile_breaks_final(PG_FUNCTION_ARGS)
{
	QuantileState *qs;
	Datum		breaks[4];

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	qs = (QuantileState *) PG_GETARG_POINTER(0);
	if (qs->count == 0)
		PG_RETURN_NULL();
	/* sorting keeps the same multiset: the state stays shareable */
	qsort(qs->values, qs->count, sizeof(float8), compare_float8);
	for (int i = 0; i < 4; i++)
		breaks[i] = Float8GetDatum(qs->values[disc_position(quintile_fractions[i], qs->count)]);
	PG_RETURN_ARRAYTYPE_P(construct_array(breaks, 4, FLOAT8OID, sizeof(float8), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

/* score 1..5 of a value against ascending breaks; ties share a score */
static inline int
score_against(double value, const double *breaks, bool descending)
{
	int			above = 0;

	for (int i = 0; i < 4; i++)
		if (float8_cmp_internal(value, breaks[i]) > 0)
			above++;
	return descending ? 5 - above : 1 + above;
}

/* quintile_score(value float8, breaks float8[], descending bool) */
Datum
ca_quintile_score(PG_FUNCTION_ARGS)
{
	double		value = PG_GETARG_FLOAT8(0);
	ArrayType  *arr = PG_GETARG_ARRAYTYPE_P(1);
	bool		descending = PG_GETARG_BOOL(2);
	Datum	   *elems;
	bool	   *nulls;
	int			n;
	double		breaks[4];

	deconstruct_array(arr, FLOAT8OID, sizeof(float8), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE,
					  &elems, &nulls, &n);
	if (ARR_NDIM(arr) > 1 || n != 4)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("quintile breaks must be an array of 4 values, not %d", n),
				 errhint("Compute them with customer_analytics.quintile_breaks(value).")));
	for (int i = 0; i < 4; i++)
	{
		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("quintile break %d is NULL", i + 1)));
		breaks[i] = DatumGetFloat8(elems[i]);
		if (i > 0 && float8_cmp_internal(breaks[i], breaks[i - 1]) < 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("quintile breaks must not decrease: break %d (%g) is below break %d (%g)",
							i + 1, breaks[i], i, breaks[i - 1])));
	}
	PG_RETURN_INT32(score_against(value, breaks, descending));
}

/*
 * reference_time(): customer_analytics.as_of if set ('now' is the wall
 * clock), else the end of the data: midnight (business time zone) after the
 * day of the last completed order line, never later than now.  A live shop
 * sees now; a historical export is judged at its own end instead of years
 * after it (where every customer looks long gone).
 */
Datum
ca_reference_time(PG_FUNCTION_ARGS)
{
	TimestampTz now = GetCurrentTransactionStartTimestamp();
	TimestampTz result = now;

	if (as_of_setting != NULL && as_of_setting[0] != '\0')
		PG_RETURN_DATUM(DirectFunctionCall3(timestamptz_in, CStringGetDatum(as_of_setting),
											ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1)));
	SPI_connect();
	SPI_execute("SELECT ((pg_catalog.max(order_ts) AT TIME ZONE customer_analytics.business_timezone())::pg_catalog.date"
				" OPERATOR(pg_catalog.+) 1)::pg_catalog.timestamp AT TIME ZONE customer_analytics.business_timezone()"
				" FROM customer_analytics.fact_order_line WHERE status OPERATOR(pg_catalog.=) 'completed'",
				true, 1);
	if (SPI_processed == 1)
	{
		bool		isnull;
		Datum		end = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull && DatumGetTimestampTz(end) < now)
			result = DatumGetTimestampTz(end);
	}
	SPI_finish();
	PG_RETURN_TIMESTAMPTZ(result);
}

/* ---------------------------------------------------------------------
 * rfm(): scan, aggregate per customer, score, name
 * ---------------------------------------------------------------------
 */
/* 64-bit key to a well-mixed 32-bit hash (splitmix64's finalizer) */
static inline uint32
mix64(uint64 k)
{
	k = (k ^ (k >> 30)) * UINT64CONST(0xBF58476D1CE4E5B9);
	k = (k ^ (k >> 27)) * UINT64CONST(0x94D049BB133111EB);
	return (uint32) (k ^ (k >> 31));
}

typedef struct CustomerAcc
{
	uint64		key;			/* hash key: durable index or customer hash */
	uint32		status;			/* simplehash bookkeeping */
	char	   *customer_id;	/* text form */
	int64		customer_key;	/* current version, default source only; -1
								 * none */
	RfmState	rfm;
	int			r,
				f,
				m;
} CustomerAcc;

#define SH_PREFIX custacc
#define SH_ELEMENT_TYPE CustomerAcc
#define SH_KEY_TYPE uint64
#define SH_KEY key
#define SH_HASH_KEY(tb, key) mix64(key)
#define SH_EQUAL(tb, a, b) ((a) == (b))
#define SH_SCOPE static inline
#define SH_DEFINE
#define SH_DECLARE
#include "lib/simplehash.h"

typedef struct SeenOrder
{
	uint64		key;			/* hash of (customer, order) */
	uint32		status;
} SeenOrder;

#define SH_PREFIX seenorder
#define SH_ELEMENT_TYPE SeenOrder
#define SH_KEY_TYPE uint64
#define SH_KEY key
#define SH_HASH_KEY(tb, key) mix64(key)
#define SH_EQUAL(tb, a, b) ((a) == (b))
#define SH_SCOPE static inline
#define SH_DEFINE
#define SH_DECLARE
#include "lib/simplehash.h"

/* a version of a customer (dim_customer row) and its durable customer */
typedef struct VersionMap
{
	uint64		key;			/* customer_key */
	uint32		status;
	uint32		durable;		/* index into durable ids */
} VersionMap;

#define SH_PREFIX versionmap
#define SH_ELEMENT_TYPE VersionMap
#define SH_KEY_TYPE uint64
#define SH_KEY key
#define SH_HASH_KEY(tb, key) mix64(key)
#define SH_EQUAL(tb, a, b) ((a) == (b))
#define SH_SCOPE static inline
#define SH_DEFINE
#define SH_DECLARE
#include "lib/simplehash.h"

typedef struct RfmScan
{
	MemoryContext cxt;
	custacc_hash *customers;
	seenorder_hash *seen;
	TimestampTz as_of;
	bool		star_schema;	/* source is fact_order_line */
	/* star schema: version -> durable customer */
	versionmap_hash *versions;
	char	  **durable_ids;
	int64	   *current_keys;
	/* generic source: how to read and hash its columns */
	Oid			customer_type;
	Oid			order_type;
	Oid			ts_type;
	Oid			amount_type;
	FmgrInfo	customer_out;
	FmgrInfo	customer_hash;
	FmgrInfo	order_hash;
	bool		has_order;
	int64		rows_seen;

	/*
	 * The lines of an order, and the orders of a customer, usually sit next
	 * to each other in the table: remembering the last ones saves most hash
	 * probes, which are cache misses on big tables.  (The entry pointer stays
	 * valid because every insertion replaces it.)
	 */
	uint64		last_custkey;
	CustomerAcc *last_acc;
	uint64		last_order_key;
	bool		last_order_valid;
} RfmScan;

static uint64
hash_value(FmgrInfo *hashfn, Datum d)
{
	return DatumGetUInt64(FunctionCall2Coll(hashfn, C_COLLATION_OID, d, UInt64GetDatum(0x5ca1ab1e)));
}

/* A customer's accumulator, made empty on its first row. */
static CustomerAcc *
rfm_customer_acc(RfmScan *sc, uint64 custkey, Datum customer)
{
	CustomerAcc *acc;
	bool		found;

	if (sc->last_acc && sc->last_custkey == custkey)
		return sc->last_acc;
	acc = custacc_insert(sc->customers, custkey, &found);
	sc->last_acc = acc;
	sc->last_custkey = custkey;
	if (!found)
	{
		memset(&acc->rfm, 0, sizeof(RfmState));
		acc->customer_id = NULL;
		acc->customer_key = -1;
		if (sc->star_schema)
		{
			acc->customer_id = sc->durable_ids[custkey];
			acc->customer_key = sc->current_keys[custkey];
		}
		else
		{
			MemoryContext old = MemoryContextSwitchTo(sc->cxt);

			acc->customer_id = OutputFunctionCall(&sc->customer_out, customer);
			MemoryContextSwitchTo(old);
		}
	}
	return acc;
}

/* One row (already filtered) into the per-customer accumulators. */
static void
rfm_scan_row(RfmScan *sc, uint64 custkey, Datum customer, Datum order, bool order_null,
			 Datum ts, bool amount_null, Datum amount)
{
	TimestampTz t = ca_datum_to_timestamptz(ts, sc->ts_type);
	int64		units;
	CustomerAcc *acc;

	if (t > sc->as_of)
		return;					/* not yet happened at as_of */
	units = amount_null ? 0 : amount_units(amount, sc->amount_type);
	acc = rfm_customer_acc(sc, custkey, customer);

	/*
	 * With an order column, the lines of one order make one purchase: the
	 * first line seen counts it, the others add their amounts.  A return is
	 * never a purchase.
	 */
	if (sc->has_order && !order_null && (amount_null || units >= 0))
	{
		uint64		okey = hash_combine64(custkey * UINT64CONST(0x9E3779B97F4A7C15),
										  hash_value(&sc->order_hash, order));
		bool		seen;

		if (sc->last_order_valid && sc->last_order_key == okey)
			seen = true;
		else
		{
			seenorder_insert(sc->seen, okey, &seen);
			sc->last_order_key = okey;
			sc->last_order_valid = true;
		}
		if (seen)
		{
			if (!amount_null)
				add_units(&acc->rfm.monetary, units);
			if (t > acc->rfm.last_order)
				acc->rfm.last_order = t;
			if (t < acc->rfm.first_order)
				acc->rfm.first_order = t;
			return;
		}
	}
	rfm_add(&acc->rfm, t, amount_null, units);
}

/* Load dim_customer: version key -> durable customer id and current key. */
static void
load_customer_versions(RfmScan *sc)
{
	MemoryContext old;
	int			ndurable = 0;

	SPI_connect();
	SPI_execute("SELECT customer_key, customer_id, is_current FROM customer_analytics.dim_customer "
				"WHERE customer_key OPERATOR(pg_catalog.<>) -1 ORDER BY customer_id, valid_from", true, 0);
	old = MemoryContextSwitchTo(sc->cxt);
	sc->versions = versionmap_create(sc->cxt, Max(SPI_processed, 16), NULL);
	sc->durable_ids = palloc(sizeof(char *) * Max(SPI_processed, 1));
	sc->current_keys = palloc(sizeof(int64) * Max(SPI_processed, 1));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		bool		isnull;
		int64		key = DatumGetInt64(SPI_getbinval(tup, SPI_tuptable->tupdesc, 1, &isnull));
		char	   *id = SPI_getvalue(tup, SPI_tuptable->tupdesc, 2);
		bool		current = DatumGetBool(SPI_getbinval(tup, SPI_tuptable->tupdesc, 3, &isnull));
		VersionMap *v;
		bool		found;

		/*
		 * rows come grouped by customer_id: a new id starts a durable
		 * customer
		 */
		if (ndurable == 0 || strcmp(sc->durable_ids[ndurable - 1], id) != 0)
		{
			sc->durable_ids[ndurable] = pstrdup(id);
			sc->current_keys[ndurable] = -1;
			ndurable++;
		}
		if (current)
			sc->current_keys[ndurable - 1] = key;
		v = versionmap_insert(sc->versions, (uint64) key, &found);
		v->durable = ndurable - 1;
	}
	MemoryContextSwitchTo(old);
	SPI_finish();
}

static AttrNumber
column_attnum(Relation rel, const char *column, const char *role, Oid * type,
			  const Oid * allowed, int nallowed)
{
	AttrNumber	att = attnameAttNum(rel, column, false);
	Oid			t;

	if (att == InvalidAttrNumber)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("column \"%s\" (the %s) does not exist in %s", column, role,
						RelationGetRelationName(rel)),
				 errhint("Name the source's columns with customer_column, ts_column, amount_column and order_column.")));
	t = TupleDescAttr(RelationGetDescr(rel), att - 1)->atttypid;
	if (allowed)
	{
		bool		ok = false;

		for (int i = 0; i < nallowed; i++)
			ok |= (t == allowed[i]);
		if (!ok)
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("column \"%s\" (the %s) has type %s", column, role, format_type_be(t)),
					 errhint(strcmp(role, "amount") == 0
							 ? "Amounts must be numeric, integer or floating point."
							 : "Timestamps must be timestamptz, timestamp or date.")));
	}
	*type = t;
	return att;
}

/*
 * The customer a row counts for: in the star schema the durable customer
 * of its customer_key (false for the unknown customer, whose lines are not
 * scored), otherwise the hash of the customer column.
 */
static inline bool
row_customer(RfmScan *sc, Datum cust, uint64 *custkey)
{
	if (sc->star_schema)
	{
		VersionMap *v = versionmap_lookup(sc->versions, (uint64) DatumGetInt64(cust));

		if (v == NULL)
			return false;
		*custkey = v->durable;
	}
	else
		*custkey = hash_value(&sc->customer_hash, cust);
	return true;
}

/*
 * Scan a table directly (no executor, no SPI per row).  For the star schema
 * only completed lines of known customers count.
 */
static void
scan_table(RfmScan *sc, Relation rel, AttrNumber cust_att, AttrNumber order_att,
		   AttrNumber ts_att, AttrNumber amount_att, AttrNumber status_att,
		   AttrNumber quantity_att)
{
	TableScanDesc scan = table_beginscan(rel, GetActiveSnapshot(), 0, NULL);
	TupleTableSlot *slot = table_slot_create(rel, NULL);
	MemoryContext rowcxt = AllocSetContextCreate(CurrentMemoryContext, "rfm row", ALLOCSET_SMALL_SIZES);
	AttrNumber	natts = Max(Max(Max(cust_att, order_att), Max(Max(ts_att, amount_att), status_att)),
							quantity_att);

	while (table_scan_getnextslot(scan, ForwardScanDirection, slot))
	{
		bool		cnull,
					onull = true,
					tnull,
					anull;
		Datum		cust,
					order = (Datum) 0,
					ts,
					amount;
		uint64		custkey;
		MemoryContext old;

		CHECK_FOR_INTERRUPTS();
		slot_getsomeattrs(slot, natts);
		ts = slot_getattr(slot, ts_att, &tnull);
		cust = slot_getattr(slot, cust_att, &cnull);
		if (tnull || cnull)
			continue;
		if (status_att)
		{
			bool		snull;
			Datum		status = slot_getattr(slot, status_att, &snull);
			text	   *st = DatumGetTextPP(status);

			if (snull || VARSIZE_ANY_EXHDR(st) != 9 || memcmp(VARDATA_ANY(st), "completed", 9) != 0)
				continue;
		}
		if (!row_customer(sc, cust, &custkey))
			continue;
		if (order_att)
			order = slot_getattr(slot, order_att, &onull);
		amount = slot_getattr(slot, amount_att, &anull);
		if (quantity_att)
		{
			bool		qnull;
			Datum		quantity = slot_getattr(slot, quantity_att, &qnull);

			/*
			 * A credit line worth nothing (negative quantity at price 0) is
			 * neither a purchase nor a return: with amount 0 it would count
			 * as a purchase.
			 */
			if (!qnull && DatumGetInt32(quantity) < 0 &&
				(anull || amount_units(amount, sc->amount_type) == 0))
				continue;
		}
		old = MemoryContextSwitchTo(rowcxt);
		rfm_scan_row(sc, custkey, cust, order, onull, ts, anull, amount);
		MemoryContextSwitchTo(old);
		MemoryContextReset(rowcxt);
		sc->rows_seen++;
	}
	ExecDropSingleTupleTableSlot(slot);
	table_endscan(scan);
	MemoryContextDelete(rowcxt);
}

/* a row of scan_query()'s query: customer, order, time, amount */
static void
scan_query_row(HeapTuple tup, TupleDesc td, void *arg)
{
	RfmScan    *sc = arg;
	bool		cnull,
				onull,
				tnull,
				anull;
	Datum		c = SPI_getbinval(tup, td, 1, &cnull);
	Datum		o = SPI_getbinval(tup, td, 2, &onull);
	Datum		t = SPI_getbinval(tup, td, 3, &tnull);
	Datum		a = SPI_getbinval(tup, td, 4, &anull);
	uint64		custkey;

	if (cnull || tnull || !row_customer(sc, c, &custkey))
		return;
	rfm_scan_row(sc, custkey, c, o, onull, t, anull, a);
	sc->rows_seen++;
}

/*
 * A view, a table with row-level security or a Citus table (its rows in
 * shards that only Citus's planner reaches): read it through SQL, which
 * applies the policies or goes to the shards (slower, but the same result).
 */
static void
scan_query(RfmScan *sc, Relation rel, const char *cust, const char *order,
		   const char *ts, const char *amount)
{
	char	   *sql = psprintf("SELECT %s, %s, %s, %s FROM %s",
							   quote_identifier(cust), order ? quote_identifier(order) : "NULL",
							   quote_identifier(ts), quote_identifier(amount),
							   ca_relation_name(RelationGetRelid(rel)));

	ca_spi_for_each_row(sql, 0, NULL, NULL, scan_query_row, sc);
}

/* the segment of each of the 125 cells, from the chosen map */
static void
load_segments(char *segments[5][5][5], const char *map, MemoryContext cxt)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1];

	values[0] = CStringGetTextDatum(map);
	SPI_connect();
	SPI_execute_with_args("SELECT r, f, m, segment FROM customer_analytics.rfm_segment_cells($1)",
						  1, types, values, NULL, true, 0);
	if (SPI_processed != 125)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("RFM segment map \"%s\" does not name all 125 cells", map),
				 errhint("See SELECT * FROM customer_analytics.rfm_check_segment_map('%s');", map)));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		bool		isnull;
		int			r = DatumGetInt32(SPI_getbinval(tup, SPI_tuptable->tupdesc, 1, &isnull));
		int			f = DatumGetInt32(SPI_getbinval(tup, SPI_tuptable->tupdesc, 2, &isnull));
		int			m = DatumGetInt32(SPI_getbinval(tup, SPI_tuptable->tupdesc, 3, &isnull));

		segments[r - 1][f - 1][m - 1] = MemoryContextStrdup(cxt, SPI_getvalue(tup, SPI_tuptable->tupdesc, 4));
	}
	SPI_finish();
}

/* exact breaks of int64 values, as percentile_disc */
static void
int64_breaks(int64 *values, int64 n, double *breaks)
{
	qsort(values, n, sizeof(int64), compare_int64);
	for (int i = 0; i < 4; i++)
		breaks[i] = (double) values[disc_position(quintile_fractions[i], n)];
}

/*
 * One customer to score: what rfm() and rfm_from_rollup() both emit, from
 * their own source of inputs.
 */
typedef struct RfmRow
{
	char	   *customer_id;
	int64		customer_key;	/* -1: no current version */
	int64		recency;		/* days */
	int64		frequency;
	int64		monetary;		/* units of 0.0001 */
} RfmRow;

/*
 * Exact quintile breaks of recency, frequency and monetary over the rows,
 * then one output row per customer: scores, cell and segment.
 */
static void
emit_scored_rows(ReturnSetInfo *rsinfo, RfmRow *rows, int64 n, MemoryContext cxt)
{
	int64	   *rec,
			   *freq,
			   *mon;
	double		rb[4],
				fb[4],
				mb[4];
	char	   *segments[5][5][5];
	MemoryContext old;

	if (n == 0)
		return;
	old = MemoryContextSwitchTo(cxt);
	rec = palloc(sizeof(int64) * n);
	freq = palloc(sizeof(int64) * n);
	mon = palloc(sizeof(int64) * n);
	MemoryContextSwitchTo(old);
	for (int64 i = 0; i < n; i++)
	{
		rec[i] = rows[i].recency;
		freq[i] = rows[i].frequency;
		mon[i] = rows[i].monetary;
	}
	int64_breaks(rec, n, rb);
	int64_breaks(freq, n, fb);
	int64_breaks(mon, n, mb);
	load_segments(segments, rfm_segment_map ? rfm_segment_map : "default", cxt);

	for (int64 i = 0; i < n; i++)
	{
		RfmRow	   *row = &rows[i];
		Datum		values[10];
		bool		nulls[10] = {false};
		int			r = score_against((double) row->recency, rb, true);
		int			f = score_against((double) row->frequency, fb, false);
		int			m = score_against((double) row->monetary, mb, false);
		char		cell[4] = {'0' + r, '0' + f, '0' + m, '\0'};

		values[0] = Int64GetDatum(row->customer_key);
		nulls[0] = row->customer_key < 0;
		values[1] = CStringGetTextDatum(row->customer_id);
		values[2] = Int32GetDatum((int32) row->recency);
		values[3] = Int64GetDatum(row->frequency);
		values[4] = units_to_numeric(row->monetary);
		values[5] = Int32GetDatum(r);
		values[6] = Int32GetDatum(f);
		values[7] = Int32GetDatum(m);
		values[8] = CStringGetTextDatum(cell);
		values[9] = CStringGetTextDatum(segments[r - 1][f - 1][m - 1]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
}

/* sized from the planner's row estimate, so the tables rarely grow */
static void
rfm_scan_tables(RfmScan *sc, Relation rel)
{
	double		rows = Max(rel->rd_rel->reltuples, 0);

	sc->customers = custacc_create(sc->cxt, (uint32) Min(Max(rows / 8, 1024), 16 * 1024 * 1024), NULL);
	sc->seen = seenorder_create(sc->cxt, (uint32) Min(Max(rows / 2, 4096), 64 * 1024 * 1024), NULL);
}

/*
 * The star schema distributed by Citus: its lines are in shards that the
 * table AM does not reach, so they are read through a query Citus plans.
 * scan_table()'s per-line rules (completed lines of known customers, not
 * after as_of, no credit line worth nothing) are its WHERE clause.  The
 * facts are distributed by customer_ref, every line of a customer on one
 * shard whatever its version: grouped by it (and by the customer of the
 * line's version, which a line keyed by hand against its customer_ref
 * keeps apart), each customer's whole summary is computed on its worker
 * (no combine on the coordinator), and one row per customer comes back.
 * What the summary holds is what the lines would have added one after the
 * other: an order is one purchase (whatever versions its lines are under),
 * at the times of its lines that are not credit lines, which, like the
 * credit lines' (negative) amounts, only add to the monetary value.
 */
static void
scan_star_query_row(HeapTuple tup, TupleDesc td, void *arg)
{
	RfmScan    *sc = arg;
	bool		isnull,
				anull;
	Datum		c = SPI_getbinval(tup, td, 1, &isnull);
	RfmState	st;
	Datum		a;
	uint64		custkey;
	CustomerAcc *acc;

	if (!row_customer(sc, c, &custkey))
		return;
	memset(&st, 0, sizeof(st));
	st.frequency = DatumGetInt64(SPI_getbinval(tup, td, 2, &isnull));
	a = SPI_getbinval(tup, td, 3, &anull);
	st.monetary = anull ? 0 : amount_units(a, NUMERICOID);
	if (st.frequency > 0)
	{
		st.first_order = DatumGetTimestampTz(SPI_getbinval(tup, td, 4, &isnull));
		st.last_order = DatumGetTimestampTz(SPI_getbinval(tup, td, 5, &isnull));
	}
	st.returns = DatumGetInt64(SPI_getbinval(tup, td, 6, &isnull));
	acc = rfm_customer_acc(sc, custkey, (Datum) 0);
	rfm_merge(&acc->rfm, &st);
	sc->rows_seen++;
}

static void
scan_star_query(RfmScan *sc)
{
	Oid			types[1] = {TIMESTAMPTZOID};
	Datum		values[1] = {TimestampTzGetDatum(sc->as_of)};

	ca_spi_for_each_row("SELECT pg_catalog.min(f.customer_key), "
						"pg_catalog.count(DISTINCT f.order_id) FILTER (WHERE f.revenue OPERATOR(pg_catalog.>=) 0), "
						"pg_catalog.sum(f.revenue), "
						"pg_catalog.min(f.order_ts) FILTER (WHERE f.revenue OPERATOR(pg_catalog.>=) 0), "
						"pg_catalog.max(f.order_ts) FILTER (WHERE f.revenue OPERATOR(pg_catalog.>=) 0), "
						"pg_catalog.count(DISTINCT f.order_id) FILTER (WHERE f.revenue OPERATOR(pg_catalog.<) 0) "
						"FROM customer_analytics.fact_order_line f "
						"JOIN customer_analytics.dim_customer c ON c.customer_key OPERATOR(pg_catalog.=) f.customer_key "
						"WHERE f.status OPERATOR(pg_catalog.=) 'completed' "
						"AND f.customer_key OPERATOR(pg_catalog.<>) -1 "
						"AND f.order_ts OPERATOR(pg_catalog.<=) $1 "
						"AND NOT (f.quantity OPERATOR(pg_catalog.<) 0 "
						"AND (f.revenue IS NULL OR f.revenue OPERATOR(pg_catalog.=) 0)) "
						"GROUP BY f.customer_ref, c.customer_id",
						1, types, values, scan_star_query_row, sc);
}

/*
 * fact_order_line into the accumulators: completed lines of known
 * customers, lines of an order one purchase, credit lines apart, versions
 * collapsed into their durable customer (what rfm_orders() computes in SQL).
 */
static void
scan_star_schema(RfmScan *sc, Relation rel)
{
	sc->star_schema = true;
	sc->ts_type = TIMESTAMPTZOID;
	sc->amount_type = NUMERICOID;
	sc->has_order = true;
	fmgr_info(lookup_type_cache(TEXTOID, TYPECACHE_HASH_EXTENDED_PROC)->hash_extended_proc,
			  &sc->order_hash);
	load_customer_versions(sc);
	if (ca_citus_kind(RelationGetRelid(rel)) != CA_CITUS_NONE)
		scan_star_query(sc);
	else
		scan_table(sc, rel, attnameAttNum(rel, "customer_key", false), attnameAttNum(rel, "order_id", false),
				   attnameAttNum(rel, "order_ts", false), attnameAttNum(rel, "revenue", false),
				   attnameAttNum(rel, "status", false), attnameAttNum(rel, "quantity", false));
}

/*
 * rfm(as_of, source, customer_column, ts_column, amount_column, order_column)
 *	 RETURNS TABLE (customer_key bigint, customer_id text, recency_days int,
 *					frequency bigint, monetary numeric, r int, f int, m int,
 *					rfm_cell text, segment text)
 */
Datum
ca_rfm(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	RfmScan		sc;
	Relation	rel;
	Oid			fact_oid;
	Oid			nsp = get_namespace_oid("customer_analytics", false);
	custacc_iterator it;
	CustomerAcc *acc;
	RfmRow	   *rows;
	int64		n = 0;
	static const Oid amount_types[] = {NUMERICOID, INT2OID, INT4OID, INT8OID, FLOAT4OID, FLOAT8OID};
	static const Oid ts_types[] = {TIMESTAMPTZOID, TIMESTAMPOID, DATEOID};

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("as_of and source must not be NULL")));
	memset(&sc, 0, sizeof(sc));
	sc.as_of = PG_GETARG_TIMESTAMPTZ(0);
	sc.cxt = AllocSetContextCreate(CurrentMemoryContext, "rfm", ALLOCSET_DEFAULT_SIZES);
	rel = relation_open(PG_GETARG_OID(1), AccessShareLock);
	rfm_scan_tables(&sc, rel);
	if (pg_class_aclcheck(RelationGetRelid(rel), GetUserId(), ACL_SELECT) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for %s", RelationGetRelationName(rel))));
	fact_oid = get_relname_relid("fact_order_line", nsp);
	sc.star_schema = (RelationGetRelid(rel) == fact_oid);

	if (sc.star_schema)
		scan_star_schema(&sc, rel);
	else
	{
		char	   *cust_col,
				   *ts_col,
				   *amount_col,
				   *order_col = NULL;
		AttrNumber	ca,
					oa = 0,
					ta,
					aa;
		TypeCacheEntry *tc;
		Oid			outfn;
		bool		varlena;

		if (PG_ARGISNULL(2) || PG_ARGISNULL(3) || PG_ARGISNULL(4))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("rfm() on %s needs customer_column, ts_column and amount_column",
							RelationGetRelationName(rel)),
					 errhint("e.g. rfm(now(), 'my_orders', customer_column => 'customer', ts_column => 'ordered_at', amount_column => 'total').")));
		cust_col = text_to_cstring(PG_GETARG_TEXT_PP(2));
		ts_col = text_to_cstring(PG_GETARG_TEXT_PP(3));
		amount_col = text_to_cstring(PG_GETARG_TEXT_PP(4));
		if (!PG_ARGISNULL(5))
			order_col = text_to_cstring(PG_GETARG_TEXT_PP(5));
		ca = column_attnum(rel, cust_col, "customer", &sc.customer_type, NULL, 0);
		ta = column_attnum(rel, ts_col, "timestamp", &sc.ts_type, ts_types, lengthof(ts_types));
		aa = column_attnum(rel, amount_col, "amount", &sc.amount_type, amount_types, lengthof(amount_types));
		if (order_col)
		{
			oa = column_attnum(rel, order_col, "order", &sc.order_type, NULL, 0);
			tc = lookup_type_cache(sc.order_type, TYPECACHE_HASH_EXTENDED_PROC);
			if (!OidIsValid(tc->hash_extended_proc))
				ereport(ERROR,
						(errcode(ERRCODE_UNDEFINED_FUNCTION),
						 errmsg("orders cannot be told apart: type %s has no hash function",
								format_type_be(sc.order_type))));
			fmgr_info(tc->hash_extended_proc, &sc.order_hash);
			sc.has_order = true;
		}
		tc = lookup_type_cache(sc.customer_type, TYPECACHE_HASH_EXTENDED_PROC);
		if (!OidIsValid(tc->hash_extended_proc))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_FUNCTION),
					 errmsg("customers cannot be told apart: type %s has no hash function",
							format_type_be(sc.customer_type))));
		fmgr_info(tc->hash_extended_proc, &sc.customer_hash);
		getTypeOutputInfo(sc.customer_type, &outfn, &varlena);
		fmgr_info(outfn, &sc.customer_out);

		if ((rel->rd_rel->relkind == RELKIND_RELATION || rel->rd_rel->relkind == RELKIND_MATVIEW) &&
			check_enable_rls(RelationGetRelid(rel), InvalidOid, false) != RLS_ENABLED &&
			ca_citus_kind(RelationGetRelid(rel)) == CA_CITUS_NONE)
			scan_table(&sc, rel, ca, oa, ta, aa, 0, 0);
		else
			scan_query(&sc, rel, cust_col, order_col, ts_col, amount_col);
	}
	relation_close(rel, AccessShareLock);

	/* the customers with a purchase (only returns: nothing to score) */
	rows = MemoryContextAllocHuge(sc.cxt, sizeof(RfmRow) * Max(sc.customers->members, 1));
	custacc_start_iterate(sc.customers, &it);
	while ((acc = custacc_iterate(sc.customers, &it)) != NULL)
	{
		if (acc->rfm.frequency == 0)
			continue;
		rows[n].customer_id = acc->customer_id;
		rows[n].customer_key = acc->customer_key;
		rows[n].recency = (sc.as_of - acc->rfm.last_order) / USECS_PER_DAY;
		rows[n].frequency = acc->rfm.frequency;
		rows[n].monetary = acc->rfm.monetary;
		n++;
	}
	InitMaterializedSRF(fcinfo, 0);
	emit_scored_rows(rsinfo, rows, n, sc.cxt);
	MemoryContextDelete(sc.cxt);
	return (Datum) 0;
}

/* ---------------------------------------------------------------------
 * rfm_from_rollup(): rfm() scored from rfm_rollup_customer
 * ---------------------------------------------------------------------
 */

/*
 * rfm_from_rollup(as_of) RETURNS the columns of rfm()
 *
 * refresh_customer_rfm() rescoring every customer after each change is
 * what keeps customer_rfm exact; reading the rollup (a row per customer)
 * instead of the facts is what makes that cheap.  The rows are scored by
 * emit_scored_rows(), as rfm()'s are.
 */
Datum
ca_rfm_from_rollup(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	TimestampTz as_of = PG_GETARG_TIMESTAMPTZ(0);
	Oid			nsp = get_namespace_oid("customer_analytics", false);
	Oid			relid = get_relname_relid("rfm_rollup_customer", nsp);
	MemoryContext cxt;
	MemoryContext old;
	Relation	rel;
	TableScanDesc scan;
	TupleTableSlot *slot;
	AttrNumber	id_att,
				key_att,
				last_att,
				freq_att,
				mon_att;
	RfmRow	   *rows;
	int64		n = 0,
				cap = 1024;

	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("table customer_analytics.rfm_rollup_customer does not exist")));
	{
		CaCitusKind citus = ca_citus_kind(relid);

		if (citus != CA_CITUS_NONE)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("cannot score customers from customer_analytics.rfm_rollup_customer: it is managed by Citus"),
					 ca_citus_errdetail(relid, citus),
					 errhint("Score from the facts with customer_analytics.rfm(), which reads a Citus table through SQL.")));
	}
	cxt = AllocSetContextCreate(CurrentMemoryContext, "rfm_from_rollup", ALLOCSET_DEFAULT_SIZES);
	rel = table_open(relid, AccessShareLock);
	if (pg_class_aclcheck(relid, GetUserId(), ACL_SELECT) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for table rfm_rollup_customer")));
	id_att = attnameAttNum(rel, "customer_id", false);
	key_att = attnameAttNum(rel, "customer_key", false);
	last_att = attnameAttNum(rel, "last_order", false);
	freq_att = attnameAttNum(rel, "frequency", false);
	mon_att = attnameAttNum(rel, "monetary", false);

	old = MemoryContextSwitchTo(cxt);
	rows = palloc(sizeof(RfmRow) * cap);
	MemoryContextSwitchTo(old);
	scan = table_beginscan(rel, GetActiveSnapshot(), 0, NULL);
	slot = table_slot_create(rel, NULL);
	while (table_scan_getnextslot(scan, ForwardScanDirection, slot))
	{
		bool		isnull;
		Datum		d;
		int64		frequency;
		RfmRow	   *row;

		CHECK_FOR_INTERRUPTS();
		slot_getallattrs(slot);
		d = slot_getattr(slot, freq_att, &isnull);
		frequency = isnull ? 0 : DatumGetInt64(d);
		if (frequency <= 0)
			continue;			/* only returns: no purchase to score */
		d = slot_getattr(slot, last_att, &isnull);
		if (isnull)
			continue;
		if (n == cap)
		{
			cap *= 2;
			rows = repalloc_huge(rows, sizeof(RfmRow) * cap);
		}
		row = &rows[n++];
		row->recency = (as_of - DatumGetTimestampTz(d)) / USECS_PER_DAY;
		row->frequency = frequency;
		old = MemoryContextSwitchTo(cxt);
		row->customer_id = TextDatumGetCString(slot_getattr(slot, id_att, &isnull));
		d = slot_getattr(slot, mon_att, &isnull);
		row->monetary = isnull ? 0 : amount_units(d, NUMERICOID);
		MemoryContextSwitchTo(old);
		d = slot_getattr(slot, key_att, &isnull);
		row->customer_key = isnull ? -1 : DatumGetInt64(d);
	}
	ExecDropSingleTupleTableSlot(slot);
	table_endscan(scan);
	table_close(rel, AccessShareLock);

	InitMaterializedSRF(fcinfo, 0);
	emit_scored_rows(rsinfo, rows, n, cxt);
	MemoryContextDelete(cxt);
	return (Datum) 0;
}

/* ---------------------------------------------------------------------
 * rfm_rollup_rows(): rfm_rollup_customer's rows from the facts
 * ---------------------------------------------------------------------
 */

/* customers in the order of their durable keys */
static int
compare_acc_key(const void *a, const void *b)
{
	uint64		x = (*(CustomerAcc *const *) a)->key;
	uint64		y = (*(CustomerAcc *const *) b)->key;

	return x < y ? -1 : x > y ? 1 : 0;
}

/*
 * rfm_rollup_rows(up_to) RETURNS TABLE (customer_id text, customer_key
 *	 bigint, last_order timestamptz, frequency bigint, monetary numeric)
 *
 * The full rebuild of rfm_rollup_customer: rfm()'s one scan of the facts,
 * per customer with a counted line, unscored.  In SQL (rfm_agg over
 * rfm_orders()) the same rows cost a join, a sort of every line by order
 * and a second aggregation; here they cost what rfm() does.  A customer
 * with returns only has frequency 0 and no last order, as rfm_agg gives.
 */
Datum
ca_rfm_rollup_rows(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Oid			nsp = get_namespace_oid("customer_analytics", false);
	Oid			relid = get_relname_relid("fact_order_line", nsp);
	RfmScan		sc;
	Relation	rel;
	custacc_iterator it;
	CustomerAcc *acc;
	CustomerAcc **accs;
	uint64		n = 0;

	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("table customer_analytics.fact_order_line does not exist")));
	memset(&sc, 0, sizeof(sc));
	sc.as_of = PG_GETARG_TIMESTAMPTZ(0);
	sc.cxt = AllocSetContextCreate(CurrentMemoryContext, "rfm_rollup_rows", ALLOCSET_DEFAULT_SIZES);
	rel = table_open(relid, AccessShareLock);
	if (pg_class_aclcheck(relid, GetUserId(), ACL_SELECT) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for table fact_order_line")));
	rfm_scan_tables(&sc, rel);
	scan_star_schema(&sc, rel);
	table_close(rel, AccessShareLock);

	/*
	 * In customer_id order (the durable customers were numbered in it): the
	 * rebuild's INSERT then adds each key to the right end of the rollup's
	 * primary key instead of searching the index for its place.
	 */
	accs = MemoryContextAllocHuge(sc.cxt, sizeof(CustomerAcc *) * Max(sc.customers->members, 1));
	custacc_start_iterate(sc.customers, &it);
	while ((acc = custacc_iterate(sc.customers, &it)) != NULL)
		accs[n++] = acc;
	qsort(accs, n, sizeof(CustomerAcc *), compare_acc_key);

	InitMaterializedSRF(fcinfo, 0);
	for (uint64 i = 0; i < n; i++)
	{
		Datum		values[5];
		bool		nulls[5] = {false};

		acc = accs[i];
		values[0] = CStringGetTextDatum(acc->customer_id);
		values[1] = Int64GetDatum(acc->customer_key);
		nulls[1] = acc->customer_key < 0;
		values[2] = TimestampTzGetDatum(acc->rfm.last_order);
		nulls[2] = acc->rfm.frequency == 0;
		values[3] = Int64GetDatum(acc->rfm.frequency);
		values[4] = units_to_numeric(acc->rfm.monetary);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	MemoryContextDelete(sc.cxt);
	return (Datum) 0;
}
