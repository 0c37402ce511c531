/*
 * Anomaly detection (src/zscore.c): streaming statistics, robust
 * statistics, detect_anomalies(), the sales views it watches, and alerts.
 */

/* stats_agg's result and state: (count, mean, M2), fixed size */
CREATE TYPE customer_analytics.stats;
CREATE FUNCTION customer_analytics.stats_in(cstring) RETURNS customer_analytics.stats
    AS 'MODULE_PATHNAME', 'ca_stats_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION customer_analytics.stats_out(customer_analytics.stats) RETURNS cstring
    AS 'MODULE_PATHNAME', 'ca_stats_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION customer_analytics.stats_recv(internal) RETURNS customer_analytics.stats
    AS 'MODULE_PATHNAME', 'ca_stats_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION customer_analytics.stats_send(customer_analytics.stats) RETURNS bytea
    AS 'MODULE_PATHNAME', 'ca_stats_send' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE TYPE customer_analytics.stats (
    INPUT = customer_analytics.stats_in,
    OUTPUT = customer_analytics.stats_out,
    RECEIVE = customer_analytics.stats_recv,
    SEND = customer_analytics.stats_send,
    INTERNALLENGTH = 32,
    ALIGNMENT = double,
    STORAGE = plain
);
COMMENT ON TYPE customer_analytics.stats IS
    'Summary statistics of a set of values: (count, mean, sum of squared deviations from the mean). Result and state of stats_agg(); read it with count(), mean(), variance(), stddev(), zscore()';

CREATE FUNCTION customer_analytics.stats_sfunc(customer_analytics.stats, float8)
    RETURNS customer_analytics.stats
    AS 'MODULE_PATHNAME', 'ca_stats_sfunc' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION customer_analytics.stats_combine(customer_analytics.stats, customer_analytics.stats)
    RETURNS customer_analytics.stats
    AS 'MODULE_PATHNAME', 'ca_stats_combine' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION customer_analytics.stats_msfunc(internal, float8)
    RETURNS internal
    AS 'MODULE_PATHNAME', 'ca_stats_msfunc' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION customer_analytics.stats_minvfunc(internal, float8)
    RETURNS internal
    AS 'MODULE_PATHNAME', 'ca_stats_minvfunc' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION customer_analytics.stats_mfinal(internal)
    RETURNS customer_analytics.stats
    AS 'MODULE_PATHNAME', 'ca_stats_mfinal' LANGUAGE C IMMUTABLE PARALLEL SAFE;

/*
 * The state type is concrete and fixed-size (passed by reference), so a
 * parallel plan moves partial states between processes as ordinary values:
 * SERIALFUNC/DESERIALFUNC exist only for STYPE = internal and are neither
 * needed nor allowed here.  The moving-aggregate state (window frames) is
 * internal: Welford plus an error bound, never sent anywhere.
 */
CREATE AGGREGATE customer_analytics.stats_agg(float8) (
    SFUNC = customer_analytics.stats_sfunc,
    STYPE = customer_analytics.stats,
    INITCOND = '(0,0,0)',
    COMBINEFUNC = customer_analytics.stats_combine,
    MSFUNC = customer_analytics.stats_msfunc,
    MINVFUNC = customer_analytics.stats_minvfunc,
    MSTYPE = internal,
    MFINALFUNC = customer_analytics.stats_mfinal,
    PARALLEL = SAFE
);
COMMENT ON AGGREGATE customer_analytics.stats_agg(float8) IS
    'Count, mean and spread of the non-NULL values (Welford), as one stats value; count 0 over no values. Parallel safe, state type concrete (Citus can push it down). Over a sliding window frame it costs O(1) per row whatever the frame length, within 1e-10 (relative) of a two-pass computation';

CREATE FUNCTION customer_analytics.stats_count(customer_analytics.stats) RETURNS bigint
    AS 'MODULE_PATHNAME', 'ca_stats_count' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.stats_count(customer_analytics.stats) IS
    'Number of values summarised';
CREATE FUNCTION customer_analytics.stats_mean(customer_analytics.stats) RETURNS float8
    AS 'MODULE_PATHNAME', 'ca_stats_mean' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.stats_mean(customer_analytics.stats) IS
    'Mean of the values; NULL for none';
CREATE FUNCTION customer_analytics.stats_variance(customer_analytics.stats) RETURNS float8
    AS 'MODULE_PATHNAME', 'ca_stats_variance' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.stats_variance(customer_analytics.stats) IS
    'Sample variance of the values (as var_samp); NULL for fewer than two';
