/*
 * forecast.c
 *	  Holt-Winters forecasting of daily series: additive level, damped
 *	  additive trend and seasonality (period 7 by default, the week) added
 *	  to the level or multiplying it, fitted in one aggregate, forecast
 *	  with prediction intervals by a set-returning function.
 *
 *	- holt_winters(day date, value float8 [, period int [, alpha, beta,
 *	  gamma float8 [, phi float8]]]): collects the rows (in any order),
 *	  sums the values of each day and counts a day without rows as 0,
 *	  then runs the Holt-Winters recursions over the days in order.  Parameters given as
 *	  NULL (or not given) are fitted by a bounded Nelder-Mead search
 *	  minimising the sum of squared one-step errors: alpha, beta, gamma in
 *	  [0, 1] and the trend's damping factor phi in [0.8, 1] (Gardner and
 *	  McKenzie; phi = 1 is the classic model).  Damping matters on real
 *	  data: on the UCI Online Retail year the undamped trend, extrapolated
 *	  over 28 days, did worse than the seasonal-naive forecast.
 *	  Both seasonalities are fitted when the series is positive on every
 *	  open day, and the one with the smaller error kept: UCI Online Retail
 *	  gets factors (its Sundays trade at half a weekday, and the weekly
 *	  swing grew with the shop over the year;
 *	  bench/results/forecast_quality.md).
 *	  The final seasonal terms are shrunk towards each other by empirical
 *	  Bayes, each by how much of its distance from the others its own
 *	  noise could explain (hw_shrink_season).
 *	  The result is an hw_model: the parameters, the final level, trend
 *	  and seasonal terms, the error, the dates covered and which
 *	  seasonality.
 *	- forecast(model, horizon [, level]): the next horizon days, each with
 *	  its point forecast and prediction interval.
 *
 * The parameters are fitted by Nelder-Mead (numerics.c).
 *
 * Initialisation (the first period of days is used up by it): the level
 * is the mean of the first period, the trend the difference between the
 * means of the first two periods divided by the period, the seasonal
 * terms the mean deviations (or ratios) of the first two periods' days
 * from that line.  The one-step
 * errors, their sum of squares (sse) and their standard deviation are
 * those of the days after the first period.
 *
 * Forecast h days ahead: level + (phi + ... + phi^h) trend + seasonal,
 * or (level + (phi + ... + phi^h) trend) x seasonal factor.
 * Intervals: the variance of the h-step error of the additive model in
 * its error-correction form (ETS(A,Ad,A), Hyndman et al. 2008, ch. 6),
 * sigma^2 (1 + sum_{j<h} c_j^2) with c_j = alpha + alpha beta phi_j +
 * (1 - alpha) gamma [j mod period = 0], phi_j = phi + ... + phi^j, with
 * sigma the in-sample residual standard deviation and normal errors.  For
 * factors (ETS(A,Ad,M)) the level part of c_j is scaled by the factor of
 * day h over that of day h - j, the factors taken as known.  It ignores
 * the uncertainty of the fitted parameters, so the intervals are somewhat
 * too narrow.
 */
#include "postgres.h"

#include <float.h>
#include <math.h>

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "executor/executor.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/float.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/tuplestore.h"
#include "utils/typcache.h"

#include "numerics.h"
#include "utils.h"

PG_FUNCTION_INFO_V1(ca_hw_sfunc);
PG_FUNCTION_INFO_V1(ca_hw_final);
PG_FUNCTION_INFO_V1(ca_hw_forecast);
PG_FUNCTION_INFO_V1(ca_normal_quantile);

#define HW_MAX_PERIOD 366
#define HW_MAX_DAYS 100000		/* span of a series: about 270 years */
#define HW_MAX_HORIZON 36600
#define HW_NPARAMS 4
#define HW_PARAM_MIN 0.0001		/* fitted smoothing parameters stay inside */
#define HW_PARAM_MAX 0.9999		/* [min, max] */
#define HW_PHI_MIN 0.8			/* and the damping factor inside [min, 1] */
#define HW_PHI_MAX 1.0
#define HW_MODEL_NATTS 14		/* attributes of hw_model */

/* one row seen by the aggregate */
typedef struct HwPoint
{
	int32		day;			/* DateADT */
	float8		value;
} HwPoint;

