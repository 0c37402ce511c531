/*
 * Forecasting and customer lifetime value (src/forecast.c, src/clv.c).
 *
 * Sales: Holt-Winters (damped additive trend, weekly seasonality added to or
 * multiplying the level) fitted per
 * series by the holt_winters() aggregate; sales_forecast holds the next
 * 28 days of completed revenue overall and per category, and
 * sales_forecast_accuracy the backtest of the same models on the last 28
 * days they were trained on, against the seasonal-naive forecast.
 * alert_forecast_misses() raises an alert for every day and series whose
 * actual revenue fell below the forecast's lower bound.
 *
 * Customers: BG/NBD (repeat purchases, probability alive) and Gamma-Gamma
 * (spend per purchase), fitted by maximum likelihood on every customer's
 * purchase history; customer_clv holds each customer's expected purchases
 * and value over the next 90 days.
 */

/* ---------------- Holt-Winters ---------------- */

CREATE TYPE customer_analytics.hw_model AS (
    period      integer,
    alpha       float8,
    beta        float8,
    gamma       float8,
    phi         float8,
    level       float8,
    trend       float8,
    seasonals   float8[],
    sse         float8,
    n           integer,
    first_ts    date,
    last_ts     date,
    residual_sd float8,
    seasonality text
);
COMMENT ON TYPE customer_analytics.hw_model IS
    'A fitted Holt-Winters model of a daily series: period, smoothing parameters alpha (level), beta (trend), gamma (season), trend damping phi (1 = undamped), the final level and trend (per day), seasonals[k] = seasonal term of day last_ts + k (k = 1 .. period), sum of squared one-step errors after the first period (sse), days in the series (n), its first and last day, the residual standard deviation sqrt(sse / the open days after the first period), and seasonality: additive (the seasonal terms are added to the level) or multiplicative (they are factors of it)';

CREATE FUNCTION customer_analytics.holt_winters_sfunc(internal, date, float8)
    RETURNS internal AS 'MODULE_PATHNAME', 'ca_hw_sfunc' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION customer_analytics.holt_winters_sfunc(internal, date, float8, integer)
    RETURNS internal AS 'MODULE_PATHNAME', 'ca_hw_sfunc' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION customer_analytics.holt_winters_sfunc(internal, date, float8, integer, float8, float8, float8)
    RETURNS internal AS 'MODULE_PATHNAME', 'ca_hw_sfunc' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION customer_analytics.holt_winters_sfunc(internal, date, float8, integer, float8, float8, float8, float8)
    RETURNS internal AS 'MODULE_PATHNAME', 'ca_hw_sfunc' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION customer_analytics.holt_winters_final(internal)
    RETURNS customer_analytics.hw_model AS 'MODULE_PATHNAME', 'ca_hw_final' LANGUAGE C IMMUTABLE PARALLEL SAFE;

CREATE AGGREGATE customer_analytics.holt_winters(day date, value float8) (
    SFUNC = customer_analytics.holt_winters_sfunc,
    STYPE = internal,
    FINALFUNC = customer_analytics.holt_winters_final,
    FINALFUNC_MODIFY = READ_WRITE,
    PARALLEL = SAFE
);
CREATE AGGREGATE customer_analytics.holt_winters(day date, value float8, period integer) (
    SFUNC = customer_analytics.holt_winters_sfunc,
    STYPE = internal,
    FINALFUNC = customer_analytics.holt_winters_final,
    FINALFUNC_MODIFY = READ_WRITE,
    PARALLEL = SAFE
);
CREATE AGGREGATE customer_analytics.holt_winters(day date, value float8, period integer,
                                                 alpha float8, beta float8, gamma float8) (
    SFUNC = customer_analytics.holt_winters_sfunc,
    STYPE = internal,
    FINALFUNC = customer_analytics.holt_winters_final,
    FINALFUNC_MODIFY = READ_WRITE,
    PARALLEL = SAFE
);
CREATE AGGREGATE customer_analytics.holt_winters(day date, value float8, period integer,
                                                 alpha float8, beta float8, gamma float8, phi float8) (
    SFUNC = customer_analytics.holt_winters_sfunc,
    STYPE = internal,
    FINALFUNC = customer_analytics.holt_winters_final,
    FINALFUNC_MODIFY = READ_WRITE,
    PARALLEL = SAFE
);
COMMENT ON AGGREGATE customer_analytics.holt_winters(date, float8) IS
    'Holt-Winters model (damped additive trend, weekly seasonality) of a daily series, rows in any order: values of the same day are summed, a day without rows counts as 0, a NULL value closes its day (no observation: the state runs over it unchanged), a NULL day is skipped; alpha, beta, gamma in [0, 1] and the damping phi in [0.8, 1] fitted by minimising the one-step squared error (Nelder-Mead); the seasonality additive or, for a series positive on every open day, multiplicative when that fits with the smaller one-step error. NULL when the series spans fewer than two periods, or its first or second period is closed throughout';
