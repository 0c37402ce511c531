/*
 * anomalies.c
 *	  Anomaly detection: streaming statistics aggregates, robust (median /
 *	  MAD) statistics, and detect_anomalies() with trailing, robust and
 *	  seasonal baselines, and a count method (negative binomial tails).
 *
 *	- stats_agg(float8) -> stats: count, mean and M2 (sum of squared
 *	  deviations) by Welford's method on values minus an anchor (see
 *	  stats_add), merged by Chan's formula.  stats is a fixed-size concrete
 *	  type and is its own state, so the aggregate runs in parallel (and
 *	  Citus can push it down).  As a window aggregate over a
 *	  sliding frame it removes the row that leaves the frame (inverse
 *	  Welford) instead of recomputing: O(1) per row whatever the frame.
 *	  Inverse updates can lose precision (a huge value leaves, a tiny
 *	  variance remains); every update adds its rounding bound to a running
 *	  error estimate, and when that estimate exceeds 1e-10 of M2 the inverse
 *	  function declines, which makes PostgreSQL recompute that frame from
 *	  scratch.  So results stay within ~1e-10 (relative) of a two-pass
 *	  computation, and the fast path is taken almost always.
 *	- median_mad_agg(float8) -> median_mad (count, median, MAD, mean absolute
 *	  deviation from the median).  Its state is all the values; as a sliding
 *	  window aggregate it keeps them sorted (binary search and memmove to
 *	  add or remove a row, O(frame) at worst but a short memmove), and the
 *	  MAD comes from merging the deviations below and above the median, which
 *	  are already sorted: no sort per row.
 *	- zscore(x, stats), robust_zscore(x, median_mad): scores that are NULL,
 *	  never an error or infinity, when the spread is 0 or unknown.
 *	- detect_anomalies(): reads (series, ts, value) rows from a query or a
 *	  table, and scores every point against a baseline that never includes
 *	  it (see score_series() for the methods, score_series_count() for
 *	  counts, flag_same_day() for the points of several series at one
 *	  time).
 */
#include "postgres.h"

#include <float.h>
#include <math.h>

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "libpq/pqformat.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/float.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "customer_analytics.h"
#include "utils.h"

PG_FUNCTION_INFO_V1(ca_stats_in);
PG_FUNCTION_INFO_V1(ca_stats_out);
PG_FUNCTION_INFO_V1(ca_stats_send);
PG_FUNCTION_INFO_V1(ca_stats_recv);
PG_FUNCTION_INFO_V1(ca_stats_sfunc);
PG_FUNCTION_INFO_V1(ca_stats_combine);
PG_FUNCTION_INFO_V1(ca_stats_msfunc);
PG_FUNCTION_INFO_V1(ca_stats_minvfunc);
PG_FUNCTION_INFO_V1(ca_stats_mfinal);
PG_FUNCTION_INFO_V1(ca_stats_count);
PG_FUNCTION_INFO_V1(ca_stats_mean);
PG_FUNCTION_INFO_V1(ca_stats_variance);
PG_FUNCTION_INFO_V1(ca_stats_stddev);
PG_FUNCTION_INFO_V1(ca_zscore);
PG_FUNCTION_INFO_V1(ca_mm_sfunc);
PG_FUNCTION_INFO_V1(ca_mm_msfunc);
PG_FUNCTION_INFO_V1(ca_mm_minvfunc);
PG_FUNCTION_INFO_V1(ca_mm_combine);
PG_FUNCTION_INFO_V1(ca_mm_serialize);
PG_FUNCTION_INFO_V1(ca_mm_deserialize);
PG_FUNCTION_INFO_V1(ca_mm_final);
PG_FUNCTION_INFO_V1(ca_robust_zscore);
PG_FUNCTION_INFO_V1(ca_detect_anomalies_query);
PG_FUNCTION_INFO_V1(ca_detect_anomalies_table);
PG_FUNCTION_INFO_V1(ca_detect_anomalies_query_v2);
PG_FUNCTION_INFO_V1(ca_detect_anomalies_table_v2);

/* Iglewicz and Hoaglin: 0.6745 = Phi^-1(0.75); 1.253314 = sqrt(pi / 2) */
#define MAD_SCALE 0.6745
#define MEANAD_SCALE 1.253314

/* relative error of M2 above which a sliding frame is recomputed */
#define MOVING_TOLERANCE 1e-10

static double zscore_threshold = 3.0;
static double false_alarms_per_year = 0.5;
static double same_day_fdr = 0.05;

void
ca_anomalies_init(void)
{
	DefineCustomRealVariable(CA_GUC_PREFIX ".zscore_threshold",
							 "Default score above which detect_anomalies() flags a point.",
							 "The absolute z (trailing method) or robust z (robust and seasonal methods).",
							 &zscore_threshold,
							 3.0, 0.0, 1000.0,
							 PGC_USERSET, 0,
							 NULL, NULL, NULL);
	DefineCustomRealVariable(CA_GUC_PREFIX ".anomaly_false_alarms_per_year",
							 "Expected false alarms per series and year of the count method of detect_anomalies().",
							 "A point is flagged when its two-sided tail probability is at most this number divided by the points a year of its series; ignored when a threshold is given.",
							 &false_alarms_per_year,
							 0.5, 0.0, 1000.0,
							 PGC_USERSET, 0,
							 NULL, NULL, NULL);
	DefineCustomRealVariable(CA_GUC_PREFIX ".anomaly_same_day_fdr",
							 "False discovery rate among the other points of a time at which the count method of detect_anomalies() flagged a point.",
							 "On a day with a flagged point, the other series' points that moved the same way are flagged by Benjamini-Hochberg at this level over the day's unflagged points; 0 turns it off.",
							 &same_day_fdr,
							 0.05, 0.0, 1.0,
							 PGC_USERSET, 0,
							 NULL, NULL, NULL);
}

/* ---------------------------------------------------------------------
 * Welford statistics
 * ---------------------------------------------------------------------
 */
typedef struct Stats
{
	int64		count;
	float8		shift;			/* anchor: the first value; see below */
	float8		mean;			/* mean of (value - shift) */
	float8		m2;				/* sum of squared deviations from the mean */
} Stats;

StaticAssertDecl(sizeof(Stats) == 32, "stats is declared with INTERNALLENGTH = 32");

/*
 * Welford's method on values minus an anchor (the first value seen).  The
 * rounding error of the running mean feeds into M2 through every update,
 * and a mean around 1e9 cannot be held to better than 1e-7: measured, plain
 * Welford was off by 2e-7 (relative) on values 1e9 + [0, 1).  Anchored, the
 * mean and the deviations are small numbers held to full precision (x -
 * shift is exact for nearby values), and the same data come out within
 * 1e-15.  An anchor far from later values only falls back to plain Welford.
 */
static inline void
stats_add(Stats *s, double x)
{
	double		y,
				delta;

	if (s->count == 0)
	{
		s->shift = x;
		s->mean = 0;
		s->m2 = 0;
	}
	y = x - s->shift;
	delta = y - s->mean;
	s->count++;
	s->mean += delta / s->count;
	s->m2 += delta * (y - s->mean);
}

static inline double
stats_mean(const Stats *s)
{
	return s->shift + s->mean;
}

/* Chan, Golub and LeVeque: merge two partial results */
static inline void
stats_merge(Stats *a, const Stats *b)
{
	double		n,
				delta;

	if (b->count == 0)
		return;
	if (a->count == 0)
	{
		*a = *b;
		return;
	}
	n = (double) a->count + (double) b->count;
	delta = ((b->shift - a->shift) + b->mean) - a->mean;
	a->mean += delta * ((double) b->count / n);
	a->m2 += b->m2 + delta * delta * ((double) a->count * (double) b->count / n);
	a->count += b->count;
}

static inline double
stats_variance(const Stats *s)
{
	return s->m2 > 0 ? s->m2 / (double) (s->count - 1) : 0.0;
}

/*
 * The moving-aggregate state: Welford plus a bound on the rounding error
 * accumulated since the frame was last computed from scratch.
 */
typedef struct MovingStats
{
	Stats		s;
	double		err_m2;			/* bound on the absolute error of m2 */
	double		err_mean;		/* bound on the absolute error of mean */
} MovingStats;

static inline void
moving_reset(MovingStats *m)
{
	memset(m, 0, sizeof(MovingStats));
}

static inline void
moving_add(MovingStats *m, double x)
{
	double		delta = (m->s.count == 0) ? 0 : (x - m->s.shift) - m->s.mean;

	stats_add(&m->s, x);
	m->err_mean += DBL_EPSILON * (fabs(m->s.mean) + fabs(delta) / m->s.count);
	m->err_m2 += 2 * DBL_EPSILON * (fabs(m->s.m2) + fabs(delta * ((x - m->s.shift) - m->s.mean)));
}

/*
 * Take x out (it must have been added).  Returns false when the result
 * cannot be trusted any more: the caller must recompute from the values.
 * An error e in the mean makes M2 wrong by up to about 2 e sum|deviation|
 * (bounded here by count e^2 + e sqrt(count M2)); rounding in the updates
 * themselves is bounded per step.
 */
static inline bool
moving_remove(MovingStats *m, double x)
{
	double		y,
				delta,
				mean,
				err;

	if (m->s.count <= 1)
	{
		moving_reset(m);
		return true;
	}
	if (!isfinite(x) || !isfinite(m->s.mean) || !isfinite(m->s.m2))
		return false;
	y = x - m->s.shift;
	delta = y - m->s.mean;
	mean = m->s.mean - delta / (m->s.count - 1);
	m->s.m2 -= delta * (y - mean);
	m->s.mean = mean;
	m->s.count--;
	m->err_mean += DBL_EPSILON * (fabs(mean) + fabs(delta) / m->s.count);
	m->err_m2 += 4 * DBL_EPSILON * (fabs(m->s.m2) + fabs(delta * (y - mean)));
	err = m->err_m2 + m->s.count * m->err_mean * m->err_mean +
		2 * m->err_mean * sqrt(m->s.count * Max(m->s.m2, 0.0));
	if (m->s.m2 < 0 || err > MOVING_TOLERANCE * m->s.m2)
	{
		/* an exact zero stays exact: a constant frame has no error */
		if (m->s.m2 == 0 && m->err_m2 == 0 && m->err_mean == 0)
			return true;
		return false;
	}
	return true;
}