CREATE FUNCTION customer_analytics.stats_stddev(customer_analytics.stats) RETURNS float8
    AS 'MODULE_PATHNAME', 'ca_stats_stddev' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.stats_stddev(customer_analytics.stats) IS
    'Sample standard deviation of the values (as stddev_samp); NULL for fewer than two';
CREATE FUNCTION customer_analytics.zscore(x float8, s customer_analytics.stats) RETURNS float8
    AS 'MODULE_PATHNAME', 'ca_zscore' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.zscore(float8, customer_analytics.stats) IS
    '(x - mean) / sample standard deviation; NULL (never an error or infinity) for fewer than two values or a zero spread';

/*
 * median_mad_agg: all the values (kept sorted when used over a window).  The
 * final function may sort the values it is given; that permutes the state
 * without changing what it holds, so it counts as read-only and the
 * aggregate can be used as a window function.
 */
CREATE TYPE customer_analytics.median_mad AS (
    count        bigint,
    median       float8,
    mad          float8,
    mean_abs_dev float8
);
COMMENT ON TYPE customer_analytics.median_mad IS
    'Robust summary of a set of values: count, median, median absolute deviation from the median, mean absolute deviation from the median';

CREATE FUNCTION customer_analytics.median_mad_sfunc(internal, float8) RETURNS internal
    AS 'MODULE_PATHNAME', 'ca_mm_sfunc' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION customer_analytics.median_mad_msfunc(internal, float8) RETURNS internal
    AS 'MODULE_PATHNAME', 'ca_mm_msfunc' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION customer_analytics.median_mad_minvfunc(internal, float8) RETURNS internal
    AS 'MODULE_PATHNAME', 'ca_mm_minvfunc' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION customer_analytics.median_mad_combine(internal, internal) RETURNS internal
    AS 'MODULE_PATHNAME', 'ca_mm_combine' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION customer_analytics.median_mad_serialize(internal) RETURNS bytea
    AS 'MODULE_PATHNAME', 'ca_mm_serialize' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION customer_analytics.median_mad_deserialize(bytea, internal) RETURNS internal
    AS 'MODULE_PATHNAME', 'ca_mm_deserialize' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION customer_analytics.median_mad_final(internal) RETURNS customer_analytics.median_mad
    AS 'MODULE_PATHNAME', 'ca_mm_final' LANGUAGE C IMMUTABLE PARALLEL SAFE;

CREATE AGGREGATE customer_analytics.median_mad_agg(float8) (
    SFUNC = customer_analytics.median_mad_sfunc,
    STYPE = internal,
    FINALFUNC = customer_analytics.median_mad_final,
    COMBINEFUNC = customer_analytics.median_mad_combine,
    SERIALFUNC = customer_analytics.median_mad_serialize,
    DESERIALFUNC = customer_analytics.median_mad_deserialize,
    MSFUNC = customer_analytics.median_mad_msfunc,
    MINVFUNC = customer_analytics.median_mad_minvfunc,
    MSTYPE = internal,
    MFINALFUNC = customer_analytics.median_mad_final,
    PARALLEL = SAFE
);
COMMENT ON AGGREGATE customer_analytics.median_mad_agg(float8) IS
    'Median, median absolute deviation and mean absolute deviation (from the median) of the non-NULL values; count 0 and NULLs over none. Unlike percentile_cont it works as a window function, over sliding frames too (the frame is kept sorted). Parallel safe';

CREATE FUNCTION customer_analytics.robust_zscore(x float8, m customer_analytics.median_mad) RETURNS float8
    AS 'MODULE_PATHNAME', 'ca_robust_zscore' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.robust_zscore(float8, customer_analytics.median_mad) IS
    'Modified z-score of Iglewicz and Hoaglin: 0.6745 (x - median) / MAD; when MAD is 0, (x - median) / (1.253314 mean absolute deviation); NULL when both are 0 or nothing is known';

/* detect_anomalies: over a query, or over a table or view */
CREATE FUNCTION customer_analytics.detect_anomalies(
    query               text,
    method              text    DEFAULT 'seasonal',
    window_size         integer DEFAULT 28,
    threshold           float8  DEFAULT NULL,
    min_history         integer DEFAULT 28,
    direction           text    DEFAULT 'both',
    min_relative_change float8  DEFAULT 0,
    seasons             integer DEFAULT 4,
    scale               text    DEFAULT 'linear')
