#!/usr/bin/python3
"""Principled variants of the Holt-Winters forecast, measured on one series
beside the method forecast.c implements, so that a change to the method is
weighed on numbers from the same run (bench/forecast_quality.sh calls it on
UCI Online Retail with the shop's calendar).

  forecast_variants.py SERIES.csv LAST_TRAIN LAST_DAY

SERIES.csv: day,value,closed (closed 1 on the shop's closed days).  Prints
one markdown row per variant: | variant | WAPE | MAPE |, to two
decimals (the differences to weigh are small).  The first row is
this file's port of forecast.c (the same initialisation, bounds, starting
points and Nelder-Mead), which must reproduce the extension's own row; every
variant changes one thing of it.  Nothing here looks at the holdout before
the forecast is made: whatever a variant chooses (a model, a weight) it
chooses on the training days.

Needs numpy (and scipy, statsmodels for the bagged variant).  Pure Python
loops: about twelve minutes.
"""
import math
import sys

import numpy as np

NAN = float("nan")
M = 7                                   # the week
H = 28                                  # the horizon
LO = (1e-4, 1e-4, 1e-4, 0.8)            # alpha, beta, gamma, phi: forecast.c's bounds
HI = (0.9999, 0.9999, 0.9999, 1.0)
STARTS = ((0.2, 0.01, 0.1, 0.98), (0.5, 0.05, 0.3, 0.9), (0.05, 0.001, 0.05, 0.995))


def nelder_mead(f, x, step, ftol=1e-10, max_iter=400):
    """ca_nelder_mead of numerics.c, step for step; x is replaced by the best point."""
    n = len(x)

    def ev(p):
        v = f(p)
        return math.inf if v is None or math.isnan(v) else v
    pts = [list(x)] + [[x[j] + (step if j == i else 0) for j in range(n)] for i in range(n)]
    fv = [ev(p) for p in pts]
    for _ in range(max_iter):
        lo = min(range(n + 1), key=lambda i: (fv[i], i))
        hi = max(range(n + 1), key=lambda i: (fv[i], -i))
        nh = 1 if hi == 0 else 0
        for i in range(n + 1):
            if i != hi and fv[i] > fv[nh]:
                nh = i
        if math.isfinite(fv[hi]) and abs(fv[hi] - fv[lo]) <= ftol * (abs(fv[lo]) + 1e-12):
            break
        c = [sum(pts[i][j] for i in range(n + 1) if i != hi) / n for j in range(n)]
        xr = [c[j] + (c[j] - pts[hi][j]) for j in range(n)]
        fr = ev(xr)
        if fr < fv[lo]:
            xe = [c[j] + 2 * (c[j] - pts[hi][j]) for j in range(n)]
            fe = ev(xe)
            pts[hi], fv[hi] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < fv[nh]:
            pts[hi], fv[hi] = xr, fr
        else:
            outside = fr < fv[hi]
            xc = [c[j] + 0.5 * ((xr[j] if outside else pts[hi][j]) - c[j]) for j in range(n)]
            fc = ev(xc)
            if fc < (fr if outside else fv[hi]):
                pts[hi], fv[hi] = xc, fc
            else:
                for i in range(n + 1):
                    if i != lo:
                        pts[i] = [pts[lo][j] + 0.5 * (pts[i][j] - pts[lo][j]) for j in range(n)]
                        fv[i] = ev(pts[i])
    lo = min(range(n + 1), key=lambda i: fv[i])
    x[:] = pts[lo]
    return fv[lo]


def bounded(i, x):
    return LO[i] + (HI[i] - LO[i]) / (1 + math.exp(-max(min(x, 700), -700)))


def unbounded(i, p):
    u = min(max((p - LO[i]) / (HI[i] - LO[i]), 1e-6), 1 - 1e-6)
    return math.log(u / (1 - u))


def initial_state(y, mult, trend=True):
    """forecast.c's: the line through the first two weeks' means, each
    weekday's mean deviation (ratio) from it; the state at day M - 1."""
    mean1, mean2 = np.nanmean(y[:M]), np.nanmean(y[M:2 * M])
    b = (mean2 - mean1) / M
    season = []
    for i in range(M):
        devs = []
        for t in (i, i + M):
            line = mean1 + (t - (M - 1) / 2) * b
            if math.isnan(y[t]):
                continue
            if mult and not line > 0:
                return None
            devs.append(y[t] / line if mult else y[t] - line)
        season.append(sum(devs) / len(devs) if devs else (1.0 if mult else 0.0))
    return mean1 + b * (M - 1) / 2, b if trend else 0.0, season