/* stats text form: (count,mean,m2) with every digit */
Datum
ca_stats_in(PG_FUNCTION_ARGS)
{
	char	   *str = PG_GETARG_CSTRING(0);
	Stats	   *s = palloc0(sizeof(Stats));
	char	   *p = str;
	char	   *end;
	long long	count;

	while (*p == ' ')
		p++;
	if (*p++ != '(')
		goto bad;
	errno = 0;
	count = strtoll(p, &end, 10);
	if (end == p || errno != 0 || count < 0 || *end != ',')
		goto bad;
	p = end + 1;
	s->shift = strtod(p, &end);
	if (end == p || *end != ',')
		goto bad;
	p = end + 1;
	s->m2 = strtod(p, &end);
	if (end == p || *end != ')')
		goto bad;
	p = end + 1;
	while (*p == ' ')
		p++;
	if (*p != '\0' || (count == 0 && (s->shift != 0 || s->m2 != 0)) || s->m2 < 0)
		goto bad;
	s->mean = 0;				/* the text form's mean is the anchor */
	s->count = count;
	PG_RETURN_POINTER(s);
bad:
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
			 errmsg("invalid input syntax for type stats: \"%s\"", str),
			 errdetail("Expected (count,mean,m2): a count >= 0, the mean, and the sum of squared deviations (>= 0); all 0 for no values.")));
	PG_RETURN_NULL();
}

Datum
ca_stats_out(PG_FUNCTION_ARGS)
{
	Stats	   *s = (Stats *) PG_GETARG_POINTER(0);

	PG_RETURN_CSTRING(psprintf("(" INT64_FORMAT ",%s,%s)", s->count,
							   float8out_internal(stats_mean(s)), float8out_internal(s->m2)));
}

/* binary form: int64 count, float8 anchor, float8 mean from it, float8 m2 */
Datum
ca_stats_send(PG_FUNCTION_ARGS)
{
	Stats	   *s = (Stats *) PG_GETARG_POINTER(0);
	StringInfoData buf;

	pq_begintypsend(&buf);
	pq_sendint64(&buf, s->count);
	pq_sendfloat8(&buf, s->shift);
	pq_sendfloat8(&buf, s->mean);
	pq_sendfloat8(&buf, s->m2);
	PG_RETURN_BYTEA_P(pq_endtypsend(&buf));
}

Datum
ca_stats_recv(PG_FUNCTION_ARGS)
{
	StringInfo	buf = (StringInfo) PG_GETARG_POINTER(0);
	Stats	   *s = palloc(sizeof(Stats));

	s->count = pq_getmsgint64(buf);
	s->shift = pq_getmsgfloat8(buf);
	s->mean = pq_getmsgfloat8(buf);
	s->m2 = pq_getmsgfloat8(buf);
	if (s->count < 0 || s->m2 < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
				 errmsg("invalid binary value for type stats"),
				 errdetail("The count and the sum of squared deviations must not be negative.")));
	PG_RETURN_POINTER(s);
}

/*
 * stats_agg(float8) transition: STRICT with initial state (0,0,0), so NULLs
 * are skipped by the executor.  Inside an aggregate the state is ours and
 * is updated in place; called directly, it returns a new value.
 */
Datum
ca_stats_sfunc(PG_FUNCTION_ARGS)
{
	Stats	   *s = (Stats *) PG_GETARG_POINTER(0);

	if (!AggCheckCallContext(fcinfo, NULL))
	{
		Stats	   *copy = palloc(sizeof(Stats));

		*copy = *s;
		s = copy;
	}
	stats_add(s, PG_GETARG_FLOAT8(1));
	PG_RETURN_POINTER(s);
}

Datum
ca_stats_combine(PG_FUNCTION_ARGS)
{
	Stats	   *a = (Stats *) PG_GETARG_POINTER(0);
	Stats	   *b = (Stats *) PG_GETARG_POINTER(1);

	if (!AggCheckCallContext(fcinfo, NULL))
	{
		Stats	   *copy = palloc(sizeof(Stats));

		*copy = *a;
		a = copy;
	}
	stats_merge(a, b);
	PG_RETURN_POINTER(a);
}

/* moving-aggregate transition: (internal, float8) -> internal; NULLs skipped */
Datum
ca_stats_msfunc(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt = ca_aggregate_context(fcinfo, "stats_agg moving transition");
	MovingStats *m;

	if (PG_ARGISNULL(0))
		m = MemoryContextAllocZero(aggcxt, sizeof(MovingStats));
	else
		m = (MovingStats *) PG_GETARG_POINTER(0);
	if (!PG_ARGISNULL(1))
		moving_add(m, PG_GETARG_FLOAT8(1));
	PG_RETURN_POINTER(m);
}

/* inverse transition: NULL result = "recompute this frame from scratch" */
Datum
ca_stats_minvfunc(PG_FUNCTION_ARGS)
{
	MovingStats *m;

	(void) ca_aggregate_context(fcinfo, "stats_agg inverse transition");
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	m = (MovingStats *) PG_GETARG_POINTER(0);
	if (!PG_ARGISNULL(1) && !moving_remove(m, PG_GETARG_FLOAT8(1)))
		PG_RETURN_NULL();
	PG_RETURN_POINTER(m);
}

Datum
ca_stats_mfinal(PG_FUNCTION_ARGS)
{
	Stats	   *s = palloc0(sizeof(Stats));

	if (!PG_ARGISNULL(0))
		*s = ((MovingStats *) PG_GETARG_POINTER(0))->s;
	PG_RETURN_POINTER(s);
}

Datum
ca_stats_count(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64(((Stats *) PG_GETARG_POINTER(0))->count);
}

Datum
ca_stats_mean(PG_FUNCTION_ARGS)
{
	Stats	   *s = (Stats *) PG_GETARG_POINTER(0);

	if (s->count == 0)
		PG_RETURN_NULL();
	PG_RETURN_FLOAT8(stats_mean(s));
}

Datum
ca_stats_variance(PG_FUNCTION_ARGS)
{
	Stats	   *s = (Stats *) PG_GETARG_POINTER(0);

	if (s->count < 2)
		PG_RETURN_NULL();
	PG_RETURN_FLOAT8(stats_variance(s));
}

Datum
ca_stats_stddev(PG_FUNCTION_ARGS)
{
	Stats	   *s = (Stats *) PG_GETARG_POINTER(0);

	if (s->count < 2)
		PG_RETURN_NULL();
	PG_RETURN_FLOAT8(sqrt(stats_variance(s)));
}

/* (x - mean) / sd, or NULL when sd is 0, unknown or not finite */
static inline bool
z_of(double x, double center, double spread, double *z)
{
	double		r;

	if (!(spread > 0) || !isfinite(spread) || !isfinite(center))
		return false;
	r = (x - center) / spread;
	if (!isfinite(r))
		return false;
	*z = r;
	return true;
}

Datum
ca_zscore(PG_FUNCTION_ARGS)
{
	double		x = PG_GETARG_FLOAT8(0);
	Stats	   *s = (Stats *) PG_GETARG_POINTER(1);
	double		z;

	if (s->count < 2 || !z_of(x, stats_mean(s), sqrt(stats_variance(s)), &z))
		PG_RETURN_NULL();
	PG_RETURN_FLOAT8(z);
}

/* ---------------------------------------------------------------------
 * Median and MAD
 * ---------------------------------------------------------------------
 */
typedef struct ValueBag
{
	int64		n;
	int64		capacity;
	bool		sorted;
	double	   *v;
} ValueBag;

#define BAG_MAX ((int64) (MaxAllocSize / sizeof(double)))

static ValueBag *
bag_create(MemoryContext cxt, int64 capacity)
{
	ValueBag   *b = MemoryContextAlloc(cxt, sizeof(ValueBag));

	b->n = 0;
	b->capacity = Max(capacity, 16);
	b->sorted = true;
	b->v = MemoryContextAlloc(cxt, sizeof(double) * b->capacity);
	return b;
}

static void
bag_reserve(ValueBag *b, int64 more)
{
	int64		capacity;

	if (b->n + more <= b->capacity)
		return;
	capacity = Max(b->capacity * 2, b->n + more);
	if (capacity > BAG_MAX)
	{
		if (b->n + more > BAG_MAX)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("median_mad_agg cannot hold more than " INT64_FORMAT " values", BAG_MAX),
					 errhint("Compute it per partition, or on a sample.")));
		capacity = BAG_MAX;
	}
	b->v = repalloc(b->v, sizeof(double) * capacity);
	b->capacity = capacity;
}

static int
compare_float8(const void *a, const void *b)
{
	return float8_cmp_internal(*(const double *) a, *(const double *) b);
}

