-- Real public e-commerce exports (../shared/data, outside the repository)
-- through ingest_csv: every row accounted for, and the figures their
-- SOURCE.md documents reproduced.  Skipped where the folder is absent.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
SELECT (pg_stat_file(:'shared' || '/olist/SOURCE.md', true)).size IS NOT NULL AS have_shared_data \gset
\if :have_shared_data

CREATE SCHEMA real_data;

-- Olist, the consistent 10,000-order subset of 2017 (re-saved by pandas)
CREATE TABLE real_data.olist_orders (
    order_id text PRIMARY KEY, customer_id text NOT NULL, status text NOT NULL,
    purchased_at timestamp NOT NULL, approved_at timestamp, delivered_carrier_at timestamp,
    delivered_customer_at timestamp, estimated_delivery date);
CREATE TABLE real_data.olist_customers (
    customer_id text PRIMARY KEY, customer_unique_id text NOT NULL, zip_prefix integer,
    city text, state char(2));
CREATE TABLE real_data.olist_items (
    order_id text NOT NULL REFERENCES real_data.olist_orders, line_number integer NOT NULL,
    product_id text NOT NULL, seller_id text, shipping_limit timestamp, price numeric(10,2),
    freight numeric(10,2), PRIMARY KEY (order_id, line_number));
CREATE TABLE real_data.olist_products (
    product_id text PRIMARY KEY, category text, name_length numeric, description_length numeric,
    photos numeric, weight_g numeric, length_cm numeric, height_cm numeric, width_cm numeric);
CREATE TABLE real_data.olist_category_names (category text PRIMARY KEY, category_english text);

SELECT regexp_replace(file, '.*/', '') AS file, status, rows_read, rows_loaded, rows_rejected
FROM ingest_csv('real_data.olist_orders', :'shared' || '/olist/subset_2017_10k/orders.csv',
    column_map => '{"order_status": "status", "order_purchase_timestamp": "purchased_at",
                    "order_approved_at": "approved_at", "order_delivered_carrier_date": "delivered_carrier_at",
                    "order_delivered_customer_date": "delivered_customer_at",
                    "order_estimated_delivery_date": "estimated_delivery"}')
UNION ALL
SELECT regexp_replace(file, '.*/', ''), status, rows_read, rows_loaded, rows_rejected
FROM ingest_csv('real_data.olist_customers', :'shared' || '/olist/subset_2017_10k/customers.csv',
    column_map => '{"customer_zip_code_prefix": "zip_prefix", "customer_city": "city", "customer_state": "state"}')
UNION ALL
-- no final newline in this file
SELECT regexp_replace(file, '.*/', ''), status, rows_read, rows_loaded, rows_rejected
FROM ingest_csv('real_data.olist_items', :'shared' || '/olist/subset_2017_10k/order_items.csv',
    column_map => '{"order_item_id": "line_number", "shipping_limit_date": "shipping_limit", "freight_value": "freight"}')
UNION ALL
-- misspelt original headers ("lenght")
SELECT regexp_replace(file, '.*/', ''), status, rows_read, rows_loaded, rows_rejected
FROM ingest_csv('real_data.olist_products', :'shared' || '/olist/subset_2017_10k/products.csv',
    column_map => '{"product_category_name": "category", "product_name_lenght": "name_length",
                    "product_description_lenght": "description_length", "product_photos_qty": "photos",
                    "product_weight_g": "weight_g", "product_length_cm": "length_cm",
                    "product_height_cm": "height_cm", "product_width_cm": "width_cm"}')
UNION ALL
-- the complete original file, which starts with a UTF-8 byte order mark
SELECT regexp_replace(file, '.*/', ''), status, rows_read, rows_loaded, rows_rejected
FROM ingest_csv('real_data.olist_category_names', :'shared' || '/olist/product_category_name_translation.csv',
    column_map => '{"product_category_name": "category", "product_category_name_english": "category_english"}');

