-- The analyst's cookbook: reports on the customer_analytics star schema,
-- each a single query to copy into psql or a BI tool.
--
-- "Today" is the last day with order lines, not now(), so that every report
-- also works on a historical export (and the test suite can run them all:
-- sql/95_sample_reports.sql executes this file against the sample shop and
-- compares the output).  Replace the `today` CTE by current_date for a live
-- shop.  Revenue is always that of completed order lines (cancelled ones
-- never happened, returned ones came back).  Every query ends with an
-- ORDER BY that decides every row's place.
--
-- Run after transform() and the pipeline's refreshes (CALL
-- customer_analytics.run_pipeline(), or transform(), refresh_sales_views(),
-- refresh_clickstream(), refresh_forecasts()).

\echo '== 1. Top 10 customers over the last 12 months'
-- Revenue, orders, first and last order of each customer (all the SCD2
-- versions of a customer count as one), their share of the period's revenue
-- and their RFM segment as of today.
WITH today AS (
    SELECT max(d.date) AS last_day
    FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_date d USING (date_key)
),
lines AS (
    SELECT c.customer_id, f.order_id, f.order_ts, f.revenue
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_customer c USING (customer_key)
    JOIN customer_analytics.dim_date d USING (date_key), today
    WHERE f.status = 'completed' AND f.customer_key <> -1
      AND d.date > today.last_day - interval '12 months'
),
per_customer AS (
    SELECT customer_id, sum(revenue) AS revenue, count(DISTINCT order_id) AS orders,
           min(order_ts)::date AS first_order, max(order_ts)::date AS last_order
    FROM lines GROUP BY customer_id
)
SELECT rank() OVER (ORDER BY p.revenue DESC) AS rank,
       p.customer_id, cur.name, cur.country, p.revenue, p.orders, p.first_order, p.last_order,
       round(100 * p.revenue / sum(p.revenue) OVER (), 2) AS pct_of_revenue,
       r.segment
FROM per_customer p
JOIN customer_analytics.dim_customer cur ON cur.customer_id = p.customer_id AND cur.is_current
LEFT JOIN customer_analytics.rfm(as_of => ((SELECT last_day FROM today) + 1)::timestamptz) r
       ON r.customer_id = p.customer_id
ORDER BY p.revenue DESC, p.customer_id
LIMIT 10;

\echo '== 2. Category sales month over month (the last three months)'
-- Revenue, orders and units per category and calendar month, with the
-- change against the previous month (NULL when the month before had no
-- sales).  days: the days of the month with sales in the category; the
-- last month is usually partial, so compare it with care.
WITH today AS (
    SELECT max(d.date) AS last_day
    FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_date d USING (date_key)
),
monthly AS (
    SELECT p.category, date_trunc('month', d.date)::date AS month,
           sum(f.revenue) AS revenue, count(DISTINCT f.order_id) AS orders, sum(f.quantity) AS units,
           count(DISTINCT d.date) AS days
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_product p USING (product_key)
    JOIN customer_analytics.dim_date d USING (date_key)
    WHERE f.status = 'completed'
    GROUP BY 1, 2
),
mom AS (
    SELECT m.*, lag(revenue) OVER (PARTITION BY category ORDER BY month) AS prev_revenue,
           lag(month) OVER (PARTITION BY category ORDER BY month) AS prev_month
    FROM monthly m
)
SELECT category, month, days, revenue, orders, units,
       CASE WHEN prev_month = (month - interval '1 month')::date THEN prev_revenue END AS prev_month_revenue,
       CASE WHEN prev_month = (month - interval '1 month')::date AND prev_revenue > 0
            THEN round(100 * (revenue / prev_revenue - 1), 1) END AS change_pct
FROM mom, today
WHERE month > date_trunc('month', today.last_day) - interval '3 months'
ORDER BY category, month;

