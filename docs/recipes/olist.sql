-- Recipe: the Olist marketplace export (the 10,000-order subset of 2017)
-- into the star schema.  Run with psql:
--   psql -v olist_dir=/path/to/olist/subset_2017_10k -f olist.sql
-- What the export holds, and what this recipe does with it:
--   - orders, items, customers and products in four files, joined here
--     into order lines: one line per item (order_item_id is the line
--     number), quantity 1 at the item's price; freight is not revenue;
--   - customer_id is per order; customer_unique_id is the person: it is
--     the customer_id of the star schema, and each order's address is a
--     version of that customer as of the purchase (SCD type 2);
--   - order statuses: canceled and unavailable orders never happened
--     (cancelled); delivered, shipped, invoiced, processing, approved and
--     created ones are sales (completed); orders without items have no
--     lines;
--   - Portuguese category names, translated with the translation file (two
--     categories it lacks keep their Portuguese name; none: Unknown);
--   - times are Sao Paulo local time; the file re-saved by pandas writes
--     counts as floats (51.0), read as numeric.
SET customer_analytics.timezone = 'America/Sao_Paulo';

-- 1. the files as they are, in tables of your own
CREATE SCHEMA olist;
CREATE TABLE olist.orders (
    order_id text PRIMARY KEY, customer_id text NOT NULL, order_status text NOT NULL,
    order_purchase_timestamp timestamp NOT NULL, order_approved_at timestamp,
    order_delivered_carrier_date timestamp, order_delivered_customer_date timestamp,
    order_estimated_delivery_date timestamp);
CREATE TABLE olist.customers (
    customer_id text PRIMARY KEY, customer_unique_id text NOT NULL, customer_zip_code_prefix text,
    customer_city text, customer_state text);
CREATE TABLE olist.order_items (
    order_id text NOT NULL, order_item_id integer NOT NULL, product_id text NOT NULL, seller_id text,
    shipping_limit_date timestamp, price numeric(12,2) NOT NULL, freight_value numeric(12,2),
    PRIMARY KEY (order_id, order_item_id));
CREATE TABLE olist.products (
    product_id text PRIMARY KEY, product_category_name text,
    -- the original headers are misspelt ("lenght"): mapped to these names
    product_name_length numeric, product_description_length numeric, product_photos_qty numeric,
    product_weight_g numeric, product_length_cm numeric, product_height_cm numeric, product_width_cm numeric);
CREATE TABLE olist.category_translation (
    product_category_name text PRIMARY KEY, product_category_name_english text NOT NULL);
SELECT regexp_replace(file, '.*/', '') AS file, status, rows_read, rows_loaded, rows_rejected
FROM customer_analytics.ingest_csv('olist.orders', :'olist_dir' || '/orders.csv')
UNION ALL
SELECT regexp_replace(file, '.*/', ''), status, rows_read, rows_loaded, rows_rejected
FROM customer_analytics.ingest_csv('olist.customers', :'olist_dir' || '/customers.csv')
UNION ALL
SELECT regexp_replace(file, '.*/', ''), status, rows_read, rows_loaded, rows_rejected
FROM customer_analytics.ingest_csv('olist.order_items', :'olist_dir' || '/order_items.csv')
UNION ALL
SELECT regexp_replace(file, '.*/', ''), status, rows_read, rows_loaded, rows_rejected
FROM customer_analytics.ingest_csv('olist.products', :'olist_dir' || '/products.csv',
    column_map => '{"product_name_lenght": "product_name_length",
                    "product_description_lenght": "product_description_length"}')
UNION ALL
SELECT regexp_replace(file, '.*/', ''), status, rows_read, rows_loaded, rows_rejected
FROM customer_analytics.ingest_csv('olist.category_translation', :'olist_dir' || '/product_category_name_translation.csv');

-- 2. staging: a customer version per order (its address, as of its
-- purchase; repeated addresses make no new version), products with English
-- categories, one order line per item
INSERT INTO customer_analytics.stg_customers (customer_id, city, state, country, updated_at)
SELECT c.customer_unique_id, c.customer_city, c.customer_state, 'BR',
       o.order_purchase_timestamp AT TIME ZONE 'America/Sao_Paulo'
FROM olist.orders o JOIN olist.customers c USING (customer_id);

INSERT INTO customer_analytics.stg_products (product_id, category, subcategory)
SELECT p.product_id,
       COALESCE(t.product_category_name_english, p.product_category_name, 'Unknown'),
       p.product_category_name
FROM olist.products p
LEFT JOIN olist.category_translation t USING (product_category_name);

INSERT INTO customer_analytics.stg_orders
    (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, status)
SELECT i.order_id, i.order_item_id, c.customer_unique_id, i.product_id,
       o.order_purchase_timestamp AT TIME ZONE 'America/Sao_Paulo', 1, i.price,
       CASE WHEN o.order_status IN ('canceled', 'unavailable') THEN 'cancelled' ELSE 'completed' END
FROM olist.order_items i
JOIN olist.orders o USING (order_id)
JOIN olist.customers c USING (customer_id);

-- 3. the star schema, and the views (CALL customer_analytics.run_pipeline()
-- does this and everything else)
SELECT step, rows_affected FROM customer_analytics.transform()
WHERE step IN ('dim_customer', 'dim_product', 'fact_order_line') ORDER BY step;
SELECT customer_analytics.refresh_sales_rollup() > 0 AS sales_rolled_up;
REFRESH MATERIALIZED VIEW customer_analytics.daily_sales;
REFRESH MATERIALIZED VIEW customer_analytics.product_category_sales;
SELECT customer_analytics.refresh_customer_rfm() > 0 AS customers_scored;
