/*
 * clv.c
 *	  Customer lifetime value: the BG/NBD model of repeat purchases (Fader,
 *	  Hardie and Lee 2005, "Counting your customers the easy way") and the
 *	  Gamma-Gamma model of spend per purchase (Fader, Hardie and Lee 2005,
 *	  "RFM and CLV"; Fader and Hardie 2013 note), fitted by maximum
 *	  likelihood.
 *
 *	- bgnbd_fit(x, t_x, T): aggregate over one row per customer (x repeat
 *	  purchases, the last at t_x, observed for T, all in one time unit)
 *	  returning a bgnbd_model (r, alpha, a, b, log-likelihood, customers).
 *	- gamma_gamma_fit(x, m_x): aggregate over customers with x >= 1 repeat
 *	  purchases of mean value m_x, returning a gamma_gamma_model.
 *	- bgnbd_loglik, bgnbd_expected_purchases (unconditional and
 *	  conditional on a customer's history), bgnbd_p_alive,
 *	  gamma_gamma_expected_value: the model's formulas.
 *	- clv_summary(as_of): each customer's (x, t_x, T, m_x) from the order
 *	  lines, in one scan.
 *
 * Both fits minimise the negative log-likelihood with Nelder-Mead
 * (forecast.c) over the logarithms of the parameters, restarted from its
 * own end point until it stops improving.  Identical customers are
 * collapsed into one weighted term first, which on day-granular data
 * (everyone who bought once and has the same T) removes most of the work.
 */
#include "postgres.h"

#include <math.h>

#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "common/int.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "parser/parse_relation.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/datetime.h"
#include "utils/float.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/rel.h"
#include "utils/rls.h"
#include "utils/snapmgr.h"

#include "citus_guard.h"
#include "customer_analytics.h"
#include "numerics.h"
#include "utils.h"

PG_FUNCTION_INFO_V1(ca_bgnbd_sfunc);
PG_FUNCTION_INFO_V1(ca_bgnbd_final);
PG_FUNCTION_INFO_V1(ca_gg_sfunc);
PG_FUNCTION_INFO_V1(ca_gg_final);
PG_FUNCTION_INFO_V1(ca_bgnbd_loglik);
PG_FUNCTION_INFO_V1(ca_bgnbd_expected);
PG_FUNCTION_INFO_V1(ca_bgnbd_conditional);
PG_FUNCTION_INFO_V1(ca_bgnbd_p_alive);
PG_FUNCTION_INFO_V1(ca_gg_expected);
PG_FUNCTION_INFO_V1(ca_clv_summary);

#define LOG_PARAM_BOUND 20.0	/* fitted parameters within e^-20 .. e^20 */

/* customer_analytics.clv_fit_method */
typedef enum ClvFitMethod
{
	CLV_FIT_QUASI_NEWTON,		/* grouped customers, bounded quasi-Newton */
	CLV_FIT_NELDER_MEAD,		/* grouped customers, restarted Nelder-Mead
								 * (0.1) */
	CLV_FIT_NELDER_MEAD_UNGROUPED	/* every customer, restarted Nelder-Mead */
} ClvFitMethod;

static const struct config_enum_entry clv_fit_method_options[] = {
	{"quasi_newton", CLV_FIT_QUASI_NEWTON, false},
	{"nelder_mead", CLV_FIT_NELDER_MEAD, false},
	{"nelder_mead_ungrouped", CLV_FIT_NELDER_MEAD_UNGROUPED, false},
	{NULL, 0, false}
};

static int	clv_fit_method = CLV_FIT_QUASI_NEWTON;

void
ca_clv_init(void)
{
	DefineCustomEnumVariable(CA_GUC_PREFIX ".clv_fit_method",
							 "How bgnbd_fit and gamma_gamma_fit maximise the likelihood.",
							 "quasi_newton (the default) groups identical customers and uses analytic gradients; "
							 "nelder_mead is the derivative-free search of version 0.1, "
							 "nelder_mead_ungrouped the same over every customer (for comparisons).",
							 &clv_fit_method,
							 CLV_FIT_QUASI_NEWTON,
							 clv_fit_method_options,
							 PGC_USERSET,
							 0,
							 NULL, NULL, NULL);
}

/* one customer (BG/NBD: x, t_x, T; Gamma-Gamma: x, m_x, unused) */
typedef struct ClvRow
{
	double		v[3];
	double		weight;
} ClvRow;

typedef struct ClvState
{
	int64		nrows;
	int64		capacity;
	ClvRow	   *rows;
} ClvState;

typedef struct BgnbdParams
{
	double		r,
				alpha,
				a,
				b;
} BgnbdParams;

typedef struct GgParams
{
	double		p,
				q,
				gamma;
} GgParams;

/* ---------------------------------------------------------------------
 * Formulas
 * ---------------------------------------------------------------------
 */

static inline double
log_add_exp(double u, double v)
{
	double		mx = Max(u, v);

	return mx + log(exp(u - mx) + exp(v - mx));
}

/* log-likelihood of one customer, FHL 2005 equation (6) */
static double
bgnbd_ll(const BgnbdParams *m, double x, double tx, double T)
{
	double		a1 = lgamma(m->r + x) - lgamma(m->r) + m->r * log(m->alpha);
	double		a2 = lgamma(m->a + m->b) + lgamma(m->b + x) - lgamma(m->b) - lgamma(m->a + m->b + x);
	double		a3 = -(m->r + x) * log(m->alpha + T);

	if (x > 0)
	{
		double		a4 = log(m->a) - log(m->b + x - 1) - (m->r + x) * log(m->alpha + tx);

		return a1 + a2 + log_add_exp(a3, a4);
	}
	return a1 + a2 + a3;
}

/*
 * Gauss hypergeometric function 2F1(a, b; c; z) for 0 <= z < 1, by its
 * series (the models only need it there).
 */