COMMENT ON AGGREGATE customer_analytics.holt_winters(date, float8, integer) IS
    'Holt-Winters model of a daily series with the given seasonal period in days (2 .. 366; taken from the first row); see holt_winters(date, float8)';
COMMENT ON AGGREGATE customer_analytics.holt_winters(date, float8, integer, float8, float8, float8) IS
    'Holt-Winters model with smoothing parameters alpha, beta, gamma in [0, 1] given (taken from the first row); a NULL parameter is fitted, and so is the damping phi. See holt_winters(date, float8)';
COMMENT ON AGGREGATE customer_analytics.holt_winters(date, float8, integer, float8, float8, float8, float8) IS
    'Holt-Winters model with smoothing parameters alpha, beta, gamma in [0, 1] and trend damping phi in [0.8, 1] given (taken from the first row; phi = 1 is the classic undamped model); a NULL parameter is fitted. See holt_winters(date, float8)';

CREATE FUNCTION customer_analytics.forecast(model customer_analytics.hw_model, horizon integer,
                                            level float8 DEFAULT 0.95)
    RETURNS TABLE (ts date, yhat float8, lo float8, hi float8)
    AS 'MODULE_PATHNAME', 'ca_hw_forecast'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE ROWS 28;
COMMENT ON FUNCTION customer_analytics.forecast(customer_analytics.hw_model, integer, float8) IS
    'The next horizon days after the model''s last day: point forecast yhat and a prediction interval [lo, hi] at the given level (approximation: normal errors with the in-sample residual standard deviation and the analytic h-step variance of additive damped Holt-Winters, ETS(A,Ad,A), or for a multiplicative model that of ETS(A,Ad,M) with its seasonal factors taken as known, ignoring the uncertainty of the fitted parameters; not clipped at 0)';

CREATE FUNCTION customer_analytics.normal_quantile(p float8)
    RETURNS float8 AS 'MODULE_PATHNAME', 'ca_normal_quantile'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.normal_quantile(float8) IS
    'Quantile of the standard normal distribution (Acklam''s approximation, relative error < 1.2e-9), as used for forecast intervals';

/* ---------------- Sales series and forecasts ---------------- */

CREATE FUNCTION customer_analytics.sales_series(first_day date, last_day date)
RETURNS TABLE (scope text, category text, day date, revenue float8)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    -- from the sales rollup (refresh_sales_rollup() keeps it current),
    -- not from the order lines: a row per day and category
    WITH lines AS (
        SELECT r.day, r.category, r.revenue
        FROM customer_analytics.sales_rollup_category r
        WHERE r.day BETWEEN first_day AND last_day
    ),
    series AS (
        SELECT 'total' AS scope, '(all)' AS category
        WHERE EXISTS (SELECT FROM lines)
        UNION ALL
        SELECT DISTINCT 'category', l.category FROM lines l
    ),
    filled AS (
        SELECT 'total' AS scope, '(all)' AS category, l.day, l.revenue FROM lines l
        UNION ALL
        SELECT 'category', l.category, l.day, l.revenue FROM lines l
        UNION ALL
        -- every day of every series, so that a day without sales is a 0
        SELECT s.scope, s.category, g.day::date, 0
        FROM series s CROSS JOIN generate_series(first_day, last_day, interval '1 day') AS g(day)
    )
    SELECT x.scope, x.category, x.day, sum(x.revenue)::float8
    FROM filled x
    GROUP BY x.scope, x.category, x.day
