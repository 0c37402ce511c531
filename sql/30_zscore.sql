-- Anomaly detection: stats_agg, median_mad_agg, zscore, robust_zscore,
-- detect_anomalies.  Every figure is checked against an independent SQL
-- computation or a hand-computed value.
SET client_min_messages = warning;
SET search_path = customer_analytics, public;
SET extra_float_digits = 0;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';

-- 1. hand-computed: 1..5 has mean 3, M2 10, variance 2.5, sd 1.5811388
SELECT stats_agg(x) AS s, count(stats_agg(x)), mean(stats_agg(x)), variance(stats_agg(x)),
       round(stddev(stats_agg(x))::numeric, 7) AS sd,
       round(zscore(6, stats_agg(x))::numeric, 7) AS z_of_6      -- 3 / 1.5811388 = 1.8973666
FROM (VALUES (1), (2), (3), (NULL), (4), (5)) v(x);
-- no values: count 0, the rest unknown; one value: no spread; constant: z NULL, not an error
SELECT s, count(s), mean(s), variance(s), stddev(s), zscore(1, s)
FROM (SELECT stats_agg(x) AS s FROM (VALUES (NULL::float8)) v(x)) t;
SELECT s, mean(s), variance(s), zscore(1, s) FROM (SELECT stats_agg(7) AS s) t;
SELECT s, variance(s), zscore(8, s) FROM (SELECT stats_agg(5) AS s FROM generate_series(1, 10)) t;
-- text form round trip, and bad input
SELECT '(4,2.5,5)'::stats, mean('(4,2.5,5)'::stats), variance('(4,2.5,5)'::stats);
-- binary form round trip (COPY BINARY, Citus): exact, anchor included
CREATE TEMP TABLE stats_copy AS SELECT stats_agg(x) AS s FROM (VALUES (1e9 + 0.25), (1e9 + 0.5), (1e9 + 1.25)) v(x);
SELECT current_setting('data_directory') || '/ca_regress_stats.bin' AS stats_file \gset
COPY stats_copy TO :'stats_file' (FORMAT binary);
CREATE TEMP TABLE stats_back (s stats);
COPY stats_back FROM :'stats_file' (FORMAT binary);
SELECT b.s AS back, variance(b.s) = variance(c.s) AND mean(b.s) = mean(c.s) AS same
FROM stats_back b, stats_copy c;
SELECT '(4,2.5)'::stats;
SELECT '(-1,0,0)'::stats;
SELECT '(2,1,-3)'::stats;

-- 2. plain aggregate = the built-ins, per group (random data, fixed seed)
SELECT setseed(0.42);
CREATE TEMP TABLE series AS
SELECT g, i,
       CASE WHEN g = 3 THEN 5.0                               -- a constant series
            WHEN random() < 0.1 THEN NULL                     -- some NULLs
            ELSE round((100 + 20 * g + 15 * (random() - 0.5) * g)::numeric, 2)::float8 END AS x
FROM generate_series(1, 6) g, generate_series(1, 400) i;
SELECT g, count(stats_agg(x)) = count(x) AS same_count,
       abs(mean(stats_agg(x)) - avg(x)) <= 1e-12 * abs(avg(x)) AS same_mean,
       abs(stddev(stats_agg(x)) - stddev_samp(x)) <= 1e-10 * stddev_samp(x) AS same_sd
FROM series GROUP BY g ORDER BY g;

-- 3. sliding frames = naive recomputation (the built-ins recompute every frame)
CREATE TEMP TABLE sliding AS
SELECT g, i, x,
       zscore(x, stats_agg(x) OVER w28) AS z,
       (x - avg(x) OVER w28) / NULLIF(stddev_samp(x) OVER w28, 0) AS z_naive,
       count(stats_agg(x) OVER w28) AS n, count(x) OVER w28 AS n_naive,
       stddev(stats_agg(x) OVER w3) AS sd3, stddev_samp(x) OVER w3 AS sd3_naive