static double
hyp2f1(double a, double b, double c, double z)
{
	double		term = 1,
				sum = 1;

	if (!(z >= 0 && z < 1))
		elog(ERROR, "hypergeometric series called outside [0, 1): %g", z);
	for (int k = 0; k < 1000000; k++)
	{
		term *= (a + k) * (b + k) / ((c + k) * (k + 1)) * z;
		sum += term;
		if (fabs(term) <= 1e-15 * fabs(sum))
			break;
		if ((k & 1023) == 1023)
			CHECK_FOR_INTERRUPTS();
	}
	return sum;
}

/* P(alive | x, t_x, T), FHL 2005 equation (11) */
static double
bgnbd_p_alive(const BgnbdParams *m, double x, double tx, double T)
{
	if (x <= 0)
		return 1.0;
	return 1.0 / (1.0 + m->a / (m->b + x - 1) *
				  exp((m->r + x) * (log(m->alpha + T) - log(m->alpha + tx))));
}

/* E[X(t)], purchases of a new customer in t, FHL 2005 equation (9) */
static double
bgnbd_expected(const BgnbdParams *m, double t)
{
	double		ab1 = m->a + m->b - 1;

	return ab1 / (m->a - 1) *
		(1 - pow(m->alpha / (m->alpha + t), m->r) *
		 hyp2f1(m->r, m->b, ab1, t / (m->alpha + t)));
}

/* E[Y(t) | x, t_x, T], FHL 2005 equation (10) */
static double
bgnbd_conditional(const BgnbdParams *m, double t, double x, double tx, double T)
{
	double		c = m->a + m->b + x - 1;
	double		num = c / (m->a - 1) *
	(1 - exp((m->r + x) * (log(m->alpha + T) - log(m->alpha + T + t))) *
	 hyp2f1(m->r + x, m->b + x, c, t / (m->alpha + T + t)));

	return num * bgnbd_p_alive(m, x, tx, T);
}

/* log-likelihood of one customer's mean spend, Fader and Hardie 2013 (3) */
static double
gg_ll(const GgParams *m, double x, double mx)
{
	double		px = m->p * x;

	return lgamma(px + m->q) - lgamma(px) - lgamma(m->q) + m->q * log(m->gamma) +
		(px - 1) * log(mx) + px * log(x) - (px + m->q) * log(m->gamma + x * mx);
}

/* E[M | x, m_x], the expected spend per purchase */
static double
gg_expected(const GgParams *m, double x, double mx)
{
	return m->p * (m->gamma + x * mx) / (m->p * x + m->q - 1);
}

/* ---------------------------------------------------------------------
 * Arguments
 * ---------------------------------------------------------------------
 */

static double
model_field(HeapTupleHeader t, const char *type, const char *name)
{
	bool		isnull;
	double		v = DatumGetFloat8(GetAttributeByName(t, name, &isnull));

	if (isnull || !(v > 0) || !isfinite(v))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s parameter %s must be a positive number", type, name),
				 errhint("Fit the model with the matching aggregate, or build it with ROW(...)::customer_analytics.%s.",
						 type)));
	return v;
}

static void
get_bgnbd(FunctionCallInfo fcinfo, int argno, BgnbdParams *m)
{
	HeapTupleHeader t = PG_GETARG_HEAPTUPLEHEADER(argno);

	m->r = model_field(t, "bgnbd_model", "r");
	m->alpha = model_field(t, "bgnbd_model", "alpha");
	m->a = model_field(t, "bgnbd_model", "a");
	m->b = model_field(t, "bgnbd_model", "b");
	/* a = 1 is a removable singularity of the expectations: step beside it */
	if (fabs(m->a - 1) < 1e-9)
		m->a = 1 + 1e-9;
}

static void
get_gg(FunctionCallInfo fcinfo, int argno, GgParams *m)
{
	HeapTupleHeader t = PG_GETARG_HEAPTUPLEHEADER(argno);

	m->p = model_field(t, "gamma_gamma_model", "p");
	m->q = model_field(t, "gamma_gamma_model", "q");
	m->gamma = model_field(t, "gamma_gamma_model", "gamma");
}

/* a customer's summary: x >= 0 repeat purchases, 0 <= t_x <= T */
static void
check_history(double x, double tx, double T)
{
	if (!(x >= 0) || !isfinite(x))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("repeat purchases x must be a non-negative number, not %g", x)));
	if (!(T >= 0) || !isfinite(T))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("observation period T must be a non-negative number, not %g", T)));
	if (x > 0 && (!(tx >= 0) || tx > T))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("time of last purchase t_x = %g is outside 0 .. T = %g", tx, T),
				 errdetail("t_x is the time from the first purchase to the last, T from the first purchase to the end of observation.")));
}

static void
check_horizon(double t)
{
	if (!(t >= 0) || !isfinite(t))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("time t must be a non-negative number, not %g", t)));
}

/* ---------------------------------------------------------------------
 * Aggregates
 * ---------------------------------------------------------------------
 */

static ClvState *
clv_state(FunctionCallInfo fcinfo, const char *name)
{
	MemoryContext aggcxt;
	ClvState   *s;

	aggcxt = ca_aggregate_context(fcinfo, name);
	if (!PG_ARGISNULL(0))
		return (ClvState *) PG_GETARG_POINTER(0);
	s = MemoryContextAllocZero(aggcxt, sizeof(ClvState));
	s->capacity = 1024;
	s->rows = MemoryContextAlloc(aggcxt, s->capacity * sizeof(ClvRow));
	return s;
}

static void
clv_add(ClvState *s, double v0, double v1, double v2)
{
	if (s->nrows == s->capacity)
	{
		if ((Size) s->capacity * 2 * sizeof(ClvRow) > MaxAllocSize)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("too many customers for one model fit")));
		s->capacity *= 2;
		s->rows = repalloc(s->rows, s->capacity * sizeof(ClvRow));
	}
	s->rows[s->nrows].v[0] = v0;
	s->rows[s->nrows].v[1] = v1;
	s->rows[s->nrows].v[2] = v2;
	s->rows[s->nrows].weight = 1;
	s->nrows++;
}

