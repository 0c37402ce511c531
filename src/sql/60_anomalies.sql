/*
 * Anomaly detection (src/anomalies.c): streaming statistics, robust
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
    'Score every point of the series a query returns (columns: series key, timestamp, value, and optionally the exposure: the fraction of the period observed, 0 = not scored) against a baseline that never includes the point: method trailing (mean and z over the window_size previous points), robust (median and robust z over them), seasonal (the median of the same weekday in the previous seasons weeks, then the z and robust z of the residual over the window; both must pass; on the chosen scale: linear, sqrt or log) or count (whole counts: expected = level of the previous seasons weeks, carried forward by the growth of the window, x weekday profile of the window_size previous periods, two-sided negative binomial tail probability p_value, its variance the baseline''s own uncertainty plus the overdispersion of the window when Pearson''s statistic shows it, Poisson otherwise; z is its normal score). Flags points whose |z| passes threshold (default customer_analytics.zscore_threshold; for the count method p_value <= customer_analytics.anomaly_false_alarms_per_year / points a year, then, at a time where a point is flagged, the other series'' points that moved the same way by Benjamini-Hochberg at customer_analytics.anomaly_same_day_fdr) in the wanted direction (both, spike, drop), after min_history earlier points, when they differ from the expected value by at least min_relative_change of it (for the count method a factor either way: at most 1 - min_relative_change or, below 1, at least 1 / (1 - min_relative_change) times the expected count; 0.5: half or twice)';

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
 * category), and only changes to half the expected orders or twice (a
 * factor either way: at 50,000 customers the counts are large enough for
 * +50% days of a category to be significant by chance a few times a year,
 * and those are not what an alert is for).
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
    'Days with an anomalous number of orders, per product category and for the shop as a whole (series ''total''): detect_anomalies() with the count method (expected orders from the level of the 8 previous weeks, carried forward by the growth of the 112 previous days, and the weekday profile of those days; p_value: two-sided negative binomial tail probability; z: its normal score), flagged when p_value <= customer_analytics.anomaly_false_alarms_per_year / 365.25, or, on a day with such a flag, by Benjamini-Hochberg at customer_analytics.anomaly_same_day_fdr among the day''s other series that moved the same way; only changes to half the expected orders or less, or to twice or more. Built on daily_sales and product_category_sales: refresh those first (refresh_sales_views() does all three)';

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
