-- Holt-Winters: the recursions against an independent SQL implementation,
-- exact recovery of a noiseless series, the fit against a grid, the
-- intervals' formula, the sales series, backtest, forecast view and
-- forecast-miss alerts on generated data.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
SET extra_float_digits = 0;

-- reference implementation: the same recursions, written independently;
-- mult: the seasonal terms are factors of the level.  The final terms are
-- shrunk towards their mean by empirical Bayes: each term's noise variance
-- is its one-step residuals' variance (a ratio to the level for factors)
-- times g / (2 - g), the variance of an exponentially weighted mean; tau2
-- is the terms' variance less their mean noise (not below 0), and a term
-- keeps tau2 / (tau2 + its noise) of its distance from the mean.  Only
-- terms with two residuals or more take part, and only three or more.
CREATE FUNCTION pg_temp.hw_ref(y float8[], m int, a float8, b float8, g float8, phi float8, mult boolean DEFAULT false,
                               OUT level float8, OUT trend float8, OUT sse float8, OUT seasonals float8[])
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    n int := array_length(y, 1);
    s float8[];
    mean1 float8;
    mean2 float8;
    e float8;
    l_new float8;
    k int;
    term float8;
    res float8[] := '{}';       -- the residuals
    res_k int[] := '{}';        -- their terms
    noise float8[];
    mean_s float8;
    tau2 float8;
BEGIN
    -- a NULL is a closed day: out of the means, no error, the state carried
    SELECT avg(v) INTO mean1 FROM unnest(y[1:m]) v;
    SELECT avg(v) INTO mean2 FROM unnest(y[m + 1:2 * m]) v;
    trend := (mean2 - mean1) / m;
    -- each day's term: its mean deviation from the line over the two periods
    FOR i IN 1 .. m LOOP
        SELECT COALESCE(avg(CASE WHEN mult THEN y[t] / (mean1 + ((t - 1) - (m - 1) / 2.0) * trend)
                                 ELSE y[t] - (mean1 + ((t - 1) - (m - 1) / 2.0) * trend) END),
                        CASE WHEN mult THEN 1 ELSE 0 END)
        INTO term
        FROM unnest(ARRAY[i, i + m]) t WHERE y[t] IS NOT NULL;
        s[i] := term;
    END LOOP;
    level := mean1 + trend * (m - 1) / 2.0;
    sse := 0;
    FOR t IN m + 1 .. n LOOP
        k := ((t - 1) % m) + 1;
        IF y[t] IS NULL THEN
            level := level + phi * trend;
            trend := phi * trend;
            CONTINUE;
        END IF;
        IF mult THEN
            e := y[t] - (level + phi * trend) * s[k];
            res := res || e / (level + phi * trend);
            res_k := res_k || k;
            l_new := a * (y[t] / s[k]) + (1 - a) * (level + phi * trend);
            trend := b * (l_new - level) + (1 - b) * phi * trend;
            s[k] := g * (y[t] / l_new) + (1 - g) * s[k];
        ELSE
            e := y[t] - (level + phi * trend + s[k]);
            res := res || e;
            res_k := res_k || k;
            l_new := a * (y[t] - s[k]) + (1 - a) * (level + phi * trend);
            trend := b * (l_new - level) + (1 - b) * phi * trend;
            s[k] := g * (y[t] - l_new) + (1 - g) * s[k];
        END IF;
        sse := sse + e * e;
        level := l_new;
    END LOOP;
    noise := array_fill(NULL::float8, ARRAY[m]);
    FOR i IN 1 .. m LOOP
        SELECT var_samp(r) * g / (2 - g) INTO term
        FROM unnest(res, res_k) u(r, rk) WHERE rk = i;
        noise[i] := term;
    END LOOP;
    IF (SELECT count(*) FROM unnest(noise) v WHERE v IS NOT NULL) >= 3 THEN
        SELECT avg(s[i]), greatest(var_samp(s[i]) - avg(noise[i]), 0) INTO mean_s, tau2
        FROM generate_series(1, m) i WHERE noise[i] IS NOT NULL;
        FOR i IN 1 .. m LOOP
            IF noise[i] > 0 THEN
                s[i] := mean_s + tau2 / (tau2 + noise[i]) * (s[i] - mean_s);
            END IF;
        END LOOP;
    END IF;
    -- seasonals of days n+1 .. n+m
    seasonals := ARRAY(SELECT s[((n + j - 1) % m) + 1] FROM generate_series(1, m) j);