\echo '== 3. Cohort retention by first-order month'
-- Customers grouped by the month of their first completed order; for each
-- of the following months, the percentage of the cohort that ordered again
-- in it (m0 is the first month itself: 100).  A month that has not begun
-- yet for a cohort is NULL, not 0; the current month is partial.
WITH today AS (
    SELECT max(d.date) AS last_day
    FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_date d USING (date_key)
),
activity AS (
    SELECT DISTINCT c.customer_id, date_trunc('month', d.date)::date AS month
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_customer c USING (customer_key)
    JOIN customer_analytics.dim_date d USING (date_key)
    WHERE f.status = 'completed' AND f.customer_key <> -1
),
cohort AS (
    SELECT customer_id, min(month) AS cohort FROM activity GROUP BY customer_id
),
offsets AS (
    SELECT c.cohort, a.customer_id,
           (extract(year FROM age(a.month, c.cohort)) * 12 + extract(month FROM age(a.month, c.cohort)))::int AS m
    FROM activity a JOIN cohort c USING (customer_id)
),
sizes AS (
    SELECT cohort, count(*) AS customers FROM cohort GROUP BY cohort
)
SELECT s.cohort, s.customers,
       round(100.0 * count(*) FILTER (WHERE m = 0) / s.customers, 1) AS m0,
       CASE WHEN s.cohort + interval '1 month' <= t.last_day THEN round(100.0 * count(*) FILTER (WHERE m = 1) / s.customers, 1) END AS m1,
       CASE WHEN s.cohort + interval '2 months' <= t.last_day THEN round(100.0 * count(*) FILTER (WHERE m = 2) / s.customers, 1) END AS m2,
       CASE WHEN s.cohort + interval '3 months' <= t.last_day THEN round(100.0 * count(*) FILTER (WHERE m = 3) / s.customers, 1) END AS m3,
       CASE WHEN s.cohort + interval '4 months' <= t.last_day THEN round(100.0 * count(*) FILTER (WHERE m = 4) / s.customers, 1) END AS m4,
       CASE WHEN s.cohort + interval '5 months' <= t.last_day THEN round(100.0 * count(*) FILTER (WHERE m = 5) / s.customers, 1) END AS m5,
       CASE WHEN s.cohort + interval '6 months' <= t.last_day THEN round(100.0 * count(*) FILTER (WHERE m = 6) / s.customers, 1) END AS m6
FROM sizes s JOIN offsets o USING (cohort), today t
GROUP BY s.cohort, s.customers, t.last_day
ORDER BY s.cohort;

\echo '== 4. Customers who slipped from Champions to At Risk since last month'
-- rfm() scored twice: as of the end of today and as of the same day a month
-- earlier (each date with its own quintiles).  Champions then, At Risk now:
-- high-value customers who stopped buying, the first to win back.  With the
-- default segment map this needs the recency score to fall from 5 to 1-2,
-- so over one month the list is short or empty; widen the interval (in both
-- places) to look further back, and see 4b for where the others went.
WITH today AS (
    SELECT max(d.date) AS last_day
    FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_date d USING (date_key)
),
now_ AS (
    SELECT * FROM customer_analytics.rfm(as_of => ((SELECT last_day FROM today) + 1)::timestamptz)
),
then_ AS (
    SELECT * FROM customer_analytics.rfm(as_of => ((SELECT last_day FROM today) + 1 - interval '1 month')::timestamptz)
)
SELECT n.customer_id, c.name, c.email, t.rfm_cell AS cell_then, n.rfm_cell AS cell_now,
       n.recency_days, n.frequency, n.monetary
FROM now_ n
JOIN then_ t USING (customer_id)
JOIN customer_analytics.dim_customer c ON c.customer_id = n.customer_id AND c.is_current
WHERE t.segment = 'Champions' AND n.segment = 'At Risk'
ORDER BY n.monetary DESC, n.customer_id;

\echo '== 4b. Where last month''s Champions are now'
-- The same two scorings: every segment last month's Champions moved to.
WITH today AS (
    SELECT max(d.date) AS last_day
    FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_date d USING (date_key)
)
SELECT n.segment AS segment_now, count(*) AS customers, sum(n.monetary) AS monetary
FROM customer_analytics.rfm(as_of => ((SELECT last_day FROM today) + 1 - interval '1 month')::timestamptz) t
JOIN customer_analytics.rfm(as_of => ((SELECT last_day FROM today) + 1)::timestamptz) n USING (customer_id)
WHERE t.segment = 'Champions'
GROUP BY n.segment
ORDER BY count(*) DESC, n.segment;

\echo '== 5. Anomalies of the last 7 days, with their context'
-- Every point the anomalies view flagged in the last 7 days: the orders
-- that day against the expected count, the revenue that day against the
-- same weekday of the 4 weeks before, and whether its alert was raised and
-- acknowledged (alert_new_anomalies(), kind 'anomaly').
WITH today AS (
    SELECT max(d.date) AS last_day
    FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_date d USING (date_key)
),
revenue AS (
    SELECT period_start AS day, category AS series, revenue
    FROM customer_analytics.product_category_sales WHERE grain = 'day'
    UNION ALL
    SELECT day, 'total', revenue FROM customer_analytics.daily_sales
)
SELECT a.day, to_char(a.day, 'Dy') AS weekday, a.series, a.direction, a.orders, a.expected,
       round(a.z::numeric, 2) AS z, to_char(a.p_value, '9.99EEEE') AS p_value,
       r.revenue,
       (SELECT round(avg(r4.revenue), 2) FROM revenue r4
        WHERE r4.series = a.series AND r4.day IN (a.day - 7, a.day - 14, a.day - 21, a.day - 28)) AS revenue_same_weekday_4w,
       al.alert_id IS NOT NULL AS alerted, al.acknowledged