static int
row_cmp(const void *pa, const void *pb)
{
	const ClvRow *a = pa;
	const ClvRow *b = pb;

	for (int i = 0; i < 3; i++)
		if (a->v[i] != b->v[i])
			return a->v[i] < b->v[i] ? -1 : 1;
	return 0;
}

/* collapse identical customers into weighted rows; returns the count */
static int64
clv_collapse(ClvState *s)
{
	int64		k = 0;

	qsort(s->rows, s->nrows, sizeof(ClvRow), row_cmp);
	for (int64 i = 0; i < s->nrows; i++)
	{
		if (k > 0 && row_cmp(&s->rows[k - 1], &s->rows[i]) == 0)
			s->rows[k - 1].weight += s->rows[i].weight;
		else
			s->rows[k++] = s->rows[i];
	}
	return k;
}

typedef struct ClvProblem
{
	const ClvRow *rows;
	int64		nrows;
} ClvProblem;

static bool
log_params_ok(const double *x, int n)
{
	for (int i = 0; i < n; i++)
		if (!(fabs(x[i]) <= LOG_PARAM_BOUND))
			return false;
	return true;
}

/* the negative log-likelihoods, customer by customer, for Nelder-Mead */
static double
bgnbd_negll(void *arg, const double *x)
{
	ClvProblem *p = arg;
	BgnbdParams m;
	double		ll = 0;

	if (!log_params_ok(x, 4))
		return get_float8_nan();
	m.r = exp(x[0]);
	m.alpha = exp(x[1]);
	m.a = exp(x[2]);
	m.b = exp(x[3]);
	for (int64 i = 0; i < p->nrows; i++)
		ll += p->rows[i].weight * bgnbd_ll(&m, p->rows[i].v[0], p->rows[i].v[1], p->rows[i].v[2]);
	return -ll;
}

static double
gg_negll(void *arg, const double *x)
{
	ClvProblem *p = arg;
	GgParams	m;
	double		ll = 0;

	if (!log_params_ok(x, 3))
		return get_float8_nan();
	m.p = exp(x[0]);
	m.q = exp(x[1]);
	m.gamma = exp(x[2]);
	for (int64 i = 0; i < p->nrows; i++)
		ll += p->rows[i].weight * gg_ll(&m, p->rows[i].v[0], p->rows[i].v[1]);
	return -ll;
}

/* minimise from x, restarting until a restart no longer improves */
static double
fit_restarting(CaObjective f, void *arg, int n, double *x)
{
	double		best = ca_nelder_mead(f, arg, n, x, 1.0, 1e-12, 2000);

	for (int i = 0; i < 10; i++)
	{
		double		v = ca_nelder_mead(f, arg, n, x, 0.1, 1e-12, 2000);

		if (!(v < best - 1e-9 * fabs(best)))
		{
			best = Min(best, v);
			break;
		}
		best = v;
	}
	return best;
}

/*
 * The sufficient statistics of a fit: the collapsed rows (sorted, so
 * that rows with the same x are adjacent) and, per distinct x, its total
 * weight.  The terms of either log-likelihood that depend on x alone (the
 * lgamma ratios, the costly part) are then computed once per distinct x,
 * of which real data have a few hundred at most; the rest once per
 * distinct row.
 */
typedef struct ClvStats
{
	const ClvRow *rows;
	int64		nrows;
	int64		nx;				/* distinct x */
	double	   *xval;			/* [nx] */
	double	   *xweight;		/* [nx] total weight of rows with that x */
	int64	   *xend;			/* [nx] rows of x value k end before xend[k] */
	double		total;			/* total weight */
} ClvStats;

static void
clv_stats(ClvStats *st, const ClvRow *rows, int64 nrows)
{
	int64		k = -1;

	st->rows = rows;
	st->nrows = nrows;
	st->nx = 0;
	st->total = 0;
	for (int64 i = 0; i < nrows; i++)
		if (i == 0 || rows[i].v[0] != rows[i - 1].v[0])
			st->nx++;
	st->xval = palloc(Max(st->nx, 1) * sizeof(double));
	st->xweight = palloc0(Max(st->nx, 1) * sizeof(double));
	st->xend = palloc(Max(st->nx, 1) * sizeof(int64));
	for (int64 i = 0; i < nrows; i++)
	{
		if (i == 0 || rows[i].v[0] != rows[i - 1].v[0])
			st->xval[++k] = rows[i].v[0];
		st->xweight[k] += rows[i].weight;
		st->xend[k] = i + 1;
		st->total += rows[i].weight;
	}
}

/*
 * The BG/NBD negative log-likelihood (FHL 2005 equation 6 summed over
 * customers, as bgnbd_ll) and its gradient, in the log-parameters
 * (log r, log alpha, log a, log b).
 */