END
$$;

-- 1. a noiseless series (trend 2 per day, weekly pattern summing to 0) is
-- recovered exactly by the undamped model (phi = 1), whatever the smoothing
-- parameters: zero error, exact forecast
CREATE TEMP TABLE clean AS
SELECT '2025-01-06'::date + t AS day,
       100 + 2 * t + (ARRAY[10, -5, 0, 3, -8, 4, -4])[(t % 7) + 1] AS value
FROM generate_series(0, 69) t;
SELECT (m).period, (m).n, (m).first_ts, (m).last_ts,
       abs((m).sse) < 1e-12 AS no_error, abs((m).trend - 2) < 1e-9 AS trend_2,
       abs((m).level - (100 + 2 * 69)) < 1e-9 AS level_ok
FROM (SELECT holt_winters(day, value, 7, 0.5, 0.4, 0.3, 1) AS m FROM clean) x;
SELECT count(*) AS days,
       max(abs(f.yhat - (100 + 2 * t + (ARRAY[10, -5, 0, 3, -8, 4, -4])[(t % 7) + 1]))) < 1e-8 AS exact,
       min(f.ts) AS first_day, max(f.ts) AS last_day,
       bool_and(f.lo <= f.yhat AND f.yhat <= f.hi) AS ordered
FROM forecast((SELECT holt_winters(day, value, 7, 0.5, 0.4, 0.3, 1) FROM clean), 21) f,
     LATERAL (SELECT f.ts - '2025-01-06'::date AS t) tt;

-- 2. a noisy series with gaps and duplicate days, fed in random order, with
-- parameters given: equal to the reference on the dense daily sums
SELECT setseed(0.42);
CREATE TEMP TABLE noisy AS
SELECT '2025-03-01'::date + t AS day,
       round((500 + 3 * t + 80 * sin(t * 2 * pi() / 7) + 60 * (random() - 0.5))::numeric, 2)::float8 AS value
FROM generate_series(0, 119) t;
-- a few days without rows (must count as 0) and some days split into two rows
CREATE TEMP TABLE noisy_rows AS
SELECT day, value FROM noisy WHERE day NOT IN ('2025-04-01', '2025-05-14', '2025-05-17')
  AND (day - '2025-03-01') % 5 <> 0
UNION ALL
SELECT day, value * 0.25 FROM noisy WHERE (day - '2025-03-01') % 5 = 0
UNION ALL
SELECT day, value * 0.75 FROM noisy WHERE (day - '2025-03-01') % 5 = 0
UNION ALL
SELECT '2025-04-10', NULL      -- a NULL value closes its day
UNION ALL
SELECT NULL, 1000;             -- a row without a day is not an observation
CREATE TEMP TABLE dense AS
SELECT array_agg(CASE WHEN day IN ('2025-04-01', '2025-05-14', '2025-05-17') THEN 0
                      WHEN day = '2025-04-10' THEN NULL ELSE value END ORDER BY day) AS y
FROM noisy;
CREATE TEMP TABLE given AS
SELECT holt_winters(day, value, 7, 0.3, 0.1, 0.2, 0.9 ORDER BY random()) AS m FROM noisy_rows;
SELECT (g.m).alpha, (g.m).beta, (g.m).gamma, (g.m).phi, (g.m).n, (g.m).seasonality,
       abs((g.m).level - r.level) < 1e-7 AS level_same,
       abs((g.m).trend - r.trend) < 1e-9 AS trend_same,
       abs((g.m).sse - r.sse) < 1e-6 * r.sse AS sse_same,
       (SELECT max(abs(a - b)) FROM unnest((g.m).seasonals, r.seasonals) AS u(a, b)) < 1e-7 AS seasonals_same,
       -- one closed day: 112 one-step errors after the first week
       abs((g.m).residual_sd - sqrt(r.sse / (120 - 7 - 1))) < 1e-9 AS sd_same
