-- A live shop's day, run by run: the pipeline runs every hour while the
-- orders of the day come in.  A normal day raises no alert at any hour and
-- is never scored as a whole day while in progress; an outage from 10:00
-- (no order after it) is alerted by the 11:00 run, once.  The generated
-- shop (50,000 customers, 8 weeks and 3 days, no planted anomaly) ends on
-- Wednesday 2025-03-05, the "today" of the runs.  In a database of its own.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
SELECT current_database() AS regress_db \gset
CREATE DATABASE ca_live_shop;
\c ca_live_shop
\i :abs_srcdir/sql/include/preamble.sql
SELECT count(*) > 0 AS generated
FROM generate_sample_data(customers => 50000, days => 59, seed => 5, start_date => '2025-01-06', events => false,
                          defects => false);
SELECT count(*) AS planted_anomalies FROM sample_anomaly;
SELECT count(*) > 0 AS transformed FROM transform();

-- a normal day: at every hourly run, today so far and the last hour
-- against the same hours of the 8 Wednesdays before
SELECT h AS run_at, i.orders_so_far, i.expected_so_far, i.orders_last_hour, i.expected_last_hour,
       i.outage, alert_intraday(timestamptz '2025-03-05 00:00+00' + h * interval '1 hour') AS alerts
FROM generate_series(1, 23) h,
     intraday_orders(timestamptz '2025-03-05 00:00+00' + h * interval '1 hour') i
ORDER BY h;
-- at 07:00 the day is in progress (this morning's orders only): not scored
-- as a whole day by the anomalies view, not trained on by the forecast
BEGIN;
DELETE FROM fact_order_line WHERE order_ts >= '2025-03-05 07:00+00';
SELECT day_in_progress(), sales_training_end();
SELECT refresh_sales_views(false);
SELECT count(*) AS today_flagged FROM anomalies WHERE day = '2025-03-05';
ROLLBACK;

-- an outage from 10:00: no order after it
BEGIN;
DELETE FROM fact_order_line WHERE order_ts >= '2025-03-05 10:00+00';
SELECT h AS run_at, i.orders_so_far, i.expected_so_far, i.orders_last_hour, i.expected_last_hour,
       i.outage, alert_intraday(timestamptz '2025-03-05 00:00+00' + h * interval '1 hour') AS alerts
FROM generate_series(8, 14) h,
     intraday_orders(timestamptz '2025-03-05 00:00+00' + h * interval '1 hour') i
ORDER BY h;
SELECT kind, subject, details->>'at' AS at, details->>'orders_last_hour' AS orders_last_hour
FROM alert WHERE kind = 'intraday_drop';
ROLLBACK;
-- a closed day is not scored at all
BEGIN;
INSERT INTO closed_day (day, name) VALUES ('2025-03-05', 'Stocktaking');
SELECT count(*) AS rows_on_a_closed_day FROM intraday_orders('2025-03-05 11:00+00');
ROLLBACK;
SELECT poisson_lower_tail(0, 17.5) < 1e-7 AS empty_hour_unlikely, poisson_lower_tail(15, 17.5) > 0.1 AS fifteen_usual;

\c :regress_db
DROP DATABASE ca_live_shop;