$$;
COMMENT ON FUNCTION customer_analytics.sales_series(date, date) IS
    'Daily revenue of completed order lines from first_day to last_day, one row per day (0 on days without sales): the total (scope ''total'', category ''(all)'') and each category that sold in the period (scope ''category'')';

CREATE FUNCTION customer_analytics.sales_training_end()
RETURNS date
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    -- the newest line through the order_ts index: its day is its date_key's
    SELECT LEAST((customer_analytics.reference_time() AT TIME ZONE customer_analytics.business_timezone())::date - 1,
                 (SELECT (max(f.order_ts) AT TIME ZONE customer_analytics.business_timezone())::date
                  FROM customer_analytics.fact_order_line f),
                 customer_analytics.day_in_progress() - 1)
$$;
COMMENT ON FUNCTION customer_analytics.sales_training_end() IS
    'Last complete day of sales: the day before reference_time() (setting customer_analytics.as_of, else the end of the data) in the business time zone, or the last day with order lines if that is earlier, never the day in progress (day_in_progress())';

CREATE FUNCTION customer_analytics.sales_training_start()
RETURNS date
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (min(f.order_ts) AT TIME ZONE customer_analytics.business_timezone())::date
    FROM customer_analytics.fact_order_line f
    WHERE f.status = 'completed'
$$;
COMMENT ON FUNCTION customer_analytics.sales_training_start() IS
    'First day with completed sales: where the forecast models'' history starts';

CREATE FUNCTION customer_analytics.sales_forecast_backtest(
    last_day date DEFAULT NULL, holdout integer DEFAULT 28, first_day date DEFAULT NULL)
RETURNS TABLE (scope text, category text, trained_through date, holdout_days integer,
               scored_days integer, mape_holt_winters float8, mape_seasonal_naive float8,
               improvement float8, alpha float8, beta float8, gamma float8)
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lo date := COALESCE(first_day, customer_analytics.sales_training_start());
    hi date := COALESCE(last_day, customer_analytics.sales_training_end());
BEGIN
    IF holdout IS NULL OR holdout < 1 THEN
        RAISE EXCEPTION 'holdout must be at least 1 day, not %', holdout
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH s AS (
        SELECT * FROM customer_analytics.sales_series(lo, hi)
    ),
    closed AS MATERIALIZED (
        SELECT c.day FROM customer_analytics.closed_days(lo, hi) c
    ),
    -- fitted on open days (a closed day is NULL: no observation)
    m AS (
        SELECT s.scope, s.category,
               customer_analytics.holt_winters(s.day, CASE WHEN s.day NOT IN (SELECT c.day FROM closed c) THEN s.revenue END)
                   AS model
        FROM s WHERE s.day <= hi - holdout
        GROUP BY s.scope, s.category
    ),
    scored AS (
        SELECT m.scope, m.category, (m.model).last_ts, (m.model).alpha, (m.model).beta,
               (m.model).gamma, a.revenue AS actual,
               CASE WHEN f.ts IN (SELECT c.day FROM closed c) THEN 0 ELSE f.yhat END AS yhat,
               -- seasonal naive: the same weekday in the last week of training
               (SELECT n.revenue FROM s n
                WHERE n.scope = m.scope AND n.category = m.category
                  AND n.day = (m.model).last_ts - 7 + 1 + ((f.ts - (m.model).last_ts - 1) % 7)) AS naive
        FROM m
        CROSS JOIN LATERAL customer_analytics.forecast(m.model, holdout) f
        JOIN s a ON a.scope = m.scope AND a.category = m.category AND a.day = f.ts
        WHERE m.model IS NOT NULL
    )
    SELECT sc.scope, sc.category, min(sc.last_ts), holdout,
           count(*) FILTER (WHERE sc.actual > 0)::integer,
           100 * avg(abs(sc.actual - sc.yhat) / sc.actual) FILTER (WHERE sc.actual > 0),
           100 * avg(abs(sc.actual - sc.naive) / sc.actual) FILTER (WHERE sc.actual > 0),
           1 - avg(abs(sc.actual - sc.yhat) / sc.actual) FILTER (WHERE sc.actual > 0)
               / NULLIF(avg(abs(sc.actual - sc.naive) / sc.actual) FILTER (WHERE sc.actual > 0), 0),
           min(sc.alpha), min(sc.beta), min(sc.gamma)
    FROM scored sc
    GROUP BY sc.scope, sc.category;
