-- fact_order_line.customer_ref: the customer a line belongs to whatever
-- its version (the staged customer_id; '#guest:' || order_id for a guest),
-- what a Citus cluster distributes the facts by (t/017_citus.pl).  On one
-- node it is kept by transform() like any column: a line staged again
-- under another customer gets the new one, a late customer's line keeps
-- its staged id while it waits on the unknown member, and the repair queue
-- carries it too.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql

CALL pg_temp.reset_warehouse(also => '{unknown_member_line}', dates => true);

INSERT INTO stg_customers (customer_id, name, city, updated_at) VALUES
  ('C1', 'Ada', 'London', '2024-12-01 00:00+00'),
  ('C1', 'Ada', 'Paris', '2025-01-20 00:00+00'),
  ('C2', 'Alan', 'Manchester', '2024-12-05 00:00+00');
INSERT INTO stg_products (product_id, name, category) VALUES ('P1', 'Engine', 'Electronics');
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price) VALUES
  ('O1', 1, 'C1', 'P1', '2025-01-10 12:00+00', 1, 250),     -- C1's first version
  ('O1', 2, 'C1', 'P1', '2025-01-10 12:00+00', 2, 10),
  ('O2', 1, 'C1', 'P1', '2025-01-25 10:00+00', 1, 250),     -- C1's second version
  ('O3', 1, NULL, 'P1', '2025-01-13 08:00+00', 1, 240),     -- a guest
  ('O3', 2, NULL, 'P1', '2025-01-13 08:00+00', 1, 10),
  ('O4', 1, 'C9', 'P1', '2025-01-14 08:00+00', 1, 99),      -- a customer not loaded yet
  ('O5', 1, 'C2', 'P9', '2025-01-15 08:00+00', 1, 5);       -- a product not loaded yet
SELECT * FROM transform() WHERE step IN ('dim_customer', 'fact_order_line', 'late_dimension_fixes');

-- every version of C1 under one customer_ref; the guest's lines under
-- their order; C9's line on the unknown member, with its staged id
SELECT f.order_id, f.line_number, f.customer_key = -1 AS unknown_member, c.customer_id AS version_of,
       c.city, f.customer_ref
FROM fact_order_line f JOIN dim_customer c USING (customer_key)
ORDER BY f.order_id, f.line_number;
-- the queue of lines waiting for a late customer or product, keyed like the facts
SELECT order_id, line_number, customer_id, product_id, customer_ref
FROM customer_analytics_internal.unknown_member_line ORDER BY 1, 2;
-- a known customer's lines: customer_ref is the customer_id of their version
SELECT count(*) AS lines_whose_ref_is_not_their_customer
FROM fact_order_line f JOIN dim_customer c USING (customer_key)
WHERE f.customer_key <> -1 AND f.customer_ref <> c.customer_id;

DELETE FROM customer_analytics_internal.rfm_dirty_customer;
-- lines staged again under another customer: O1/2 now C2's, the guest's
-- O3/1 now C1's, and C9's O4/1 now a guest's; O1/1 unchanged
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price) VALUES
  ('O1', 1, 'C1', 'P1', '2025-01-10 12:00+00', 1, 250),
  ('O1', 2, 'C2', 'P1', '2025-01-10 12:00+00', 2, 10),
  ('O3', 1, 'C1', 'P1', '2025-01-13 08:00+00', 1, 240),
  ('O4', 1, NULL, 'P1', '2025-01-14 08:00+00', 1, 99);
SELECT * FROM transform() WHERE step IN ('fact_order_line', 'late_dimension_fixes');
SELECT f.order_id, f.line_number, c.customer_id AS version_of, f.customer_ref
FROM fact_order_line f JOIN dim_customer c USING (customer_key)
WHERE f.order_id IN ('O1', 'O3', 'O4')
ORDER BY f.order_id, f.line_number;
SELECT count(*) AS lines, count(DISTINCT (order_id, line_number)) AS distinct_lines FROM fact_order_line;
-- O4/1 is a guest's now: nothing to wait for
SELECT order_id, line_number, customer_id, product_id, customer_ref
FROM customer_analytics_internal.unknown_member_line ORDER BY 1, 2;
-- the customers of both versions of a moved line are due for RFM
SELECT customer_id FROM customer_analytics_internal.rfm_dirty_customer
WHERE customer_id IN ('C1', 'C2') ORDER BY 1;

-- the late product arrives: O5/1 is repaired, its customer_ref unchanged
INSERT INTO stg_products (product_id, name, category) VALUES ('P9', 'Late', 'Audio');
SELECT * FROM transform() WHERE step IN ('fact_order_line', 'late_dimension_fixes');
SELECT f.order_id, f.line_number, p.product_id, f.customer_ref
FROM fact_order_line f JOIN dim_product p USING (product_key) WHERE f.order_id = 'O5';
SELECT count(*) AS still_waiting FROM customer_analytics_internal.unknown_member_line;

-- the rule itself
SELECT customer_analytics_internal.order_customer_ref('C7', 'O7') AS known,
       customer_analytics_internal.order_customer_ref(NULL, 'O7') AS guest;
