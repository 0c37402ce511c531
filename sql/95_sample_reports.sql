-- Every query of the analyst's cookbook, docs/sample_reports.sql, run
-- against the sample shop, so that none of them rots: a renamed column or
-- view makes this test fail.  The data is fixed (seed, start date), the
-- cookbook's "today" is the last day of the data, and the forecast is
-- trained as of two weeks before it so that "forecast against actual" has
-- days to compare.  Then a few figures of the reports are recomputed
-- independently.  In a database of its own, so that what earlier tests
-- left in the star schema does not count.  (The cookbook runs with the
-- default search_path, as an analyst's session has it.)
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
SELECT current_database() AS regress_db \gset
CREATE DATABASE ca_sample_reports;
\c ca_sample_reports
\i :abs_srcdir/sql/include/settings.sql
CREATE EXTENSION customer_analytics;
SET extra_float_digits = 0;
SELECT count(*) > 0 AS generated
FROM customer_analytics.generate_sample_data(customers => 1200, days => 150, seed => 1, start_date => '2025-01-06');
SELECT count(*) > 0 AS transformed FROM customer_analytics.transform();
SELECT count(*) > 0 AS sessions_built FROM customer_analytics.refresh_clickstream();
SELECT customer_analytics.refresh_sales_views(false);
SELECT customer_analytics.alert_new_anomalies() >= 0 AS alerted;
-- train the forecast as of two weeks before the last day
SELECT max(d.date) AS last_day FROM customer_analytics.fact_order_line f
JOIN customer_analytics.dim_date d USING (date_key) \gset
SELECT set_config('customer_analytics.as_of', (:'last_day'::date - 13)::text, false) IS NOT NULL AS as_of_set;
REFRESH MATERIALIZED VIEW customer_analytics.sales_forecast;
SELECT min(day), max(day) FROM customer_analytics.sales_forecast;

\set cookbook :abs_srcdir '/docs/sample_reports.sql'
-- the results only (the file's own text is not echoed: its \echo lines
-- name each report)
\set ECHO none
\i :cookbook
\set ECHO all

-- independent checks
-- 1: the top customer's 12-month revenue, from the staging rows the sample wrote
-- (latest staged version of each order line, completed)
WITH lines AS (
    SELECT DISTINCT ON (order_id, line_number) customer_id, order_ts, quantity * unit_price - discount AS revenue, status
    FROM customer_analytics.stg_orders ORDER BY order_id, line_number, stage_id DESC
)
SELECT customer_id, sum(revenue) AS revenue FROM lines
WHERE status = 'completed' AND customer_id IS NOT NULL
  AND order_ts::date > :'last_day'::date - interval '12 months'
GROUP BY customer_id ORDER BY sum(revenue) DESC, customer_id LIMIT 1;
-- 3: the first cohort's size: customers whose first completed order is in the first month
SELECT count(*) AS first_cohort_customers FROM (
    SELECT customer_id FROM customer_analytics.fact_order_line JOIN customer_analytics.dim_customer USING (customer_key)
    WHERE status = 'completed' AND customer_key <> -1
    GROUP BY customer_id HAVING min(order_ts) < '2025-02-01') c;
-- 4b: every customer who was a Champion a month ago is somewhere now
SELECT count(*) AS champions_a_month_ago
FROM customer_analytics.rfm(as_of => (:'last_day'::date + 1 - interval '1 month')::timestamptz)
WHERE segment = 'Champions';
-- 6: sessions of the last 28 days, straight from the sessions table
SELECT count(*) AS sessions_28d FROM customer_analytics.sessions s
JOIN customer_analytics.dim_date d USING (date_key)
WHERE d.date > :'last_day'::date - 28 AND d.date <= :'last_day'::date;
-- 7: the total forecast's absolute percentage error, from sales_series()
SELECT round((100 * avg(abs(s.revenue - f.revenue) / s.revenue) FILTER (WHERE s.revenue > 0))::numeric, 1) AS total_mape_pct
FROM customer_analytics.sales_forecast f
JOIN customer_analytics.sales_series(:'last_day'::date - 13, :'last_day'::date) s
  ON s.scope = 'total' AND s.day = f.day
WHERE f.scope = 'total';
RESET customer_analytics.as_of;
\c :regress_db
DROP DATABASE ca_sample_reports;