static double
bgnbd_negll_grad(void *arg, const double *lp, double *grad)
{
	ClvStats   *st = arg;
	double		r = exp(lp[0]),
				alpha = exp(lp[1]),
				a = exp(lp[2]),
				b = exp(lp[3]);
	double		lg_r = lgamma(r),
				lg_b = lgamma(b),
				lg_ab = lgamma(a + b),
				dg_r = ca_digamma(r),
				dg_b = ca_digamma(b),
				dg_ab = ca_digamma(a + b),
				log_a = log(a);
	double		ll = st->total * r * log(alpha);
	double		dr = st->total * log(alpha),
				dalpha = st->total * r / alpha,
				da = 0,
				db = 0;
	int64		i = 0;

	for (int64 k = 0; k < st->nx; k++)
	{
		double		x = st->xval[k],
					w = st->xweight[k];
		double		rx = r + x;
		double		log_bx1 = x > 0 ? log(b + x - 1) : 0;

		/* lgamma(r + x) - lgamma(r) + lnB(a, b + x) - lnB(a, b) */
		ll += w * (lgamma(rx) - lg_r + lg_ab + lgamma(b + x) - lg_b - lgamma(a + b + x));
		dr += w * (ca_digamma(rx) - dg_r);
		da += w * (dg_ab - ca_digamma(a + b + x));
		db += w * (dg_ab + ca_digamma(b + x) - dg_b - ca_digamma(a + b + x));

		for (; i < st->xend[k]; i++)
		{
			const ClvRow *row = &st->rows[i];
			double		wi = row->weight;
			double		log_aT = log(alpha + row->v[2]);
			double		a3 = -rx * log_aT;

			if (x > 0)
			{
				double		log_atx = log(alpha + row->v[1]);
				double		a4 = log_a - log_bx1 - rx * log_atx;
				double		mx = Max(a3, a4);
				double		e3 = exp(a3 - mx),
							e4 = exp(a4 - mx),
							w3 = e3 / (e3 + e4),
							w4 = e4 / (e3 + e4);

				ll += wi * (mx + log(e3 + e4));
				dr -= wi * (w3 * log_aT + w4 * log_atx);
				dalpha -= wi * rx * (w3 / (alpha + row->v[2]) + w4 / (alpha + row->v[1]));
				da += wi * w4 / a;
				db -= wi * w4 / (b + x - 1);
			}
			else
			{
				ll += wi * a3;
				dr -= wi * log_aT;
				dalpha -= wi * rx / (alpha + row->v[2]);
			}
		}
	}
	/* d/d log p = p d/dp */
	grad[0] = -dr * r;
	grad[1] = -dalpha * alpha;
	grad[2] = -da * a;
	grad[3] = -db * b;
	return -ll;
}

/*
 * The Gamma-Gamma negative log-likelihood (Fader and Hardie 2013
 * equation 3 summed over customers, as gg_ll) and its gradient in the
 * log-parameters (log p, log q, log gamma).
 */
static double
gg_negll_grad(void *arg, const double *lp, double *grad)
{
	ClvStats   *st = arg;
	double		p = exp(lp[0]),
				q = exp(lp[1]),
				g = exp(lp[2]);
	double		lg_q = lgamma(q),
				dg_q = ca_digamma(q),
				log_g = log(g);
	double		ll = 0,
				dp = 0,
				dq = 0,
				dg = 0;
	int64		i = 0;

	for (int64 k = 0; k < st->nx; k++)
	{
		double		x = st->xval[k],
					w = st->xweight[k];
		double		px = p * x,
					log_x = log(x);
		double		dg_pxq = ca_digamma(px + q);

		ll += w * (lgamma(px + q) - lgamma(px) - lg_q + q * log_g + px * log_x);
		dp += w * x * (dg_pxq - ca_digamma(px) + log_x);
		dq += w * (dg_pxq - dg_q + log_g);
		dg += w * q / g;

		for (; i < st->xend[k]; i++)
		{
			const ClvRow *row = &st->rows[i];
			double		wi = row->weight;
			double		mx = row->v[1];
			double		log_mx = log(mx),
						log_gxm = log(g + x * mx);

			ll += wi * ((px - 1) * log_mx - (px + q) * log_gxm);
			dp += wi * x * (log_mx - log_gxm);
			dq -= wi * log_gxm;
			dg -= wi * (px + q) / (g + x * mx);
		}
	}
	grad[0] = -dp * p;
	grad[1] = -dq * q;
	grad[2] = -dg * g;
	return -ll;
}

/*
 * Fit the log-parameters x (a starting point on entry) to the customers
 * of s by the method the setting asks for; returns the negative
 * log-likelihood at the result.
 */
static double
clv_minimize(const char *model, int n, double *x,
			 CaObjective f, CaObjectiveGrad fg, ClvState *s)
{
	double		lo[4],
				hi[4];
	ClvProblem	prob;
	ClvStats	st;
	CaMinResult res;
	int64		ncollapsed;

	if (clv_fit_method == CLV_FIT_NELDER_MEAD_UNGROUPED)
	{
		prob.rows = s->rows;
		prob.nrows = s->nrows;
		return fit_restarting(f, &prob, n, x);
	}
	ncollapsed = clv_collapse(s);
	if (clv_fit_method == CLV_FIT_NELDER_MEAD)
	{
		prob.rows = s->rows;
		prob.nrows = ncollapsed;
		return fit_restarting(f, &prob, n, x);
	}

	for (int i = 0; i < n; i++)
	{
		lo[i] = -LOG_PARAM_BOUND;
		hi[i] = LOG_PARAM_BOUND;
	}
	clv_stats(&st, s->rows, ncollapsed);
	ca_minimize_bounded(fg, &st, n, x, lo, hi, 1e-10, 1e-12, 500, &res);
	elog(DEBUG1, "%s fit over %lld distinct customers (%lld distinct x): %d iterations, %d evaluations, status %d",
		 model, (long long) ncollapsed, (long long) st.nx,
		 res.iterations, res.evaluations, (int) res.status);
	return res.value;
}

/* bgnbd_fit(x float8, t_x float8, T float8) transition: one customer */
Datum
ca_bgnbd_sfunc(PG_FUNCTION_ARGS)
{
	ClvState   *s = clv_state(fcinfo, "bgnbd_fit");
	double		x,
				tx,
				T;

	/* a customer without a complete summary is left out */
	if (PG_ARGISNULL(1) || PG_ARGISNULL(2) || PG_ARGISNULL(3))
		PG_RETURN_POINTER(s);
	x = PG_GETARG_FLOAT8(1);
	tx = PG_GETARG_FLOAT8(2);
	T = PG_GETARG_FLOAT8(3);
	check_history(x, tx, T);
	clv_add(s, x, x > 0 ? tx : 0, T);
	PG_RETURN_POINTER(s);
}