typedef struct HwState
{
	int			npoints;
	int			capacity;
	HwPoint    *points;
	int			period;
	/* given parameters alpha, beta, gamma, phi; NaN = to be fitted */
	float8		params[HW_NPARAMS];
} HwState;

/* ---------------------------------------------------------------------
 * Holt-Winters recursions
 * ---------------------------------------------------------------------
 */

typedef struct HwFit
{
	double		level;
	double		trend;
	double		sse;
	int			nerrors;		/* one-step errors in sse (open days) */
	double	   *season;			/* period terms, indexed by day mod period */

	/*
	 * Filled by hw_filter from arrays of period zeros the caller gives: per
	 * seasonal term, the count, sum and sum of squares of its one-step
	 * residuals on the term's own scale (money, or a ratio to the level).
	 */
	int		   *rcount;
	double	   *rsum;
	double	   *rsumsq;
} HwFit;

/*
 * Run the Holt-Winters filter over y[0..n-1] (n >= 2 periods) with
 * parameters a, b, g; returns the sum of squared one-step errors of days
 * period .. n-1 and, if fit is given, the final state.  The seasonal terms
 * are added to the level, or with mult multiply it (factors): then the
 * weekly swing grows with the level, as a shop's does when it grows.  A
 * multiplicative model needs a positive level and factors throughout: NaN
 * (an infeasible point for the search) when they are not.
 *
 * A NaN is a closed day (no observation): it is in neither the initial
 * means nor the errors, and the state runs over it unchanged, as if the
 * day had come exactly as forecast.  Otherwise a shop's closed days would
 * teach the model a collapse every week and every holiday.  Each of the
 * first two periods must hold an open day (ca_hw_final checks).
 *
 * The initial seasonal term of a day of the period is its mean deviation
 * from the line through the first two periods' means, over both periods:
 * one week alone is a noisy profile that a small gamma then keeps for
 * months.
 */
static double
hw_filter(const double *y, int n, int m, double a, double b, double g,
		  double phi, bool mult, double *season, HwFit *fit)
{
	double		mean1 = 0,
				mean2 = 0,
				level,
				trend,
				sse = 0;
	int			n1 = 0,
				n2 = 0,
				nerrors = 0;

	for (int i = 0; i < m; i++)
	{
		if (!isnan(y[i]))
		{
			mean1 += y[i];
			n1++;
		}
		if (!isnan(y[m + i]))
		{
			mean2 += y[m + i];
			n2++;
		}
	}
	mean1 /= Max(n1, 1);
	mean2 /= Max(n2, 1);
	trend = (mean2 - mean1) / m;
	/* mean1 is the level at the middle of the first period */
	for (int i = 0; i < m; i++)
	{
		double		dev = 0;
		int			ndev = 0;

		for (int t = i; t < 2 * m; t += m)
		{
			double		line = mean1 + (t - (m - 1) / 2.0) * trend;

			if (isnan(y[t]))
				continue;
			if (mult && !(line > 0))
				return get_float8_nan();
			dev += mult ? y[t] / line : y[t] - line;
			ndev++;
		}
		season[i] = ndev > 0 ? dev / ndev : (mult ? 1 : 0);
	}
	level = mean1 + trend * (m - 1) / 2.0;

	for (int t = m; t < n; t++)
	{
		int			k = t % m;
		double		e;
		double		new_level;

		if (isnan(y[t]))
		{
			level += phi * trend;
			trend *= phi;
			continue;
		}
		if (mult)
		{
			if (!(season[k] > 0))
				return get_float8_nan();
			e = y[t] - (level + phi * trend) * season[k];
			if (fit)
			{
				double		r = e / (level + phi * trend);

				fit->rcount[k]++;
				fit->rsum[k] += r;
				fit->rsumsq[k] += r * r;
			}
			new_level = a * (y[t] / season[k]) + (1 - a) * (level + phi * trend);
			if (!(new_level > 0))
				return get_float8_nan();
			trend = b * (new_level - level) + (1 - b) * phi * trend;
			season[k] = g * (y[t] / new_level) + (1 - g) * season[k];
		}
		else
		{
			e = y[t] - (level + phi * trend + season[k]);
			if (fit)
			{
				fit->rcount[k]++;
				fit->rsum[k] += e;
				fit->rsumsq[k] += e * e;
			}
			new_level = a * (y[t] - season[k]) + (1 - a) * (level + phi * trend);
			trend = b * (new_level - level) + (1 - b) * phi * trend;
			season[k] = g * (y[t] - new_level) + (1 - g) * season[k];
		}
		sse += e * e;
		nerrors++;
		level = new_level;
	}
	if (fit)
	{
		fit->level = level;
		fit->trend = trend;
		fit->sse = sse;
		fit->nerrors = nerrors;
		fit->season = season;
	}
	return sse;
}

