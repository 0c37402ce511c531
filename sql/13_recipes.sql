-- The recipes of docs/recipes.md, each run on the real export it is
-- written for (../shared/data, read in place), in a database of its own as
-- a shop would: then the star schema is checked against figures computed
-- independently from the raw files (a plain COPY and plain SQL): row
-- counts, revenue and orders per month, customers, returns.  Skipped where
-- the data is absent.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/settings.sql
SELECT (pg_stat_file(:'shared' || '/online_retail/online_retail_2010_2011.csv', true)).size IS NOT NULL
   AND (pg_stat_file(:'shared' || '/olist/subset_2017_10k/orders.csv', true)).size IS NOT NULL
   AND (pg_stat_file(:'shared' || '/rees46_clickstream/rees46_2019-Oct_head.csv', true)).size IS NOT NULL
   AS have_shared_data \gset
\if :have_shared_data
SELECT current_database() AS regress_db \gset

------------------------------------------------------------------------
-- Online Retail (UCI, 2010-12-01 .. 2011-12-09)
------------------------------------------------------------------------
CREATE DATABASE ca_recipe_retail;
\c ca_recipe_retail
\i :abs_srcdir/sql/include/settings.sql
CREATE EXTENSION customer_analytics;
SELECT :'shared' || '/online_retail/online_retail_2010_2011.csv' AS retail_csv \gset
\i :abs_srcdir/docs/recipes/online_retail.sql
SET search_path = customer_analytics, public;
-- the raw file again, read independently of the recipe (plain COPY)
CREATE TEMP TABLE raw (invoice_no text, stock_code text, description text, quantity integer,
                       invoice_date timestamp, unit_price numeric, customer_id text, country text);
COPY raw FROM :'retail_csv' WITH (FORMAT csv, HEADER);
-- rows: every line but the three write-offs, one fact each
SELECT (SELECT count(*) FROM raw) AS raw_rows,
       (SELECT count(*) FROM raw WHERE invoice_no NOT LIKE 'A%') AS expected_lines,
       (SELECT count(*) FROM fact_order_line) AS fact_lines,
       (SELECT count(*) FROM fact_order_line WHERE status = 'cancelled') AS stock_adjustments;
-- revenue per month, sales net of credit notes (prices in cents)
CREATE TEMP TABLE raw_month AS
SELECT date_trunc('month', invoice_date)::date AS month,
       sum(quantity * round(unit_price, 2)) AS revenue,
       count(DISTINCT invoice_no) FILTER (WHERE quantity > 0) AS invoices
FROM raw
WHERE invoice_no LIKE 'C%' OR (invoice_no ~ '^[0-9]' AND quantity > 0)
GROUP BY 1;
SELECT r.month, r.revenue, s.revenue = r.revenue AS same_revenue
FROM raw_month r
LEFT JOIN (SELECT date_trunc('month', day)::date AS month, sum(revenue) AS revenue
           FROM daily_sales GROUP BY 1) s USING (month)
ORDER BY r.month;
SELECT count(*) AS months_differing FROM (
    (SELECT month, revenue FROM raw_month
     EXCEPT SELECT period_start, sum(revenue) FROM product_category_sales WHERE grain = 'month' GROUP BY 1)
    UNION ALL
    (SELECT period_start, sum(revenue) FROM product_category_sales WHERE grain = 'month' GROUP BY 1
     EXCEPT SELECT month, revenue FROM raw_month)) x;
-- customers: everyone with an id; those with a purchase are scored
SELECT (SELECT count(DISTINCT customer_id) FROM raw) AS raw_customers,
       (SELECT count(*) FROM dim_customer WHERE customer_key <> -1) AS dim_customers,
       (SELECT count(DISTINCT customer_id) FROM raw WHERE invoice_no ~ '^[0-9]' AND quantity > 0) AS raw_buyers,
       (SELECT count(*) FROM customer_rfm) AS scored_customers;
-- returns: the credit notes, line for line and pound for pound
SELECT (SELECT count(*) FROM raw WHERE invoice_no LIKE 'C%') AS raw_credit_lines,
       (SELECT sum(quantity * round(unit_price, 2)) FROM raw WHERE invoice_no LIKE 'C%') AS raw_credited,
       (SELECT count(*) FROM fact_order_line WHERE quantity < 0 AND status = 'completed') AS credit_lines,
       (SELECT sum(revenue) FROM fact_order_line WHERE quantity < 0 AND status = 'completed') AS credited;
-- customer 12346 bought 74,215 jars for 77,183.60 and returned them all:
-- monetary was 77,183.60 when the credit note was lost, it is 0 now
SELECT (SELECT sum(quantity * unit_price) FROM raw WHERE customer_id = '12346' AND quantity > 0) AS bought,
       frequency, monetary, recency_days, as_of