RETURNS TABLE (series text, ts timestamptz, value float8, expected float8, z float8,
               robust_z float8, direction text, is_anomaly boolean, p_value float8)
AS 'MODULE_PATHNAME', 'ca_detect_anomalies_query_v2'
LANGUAGE C STABLE PARALLEL RESTRICTED;
COMMENT ON FUNCTION customer_analytics.detect_anomalies(text, text, integer, float8, integer, text, float8, integer, text) IS
    'Score every point of the series a query returns (columns: series key, timestamp, value, and optionally the exposure: the fraction of the period observed, 0 = not scored) against a baseline that never includes the point: method trailing (mean and z over the window_size previous points), robust (median and robust z over them), seasonal (the median of the same weekday in the previous seasons weeks, then the z and robust z of the residual over the window; both must pass; on the chosen scale: linear, sqrt or log) or count (whole counts: expected = level of the previous seasons weeks, carried forward by the growth of the window, x weekday profile of the window_size previous periods, two-sided negative binomial tail probability p_value, its variance the baseline''s own uncertainty plus the overdispersion of the window when Pearson''s statistic shows it, Poisson otherwise; z is its normal score). Flags points whose |z| passes threshold (default customer_analytics.zscore_threshold; for the count method p_value <= customer_analytics.anomaly_false_alarms_per_year / points a year, then, at a time where a point is flagged, the other series'' points that moved the same way by Benjamini-Hochberg at customer_analytics.anomaly_same_day_fdr) in the wanted direction (both, spike, drop), after min_history earlier points, when they differ from the expected value by at least min_relative_change of it';

CREATE FUNCTION customer_analytics.detect_anomalies(
    source              regclass,
    series_column       text,
    ts_column           text,
    value_column        text,
    method              text    DEFAULT 'seasonal',
    window_size         integer DEFAULT 28,
    threshold           float8  DEFAULT NULL,
    min_history         integer DEFAULT 28,
    direction           text    DEFAULT 'both',
    min_relative_change float8  DEFAULT 0,
    seasons             integer DEFAULT 4,
    scale               text    DEFAULT 'linear',
    exposure_column     text    DEFAULT NULL)
RETURNS TABLE (series text, ts timestamptz, value float8, expected float8, z float8,
               robust_z float8, direction text, is_anomaly boolean, p_value float8)
AS 'MODULE_PATHNAME', 'ca_detect_anomalies_table_v2'
LANGUAGE C STABLE PARALLEL RESTRICTED;
COMMENT ON FUNCTION customer_analytics.detect_anomalies(regclass, text, text, text, text, integer, float8, integer, text, float8, integer, text, text) IS
    'detect_anomalies() over a table or view: name its series key, timestamp and value columns (and optionally the exposure column)';

/* Views on the star schema */

/*
 * Incremental maintenance.  Aggregating the whole fact table for every
 * refresh costs time proportional to history; a day's figures only change
 * when its order lines do.  Triggers on fact_order_line (and on a product's
 * category) note the days touched in sales_dirty_day; refresh_sales_rollup()
 * recomputes just those days into two small rollup tables, and the views
 * below are rebuilt from the rollups (a row per day and category), not from
 * the facts.
 */
CREATE TABLE customer_analytics.sales_rollup_day (
    day       date PRIMARY KEY,
    revenue   numeric NOT NULL,
    orders    bigint NOT NULL,
    customers bigint NOT NULL
);
COMMENT ON TABLE customer_analytics.sales_rollup_day IS
    'Completed sales per day with at least one completed line (revenue, distinct orders, distinct known customers), kept incrementally by refresh_sales_rollup(); derived data, rebuilt with refresh_sales_rollup(true)';

CREATE TABLE customer_analytics.sales_rollup_category (
    day      date NOT NULL,
    category text NOT NULL,
    revenue  numeric NOT NULL,
    orders   bigint NOT NULL,
    units    bigint NOT NULL,
    PRIMARY KEY (day, category)
);
COMMENT ON TABLE customer_analytics.sales_rollup_category IS
    'Completed sales per day and product category (revenue, orders with a line in the category, units), kept incrementally by refresh_sales_rollup()';

CREATE TABLE customer_analytics_internal.sales_dirty_day (
    day date PRIMARY KEY
);
COMMENT ON TABLE customer_analytics_internal.sales_dirty_day IS
    'Days whose order lines changed since the last refresh_sales_rollup() (-infinity: everything, after a TRUNCATE)';

