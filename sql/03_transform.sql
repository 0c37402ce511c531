-- transform(): SCD2 versions, de-duplication, unknown members, late
-- dimensions, incremental no-op, full refresh, and a generated data set.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql

CALL pg_temp.reset_warehouse(dates => true);

-- a nothing-to-do run on empty staging
SELECT * FROM transform();

-- two customers and two products, with explicit version times
INSERT INTO stg_customers (customer_id, name, email, city, state, country, signup_date, updated_at) VALUES
  ('C1', 'Ada Lovelace', 'ada@example.com', 'London', 'England', 'GB', '2024-12-01', '2024-12-01 10:00+00'),
  ('C2', 'Alan Turing', 'alan@example.com', 'Manchester', 'England', 'GB', '2024-12-05', '2024-12-05 09:00+00');
INSERT INTO stg_products (product_id, name, category, subcategory, unit_cost, list_price, updated_at) VALUES
  ('P1', 'Engine', 'Electronics', 'Computers', 100, 250, '2024-12-01'),
  ('P2', 'Notebook', '', 'Fiction', 2, 5, '2024-12-01');
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel) VALUES
  ('O1', 1, 'C1', 'P1', '2025-01-10 12:00+00', 1, 250, 0, 'completed', 'web'),
  ('O1', 2, 'C1', 'P2', '2025-01-10 12:00+00', 3, 5, 1.50, 'completed', 'web'),
  ('O2', 1, 'C2', 'P2', '2025-01-12 23:30+00', 2, 5, 0, 'cancelled', 'mobile_app'),
  ('O3', 1, NULL, 'P1', '2025-01-13 08:00+00', 1, 240, 0, 'completed', 'web'),       -- guest
  ('O4', 1, 'C9', 'P9', '2025-01-14 08:00+00', 1, 99, 0, 'completed', 'marketplace'); -- unknown ids
INSERT INTO stg_events (event_id, event_ts, customer_id, session_id, event_type, product_id, order_id, channel, device) VALUES
  ('e1', '2025-01-10 11:50+00', NULL, 's1', 'page_view', NULL, NULL, 'email', 'desktop'),
  ('e2', '2025-01-10 11:55+00', 'C1', 's1', 'add_to_cart', 'P1', NULL, 'email', 'desktop'),
  ('e3', '2025-01-10 12:00+00', 'C1', 's1', 'purchase', NULL, 'O1', 'email', 'desktop'),
  ('e4', '2025-01-11 09:00+00', 'C77', 's2', 'product_view', 'P77', NULL, 'direct', 'tablet');

SELECT * FROM transform();
SELECT customer_key > 0 AS real_key, customer_id, city, valid_from, valid_to, is_current
FROM dim_customer ORDER BY customer_id, valid_from;
SELECT product_id, name, category, unit_cost, list_price FROM dim_product ORDER BY product_id;
SELECT min(date), max(date), count(*) AS days FROM dim_date;
SELECT f.order_id, f.line_number, c.customer_id, p.product_id, f.date_key, f.quantity,
       f.unit_price, f.discount, f.revenue, f.status, f.channel
FROM fact_order_line f
JOIN dim_customer c USING (customer_key) JOIN dim_product p USING (product_key)
ORDER BY f.order_id, f.line_number;
SELECT e.event_id, e.customer_key IS NULL AS anonymous, c.customer_id, p.product_id, e.date_key
FROM fact_event e
LEFT JOIN dim_customer c USING (customer_key) LEFT JOIN dim_product p USING (product_key)
ORDER BY e.event_id;

-- incremental: nothing new staged, nothing touched
SELECT * FROM transform();

-- C1 moves (SCD2), C2 is re-sent unchanged, an older C1 record arrives late
INSERT INTO stg_customers (customer_id, name, email, city, state, country, signup_date, updated_at) VALUES
  ('C1', 'Ada Lovelace', 'ada@example.com', 'Paris', 'IDF', 'FR', '2024-12-01', '2025-01-20 00:00+00'),
  ('C2', 'Alan Turing', 'alan@example.com', 'Manchester', 'England', 'GB', '2024-12-05', '2025-01-20 00:00+00'),
  ('C1', 'Ada Lovelace', 'ada@old.example.com', 'London', 'England', 'GB', '2024-12-01', '2024-11-01 00:00+00');