/* first position whose value is >= x (NaN sorts last, as in PostgreSQL) */
static inline int64
bag_lower_bound(const ValueBag *b, double x)
{
	int64		lo = 0,
				hi = b->n;

	while (lo < hi)
	{
		int64		mid = lo + (hi - lo) / 2;

		if (float8_cmp_internal(b->v[mid], x) < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static inline void
bag_append(ValueBag *b, double x)
{
	bag_reserve(b, 1);
	if (b->n > 0 && float8_cmp_internal(b->v[b->n - 1], x) > 0)
		b->sorted = false;
	b->v[b->n++] = x;
}

static inline void
bag_sort(ValueBag *b)
{
	if (!b->sorted)
	{
		qsort(b->v, b->n, sizeof(double), compare_float8);
		b->sorted = true;
	}
}

static inline void
bag_insert_sorted(ValueBag *b, double x)
{
	int64		pos;

	bag_sort(b);
	bag_reserve(b, 1);
	pos = bag_lower_bound(b, x);
	memmove(b->v + pos + 1, b->v + pos, sizeof(double) * (b->n - pos));
	b->v[pos] = x;
	b->n++;
}

/* remove one occurrence of x; false if it is not there */
static inline bool
bag_remove_sorted(ValueBag *b, double x)
{
	int64		pos;

	bag_sort(b);
	pos = bag_lower_bound(b, x);
	if (pos >= b->n || float8_cmp_internal(b->v[pos], x) != 0)
		return false;
	memmove(b->v + pos, b->v + pos + 1, sizeof(double) * (b->n - pos - 1));
	b->n--;
	return true;
}

typedef struct RobustSummary
{
	int64		n;
	double		median;
	double		mad;
	double		mean_ad;		/* mean absolute deviation from the median */
} RobustSummary;

/*
 * Median, MAD and mean absolute deviation of sorted values.  Deviations of
 * the values below the median, read downwards, and above it, read upwards,
 * are two sorted runs; merging them up to the middle gives the MAD.
 */
static void
robust_summary(const double *v, int64 n, RobustSummary *r)
{
	int64		split,
				lo,
				hi,
				want_lo,
				want_hi,
				k;
	double		dev_lo = 0,
				dev_hi = 0,
				sum = 0;

	r->n = n;
	if (n == 0)
	{
		r->median = r->mad = r->mean_ad = 0;
		return;
	}
	r->median = (n % 2) ? v[n / 2] : v[n / 2 - 1] + (v[n / 2] - v[n / 2 - 1]) / 2;
	/* first index at or above the median */
	split = n / 2;
	while (split > 0 && v[split - 1] >= r->median)
		split--;
	lo = split - 1;				/* walks down */
	hi = split;					/* walks up */
	want_lo = (n - 1) / 2;
	want_hi = n / 2;
	for (k = 0; k <= want_hi; k++)
	{
		double		d;

		if (hi >= n || (lo >= 0 && r->median - v[lo] <= v[hi] - r->median))
			d = r->median - v[lo--];
		else
			d = v[hi++] - r->median;
		if (k == want_lo)
			dev_lo = d;
		if (k == want_hi)
			dev_hi = d;
	}
	r->mad = dev_lo + (dev_hi - dev_lo) / 2;
	for (k = 0; k < n; k++)
		sum += fabs(v[k] - r->median);
	r->mean_ad = sum / n;
}

/* 0.6745 (x - median) / MAD, else (x - median) / (1.253314 meanAD) */
static inline bool
robust_z_of(double x, const RobustSummary *r, double *z)
{
	if (r->n == 0)
		return false;
	if (r->mad > 0 && isfinite(r->mad))
		return z_of(x, r->median, r->mad / MAD_SCALE, z);
	return z_of(x, r->median, MEANAD_SCALE * r->mean_ad, z);
}

/*
 * median_mad_agg(float8) transition: append; NULLs skipped.  In a window
 * whose frame only grows, the final function runs after every row: keep
 * the values sorted there instead of sorting them each time.
 */
Datum
ca_mm_sfunc(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt = ca_aggregate_context(fcinfo, "median_mad_agg");
	int			kind = AggCheckCallContext(fcinfo, NULL);
	ValueBag   *b;

	b = PG_ARGISNULL(0) ? bag_create(aggcxt, 64) : (ValueBag *) PG_GETARG_POINTER(0);
	if (!PG_ARGISNULL(1))
	{
		MemoryContext old = MemoryContextSwitchTo(aggcxt);

		if (kind == AGG_CONTEXT_WINDOW)
			bag_insert_sorted(b, PG_GETARG_FLOAT8(1));
		else
			bag_append(b, PG_GETARG_FLOAT8(1));
		MemoryContextSwitchTo(old);
	}
	PG_RETURN_POINTER(b);
}

/* moving transition: keep the frame sorted */
Datum
ca_mm_msfunc(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt = ca_aggregate_context(fcinfo, "median_mad_agg");
	ValueBag   *b = PG_ARGISNULL(0) ? bag_create(aggcxt, 64) : (ValueBag *) PG_GETARG_POINTER(0);

	if (!PG_ARGISNULL(1))
	{
		MemoryContext old = MemoryContextSwitchTo(aggcxt);

		bag_insert_sorted(b, PG_GETARG_FLOAT8(1));
		MemoryContextSwitchTo(old);
	}
	PG_RETURN_POINTER(b);
}

Datum
ca_mm_minvfunc(PG_FUNCTION_ARGS)
{
	ValueBag   *b;

	(void) ca_aggregate_context(fcinfo, "median_mad_agg");
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	b = (ValueBag *) PG_GETARG_POINTER(0);
	if (!PG_ARGISNULL(1) && !bag_remove_sorted(b, PG_GETARG_FLOAT8(1)))
		PG_RETURN_NULL();		/* cannot happen; recompute rather than lie */
	PG_RETURN_POINTER(b);
}

Datum
ca_mm_combine(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt = ca_aggregate_context(fcinfo, "median_mad_agg");
	ValueBag   *a = PG_ARGISNULL(0) ? NULL : (ValueBag *) PG_GETARG_POINTER(0);
	ValueBag   *b = PG_ARGISNULL(1) ? NULL : (ValueBag *) PG_GETARG_POINTER(1);
	MemoryContext old;

	if (b == NULL || b->n == 0)
	{
		if (a == NULL)
			PG_RETURN_NULL();
		PG_RETURN_POINTER(a);
	}
	old = MemoryContextSwitchTo(aggcxt);
	if (a == NULL)
		a = bag_create(aggcxt, b->n);
	bag_reserve(a, b->n);
	memcpy(a->v + a->n, b->v, sizeof(double) * b->n);
	a->n += b->n;
	a->sorted = false;
	MemoryContextSwitchTo(old);
	PG_RETURN_POINTER(a);
}

/* serialized: int64 count, then the values */
Datum
ca_mm_serialize(PG_FUNCTION_ARGS)
{
	ValueBag   *b;
	StringInfoData buf;

	(void) ca_aggregate_context(fcinfo, "median_mad_agg");
	b = (ValueBag *) PG_GETARG_POINTER(0);
	pq_begintypsend(&buf);
	pq_sendint64(&buf, b->n);
	for (int64 i = 0; i < b->n; i++)
		pq_sendfloat8(&buf, b->v[i]);
	PG_RETURN_BYTEA_P(pq_endtypsend(&buf));
}

Datum
ca_mm_deserialize(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt = ca_aggregate_context(fcinfo, "median_mad_agg");
	bytea	   *raw = PG_GETARG_BYTEA_PP(0);
	StringInfoData buf;
	ValueBag   *b;
	int64		n;

	buf.data = VARDATA_ANY(raw);
	buf.len = VARSIZE_ANY_EXHDR(raw);
	buf.maxlen = buf.len;
	buf.cursor = 0;
	n = pq_getmsgint64(&buf);
	if (n < 0 || n > BAG_MAX || (int64) (buf.len - buf.cursor) != n * (int64) sizeof(double))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
				 errmsg("invalid median_mad_agg state")));
	b = bag_create(aggcxt, n);
	for (int64 i = 0; i < n; i++)
		bag_append(b, pq_getmsgfloat8(&buf));
	PG_RETURN_POINTER(b);
}

/* -> median_mad (count, median, mad, mean_abs_dev); sorting keeps the multiset */
Datum
ca_mm_final(PG_FUNCTION_ARGS)
{
	ValueBag   *b = PG_ARGISNULL(0) ? NULL : (ValueBag *) PG_GETARG_POINTER(0);
	RobustSummary r;
	TupleDesc	tupdesc;
	Datum		values[4];
	bool		nulls[4] = {false, false, false, false};

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "median_mad_agg must return a composite type");
	tupdesc = BlessTupleDesc(tupdesc);
	if (b != NULL)
		bag_sort(b);
	robust_summary(b ? b->v : NULL, b ? b->n : 0, &r);
	values[0] = Int64GetDatum(r.n);
	values[1] = Float8GetDatum(r.median);
	values[2] = Float8GetDatum(r.mad);
	values[3] = Float8GetDatum(r.mean_ad);
	nulls[1] = nulls[2] = nulls[3] = (r.n == 0);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* robust_zscore(x float8, m median_mad) */
Datum
ca_robust_zscore(PG_FUNCTION_ARGS)
{
	double		x = PG_GETARG_FLOAT8(0);
	HeapTupleHeader t = PG_GETARG_HEAPTUPLEHEADER(1);
	bool		isnull;
	RobustSummary r;
	double		z;

	r.n = DatumGetInt64(GetAttributeByNum(t, 1, &isnull));
	if (isnull || r.n == 0)
		PG_RETURN_NULL();
	r.median = DatumGetFloat8(GetAttributeByNum(t, 2, &isnull));
	if (isnull)
		PG_RETURN_NULL();
	r.mad = DatumGetFloat8(GetAttributeByNum(t, 3, &isnull));
	if (isnull)
		r.mad = 0;
	r.mean_ad = DatumGetFloat8(GetAttributeByNum(t, 4, &isnull));
	if (isnull)
		r.mean_ad = 0;
	if (!robust_z_of(x, &r, &z))
		PG_RETURN_NULL();
	PG_RETURN_FLOAT8(z);
}

/* ---------------------------------------------------------------------
 * detect_anomalies()
 * ---------------------------------------------------------------------
 */
typedef enum Method
{
	METHOD_TRAILING,
	METHOD_ROBUST,
	METHOD_SEASONAL,
	METHOD_COUNT
} Method;

typedef enum Direction
{
	DIR_BOTH,
	DIR_SPIKE,
	DIR_DROP
} Direction;

typedef enum Scale
{
	SCALE_LINEAR,
	SCALE_SQRT,
	SCALE_LOG
} Scale;

typedef struct DetectOptions
{
	Method		method;
	Scale		scale;
	int			window;
	double		threshold;
	bool		threshold_given;
	double		false_alarms;	/* per year, when no threshold is given */
	double		same_day_fdr;	/* count method: see flag_same_day() */
	int			min_history;
	Direction	direction;
	double		min_relative_change;
	int			seasons;
	int			season_days;
} DetectOptions;

typedef struct Point
{
	char	   *series;			/* NULL: the NULL series */
	TimestampTz ts;
	double		value;
	bool		value_null;
	double		exposure;		/* fraction of the period observed: 1 whole, 0
								 * not scored (a closed day) */
	int64		seq;			/* input order, to keep equal timestamps
								 * stable */
} Point;

typedef struct PointResult
{
	bool		has_expected;
	double		expected;
	bool		has_z;
	double		z;
	bool		has_robust_z;
	double		robust_z;
	bool		has_p;
	double		p_value;
	bool		is_anomaly;
	bool		eligible;		/* count method: scored after min_history */
	bool		testable;		/* ... and in the wanted direction, by at
								 * least min_relative_change */
} PointResult;

static int
compare_points(const void *a, const void *b)
{
	const Point *pa = a;
	const Point *pb = b;
	int			c;

	if (pa->series == NULL || pb->series == NULL)
		c = (pa->series == NULL) - (pb->series == NULL);
	else
		c = strcmp(pa->series, pb->series);
	if (c != 0)
		return c;
	if (pa->ts != pb->ts)
		return pa->ts < pb->ts ? -1 : 1;
	return pa->seq < pb->seq ? -1 : pa->seq > pb->seq ? 1 : 0;
}

static bool
same_series(const Point *a, const Point *b)
{
	if (a->series == NULL || b->series == NULL)
		return a->series == b->series;
	return strcmp(a->series, b->series) == 0;
}

static double
median_of(double *v, int n)
{
	qsort(v, n, sizeof(double), compare_float8);
	return (n % 2) ? v[n / 2] : v[n / 2 - 1] + (v[n / 2] - v[n / 2 - 1]) / 2;
}

/*
 * Scores are computed on a scale where the noise is about the same at every
 * level: sqrt for counts (Anscombe: 2 sqrt(x + 3/8) has variance ~1 for a
 * Poisson count), log for amounts that vary by a factor (log(1 + x)).
 * Values below the scale's domain are scored as its lowest value.
 */
static inline double
to_scale(double x, Scale scale)
{
	switch (scale)
	{
		case SCALE_SQRT:
			return 2.0 * sqrt(Max(x, 0.0) + 0.375);
		case SCALE_LOG:
			return log1p(Max(x, 0.0));
		default:
			return x;
	}
}

static inline double
from_scale(double y, Scale scale)
{
	switch (scale)
	{
		case SCALE_SQRT:
			/* below the scale's lowest value (that of 0) means 0 */
			return (y <= 2.0 * sqrt(0.375)) ? 0.0 : y * y / 4.0 - 0.375;
		case SCALE_LOG:
			return expm1(y);
		default:
			return y;
	}
}

/*
 * Seasonal baseline of point i: the median of the values at the same time
 * of the previous `seasons` seasons (a row within 12 hours of ts - k
 * season_days days), among the earlier non-NULL points.  ts[]/val[] hold
 * those points in time order, nprior of them.
 */
static bool
seasonal_baseline(const TimestampTz *ts, const double *val, int64 nprior, TimestampTz at,
				  const DetectOptions *o, double *baseline)
{
	double		found[64];
	int			nfound = 0;

	for (int k = 1; k <= o->seasons && nfound < (int) lengthof(found); k++)
	{
		TimestampTz target = at - (TimestampTz) k * o->season_days * USECS_PER_DAY;
		int64		lo = 0,
					hi = nprior;

		while (lo < hi)
		{
			int64		mid = lo + (hi - lo) / 2;

			if (ts[mid] < target - USECS_PER_DAY / 2)
				lo = mid + 1;
			else
				hi = mid;
		}
		if (lo < nprior && ts[lo] <= target + USECS_PER_DAY / 2)
			found[nfound++] = val[lo];
	}
	if (nfound == 0)
		return false;
	*baseline = median_of(found, nfound);
	return true;
}

/*
 * Score one series (points sorted by time).  Each point is scored against
 * the `window` latest earlier scored quantities, never itself:
 *	trailing: q = value; expected = mean; flag on z
 *	robust:	  q = value; expected = median; flag on robust z
 *	seasonal: q = value - seasonal baseline (residual); expected = baseline
 *			  + median residual; flag when both the z and the robust z of the
 *			  residual pass the threshold (the robust z alone, from the MAD of
 *			  a short window, is noisy; the z alone is masked by earlier
 *			  outliers: measured on the generator's planted anomalies, the
 *			  pair has the fewest false alarms at the same recall)
 * All of it on the chosen scale (linear, sqrt, log); expected is reported
 * back on the scale of the values.
 * A point is flagged only after min_history earlier values, when its score
 * passes the threshold in the wanted direction and it differs from the
 * expected value by at least min_relative_change of it.
 */
static void
score_series(const Point *p, int64 n, const DetectOptions *o, PointResult *res)
{
	TimestampTz *ts = palloc(sizeof(TimestampTz) * Max(n, 1));
	double	   *val = palloc(sizeof(double) * Max(n, 1));
	double	   *q = palloc(sizeof(double) * Max(n, 1));
	int64		nvalues = 0;	/* earlier non-NULL values */
	int64		nq = 0;			/* earlier scored quantities */
	ValueBag	window;
	MovingStats ms;

	window.n = 0;
	window.capacity = o->window + 1;
	window.sorted = true;
	window.v = palloc(sizeof(double) * window.capacity);
	moving_reset(&ms);

	for (int64 i = 0; i < n; i++)
	{
		PointResult *r = &res[i];
		double		x = to_scale(p[i].value, o->scale);
		double		base = 0;
		bool		scorable;

		memset(r, 0, sizeof(PointResult));
		/* only the count method can score part of a period */
		if (p[i].value_null || p[i].exposure < 1)
			continue;
		scorable = true;
		if (o->method == METHOD_SEASONAL)
			scorable = seasonal_baseline(ts, val, nvalues, p[i].ts, o, &base);

		if (scorable && window.n > 0)
		{
			RobustSummary rs;
			double		qi = x - base;
			double		center;
			double		z;

			robust_summary(window.v, window.n, &rs);
			if (ms.s.count >= 2 && z_of(qi, stats_mean(&ms.s), sqrt(stats_variance(&ms.s)), &z))
			{
				r->has_z = true;
				r->z = z;
			}
			if (robust_z_of(qi, &rs, &z))
			{
				r->has_robust_z = true;
				r->robust_z = z;
			}
			center = (o->method == METHOD_TRAILING) ? stats_mean(&ms.s) : rs.median;
			r->has_expected = true;
			r->expected = from_scale(base + center, o->scale);

			if (nvalues >= o->min_history)
			{
				double		change = p[i].value - r->expected;
				bool		passes;

				if (o->method == METHOD_TRAILING)
					passes = r->has_z && fabs(r->z) > o->threshold;
				else if (o->method == METHOD_ROBUST)
					passes = r->has_robust_z && fabs(r->robust_z) > o->threshold;
				else
					passes = r->has_z && fabs(r->z) > o->threshold &&
						r->has_robust_z && fabs(r->robust_z) > o->threshold;
				r->is_anomaly = passes &&
					!(o->direction == DIR_SPIKE && change <= 0) &&
					!(o->direction == DIR_DROP && change >= 0) &&
					fabs(change) >= o->min_relative_change * fabs(r->expected);
			}
		}

		/* the point joins the history of the next ones */
		ts[nvalues] = p[i].ts;
		val[nvalues] = x;
		nvalues++;
		if (scorable)
		{
			double		qi = x - base;

			q[nq++] = qi;
			bag_insert_sorted(&window, qi);
			moving_add(&ms, qi);
			if (window.n > o->window)
			{
				double		old = q[nq - 1 - o->window];

				bag_remove_sorted(&window, old);
				if (!moving_remove(&ms, old))
				{
					moving_reset(&ms);
					for (int64 k = nq - o->window; k < nq; k++)
						moving_add(&ms, q[k]);
				}
			}
		}
	}
	pfree(ts);
	pfree(val);
	pfree(q);
	pfree(window.v);
}

/* ---------------------------------------------------------------------
 * The count method: tail probabilities of a negative binomial
 * ---------------------------------------------------------------------
 */
#define TAIL_EPS 1e-15
#define TAIL_TINY 1e-300
#define TAIL_MAXIT 1000000
#define WEEK_USECS (7 * USECS_PER_DAY)
#define MAX_SEASON_BUCKETS 168	/* hours of a week */
/* expected counts above which the tails are computed as normal ones */
#define LARGE_COUNT 1e7
/* Pearson's statistic this many standard errors above Poisson's */
#define OVERDISPERSION_SIGNIFICANT 2.0

/*
 * Continued fraction of the incomplete beta function, by the modified
 * Lentz method (Numerical Recipes, 2nd ed., 6.4); it converges in
 * O(sqrt(max(a, b))) steps where it is used.
 */
static double
beta_cf(double a, double b, double x)
{
	double		qab = a + b,
				qap = a + 1,
				qam = a - 1,
				c = 1,
				d = 1 - qab * x / qap,
				h;

	if (fabs(d) < TAIL_TINY)
		d = TAIL_TINY;
	d = 1 / d;
	h = d;
	for (int m = 1; m <= TAIL_MAXIT; m++)
	{
		double		m2 = 2.0 * m,
					aa,
					del;

		aa = m * (b - m) * x / ((qam + m2) * (a + m2));
		d = 1 + aa * d;
		if (fabs(d) < TAIL_TINY)
			d = TAIL_TINY;
		c = 1 + aa / c;
		if (fabs(c) < TAIL_TINY)
			c = TAIL_TINY;
		d = 1 / d;
		h *= d * c;
		aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
		d = 1 + aa * d;
		if (fabs(d) < TAIL_TINY)
			d = TAIL_TINY;
		c = 1 + aa / c;
		if (fabs(c) < TAIL_TINY)
			c = TAIL_TINY;
		d = 1 / d;
		del = d * c;
		h *= del;
		if (fabs(del - 1) < TAIL_EPS)
			break;
	}
	return h;
}

/*
 * log I_x(a, b), the regularized incomplete beta function.  Logarithms,
 * so that a tail of 1e-400 (an outage of a big shop) still has a score;
 * the small side is always the one computed directly, never as 1 - x.
 */
static double
log_ibeta(double a, double b, double x)
{
	double		lfront;

	if (x <= 0)
		return -INFINITY;
	if (x >= 1)
		return 0;
	lfront = lgamma(a + b) - lgamma(a) - lgamma(b) + a * log(x) + b * log1p(-x);
	if (x < (a + 1) / (a + b + 2))
		return lfront + log(beta_cf(a, b, x)) - log(a);
	return log1p(-exp(lfront + log(beta_cf(b, a, 1 - x)) - log(b)));
}

/*
 * log P(a, x) (lower) or log Q(a, x) (upper), the regularized incomplete
 * gamma functions: series below a + 1, continued fraction above
 * (Numerical Recipes 6.2).
 */
static double
log_igamma(double a, double x, bool upper)
{
	double		lfront;

	if (x <= 0)
		return upper ? 0 : -INFINITY;
	lfront = a * log(x) - x - lgamma(a);
	if (x < a + 1)
	{
		double		ap = a,
					del = 1 / a,
					sum = del,
					lp;

		for (int n = 0; n < TAIL_MAXIT; n++)
		{
			ap += 1;
			del *= x / ap;
			sum += del;
			if (fabs(del) < fabs(sum) * TAIL_EPS)
				break;
		}
		lp = lfront + log(sum);
		return upper ? log1p(-exp(lp)) : lp;
	}
	else
	{
		double		b = x + 1 - a,
					c = 1 / TAIL_TINY,
					d = 1 / b,
					h = d,
					lq;

		for (int i = 1; i <= TAIL_MAXIT; i++)
		{
			double		an = -i * (i - a),
						del;

			b += 2;
			d = an * d + b;
			if (fabs(d) < TAIL_TINY)
				d = TAIL_TINY;
			c = b + an / c;
			if (fabs(c) < TAIL_TINY)
				c = TAIL_TINY;
			d = 1 / d;
			del = d * c;
			h *= del;
			if (fabs(del - 1) < TAIL_EPS)
				break;
		}
		lq = lfront + log(h);
		return upper ? lq : log1p(-exp(lq));
	}
}

/* log Phi(-z); asymptotic where erfc underflows */
static double
log_normal_tail(double z)
{
	if (z < 30)
		return log(0.5 * erfc(z / M_SQRT2));
	return -0.5 * z * z - log(z) - 0.5 * log(2 * M_PI) +
		log1p(-1 / (z * z) + 3 / (z * z * z * z));
}

/*
 * log P(Y <= y) and log P(Y >= y) for a count Y with mean mu and variance
 * mu + alpha mu^2: negative binomial with size 1/alpha, or Poisson when
 * alpha mu is negligible.  P(NB <= y) = I_p(size, y + 1) with p = size /
 * (size + mu); P(Poisson <= y) = Q(y + 1, mu).
 */
static void
count_tails(double y, double mu, double alpha, double *log_lower, double *log_upper)
{
	if (mu > LARGE_COUNT)
	{
		/*
		 * The continued fractions take O(sqrt(count)) steps; this far up both
		 * distributions are normal to well within what a tail probability is
		 * used for.  Continuity-corrected.
		 */
		double		sd = sqrt(mu + alpha * mu * mu);

		*log_lower = log_normal_tail((mu - y - 0.5) / sd);
		*log_upper = (y <= 0) ? 0 : log_normal_tail((y - 0.5 - mu) / sd);
	}
	else if (alpha * mu < 1e-6)
	{
		*log_lower = log_igamma(y + 1, mu, true);
		*log_upper = (y <= 0) ? 0 : log_igamma(y, mu, false);
	}
	else
	{
		double		size = 1 / alpha;

		*log_lower = log_ibeta(size, y + 1, size / (size + mu));
		*log_upper = (y <= 0) ? 0 : log_ibeta(y, size, mu / (size + mu));
	}
	*log_lower = Min(*log_lower, 0);
	*log_upper = Min(*log_upper, 0);
}

/*
 * The z >= 0 with Phi(-z) = exp(log_q), a one-sided tail probability as a
 * normal score: Abramowitz and Stegun 26.2.23 (error < 4.5e-4), then
 * Newton steps on log Phi(-z).
 */
static double
normal_score(double log_q)
{
	double		t,
				z;

	if (log_q >= log(0.5))
		return 0;
	t = sqrt(-2 * log_q);
	z = t - (2.515517 + 0.802853 * t + 0.010328 * t * t) /
		(1 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t);
	for (int i = 0; i < 4; i++)
	{
		double		lt = log_normal_tail(z),
					slope = -exp(-0.5 * z * z - 0.5 * log(2 * M_PI) - lt);

		z -= (lt - log_q) / slope;
	}
	return z;
}

/* the season bucket of a time: its position in the week, in buckets of width */
static inline int
season_bucket(TimestampTz ts, int64 width, int nbuckets)
{
	int64		in_week = ts % WEEK_USECS;

	if (in_week < 0)
		in_week += WEEK_USECS;
	return (int) (((in_week + width / 2) / width) % nbuckets);
}

/* The time step of a series: the median gap between its points */
static int64
series_spacing(const Point *p, int64 n)
{
	int64	   *gaps = palloc(sizeof(int64) * Max(n, 1));
	int64		ngaps = 0,
				prev = 0,
				spacing;
	bool		have_prev = false;
	double	   *d;

	for (int64 i = 0; i < n; i++)
	{
		if (p[i].value_null)
			continue;
		if (have_prev && p[i].ts > prev)
			gaps[ngaps++] = p[i].ts - prev;
		prev = p[i].ts;
		have_prev = true;
	}
	if (ngaps == 0)
	{
		pfree(gaps);
		return USECS_PER_DAY;
	}
	d = palloc(sizeof(double) * ngaps);
	for (int64 i = 0; i < ngaps; i++)
		d[i] = (double) gaps[i];
	spacing = (int64) median_of(d, (int) Min(ngaps, INT_MAX));
	pfree(d);
	pfree(gaps);
	return Max(spacing, 1);
}

/* a point of the count method's history */
typedef struct CountHistory
{
	TimestampTz ts;
	int			bucket;
	double		c;				/* the count, or the edge of the usual range
								 * when it was flagged */
	double		mu;				/* its expected count, when it had one */
	double		rv;				/* relative variance of mu */
	bool		has_mu;
} CountHistory;

/* history points a trend is fitted on, at least */
#define TREND_MIN_POINTS 28
/*
 * Growth of 100% a year moves an 8-week level by 7.8%; a fit that asks for
 * more has seen something else (a closure the calendar does not know of,
 * a step), which the level window follows better alone.
 */
#define TREND_MAX_CORRECTION 0.1

/*
 * The level of the `seasons` previous weeks is their mean, which lags a
 * growing shop by half the window: 35% growth a year is 2.7% at 8 weeks,
 * a fifth of a standard deviation at 60 orders a day and half of one at
 * 400, enough to double the tail probabilities of one side and to pass for
 * overdispersion.  The growth is fitted over the profile window (longer,
 * so steadier): c = season (a + b x), x the time from the point in
 * periods, by least squares weighted as Poisson counts are (1 / season: a
 * position of the week that sells little says little, one that never
 * sells nothing); b / a is the growth per period.  The level is carried
 * forward by it from the middle of the level window to the point.
 * *factor is that correction (1 when it would pass TREND_MAX_CORRECTION),
 * *rv the relative variance it adds: the slope's, from the residuals of
 * the fit, times the lag squared.
 */
static void
level_trend(const CountHistory *h, int64 prof_start, int64 level_start, int64 nh,
			const double *season, TimestampTz now, int64 spacing,
			double *factor, double *rv)
{
	double		n = 0,
				s0 = 0,
				s1 = 0,
				s2 = 0,
				c0 = 0,
				c1 = 0,
				rss = 0,
				nl = 0,
				sxl = 0,
				det,
				a,
				b,
				lag;

	*factor = 1;
	*rv = 0;
	for (int64 j = prof_start; j < nh; j++)
	{
		double		x = (double) (h[j].ts - now) / (double) spacing,
					w = season[h[j].bucket];

		if (w <= 0)
			continue;
		n += 1;
		s0 += w;
		s1 += w * x;
		s2 += w * x * x;
		c0 += h[j].c;
		c1 += h[j].c * x;
		if (j >= level_start)
		{
			nl += 1;
			sxl += x;
		}
	}
	det = s0 * s2 - s1 * s1;
	if (n < TREND_MIN_POINTS || nl == 0 || det <= 0)
		return;
	a = (s2 * c0 - s1 * c1) / det;
	b = (s0 * c1 - s1 * c0) / det;
	if (a <= 0)
		return;
	for (int64 j = prof_start; j < nh; j++)
	{
		double		x = (double) (h[j].ts - now) / (double) spacing,
					w = season[h[j].bucket],
					d;

		if (w <= 0)
			continue;
		d = h[j].c - w * (a + b * x);
		rss += d * d / w;
	}
	lag = -sxl / nl;
	if (fabs(b / a * lag) > TREND_MAX_CORRECTION)
		return;
	*factor = 1 + b / a * lag;
	*rv = lag * lag * (rss / (n - 2)) * (s0 / det) / (a * a);
}

/*
 * Whether a count moved by at least min_relative_change m of its expected
 * count.  Counts change by factors (a rate doubles, halves), so the rule is
 * symmetric on that scale: a drop to (1 - m) mu or below, a rise to mu /
 * (1 - m) or above; at m = 0.5, half or twice the expected orders.  Read
 * as |y - mu| >= m mu instead, a rise of 50% would count as much as a
 * fall of 50% although log 1.5 is 0.41 and log 0.5 is -0.69: at 60 orders
 * a day a rise to 90 is a 1-in-3,000 chance that a shop sees a few times
 * a year over its categories (each a false alarm by construction of the
 * per-point rule; a fall to 30 is 1 in 37,000), and a flash sale doubles
 * a category's orders or more.
 * From m = 1 on no rise is that far, and the rule is the linear one.
 */
static bool
count_change_large_enough(double y, double mu, double m)
{
	if (y >= mu && m < 1)
		return y * (1 - m) >= mu;
	return fabs(y - mu) >= m * fabs(mu);
}

/*
 * The count method.  The expected count of a point is level x season:
 *	season:	the mean count of its position in the week (its weekday, for
 *			daily points) over the window_size previous periods, relative
 *			to the mean of all positions;
 *	level:	the counts of the `seasons` previous weeks divided by their
 *			season factors, carried forward by the series' growth
 *			(level_trend()).
 * Means over long windows, not the median of four weeks: at 10 orders a day
 * the baseline's own noise decides how small a change can be told from
 * chance (the median of 4 Poisson counts has ~40% of a count's variance;
 * this baseline, 16 weeks of profile and 8 of level, ~8%).
 * The count is then a negative binomial with that mean and variance
 * mu + alpha mu^2, where alpha is
 *	- the baseline's relative variance, 1 / (counts in the level window) +
 *	  1 / (counts of the weekday in the profile window) + the growth's
 *	  (level_trend()): what the mean of a
 *	  Gamma-distributed (uncertain) Poisson rate gives, so the tail is that
 *	  of the prediction, not of a known rate; plus
 *	- the overdispersion of the series, by the method of moments over the
 *	  window (sum((c - mu)^2 - var) / sum(mu^2)), only when the data show
 *	  it: Pearson's statistic more than OVERDISPERSION_SIGNIFICANT standard
 *	  errors above its Poisson value.  Otherwise the counts are Poisson: a
 *	  noisy estimate of nothing would only fatten the tails.
 * Both tails: p = 2 min(P(Y <= y), P(Y >= y)); z is the normal score of
 * the smaller tail, signed.  So the smallest count that can be a drop
 * depends on the expected one: P(Y = 0) = exp(-3) = 0.05 when 3 are
 * expected, never significant; exp(-30) when 30 are.
 * A flagged point enters the history at the edge of the usual range (mu
 * +/- the threshold's normal score in standard deviations): an outage does
 * not drag the next weeks' baseline down, and a lasting change of level is
 * still followed, a step at a time.  A point observed for only part of its
 * period (exposure < 1, the day in progress) is scored against that part
 * of the expected count and stays out of the history; exposure 0 or a NULL
 * value is not scored at all.
 * Points of several series at the same time are then tested together by
 * flag_same_day().
 */
static void
score_series_count(const Point *p, int64 n, const DetectOptions *o, PointResult *res)
{
	int64		spacing = series_spacing(p, n);
	int			nbuckets = (int) Max(1, Min(MAX_SEASON_BUCKETS, rint((double) WEEK_USECS / spacing)));
	int64		width = WEEK_USECS / nbuckets;
	int64		profile_span = (int64) o->window * spacing;
	int64		level_span = Min(profile_span, (nbuckets > 1 ? WEEK_USECS : spacing) * (int64) o->seasons);
	double		points_per_year = 365.25 * USECS_PER_DAY / (double) spacing;
	double		log_alpha_point;
	double		edge;
	CountHistory *h = palloc(sizeof(CountHistory) * Max(n, 1));
	int64		nh = 0,
				prof_start = 0,
				level_start = 0,
				nvalues = 0;
	double	   *prof_sum = palloc0(sizeof(double) * nbuckets);
	int64	   *prof_n = palloc0(sizeof(int64) * nbuckets);
	int64	   *level_n = palloc0(sizeof(int64) * nbuckets);
	double	   *season = palloc0(sizeof(double) * nbuckets);
	double		level_sum = 0,
				excess_num = 0,
				excess_den = 0,
				pearson = 0;
	int64		npearson = 0;

	if (o->threshold_given)
		log_alpha_point = log(2.0) + log_normal_tail(o->threshold);
	else
		log_alpha_point = log(Min(1.0, o->false_alarms / points_per_year));
	edge = normal_score(log_alpha_point - log(2.0));

	for (int64 i = 0; i < n; i++)
	{
		PointResult *r = &res[i];
		double		y = p[i].value;
		int			b;
		double		mean_season = 0,
					season_weight = 0,
					mu_full = 0,
					alpha = 0,
					ll = 0,
					lu = 0,
					rv = 0,
					trend = 1,
					trend_rv = 0;
		int			nseason = 0;
		bool		scorable;

		memset(r, 0, sizeof(PointResult));
		if (p[i].value_null || p[i].exposure <= 0)
			continue;
		b = season_bucket(p[i].ts, width, nbuckets);

		/* slide both windows up to this point */
		while (prof_start < nh && h[prof_start].ts < p[i].ts - profile_span)
		{
			CountHistory *old = &h[prof_start++];

			prof_sum[old->bucket] -= old->c;
			prof_n[old->bucket]--;
			if (old->has_mu)
			{
				double		d2 = (old->c - old->mu) * (old->c - old->mu);
				double		var = old->mu + old->rv * old->mu * old->mu;

				excess_num -= d2 - var;
				excess_den -= old->mu * old->mu;
				pearson -= d2 / var;
				npearson--;
			}
		}
		while (level_start < nh && h[level_start].ts < p[i].ts - level_span)
		{
			CountHistory *old = &h[level_start++];

			level_sum -= old->c;
			level_n[old->bucket]--;
		}

		for (int k = 0; k < nbuckets; k++)
			if (prof_n[k] > 0)
			{
				season[k] = prof_sum[k] / prof_n[k];
				mean_season += season[k];
				nseason++;
			}
		scorable = prof_n[b] > 0;
		if (scorable)
		{
			for (int k = 0; k < nbuckets; k++)
				if (prof_n[k] > 0)
					season[k] = (mean_season > 0) ? season[k] * nseason / mean_season : 1.0;
			for (int k = 0; k < nbuckets; k++)
				if (prof_n[k] > 0)
					season_weight += season[k] * level_n[k];
			level_trend(h, prof_start, level_start, nh, season, p[i].ts, spacing, &trend, &trend_rv);
			/* half an order over the level window when none was seen */
			mu_full = (season_weight > 0) ? level_sum / season_weight * season[b] * trend : 0;
			mu_full = Max(mu_full, 0.5 / Max(season_weight, 1.0));
			/* the baseline's own relative variance, as Poisson counts give it */
			rv = 1.0 / Max(level_sum, 0.5) + 1.0 / Max(prof_sum[b], 0.5) + trend_rv;
			alpha = rv;
			if (npearson >= 10 && excess_den > 0 &&
				(pearson - npearson) / sqrt(2.0 * npearson) > OVERDISPERSION_SIGNIFICANT)
				alpha += Max(0.0, excess_num / excess_den);

			r->has_expected = true;
			r->expected = mu_full * Min(p[i].exposure, 1.0);
			count_tails(y, r->expected, alpha, &ll, &lu);
			r->has_p = true;
			r->p_value = exp(Min(0.0, log(2.0) + Min(ll, lu)));
			r->has_z = true;
			r->z = (ll < lu) ? -normal_score(ll) : (lu < ll) ? normal_score(lu) : 0;
			if (nvalues >= o->min_history)
			{
				double		change = y - r->expected;

				r->eligible = true;
				r->testable =
					!(o->direction == DIR_SPIKE && change <= 0) &&
					!(o->direction == DIR_DROP && change >= 0) &&
					count_change_large_enough(y, r->expected, o->min_relative_change);
				r->is_anomaly = r->testable && log(2.0) + Min(ll, lu) <= log_alpha_point;
			}
		}
		nvalues++;

		/* a whole period joins the history of the next points */
		if (p[i].exposure >= 1)
		{
			CountHistory *e = &h[nh++];

			e->ts = p[i].ts;
			e->bucket = b;
			e->c = y;
			e->has_mu = scorable;
			e->mu = mu_full;
			e->rv = rv;

			/*
			 * Only once points can be flagged: before, the dispersion is
			 * still being learnt, and clipping to a range it has not learnt
			 * yet would hide it for good.
			 */
			if (scorable && nvalues > o->min_history && log(2.0) + Min(ll, lu) <= log_alpha_point)
			{
				double		sd = sqrt(mu_full + alpha * mu_full * mu_full);

				e->c = Max(0.0, Min(Max(y, mu_full - edge * sd), mu_full + edge * sd));
			}
			prof_sum[b] += e->c;
			prof_n[b]++;
			level_sum += e->c;
			level_n[b]++;
			if (e->has_mu)
			{
				double		d2 = (e->c - e->mu) * (e->c - e->mu);
				double		var = e->mu + e->rv * e->mu * e->mu;

				excess_num += d2 - var;
				excess_den += e->mu * e->mu;
				pearson += d2 / var;
				npearson++;
			}
		}
	}
	pfree(h);
	pfree(prof_sum);
	pfree(prof_n);
	pfree(level_n);
	pfree(season);
}

static int
compare_by_time(const void *a, const void *b, void *arg)
{
	const Point *p = arg;
	int64		ia = *(const int64 *) a,
				ib = *(const int64 *) b;

	if (p[ia].ts != p[ib].ts)
		return p[ia].ts < p[ib].ts ? -1 : 1;
	return ia < ib ? -1 : ia > ib ? 1 : 0;
}

typedef struct DayCandidate
{
	int64		i;
	double		p_value;
} DayCandidate;

static int
compare_candidates(const void *a, const void *b)
{
	const DayCandidate *ca = a;
	const DayCandidate *cb = b;

	if (ca->p_value != cb->p_value)
		return ca->p_value < cb->p_value ? -1 : 1;
	return ca->i < cb->i ? -1 : ca->i > cb->i ? 1 : 0;
}

/*
 * The series of one source are not independent on a given day: an outage,
 * a holiday or a broken tracker moves all of them together.  A time at
 * which some point passed the per-point rule is no longer an ordinary one,
 * so its other points are tested as a family: Benjamini-Hochberg at level
 * q over the time's unflagged points (m of them), each flagged when its
 * p-value is among the k smallest with p_(k) <= k q / m, among those that
 * moved in a direction already flagged at that time.  The per-point rule
 * keeps the false alarms of ordinary days at its rate; this one adds, on
 * the few days it opens, false ones that are in expectation at most a
 * fraction q of its flags (Benjamini and Hochberg 1995; a family selected
 * by a screening test, as in Benjamini and Bogomolov 2014, without their
 * selection adjustment: the screen is already a stringent per-point test).
 * The series were scored one by one before: a point flagged here stays in
 * its series' later baselines as it was, not clipped as a point flagged
 * on its own is (its p-value was no news alone).
 */
static void
flag_same_day(const Point *p, int64 n, PointResult *res, double q)
{
	int64	   *order = palloc(sizeof(int64) * n);
	DayCandidate *cand = palloc(sizeof(DayCandidate) * n);

	for (int64 i = 0; i < n; i++)
		order[i] = i;
	qsort_arg(order, n, sizeof(int64), compare_by_time, (void *) p);
	for (int64 start = 0, end; start < n; start = end)
	{
		bool		spike = false,
					drop = false;
		int64		m = 0,
					nc = 0,
					nflag = 0;

		for (end = start; end < n && p[order[end]].ts == p[order[start]].ts; end++)
		{
			const PointResult *r = &res[order[end]];

			if (!r->eligible)
				continue;
			if (r->is_anomaly)
			{
				if (p[order[end]].value > r->expected)
					spike = true;
				else
					drop = true;
			}
			else
				m++;
		}
		if (!(spike || drop) || m == 0)
			continue;
		for (int64 k = start; k < end; k++)
		{
			const PointResult *r = &res[order[k]];
			bool		up = p[order[k]].value > r->expected;

			if (r->testable && !r->is_anomaly && ((up && spike) || (!up && drop)))
			{
				cand[nc].i = order[k];
				cand[nc].p_value = r->p_value;
				nc++;
			}
		}
		qsort(cand, nc, sizeof(DayCandidate), compare_candidates);
		for (int64 k = 0; k < nc; k++)
			if (cand[k].p_value <= (k + 1) * q / m)
				nflag = k + 1;
		for (int64 k = 0; k < nflag; k++)
			res[cand[k].i].is_anomaly = true;
	}
	pfree(order);
	pfree(cand);
}

static double
datum_to_float8(Datum d, Oid type)
{
	switch (type)
	{
		case FLOAT8OID:
			return DatumGetFloat8(d);
		case FLOAT4OID:
			return (double) DatumGetFloat4(d);
		case INT2OID:
			return (double) DatumGetInt16(d);
		case INT4OID:
			return (double) DatumGetInt32(d);
		case INT8OID:
			return (double) DatumGetInt64(d);
		case NUMERICOID:
			return DatumGetFloat8(DirectFunctionCall1(numeric_float8, d));
		default:
			elog(ERROR, "unsupported value type %u", type);
	}
	return 0;
}

static Scale
parse_scale(const char *s)
{
	if (pg_strcasecmp(s, "linear") == 0)
		return SCALE_LINEAR;
	if (pg_strcasecmp(s, "sqrt") == 0)
		return SCALE_SQRT;
	if (pg_strcasecmp(s, "log") == 0)
		return SCALE_LOG;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unknown scale \"%s\"", s),
			 errhint("Use linear, sqrt (counts) or log (amounts).")));
	return SCALE_LINEAR;
}