FROM given g, dense d, LATERAL pg_temp.hw_ref(d.y, 7, 0.3, 0.1, 0.2, 0.9) r;

-- the forecast: point = level + (phi + .. + phi^h) trend + seasonal;
-- interval from the ETS(A,Ad,A) variance, computed here from its definition
SELECT count(*) AS days,
       max(abs(f.yhat - ((g.m).level + 0.9 * (1 - 0.9 ^ h) / 0.1 * (g.m).trend + (g.m).seasonals[((h - 1) % 7) + 1]))) < 1e-9 AS points_ok,
       max(abs((f.hi - f.lo) / 2 - 1.959963984540054 * (g.m).residual_sd *
               sqrt(1 + (SELECT COALESCE(sum(power(0.3 + 0.3 * 0.1 * (0.9 * (1 - 0.9 ^ j) / 0.1)
                                                   + CASE WHEN j % 7 = 0 THEN 0.7 * 0.2 ELSE 0 END, 2)), 0)
                         FROM generate_series(1, h - 1) j)))) < 1e-6 AS intervals_ok
FROM given g, LATERAL forecast(g.m, 28) f, LATERAL (SELECT f.ts - (g.m).last_ts AS h) hh;
-- 80% intervals are narrower, same centre
SELECT bool_and(f80.hi - f80.lo < f95.hi - f95.lo AND abs(f80.yhat - f95.yhat) < 1e-9) AS narrower
FROM given g, LATERAL forecast(g.m, 14, 0.8) f80 JOIN LATERAL forecast(g.m, 14) f95 ON f95.ts = f80.ts;
SELECT round(normal_quantile(0.975)::numeric, 9) AS z975, round(normal_quantile(0.5)::numeric, 9) AS z50,
       round(normal_quantile(0.001)::numeric, 6) AS z001;

-- 3. fitted parameters: at least as good (one-step SSE) as every point of
-- a grid, and the fit with given parameters is what the grid says
CREATE TEMP TABLE fitted AS SELECT holt_winters(day, value) AS m FROM noisy_rows;
SELECT (f.m).alpha BETWEEN 0 AND 1 AND (f.m).beta BETWEEN 0 AND 1 AND (f.m).gamma BETWEEN 0 AND 1
       AND (f.m).phi BETWEEN 0.8 AND 1 AS in_bounds,
       (f.m).sse <= (SELECT min(r.sse)
                     FROM generate_series(0.05, 0.95, 0.15) a, generate_series(0.0, 0.5, 0.1) b,
                          generate_series(0.0, 0.9, 0.15) g, unnest(ARRAY[0.85, 0.95, 0.999]) phi, dense d,
                          LATERAL pg_temp.hw_ref(d.y, 7, a, b, g, phi) r) AS beats_grid
FROM fitted f;
-- only the NULL parameters are fitted
SELECT (m).alpha = 0.5 AS alpha_kept, (m).beta <> 0.5 AS beta_fitted, (m).gamma = 0.25 AS gamma_kept,
       (m).phi = 1 AS phi_kept
FROM (SELECT holt_winters(day, value, 7, 0.5, NULL, 0.25, 1) AS m FROM noisy_rows) x;
-- another period
SELECT (m).period, array_length((m).seasonals, 1) AS terms
FROM (SELECT holt_winters(day, value, 3) AS m FROM noisy_rows) x;