FROM customer_rfm WHERE customer_id = '12346';
-- the reference figures of SOURCE.md for four more customers (recency from
-- the end of the data; monetary net of their credit notes)
SELECT customer_id, recency_days, frequency, monetary,
       (SELECT sum(quantity * round(unit_price, 2)) FROM raw r
        WHERE r.customer_id = c.customer_id AND (invoice_no LIKE 'C%' OR quantity > 0)) AS raw_net
FROM customer_rfm c WHERE customer_id IN ('12347', '12348', '12349', '12350') ORDER BY customer_id;


-- the business calendar: the anomalies of the shop total before and after
-- the UK bank holidays of 2010-2011 and the Christmas closure are entered
-- (Saturdays, when the shop never trades, are recognised without)
SELECT idle_weekdays();
SELECT refresh_sales_views(false);
CREATE TEMP TABLE flagged_before AS SELECT * FROM anomalies;
\i :abs_srcdir/docs/recipes/online_retail_calendar.sql
SELECT a.day, to_char(a.day, 'Dy') AS weekday, a.orders, a.expected, a.direction, c.name AS closed
FROM flagged_before a LEFT JOIN closed_days('2010-12-01', '2011-12-09') c USING (day)
WHERE a.series = 'total' ORDER BY a.day;
SELECT refresh_sales_views(false);
SELECT a.day, to_char(a.day, 'Dy') AS weekday, a.orders, a.expected, a.direction
FROM anomalies a WHERE a.series = 'total' ORDER BY a.day;
SELECT count(*) AS closed_days_flagged
FROM anomalies a JOIN closed_days('2010-12-01', '2011-12-09') c USING (day);
-- the export's last day, cut at noon, is the day in progress: not scored
SELECT day_in_progress() AS cut_day, sales_training_end() AS last_complete_day;
-- the forecast trained to 2011-11-10: the Saturday is 0, not a weekday
SET customer_analytics.as_of = '2011-11-11';
REFRESH MATERIALIZED VIEW sales_forecast;
SELECT day, to_char(day, 'Dy') AS weekday, round(revenue::numeric, -2) AS forecast
FROM sales_forecast WHERE scope = 'total' AND day <= '2011-11-17' ORDER BY day;
RESET customer_analytics.as_of;

\c :regress_db
DROP DATABASE ca_recipe_retail;

------------------------------------------------------------------------
-- Olist (the 10,000-order subset of 2017)
------------------------------------------------------------------------
CREATE DATABASE ca_recipe_olist;
\c ca_recipe_olist
\i :abs_srcdir/sql/include/settings.sql
CREATE EXTENSION customer_analytics;
SELECT :'shared' || '/olist/subset_2017_10k' AS olist_dir \gset
\i :abs_srcdir/docs/recipes/olist.sql
SET search_path = customer_analytics, public;
SELECT :'olist_dir' || '/orders.csv' AS olist_orders, :'olist_dir' || '/customers.csv' AS olist_customers,
       :'olist_dir' || '/order_items.csv' AS olist_items \gset
-- the raw files again, read independently of the recipe (plain COPY)
CREATE TEMP TABLE raw_orders (order_id text, customer_id text, status text, purchased_at timestamp,
                              a text, b text, c text, d text);
CREATE TEMP TABLE raw_customers (customer_id text, unique_id text, zip text, city text, state text);
CREATE TEMP TABLE raw_items (order_id text, item_id integer, product_id text, seller_id text, shipping text,
                             price numeric, freight numeric);
COPY raw_orders FROM :'olist_orders' WITH (FORMAT csv, HEADER);
COPY raw_customers FROM :'olist_customers' WITH (FORMAT csv, HEADER);
COPY raw_items FROM :'olist_items' WITH (FORMAT csv, HEADER);
CREATE TEMP VIEW raw_lines AS
SELECT i.*, o.status, o.purchased_at, c.unique_id
FROM raw_items i JOIN raw_orders o USING (order_id) JOIN raw_customers c USING (customer_id);
-- rows: one fact per item; cancelled as canceled + unavailable
SELECT (SELECT count(*) FROM raw_items) AS raw_items,
       (SELECT count(*) FROM fact_order_line) AS fact_lines,
       (SELECT count(*) FROM raw_lines WHERE status IN ('canceled', 'unavailable')) AS raw_cancelled,
       (SELECT count(*) FROM fact_order_line WHERE status = 'cancelled') AS cancelled_lines;
-- revenue and orders per month (sales: not canceled or unavailable)
CREATE TEMP TABLE raw_month AS
SELECT date_trunc('month', purchased_at)::date AS month, sum(price) AS revenue, count(DISTINCT order_id) AS orders
FROM raw_lines WHERE status NOT IN ('canceled', 'unavailable') GROUP BY 1;
SELECT r.month, r.revenue, r.orders, s.revenue = r.revenue AS same_revenue, s.orders = r.orders AS same_orders
FROM raw_month r
LEFT JOIN (SELECT date_trunc('month', day)::date AS month, sum(revenue) AS revenue, sum(orders) AS orders
           FROM daily_sales GROUP BY 1) s USING (month)