FROM series
WINDOW w28 AS (PARTITION BY g ORDER BY i ROWS BETWEEN 28 PRECEDING AND 1 PRECEDING),
       w3 AS (PARTITION BY g ORDER BY i ROWS BETWEEN 2 PRECEDING AND CURRENT ROW);
SELECT count(*) AS rows,
       count(*) FILTER (WHERE n <> n_naive) AS count_differs,
       count(*) FILTER (WHERE (z IS NULL) <> (z_naive IS NULL) AND g <> 3) AS null_differs,
       count(*) FILTER (WHERE abs(z - z_naive) > 1e-9 * greatest(1, abs(z_naive))) AS z_differs,
       count(*) FILTER (WHERE abs(sd3 - sd3_naive) > 1e-9 * greatest(1, sd3_naive)) AS sd_differs,
       count(*) FILTER (WHERE z IS NOT NULL) AS scored
FROM sliding;
-- the constant series: every z is NULL (stddev 0), none is an error or infinity
SELECT count(*) AS rows, count(z) AS scored FROM sliding WHERE g = 3;
-- a growing frame (its start never moves: the plain transition, in place)
SELECT count(*) FILTER (WHERE count(s) <> n OR abs(mean(s) - m) > 1e-12 * abs(m)
                           OR abs(stddev(s) - sd) > 1e-10 * sd) AS growing_differs
FROM (SELECT stats_agg(x) OVER w AS s, count(x) OVER w AS n, avg(x) OVER w AS m, stddev_samp(x) OVER w AS sd
      FROM series WINDOW w AS (PARTITION BY g ORDER BY i)) t;

-- 4. numerical stability: values around 1e9 with a variance of about 1/12,
-- frames of 364, and a huge value (1e15) passing through, against exact
-- numeric (the values are multiples of 1/1024, exact in float8 too)
CREATE TEMP TABLE big AS
SELECT i, xn, xn::float8 AS x
FROM (SELECT i, CASE WHEN i = 700 THEN 1e15 ELSE 1e9 + floor(random() * 1024) / 1024 END AS xn
      FROM generate_series(1, 3000) i) t;
WITH s AS (
    SELECT i, stddev(stats_agg(x) OVER w) AS sd, mean(stats_agg(x) OVER w) AS m,
           stddev_samp(xn) OVER w AS sd_exact, avg(xn) OVER w AS m_exact
    FROM big WINDOW w AS (ORDER BY i ROWS BETWEEN 364 PRECEDING AND 1 PRECEDING)
)
SELECT count(*) FILTER (WHERE sd_exact IS NOT NULL) AS frames,
       max(abs(sd - sd_exact::float8) / sd_exact::float8) < 1e-13 AS sd_within_1e_13,
       max(abs(m - m_exact::float8) / m_exact::float8) < 1e-14 AS mean_within_1e_14,
       max(abs(sd - sd_exact::float8) / sd_exact::float8) FILTER (WHERE i > 1065) < 1e-13 AS after_the_huge_value
FROM s;
-- 20,000 values with a trend (the anchor falls behind) in frames of 365:
-- as close as the built-in float8 stddev_samp, which recomputes each frame
CREATE TEMP TABLE trend AS
SELECT i, (1e9 + i * 1000.0 + floor(random() * 1e6) / 1024)::numeric AS xn FROM generate_series(1, 20000) i;
WITH s AS (
    SELECT i, stddev(stats_agg(xn::float8) OVER w) AS sd, stddev_samp(xn::float8) OVER w AS sd_builtin,
           stddev_samp(xn) OVER w AS sd_exact
    FROM trend WINDOW w AS (ORDER BY i ROWS BETWEEN 364 PRECEDING AND CURRENT ROW)
)
SELECT max(abs(sd - sd_exact::float8) / sd_exact::float8) < 1e-10 AS within_1e_10,
       max(abs(sd - sd_exact::float8) / sd_exact::float8)
         <= max(abs(sd_builtin - sd_exact::float8) / sd_exact::float8) AS no_worse_than_builtin
