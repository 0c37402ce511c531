-- The sales views, the anomalies view and its alerts, on a small sample
-- shop; every figure against an independent computation on the facts.
-- In a database of its own: what earlier tests left behind stays out.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
SELECT current_database() AS regress_db \gset
CREATE DATABASE ca_zscore_views;
\c ca_zscore_views
\i :abs_srcdir/sql/include/preamble.sql

SELECT count(*) FROM generate_sample_data(customers => 4000, days => 240, seed => 42, events => false);
SELECT count(*) FROM transform();
SELECT refresh_sales_views(concurrent => false);
-- again, concurrently (the unique indexes allow it)
SELECT refresh_sales_views();

-- daily_sales: every day from the first to the last sale, and the facts' totals
SELECT count(*) AS days, max(day) - min(day) + 1 AS span, count(*) FILTER (WHERE orders = 0) AS empty_days
FROM daily_sales;
WITH f AS (
    SELECT d.date AS day, sum(f.revenue) AS revenue, count(DISTINCT f.order_id) AS orders,
           count(DISTINCT c.customer_id) FILTER (WHERE f.customer_key <> -1) AS customers
    FROM fact_order_line f JOIN dim_date d USING (date_key) JOIN dim_customer c USING (customer_key)
    WHERE f.status = 'completed' GROUP BY 1
)
SELECT count(*) AS days_compared,
       count(*) FILTER (WHERE s.revenue <> f.revenue OR s.orders <> f.orders OR s.customers <> f.customers) AS differ,
       count(*) FILTER (WHERE s.avg_order_value <> round(f.revenue / f.orders, 2)) AS aov_differs
FROM daily_sales s JOIN f USING (day);

-- product_category_sales: dense by day; days add up to daily_sales, months to days
SELECT count(DISTINCT category) AS categories, count(*) AS day_rows,
       count(*) = count(DISTINCT category) * (SELECT count(*) FROM daily_sales) AS dense
FROM product_category_sales WHERE grain = 'day';
SELECT count(*) FILTER (WHERE c.revenue <> s.revenue) AS day_revenue_differs
FROM (SELECT period_start AS day, sum(revenue) AS revenue FROM product_category_sales WHERE grain = 'day' GROUP BY 1) c
JOIN daily_sales s USING (day);
SELECT count(*) AS months,
       count(*) FILTER (WHERE m.revenue <> d.revenue OR m.units <> d.units) AS differ
FROM product_category_sales m
JOIN (SELECT category, date_trunc('month', period_start)::date AS period_start, sum(revenue) AS revenue, sum(units) AS units
      FROM product_category_sales WHERE grain = 'day' GROUP BY 1, 2) d USING (category, period_start)
WHERE m.grain = 'month';

-- anomalies: what detect_anomalies flags with the documented settings,
-- and every row passes them (a change of at least 50%, and p at most 0.5
-- false alarms a year / 365.25 days, or a day with such a row)
SELECT count(*) = (SELECT count(*) FROM detect_anomalies(
           $q$SELECT category, period_start::timestamp AT TIME ZONE 'UTC', orders FROM product_category_sales WHERE grain = 'day'
              UNION ALL SELECT 'total', day::timestamp AT TIME ZONE 'UTC', orders FROM daily_sales$q$,
           method => 'count', window_size => 112, seasons => 8, min_relative_change => 0.5) WHERE is_anomaly) AS same_as_detect,
       bool_and((p_value <= 0.5 / 365.25 OR EXISTS (SELECT FROM anomalies b WHERE b.day = a.day AND b.p_value <= 0.5 / 365.25))
                AND abs(orders - expected) >= 0.5 * expected - 0.05
                AND sign(z) = CASE direction WHEN 'spike' THEN 1 ELSE -1 END) AS all_pass
FROM anomalies a;
-- (how many planted anomalies the view finds depends on the shop's size:
-- bench/anomaly_quality.sh measures it; this shop is too small to tell)

-- alerts: one per anomaly, once
SELECT alert_new_anomalies() = (SELECT count(*) FROM anomalies) AS one_per_anomaly;
SELECT alert_new_anomalies() AS raised_again;
SELECT count(*) AS alerts, count(DISTINCT dedup_key) AS keys, bool_and(kind = 'anomaly') AS all_anomaly
FROM alert;
-- the alerts are the anomalies, with their figures
SELECT count(*) AS alerted, count(an.series) AS matched,
       bool_and(al.details->>'direction' = an.direction AND (al.details->>'orders')::bigint = an.orders
                AND (al.details->>'p_value')::float8 = to_char(an.p_value, '9.99EEEE')::numeric::float8) AS same_figures
FROM alert al LEFT JOIN anomalies an
  ON al.subject = an.series AND al.details->>'day' = an.day::text
WHERE al.kind = 'anomaly';
-- an acknowledged alert is not raised again; a forgotten one is
SELECT acknowledge_alert(min(alert_id)) FROM alert;
DELETE FROM alert WHERE alert_id = (SELECT max(alert_id) FROM alert);
SELECT alert_new_anomalies() AS raised_after_delete;

\c :regress_db
DROP DATABASE ca_zscore_views;