CREATE FUNCTION customer_analytics_internal.note_dirty_sales_days()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO customer_analytics_internal.sales_dirty_day VALUES ('-infinity') ON CONFLICT DO NOTHING;
    ELSIF TG_TABLE_NAME = 'dim_product' THEN
        -- a product moved to another category: every day it sold on
        INSERT INTO customer_analytics_internal.sales_dirty_day
        SELECT DISTINCT d.date
        FROM old_rows o JOIN new_rows n USING (product_key)
        JOIN customer_analytics.fact_order_line f ON f.product_key = n.product_key
        JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
        WHERE o.category IS DISTINCT FROM n.category
        ON CONFLICT DO NOTHING;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO customer_analytics_internal.sales_dirty_day
        SELECT DISTINCT d.date FROM new_rows r JOIN customer_analytics.dim_date d USING (date_key)
        ON CONFLICT DO NOTHING;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO customer_analytics_internal.sales_dirty_day
        SELECT DISTINCT d.date FROM old_rows r JOIN customer_analytics.dim_date d USING (date_key)
        ON CONFLICT DO NOTHING;
    ELSE
        INSERT INTO customer_analytics_internal.sales_dirty_day
        SELECT DISTINCT d.date
        FROM (SELECT date_key FROM old_rows UNION SELECT date_key FROM new_rows) r
        JOIN customer_analytics.dim_date d USING (date_key)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.note_dirty_sales_days() IS
    'Statement trigger: notes in sales_dirty_day the days whose sales changed';

CREATE TRIGGER fact_order_line_dirty_days_ins AFTER INSERT ON customer_analytics.fact_order_line
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_sales_days();
CREATE TRIGGER fact_order_line_dirty_days_upd AFTER UPDATE ON customer_analytics.fact_order_line
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_sales_days();
CREATE TRIGGER fact_order_line_dirty_days_del AFTER DELETE ON customer_analytics.fact_order_line
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_sales_days();
CREATE TRIGGER fact_order_line_dirty_days_trunc AFTER TRUNCATE ON customer_analytics.fact_order_line
    FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_sales_days();
CREATE TRIGGER dim_product_dirty_days AFTER UPDATE ON customer_analytics.dim_product
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_sales_days();

CREATE FUNCTION customer_analytics.refresh_sales_rollup(full_refresh boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    days date[];
    keys integer[];
BEGIN
    -- one maintainer at a time; readers of the rollups never wait
    PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('refresh_sales_rollup()'));
    -- take the noted days (days noted by transactions still running stay for next time)
    WITH taken AS (DELETE FROM customer_analytics_internal.sales_dirty_day RETURNING day)
    SELECT array_agg(day) INTO days FROM taken;
    IF full_refresh OR '-infinity' = ANY (days)
       OR (NOT EXISTS (SELECT FROM customer_analytics.sales_rollup_day)
           AND EXISTS (SELECT FROM customer_analytics.fact_order_line)) THEN
        DELETE FROM customer_analytics.sales_rollup_day;
        DELETE FROM customer_analytics.sales_rollup_category;
        keys := NULL;                   -- every day
    ELSIF days IS NULL THEN
        RETURN 0;
    ELSE
        keys := ARRAY(SELECT customer_analytics.date_key(d) FROM unnest(days) d);
        DELETE FROM customer_analytics.sales_rollup_day WHERE day = ANY (days);
        DELETE FROM customer_analytics.sales_rollup_category WHERE day = ANY (days);
    END IF;

    INSERT INTO customer_analytics.sales_rollup_day (day, revenue, orders, customers)
    -- credit notes (negative quantity) net against revenue but are no
    -- orders, and their customers did not buy that day
    SELECT d.date, sum(f.revenue), count(DISTINCT f.order_id) FILTER (WHERE f.quantity > 0),
           count(DISTINCT c.customer_id) FILTER (WHERE f.customer_key <> -1 AND f.quantity > 0)
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
    JOIN customer_analytics.dim_customer c ON c.customer_key = f.customer_key
    WHERE f.status = 'completed' AND (keys IS NULL OR f.date_key = ANY (keys))
    GROUP BY d.date;

    INSERT INTO customer_analytics.sales_rollup_category (day, category, revenue, orders, units)
    SELECT d.date, p.category, sum(f.revenue), count(DISTINCT f.order_id) FILTER (WHERE f.quantity > 0), sum(f.quantity)
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
    JOIN customer_analytics.dim_product p ON p.product_key = f.product_key
    WHERE f.status = 'completed' AND (keys IS NULL OR f.date_key = ANY (keys))
    GROUP BY d.date, p.category;

    RETURN CASE WHEN keys IS NULL THEN (SELECT count(*) FROM customer_analytics.sales_rollup_day)
                ELSE cardinality(keys) END;