-- 3b. multiplicative seasonality: a shop growing from 200 to 680 a day
-- whose weekly swing grows with it (Sunday at 0.6 of the level, Saturday
-- at 1.4), with noise, Fridays closed: with given parameters the
-- multiplicative recursions exactly; fitted, the factors are chosen (the
-- smaller one-step error) and forecast (level + damped trend) x factor,
-- with the ETS(A,Ad,M) intervals computed here from their definition
SELECT setseed(0.17);
CREATE TEMP TABLE growing AS
SELECT '2025-01-06'::date + t AS day,
       CASE WHEN t % 7 = 4 THEN NULL
            ELSE (200 + 4 * t) * (ARRAY[1.2, 0.9, 1.0, 1.1, 1, 1.4, 0.6])[(t % 7) + 1] * (1 + 0.1 * (random() - 0.5)) END AS value
FROM generate_series(0, 119) t;
CREATE TEMP TABLE growing_y AS SELECT array_agg(value ORDER BY day) AS y FROM growing;
SELECT (g.m).seasonality,
       abs((g.m).level - r.level) < 1e-7 * r.level AS level_same,
       abs((g.m).trend - r.trend) < 1e-7 AS trend_same,
       abs((g.m).sse - r.sse) < 1e-6 * r.sse AS sse_same,
       (SELECT max(abs(a - b)) FROM unnest((g.m).seasonals, r.seasonals) AS u(a, b)) < 1e-9 AS seasonals_same
FROM (SELECT holt_winters(day, value, 7, 0.2, 0.05, 0.1, 0.95) AS m FROM growing) g, growing_y d,
     LATERAL pg_temp.hw_ref(d.y, 7, 0.2, 0.05, 0.1, 0.95, true) r;
CREATE TEMP TABLE growing_fit AS SELECT holt_winters(day, value) AS m FROM growing;
SELECT (f.m).seasonality,
       -- the additive model of the same series, at its own best, errs more
       (f.m).sse < (SELECT min(r.sse)
                    FROM generate_series(0.05, 0.95, 0.15) a, generate_series(0.0, 0.3, 0.1) b,
                         generate_series(0.0, 0.9, 0.15) g, unnest(ARRAY[0.9, 0.999]) phi, growing_y d,
                         LATERAL pg_temp.hw_ref(d.y, 7, a, b, g, phi) r) AS beats_additive_grid,
       (SELECT string_agg(round(x::numeric, 1)::text, ' ' ORDER BY o)
        FROM unnest((f.m).seasonals) WITH ORDINALITY u(x, o)) AS factors_from_tuesday
FROM growing_fit f;
SELECT count(*) AS days,
       max(abs(f.yhat - ((g.m).level + (g.m).phi * (1 - (g.m).phi ^ h) / (1 - (g.m).phi) * (g.m).trend)
                        * (g.m).seasonals[((h - 1) % 7) + 1])) < 1e-6 AS points_ok,
       max(abs((f.hi - f.lo) / 2 - 1.959963984540054 * (g.m).residual_sd *
               sqrt(1 + (SELECT COALESCE(sum(power(((g.m).alpha + (g.m).alpha * (g.m).beta * (g.m).phi * (1 - (g.m).phi ^ j) / (1 - (g.m).phi))
                                                   * (g.m).seasonals[((h - 1) % 7) + 1] / (g.m).seasonals[((h - j - 1) % 7) + 1]
                                                   + CASE WHEN j % 7 = 0 THEN (1 - (g.m).alpha) * (g.m).gamma ELSE 0 END, 2)), 0)
                         FROM generate_series(1, h - 1) j)))) < 1e-6 AS intervals_ok
FROM growing_fit g, LATERAL forecast(g.m, 28) f, LATERAL (SELECT f.ts - (g.m).last_ts AS h) hh
WHERE (g.m).phi < 1;
-- Saturday's interval is wider than Sunday's: the errors scale with the factor
SELECT f6.hi - f6.lo > f7.hi - f7.lo AS saturday_wider
FROM growing_fit g, LATERAL forecast(g.m, 21) f6, LATERAL forecast(g.m, 21) f7
WHERE f6.ts = '2025-05-10' AND f7.ts = '2025-05-11';
-- factors only describe a series positive on every open day: one open day
-- at 0 keeps the model additive
SELECT (holt_winters(day, CASE WHEN day = '2025-03-05' THEN 0 ELSE value END)).seasonality AS with_a_zero_day
FROM growing;