-- an order of C1 after the move, and two re-staged lines: a correction
-- (with a source timestamp, while the first version had none) and an
-- identical copy; the latest staged version of a line wins
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel, updated_at) VALUES
  ('O5', 1, 'C1', 'P2', '2025-01-25 10:00+00', 4, 5, 0, 'completed', 'web', NULL),
  ('O1', 2, 'C1', 'P2', '2025-01-10 12:00+00', 3, 5, 1.50, 'returned', 'web', '2025-01-21 00:00+00'),
  ('O2', 1, 'C2', 'P2', '2025-01-12 23:30+00', 2, 5, 0, 'cancelled', 'mobile_app', NULL);
SELECT * FROM transform();
SELECT customer_id, city, email, valid_from, valid_to, is_current
FROM dim_customer WHERE customer_key <> -1 ORDER BY customer_id, valid_from;
-- O1 (before the move) keeps C1's first version, O5 gets the new one
SELECT f.order_id, f.line_number, c.city, f.status
FROM fact_order_line f JOIN dim_customer c USING (customer_key)
WHERE c.customer_id IN ('C1', 'C2') ORDER BY f.order_id, f.line_number;
SELECT count(*) AS fact_lines, count(DISTINCT (order_id, line_number)) AS distinct_lines FROM fact_order_line;

-- late-arriving dimensions: P9 and C9 arrive after their order was mapped
-- to unknown; the lines waiting for a named customer or product are queued
SELECT order_id, line_number, customer_id, product_id
FROM customer_analytics_internal.unknown_member_line ORDER BY 1, 2;
INSERT INTO stg_products (product_id, name, category, subcategory, unit_cost, list_price, updated_at)
VALUES ('P9', 'Late Gadget', 'Electronics', 'Audio', 40, 99, '2025-01-01');
INSERT INTO stg_customers (customer_id, name, city, country, signup_date, updated_at)
VALUES ('C9', 'Grace Hopper', 'New York', 'US', '2025-01-14', '2025-01-15 00:00+00');
SELECT * FROM transform();
SELECT f.order_id, c.customer_id, p.product_id, p.category
FROM fact_order_line f JOIN dim_customer c USING (customer_key) JOIN dim_product p USING (product_key)
WHERE f.order_id = 'O4';
SELECT count(*) AS still_waiting FROM customer_analytics_internal.unknown_member_line;

-- a product version change overwrites (type 1): of two versions staged in
-- one run the later one wins, and an unchanged re-send rewrites nothing
INSERT INTO stg_products (product_id, name, category, subcategory, unit_cost, list_price, updated_at) VALUES
  ('P1', 'Engine Mk 1.5', 'Electronics', 'Computers', 105, 260, '2025-01-15'),
  ('P1', 'Engine Mk II', 'Electronics', 'Computers', 110, 270, '2025-02-01'),
  ('P2', 'Notebook', '', 'Fiction', 2, 5, '2024-12-01');
SELECT * FROM transform();
SELECT product_id, name, list_price, updated_at FROM dim_product WHERE product_id IN ('P1', 'P2') ORDER BY 1;
-- re-processing an earlier staged version (as a full pass does) does not
-- bring it back
UPDATE customer_analytics_internal.transform_state SET snapshot = '1:1:';
SELECT step, rows_affected FROM transform() WHERE step IN ('dim_product', 'fact_order_line');
SELECT product_id, name FROM dim_product WHERE product_id = 'P1';