END
$$;
COMMENT ON FUNCTION customer_analytics.sales_forecast_backtest(date, integer, date) IS
    'Backtest of the sales forecast: for the total and each category, Holt-Winters is fitted on the open days up to last_day - holdout and forecasts the holdout days (0 on closed days); returns the mean absolute percentage error (in %, over the days with sales) of that forecast and of the seasonal-naive forecast (same weekday of the last training week), and improvement = 1 - mape_holt_winters / mape_seasonal_naive';

CREATE MATERIALIZED VIEW customer_analytics.sales_forecast AS
WITH closed AS MATERIALIZED (
    SELECT c.day FROM customer_analytics.closed_days(customer_analytics.sales_training_start(),
                                                     customer_analytics.sales_training_end() + 28) c
),
-- fitted on open days (a closed day is NULL: no observation)
m AS (
    SELECT s.scope, s.category,
           customer_analytics.holt_winters(s.day, CASE WHEN s.day NOT IN (SELECT c.day FROM closed c) THEN s.revenue END)
               AS model
    FROM customer_analytics.sales_series(customer_analytics.sales_training_start(),
                                         customer_analytics.sales_training_end()) s
    GROUP BY s.scope, s.category
)
SELECT m.scope, m.category, f.ts AS day,
       CASE WHEN x.closed THEN 0 ELSE f.yhat END AS revenue,
       CASE WHEN x.closed THEN 0 ELSE f.lo END AS revenue_lo,
       CASE WHEN x.closed THEN 0 ELSE f.hi END AS revenue_hi,
       (m.model).last_ts AS trained_through, (m.model).alpha, (m.model).beta, (m.model).gamma,
       (m.model).residual_sd
FROM m
CROSS JOIN LATERAL customer_analytics.forecast(m.model, 28, 0.95) f
CROSS JOIN LATERAL (SELECT f.ts IN (SELECT c.day FROM closed c) AS closed) x
WHERE m.model IS NOT NULL;
CREATE UNIQUE INDEX sales_forecast_key_idx ON customer_analytics.sales_forecast (scope, category, day);
COMMENT ON MATERIALIZED VIEW customer_analytics.sales_forecast IS
    'Revenue forecast for the 28 days after sales_training_end(), overall (scope ''total'', category ''(all)'') and per category: Holt-Winters with weekly seasonality fitted on the open days of all history, with a 95% prediction interval [revenue_lo, revenue_hi]; 0 on closed days (closed_days()). Accuracy: sales_forecast_accuracy';

CREATE MATERIALIZED VIEW customer_analytics.sales_forecast_accuracy AS
SELECT * FROM customer_analytics.sales_forecast_backtest(customer_analytics.sales_training_end(), 28);
CREATE UNIQUE INDEX sales_forecast_accuracy_key_idx ON customer_analytics.sales_forecast_accuracy (scope, category);
COMMENT ON MATERIALIZED VIEW customer_analytics.sales_forecast_accuracy IS
    'Backtested error of sales_forecast''s models: the last 28 days before sales_training_end() held out, MAPE of Holt-Winters vs the seasonal-naive forecast per series';

CREATE FUNCTION customer_analytics.alert_forecast_misses()
RETURNS TABLE (alert_id bigint, category text, day date, actual float8, forecast float8,
               lower_bound float8, miss float8)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    done date := customer_analytics.sales_training_end();
    first_day date;
