-- Demo step: RFM scores, segments and the best customers.
\pset footer off
\timing on
SELECT customer_analytics.refresh_customer_rfm() AS rfm_rows_written;
REFRESH MATERIALIZED VIEW customer_analytics.top_customers;
REFRESH MATERIALIZED VIEW customer_analytics.segment_summary;
\timing off
\echo '== customers per RFM segment'
SELECT segment, customers, to_char(revenue, 'FM999,999,990.00') AS revenue,
       to_char(100 * revenue_share, 'FM990.0') || '%' AS share, avg_order_value, avg_orders, avg_recency_days
FROM customer_analytics.segment_summary ORDER BY revenue DESC;
\echo '== top 10 customers by monetary value'
SELECT rank, customer_id, name, country, to_char(monetary, 'FM999,990.00') AS monetary, frequency,
       recency_days, rfm_cell, segment
FROM customer_analytics.top_customers WHERE rank <= 10 ORDER BY rank;
