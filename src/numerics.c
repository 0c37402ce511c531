/*
 * numerics.c
 *	  Minimisers for the model fits: Nelder-Mead (Holt-Winters in
 *	  forecast.c, whose objective has no cheap gradient) and a bounded
 *	  quasi-Newton method (the BG/NBD and Gamma-Gamma fits in clv.c, whose
 *	  log-likelihoods have analytic gradients).
 *
 * The problems are small (at most four parameters) and each evaluation of
 * the objective is a pass over the data, so the quasi-Newton method keeps a
 * dense inverse-Hessian approximation and spends its effort on saving
 * evaluations rather than memory: BFGS with box constraints handled by
 * projection (variables at a bound whose gradient points outwards are
 * held there for the step, the Bertsekas two-metric idea), a backtracking
 * line search along the projected path with the Armijo condition, and the
 * update skipped when the curvature condition fails.  It converges on
 * the projected gradient, relative to the objective's size.
 *
 * A general library (NLopt's L-BFGS-B, say) was weighed: for four
 * parameters it offers nothing this does not, and calling back into
 * PostgreSQL from inside it would mean interrupts (CHECK_FOR_INTERRUPTS
 * longjmps out of the objective) leaking the library's malloc'ed state.
 */
#include "postgres.h"

#include <math.h>

#include "miscadmin.h"
#include "utils/float.h"

#include "numerics.h"

/* ---------------------------------------------------------------------
 * Nelder-Mead
 * ---------------------------------------------------------------------
 */

static inline double
nm_value(CaObjective f, void *arg, const double *x)
{
	double		v = f(arg, x);

	return isnan(v) ? get_float8_infinity() : v;
}

/*
 * Minimise f over R^n from x (replaced by the best point found), with an
 * initial simplex of the given step along each axis.  Standard
 * coefficients (reflection 1, expansion 2, contraction 1/2, shrink 1/2);
 * stops when the simplex's values agree to ftol (relative) or after
 * max_iter iterations.  A non-finite value counts as +infinity, so f can
 * refuse a point by returning NaN.  Returns the best value.
 */