-- 4. edges: too short (fewer than two periods) or empty gives NULL
SELECT holt_winters(day, value) IS NULL AS short_is_null FROM clean WHERE day < '2025-01-19';
SELECT holt_winters(day, value) IS NULL AS empty_is_null FROM clean WHERE false;
SELECT count(*) AS rows_for_zero_horizon FROM forecast((SELECT holt_winters(day, value) FROM clean), 0);
SELECT count(*) AS rows_for_null_model FROM forecast(NULL, 5);

-- errors name the argument
\set VERBOSITY terse
SELECT holt_winters(day, value, 1) FROM clean;
SELECT holt_winters(day, value, 7, 1.5, NULL, NULL) FROM clean;
SELECT holt_winters(day, value, 7, NULL, NULL, NULL, 0.5) FROM clean;
SELECT holt_winters(day, 'infinity'::float8) FROM clean;
SELECT holt_winters('infinity'::date, 1) FROM clean;
SELECT * FROM forecast((SELECT holt_winters(day, value) FROM clean), -1);
SELECT * FROM forecast((SELECT holt_winters(day, value) FROM clean), 5, 1.0);
SELECT * FROM forecast(ROW(7, 0.1, 0.1, 0.1, 1, 1, 0, '{1,2,3}', 0, 10, '2025-01-01', '2025-01-10', 1, 'additive')::hw_model, 5);
SELECT * FROM forecast(ROW(3, 0.1, 0.1, 0.1, 1, 1, 0, '{1,2,3}', 0, 10, '2025-01-01', '2025-01-10', 1, 'cubic')::hw_model, 5);
SELECT * FROM forecast(ROW(3, 0.1, 0.1, 0.1, 1, 1, 0, '{1,0,3}', 0, 10, '2025-01-01', '2025-01-10', 1, 'multiplicative')::hw_model, 5);
-- a model without a seasonality is additive
SELECT round(yhat::numeric, 6) AS yhat FROM forecast(ROW(3, 0.1, 0.1, 0.1, 1, 1, 0, '{1,0,3}', 0, 10, '2025-01-01', '2025-01-10', 1, NULL)::hw_model, 3);
SELECT normal_quantile(1);
SELECT * FROM sales_forecast_backtest(holdout => 0);
\set VERBOSITY default

-- 5. on the star schema: the sample shop
-- start from an empty star schema (earlier tests leave theirs)
CALL pg_temp.reset_warehouse();
SELECT count(*) > 0 AS generated FROM generate_sample_data(customers => 8000, days => 130, seed => 42, events => false);
SELECT count(*) > 0 AS transformed FROM transform();
-- the daily series come from the sales rollup
SELECT refresh_sales_rollup() > 0 AS rolled_up;

-- the daily series: dense, 0 on days without sales, totals match the facts
SELECT scope, count(*) AS days, count(DISTINCT category) AS series,
       round(sum(revenue)::numeric, 2) = (SELECT sum(revenue) FROM fact_order_line WHERE status = 'completed') AS total_ok
FROM sales_series('2025-01-01', '2025-05-10') GROUP BY scope ORDER BY scope;
SELECT bool_and(s.revenue = COALESCE(x.revenue, 0)) AS categories_ok
FROM sales_series('2025-01-01', '2025-05-10') s
LEFT JOIN (SELECT p.category, d.date, sum(f.revenue)::float8 AS revenue
           FROM fact_order_line f JOIN dim_product p USING (product_key) JOIN dim_date d USING (date_key)
           WHERE f.status = 'completed' GROUP BY 1, 2) x ON x.category = s.category AND x.date = s.day
WHERE s.scope = 'category';
SELECT sales_training_start(), sales_training_end();

-- backtest over the last 28 days: Holt-Winters beats seasonal naive on the
-- total (figures for three seeds at 10,000 customers are in the README)
SELECT scope, category, trained_through, holdout_days, scored_days,
       mape_holt_winters < mape_seasonal_naive AS hw_better,
       abs(improvement - (1 - mape_holt_winters / mape_seasonal_naive)) < 1e-12 AS improvement_ok
