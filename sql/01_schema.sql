-- Star schema objects, their documentation and their constraints.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql

-- tables of the star schema, each documented (the extension's own queues
-- and states in customer_analytics_internal)
SELECT c.oid::regclass AS relname, c.relkind, obj_description(c.oid, 'pg_class') IS NOT NULL AS commented
FROM pg_class c
WHERE c.relnamespace IN ('customer_analytics'::regnamespace, 'customer_analytics_internal'::regnamespace)
  AND c.relkind IN ('r', 'v', 'm')
ORDER BY c.oid::regclass::text;

-- staging tables carry their load bookkeeping columns
SELECT c.relname, string_agg(a.attname, ', ' ORDER BY a.attnum) AS bookkeeping
FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
WHERE c.relnamespace = 'customer_analytics'::regnamespace AND c.relkind = 'r' AND c.relname LIKE 'stg\_%'
  AND a.attname IN ('load_id', 'loaded_at', 'stage_id', 'staged_xid')
GROUP BY c.relname ORDER BY c.relname;

-- primary keys, foreign keys and checks
SELECT conrelid::regclass AS tbl, contype, pg_get_constraintdef(oid) AS definition
FROM pg_constraint
WHERE connamespace IN ('customer_analytics'::regnamespace, 'customer_analytics_internal'::regnamespace)
  AND contype IN ('p', 'f', 'u')
ORDER BY conrelid::regclass::text, contype, conname;

SELECT conrelid::regclass AS tbl, count(*) AS check_constraints
FROM pg_constraint
WHERE connamespace IN ('customer_analytics'::regnamespace, 'customer_analytics_internal'::regnamespace)
  AND contype = 'c'
GROUP BY 1 ORDER BY 1;

-- every user-data table (and sequence) is dumped by pg_dump
SELECT unnest(extconfig)::regclass AS dumped, unnest(extcondition) AS filter
FROM pg_extension WHERE extname = 'customer_analytics'
ORDER BY 1::text;

-- the explicit unknown members
SELECT customer_key, customer_id, name, is_current FROM dim_customer WHERE customer_key = -1;
SELECT product_key, product_id, name, category FROM dim_product WHERE product_key = -1;

-- closed domains are enforced where rows enter
\set VERBOSITY terse
INSERT INTO stg_orders (order_id, line_number, product_id, order_ts, quantity, unit_price, status)
VALUES ('O1', 1, 'P1', '2025-01-01', 1, 9.99, 'shipped');
INSERT INTO stg_orders (order_id, line_number, product_id, order_ts, quantity, unit_price)
VALUES ('O1', 1, 'P1', '2025-01-01', 0, 9.99);
INSERT INTO stg_orders (order_id, line_number, product_id, order_ts, quantity, unit_price)
VALUES ('', 1, 'P1', '2025-01-01', 1, 9.99);
-- a credit line (negative quantity) is valid, but not with a discount
INSERT INTO stg_orders (order_id, line_number, product_id, order_ts, quantity, unit_price, discount)
VALUES ('C1', 1, 'P1', '2025-01-01', -1, 9.99, 1.00);
INSERT INTO stg_events (event_id, event_ts, session_id, event_type)
VALUES ('e1', '2025-01-01', 's1', 'scroll');
INSERT INTO dim_customer (customer_id, valid_from, valid_to, is_current)
VALUES ('X', '2025-01-02', '2025-01-01', false);
INSERT INTO dim_customer (customer_id, valid_from, valid_to, is_current)
VALUES ('X', '2025-01-01', 'infinity', false);
INSERT INTO dim_date (date_key, date, year, quarter, month, month_name, iso_year, iso_week,
                      day_of_week, day_name, is_weekend)
VALUES (20250102, '2025-01-01', 2025, 1, 1, 'January', 2025, 1, 3, 'Wednesday', false);
\set VERBOSITY default