Datum
ca_bgnbd_final(PG_FUNCTION_ARGS)
{
	ClvState   *s;
	double		x[4];
	double		mean_x = 0,
				mean_T = 0,
				negll;
	TupleDesc	tupdesc;
	Datum		values[6];
	bool		nulls[6] = {0};
	int64		customers;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	s = (ClvState *) PG_GETARG_POINTER(0);
	if (s->nrows == 0)
		PG_RETURN_NULL();
	customers = s->nrows;
	for (int64 i = 0; i < s->nrows; i++)
	{
		mean_x += s->rows[i].v[0];
		mean_T += s->rows[i].v[2];
	}
	mean_x /= s->nrows;
	mean_T /= s->nrows;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "bgnbd_fit final function must return a composite type");
	tupdesc = BlessTupleDesc(tupdesc);
	values[5] = Int64GetDatum(customers);

	/*
	 * Without a repeat purchase the likelihood grows without bound as the
	 * purchase rate goes to 0 and says nothing about dropout: there is no
	 * model to fit, which the parameters say by being NULL.
	 */
	if (mean_x == 0 && clv_fit_method == CLV_FIT_QUASI_NEWTON)
	{
		for (int i = 0; i < 5; i++)
			nulls[i] = true;
		PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
	}

	/* start at r = 1 with the rate r / alpha the data show, a = b = 1 */
	x[0] = 0;
	x[1] = log(Max(mean_T, 1e-6) / (mean_x + 0.5));
	x[1] = Min(Max(x[1], -LOG_PARAM_BOUND + 1), LOG_PARAM_BOUND - 1);
	x[2] = 0;
	x[3] = 0;
	negll = clv_minimize("BG/NBD", 4, x, bgnbd_negll, bgnbd_negll_grad, s);

	for (int i = 0; i < 4; i++)
		values[i] = Float8GetDatum(exp(x[i]));
	values[4] = Float8GetDatum(-negll);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* gamma_gamma_fit(x float8, m_x float8) transition: one customer */
Datum
ca_gg_sfunc(PG_FUNCTION_ARGS)
{
	ClvState   *s = clv_state(fcinfo, "gamma_gamma_fit");
	double		x,
				mx;

	if (PG_ARGISNULL(1) || PG_ARGISNULL(2))
		PG_RETURN_POINTER(s);
	x = PG_GETARG_FLOAT8(1);
	mx = PG_GETARG_FLOAT8(2);
	if (!isfinite(x) || !isfinite(mx))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("gamma_gamma_fit arguments must be finite, not x = %g, m_x = %g", x, mx)));
	/* the model describes the spend of repeat purchases: others say nothing */
	if (x < 1 || mx <= 0)
		PG_RETURN_POINTER(s);
	clv_add(s, x, mx, 0);
	PG_RETURN_POINTER(s);
}

Datum
ca_gg_final(PG_FUNCTION_ARGS)
{
	ClvState   *s;
	double		x[3];
	double		mean_m = 0,
				negll;
	TupleDesc	tupdesc;
	Datum		values[5];
	bool		nulls[5] = {0};
	int64		customers;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	s = (ClvState *) PG_GETARG_POINTER(0);
	if (s->nrows == 0)
		PG_RETURN_NULL();
	customers = s->nrows;
	for (int64 i = 0; i < s->nrows; i++)
		mean_m += s->rows[i].v[1];
	mean_m /= s->nrows;

	/* p = 1, q = 2: E[M] = p gamma / (q - 1) = the mean spend */
	x[0] = 0;
	x[1] = log(2.0);
	x[2] = Min(Max(log(mean_m), -LOG_PARAM_BOUND + 1), LOG_PARAM_BOUND - 1);
	negll = clv_minimize("Gamma-Gamma", 3, x, gg_negll, gg_negll_grad, s);

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "gamma_gamma_fit final function must return a composite type");
	tupdesc = BlessTupleDesc(tupdesc);
	for (int i = 0; i < 3; i++)
		values[i] = Float8GetDatum(exp(x[i]));
	values[3] = Float8GetDatum(-negll);
	values[4] = Int64GetDatum(customers);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* ---------------------------------------------------------------------
 * Scalar functions
 * ---------------------------------------------------------------------
 */

/* bgnbd_loglik(model, x, t_x, T) */
Datum
ca_bgnbd_loglik(PG_FUNCTION_ARGS)
{
	BgnbdParams m;
	double		x = PG_GETARG_FLOAT8(1),
				tx = PG_GETARG_FLOAT8(2),
				T = PG_GETARG_FLOAT8(3);

	get_bgnbd(fcinfo, 0, &m);
	check_history(x, tx, T);
	PG_RETURN_FLOAT8(bgnbd_ll(&m, x, tx, T));
}

/* bgnbd_expected_purchases(model, t) */
Datum
ca_bgnbd_expected(PG_FUNCTION_ARGS)
{
	BgnbdParams m;
	double		t = PG_GETARG_FLOAT8(1);

	get_bgnbd(fcinfo, 0, &m);
	check_horizon(t);
	PG_RETURN_FLOAT8(bgnbd_expected(&m, t));
}

/* bgnbd_expected_purchases(model, t, x, t_x, T) */
Datum
ca_bgnbd_conditional(PG_FUNCTION_ARGS)
{
	BgnbdParams m;
	double		t = PG_GETARG_FLOAT8(1),
				x = PG_GETARG_FLOAT8(2),
				tx = PG_GETARG_FLOAT8(3),
				T = PG_GETARG_FLOAT8(4);

	get_bgnbd(fcinfo, 0, &m);
	check_horizon(t);
	check_history(x, tx, T);
	PG_RETURN_FLOAT8(bgnbd_conditional(&m, t, x, tx, T));
}

/* bgnbd_p_alive(model, x, t_x, T) */
Datum
ca_bgnbd_p_alive(PG_FUNCTION_ARGS)
{
	BgnbdParams m;
	double		x = PG_GETARG_FLOAT8(1),
				tx = PG_GETARG_FLOAT8(2),
				T = PG_GETARG_FLOAT8(3);

	get_bgnbd(fcinfo, 0, &m);
	check_history(x, tx, T);
	PG_RETURN_FLOAT8(bgnbd_p_alive(&m, x, tx, T));
}