static Method
parse_method(const char *s)
{
	if (pg_strcasecmp(s, "trailing") == 0)
		return METHOD_TRAILING;
	if (pg_strcasecmp(s, "robust") == 0)
		return METHOD_ROBUST;
	if (pg_strcasecmp(s, "seasonal") == 0)
		return METHOD_SEASONAL;
	if (pg_strcasecmp(s, "count") == 0)
		return METHOD_COUNT;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unknown anomaly detection method \"%s\"", s),
			 errhint("Use trailing, robust, seasonal or count.  To read a table, pass it as regclass: detect_anomalies('my_table'::regclass, series_column, ts_column, value_column).")));
	return METHOD_SEASONAL;
}

static Direction
parse_direction(const char *s)
{
	if (pg_strcasecmp(s, "both") == 0)
		return DIR_BOTH;
	if (pg_strcasecmp(s, "spike") == 0)
		return DIR_SPIKE;
	if (pg_strcasecmp(s, "drop") == 0)
		return DIR_DROP;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unknown direction \"%s\"", s),
			 errhint("Use both, spike or drop.")));
	return DIR_BOTH;
}

/*
 * Read every (series, ts, value) row of the query into points, with the
 * exposure of a fourth column when there is one and it is wanted.
 */
static Point *
read_points(const char *query, bool want_exposure, int64 *npoints, MemoryContext cxt)
{
	Portal		portal;
	Point	   *points = NULL;
	int64		n = 0,
				capacity = 0;
	Oid			types[4];
	bool		has_exposure = false;
	FmgrInfo	series_out;
	bool		first = true;

	SPI_connect();
	portal = SPI_cursor_open_with_args(NULL, query, 0, NULL, NULL, NULL, true, 0);
	{
		TupleDesc	td = portal->tupDesc;

		if (td == NULL || td->natts < 3)
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("the query of detect_anomalies() must return three columns: series, timestamp, value"),
					 errdetail("It returns %d.", td ? td->natts : 0)));
		for (int c = 0; c < 3; c++)
			types[c] = TupleDescAttr(td, c)->atttypid;
		if (types[1] != TIMESTAMPTZOID && types[1] != TIMESTAMPOID && types[1] != DATEOID)
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("column \"%s\" (the timestamp) has type %s",
							NameStr(TupleDescAttr(td, 1)->attname), format_type_be(types[1])),
					 errhint("The second column must be timestamptz, timestamp or date.")));
		if (types[2] != FLOAT8OID && types[2] != FLOAT4OID && types[2] != NUMERICOID &&
			types[2] != INT2OID && types[2] != INT4OID && types[2] != INT8OID)
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("column \"%s\" (the value) has type %s",
							NameStr(TupleDescAttr(td, 2)->attname), format_type_be(types[2])),
					 errhint("The third column must be numeric, integer or floating point.")));
		if (want_exposure && td->natts >= 4)
		{
			types[3] = TupleDescAttr(td, 3)->atttypid;
			if (types[3] != FLOAT8OID && types[3] != FLOAT4OID && types[3] != NUMERICOID &&
				types[3] != INT2OID && types[3] != INT4OID && types[3] != INT8OID)
				ereport(ERROR,
						(errcode(ERRCODE_DATATYPE_MISMATCH),
						 errmsg("column \"%s\" (the exposure) has type %s",
								NameStr(TupleDescAttr(td, 3)->attname), format_type_be(types[3])),
						 errhint("The fourth column, when there is one, is the fraction of the period observed: a number from 0 to 1.")));
			has_exposure = true;
		}
		{
			Oid			outfn;
			bool		varlena;

			getTypeOutputInfo(types[0], &outfn, &varlena);
			fmgr_info_cxt(outfn, &series_out, cxt);
		}
	}
	for (;;)
	{
		SPI_cursor_fetch(portal, true, 10000);
		if (SPI_processed == 0)
			break;
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			HeapTuple	tup = SPI_tuptable->vals[i];
			TupleDesc	td = SPI_tuptable->tupdesc;
			bool		snull,
						tnull,
						vnull;
			Datum		s = SPI_getbinval(tup, td, 1, &snull);
			Datum		t = SPI_getbinval(tup, td, 2, &tnull);
			Datum		v = SPI_getbinval(tup, td, 3, &vnull);
			MemoryContext old;
			Point	   *pt;

			if (tnull)
				continue;		/* a point without a time is nowhere */
			if (types[1] == DATEOID ? DATE_NOT_FINITE(DatumGetDateADT(t))
				: TIMESTAMP_NOT_FINITE(DatumGetTimestamp(t)))
				continue;		/* nor is one at +/-infinity */
			old = MemoryContextSwitchTo(cxt);
			if (n == capacity)
			{
				capacity = capacity ? capacity * 2 : 1024;
				if ((Size) capacity * sizeof(Point) > MaxAllocHugeSize)
					ereport(ERROR,
							(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
							 errmsg("too many points for detect_anomalies()")));
				points = first ? palloc_extended(sizeof(Point) * capacity, MCXT_ALLOC_HUGE)
					: repalloc_huge(points, sizeof(Point) * capacity);
				first = false;
			}
			pt = &points[n];
			/* consecutive rows of a series share its name */
			if (snull)
				pt->series = NULL;
			else
			{
				char	   *name = OutputFunctionCall(&series_out, s);

				if (n > 0 && points[n - 1].series && strcmp(points[n - 1].series, name) == 0)
				{
					pfree(name);
					pt->series = points[n - 1].series;
				}
				else
					pt->series = name;
			}
			pt->ts = ca_datum_to_timestamptz(t, types[1]);
			pt->value_null = vnull;
			pt->value = vnull ? 0 : datum_to_float8(v, types[2]);
			pt->exposure = 1;
			if (has_exposure)
			{
				bool		enull;
				Datum		e = SPI_getbinval(tup, td, 4, &enull);

				if (!enull)
					pt->exposure = datum_to_float8(e, types[3]);
				if (!(pt->exposure >= 0 && pt->exposure <= 1))
					ereport(ERROR,
							(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							 errmsg("exposure %g of series %s at %s is not between 0 and 1",
									pt->exposure, pt->series ? pt->series : "NULL",
									timestamptz_to_str(pt->ts)),
							 errhint("The exposure is the fraction of the period observed: 1 for a whole day, 0.5 at midday, 0 for a day not to be scored (NULL means 1).")));
			}
			pt->seq = n;
			n++;
			MemoryContextSwitchTo(old);
		}
		SPI_freetuptable(SPI_tuptable);
		CHECK_FOR_INTERRUPTS();
	}
	SPI_cursor_close(portal);
	SPI_finish();
	*npoints = n;
	return points;
}