def run(y, q, mult, state, start, loss=None, errors=None, residuals=None):
    """The recursions of hw_filter from day start; closed days (NaN) carry
    the state unchanged.  Returns (loss of the one-step errors, final state).
    residuals: per seasonal term, the list its one-step residuals are
    appended to on its own scale (a ratio to the level for factors)."""
    a, b, g, phi = q
    level, trend, season = state[0], state[1], list(state[2])
    total = 0.0
    for t in range(start, len(y)):
        k = t % M
        if math.isnan(y[t]):
            level += phi * trend
            trend *= phi
            continue
        if mult:
            if not season[k] > 0:
                return NAN, None
            e = y[t] - (level + phi * trend) * season[k]
            new = a * y[t] / season[k] + (1 - a) * (level + phi * trend)
            if not new > 0:
                return NAN, None
            trend = b * (new - level) + (1 - b) * phi * trend
            season[k] = g * y[t] / new + (1 - g) * season[k]
        else:
            e = y[t] - (level + phi * trend + season[k])
            new = a * (y[t] - season[k]) + (1 - a) * (level + phi * trend)
            trend = b * (new - level) + (1 - b) * phi * trend
            season[k] = g * (y[t] - new) + (1 - g) * season[k]
        total += e * e if loss is None else loss(e)
        if errors is not None:
            errors.append(e)
        if residuals is not None:
            residuals[k].append(e / (level + phi * trend) if mult else e)
        level = new
    return total, (level, trend, season)


class Model:
    def __init__(self, q, state, mult, n, loss):
        self.q, self.state, self.mult, self.n, self.loss = q, state, mult, n, loss

    def forecast(self, h=H):
        level, trend, season = self.state
        phi, damp, out = self.q[3], 0.0, []
        for j in range(1, h + 1):
            damp += phi ** j
            s = season[(self.n + j - 1) % M]
            out.append((level + damp * trend) * s if self.mult else level + damp * trend + s)
        return np.array(out)


def fit(y, mult, fixed=(None, None, None, None), trend=True, loss=None):
    """forecast.c's fit of the free parameters (fixed None) by the loss of the
    one-step errors (squared by default): three starts, each polished once."""
    init = initial_state(y, mult, trend)
    if init is None:
        return None
    free = [i for i in range(4) if fixed[i] is None]

    def params(x):
        q = list(fixed)
        for j, i in enumerate(free):
            q[i] = bounded(i, x[j])
        return q
    best, bestx = math.inf, None
    for s in STARTS:
        x = [unbounded(i, s[i]) for i in free]
        nelder_mead(lambda z: run(y, params(z), mult, init, M, loss)[0], x, 1.0)
        v = nelder_mead(lambda z: run(y, params(z), mult, init, M, loss)[0], x, 0.3)
        if v < best:
            best, bestx = v, list(x)
    if bestx is None:
        return None
    q = params(bestx)
    value, state = run(y, q, mult, init, M, loss)
    return Model(q, state, mult, len(y), value)


def term_noise(y, model):
    """Each seasonal term's noise variance, the variance of its one-step
    residuals (a ratio to the level for factors) times gamma / (2 - gamma),
    that of an exponentially weighted mean; None for a term with fewer than
    two residuals (a closed weekday)."""
    res = [[] for _ in range(M)]
    run(y, model.q, model.mult, initial_state(y, model.mult), M, residuals=res)
    g = model.q[2]
    return [np.var(r, ddof=1) * g / (2 - g) if len(r) >= 2 else None for r in res]


def shrunk(y, model, common=None):
    """forecast.c's hw_shrink_season: the final seasonal terms shrunk
    towards their mean by empirical Bayes with unequal variances (Efron and
    Morris 1973): tau2 = the terms' variance less their mean noise, each
    term keeps tau2 / (tau2 + its noise) of its distance from the mean.
    common: one factor for every term instead (James-Stein, positive part,
    for a number; the pooled noise for "js")."""
    v = term_noise(y, model)
    idx = [k for k in range(M) if v[k] is not None]
    if len(idx) < 3:
        return model, 1.0
    s = np.array([model.state[2][k] for k in idx])
    vv = np.array([v[k] for k in idx])
    mean = s.mean()
    if common is None:
        tau2 = max(np.sum((s - mean) ** 2) / (len(idx) - 1) - vv.mean(), 0.0)
        keep = np.array([tau2 / (tau2 + x) if x > 0 else 1.0 for x in vv])
    elif common == "js":
        keep = np.full(len(idx), max(0.0, 1 - (len(idx) - 3) * vv.mean() / np.sum((s - mean) ** 2)))
    else:
        keep = np.full(len(idx), common)
    season = list(model.state[2])
    for i, k in enumerate(idx):
        season[k] = mean + keep[i] * (s[i] - mean)
    return Model(model.q, (model.state[0], model.state[1], season), model.mult, model.n, model.loss), keep