FROM s WHERE sd_exact IS NOT NULL;

-- 5. parallel = serial
CREATE TABLE par AS SELECT i % 7 AS g, (i * 7919 % 10007)::float8 / 7 AS x FROM generate_series(1, 200000) i;
ANALYZE par;
SET max_parallel_workers_per_gather = 0;
CREATE TEMP TABLE serial_result AS SELECT stats_agg(x)::text AS s, median_mad_agg(x)::text AS m FROM par;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
-- force_parallel_mode is named debug_parallel_query from PostgreSQL 16 on
SELECT CASE WHEN current_setting('server_version_num')::int >= 160000 THEN 'debug_parallel_query'
            ELSE 'force_parallel_mode' END AS parallel_guc \gset
SET :parallel_guc = on;
EXPLAIN (COSTS OFF) SELECT stats_agg(x), median_mad_agg(x) FROM par;
CREATE TEMP TABLE parallel_result AS SELECT stats_agg(x) AS s, median_mad_agg(x)::text AS m FROM par;
SELECT count(p.s) = count(s.s::stats) AS same_count,
       abs(mean(p.s) - mean(s.s::stats)) <= 1e-12 * mean(s.s::stats) AS same_mean,
       abs(variance(p.s) - variance(s.s::stats)) <= 1e-10 * variance(s.s::stats) AS same_variance,
       p.m = s.m AS same_median_mad
FROM parallel_result p, serial_result s;
RESET :parallel_guc;
RESET max_parallel_workers_per_gather;
RESET parallel_setup_cost;
RESET parallel_tuple_cost;
RESET min_parallel_table_scan_size;
DROP TABLE par;

-- 6. median_mad_agg and robust_zscore, by hand
-- 9,9,10,10,10,10,10,11,11,12,95,100,120: median 10, MAD 1; three outliers
-- mask each other for the classical z but not for the robust one
CREATE TEMP TABLE outliers AS SELECT * FROM unnest(ARRAY[9, 9, 10, 10, 10, 10, 10, 11, 11, 12, 95, 100, 120]::float8[]) x;
SELECT median_mad_agg(x) AS m,
       robust_zscore(100, median_mad_agg(x)) AS robust_z_100,    -- 0.6745 * 90 / 1 = 60.705
       round(zscore(100, stats_agg(x))::numeric, 3) AS z_100     -- masked: below 3
FROM outliers;
-- MAD 0: the mean absolute deviation takes over: 4 / (1.253314 * 4/7) = 5.5852
SELECT median_mad_agg(x) AS m, round(robust_zscore(9, median_mad_agg(x))::numeric, 4) AS robust_z
FROM unnest(ARRAY[5, 5, 5, 5, 5, 5, 9]::float8[]) x;
-- both 0, or nothing known: NULL
SELECT robust_zscore(9, median_mad_agg(x)) FROM unnest(ARRAY[5, 5, 5]::float8[]) x;
SELECT median_mad_agg(x), robust_zscore(1, median_mad_agg(x)) FROM unnest(ARRAY[NULL]::float8[]) x;
-- even count: the median and the MAD are the means of the two middle values
SELECT median_mad_agg(x) FROM unnest(ARRAY[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]::float8[]) x;  -- (10,5.5,2.5,2.5)