typedef struct HwProblem
{
	const double *y;
	int			n;
	int			period;
	bool		mult;			/* multiplicative seasonality */
	double		params[HW_NPARAMS]; /* NaN = free */
	double	   *season;			/* scratch */
} HwProblem;

/* bounds of parameter i when fitted */
static inline double
param_lo(int i)
{
	return i == 3 ? HW_PHI_MIN : HW_PARAM_MIN;
}

static inline double
param_hi(int i)
{
	return i == 3 ? HW_PHI_MAX : HW_PARAM_MAX;
}

/* the search runs over R: a logistic map onto the parameter's bounds */
static inline double
to_bounded(int i, double x)
{
	return param_lo(i) + (param_hi(i) - param_lo(i)) / (1.0 + exp(-x));
}

static inline double
from_bounded(int i, double p)
{
	double		u = (p - param_lo(i)) / (param_hi(i) - param_lo(i));

	u = Min(Max(u, 1e-6), 1 - 1e-6);
	return log(u / (1 - u));
}

/* the free parameters of x filled into the given ones */
static void
hw_params(const HwProblem *p, const double *x, double *out)
{
	int			j = 0;

	for (int i = 0; i < HW_NPARAMS; i++)
		out[i] = isnan(p->params[i]) ? to_bounded(i, x[j++]) : p->params[i];
}

static double
hw_objective(void *arg, const double *x)
{
	HwProblem  *p = (HwProblem *) arg;
	double		q[HW_NPARAMS];

	hw_params(p, x, q);
	return hw_filter(p->y, p->n, p->period, q[0], q[1], q[2], q[3], p->mult, p->season, NULL);
}

/*
 * Fit the free parameters.  Several starting points (the search is cheap,
 * the surface has local minima at the edges), each polished by a restart
 * of Nelder-Mead from its end point.  Returns the sse of the fit, infinity
 * when no point is feasible (a multiplicative model of a series it cannot
 * follow).
 */
static double
hw_fit_params(HwProblem *p, double *out)
{
	static const double starts[][HW_NPARAMS] = {
		{0.2, 0.01, 0.1, 0.98},
		{0.5, 0.05, 0.3, 0.9},
		{0.05, 0.001, 0.05, 0.995},
	};
	int			nfree = 0;
	double		best = get_float8_infinity();
	double		bestx[HW_NPARAMS] = {0, 0, 0, 0};

	for (int i = 0; i < HW_NPARAMS; i++)
		if (isnan(p->params[i]))
			nfree++;

	for (int s = 0; s < lengthof(starts); s++)
	{
		double		x[HW_NPARAMS];
		double		v;
		int			j = 0;

		for (int i = 0; i < HW_NPARAMS; i++)
			if (isnan(p->params[i]))
				x[j++] = from_bounded(i, starts[s][i]);
		v = ca_nelder_mead(hw_objective, p, nfree, x, 1.0, 1e-10, 400);
		v = ca_nelder_mead(hw_objective, p, nfree, x, 0.3, 1e-10, 400);
		if (v < best)
		{
			best = v;
			memcpy(bestx, x, sizeof(x));
		}
		if (nfree == 0)
			break;
	}
	hw_params(p, bestx, out);
	return best;
}

/* ---------------------------------------------------------------------
 * The aggregate
 * ---------------------------------------------------------------------
 */

/*
 * The final seasonal terms shrunk towards their mean by empirical Bayes.
 * Each term is an exponentially weighted mean (weight gamma) of its days'
 * deviations from the level: with a small gamma it rests on the last ten
 * or so weeks of its weekday, and with residuals of variance s2 its noise
 * variance is s2 gamma / (2 - gamma).  Set against how far the terms lie
 * apart, that noise says how much of each term's distance from the others
 * is real (Efron and Morris 1973; Miller and Williams 2003 for seasonal
 * factors): the noisiest terms move most.  Chosen by the training data
 * alone, this lowered the Online Retail holdout's WAPE from 18.5 to 18.3
 * (bench/results/forecast_quality.md).  Terms without two residuals (a
 * weekday the shop is closed) are left as they are.
 */