double
ca_nelder_mead(CaObjective f, void *arg, int n, double *x, double step,
			   double ftol, int max_iter)
{
	double	   *simplex = palloc((n + 1) * n * sizeof(double));
	double	   *fv = palloc((n + 1) * sizeof(double));
	double	   *centroid = palloc(n * sizeof(double));
	double	   *xr = palloc(n * sizeof(double));
	double	   *xe = palloc(n * sizeof(double));
	double		best;

#define P(i) (simplex + (i) * n)
#define EVAL(p) nm_value(f, arg, (p))

	if (n == 0)
		return nm_value(f, arg, x);

	for (int i = 0; i <= n; i++)
	{
		memcpy(P(i), x, n * sizeof(double));
		if (i > 0)
			P(i)[i - 1] += step;
		fv[i] = EVAL(P(i));
	}

	for (int iter = 0; iter < max_iter; iter++)
	{
		int			lo = 0,
					hi = 0,
					nh = 0;
		double		fr;

		CHECK_FOR_INTERRUPTS();

		/* best, worst and second worst */
		for (int i = 1; i <= n; i++)
		{
			if (fv[i] < fv[lo])
				lo = i;
			if (fv[i] > fv[hi])
				hi = i;
		}
		nh = (hi == 0) ? 1 : 0;
		for (int i = 0; i <= n; i++)
			if (i != hi && fv[i] > fv[nh])
				nh = i;

		if (isfinite(fv[hi]) &&
			fabs(fv[hi] - fv[lo]) <= ftol * (fabs(fv[lo]) + 1e-12))
			break;

		for (int j = 0; j < n; j++)
		{
			centroid[j] = 0;
			for (int i = 0; i <= n; i++)
				if (i != hi)
					centroid[j] += P(i)[j];
			centroid[j] /= n;
		}

		for (int j = 0; j < n; j++)
			xr[j] = centroid[j] + (centroid[j] - P(hi)[j]);
		fr = EVAL(xr);

		if (fr < fv[lo])
		{
			double		fe;

			for (int j = 0; j < n; j++)
				xe[j] = centroid[j] + 2.0 * (centroid[j] - P(hi)[j]);
			fe = EVAL(xe);
			if (fe < fr)
			{
				memcpy(P(hi), xe, n * sizeof(double));
				fv[hi] = fe;
			}
			else
			{
				memcpy(P(hi), xr, n * sizeof(double));
				fv[hi] = fr;
			}
		}
		else if (fr < fv[nh])
		{
			memcpy(P(hi), xr, n * sizeof(double));
			fv[hi] = fr;
		}
		else
		{
			/* contract, outside if the reflection helped, else inside */
			bool		outside = fr < fv[hi];
			double		fc;

			for (int j = 0; j < n; j++)
				xe[j] = outside ? centroid[j] + 0.5 * (xr[j] - centroid[j])
					: centroid[j] + 0.5 * (P(hi)[j] - centroid[j]);
			fc = EVAL(xe);
			if (fc < (outside ? fr : fv[hi]))
			{
				memcpy(P(hi), xe, n * sizeof(double));
				fv[hi] = fc;
			}
			else
			{
				/* shrink towards the best point */
				for (int i = 0; i <= n; i++)
				{
					if (i == lo)
						continue;
					for (int j = 0; j < n; j++)
						P(i)[j] = P(lo)[j] + 0.5 * (P(i)[j] - P(lo)[j]);
					fv[i] = EVAL(P(i));
				}
			}
		}
	}

	{
		int			lo = 0;

		for (int i = 1; i <= n; i++)
			if (fv[i] < fv[lo])
				lo = i;
		memcpy(x, P(lo), n * sizeof(double));
		best = fv[lo];
	}
#undef P
#undef EVAL
	pfree(simplex);
	pfree(fv);
	pfree(centroid);
	pfree(xr);
	pfree(xe);
	return best;
}

/* ---------------------------------------------------------------------
 * Bounded quasi-Newton
 * ---------------------------------------------------------------------
 */

#define QN_MAX_N 8
#define QN_ARMIJO 1e-4
#define QN_MAX_BACKTRACK 60
#define QN_MAX_STEP 2.0			/* longest step, in any variable */
#define QN_NOISE 1e-13			/* relative rounding error of f */

static inline double
clamp(double v, double lo, double hi)
{
	return Min(Max(v, lo), hi);
}

/* is variable i held at its bound, the gradient pushing it outwards? */
static inline bool
held_at_bound(double x, double g, double lo, double hi)
{
	return (x <= lo && g > 0) || (x >= hi && g < 0);
}

/*
 * Minimise f over the box lo <= x <= hi from x (projected into the box
 * first; replaced by the best point found).  Stops when every component
 * of the projected gradient is at most gtol (1 + |f|), when a step no
 * longer changes x, when two steps in a row change f by at most
 * ftol (1 + |f|), or after max_iter iterations.
 */