/* gamma_gamma_expected_value(model, x, m_x) */
Datum
ca_gg_expected(PG_FUNCTION_ARGS)
{
	GgParams	m;
	double		x = PG_GETARG_FLOAT8(1),
				mx = PG_GETARG_FLOAT8(2);

	get_gg(fcinfo, 0, &m);
	if (!(m.q > 1))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("gamma_gamma_model q must be greater than 1 for a finite expected spend, not %g", m.q)));
	if (!(x >= 0) || !isfinite(x))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("repeat purchases x must be a non-negative number, not %g", x)));
	/* without repeat purchases, the population mean */
	if (x == 0)
		PG_RETURN_FLOAT8(m.p * m.gamma / (m.q - 1));
	/* repeat purchases all returned (clv_summary's m_x): no spend to scale */
	if (PG_ARGISNULL(2))
		PG_RETURN_NULL();
	if (!(mx > 0) || !isfinite(mx))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("mean spend m_x must be a positive number, not %g", mx)));
	PG_RETURN_FLOAT8(gg_expected(&m, x, mx));
}

/* ---------------------------------------------------------------------
 * clv_summary(as_of): each customer's purchase history from the facts
 * ---------------------------------------------------------------------
 *
 * The summary is what a clv_model refresh spends its time on: in SQL it
 * grouped every line by (customer_id, day), then numbered purchases and
 * grouped twice more, sorting text under the database collation each time
 * (8 s for 1M lines, against 1 s for the fit).  Here the lines are read
 * once, reduced to (customer, day, amount, purchase) and sorted as integers;
 * one pass over the sorted lines gives every customer's row.  Amounts are
 * summed exactly in integer units, and the spend per repeat purchase is the
 * same numeric division the SQL did.
 */

/* a version of a customer (dim_customer row): its customer_id's index */
typedef struct ClvVersion
{
	uint64		key;			/* customer_key */
	uint32		status;			/* simplehash bookkeeping */
	uint32		customer;		/* index into ClvScan.ids */
} ClvVersion;

static inline uint32
clv_mix64(uint64 k)
{
	k = (k ^ (k >> 30)) * UINT64CONST(0xBF58476D1CE4E5B9);
	k = (k ^ (k >> 27)) * UINT64CONST(0x94D049BB133111EB);
	return (uint32) (k ^ (k >> 31));
}

#define SH_PREFIX clvver
#define SH_ELEMENT_TYPE ClvVersion
#define SH_KEY_TYPE uint64
#define SH_KEY key
#define SH_HASH_KEY(tb, key) clv_mix64(key)
#define SH_EQUAL(tb, a, b) ((a) == (b))
#define SH_SCOPE static inline
#define SH_DEFINE
#define SH_DECLARE
#include "lib/simplehash.h"

typedef struct ClvLine
{
	uint32		customer;
	int32		date_key;		/* YYYYMMDD: sorts as the day does */
	int64		units;			/* revenue in units of 10^-units_scale */
	bool		purchase;		/* quantity > 0 (a credit line is not) */
} ClvLine;

typedef struct ClvScan
{
	clvver_hash *versions;
	char	  **ids;			/* customer_id, in byte order */
	uint32		nids;
	ClvLine    *lines;
	int64		nlines;
	int64		cap;
	int			units_scale;
} ClvScan;

static void
clv_add_line(ClvScan *sc, int64 customer_key, int32 date_key, Datum revenue, bool revenue_null,
			 bool purchase)
{
	ClvVersion *v = clvver_lookup(sc->versions, (uint64) customer_key);
	ClvLine    *line;

	if (v == NULL)
		return;					/* no such customer: the SQL's inner join */
	if (sc->nlines == sc->cap)
	{
		sc->cap *= 2;
		sc->lines = repalloc_huge(sc->lines, sizeof(ClvLine) * sc->cap);
	}
	line = &sc->lines[sc->nlines++];
	line->customer = v->customer;
	line->date_key = date_key;
	line->units = revenue_null ? 0 : ca_numeric_money_units(revenue, &sc->units_scale);
	line->purchase = purchase;
}

static int
clv_line_cmp(const void *a, const void *b)
{
	const ClvLine *x = a,
			   *y = b;

	if (x->customer != y->customer)
		return x->customer < y->customer ? -1 : 1;
	if (x->date_key != y->date_key)
		return x->date_key < y->date_key ? -1 : 1;
	return 0;
}

/*
 * The lines by customer, then day.  Customers are numbered densely, so a
 * counting sort places every line in two passes; a qsort of a million lines
 * by both keys took a third of the summary's time.  Each customer's lines,
 * usually few and already in time order (the heap is filled in load order),
 * are then sorted by day.
 */
static void
clv_sort_lines(ClvScan *sc, MemoryContext cxt)
{
	int64	   *start = MemoryContextAllocHuge(cxt, sizeof(int64) * ((Size) sc->nids + 1));
	ClvLine    *sorted = MemoryContextAllocHuge(cxt, sizeof(ClvLine) * Max(sc->nlines, 1));

	memset(start, 0, sizeof(int64) * ((Size) sc->nids + 1));
	for (int64 i = 0; i < sc->nlines; i++)
		start[sc->lines[i].customer + 1]++;
	for (uint32 c = 0; c < sc->nids; c++)
		start[c + 1] += start[c];
	for (int64 i = 0; i < sc->nlines; i++)
		sorted[start[sc->lines[i].customer]++] = sc->lines[i];
	/* start[c] is now the end of customer c's lines */
	for (uint32 c = 0; c < sc->nids; c++)
	{
		int64		begin = c == 0 ? 0 : start[c - 1];

		if (start[c] - begin > 1)
			qsort(sorted + begin, start[c] - begin, sizeof(ClvLine), clv_line_cmp);
	}
	pfree(sc->lines);
	pfree(start);
	sc->lines = sorted;
}