-- 7. as a window function over sliding frames = percentile_cont over each frame
CREATE TEMP TABLE mm AS
SELECT g, i, CASE WHEN random() < 0.1 THEN NULL ELSE floor(random() * 20) END AS x   -- NULLs and ties
FROM generate_series(1, 3) g, generate_series(1, 150) i;
WITH w AS (
    SELECT g, i, median_mad_agg(x) OVER (PARTITION BY g ORDER BY i ROWS BETWEEN 10 PRECEDING AND 1 PRECEDING) AS m,
           median_mad_agg(x) OVER (PARTITION BY g ORDER BY i) AS growing
    FROM mm
), naive AS (
    SELECT w.g, w.i, f.med, f.n,
           (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY abs(p.x - f.med))
            FROM mm p WHERE p.g = w.g AND p.i BETWEEN w.i - 10 AND w.i - 1) AS mad,
           (SELECT avg(abs(p.x - f.med)) FROM mm p WHERE p.g = w.g AND p.i BETWEEN w.i - 10 AND w.i - 1) AS meanad,
           (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY p.x) FROM mm p WHERE p.g = w.g AND p.i <= w.i) AS growing_med
    FROM w, LATERAL (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY p.x) AS med, count(p.x) AS n
                     FROM mm p WHERE p.g = w.g AND p.i BETWEEN w.i - 10 AND w.i - 1) f
)
SELECT count(*) AS frames,
       count(*) FILTER (WHERE (w.m).count <> n.n) AS count_differs,
       count(*) FILTER (WHERE (w.m).median IS DISTINCT FROM n.med) AS median_differs,
       count(*) FILTER (WHERE (w.m).mad IS DISTINCT FROM n.mad) AS mad_differs,
       count(*) FILTER (WHERE abs((w.m).mean_abs_dev - n.meanad) > 1e-12) AS meanad_differs,
       count(*) FILTER (WHERE (w.growing).median IS DISTINCT FROM n.growing_med) AS growing_differs
FROM w JOIN naive n USING (g, i);

-- 8. detect_anomalies on a small series, by hand: the trailing window of
-- 4 before the last point holds 10, 12, 10, 12 (mean 11, sd 1.1547005)
SELECT series, ts::date, value, expected, round(z::numeric, 4) AS z, robust_z, direction, is_anomaly
FROM detect_anomalies($$SELECT 's', d, v FROM (VALUES
        ('2025-01-01'::date, 10), ('2025-01-02', 12), ('2025-01-03', 10), ('2025-01-04', 12), ('2025-01-05', 20)) t(d, v)$$,
        method => 'trailing', window_size => 4, min_history => 4)
ORDER BY ts;
-- z = (20 - 11) / 1.1547005 = 7.7942; robust: median 11, MAD 1: 0.6745 * 9 = 6.0705

-- the same from a table, with NULL values and a NULL series; spikes only,
-- then a minimum relative change that the spike does not reach
CREATE TEMP TABLE pts (k int, d timestamp, v numeric);
INSERT INTO pts VALUES (1, '2025-01-01', 10), (1, '2025-01-02', 12), (1, '2025-01-03', NULL), (1, '2025-01-04', 10),
    (1, '2025-01-05', 12), (1, '2025-01-06', 20), (NULL, '2025-01-01', 1), (2, '2025-01-01', 3);
SELECT series, ts::date, value, expected, round(z::numeric, 4) AS z, direction, is_anomaly
FROM detect_anomalies('pts'::regclass, 'k', 'd', 'v', method => 'trailing', window_size => 4, min_history => 4,
                      direction => 'spike')
ORDER BY series NULLS FIRST, ts;
SELECT count(*) FILTER (WHERE is_anomaly) AS flagged
FROM detect_anomalies('pts'::regclass, 'k', 'd', 'v', method => 'trailing', window_size => 4, min_history => 4,
                      min_relative_change => 0.9);
SELECT count(*) FILTER (WHERE is_anomaly) AS flagged
FROM detect_anomalies('pts'::regclass, 'k', 'd', 'v', method => 'trailing', window_size => 4, min_history => 4,
                      direction => 'drop');
