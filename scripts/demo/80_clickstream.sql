-- Demo step: the clickstream, sessionized, and its funnel.
\pset footer off
\echo '== clickstream: events to sessions (what the per-minute job runs)'
SELECT * FROM customer_analytics.refresh_clickstream();
\echo '== sessions: how long, how deep, how many convert'
SELECT count(*) AS sessions,
       count(DISTINCT visitor) AS visitors,
       to_char(avg(duration), 'HH24:MI:SS') AS avg_duration,
       round(avg(pages), 1) AS avg_pages,
       round(100.0 * avg(converted::int), 2) AS conversion_pct,
       (SELECT count(*) FROM customer_analytics.fact_event WHERE customer_stitched) AS events_stitched
FROM customer_analytics.sessions;
\echo '== funnel by channel over the whole period (closed funnel: each step after the previous one)'
SELECT channel, sum(sessions) AS sessions, sum(product_view_sessions) AS viewed,
       sum(add_to_cart_sessions) AS carted, sum(checkout_sessions) AS checked_out,
       sum(purchase_sessions) AS purchased,
       round(sum(purchase_sessions) / sum(sessions), 4) AS funnel_conversion
FROM customer_analytics.funnel_daily
GROUP BY channel ORDER BY sum(sessions) DESC;
\echo '== purchases in the clickstream that match an order'
SELECT count(*) AS purchase_events, count(*) FILTER (WHERE order_found) AS matched
FROM customer_analytics.purchase_order;
\echo '== most viewed products and how often a view turns into a purchase'
SELECT product_id, category, views, purchases, view_to_buy_rate
FROM customer_analytics.product_interest ORDER BY views DESC LIMIT 5;