/* dim_customer's versions, each to its customer_id; the as_of day */
static DateADT
clv_load_customers(ClvScan *sc, TimestampTz as_of, MemoryContext cxt)
{
	Oid			types[1] = {TIMESTAMPTZOID};
	Datum		values[1] = {TimestampTzGetDatum(as_of)};
	MemoryContext old;
	uint32		nids = 0;
	DateADT		as_of_day;
	bool		isnull;

	SPI_connect();
	SPI_execute_with_args("SELECT ($1 AT TIME ZONE customer_analytics.business_timezone())::date",
						  1, types, values, NULL, true, 1);
	as_of_day = DatumGetDateADT(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_execute("SELECT customer_key, customer_id FROM customer_analytics.dim_customer "
				"WHERE customer_key OPERATOR(pg_catalog.<>) -1 ORDER BY customer_id COLLATE \"C\"", true, 0);
	old = MemoryContextSwitchTo(cxt);
	sc->versions = clvver_create(cxt, Max(SPI_processed, 16), NULL);
	sc->ids = palloc(sizeof(char *) * Max(SPI_processed, 1));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		int64		key = DatumGetInt64(SPI_getbinval(tup, SPI_tuptable->tupdesc, 1, &isnull));
		char	   *id = SPI_getvalue(tup, SPI_tuptable->tupdesc, 2);
		ClvVersion *v;
		bool		found;

		/* the rows come grouped by customer_id */
		if (nids == 0 || strcmp(sc->ids[nids - 1], id) != 0)
			sc->ids[nids++] = pstrdup(id);
		v = clvver_insert(sc->versions, (uint64) key, &found);
		v->customer = nids - 1;
	}
	sc->nids = nids;
	MemoryContextSwitchTo(old);
	SPI_finish();
	return as_of_day;
}

/* completed lines of known customers before as_of, read from the heap */
static void
clv_scan_heap(ClvScan *sc, Relation rel, TimestampTz as_of)
{
	AttrNumber	key_att = attnameAttNum(rel, "customer_key", false),
				date_att = attnameAttNum(rel, "date_key", false),
				ts_att = attnameAttNum(rel, "order_ts", false),
				qty_att = attnameAttNum(rel, "quantity", false),
				rev_att = attnameAttNum(rel, "revenue", false),
				status_att = attnameAttNum(rel, "status", false);
	AttrNumber	natts = Max(Max(Max(key_att, date_att), Max(ts_att, qty_att)), Max(rev_att, status_att));
	TableScanDesc scan = table_beginscan(rel, GetActiveSnapshot(), 0, NULL);
	TupleTableSlot *slot = table_slot_create(rel, NULL);
	MemoryContext rowcxt = AllocSetContextCreate(CurrentMemoryContext, "clv_summary row", ALLOCSET_SMALL_SIZES);

	while (table_scan_getnextslot(scan, ForwardScanDirection, slot))
	{
		bool		isnull,
					rnull;
		Datum		status,
					revenue;
		text	   *st;
		int64		key;
		TimestampTz ts;
		MemoryContext old;

		CHECK_FOR_INTERRUPTS();
		slot_getsomeattrs(slot, natts);
		key = DatumGetInt64(slot_getattr(slot, key_att, &isnull));
		if (isnull || key == -1)
			continue;
		ts = DatumGetTimestampTz(slot_getattr(slot, ts_att, &isnull));
		if (isnull || ts >= as_of)
			continue;
		status = slot_getattr(slot, status_att, &isnull);
		if (isnull)
			continue;
		st = DatumGetTextPP(status);
		if (VARSIZE_ANY_EXHDR(st) != 9 || memcmp(VARDATA_ANY(st), "completed", 9) != 0)
			continue;
		revenue = slot_getattr(slot, rev_att, &rnull);
		old = MemoryContextSwitchTo(rowcxt);
		clv_add_line(sc, key, DatumGetInt32(slot_getattr(slot, date_att, &isnull)), revenue, rnull,
					 DatumGetInt32(slot_getattr(slot, qty_att, &isnull)) > 0);
		MemoryContextSwitchTo(old);
		MemoryContextReset(rowcxt);
	}
	ExecDropSingleTupleTableSlot(slot);
	table_endscan(scan);
	MemoryContextDelete(rowcxt);
}

/*
 * The same lines through SQL: for a table with row-level security (its
 * policies apply) or one managed by Citus (its rows are in shards).  What
 * the summary takes of a customer version's day is its net revenue and
 * whether it has a line other than a credit note, so the query sums them
 * per version and day.  Grouped by customer_ref as well, which Citus
 * distributes the facts by (a version's lines all carry its customer's):
 * each worker then sums its customers' days whole, with no combine on the
 * coordinator, and sends a row per version and day instead of one per
 * line.
 */
static void
clv_scan_query_row(HeapTuple tup, TupleDesc td, void *arg)
{
	bool		isnull,
				rnull;
	int64		key = DatumGetInt64(SPI_getbinval(tup, td, 1, &isnull));
	int32		date_key = DatumGetInt32(SPI_getbinval(tup, td, 2, &isnull));
	Datum		revenue = SPI_getbinval(tup, td, 3, &rnull);
	bool		purchase = DatumGetBool(SPI_getbinval(tup, td, 4, &isnull));

	clv_add_line(arg, key, date_key, revenue, rnull, purchase);
}

static void
clv_scan_query(ClvScan *sc, TimestampTz as_of)
{
	Oid			types[1] = {TIMESTAMPTZOID};
	Datum		values[1] = {TimestampTzGetDatum(as_of)};

	ca_spi_for_each_row("SELECT customer_key, date_key, pg_catalog.sum(revenue), "
						"pg_catalog.bool_or(quantity OPERATOR(pg_catalog.>) 0) "
						"FROM customer_analytics.fact_order_line "
						"WHERE status OPERATOR(pg_catalog.=) 'completed' "
						"AND customer_key OPERATOR(pg_catalog.<>) -1 "
						"AND order_ts OPERATOR(pg_catalog.<) $1 "
						"GROUP BY customer_ref, customer_key, date_key",
						1, types, values, clv_scan_query_row, sc);
}