END
$$;
COMMENT ON FUNCTION customer_analytics.refresh_sales_rollup(boolean) IS
    'Recomputes the sales rollups for the days whose order lines changed since the last call (all days with full_refresh, after a TRUNCATE, or when the rollups are empty); returns the number of days recomputed. The pipeline calls it before refreshing daily_sales and product_category_sales';

CREATE MATERIALIZED VIEW customer_analytics.daily_sales AS
WITH days AS (
    SELECT g::date AS day
    FROM (SELECT min(day) AS first_day, max(day) AS last_day FROM customer_analytics.sales_rollup_day) r,
         pg_catalog.generate_series(r.first_day, r.last_day, interval '1 day') g
)
SELECT days.day,
       COALESCE(p.revenue, 0) AS revenue,
       COALESCE(p.orders, 0) AS orders,
       COALESCE(p.customers, 0) AS customers,
       round(p.revenue / NULLIF(p.orders, 0), 2) AS avg_order_value
FROM days LEFT JOIN customer_analytics.sales_rollup_day p USING (day);
CREATE UNIQUE INDEX daily_sales_day_idx ON customer_analytics.daily_sales (day);
COMMENT ON MATERIALIZED VIEW customer_analytics.daily_sales IS
    'Completed sales per day, every day from the first to the last sale (0 on a day without): revenue net of credit notes, orders (a credit note is none), distinct known customers who bought (guests not counted), average order value. Built from sales_rollup_day: run refresh_sales_rollup() first (the pipeline does)';

CREATE MATERIALIZED VIEW customer_analytics.product_category_sales AS
WITH cells AS (
    SELECT c.category, g::date AS day
    FROM (SELECT min(day) AS first_day, max(day) AS last_day FROM customer_analytics.sales_rollup_day) r,
         pg_catalog.generate_series(r.first_day, r.last_day, interval '1 day') g,
         (SELECT DISTINCT category FROM customer_analytics.sales_rollup_category) c
)
SELECT 'day'::text AS grain, cells.day AS period_start, cells.category,
       COALESCE(r.revenue, 0) AS revenue, COALESCE(r.orders, 0) AS orders, COALESCE(r.units, 0) AS units
FROM cells LEFT JOIN customer_analytics.sales_rollup_category r USING (category, day)
UNION ALL
SELECT 'month', pg_catalog.date_trunc('month', r.day)::date, r.category,
       sum(r.revenue), sum(r.orders), sum(r.units)
FROM customer_analytics.sales_rollup_category r
GROUP BY 2, 3;
CREATE UNIQUE INDEX product_category_sales_key_idx
    ON customer_analytics.product_category_sales (grain, category, period_start);
COMMENT ON MATERIALIZED VIEW customer_analytics.product_category_sales IS
    'Completed sales per product category and period, at two grains in one view: grain ''day'' (every day from the first to the last sale, 0 on a day without) and grain ''month'' (period_start = first day of the month, the sum of its days: an order counts on each day it has lines in the category): revenue net of credit notes, orders with a line in the category (a credit note is none), units net of returned ones. Built from sales_rollup_category';

-- closed days and the day in progress are left out: not scored, and in no
-- baseline
CREATE VIEW customer_analytics.order_count_series AS
WITH closed AS MATERIALIZED (
    SELECT c.day FROM customer_analytics.closed_days((SELECT min(r.day) FROM customer_analytics.sales_rollup_day r),
                                                     (SELECT max(r.day) FROM customer_analytics.sales_rollup_day r)) c
    UNION ALL
    SELECT p.day FROM customer_analytics.day_in_progress() p(day) WHERE p.day IS NOT NULL
)
SELECT category AS series, period_start::timestamp AT TIME ZONE 'UTC' AS ts, orders
FROM customer_analytics.product_category_sales
WHERE grain = 'day' AND period_start NOT IN (SELECT day FROM closed)
UNION ALL
SELECT 'total', day::timestamp AT TIME ZONE 'UTC', orders
FROM customer_analytics.daily_sales
WHERE day NOT IN (SELECT day FROM closed);
COMMENT ON VIEW customer_analytics.order_count_series IS
    'Daily order counts per product category and for the whole shop (series ''total''), closed days (closed_days()) and the day in progress (day_in_progress()) left out: what the anomalies view scores';