ORDER BY r.month;
-- customers: the persons (customer_unique_id), those with a sale scored
SELECT (SELECT count(DISTINCT unique_id) FROM raw_customers) AS raw_persons,
       (SELECT count(DISTINCT customer_id) FROM dim_customer WHERE customer_key <> -1) AS dim_persons,
       (SELECT count(*) FROM dim_customer WHERE customer_key <> -1) AS versions,
       (SELECT count(DISTINCT unique_id) FROM raw_lines WHERE status NOT IN ('canceled', 'unavailable')) AS raw_buyers,
       (SELECT count(*) FROM customer_rfm) AS scored_customers,
       (SELECT count(*) FROM customer_rfm WHERE frequency > 1) AS repeat_buyers;
-- categories: Portuguese names translated, the untranslated kept
SELECT category, revenue FROM product_category_sales
WHERE grain = 'month' AND period_start = '2017-11-01' ORDER BY revenue DESC, category LIMIT 5;
SELECT count(*) FILTER (WHERE category IN ('pc_gamer', 'portateis_cozinha_e_preparadores_de_alimentos')) AS untranslated,
       count(*) FILTER (WHERE category = 'Unknown') AS without_category
FROM dim_product WHERE product_key <> -1;
-- Black Friday, the busiest day (289 orders in the export, counting
-- those cancelled or without items)
SELECT day, orders,
       (SELECT count(DISTINCT order_id) FROM raw_lines
        WHERE purchased_at::date = day AND status NOT IN ('canceled', 'unavailable')) AS raw_orders
FROM daily_sales ORDER BY orders DESC, day LIMIT 1;

\c :regress_db
DROP DATABASE ca_recipe_olist;

------------------------------------------------------------------------
-- REES46 clickstream (the head of October 2019)
------------------------------------------------------------------------
CREATE DATABASE ca_recipe_rees46;
\c ca_recipe_rees46
\i :abs_srcdir/sql/include/settings.sql
CREATE EXTENSION customer_analytics;
SELECT :'shared' || '/rees46_clickstream/rees46_2019-Oct_head.csv' AS rees46_csv \gset
\i :abs_srcdir/docs/recipes/rees46.sql
SET search_path = customer_analytics, public;
CREATE TEMP TABLE raw (event_time text, event_type text, product_id text, category_id text,
                       category_code text, brand text, price numeric, user_id text, user_session text);
COPY raw FROM :'rees46_csv' WITH (FORMAT csv, HEADER);
-- events per type: the file's, exact copies counted once
SELECT r.event_type, r.events, r.distinct_events, f.events AS fact_events
FROM (SELECT event_type, count(*) AS events, count(DISTINCT raw.*) AS distinct_events FROM raw GROUP BY 1) r
LEFT JOIN (SELECT event_type, count(*) AS events FROM fact_event GROUP BY 1) f
       ON f.event_type = CASE r.event_type WHEN 'view' THEN 'product_view' WHEN 'cart' THEN 'add_to_cart' ELSE r.event_type END
ORDER BY r.event_type;
-- customers and sessions
SELECT (SELECT count(DISTINCT user_id) FROM raw) AS raw_users,
       (SELECT count(DISTINCT customer_key) FROM fact_event WHERE customer_key <> -1) AS event_customers,
       (SELECT count(DISTINCT user_session) FROM raw) AS raw_sessions,
       (SELECT count(DISTINCT session_id) FROM fact_event) AS fact_sessions,
       (SELECT count(*) FROM fact_event WHERE customer_key = -1 OR customer_key IS NULL) AS anonymous_events;
-- purchases per category, from the file and from the star schema
SELECT r.category, r.purchases AS raw_purchases, r.value AS raw_value, f.purchases AS fact_purchases
FROM (SELECT COALESCE(NULLIF(split_part(category_code, '.', 1), ''), 'Unknown') AS category,
             count(*) AS purchases, sum(price) AS value
      FROM raw WHERE event_type = 'purchase' GROUP BY 1) r
LEFT JOIN (SELECT p.category, count(*) AS purchases
           FROM fact_event f JOIN dim_product p USING (product_key)
           WHERE f.event_type = 'purchase' GROUP BY 1) f USING (category)
ORDER BY r.value DESC, r.category LIMIT 5;
-- the sessions of the clickstream views (30 minutes of inactivity)
SELECT sessions, product_view_sessions, add_to_cart_sessions, round(conversion_rate, 4) AS conversion_rate
FROM funnel_daily ORDER BY date, channel;

\c :regress_db
DROP DATABASE ca_recipe_rees46;
\else
\echo 'skipped: the shared public data sets (../shared/data) are not present on this machine'
\endif