-- points at +/-infinity or without a time are left out; values below the
-- sqrt scale's domain count as 0 and the expected value is never negative
SELECT series, ts, value, expected >= 0 AS expected_not_negative
FROM detect_anomalies($$SELECT 'x', t, v FROM (VALUES ('-infinity'::timestamptz, 1), (NULL, 2),
        ('2025-01-01', 0), ('2025-01-02', -5), ('2025-01-03', 0), ('infinity', 3)) s(t, v)$$,
        method => 'robust', scale => 'sqrt', min_history => 1)
ORDER BY ts;
-- the threshold comes from the setting when not given
SET customer_analytics.zscore_threshold = 8;
SELECT count(*) FILTER (WHERE is_anomaly) AS flagged
FROM detect_anomalies('pts'::regclass, 'k', 'd', 'v', method => 'trailing', window_size => 4, min_history => 4);
RESET customer_analytics.zscore_threshold;

-- 9. trailing z of detect_anomalies = zscore over stats_agg OVER the same frame
SELECT count(*) AS points,
       count(*) FILTER (WHERE abs(d.z - s.z_naive) > 1e-9 * greatest(1, abs(s.z_naive))
                           OR (d.z IS NULL) <> (s.z_naive IS NULL)) AS differ
FROM detect_anomalies('SELECT g, timestamp ''2025-01-01'' + i * interval ''1 day'', x FROM series WHERE x IS NOT NULL',
                      method => 'trailing', window_size => 28) d
JOIN (SELECT g, i, x, (x - avg(x) OVER w) / NULLIF(stddev_samp(x) OVER w, 0) AS z_naive
      FROM series WHERE x IS NOT NULL
      WINDOW w AS (PARTITION BY g ORDER BY i ROWS BETWEEN 28 PRECEDING AND 1 PRECEDING)) s
  ON s.g::text = d.series AND timestamp '2025-01-01' + s.i * interval '1 day' = d.ts;

-- 10. seasonal: ten weeks of a weekly pattern (Saturday peaks at twice the
-- weekdays) with noise, and one planted spike on a Wednesday.  The seasonal
-- method flags the spike and not the Saturdays; the robust method, blind
-- to the week, flags the Saturdays.
CREATE TEMP TABLE weekly AS
SELECT d::date AS day,
       (CASE WHEN extract(isodow FROM d) = 6 THEN 200 ELSE 100 END) * (1 + 0.03 * sin(n * 1.7))
       + CASE WHEN d = '2025-03-05' THEN 60 ELSE 0 END AS v
FROM generate_series('2025-01-01'::date, '2025-03-12', '1 day') WITH ORDINALITY AS g(d, n);
SELECT m AS method, string_agg(ts::date || ' ' || to_char(ts, 'Dy'), ', ' ORDER BY ts) AS flagged
FROM (VALUES ('seasonal'), ('robust')) x(m),
     detect_anomalies('SELECT 1, day, v FROM weekly', method => m, min_history => 21)
WHERE is_anomaly
GROUP BY m ORDER BY m;

-- 11. errors name the offending argument
SELECT * FROM detect_anomalies('SELECT 1, 2', method => 'trailing');
SELECT * FROM detect_anomalies('SELECT 1, 2, 3');
SELECT * FROM detect_anomalies('SELECT 1, now(), ''x''::text');
SELECT * FROM detect_anomalies('SELECT 1, now(), 1', method => 'magic');
SELECT * FROM detect_anomalies('SELECT 1, now(), 1', window_size => 1);
SELECT * FROM detect_anomalies('SELECT 1, now(), 1', direction => 'up');
SELECT * FROM detect_anomalies('SELECT 1, now(), 1', scale => 'cubic');
SELECT * FROM detect_anomalies('SELECT 1, now(), 1', min_relative_change => -1);
SELECT * FROM detect_anomalies('pts'::regclass, 'k', 'd', 'nope');
SELECT * FROM detect_anomalies('DELETE FROM pts RETURNING k, d, v');
SELECT count(*) AS still_there FROM pts;
