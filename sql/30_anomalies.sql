-- Anomaly detection: stats_agg, median_mad_agg, zscore, robust_zscore,
-- detect_anomalies.  Every figure is checked against an independent SQL
-- computation or a hand-computed value.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
SET extra_float_digits = 0;

-- 1. hand-computed: 1..5 has mean 3, M2 10, variance 2.5, sd 1.5811388
SELECT stats_agg(x) AS s, stats_count(stats_agg(x)), stats_mean(stats_agg(x)), stats_variance(stats_agg(x)),
       round(stats_stddev(stats_agg(x))::numeric, 7) AS sd,
       round(zscore(6, stats_agg(x))::numeric, 7) AS z_of_6      -- 3 / 1.5811388 = 1.8973666
FROM (VALUES (1), (2), (3), (NULL), (4), (5)) v(x);
-- no values: count 0, the rest unknown; one value: no spread; constant: z NULL, not an error
SELECT s, stats_count(s), stats_mean(s), stats_variance(s), stats_stddev(s), zscore(1, s)
FROM (SELECT stats_agg(x) AS s FROM (VALUES (NULL::float8)) v(x)) t;
SELECT s, stats_mean(s), stats_variance(s), zscore(1, s) FROM (SELECT stats_agg(7) AS s) t;
SELECT s, stats_variance(s), zscore(8, s) FROM (SELECT stats_agg(5) AS s FROM generate_series(1, 10)) t;
-- text form round trip, and bad input
SELECT '(4,2.5,5)'::stats, stats_mean('(4,2.5,5)'::stats), stats_variance('(4,2.5,5)'::stats);
-- binary form round trip (COPY BINARY, Citus): exact, anchor included
CREATE TEMP TABLE stats_copy AS SELECT stats_agg(x) AS s FROM (VALUES (1e9 + 0.25), (1e9 + 0.5), (1e9 + 1.25)) v(x);
SELECT current_setting('data_directory') || '/ca_regress_stats.bin' AS stats_file \gset
COPY stats_copy TO :'stats_file' (FORMAT binary);
CREATE TEMP TABLE stats_back (s stats);
COPY stats_back FROM :'stats_file' (FORMAT binary);
SELECT b.s AS back, stats_variance(b.s) = stats_variance(c.s) AND stats_mean(b.s) = stats_mean(c.s) AS same
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
SELECT g, stats_count(stats_agg(x)) = count(x) AS same_count,
       abs(stats_mean(stats_agg(x)) - avg(x)) <= 1e-12 * abs(avg(x)) AS same_mean,
       abs(stats_stddev(stats_agg(x)) - stddev_samp(x)) <= 1e-10 * stddev_samp(x) AS same_sd
FROM series GROUP BY g ORDER BY g;

-- 3. sliding frames = naive recomputation (the built-ins recompute every frame)
CREATE TEMP TABLE sliding AS
SELECT g, i, x,
       zscore(x, stats_agg(x) OVER w28) AS z,
       (x - avg(x) OVER w28) / NULLIF(stddev_samp(x) OVER w28, 0) AS z_naive,
       stats_count(stats_agg(x) OVER w28) AS n, count(x) OVER w28 AS n_naive,
       stats_stddev(stats_agg(x) OVER w3) AS sd3, stddev_samp(x) OVER w3 AS sd3_naive
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
SELECT count(*) FILTER (WHERE stats_count(s) <> n OR abs(stats_mean(s) - m) > 1e-12 * abs(m)
                           OR abs(stats_stddev(s) - sd) > 1e-10 * sd) AS growing_differs
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
    SELECT i, stats_stddev(stats_agg(x) OVER w) AS sd, stats_mean(stats_agg(x) OVER w) AS m,
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
    SELECT i, stats_stddev(stats_agg(xn::float8) OVER w) AS sd, stddev_samp(xn::float8) OVER w AS sd_builtin,
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
SELECT stats_count(p.s) = stats_count(s.s::stats) AS same_count,
       abs(stats_mean(p.s) - stats_mean(s.s::stats)) <= 1e-12 * stats_mean(s.s::stats) AS same_mean,
       abs(stats_variance(p.s) - stats_variance(s.s::stats)) <= 1e-10 * stats_variance(s.s::stats) AS same_variance,
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