static inline DateADT
clv_day(int32 date_key)
{
	return date2j(date_key / 10000, date_key / 100 % 100, date_key % 100) - POSTGRES_EPOCH_JDATE;
}

/*
 * units back to a numeric of the revenue column's scale (what the SQL's
 * sum() of that column shows), built at that scale when the units divide
 */
static Datum
clv_units_numeric(int64 units, int units_scale, int column_scale)
{
	if (column_scale >= 0 && column_scale < units_scale)
	{
		int64		divisor = 1;

		for (int i = column_scale; i < units_scale; i++)
			divisor *= 10;
		if (units % divisor == 0)
			return NumericGetDatum(int64_div_fast_to_numeric(units / divisor, column_scale));
		return DirectFunctionCall2(numeric_round, NumericGetDatum(int64_div_fast_to_numeric(units, units_scale)),
								   Int32GetDatum(column_scale));
	}
	return NumericGetDatum(int64_div_fast_to_numeric(units, units_scale));
}

static void
clv_add_units(int64 *sum, int64 units)
{
	if (pg_add_s64_overflow(*sum, units, sum))
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("a customer's revenue is too large to sum"),
				 errdetail("Revenue is summed exactly, below 922,337,203,685,477 in units of 0.0001.")));
}

/*
 * clv_summary(as_of) RETURNS TABLE (customer_id text, first_purchase date,
 *	 x float8, t_x float8, "T" float8, m_x float8, purchase_days bigint,
 *	 revenue numeric)
 *
 * A purchase is a day with completed lines other than credit notes; a day
 * of credit notes alone nets against the purchase day before it (the first
 * one when it comes earlier).  So the repeat purchases' revenue is that of
 * every day from the second purchase day on, and the first purchase's is
 * everything before.
 */
Datum
ca_clv_summary(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	TimestampTz as_of = PG_GETARG_TIMESTAMPTZ(0);
	Oid			nsp = get_namespace_oid("customer_analytics", false);
	Oid			relid = get_relname_relid("fact_order_line", nsp);
	MemoryContext cxt = AllocSetContextCreate(CurrentMemoryContext, "clv_summary", ALLOCSET_DEFAULT_SIZES);
	MemoryContext old;
	ClvScan		sc;
	Relation	rel;
	DateADT		as_of_day;
	int			column_scale = -1;
	int32		typmod;

	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("table customer_analytics.fact_order_line does not exist")));
	memset(&sc, 0, sizeof(sc));
	sc.units_scale = 4;
	as_of_day = clv_load_customers(&sc, as_of, cxt);
	old = MemoryContextSwitchTo(cxt);
	sc.cap = 1024;
	sc.lines = palloc(sizeof(ClvLine) * sc.cap);
	MemoryContextSwitchTo(old);

	rel = table_open(relid, AccessShareLock);
	if (pg_class_aclcheck(relid, GetUserId(), ACL_SELECT) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for table fact_order_line")));
	typmod = TupleDescAttr(RelationGetDescr(rel), attnameAttNum(rel, "revenue", false) - 1)->atttypmod;
	if (typmod >= (int32) VARHDRSZ)
		column_scale = (typmod - VARHDRSZ) & 0x7ff;
	if (check_enable_rls(relid, InvalidOid, false) == RLS_ENABLED || ca_citus_kind(relid) != CA_CITUS_NONE)
	{
		table_close(rel, AccessShareLock);
		clv_scan_query(&sc, as_of);
	}
	else
	{
		old = MemoryContextSwitchTo(cxt);
		clv_scan_heap(&sc, rel, as_of);
		MemoryContextSwitchTo(old);
		table_close(rel, AccessShareLock);
	}
	clv_sort_lines(&sc, cxt);

	InitMaterializedSRF(fcinfo, 0);
	for (int64 i = 0; i < sc.nlines;)
	{
		uint32		customer = sc.lines[i].customer;
		int64		purchases = 0,
					revenue = 0,
					repeat_revenue = 0;
		int32		first_key = 0,
					last_key = 0;

		CHECK_FOR_INTERRUPTS();
		while (i < sc.nlines && sc.lines[i].customer == customer)
		{
			int32		day = sc.lines[i].date_key;
			int64		day_units = 0;
			bool		purchase = false;

			for (; i < sc.nlines && sc.lines[i].customer == customer && sc.lines[i].date_key == day; i++)
			{
				clv_add_units(&day_units, sc.lines[i].units);
				purchase |= sc.lines[i].purchase;
			}
			if (purchase)
			{
				if (purchases == 0)
					first_key = day;
				last_key = day;
				purchases++;
			}
			clv_add_units(&revenue, day_units);
			if (purchases >= 2)
				clv_add_units(&repeat_revenue, day_units);
		}
		if (purchases > 0)
		{
			Datum		values[8];
			bool		nulls[8] = {false};
			DateADT		first = clv_day(first_key);

			values[0] = CStringGetTextDatum(sc.ids[customer]);
			values[1] = DateADTGetDatum(first);
			values[2] = Float8GetDatum((double) (purchases - 1));
			values[3] = Float8GetDatum((double) (clv_day(last_key) - first));
			values[4] = Float8GetDatum((double) Max(as_of_day - first, 0));

			/*
			 * The SQL's avg(), numeric sum / count, then float8 (NULL unless
			 * positive): the same division, so the same double.
			 */
			nulls[5] = !(purchases > 1 && repeat_revenue > 0);
			if (!nulls[5])
				values[5] = DirectFunctionCall1(numeric_float8,
												DirectFunctionCall2(numeric_div,
																	clv_units_numeric(repeat_revenue, sc.units_scale, column_scale),
																	NumericGetDatum(int64_to_numeric(purchases - 1))));
			values[6] = Int64GetDatum(purchases);
			values[7] = clv_units_numeric(revenue, sc.units_scale, column_scale);
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
	}
	MemoryContextDelete(cxt);
	return (Datum) 0;
}
