/*
 * numerics.h
 *	  Minimisers shared by the model fits (clv.c, forecast.c): Nelder-Mead
 *	  for objectives without a gradient, a bounded quasi-Newton method for
 *	  smooth ones with an analytic gradient; and the digamma function the
 *	  gradients of log-likelihoods with lgamma terms need.
 *
 * Objectives return NaN or infinity for a point they refuse.
 */
#ifndef CA_NUMERICS_H
#define CA_NUMERICS_H

/* f(x) */
typedef double (*CaObjective) (void *arg, const double *x);

/* f(x), and its gradient into grad (n values) */
typedef double (*CaObjectiveGrad) (void *arg, const double *x, double *grad);

/* how a bounded quasi-Newton minimisation ended */
typedef enum CaMinStatus
{
	CA_MIN_CONVERGED,			/* projected gradient (or step) below
								 * tolerance */
	CA_MIN_ITERATION_LIMIT,		/* max_iter iterations without converging */
	CA_MIN_NO_PROGRESS,			/* no descent found from a non-stationary
								 * point */
	CA_MIN_NOT_FINITE			/* the objective refused the starting point */
} CaMinStatus;

typedef struct CaMinResult
{
	CaMinStatus status;
	double		value;			/* f at the point returned */
	int			iterations;
	int			evaluations;
} CaMinResult;

extern double ca_nelder_mead(CaObjective f, void *arg, int n, double *x,
							 double step, double ftol, int max_iter);

extern void ca_minimize_bounded(CaObjectiveGrad f, void *arg, int n, double *x,
								const double *lo, const double *hi,
								double gtol, double ftol, int max_iter,
								CaMinResult *result);

extern double ca_digamma(double x);

extern void ca_shrink_to_mean(int p, double *x, const double *v);

#endif							/* CA_NUMERICS_H */