-- 12. the count method, on hand-made count series of 16 weeks.
-- An expected 3 and an expected 30, both falling to 0 on the last day: the
-- values vary around their mean less than a Poisson count would (3 +/- 1,
-- 30 +/- 5), so there is no overdispersion: the tail is that of a Poisson
-- count whose rate is known as well as the baseline knows it (negative
-- binomial, alpha = the baseline's relative variance).  P(Y = 0) is about
-- exp(-3) = 0.05 (p ~ 0.1: a small shop's empty day is no news) and
-- exp(-30) = 9.4e-14 (flagged).  The default rule: p at most 0.5
-- (customer_analytics.anomaly_false_alarms_per_year) / 365.25 = 1.4e-3.
CREATE TEMP TABLE counts AS
SELECT m AS mean, '2025-01-01'::date + i AS day,
       CASE WHEN i = 111 THEN 0 WHEN m = 3 THEN 3 + (i * 5) % 3 - 1 ELSE 30 + (i * 7) % 11 - 5 END AS n
FROM (VALUES (3), (30)) s(m), generate_series(0, 111) i;
SELECT series, ts::date, value, round(expected::numeric, 6) AS expected,
       round(p_value::numeric, 6) AS p_value, round(z::numeric, 4) AS z, direction, is_anomaly
FROM detect_anomalies('SELECT mean, day, n FROM counts', method => 'count', window_size => 112, seasons => 8)
WHERE ts::date = '2025-04-22' ORDER BY series::int;
-- p_value is exactly the two-sided tail of 0, 2 (1 + alpha mu)^(-1/alpha),
-- with alpha = 1 / (orders of the 8 weeks before) + 1 / (orders of the 16
-- Tuesdays before) + the growth's: the relative variances of the level, of
-- the weekday and of the growth that carries the level forward.  The
-- growth, recomputed here: orders = season (a + b x) over the 111 days
-- before (x in days from the scored one), least squares weighted by
-- 1 / season; its relative variance is lag^2 var(b) / a^2, the lag 28.5
-- days (from the middle of the level's 8 weeks)
CREATE TEMP TABLE last_alpha AS
WITH h AS (
    SELECT mean, n::float8 AS c, (day - '2025-04-22'::date)::float8 AS x, day,
           avg(n) OVER (PARTITION BY mean, extract(dow FROM day))::float8 AS dow_mean
    FROM counts WHERE day < '2025-04-22'
), w AS (
    SELECT mean, c, x, day, dow_mean / avg(dow_mean) OVER (PARTITION BY mean) AS w FROM h
), sums AS (
    SELECT mean, count(*) AS n, sum(w) AS s0, sum(w * x) AS s1, sum(w * x * x) AS s2, sum(c) AS c0, sum(c * x) AS c1
    FROM w GROUP BY mean
), fit AS (
    SELECT mean, n, s0, s0 * s2 - s1 * s1 AS det, (s2 * c0 - s1 * c1) / (s0 * s2 - s1 * s1) AS a,
           (s0 * c1 - s1 * c0) / (s0 * s2 - s1 * s1) AS b
    FROM sums
), growth AS (
    SELECT f.mean, 28.5 ^ 2 * (sum((w.c - w.w * (f.a + f.b * w.x)) ^ 2 / w.w) / (f.n - 2)) * (f.s0 / f.det) / f.a ^ 2 AS rv
    FROM fit f JOIN w USING (mean) GROUP BY f.mean, f.n, f.s0, f.det, f.a
)
SELECT mean::text AS series,
       1.0::float8 / sum(n) FILTER (WHERE day >= '2025-04-22'::date - 56 AND day < '2025-04-22')
       + 1.0::float8 / sum(n) FILTER (WHERE extract(dow FROM day) = 2 AND day < '2025-04-22')
       + (SELECT g.rv FROM growth g WHERE g.mean = c.mean) AS alpha
FROM counts c GROUP BY mean;
SELECT d.series, round(a.alpha::numeric, 6) AS alpha,
       abs(d.p_value / (2 * (1 + a.alpha * d.expected) ^ (-1 / a.alpha)) - 1) < 1e-9 AS exact
FROM detect_anomalies('SELECT mean, day, n FROM counts', method => 'count', window_size => 112, seasons => 8) d
JOIN last_alpha a USING (series)
WHERE d.ts::date = '2025-04-22' ORDER BY d.series::int;
-- which last days would be flagged: at an expected 3 no drop at all, at
-- 30 a drop to 13 or fewer; spikes from 12 and from 51.  (The variants are
-- not one shop's series: the same-day rule, below, stays off.)
SET customer_analytics.anomaly_same_day_fdr = 0;
CREATE TEMP TABLE last_day AS
SELECT c.mean, v AS last_value, c.day, CASE WHEN c.day = '2025-04-22' THEN v ELSE c.n END AS n
FROM counts c, generate_series(0, 60) v;
SELECT mean,
       max(last_value) FILTER (WHERE is_anomaly AND direction = 'drop') AS largest_drop_flagged,
       min(last_value) FILTER (WHERE is_anomaly AND direction = 'spike') AS smallest_spike_flagged,
       count(*) FILTER (WHERE is_anomaly AND ts::date <> '2025-04-22') AS earlier_flags
FROM (SELECT split_part(a.series, '/', 1)::int AS mean, split_part(a.series, '/', 2)::int AS last_value, a.*
      FROM detect_anomalies('SELECT mean || ''/'' || last_value, day, n FROM last_day', method => 'count', window_size => 112, seasons => 8) a) s
GROUP BY mean ORDER BY mean;
RESET customer_analytics.anomaly_same_day_fdr;
-- the same tails from the definition of the negative binomial, its
-- probabilities summed: P(Y <= 13) <= 6.8e-4 < P(Y <= 14) at the expected 30
WITH p AS (
    SELECT 1 / a.alpha AS r, (1 / a.alpha) / (1 / a.alpha + d.expected) AS q
    FROM detect_anomalies('SELECT mean, day, n FROM counts', method => 'count', window_size => 112, seasons => 8) d
    JOIN last_alpha a USING (series)
    WHERE d.ts::date = '2025-04-22' AND d.series = '30'
), pmf AS (
    SELECT k, exp(p.r * ln(p.q) + COALESCE(sum(ln((j - 1 + p.r) / j * (1 - p.q))), 0)) AS prob
    FROM p, generate_series(0, 14) k LEFT JOIN generate_series(1, 14) j ON j <= k
    GROUP BY k, p.r, p.q
)
SELECT sum(prob) FILTER (WHERE k <= 13) <= 0.5 / 365.25 / 2 AS flag_13,
       sum(prob) FILTER (WHERE k <= 14) > 0.5 / 365.25 / 2 AS no_flag_14
FROM pmf;

-- overdispersed data: the same mean of 20, counts spread evenly over
-- 5..35 (variance ~80, four times a Poisson count's) or Poisson-like
-- (20 +/- 4); a last day of 45 is a 1-in-a-million Poisson event but not
-- unusual for the spread series, whose overdispersion the method estimates
CREATE TEMP TABLE spread AS
SELECT kind, '2025-01-01'::date + i AS day,
       CASE WHEN i = 111 THEN 45
            WHEN kind = 'overdispersed' THEN round(5 + 30 * ((i * 0.6180339887) - floor(i * 0.6180339887)))
            ELSE 20 + (i * 3) % 9 - 4 END AS n
FROM (VALUES ('overdispersed'), ('poisson')) k(kind), generate_series(0, 111) i;
SELECT series, value, round(expected::numeric, 1) AS expected, p_value < 1e-5 AS p_below_1e5,
       p_value > 0.01 AS p_above_1pct, is_anomaly
FROM detect_anomalies('SELECT kind, day, n FROM spread', method => 'count', window_size => 112, seasons => 8)
WHERE ts::date = '2025-04-22' ORDER BY series;
SELECT series, count(*) FILTER (WHERE is_anomaly) AS flags_before_the_last_day
FROM detect_anomalies('SELECT kind, day, n FROM spread', method => 'count', window_size => 112, seasons => 8)
WHERE ts::date < '2025-04-22' GROUP BY series ORDER BY series;

-- the false-alarm rule on data without anomalies: 10 series of Poisson
-- counts a year, around 3, 10 and 30 a day with a weekly rhythm.  At most
-- customer_analytics.anomaly_false_alarms_per_year flags per series and
-- year (over the 337 days that can be flagged), fewer at small counts,
-- whose tails are discrete
SELECT setseed(0.2);
CREATE TEMP TABLE null_counts AS
WITH u AS (SELECT s0 * 100 + s1 AS s, d, (ARRAY[1.08, 1.04, 1.00, 0.97, 0.90, 0.86, 1.15])[d % 7 + 1] * lam AS mu, random() AS u
           FROM (VALUES (1, 3.0), (2, 10.0), (3, 30.0)) l(s0, lam), generate_series(1, 10) s1, generate_series(0, 364) d),
cdf AS (SELECT mu, k, sum(exp(-mu + k * ln(mu) - ln(factorial(k)::float8))) OVER (PARTITION BY mu ORDER BY k) AS cum
        FROM (SELECT DISTINCT mu FROM u) m, generate_series(0, 100) k)
SELECT u.s, '2025-01-01'::date + u.d AS day, count(cdf.k) AS n
FROM u LEFT JOIN cdf ON cdf.mu = u.mu AND cdf.cum < u.u
GROUP BY u.s, u.d;
SELECT f AS false_alarms_per_year, (ARRAY[3, 10, 30])[series::int / 100] AS mean_count,
       count(*) FILTER (WHERE is_anomaly) AS flags, round(f * 10 * 337 / 365.25, 1) AS at_most,
       count(*) FILTER (WHERE is_anomaly) <= f * 10 * 337 / 365.25 AS within
FROM (VALUES (0.3), (1.0), (3.0), (10.0)) v(f),
     LATERAL (SELECT set_config('customer_analytics.anomaly_false_alarms_per_year', f::text, false) AS x) c,
     -- (0 * length(c.x): the setting is made before the call)
     LATERAL detect_anomalies('SELECT s, day, n FROM null_counts', method => 'count', window_size => 112, seasons => 8,
                              min_relative_change => 0 * length(c.x)) a
GROUP BY 1, 2 ORDER BY 1, 2;
RESET customer_analytics.anomaly_false_alarms_per_year;

-- large counts with 1% day-to-day noise (overdispersed a thousandfold for
-- a Poisson count of 1e9): the spread is learnt before anything can be
-- flagged, and only the day of +50% is; above 1e7 the tails are normal
SELECT series, count(*) FILTER (WHERE is_anomaly) AS flags,
       string_agg(ts::date::text, ', ') FILTER (WHERE is_anomaly) AS flagged
FROM detect_anomalies($$SELECT s, '2025-01-01'::date + i, (m * (1 + 0.01 * sin(i * 2.1)) + CASE WHEN i = 300 THEN m / 2 ELSE 0 END)::bigint
                        FROM generate_series(0, 364) i, (VALUES ('1e5', 1e5), ('1e9', 1e9), ('1e12', 1e12)) v(s, m)$$, method => 'count')
GROUP BY 1 ORDER BY 1;

-- zeros: a series that never sold (the expected count is half an order
-- over the eight weeks of the level, never 0, so p and z stay finite), a shop closed on
-- Sundays (0 there is expected; 5 orders on a Sunday are a spike); a NULL
-- day and an exposure of 0 are not scored and leave no trace
CREATE TEMP TABLE zeros AS
SELECT s, '2025-01-01'::date + i AS day,
       CASE WHEN s = 'never' THEN CASE WHEN i = 110 THEN 1 WHEN i = 111 THEN 3 ELSE 0 END
            WHEN extract(isodow FROM '2025-01-01'::date + i) = 7 THEN CASE WHEN i = icnt THEN 5 ELSE 0 END
            ELSE 12 + (i * 5) % 7 - 3 END AS n
FROM (VALUES ('never'), ('sundays closed')) v(s), generate_series(0, 111) i,
     (SELECT max(i) AS icnt FROM generate_series(0, 111) i WHERE extract(isodow FROM '2025-01-01'::date + i) = 7) l;
SELECT series, ts::date, to_char(ts, 'Dy') AS dow, value, round(expected::numeric, 4) AS expected,
       round(p_value::numeric, 4) AS p_value, z IS NOT NULL AND z <> 'Infinity' AND z <> '-Infinity' AS z_finite, is_anomaly
FROM detect_anomalies('SELECT s, day, n FROM zeros', method => 'count', window_size => 112, seasons => 8)
WHERE is_anomaly OR ts::date >= '2025-04-20' ORDER BY series, ts;
SELECT count(*) FILTER (WHERE is_anomaly) AS sunday_flags_before
FROM detect_anomalies('SELECT s, day, n FROM zeros', method => 'count', window_size => 112, seasons => 8)
WHERE series = 'sundays closed' AND to_char(ts, 'Dy') = 'Sun' AND ts::date < '2025-04-20';

-- the day in progress: a fourth column is the fraction of the period
-- observed.  Half a day with 10 orders where 30 a day are usual is
-- scored against 15; the same 10 as a whole day is a drop.  A partial day
-- (or a closed one, exposure 0) stays out of the later days' baselines.
SELECT a.series, a.value, round(a.expected::numeric, 1) AS expected, a.is_anomaly
FROM (VALUES (0.5, 'half day'), (1.0, 'whole day')) e(x, label),
     detect_anomalies(format('SELECT %L, day, CASE WHEN day = ''2025-04-22'' THEN 10 ELSE n END, CASE WHEN day = ''2025-04-22'' THEN %s END FROM counts WHERE mean = 30', label, x),
                      method => 'count', window_size => 112, seasons => 8) a
WHERE a.ts::date = '2025-04-22' ORDER BY a.series;
SELECT count(*) FILTER (WHERE a.expected IS DISTINCT FROM b.expected OR a.p_value IS DISTINCT FROM b.p_value) AS later_days_differ,
       count(*) AS later_days
FROM detect_anomalies($$SELECT 1, day, n, CASE WHEN day IN ('2025-03-03', '2025-03-10') THEN 0.4 END FROM counts WHERE mean = 30$$, method => 'count') a
JOIN detect_anomalies($$SELECT 1, day, CASE WHEN day IN ('2025-03-03', '2025-03-10') THEN NULL ELSE n END FROM counts WHERE mean = 30$$, method => 'count') b
  USING (series, ts)
WHERE a.ts::date > '2025-03-10';
SELECT series, ts::date, value, expected, p_value, is_anomaly
FROM detect_anomalies($$SELECT 1, day, CASE WHEN day = '2025-04-22' THEN 0 ELSE n END, CASE WHEN day = '2025-04-22' THEN 0 END FROM counts WHERE mean = 30$$,
                      method => 'count', window_size => 112, seasons => 8)
WHERE ts::date = '2025-04-22';
-- from a table, with an exposure column: 2 orders by 02:24 (a tenth of the
-- day) are a normal start; as a whole day they are an outage
CREATE TEMP TABLE live (shop text, day date, orders int, observed float8);
INSERT INTO live SELECT 'live', day, CASE WHEN day = '2025-04-22' THEN 2 ELSE n END, CASE WHEN day = '2025-04-22' THEN 0.1 END
FROM counts WHERE mean = 30;
SELECT e.exposure_column, a.value, round(a.expected::numeric, 1) AS expected, a.is_anomaly
FROM (VALUES ('observed'), (NULL)) e(exposure_column),
     detect_anomalies('live'::regclass, 'shop', 'day', 'orders', method => 'count', window_size => 112, seasons => 8,
                      exposure_column => e.exposure_column) a
WHERE a.ts::date = '2025-04-22' ORDER BY 1;

-- the series of one query are one shop's: on a day where a point passed
-- the per-point rule, the other series' points that moved the same way are
-- tested together, by Benjamini-Hochberg at
-- customer_analytics.anomaly_same_day_fdr (0.05) over the day's unflagged
-- points.  Eight categories of ~20 orders a day; on the last day an outage
-- leaves 'a' 2 orders (flagged on its own), b..e 9 each (p ~ 0.01: no
-- flag alone, but four of seven below 4 x 0.05 / 7 together), f a spike
-- of 27 (p ~ 0.14, the other way: not a companion), g and h as usual
CREATE TEMP TABLE shop AS
SELECT c, '2025-01-01'::date + i AS day,
       CASE WHEN i < 111 THEN 20 + (i * 7 + ascii(c)) % 5 - 2
            WHEN c = 'a' THEN 2 WHEN c IN ('b', 'c', 'd', 'e') THEN 9 WHEN c = 'f' THEN 27 ELSE 20 END AS n
FROM unnest('{a,b,c,d,e,f,g,h}'::text[]) c, generate_series(0, 111) i;
SELECT f AS same_day_fdr, series, value, round(expected::numeric, 1) AS expected,
       round(p_value::numeric, 4) AS p_value, is_anomaly
FROM (VALUES (0.05), (0.0)) v(f),
     LATERAL (SELECT set_config('customer_analytics.anomaly_same_day_fdr', f::text, false) AS x) s,
     LATERAL detect_anomalies('SELECT c, day, n FROM shop', method => 'count', window_size => 112, seasons => 8,
                              min_relative_change => 0 * length(s.x)) a
WHERE ts::date = '2025-04-22' ORDER BY 1 DESC, 2;
RESET customer_analytics.anomaly_same_day_fdr;
-- a day without a point past the per-point rule opens nothing: b..e at 9
-- with 'a' as usual are not flagged; nor is anything before the last day
SELECT count(*) FILTER (WHERE is_anomaly) AS flags
FROM detect_anomalies($$SELECT c, day, CASE WHEN c = 'a' AND day = '2025-04-22' THEN 20 ELSE n END FROM shop$$,
                      method => 'count', window_size => 112, seasons => 8);
-- with min_relative_change => 0.6 the drops of b..e (-55%) are no
-- candidates (they still count among the day's points, m = 7)
SELECT series, is_anomaly
FROM detect_anomalies('SELECT c, day, n FROM shop', method => 'count', window_size => 112, seasons => 8,
                      min_relative_change => 0.6)
WHERE ts::date = '2025-04-22' AND is_anomaly ORDER BY 1;

-- min_relative_change is a factor both ways for counts: at 0.5, half the
-- expected orders or fewer, twice or more.  Around 200 a day every last day
-- below is far outside chance (p < 1e-9); +50% and +90% are not changes
-- of that size, nor is -45%; -55% and x2.1 are; at 0 all of them are flagged
SET customer_analytics.anomaly_same_day_fdr = 0;
CREATE TEMP TABLE ratio_days (label text, last_day int);
INSERT INTO ratio_days VALUES ('-45%', 110), ('-55%', 90), ('+50%', 300), ('+90%', 380), ('x2.1', 420);
SELECT a.series, a.value, round(a.expected::numeric, 1) AS expected, a.p_value < 1e-9 AS p_below_1e9,
       bool_or(a.is_anomaly) FILTER (WHERE m.mr = 0.5) AS flagged_at_half,
       bool_or(a.is_anomaly) FILTER (WHERE m.mr = 0) AS flagged_at_0
FROM (VALUES (0.5), (0.0)) m(mr),
     LATERAL detect_anomalies($$SELECT label, '2025-01-01'::date + i,
                                       CASE WHEN i = 111 THEN last_day ELSE 200 + (i * 7) % 29 - 14 END
                                FROM ratio_days, generate_series(0, 111) i$$,
                              method => 'count', window_size => 112, seasons => 8, min_relative_change => m.mr) a
WHERE a.ts::date = '2025-04-22'
GROUP BY 1, 2, 3, 4 ORDER BY a.value;
RESET customer_analytics.anomaly_same_day_fdr;

-- growth: a shop growing 50% a year (a Poisson-like count around
-- 40 x (1 + 0.5 t / 365)) is scored against its level carried forward: at
-- the end of the year the expected orders are within 2% of the true rate,
-- where the mean of the 8 weeks before lags by 2.7%; no day is flagged
CREATE TEMP TABLE growing AS
SELECT '2025-01-01'::date + i AS day, 40 * (1 + 0.5 * i / 365.0) AS rate,
       round(40 * (1 + 0.5 * i / 365.0) + 4 * sin(i * 2.1)) AS n
FROM generate_series(0, 364) i;
SELECT count(*) FILTER (WHERE a.is_anomaly) AS flags,
       round(avg(a.expected / g.rate - 1) FILTER (WHERE g.day >= '2025-12-01')::numeric, 3) AS december_bias,
       round(avg(l.mean8 / g.rate - 1) FILTER (WHERE g.day >= '2025-12-01')::numeric, 3) AS eight_week_mean_bias,
       bool_and(abs(a.expected / g.rate - 1) < 0.02) FILTER (WHERE g.day >= '2025-12-01') AS within_2pct
FROM detect_anomalies('SELECT 1, day, n FROM growing', method => 'count', window_size => 112, seasons => 8) a
JOIN growing g ON g.day = a.ts::date
JOIN LATERAL (SELECT avg(h.n) AS mean8 FROM growing h WHERE h.day >= g.day - 56 AND h.day < g.day) l ON true;

-- a threshold given is a normal score, as for the other methods: |z| > 3
-- means p < 0.0027; the false-alarm setting scales the rule
SELECT count(*) FILTER (WHERE is_anomaly) AS flagged_at_z3,
       bool_and(NOT is_anomaly OR p_value < 0.0027) AS consistent
FROM detect_anomalies('SELECT kind, day, n FROM spread', method => 'count', threshold => 3);
SET customer_analytics.anomaly_false_alarms_per_year = 0;
SELECT count(*) FILTER (WHERE is_anomaly) AS flagged_with_no_false_alarms_allowed
FROM detect_anomalies('SELECT mean, day, n FROM counts', method => 'count');
RESET customer_analytics.anomaly_false_alarms_per_year;
-- the other methods have no p_value
SELECT count(p_value) AS p_values FROM detect_anomalies('SELECT mean, day, n FROM counts', method => 'seasonal');

-- bad input: amounts are not counts, an exposure is a fraction
SELECT * FROM detect_anomalies($$SELECT 1, '2025-01-01'::date + i, i + 0.5 FROM generate_series(0, 9) i$$, method => 'count');
SELECT * FROM detect_anomalies($$SELECT 'a', '2025-01-01'::date + i, -i FROM generate_series(0, 9) i$$, method => 'count');
SELECT * FROM detect_anomalies($$SELECT 'a', '2025-01-01'::date + i, i, 1.5 FROM generate_series(0, 9) i$$, method => 'count');
SELECT * FROM detect_anomalies($$SELECT 'a', '2025-01-01'::date + i, i, 'x'::text FROM generate_series(0, 9) i$$, method => 'count');
SELECT * FROM detect_anomalies('live'::regclass, 'shop', 'day', 'orders', method => 'count', exposure_column => 'nope');