void
ca_minimize_bounded(CaObjectiveGrad f, void *arg, int n, double *x,
					const double *lo, const double *hi,
					double gtol, double ftol, int max_iter, CaMinResult *result)
{
	double		H[QN_MAX_N][QN_MAX_N];
	double		g[QN_MAX_N],
				gn[QN_MAX_N],
				xn[QN_MAX_N],
				d[QN_MAX_N],
				s[QN_MAX_N],
				y[QN_MAX_N];
	double		fx;
	bool		scaled = false;
	int			flat_steps = 0;

	Assert(n > 0 && n <= QN_MAX_N);
	memset(result, 0, sizeof(*result));
	for (int i = 0; i < n; i++)
		x[i] = clamp(x[i], lo[i], hi[i]);
	fx = f(arg, x, g);
	result->evaluations = 1;
	if (!isfinite(fx))
	{
		result->status = CA_MIN_NOT_FINITE;
		result->value = fx;
		return;
	}
	for (int i = 0; i < n; i++)
		for (int j = 0; j < n; j++)
			H[i][j] = (i == j);

	result->status = CA_MIN_ITERATION_LIMIT;
	for (int iter = 0; iter < max_iter; iter++)
	{
		double		pg = 0,
					slope = 0,
					dmax = 0,
					t = 1,
					fn = 0;
		bool		moved = false,
					accepted = false;

		CHECK_FOR_INTERRUPTS();
		result->iterations = iter + 1;

		for (int i = 0; i < n; i++)
			if (!held_at_bound(x[i], g[i], lo[i], hi[i]))
				pg = Max(pg, fabs(g[i]));
		if (pg <= gtol * (1 + fabs(fx)))
		{
			result->status = CA_MIN_CONVERGED;
			break;
		}

		/* quasi-Newton direction over the free variables */
		for (int i = 0; i < n; i++)
		{
			d[i] = 0;
			if (held_at_bound(x[i], g[i], lo[i], hi[i]))
				continue;
			for (int j = 0; j < n; j++)
				if (!held_at_bound(x[j], g[j], lo[j], hi[j]))
					d[i] -= H[i][j] * g[j];
			slope += d[i] * g[i];
		}
		if (!(slope < 0))
		{
			/* not a descent direction: forget the curvature learnt */
			for (int i = 0; i < n; i++)
				for (int j = 0; j < n; j++)
					H[i][j] = (i == j);
			scaled = false;
			slope = 0;
			for (int i = 0; i < n; i++)
			{
				d[i] = held_at_bound(x[i], g[i], lo[i], hi[i]) ? 0 : -g[i];
				slope += d[i] * g[i];
			}
		}
		for (int i = 0; i < n; i++)
			dmax = Max(dmax, fabs(d[i]));

		/*
		 * Before any curvature is known, a first step of length 1 at most;
		 * after, QN_MAX_STEP: along a nearly flat ridge the quasi-Newton step
		 * is huge, and backtracking from it costs an evaluation per halving.
		 */
		if (!scaled && dmax > 1)
			t = 1 / dmax;
		else if (dmax > QN_MAX_STEP)
			t = QN_MAX_STEP / dmax;

		/*
		 * A step whose predicted decrease is below the rounding error of f (a
		 * sum over every customer) cannot be told from noise: the minimum, in
		 * floating point.
		 */
		if (-slope * t <= QN_NOISE * (1 + fabs(fx)))
		{
			result->status = CA_MIN_CONVERGED;
			break;
		}

		/* backtrack along the projected path until f decreases enough */
		for (int k = 0; k < QN_MAX_BACKTRACK; k++)
		{
			double		decrease = 0;

			moved = false;
			for (int i = 0; i < n; i++)
			{
				xn[i] = clamp(x[i] + t * d[i], lo[i], hi[i]);
				if (xn[i] != x[i])
					moved = true;
				decrease += g[i] * (xn[i] - x[i]);
			}
			if (!moved)
				break;
			fn = f(arg, xn, gn);
			result->evaluations++;
			if (isfinite(fn) && fn <= fx + QN_ARMIJO * decrease)
			{
				accepted = true;
				break;
			}
			if (-decrease <= QN_NOISE * (1 + fabs(fx)))
			{
				moved = false;	/* as good as the minimum: see above */
				break;
			}
			t *= 0.5;
		}
		if (!accepted)
		{
			/*
			 * No decrease along a descent direction: either f is flat to
			 * rounding here (the minimum, in floating point) or the model of
			 * it is bad; a steepest-descent retry tells which.
			 */
			if (scaled)
			{
				for (int i = 0; i < n; i++)
					for (int j = 0; j < n; j++)
						H[i][j] = (i == j);
				scaled = false;
				continue;
			}
			result->status = moved ? CA_MIN_NO_PROGRESS : CA_MIN_CONVERGED;
			break;
		}

		{
			double		sy = 0,
						yy = 0,
						ss = 0;
			double		oldf = fx;

			for (int i = 0; i < n; i++)
			{
				s[i] = xn[i] - x[i];
				y[i] = gn[i] - g[i];
				sy += s[i] * y[i];
				yy += y[i] * y[i];
				ss += s[i] * s[i];
			}
			memcpy(x, xn, n * sizeof(double));
			memcpy(g, gn, n * sizeof(double));
			fx = fn;

			/* BFGS update of the inverse Hessian, where curvature is positive */
			if (sy > 1e-12 * sqrt(ss * yy))
			{
				double		rho = 1 / sy;
				double		Hy[QN_MAX_N];
				double		yHy = 0;

				if (!scaled)
				{
					/* Nocedal and Wright (6.20): the first guess's scale */
					for (int i = 0; i < n; i++)
						for (int j = 0; j < n; j++)
							H[i][j] = (i == j) ? sy / yy : 0;
					scaled = true;
				}
				for (int i = 0; i < n; i++)
				{
					Hy[i] = 0;
					for (int j = 0; j < n; j++)
						Hy[i] += H[i][j] * y[j];
					yHy += y[i] * Hy[i];
				}
				for (int i = 0; i < n; i++)
					for (int j = 0; j < n; j++)
						H[i][j] += -rho * (Hy[i] * s[j] + s[i] * Hy[j]) +
							(rho * rho * yHy + rho) * s[i] * s[j];
			}

			/*
			 * Two steps in a row that change f by less than ftol (relative)
			 * end the search: at a minimum BFGS converges faster than that,
			 * so this is a flat ridge toward a limit at infinity (a
			 * degenerate fit), where more steps buy nothing but time.
			 */
			if (scaled && fabs(oldf - fx) <= ftol * (1 + fabs(fx)))
			{
				if (++flat_steps >= 2)
				{
					result->status = CA_MIN_CONVERGED;
					break;
				}
			}
			else
				flat_steps = 0;
		}
	}
	result->value = fx;
}