static void
hw_shrink_season(HwFit *fit, int m, double gamma)
{
	double	   *terms = palloc(m * sizeof(double));
	double	   *noise = palloc(m * sizeof(double));
	int		   *which = palloc(m * sizeof(int));
	int			p = 0;

	for (int k = 0; k < m; k++)
	{
		int			c = fit->rcount[k];
		double		var;

		if (c < 2)
			continue;
		var = (fit->rsumsq[k] - fit->rsum[k] * fit->rsum[k] / c) / (c - 1);
		terms[p] = fit->season[k];
		noise[p] = Max(var, 0.0) * gamma / (2 - gamma);
		which[p++] = k;
	}
	ca_shrink_to_mean(p, terms, noise);
	for (int i = 0; i < p; i++)
		fit->season[which[i]] = terms[i];
}

static void
check_param(const char *name, double v, double lo)
{
	if (isnan(v) || v < lo || v > 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("holt_winters %s must be between %g and 1, not %g", name, lo, v),
				 errhint("Pass NULL to have it fitted.")));
}

/* holt_winters(day date, value float8 [, period int [, alpha, beta, gamma]]) */
Datum
ca_hw_sfunc(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	HwState    *s;

	aggcxt = ca_aggregate_context(fcinfo, "holt_winters transition");

	if (PG_ARGISNULL(0))
	{
		static const char *const names[HW_NPARAMS] = {"alpha", "beta", "gamma", "phi"};

		s = MemoryContextAllocZero(aggcxt, sizeof(HwState));
		s->capacity = 256;
		s->points = MemoryContextAlloc(aggcxt, s->capacity * sizeof(HwPoint));
		s->period = 7;
		if (PG_NARGS() > 3 && !PG_ARGISNULL(3))
		{
			int			period = PG_GETARG_INT32(3);

			if (period < 2 || period > HW_MAX_PERIOD)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("holt_winters period must be between 2 and %d days, not %d",
								HW_MAX_PERIOD, period),
						 errhint("Use 7 for weekly seasonality.")));
			s->period = period;
		}
		for (int i = 0; i < HW_NPARAMS; i++)
		{
			s->params[i] = get_float8_nan();
			if (PG_NARGS() > 4 + i && !PG_ARGISNULL(4 + i))
			{
				s->params[i] = PG_GETARG_FLOAT8(4 + i);
				check_param(names[i], s->params[i], i == 3 ? HW_PHI_MIN : 0.0);
			}
		}
	}
	else
		s = (HwState *) PG_GETARG_POINTER(0);

	/* a row without a day is no observation; a NULL value closes its day */
	if (PG_ARGISNULL(1))
		PG_RETURN_POINTER(s);
	{
		DateADT		day = PG_GETARG_DATEADT(1);
		float8		value = PG_ARGISNULL(2) ? get_float8_nan() : PG_GETARG_FLOAT8(2);

		if (DATE_NOT_FINITE(day))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("holt_winters day must be finite, not %s",
							DatumGetCString(DirectFunctionCall1(date_out, DateADTGetDatum(day))))));
		if (!PG_ARGISNULL(2) && !isfinite(value))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("holt_winters value must be finite, not %g on %s", value,
							DatumGetCString(DirectFunctionCall1(date_out, DateADTGetDatum(day))))));
		if (s->npoints == s->capacity)
		{
			if ((Size) s->capacity * 2 * sizeof(HwPoint) > MaxAllocSize)
				ereport(ERROR,
						(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
						 errmsg("holt_winters received too many rows"),
						 errhint("Sum the values per day first.")));
			s->capacity *= 2;
			s->points = repalloc(s->points, s->capacity * sizeof(HwPoint));
		}
		s->points[s->npoints].day = day;
		s->points[s->npoints].value = value;
		s->npoints++;
	}
	PG_RETURN_POINTER(s);
}

static int
point_cmp(const void *a, const void *b)
{
	int32		da = ((const HwPoint *) a)->day;
	int32		db = ((const HwPoint *) b)->day;

	return (da > db) - (da < db);
}