def fit_like_c(y, shrink=True):
    """both seasonalities, the smaller sse kept (factors only for a series
    positive on every open day); the final terms shrunk (shrink False: the
    method before the shrinkage)"""
    add = fit(y, False)
    best = add
    if all(math.isnan(v) or v > 0 for v in y):
        mult = fit(y, True)
        if mult is not None and mult.loss < add.loss:
            best = mult
    return shrunk(y, best)[0] if shrink else best


def one_step_errors(y, model):
    errors = []
    run(y, model.q, model.mult, initial_state(y, model.mult), M, None, errors)
    return np.array(errors)


def fit_initial_states(y, mult):
    """Variant (a): the initial state (level, trend, the weekday terms, at the
    day before the first) estimated with the parameters by the sum of
    squared one-step errors of every open day, as R's ets() and statsmodels
    do.  Additive: the errors are affine in the initial state, so for given
    parameters it is a least-squares problem (solved exactly inside the
    search).  Multiplicative: Nelder-Mead over all 13 values, from
    forecast.c's fit, on the series scaled to a mean of 1."""
    if not mult:
        def solve(q, want_model=False):
            a, b, g, phi = q
            p = M + 2
            # column 0: the state from a zero start; columns 1..p: its
            # derivative by each initial value
            x = np.zeros((p, p + 1))
            x[:, 1:] = np.eye(p)
            rows = []
            for t in range(len(y)):
                k = t % M
                if math.isnan(y[t]):
                    x[0] += phi * x[1]
                    x[1] *= phi
                    continue
                e = -(x[0] + phi * x[1] + x[2 + k])
                e[0] += y[t]
                x[0] = x[0] + phi * x[1] + a * e
                x[1] = phi * x[1] + a * b * e
                x[2 + k] = x[2 + k] + g * (1 - a) * e
                rows.append(e)
            rows = np.array(rows)
            x0 = np.linalg.lstsq(rows[:, 1:], -rows[:, 0], rcond=None)[0]
            r = rows[:, 0] + rows[:, 1:] @ x0
            if not want_model:
                return float(r @ r)
            s = x[:, 0] + x[:, 1:] @ x0
            return Model(q, (s[0], s[1], list(s[2:])), False, len(y), float(r @ r))
        best, bestx = math.inf, None
        for s in STARTS:
            x = [unbounded(i, s[i]) for i in range(4)]
            nelder_mead(lambda z: solve([bounded(i, z[i]) for i in range(4)]), x, 1.0)
            v = nelder_mead(lambda z: solve([bounded(i, z[i]) for i in range(4)]), x, 0.3)
            if v < best:
                best, bestx = v, x
        return solve([bounded(i, bestx[i]) for i in range(4)], True)
    scale = np.nanmean(y)
    ys = y / scale
    start = fit(ys, True)
    level, trend, season = initial_state(ys, True)
    z = [unbounded(i, start.q[i]) for i in range(4)] + [level - trend * M, trend] + list(season)

    def objective(z):
        return run(ys, [bounded(i, z[i]) for i in range(4)], True, (z[4], z[5], z[6:]), 0)[0]
    for k in range(4):
        nelder_mead(objective, z, 0.1 if k % 2 == 0 else 0.02, 1e-10, 3000)
    q = [bounded(i, z[i]) for i in range(4)]
    value, (level, trend, season) = run(ys, q, True, (z[4], z[5], z[6:]), 0)
    return Model(q, (level * scale, trend * scale, season), True, len(y), value * scale * scale)


BAGS = 20