-- SOURCE.md: statuses delivered 9649, shipped 104, unavailable 98,
-- canceled 57, processing 47, invoiced 43, created 2; 9,920 unique
-- customers; item prices 1,381,936.76 and freight 218,056.74; 111 orders
-- without items; 2017-11-24 (Black Friday) the busiest day with 289 orders
SELECT status, count(*) FROM real_data.olist_orders GROUP BY status ORDER BY count(*) DESC;
SELECT count(DISTINCT customer_unique_id) AS unique_customers FROM real_data.olist_customers;
SELECT sum(price) AS item_prices, sum(freight) AS freight FROM real_data.olist_items;
SELECT count(*) AS orders_without_items FROM real_data.olist_orders o
WHERE NOT EXISTS (SELECT FROM real_data.olist_items i WHERE i.order_id = o.order_id);
SELECT purchased_at::date AS busiest_day, count(*) AS orders
FROM real_data.olist_orders GROUP BY 1 ORDER BY 2 DESC LIMIT 1;
SELECT count(*) AS categories, count(*) FILTER (WHERE category = 'beleza_saude') AS has_first_row
FROM real_data.olist_category_names;

-- UCI Online Retail 2010-2011: 541,909 rows, nulls, cancellations, negative prices
CREATE TABLE real_data.online_retail (
    invoice_no text NOT NULL, stock_code text NOT NULL, description text,
    -- unit prices go down to 0.001: keep the source's precision
    quantity integer NOT NULL, invoice_date timestamp NOT NULL, unit_price numeric NOT NULL,
    customer_id integer, country text NOT NULL);
SELECT regexp_replace(file, '.*/', '') AS file, status, rows_read, rows_loaded, rows_rejected,
       rows_read = rows_loaded + rows_rejected AS accounted
FROM ingest_csv('real_data.online_retail', :'shared' || '/online_retail/online_retail_2010_2011.csv',
    column_map => '{"InvoiceNo": "invoice_no", "StockCode": "stock_code", "InvoiceDate": "invoice_date",
                    "UnitPrice": "unit_price", "CustomerID": "customer_id"}');
-- SOURCE.md: 25,900 invoices, 4,372 customers, 38 countries, nulls
-- CustomerID 135,080 and Description 1,454, 9,288 'C' rows, 9,747,747.93
-- in all; after the standard cleaning 397,884 rows, 4,338 customers,
-- 18,532 invoices, 8,911,407.90
SELECT count(DISTINCT invoice_no) AS invoices, count(DISTINCT customer_id) AS customers,
       count(DISTINCT country) AS countries,
       count(*) FILTER (WHERE customer_id IS NULL) AS null_customers,
       count(*) FILTER (WHERE description IS NULL) AS null_descriptions,
       count(*) FILTER (WHERE invoice_no LIKE 'C%') AS cancellation_rows,
       sum(quantity * unit_price) AS total
FROM real_data.online_retail;
SELECT count(*) AS clean_rows, count(DISTINCT customer_id) AS customers,
       count(DISTINCT invoice_no) AS invoices, sum(quantity * unit_price) AS revenue
FROM real_data.online_retail
WHERE customer_id IS NOT NULL AND invoice_no NOT LIKE 'C%' AND quantity > 0 AND unit_price > 0;

-- REES46 clickstream head: timestamps with a ' UTC' suffix, 19-digit ids
CREATE TABLE real_data.rees46_events (
    event_time timestamptz NOT NULL, event_type text NOT NULL, product_id bigint, category_id bigint,
    category_code text, brand text, price numeric(10,2), user_id bigint, user_session text);
SELECT regexp_replace(file, '.*/', '') AS file, status, rows_read, rows_loaded, rows_rejected
FROM ingest_csv('real_data.rees46_events', :'shared' || '/rees46_clickstream/rees46_2019-Oct_head.csv');
-- SOURCE.md: view 17,055, purchase 214, cart 165; 4,504 users, 5,066
-- sessions; purchases worth 59,442.63
SELECT event_type, count(*) FROM real_data.rees46_events GROUP BY 1 ORDER BY 2 DESC;
SELECT count(DISTINCT user_id) AS users, count(DISTINCT user_session) AS sessions,
       sum(price) FILTER (WHERE event_type = 'purchase') AS purchases,
       min(event_time) AS first_event, max(event_time) AS last_event
FROM real_data.rees46_events;

DROP SCHEMA real_data CASCADE;
TRUNCATE ingest_load, ingest_reject;
\else
\echo 'skipped: the shared public data sets (../shared/data) are not present on this machine'
\endif