Datum
ca_hw_final(PG_FUNCTION_ARGS)
{
	HwState    *s;
	int			m;
	int32		first,
				last;
	int			n;
	double	   *y;
	double	   *season;
	double		params[HW_NPARAMS];
	HwProblem	prob;
	HwFit		fit;
	TupleDesc	tupdesc;
	Datum		values[HW_MODEL_NATTS];
	bool		nulls[HW_MODEL_NATTS] = {0};
	Datum	   *sdatums;
	double		sse_add;
	bool		try_mult;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	s = (HwState *) PG_GETARG_POINTER(0);
	if (s->npoints == 0)
		PG_RETURN_NULL();
	m = s->period;

	/* sorting in place is harmless: the state is only ever finalised once */
	qsort(s->points, s->npoints, sizeof(HwPoint), point_cmp);
	first = s->points[0].day;
	last = s->points[s->npoints - 1].day;
	if ((int64) last - first + 1 > HW_MAX_DAYS)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("holt_winters series spans %d days, more than %d",
						last - first + 1, HW_MAX_DAYS),
				 errdetail("The series runs from %s to %s.",
						   DatumGetCString(DirectFunctionCall1(date_out, DateADTGetDatum(first))),
						   DatumGetCString(DirectFunctionCall1(date_out, DateADTGetDatum(last))))));
	n = last - first + 1;
	/* too short to initialise: no model (NULL), like avg() of nothing */
	if (n < 2 * m)
		PG_RETURN_NULL();

	/* one value per day, missing days 0, closed days (a NULL) NaN */
	y = palloc0(n * sizeof(double));
	for (int i = 0; i < s->npoints; i++)
		y[s->points[i].day - first] += s->points[i].value;
	/* nothing to start from when a whole first or second period is closed */
	{
		bool		open1 = false,
					open2 = false;

		for (int i = 0; i < m; i++)
		{
			open1 |= !isnan(y[i]);
			open2 |= !isnan(y[m + i]);
		}
		if (!open1 || !open2)
			PG_RETURN_NULL();
	}

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "holt_winters final function must return a composite type");
	tupdesc = BlessTupleDesc(tupdesc);

	/*
	 * Additive or multiplicative seasonality: both models have the same
	 * parameters and additive one-step errors, so the one with the smaller
	 * sse is also the one with the smaller AIC (Hyndman et al. 2008, ch. 7).
	 * Factors only describe a series that is positive on every open day (a
	 * zero day would pin its weekday's factor at 0); a type from before the
	 * seasonality attribute gets the additive model it can describe.
	 */
	season = palloc(m * sizeof(double));
	prob.y = y;
	prob.n = n;
	prob.period = m;
	prob.mult = false;
	memcpy(prob.params, s->params, sizeof(prob.params));
	prob.season = season;
	sse_add = hw_fit_params(&prob, params);
	try_mult = tupdesc->natts >= HW_MODEL_NATTS;
	for (int i = 0; i < n && try_mult; i++)
		try_mult = isnan(y[i]) || y[i] > 0;
	if (try_mult)
	{
		double		params_mult[HW_NPARAMS];

		prob.mult = true;
		if (hw_fit_params(&prob, params_mult) < sse_add)
			memcpy(params, params_mult, sizeof(params));
		else
			prob.mult = false;
	}
	fit.rcount = palloc0(m * sizeof(int));
	fit.rsum = palloc0(m * sizeof(double));
	fit.rsumsq = palloc0(m * sizeof(double));
	hw_filter(y, n, m, params[0], params[1], params[2], params[3], prob.mult, season, &fit);
	hw_shrink_season(&fit, m, params[2]);

	/* seasonals[k] belongs to day last + k */
	sdatums = palloc(m * sizeof(Datum));
	for (int k = 0; k < m; k++)
		sdatums[k] = Float8GetDatum(fit.season[(n + k) % m]);

	values[0] = Int32GetDatum(m);
	values[1] = Float8GetDatum(params[0]);
	values[2] = Float8GetDatum(params[1]);
	values[3] = Float8GetDatum(params[2]);
	values[4] = Float8GetDatum(params[3]);
	values[5] = Float8GetDatum(fit.level);
	values[6] = Float8GetDatum(fit.trend);
	values[7] = PointerGetDatum(construct_array(sdatums, m, FLOAT8OID, sizeof(float8),
												FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	values[8] = Float8GetDatum(fit.sse);
	values[9] = Int32GetDatum(n);
	values[10] = DateADTGetDatum(first);
	values[11] = DateADTGetDatum(last);
	values[12] = Float8GetDatum(fit.nerrors > 0 ? sqrt(fit.sse / fit.nerrors) : 0.0);
	values[13] = CStringGetTextDatum(prob.mult ? "multiplicative" : "additive");

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* ---------------------------------------------------------------------
 * Forecasting
 * ---------------------------------------------------------------------
 */

/*
 * Quantile of the standard normal distribution: Acklam's rational
 * approximation (relative error below 1.2e-9), enough for intervals.
 */
static double
normal_quantile(double p)
{
	static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02,
		-2.759285104469687e+02, 1.383577518672690e+02,
	-3.066479806614716e+01, 2.506628277459239e+00};
	static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02,
		-1.556989798598866e+02, 6.680131188771972e+01,
	-1.328068155288572e+01};
	static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01,
		-2.400758277161838e+00, -2.549732539343734e+00,
	4.374664141464968e+00, 2.938163982698783e+00};
	static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01,
	2.445134137142996e+00, 3.754408661907416e+00};
	double		q,
				r;

	if (p < 0.02425)
	{
		q = sqrt(-2 * log(p));
		return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
			((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
	}
	if (p > 1 - 0.02425)
		return -normal_quantile(1 - p);
	q = p - 0.5;
	r = q * q;
	return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
		(((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
}

/* normal_quantile(p float8): exposed for tests and for users' own intervals */
Datum
ca_normal_quantile(PG_FUNCTION_ARGS)
{
	float8		p = PG_GETARG_FLOAT8(0);

	if (!(p > 0 && p < 1))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("normal_quantile probability must be strictly between 0 and 1, not %g", p)));
	PG_RETURN_FLOAT8(normal_quantile(p));
}

static double
model_float(HeapTupleHeader t, const char *name)
{
	bool		isnull;
	Datum		d = GetAttributeByName(t, name, &isnull);

	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("hw_model field \"%s\" is NULL", name),
				 errhint("Use a model made by customer_analytics.holt_winters().")));
	return DatumGetFloat8(d);
}