/*
 * The default method, chosen on the generator's planted anomalies with
 * seeds 1, 2, 3 and reported on seeds 42, 7, 99 (bench/anomaly_quality.sh):
 * the count method (negative binomial tail probabilities against level x
 * weekday profile: the level of the 8 previous weeks carried forward by
 * the growth of the 112 previous days, the profile of those 112 days),
 * flagging a point when its two-sided tail probability is at most
 * customer_analytics.anomaly_false_alarms_per_year (0.5) / 365.25, then
 * the other series of a day with a flag by Benjamini-Hochberg at
 * customer_analytics.anomaly_same_day_fdr (0.05: an outage moves every
 * category), and only changes of at least 50%: at 50,000 customers the
 * counts are large enough for +40% days of a category to be significant,
 * and those are not what an alert is for.
 * The series is named by regclass so that pg_depend orders the refreshes.
 */
CREATE MATERIALIZED VIEW customer_analytics.anomalies AS
SELECT a.series, (a.ts AT TIME ZONE 'UTC')::date AS day, a.value::bigint AS orders,
       round(a.expected::numeric, 1) AS expected, a.z, a.p_value, a.direction
FROM customer_analytics.detect_anomalies('customer_analytics.order_count_series'::regclass, 'series', 'ts', 'orders',
        method => 'count', window_size => 112, seasons => 8, min_relative_change => 0.5) a
WHERE a.is_anomaly;
CREATE UNIQUE INDEX anomalies_series_day_idx ON customer_analytics.anomalies (series, day);
COMMENT ON MATERIALIZED VIEW customer_analytics.anomalies IS
    'Days with an anomalous number of orders, per product category and for the shop as a whole (series ''total''): detect_anomalies() with the count method (expected orders from the level of the 8 previous weeks, carried forward by the growth of the 112 previous days, and the weekday profile of those days; p_value: two-sided negative binomial tail probability; z: its normal score), flagged when p_value <= customer_analytics.anomaly_false_alarms_per_year / 365.25, or, on a day with such a flag, by Benjamini-Hochberg at customer_analytics.anomaly_same_day_fdr among the day''s other series that moved the same way; changes of at least 50% of the expected orders only. Built on daily_sales and product_category_sales: refresh those first (refresh_sales_views() does all three)';

CREATE FUNCTION customer_analytics.refresh_sales_views(concurrent boolean DEFAULT true)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v text;
BEGIN
    PERFORM customer_analytics.refresh_sales_rollup();
    FOREACH v IN ARRAY ARRAY['daily_sales', 'product_category_sales', 'anomalies'] LOOP
        EXECUTE format('REFRESH MATERIALIZED VIEW %s customer_analytics.%I',
                       CASE WHEN concurrent THEN 'CONCURRENTLY' ELSE '' END, v);
    END LOOP;
END
$$;
COMMENT ON FUNCTION customer_analytics.refresh_sales_views(boolean) IS
    'Bring the sales rollups up to date (refresh_sales_rollup()), then refresh daily_sales, product_category_sales and anomalies, in that order (concurrently by default: readers are not blocked)';

CREATE FUNCTION customer_analytics.alert_new_anomalies()
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a record;
    raised integer := 0;
BEGIN
    FOR a IN SELECT * FROM customer_analytics.anomalies an
             WHERE NOT EXISTS (SELECT FROM customer_analytics.alert al
                               WHERE al.dedup_key = 'anomaly:' || an.series || ':' || an.day)
             ORDER BY day, series LOOP
        IF customer_analytics.raise_alert(
               'anomaly', a.series,
               jsonb_build_object('day', a.day, 'orders', a.orders, 'expected', a.expected,
                                  'z', round(a.z::numeric, 2), 'p_value', to_char(a.p_value, '9.99EEEE')::numeric,
                                  'direction', a.direction),
               'anomaly:' || a.series || ':' || a.day) IS NOT NULL THEN
            raised := raised + 1;
        END IF;
    END LOOP;
    RETURN raised;
END
$$;
COMMENT ON FUNCTION customer_analytics.alert_new_anomalies()
    IS 'Raise an alert (kind anomaly, NOTIFY customer_analytics_alerts) for every row of the anomalies view not alerted before (one alert per series and day, ever: dedup_key anomaly:<series>:<day>); returns how many were raised';