FROM sales_forecast_backtest() WHERE scope = 'total';
-- the seasonal-naive error, recomputed here from its definition
SELECT abs(b.mape_seasonal_naive -
           (SELECT 100 * avg(abs(a.revenue - n.revenue) / a.revenue)
            FROM sales_series('2025-01-01', '2025-05-10') a
            JOIN sales_series('2025-01-01', '2025-05-10') n
              ON n.scope = a.scope AND n.category = a.category
             AND n.day = '2025-04-12'::date - 6 + ((a.day - '2025-04-12'::date - 1) % 7)
            WHERE a.scope = 'total' AND a.day > '2025-04-12' AND a.revenue > 0)) < 1e-9 AS naive_ok
FROM sales_forecast_backtest() b WHERE b.scope = 'total';

-- the views, refreshed with the shop's data ending on 2025-05-10
REFRESH MATERIALIZED VIEW sales_forecast;
REFRESH MATERIALIZED VIEW sales_forecast_accuracy;
SELECT scope, count(*) AS days, min(day) AS first_day, max(day) AS last_day,
       bool_and(trained_through = '2025-05-10') AS trained_ok,
       bool_and(revenue_lo < revenue AND revenue < revenue_hi) AS intervals_ok
FROM sales_forecast GROUP BY scope ORDER BY scope;
SELECT count(*) AS series, count(*) FILTER (WHERE mape_holt_winters IS NOT NULL) AS scored
FROM sales_forecast_accuracy;

-- 6. forecast misses: forecast from three days before a planted drop, then
-- compare with what happened
SELECT series AS drop_series, day AS drop_day
FROM sample_anomaly WHERE seed = 42 AND kind = 'drop' AND day > '2025-03-15'
ORDER BY day DESC LIMIT 1 \gset
SELECT set_config('customer_analytics.as_of', (:'drop_day'::date - 3)::text, false) IS NOT NULL AS as_of_set;
REFRESH MATERIALIZED VIEW sales_forecast;
SELECT min(day) = :'drop_day'::date - 3 AS forecast_starts_ok FROM sales_forecast;
RESET customer_analytics.as_of;
CREATE TEMP TABLE misses AS SELECT * FROM alert_forecast_misses();
-- the planted drop is caught, with its size
SELECT m.category = CASE WHEN :'drop_series' = 'total' THEN '(all)' ELSE :'drop_series' END AS planted_series,
       m.day, m.miss > 0 AS below_bound, abs(m.miss - (m.lower_bound - m.actual)) < 1e-9 AS miss_ok
FROM misses m
WHERE m.day = :'drop_day'::date
  AND m.category = CASE WHEN :'drop_series' = 'total' THEN '(all)' ELSE :'drop_series' END;
SELECT category, day, round(actual::numeric) AS actual, round(lower_bound::numeric) AS lower_bound FROM misses ORDER BY day, category;
-- one alert per miss, with the figures in its details
SELECT count(*) = (SELECT count(*) FROM misses) AS one_alert_each,
       bool_and(a.subject = m.category AND (a.details->>'day')::date = m.day
                AND (a.details->>'miss')::numeric = round(m.miss::numeric, 2)
                AND (a.details->>'actual')::numeric = round(m.actual::numeric, 2)) AS details_ok
FROM alert a JOIN misses m ON m.alert_id = a.alert_id
WHERE a.kind = 'forecast_miss';
-- actual below the bound, recomputed from the facts for every day forecast
SELECT count(*) = (SELECT count(*) FROM misses) AS all_misses_found
FROM sales_forecast f
JOIN sales_series(:'drop_day'::date - 3, '2025-05-10') s USING (scope, category, day)
WHERE s.revenue < f.revenue_lo;
-- a second call raises nothing new
SELECT count(*) AS raised_again FROM alert_forecast_misses();

-- the pipeline step refreshes everything (the forecast now starts after the data)
SELECT refresh_forecasts() AS alerts;
SELECT min(day) AS forecast_from FROM sales_forecast;
