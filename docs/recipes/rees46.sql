-- Recipe: the REES46 clickstream (the first 17,434 events of its October
-- 2019 file) into stg_events and the star schema.  Run with psql:
--   psql -v rees46_csv=/path/to/rees46_2019-Oct_head.csv -f rees46.sql
-- What the export holds, and what this recipe does with it:
--   - event_time is text with a ' UTC' suffix: timestamptz reads it;
--   - event types view, cart, purchase: product_view, add_to_cart,
--     purchase (no page views, no checkout step, no order ids);
--   - no event id: an event is identified by its contents (an md5 of the
--     row), so the 5 rows that are exact copies count once;
--   - user_id is the customer (staged as of their first event), user_session
--     the session; category_id needs bigint;
--   - no product catalogue: products come from the events, their category
--     the first part of category_code (electronics.smartphone: electronics;
--     empty: Unknown), the brand as name.
-- 1. the file as it is, in a table of your own
CREATE SCHEMA rees46;
CREATE TABLE rees46.event (
    event_time timestamptz NOT NULL, event_type text NOT NULL, product_id bigint, category_id bigint,
    category_code text, brand text, price numeric(10,2), user_id bigint, user_session text);
SELECT status, rows_read, rows_loaded, rows_rejected
FROM customer_analytics.ingest_csv('rees46.event', :'rees46_csv');

-- 2. staging: customers, products, events
INSERT INTO customer_analytics.stg_customers (customer_id, updated_at)
SELECT user_id::text, min(event_time) FROM rees46.event WHERE user_id IS NOT NULL GROUP BY user_id;

INSERT INTO customer_analytics.stg_products (product_id, name, category, subcategory, list_price)
SELECT product_id::text,
       mode() WITHIN GROUP (ORDER BY brand),
       COALESCE(NULLIF(split_part(mode() WITHIN GROUP (ORDER BY category_code), '.', 1), ''), 'Unknown'),
       mode() WITHIN GROUP (ORDER BY category_code),
       max(price)
FROM rees46.event WHERE product_id IS NOT NULL GROUP BY product_id;

INSERT INTO customer_analytics.stg_events (event_id, event_ts, customer_id, session_id, event_type, product_id)
SELECT DISTINCT md5(e::text), e.event_time, e.user_id::text, e.user_session,
       CASE e.event_type WHEN 'view' THEN 'product_view' WHEN 'cart' THEN 'add_to_cart' ELSE e.event_type END,
       e.product_id::text
FROM rees46.event e;

-- 3. the star schema (events of any age: this is history, not a live feed)
SET customer_analytics.event_lateness = '';
SELECT step, rows_affected FROM customer_analytics.transform()
WHERE step IN ('dim_customer', 'dim_product', 'fact_event') ORDER BY step;
SELECT count(*) > 0 AS sessions_built FROM customer_analytics.refresh_clickstream();