-- a full pass over everything staged changes nothing: transform is idempotent
CREATE TEMP TABLE before_full AS
SELECT (SELECT md5(string_agg(f::text, ',' ORDER BY order_id, line_number)) FROM fact_order_line f) AS lines,
       (SELECT md5(string_agg(d::text, ',' ORDER BY customer_key)) FROM dim_customer d) AS customers,
       (SELECT md5(string_agg(e::text, ',' ORDER BY event_id)) FROM fact_event e) AS events;
SELECT * FROM transform(full_refresh => true);
SELECT b.lines = (SELECT md5(string_agg(f::text, ',' ORDER BY order_id, line_number)) FROM fact_order_line f) AS lines_same,
       b.customers = (SELECT md5(string_agg(d::text, ',' ORDER BY customer_key)) FROM dim_customer d) AS customers_same,
       b.events = (SELECT md5(string_agg(e::text, ',' ORDER BY event_id)) FROM fact_event e) AS events_same
FROM before_full b;

-- rows staged by the calling transaction are processed by that transaction
BEGIN;
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price)
VALUES ('O6', 1, 'C2', 'P1', '2025-02-02 10:00+00', 1, 270);
SELECT step, rows_affected FROM transform() WHERE step = 'fact_order_line';
COMMIT;
SELECT order_id FROM fact_order_line WHERE order_id = 'O6';

-- a restored cluster (other system identifier) triggers a full pass
UPDATE customer_analytics_internal.transform_state SET system_identifier = system_identifier + 1;
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price)
VALUES ('O7', 1, 'C2', 'P1', '2025-02-03 10:00+00', 1, 270);
SELECT * FROM transform();
SELECT system_identifier = (SELECT system_identifier FROM pg_control_system()) AS identifier_restored
FROM customer_analytics_internal.transform_state;

-- a generated shop end to end: every staged line and event lands exactly once
CALL pg_temp.reset_warehouse(dates => true);
SELECT count(*) FROM generate_sample_data(customers => 500, days => 90, seed => 11);
SELECT step, rows_affected > 0 AS wrote FROM transform();
SELECT (SELECT count(DISTINCT (order_id, line_number)) FROM stg_orders) = (SELECT count(*) FROM fact_order_line) AS all_lines,
       (SELECT count(DISTINCT event_id) FROM stg_events) = (SELECT count(*) FROM fact_event) AS all_events,
       (SELECT count(*) FROM dim_customer WHERE is_current AND customer_key <> -1)
         = (SELECT count(DISTINCT customer_id) FROM stg_customers) AS one_current_version_each;
-- revenue in the facts equals revenue staged
SELECT (SELECT sum(quantity * unit_price - discount) FROM stg_orders)
       = (SELECT sum(revenue) FROM fact_order_line) AS revenue_reconciles;
-- fact_event has no FK constraints: check its keys the way the quality checks will
SELECT count(*) FILTER (WHERE customer_key IS NOT NULL AND customer_key NOT IN (SELECT customer_key FROM dim_customer)) AS orphan_customers,
       count(*) FILTER (WHERE product_key IS NOT NULL AND product_key NOT IN (SELECT product_key FROM dim_product)) AS orphan_products,
       count(*) FILTER (WHERE date_key NOT IN (SELECT date_key FROM dim_date)) AS orphan_dates
FROM fact_event;
-- orders of customers who moved point at the version in effect at order time
SELECT count(*) AS lines_of_movers,
       count(*) FILTER (WHERE f.order_ts >= c.valid_from AND f.order_ts < c.valid_to) AS version_in_effect,
       count(*) FILTER (WHERE f.order_ts < c.valid_from) AS before_first_version,
       count(*) FILTER (WHERE c.is_current) > 0 AND count(*) FILTER (WHERE NOT c.is_current) > 0
           AS both_versions_used
FROM fact_order_line f JOIN dim_customer c USING (customer_key)
WHERE c.customer_id IN (SELECT customer_id FROM dim_customer WHERE NOT is_current);
-- the calendar is contiguous
SELECT max(date) - min(date) + 1 = count(*) AS contiguous FROM dim_date;
SELECT * FROM transform();
CALL pg_temp.reset_warehouse(dates => true);