/* the count method's data are counts: whole numbers, not negative */
static void
check_counts(const Point *p, int64 n)
{
	for (int64 i = 0; i < n; i++)
		if (!p[i].value_null && (p[i].value < 0 || p[i].value != floor(p[i].value)))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("value %g of series %s at %s is not a count", p[i].value,
							p[i].series ? p[i].series : "NULL", timestamptz_to_str(p[i].ts)),
					 errdetail("The count method scores whole numbers >= 0 (orders, visits, failures)."),
					 errhint("Score amounts with method seasonal and scale log.")));
}

/*
 * detect_anomalies(query text, method, window_size, threshold, min_history,
 *					direction, min_relative_change, seasons, scale)
 * detect_anomalies(source regclass, series_column, ts_column, value_column,
 *					method, ..., scale[, exposure_column])
 *	 RETURNS TABLE (series text, ts timestamptz, value float8, expected
 *					float8, z float8, robust_z float8, direction text,
 *					is_anomaly boolean[, p_value float8])
 * v2 (0.2) adds p_value, the exposure (a query's fourth column, a table's
 * exposure_column) and the count method; 0.1's SQL keeps its own symbols.
 */
static Datum
detect_anomalies(FunctionCallInfo fcinfo, bool from_table, bool v2)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			a = from_table ? 4 : 1; /* first option argument */
	int			nargs = a + 8 + ((from_table && v2) ? 1 : 0);
	char	   *exposure_column = NULL;
	DetectOptions o;
	char	   *query;
	MemoryContext cxt;
	Point	   *points;
	int64		n;
	PointResult *res;

	if (PG_NARGS() != nargs)
		elog(ERROR, "detect_anomalies() called with %d arguments: the extension's SQL and library differ in version",
			 PG_NARGS());
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the source of detect_anomalies() must not be NULL")));
	for (int i = a; i < a + 8; i++)
		if (PG_ARGISNULL(i) && i != a + 2)
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("argument %d of detect_anomalies() must not be NULL", i + 1),
					 errhint("Only threshold may be NULL (it then comes from customer_analytics.zscore_threshold, or for the count method from customer_analytics.anomaly_false_alarms_per_year).")));
	o.method = parse_method(text_to_cstring(PG_GETARG_TEXT_PP(a)));
	o.window = PG_GETARG_INT32(a + 1);
	o.threshold_given = !PG_ARGISNULL(a + 2);
	o.threshold = o.threshold_given ? PG_GETARG_FLOAT8(a + 2) : zscore_threshold;
	o.false_alarms = false_alarms_per_year;
	o.same_day_fdr = same_day_fdr;
	o.min_history = PG_GETARG_INT32(a + 3);
	o.direction = parse_direction(text_to_cstring(PG_GETARG_TEXT_PP(a + 4)));
	o.min_relative_change = PG_GETARG_FLOAT8(a + 5);
	o.seasons = PG_GETARG_INT32(a + 6);
	o.scale = parse_scale(text_to_cstring(PG_GETARG_TEXT_PP(a + 7)));
	o.season_days = 7;
	if (o.method == METHOD_COUNT && !v2)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("the count method needs version 0.2 of the extension"),
				 errhint("ALTER EXTENSION customer_analytics UPDATE.")));
	if (from_table && v2 && !PG_ARGISNULL(a + 8))
		exposure_column = text_to_cstring(PG_GETARG_TEXT_PP(a + 8));
	if (o.window < 2 || o.window > 100000)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("window_size must be between 2 and 100000, not %d", o.window)));
	if (!(o.threshold >= 0) || isinf(o.threshold))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("threshold must be a finite number >= 0, not %g", o.threshold)));
	if (o.min_history < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("min_history must not be negative, not %d", o.min_history)));
	if (!(o.min_relative_change >= 0) || isinf(o.min_relative_change))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("min_relative_change must be a finite number >= 0, not %g", o.min_relative_change),
				 errhint("It is a fraction of the expected value: 0.2 ignores changes smaller than 20%%.")));
	if (o.seasons < 1 || o.seasons > 52)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("seasons must be between 1 and 52, not %d", o.seasons)));

	if (from_table)
	{
		Oid			relid = PG_GETARG_OID(0);
		char	   *cols[3];
		static const char *const roles[3] = {"series_column", "ts_column", "value_column"};
		char	   *relname = get_rel_name(relid);

		if (relname == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_TABLE),
					 errmsg("relation with OID %u does not exist", relid)));
		for (int c = 0; c < 3; c++)
		{
			if (PG_ARGISNULL(1 + c))
				ereport(ERROR,
						(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
						 errmsg("%s must not be NULL", roles[c])));
			cols[c] = text_to_cstring(PG_GETARG_TEXT_PP(1 + c));
			if (get_attnum(relid, cols[c]) == InvalidAttrNumber)
				ereport(ERROR,
						(errcode(ERRCODE_UNDEFINED_COLUMN),
						 errmsg("column \"%s\" (%s) does not exist in %s", cols[c], roles[c], relname)));
		}
		if (exposure_column && get_attnum(relid, exposure_column) == InvalidAttrNumber)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("column \"%s\" (exposure_column) does not exist in %s", exposure_column, relname)));
		query = psprintf("SELECT %s, %s, %s%s%s FROM %s", quote_identifier(cols[0]),
						 quote_identifier(cols[1]), quote_identifier(cols[2]),
						 exposure_column ? ", " : "",
						 exposure_column ? quote_identifier(exposure_column) : "",
						 ca_relation_name(relid));
	}
	else
		query = text_to_cstring(PG_GETARG_TEXT_PP(0));

	cxt = AllocSetContextCreate(CurrentMemoryContext, "detect_anomalies", ALLOCSET_DEFAULT_SIZES);
	points = read_points(query, v2 && (!from_table || exposure_column != NULL), &n, cxt);
	if (o.method == METHOD_COUNT)
		check_counts(points, n);
	InitMaterializedSRF(fcinfo, 0);
	if (n == 0)
	{
		MemoryContextDelete(cxt);
		return (Datum) 0;
	}
	qsort(points, n, sizeof(Point), compare_points);
	res = MemoryContextAllocHuge(cxt, sizeof(PointResult) * n);
	for (int64 start = 0; start < n;)
	{
		int64		end = start + 1;
		MemoryContext old;

		while (end < n && same_series(&points[start], &points[end]))
			end++;
		old = MemoryContextSwitchTo(cxt);
		if (o.method == METHOD_COUNT)
			score_series_count(points + start, end - start, &o, res + start);
		else
			score_series(points + start, end - start, &o, res + start);
		MemoryContextSwitchTo(old);
		start = end;
		CHECK_FOR_INTERRUPTS();
	}
	/* a threshold given is a rule per point, as for the other methods */
	if (o.method == METHOD_COUNT && o.same_day_fdr > 0 && !o.threshold_given)
	{
		MemoryContext old = MemoryContextSwitchTo(cxt);

		flag_same_day(points, n, res, o.same_day_fdr);
		MemoryContextSwitchTo(old);
	}
	for (int64 i = 0; i < n; i++)
	{
		Datum		values[9];
		bool		nulls[9] = {false};
		PointResult *r = &res[i];

		values[0] = points[i].series ? CStringGetTextDatum(points[i].series) : (Datum) 0;
		nulls[0] = points[i].series == NULL;
		values[1] = TimestampTzGetDatum(points[i].ts);
		values[2] = Float8GetDatum(points[i].value);
		nulls[2] = points[i].value_null;
		values[3] = Float8GetDatum(r->expected);
		nulls[3] = !r->has_expected;
		values[4] = Float8GetDatum(r->z);
		nulls[4] = !r->has_z;
		values[5] = Float8GetDatum(r->robust_z);
		nulls[5] = !r->has_robust_z;
		if (r->has_expected && !points[i].value_null && points[i].value != r->expected)
			values[6] = CStringGetTextDatum(points[i].value > r->expected ? "spike" : "drop");
		else
			nulls[6] = true;
		values[7] = BoolGetDatum(r->is_anomaly);
		values[8] = Float8GetDatum(r->p_value);
		nulls[8] = !r->has_p;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		if (!nulls[0])
			pfree(DatumGetPointer(values[0]));
	}
	MemoryContextDelete(cxt);
	return (Datum) 0;
}

Datum
ca_detect_anomalies_query(PG_FUNCTION_ARGS)
{
	return detect_anomalies(fcinfo, false, false);
}

Datum
ca_detect_anomalies_table(PG_FUNCTION_ARGS)
{
	return detect_anomalies(fcinfo, true, false);
}

Datum
ca_detect_anomalies_query_v2(PG_FUNCTION_ARGS)
{
	return detect_anomalies(fcinfo, false, true);
}

Datum
ca_detect_anomalies_table_v2(PG_FUNCTION_ARGS)
{
	return detect_anomalies(fcinfo, true, true);
}