def bagged(y, seed=16):
    """Bagged Holt-Winters (Bergmeir, Hyndman and Benitez 2016, "Bagging
    exponential smoothing methods using STL decomposition and Box-Cox
    transformation"): the open days Box-Cox transformed (lambda by maximum
    likelihood), decomposed by STL with a periodic season (closed days
    interpolated for the decomposition only), the remainder resampled in
    moving blocks of two weeks; each of BAGS series, back-transformed and
    closed where the shop is, fitted like the series itself; the forecast
    the mean of theirs and the series' own."""
    from scipy import stats
    from statsmodels.tsa.seasonal import STL
    rng = np.random.default_rng(seed)
    shop = ~np.isnan(y)
    lam = stats.boxcox(y[shop])[1]
    z = np.full(len(y), NAN)
    z[shop] = stats.boxcox(y[shop], lam)
    days = np.arange(len(y))
    parts = STL(np.interp(days, days[shop], z[shop]), period=M, seasonal=len(y) // 2 * 2 + 1).fit()
    block = 2 * M
    forecasts = [fit_like_c(y).forecast()]
    for _ in range(BAGS):
        starts = rng.integers(0, len(y) - block + 1, len(y) // block + 2)
        resampled = np.concatenate([parts.resid[s:s + block] for s in starts])
        offset = rng.integers(0, block)
        zb = parts.trend + parts.seasonal + resampled[offset:offset + len(y)]
        yb = np.full(len(y), NAN)
        yb[shop] = np.power(lam * zb[shop] + 1, 1 / lam) if lam != 0 else np.exp(zb[shop])
        forecasts.append(fit_like_c(yb).forecast())
    return np.mean(forecasts, axis=0), lam


def scores(actual, closed, f):
    f = np.where(closed, 0.0, f)
    wape = 100 * np.sum(np.abs(actual - f)) / np.sum(actual)
    sold = actual > 0
    return wape, 100 * np.mean(np.abs(actual[sold] - f[sold]) / actual[sold])


def seasonal_naive(raw, n):
    return np.array([raw[n - M + j % M] for j in range(H)])


def main():
    path, last_train, last_day = sys.argv[1:4]
    days, raw, closed, orders = [], [], [], []
    for line in open(path):
        d, v, c, *o = line.strip().split(",")
        if d <= last_day:
            days.append(d)
            raw.append(float(v))
            closed.append(c in ("1", "t", "true"))
            orders.append(float(o[0]) if o else NAN)
    raw, closed, orders = np.array(raw), np.array(closed), np.array(orders)
    y = np.where(closed, NAN, raw)
    n = days.index(last_train) + 1
    actual, shut = raw[n:n + H], closed[n:n + H]
    rows = []

    def row(name, f):
        rows.append("| %s | %.2f | %.2f |" % ((name,) + scores(actual, shut, f)))

    port = fit_like_c(y[:n])
    row("Python port of forecast.c (%s)" % ("multiplicative" if port.mult else "additive"),
        port.forecast())
    # the rows after the next change one thing of the method before the
    # weekday terms were shrunk
    base = fit_like_c(y[:n], False)
    row("the same without shrinking the seasonal terms (forecast.c before)", base.forecast())

    # (a) initial states fitted with the parameters
    for mult in (False, True):
        m = fit_initial_states(y[:n], mult)
        row("(a) initial states fitted with the parameters, %s" %
            ("multiplicative" if mult else "additive"), m.forecast())

    # (b) rolling-origin cross-validation on the training days: the last 6
    # origins a week apart whose 28 days end inside the training period
    origins = [n - H - M * k for k in range(6)]
    kinds = {"additive, damped": dict(mult=False), "multiplicative, damped": dict(mult=True),
             "additive, no trend": dict(mult=False, fixed=(None, 0.0, None, 1.0), trend=False),
             "multiplicative, no trend": dict(mult=True, fixed=(None, 0.0, None, 1.0), trend=False)}
    cv = {k: [] for k in kinds}
    naive_hw = []
    for o in origins:
        a, c = raw[o:o + H], closed[o:o + H]
        for k, kw in kinds.items():
            cv[k].append(scores(a, c, fit(y[:o], **kw).forecast())[0])
        naive_hw.append((a, c, fit_like_c(y[:o], False), seasonal_naive(raw, o)))
    chosen = min(kinds, key=lambda k: np.mean(cv[k]))
    row("(b) the model of smallest cross-validated WAPE (%s; %s)" %
        (chosen, ", ".join("%s %.1f" % (k, np.mean(v)) for k, v in cv.items())),
        fit(y[:n], **kinds[chosen]).forecast())
    grid = np.linspace(0, 1, 21)
    w = grid[int(np.argmin([np.mean([scores(a, c, g * f.forecast() + (1 - g) * s)[0] for a, c, f, s in naive_hw])
                            for g in grid]))]
    row("(b) w Holt-Winters + (1 - w) seasonal naive, w = %.2f by cross-validated WAPE" % w,
        w * base.forecast() + (1 - w) * seasonal_naive(raw, n))

    # (c) a robust loss: Huber's with k = 1.345 robust standard deviations
    # (the MAD of the least-squares fit's one-step errors)
    e = one_step_errors(y[:n], base)
    k = 1.345 * 1.4826 * np.median(np.abs(e - np.median(e)))
    huber = fit(y[:n], base.mult, loss=lambda x: x * x if abs(x) <= k else 2 * k * abs(x) - k * k)
    row("(c) parameters by Huber's loss of the one-step errors (%s)" %
        ("multiplicative" if base.mult else "additive"), huber.forecast())

    # Akaike weights over the six trend/seasonality forms (Kolassa 2011);
    # the initial states count as parameters
    forms = []
    opens = sum(1 for v in y[M:n] if not math.isnan(v))
    for mult in (False, True):
        for fixed, trend, nparams in (((None,) * 4, True, 4 + 2), ((None, None, None, 1.0), True, 3 + 2),
                                      ((None, 0.0, None, 1.0), False, 2 + 1)):
            m = fit(y[:n], mult, fixed, trend)
            if m is not None:
                forms.append((opens * math.log(m.loss / opens) + 2 * (nparams + M - 1), m))
    best = min(aic for aic, _ in forms)
    weights = [math.exp(-(aic - best) / 2) for aic, _ in forms]
    row("Akaike-weighted combination of the 6 forms (largest weight %.2f)" % (max(weights) / sum(weights)),
        sum(wt * m.forecast() for wt, (_, m) in zip(weights, forms)) / sum(weights))

    # (d) the seasonal terms shrunk towards each other (forecast.c's
    # choice, the port's first row), or by one common factor: James-Stein's,
    # or the one of smallest cross-validated WAPE
    cv_fits = [(o, f) for o, (_, _, f, _) in zip(origins, naive_hw)]

    def cv_wape(how):
        return np.mean([scores(raw[o:o + H], closed[o:o + H],
                               f.forecast() if how is False else shrunk(y[:o], f, how)[0].forecast())[0]
                        for o, f in cv_fits])
    keep = shrunk(y[:n], base)[1]
    row("(d) each term shrunk by its own noise, empirical Bayes (kept %.2f .. %.2f of the distance; "
        "cross-validated WAPE %.2f, %.2f unshrunk)" % (min(keep), max(keep), cv_wape(None), cv_wape(False)),
        shrunk(y[:n], base)[0].forecast())
    js, keep = shrunk(y[:n], base, "js")
    row("(d) one factor for all terms, James-Stein (%.2f kept; cross-validated WAPE %.2f)" % (keep[0], cv_wape("js")),
        js.forecast())
    grid = [1.0, 0.95, 0.9, 0.8, 0.7, 0.5, 0.3, 0.0]
    lam = grid[int(np.argmin([cv_wape(x) for x in grid]))]
    row("(d) one factor for all terms by cross-validated WAPE (%.2f of %s)" % (lam, ", ".join("%g" % x for x in grid)),
        shrunk(y[:n], base, lam)[0].forecast())

    # (e) bagging (Bergmeir, Hyndman and Benitez 2016), each fit by the
    # method now (the shrinkage included)
    try:
        f, lam = bagged(y[:n])
        others = ["%.2f / %.2f" % scores(actual, shut, bagged(y[:n], seed)[0]) for seed in (17, 18)]
        cv_bag = np.mean([scores(raw[o:o + H], closed[o:o + H], bagged(y[:o])[0])[0] for o in origins])
        cv_now = np.mean([scores(raw[o:o + H], closed[o:o + H], shrunk(y[:o], f)[0].forecast())[0]
                          for o, f in cv_fits])
        row("(e) bagged: Box-Cox (lambda %.2f), STL, moving-block bootstrap of the remainder, "
            "the mean of the %d forecasts (bootstrap seed 16; seeds 17, 18: %s; cross-validated WAPE "
            "%.2f, the method %.2f)" % (lam, BAGS + 1, ", ".join(others), cv_bag, cv_now), f)
    except ImportError:
        rows.append("| (e) bagged: skipped, needs scipy and statsmodels | | |")

    # (f) orders per day times revenue per order, each by the method now
    if not np.isnan(orders).any():
        count = np.where(closed, NAN, orders)
        per_order = np.where(closed | (orders == 0), NAN, raw / np.maximum(orders, 1))
        row("(f) orders per day x revenue per order, each forecast by the method",
            fit_like_c(count[:n]).forecast() * fit_like_c(per_order[:n]).forecast())
    print("\n".join(rows))


if __name__ == "__main__":
    main()
