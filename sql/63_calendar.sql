-- The business calendar on a hand-made shop: 12 weeks of orders, never on
-- Saturdays, a closed Monday (a holiday) and a real drop on a Wednesday.
-- Closed days: entered (dates, weekdays) or recognised (a weekday without
-- any order); never flagged, in no baseline; forecast as 0, fitted on open
-- days only; never a forecast miss.  A duplicate entry is refused naming
-- the day; an entry outside the data is harmless.  The day in progress is
-- never scored as a whole day.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
SET extra_float_digits = 0;
-- the refused entries below do not end the transaction
\set ON_ERROR_ROLLBACK on
BEGIN;
CALL pg_temp.reset_warehouse(also => '{closed_day}');
SELECT refresh_sales_rollup(full_refresh => true) >= 0 AS rollup_cleared;

-- orders per weekday Mon..Sun: 20, 18, 19, 21, 25, 0, 10, give or take 2;
-- 2025-02-17 (a Monday) closed, 2025-03-12 (a Wednesday) 3 orders, and
-- 2025-03-24 (a Monday) closed too, not entered before the forecast
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price)
SELECT d::date || '-' || o, 1, 'c' || ((o * 7 + extract(doy FROM d)::int) % 40), 'P' || (o % 3),
       d + interval '9 hours' + o * interval '10 minutes', 1, 10
FROM generate_series('2025-01-06'::date, '2025-03-30', interval '1 day') d
CROSS JOIN LATERAL generate_series(1,
    CASE WHEN d::date IN ('2025-02-17', '2025-03-24') THEN 0
         WHEN d::date = '2025-03-12' THEN 3
         WHEN extract(isodow FROM d) = 6 THEN 0
         ELSE (ARRAY[20, 18, 19, 21, 25, 0, 10])[extract(isodow FROM d)::int]
              + (extract(doy FROM d)::int * 7) % 5 - 2 END) o;
SELECT count(*) > 0 AS transformed FROM transform();
SELECT refresh_sales_views(false);

-- Saturday is recognised: no order on any of the 12
SELECT idle_weekdays();
-- before the holiday is entered: the closed Monday is a "drop" (and the
-- Saturdays are not: never in the series)
SELECT day, to_char(day, 'Dy') AS weekday, orders, direction FROM anomalies WHERE series = 'total' ORDER BY day;

-- the calendar: dates and weekdays, one row each
INSERT INTO closed_day (day, name) VALUES ('2025-02-17', 'Family Day'), ('2030-01-01', 'New Year''s Day');
INSERT INTO closed_day (weekday, name) VALUES (6, 'Saturday');
\set VERBOSITY default
INSERT INTO closed_day (day, name) VALUES ('2025-02-17', 'Family Day again');
INSERT INTO closed_day (weekday, name) VALUES (6, 'Saturdays again');
INSERT INTO closed_day (day, weekday, name) VALUES ('2025-02-18', 2, 'both');
INSERT INTO closed_day (name) VALUES ('neither');
SELECT * FROM closed_days('2025-02-14', '2025-02-23') ORDER BY day;
-- after: the holiday is no anomaly and out of every baseline, the real
-- drop is still flagged; a closed day is never a point of the series
SELECT refresh_sales_views(false);
SELECT day, to_char(day, 'Dy') AS weekday, orders, direction FROM anomalies WHERE series = 'total' ORDER BY day;
SELECT count(*) AS closed_days_in_series FROM order_count_series s
WHERE (s.ts AT TIME ZONE 'UTC')::date IN (SELECT day FROM closed_days('2025-01-06', '2025-03-30'));

-- the forecast: trained to 2025-03-16, 0 on closed days (the Saturdays, a
-- holiday entered ahead), about the weekday's level on open days
INSERT INTO closed_day (day, name) VALUES ('2025-03-21', 'Spring holiday');
SET customer_analytics.as_of = '2025-03-17';
REFRESH MATERIALIZED VIEW sales_forecast;
SELECT day, to_char(day, 'Dy') AS weekday, round(revenue::numeric) AS forecast,
       round(revenue_lo::numeric) AS lo, round(revenue_hi::numeric) AS hi
FROM sales_forecast WHERE scope = 'total' AND day <= '2025-03-30' ORDER BY day;
-- the fit ignores closed days: its residual spread is the open days' noise
-- (about 2 orders, 20), well below that of the same series with the closed
-- days as zeros
SELECT f.trained_through, round(f.residual_sd::numeric) AS residual_sd,
       round((SELECT (holt_winters(s.day, s.revenue)).residual_sd FROM sales_series('2025-01-06', '2025-03-16') s
              WHERE s.scope = 'total')::numeric) AS residual_sd_closed_as_zero
FROM sales_forecast f WHERE f.scope = 'total' LIMIT 1;
RESET customer_analytics.as_of;
-- 2025-03-24 had no sales: a miss while it is not known as closed (the
-- drop of 2025-03-12 came before the forecast) ...
SAVEPOINT before_closure;
SELECT category, day, actual, round(forecast::numeric) AS forecast
FROM alert_forecast_misses() WHERE category = '(all)' ORDER BY day;
ROLLBACK TO SAVEPOINT before_closure;
-- ... and none once it is
INSERT INTO closed_day (day, name) VALUES ('2025-03-24', 'Stocktaking');
SELECT category, day, actual, round(forecast::numeric) AS forecast
FROM alert_forecast_misses() WHERE category = '(all)' ORDER BY day;

-- the day in progress: the data ends on a whole Sunday (its last order at
-- the usual time) ...
SELECT day_in_progress() AS in_progress, sales_training_end() AS last_complete_day;
-- ... then an export cut on Monday morning: 4 orders by 09:40, when Mondays
-- run to about noon.  Not a whole day: not scored (a drop otherwise), not
-- a day to train on or to compare with the forecast
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price)
SELECT '2025-03-31-' || o, 1, 'c' || o, 'P1', timestamptz '2025-03-31 09:00+00' + o * interval '10 minutes', 1, 10
FROM generate_series(1, 4) o;
SELECT count(*) > 0 AS transformed FROM transform();
SELECT refresh_sales_views(false);
SELECT day_in_progress() AS in_progress, sales_training_end() AS last_complete_day;
SELECT count(*) AS scored FROM order_count_series WHERE ts = '2025-03-31 00:00+00';
SELECT day, orders, direction FROM anomalies WHERE series = 'total' AND day >= '2025-03-25' ORDER BY day;
-- scripts/charts.sh's daily revenue: the day in progress is not on the
-- line of whole days, but marked apart with its time so far (its queries)
SELECT max(s.day) AS last_day_on_the_line FROM daily_sales s
WHERE s.day IS DISTINCT FROM day_in_progress();
SELECT s.day, s.revenue,
       (SELECT to_char(max(f.order_ts) AT TIME ZONE business_timezone(), 'HH24:MI')
        FROM fact_order_line f WHERE f.status = 'completed') AS so_far_to
FROM daily_sales s WHERE s.day = day_in_progress();
-- a live shop: a line today makes today the day in progress, whatever the hour
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price)
VALUES ('today-1', 1, 'c1', 'P1', now(), 1, 10);
SELECT count(*) > 0 AS transformed FROM transform();
SELECT day_in_progress() = (now() AT TIME ZONE business_timezone())::date AS today_in_progress;
ROLLBACK;
\unset ON_ERROR_ROLLBACK