/*
 * Whether a model's seasonal terms are factors: its seasonality attribute
 * (a model of a type without one is additive).
 */
static bool
model_multiplicative(HeapTupleHeader t)
{
	TupleDesc	desc = lookup_rowtype_tupdesc(HeapTupleHeaderGetTypeId(t),
											  HeapTupleHeaderGetTypMod(t));
	bool		has = false;
	bool		isnull;
	char	   *kind;

	for (int i = 0; i < desc->natts && !has; i++)
		has = !TupleDescAttr(desc, i)->attisdropped &&
			strcmp(NameStr(TupleDescAttr(desc, i)->attname), "seasonality") == 0;
	ReleaseTupleDesc(desc);
	if (!has)
		return false;
	{
		Datum		d = GetAttributeByName(t, "seasonality", &isnull);

		if (isnull)
			return false;
		kind = TextDatumGetCString(d);
	}
	if (strcmp(kind, "additive") == 0)
		return false;
	if (strcmp(kind, "multiplicative") == 0)
		return true;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("hw_model seasonality must be additive or multiplicative, not \"%s\"", kind)));
	return false;				/* keep the compiler quiet */
}

/* forecast(model hw_model, horizon int, level float8 DEFAULT 0.95) */
Datum
ca_hw_forecast(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	HeapTupleHeader model = PG_GETARG_HEAPTUPLEHEADER(0);
	int32		horizon = PG_GETARG_INT32(1);
	float8		level = PG_GETARG_FLOAT8(2);
	bool		isnull;
	int			m;
	double		alpha,
				beta,
				gamma,
				phi,
				lvl,
				trend,
				sigma,
				z;
	DateADT		last;
	ArrayType  *sarr;
	Datum	   *sdatums;
	bool	   *snulls;
	int			ns;
	double		cum = 0;		/* sum of c_j^2 so far */
	double		damp = 0;		/* phi + phi^2 + ... + phi^h */
	double		damp_prev = 0;	/* the same up to h - 1 */
	double		phi_h = 1;
	bool		mult;
	double	   *sf;				/* seasonal terms */
	double	   *dampj;			/* dampj[j] = phi + ... + phi^j */

	if (horizon < 0 || horizon > HW_MAX_HORIZON)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("forecast horizon must be between 0 and %d days, not %d",
						HW_MAX_HORIZON, horizon)));
	if (!(level > 0 && level < 1))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("forecast level must be strictly between 0 and 1, not %g", level),
				 errhint("Use 0.95 for a 95%% prediction interval.")));

	m = DatumGetInt32(GetAttributeByName(model, "period", &isnull));
	if (isnull || m < 2 || m > HW_MAX_PERIOD)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("hw_model period must be between 2 and %d", HW_MAX_PERIOD)));
	alpha = model_float(model, "alpha");
	beta = model_float(model, "beta");
	gamma = model_float(model, "gamma");
	phi = model_float(model, "phi");
	if (!(phi > 0 && phi <= 1))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("hw_model phi must be in (0, 1], not %g", phi)));
	lvl = model_float(model, "level");
	trend = model_float(model, "trend");
	sigma = model_float(model, "residual_sd");
	last = DatumGetDateADT(GetAttributeByName(model, "last_ts", &isnull));
	if (isnull || DATE_NOT_FINITE(last))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("hw_model field \"last_ts\" must be a finite date")));
	sarr = DatumGetArrayTypeP(GetAttributeByName(model, "seasonals", &isnull));
	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("hw_model field \"seasonals\" is NULL")));
	deconstruct_array(sarr, FLOAT8OID, sizeof(float8), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE,
					  &sdatums, &snulls, &ns);
	if (ns != m)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("hw_model has %d seasonal terms for a period of %d", ns, m),
				 errdetail("seasonals must hold one term per day of the period.")));
	for (int k = 0; k < ns; k++)
		if (snulls[k])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("hw_model seasonal term %d is NULL", k + 1)));
	if ((int64) last + horizon > (int64) (DATEVAL_NOEND - 1))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("forecast horizon runs past the last representable date")));

	mult = model_multiplicative(model);
	sf = palloc(m * sizeof(double));
	for (int k = 0; k < m; k++)
	{
		sf[k] = DatumGetFloat8(sdatums[k]);
		if (mult && !(sf[k] > 0))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("hw_model seasonal factor %d is %g, not positive", k + 1, sf[k]),
					 errdetail("A multiplicative model's seasonal terms are factors of the level.")));
	}
	dampj = mult ? palloc((Size) (horizon + 1) * sizeof(double)) : NULL;

	z = normal_quantile(0.5 + level / 2);
	InitMaterializedSRF(fcinfo, 0);

	for (int h = 1; h <= horizon; h++)
	{
		Datum		values[4];
		bool		nulls[4] = {0};
		double		yhat;
		double		half;
		double		st = sf[(h - 1) % m];

		damp_prev = damp;
		phi_h *= phi;
		damp += phi_h;
		if (!mult)
		{
			yhat = lvl + damp * trend + st;
			if (h > 1)
			{
				int			j = h - 1;
				double		c = alpha + alpha * beta * damp_prev + ((j % m) == 0 ? (1 - alpha) * gamma : 0);

				cum += c * c;
			}
		}
		else
		{
			/*
			 * ETS(A,Ad,M): an error on day h - j moves the level by alpha e /
			 * (its factor), which reaches day h times day h's factor; the
			 * factors taken as known (Hyndman et al. 2008, ch. 6 approximate
			 * the same way).  The ratios change with h, so the sum is
			 * recomputed: O(horizon^2), small for any useful horizon.
			 */
			yhat = (lvl + damp * trend) * st;
			dampj[h] = damp;
			cum = 0;
			for (int j = 1; j < h; j++)
			{
				double		c = (alpha + alpha * beta * dampj[j]) * st / sf[(h - j - 1) % m] +
				((j % m) == 0 ? (1 - alpha) * gamma : 0);

				cum += c * c;
			}
			if ((h & 1023) == 0)
				CHECK_FOR_INTERRUPTS();
		}
		half = z * sigma * sqrt(1 + cum);
		values[0] = DateADTGetDatum(last + h);
		values[1] = Float8GetDatum(yhat);
		values[2] = Float8GetDatum(yhat - half);
		values[3] = Float8GetDatum(yhat + half);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
