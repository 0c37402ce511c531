-- Demo step: the star schema in figures.
\pset footer off
\echo '== rows per table'
SELECT c.relname AS "table",
       to_char((xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %s', c.oid::regclass),
                                                     false, true, '')))[1]::text::bigint, 'FM999,999,999') AS rows,
       pg_size_pretty(pg_total_relation_size(c.oid)) AS size
FROM pg_class c
WHERE c.relnamespace = 'customer_analytics'::regnamespace AND c.relkind = 'r'
ORDER BY c.relname;
\echo '== the shop in figures'
SELECT min(d.date) AS first_day, max(d.date) AS last_day,
       count(DISTINCT f.order_id) AS orders,
       to_char(sum(f.revenue) FILTER (WHERE f.status = 'completed'), 'FM999,999,990.00') AS revenue,
       count(DISTINCT c.customer_id) AS buyers
FROM customer_analytics.fact_order_line f
JOIN customer_analytics.dim_date d USING (date_key)
JOIN customer_analytics.dim_customer c USING (customer_key);
\echo '== revenue by category (completed lines)'
SELECT p.category, to_char(sum(f.revenue), 'FM999,999,990.00') AS revenue, count(*) AS lines
FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_product p USING (product_key)
WHERE f.status = 'completed'
GROUP BY p.category ORDER BY sum(f.revenue) DESC;
\echo '== planted anomalies (ground truth for the detectors)'
SELECT series, day, kind, round(factor::numeric, 2) AS factor
FROM customer_analytics.sample_anomaly ORDER BY day;