-- staging defaults fill the bookkeeping columns
BEGIN;
INSERT INTO stg_orders (order_id, line_number, product_id, order_ts, quantity, unit_price)
VALUES ('O1', 1, 'P1', '2025-01-01', 1, 9.99);
SELECT status, discount, loaded_at = now() AS loaded_now, stage_id > 0 AS has_stage_id,
       staged_xid = pg_current_xact_id() AS staged_by_me
FROM stg_orders;
ROLLBACK;

-- the staging mark: every staging table's staged_xid defaults to
-- staging_xid(), which is pg_current_xact_id() (assigning the transaction
-- its id if it has none yet: a staging transaction that wrote nothing else
-- before), the same through the transaction, also in a subtransaction (the
-- top-level id), labelled STABLE and PARALLEL UNSAFE like it; off Citus it
-- refuses nothing
SELECT c.relname, pg_get_expr(d.adbin, d.adrelid) AS staged_xid_default
FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
JOIN pg_class c ON c.oid = d.adrelid
WHERE c.relnamespace = 'customer_analytics'::regnamespace AND a.attname = 'staged_xid'
ORDER BY c.relname;
SELECT p.provolatile, p.proparallel, p.proisstrict, p.prorettype::regtype,
       obj_description(p.oid, 'pg_proc') IS NOT NULL AS commented
FROM pg_proc p WHERE p.oid = 'customer_analytics_internal.staging_xid()'::regprocedure;
BEGIN;
SELECT pg_current_xact_id_if_assigned() IS NULL AS no_xid_yet;
SELECT customer_analytics_internal.staging_xid() AS first \gset
SELECT pg_current_xact_id_if_assigned() = :'first'::xid8 AS assigned_it,
       pg_current_xact_id() = :'first'::xid8 AS as_pg_current_xact_id;
SAVEPOINT s;
INSERT INTO stg_events (event_id, event_ts, session_id, event_type) VALUES ('e-mark', '2025-01-01', 's1', 'page_view');
INSERT INTO stg_customers (customer_id) VALUES ('c-mark');
INSERT INTO stg_products (product_id) VALUES ('p-mark');
INSERT INTO stg_orders (order_id, line_number, product_id, order_ts, quantity, unit_price)
SELECT 'O-mark-' || i, 1, 'P1', '2025-01-01', 1, 1 FROM generate_series(1, 3) i;
RELEASE SAVEPOINT s;
SELECT 'stg_events' AS tbl, count(*) AS rows, bool_and(staged_xid = :'first'::xid8) AS top_level_id FROM stg_events
UNION ALL SELECT 'stg_customers', count(*), bool_and(staged_xid = :'first'::xid8) FROM stg_customers
UNION ALL SELECT 'stg_products', count(*), bool_and(staged_xid = :'first'::xid8) FROM stg_products
UNION ALL SELECT 'stg_orders', count(*), bool_and(staged_xid = :'first'::xid8) FROM stg_orders
ORDER BY 1;
ROLLBACK;
-- the next transaction: its own id
BEGIN;
SELECT customer_analytics_internal.staging_xid() > :'first'::xid8 AS a_later_id,
       customer_analytics_internal.staging_xid() = pg_current_xact_id() AS as_pg_current_xact_id;
ROLLBACK;

-- helper functions
SELECT date_key('2025-03-07'), business_timezone();
SET customer_analytics.timezone = 'Europe/Paris';
SELECT business_timezone();
\set VERBOSITY terse
SET customer_analytics.timezone = 'Mars/Olympus_Mons';
\set VERBOSITY default
RESET customer_analytics.timezone;
SELECT ensure_dim_date('2025-01-30', '2025-02-02') AS added;
SELECT ensure_dim_date('2025-02-05', '2025-02-05') AS added_with_gap_filled;
SELECT date_key, date, year, quarter, month, month_name, iso_year, iso_week, day_of_week, day_name, is_weekend
FROM dim_date ORDER BY date_key;
TRUNCATE dim_date CASCADE;
