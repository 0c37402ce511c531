-- Demo step: daily sales views, the anomalies the default detector finds
-- (against the ones the generator planted), alerts for them, and a rolling
-- z-score over a sliding window.
\pset footer off
\timing on
\echo '== refreshing daily_sales, product_category_sales, anomalies'
SELECT customer_analytics.refresh_sales_views();
\echo '== the last week of daily sales'
SELECT day, revenue, orders, customers, avg_order_value
FROM customer_analytics.daily_sales ORDER BY day DESC LIMIT 7;
\echo '== anomalies (count method on daily orders, customer_analytics.anomaly_false_alarms_per_year) and what was planted'
\echo '   (an outage of the whole shop, planted on the total, drops every category that day too)'
SELECT COALESCE(a.series, p.series) AS series, COALESCE(a.day, p.day) AS day,
       a.orders, a.expected, round(a.z::numeric, 1) AS z, to_char(a.p_value, '9.9EEEE') AS p_value, a.direction,
       p.kind AS planted
FROM customer_analytics.anomalies a
FULL JOIN customer_analytics.sample_anomaly p USING (series, day)
ORDER BY 2, 1;
\echo '== alerts raised (one per anomaly; NOTIFY customer_analytics_alerts)'
SELECT customer_analytics.alert_new_anomalies() AS raised;
SELECT customer_analytics.alert_new_anomalies() AS raised_again;
\echo '== rolling z-score of daily revenue against the previous 28 days (O(1) per row), the top 5'
SELECT day, revenue, round(customer_analytics.stats_mean(s)::numeric, 2) AS mean_28d,
       round(customer_analytics.stats_stddev(s)::numeric, 2) AS sd_28d,
       round(customer_analytics.zscore(revenue::float8, s)::numeric, 2) AS z
FROM (SELECT day, revenue,
             customer_analytics.stats_agg(revenue::float8) OVER (ORDER BY day ROWS BETWEEN 28 PRECEDING AND 1 PRECEDING) AS s
      FROM customer_analytics.daily_sales) t
ORDER BY abs(customer_analytics.zscore(revenue::float8, s)) DESC NULLS LAST LIMIT 5;