BEGIN
    SELECT min(f.day) INTO first_day FROM customer_analytics.sales_forecast f;
    IF first_day IS NULL OR done IS NULL OR done < first_day THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH actual AS (
        SELECT s.scope, s.category, s.day, s.revenue
        FROM customer_analytics.sales_series(first_day, done) s
    ),
    missed AS (
        SELECT f.scope, f.category, f.day, COALESCE(a.revenue, 0) AS actual,
               f.revenue AS forecast, f.revenue_lo AS lower_bound
        FROM customer_analytics.sales_forecast f
        LEFT JOIN actual a ON a.scope = f.scope AND a.category = f.category AND a.day = f.day
        WHERE f.day <= done AND COALESCE(a.revenue, 0) < f.revenue_lo
          AND f.day NOT IN (SELECT c.day FROM customer_analytics.closed_days(first_day, done) c)
    )
    SELECT r.alert_id, r.category, r.day, r.actual, r.forecast, r.lower_bound, r.miss
    FROM (
        SELECT customer_analytics.raise_alert(
                   'forecast_miss',
                   x.category,
                   jsonb_build_object('day', x.day, 'scope', x.scope, 'category', x.category,
                                      'actual', round(x.actual::numeric, 2),
                                      'forecast', round(x.forecast::numeric, 2),
                                      'lower_bound', round(x.lower_bound::numeric, 2),
                                      'miss', round((x.lower_bound - x.actual)::numeric, 2),
                                      'shortfall_vs_forecast', round((x.forecast - x.actual)::numeric, 2),
                                      'shortfall_pct', round((100 * (x.forecast - x.actual) / NULLIF(x.forecast, 0))::numeric, 1)),
                   'forecast_miss:' || x.scope || ':' || x.category || ':' || x.day,
                   'warn') AS alert_id,
               x.category, x.day, x.actual, x.forecast, x.lower_bound,
               x.lower_bound - x.actual AS miss
        FROM missed x
        ORDER BY x.day, x.scope DESC, x.category
    ) r
    WHERE r.alert_id IS NOT NULL;
END
$$;
COMMENT ON FUNCTION customer_analytics.alert_forecast_misses() IS
    'Compare the complete days of sales since sales_forecast was refreshed with its forecast; every day and series (total or category) whose revenue fell below the lower bound raises one forecast_miss alert (closed days never) (with the actual, the forecast, the bound and the size of the miss). Returns the alerts raised now. Call it after loading, before refreshing sales_forecast';

CREATE FUNCTION customer_analytics.refresh_forecasts()
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    alerts integer;
BEGIN
    PERFORM customer_analytics.refresh_sales_rollup();
    SELECT count(*) INTO alerts FROM customer_analytics.alert_forecast_misses();
    REFRESH MATERIALIZED VIEW customer_analytics.sales_forecast;
    REFRESH MATERIALIZED VIEW customer_analytics.sales_forecast_accuracy;
    REFRESH MATERIALIZED VIEW customer_analytics.clv_model;
    REFRESH MATERIALIZED VIEW customer_analytics.customer_clv;
    RETURN alerts;
END
$$;
COMMENT ON FUNCTION customer_analytics.refresh_forecasts() IS
    'The pipeline step after transform(): raise forecast_miss alerts for the days just loaded (alert_forecast_misses), then refresh sales_forecast, sales_forecast_accuracy, clv_model and customer_clv in that order; returns the number of alerts raised';

-- In the pipeline: compare the new actuals with the forecast the views
-- still hold, before their refresh replaces it (ordinal 35: after the
-- checks, before any refresh).
INSERT INTO customer_analytics.pipeline_task (task, command, depends_on, ordinal, builtin) VALUES
    ('forecast misses', 'SELECT count(*) FROM customer_analytics.alert_forecast_misses()', '{"sales rollup"}', 35, true),
    -- the day in progress, scored as it goes (55_calendar.sql)
    ('intraday alerts', 'SELECT customer_analytics.alert_intraday()', '{transform}', 36, true);