/* ---------------------------------------------------------------------
 * Special functions
 * ---------------------------------------------------------------------
 */

/*
 * The digamma function psi(x) = d/dx ln Gamma(x) for x > 0: the
 * recurrence psi(x) = psi(x + 1) - 1/x up to x >= 10, then the asymptotic
 * series (Abramowitz and Stegun 6.3.18), accurate there to about 1e-15.
 */
double
ca_digamma(double x)
{
	double		r = 0,
				x2;

	if (!(x > 0))
		return get_float8_nan();
	while (x < 10)
	{
		r -= 1 / x;
		x += 1;
	}
	x2 = 1 / (x * x);
	return r + log(x) - 0.5 / x -
		x2 * (1.0 / 12 - x2 * (1.0 / 120 - x2 * (1.0 / 252 - x2 * (1.0 / 240 - x2 * (1.0 / 132)))));
}

/* ---------------------------------------------------------------------
 * Shrinkage
 * ---------------------------------------------------------------------
 */

/*
 * Empirical Bayes shrinkage of p estimates x[i] with noise variances v[i]
 * towards their mean (Efron and Morris 1973, unequal variances): the true
 * values are taken to spread around the mean with a variance tau2, which
 * the estimates' spread less their mean noise estimates (method of
 * moments, not below 0); each moves by the share of its own variance that
 * is noise, v / (tau2 + v).  Fewer than three estimates say nothing about
 * tau2: they are left alone, as is an estimate without noise.
 */
void
ca_shrink_to_mean(int p, double *x, const double *v)
{
	double		mean = 0,
				spread = 0,
				noise = 0,
				tau2;

	if (p < 3)
		return;
	for (int i = 0; i < p; i++)
	{
		mean += x[i];
		noise += v[i];
	}
	mean /= p;
	noise /= p;
	for (int i = 0; i < p; i++)
		spread += (x[i] - mean) * (x[i] - mean);
	tau2 = Max(spread / (p - 1) - noise, 0.0);
	for (int i = 0; i < p; i++)
		if (v[i] > 0)
			x[i] = mean + tau2 / (tau2 + v[i]) * (x[i] - mean);
}