FROM customer_analytics.anomalies a
CROSS JOIN today
LEFT JOIN revenue r ON r.series = a.series AND r.day = a.day
LEFT JOIN customer_analytics.alert al
       ON al.kind = 'anomaly' AND al.dedup_key = 'anomaly:' || a.series || ':' || a.day
WHERE a.day > today.last_day - 7
ORDER BY a.day DESC, a.series;

\echo '== 6. Funnel by channel over the last 28 days'
-- Sessions (by the channel of their first event) reaching each step of the
-- closed funnel, the step-to-step rates and the overall conversion.
WITH today AS (
    SELECT max(d.date) AS last_day
    FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_date d USING (date_key)
)
SELECT channel, sum(sessions) AS sessions,
       sum(product_view_sessions) AS viewed, sum(add_to_cart_sessions) AS carted,
       sum(checkout_sessions) AS checked_out, sum(purchase_sessions) AS purchased,
       round(100.0 * sum(product_view_sessions) / nullif(sum(sessions), 0), 1) AS view_pct,
       round(100.0 * sum(add_to_cart_sessions) / nullif(sum(product_view_sessions), 0), 1) AS cart_pct,
       round(100.0 * sum(checkout_sessions) / nullif(sum(add_to_cart_sessions), 0), 1) AS checkout_pct,
       round(100.0 * sum(purchase_sessions) / nullif(sum(checkout_sessions), 0), 1) AS purchase_pct,
       round(100.0 * sum(purchase_sessions) / nullif(sum(sessions), 0), 2) AS conversion_pct
FROM customer_analytics.funnel_daily, today
WHERE date > today.last_day - 28 AND date <= today.last_day
GROUP BY channel
ORDER BY sum(sessions) DESC, channel;

\echo '== 7. Forecast against actual'
-- The days of sales_forecast that have happened since it was trained
-- (refresh it less often than the data arrives, or set
-- customer_analytics.as_of, to have some): per series, the mean absolute
-- percentage error and how many actual days fell inside the 95% interval.
-- A day without sales counts as 0 revenue.
WITH today AS (
    SELECT max(d.date) AS last_day
    FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_date d USING (date_key)
),
actual AS (
    SELECT 'category' AS scope, category, period_start AS day, revenue
    FROM customer_analytics.product_category_sales WHERE grain = 'day'
    UNION ALL
    SELECT 'total', '(all)', day, revenue FROM customer_analytics.daily_sales
),
compared AS (
    SELECT f.scope, f.category, f.day, f.revenue AS forecast, f.revenue_lo, f.revenue_hi,
           coalesce(a.revenue, 0)::float8 AS actual
    FROM customer_analytics.sales_forecast f
    CROSS JOIN today
    LEFT JOIN actual a USING (scope, category, day)
    WHERE f.day <= today.last_day
)
SELECT scope, category, count(*) AS days, min(day) AS first_day, max(day) AS last_day,
       round(sum(actual)::numeric, 2) AS actual, round(sum(forecast)::numeric, 2) AS forecast,
       round((100 * avg(abs(actual - forecast) / actual) FILTER (WHERE actual > 0))::numeric, 1) AS mape_pct,
       count(*) FILTER (WHERE actual BETWEEN revenue_lo AND revenue_hi) AS days_in_interval
FROM compared
GROUP BY scope, category
ORDER BY scope DESC, category;

\echo '== 7b. Forecast against actual, day by day, for the shop total'
WITH today AS (
    SELECT max(d.date) AS last_day
    FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_date d USING (date_key)
)
SELECT f.day, to_char(f.day, 'Dy') AS weekday, round(coalesce(s.revenue, 0), 2) AS actual,
       round(f.revenue::numeric, 2) AS forecast,
       round(f.revenue_lo::numeric, 2) AS lower_95, round(f.revenue_hi::numeric, 2) AS upper_95,
       CASE WHEN coalesce(s.revenue, 0) < f.revenue_lo THEN 'below'
            WHEN coalesce(s.revenue, 0) > f.revenue_hi THEN 'above' ELSE 'inside' END AS actual_is
FROM customer_analytics.sales_forecast f
CROSS JOIN today
LEFT JOIN customer_analytics.daily_sales s USING (day)
WHERE f.scope = 'total' AND f.day <= today.last_day
ORDER BY f.day;
