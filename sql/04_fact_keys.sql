-- fact_order_line's references to dim_customer, dim_product and dim_date,
-- enforced per statement (no foreign key constraints): what a constraint
-- refuses is refused, with SQLSTATE 23503, and nothing of the statement
-- stays; what it allows is allowed.
SET client_min_messages = warning;
SET search_path = customer_analytics, public;
SET timezone = 'UTC';

TRUNCATE stg_customers, stg_products, stg_orders, stg_events, fact_order_line, fact_event, transform_state;
DELETE FROM dim_customer WHERE customer_key <> -1;
DELETE FROM dim_product WHERE product_key <> -1;
SELECT ensure_dim_date('2025-03-01', '2025-03-02') >= 0 AS calendar;
INSERT INTO dim_customer (customer_key, customer_id, valid_from) VALUES (901, 'K1', '2025-01-01');
INSERT INTO dim_product (product_key, product_id) VALUES (901, 'P1');

CREATE FUNCTION pg_temp.line(id text, c bigint, p bigint, d int) RETURNS void LANGUAGE sql AS $$
    INSERT INTO customer_analytics.fact_order_line
        (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity, unit_price, status, stage_id)
    VALUES (id, 1, c, p, d, '2025-03-01 10:00+00', 1, 1, 'completed', 0)
$$;

-- lines whose keys exist, the unknown members included
SELECT pg_temp.line('A', 901, 901, 20250301), pg_temp.line('B', -1, -1, 20250302);
\set SHOW_CONTEXT never
-- a missing key of each dimension, one line among good ones: nothing stays
INSERT INTO fact_order_line (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity, unit_price, status, stage_id)
VALUES ('C', 1, 901, 901, 20250301, '2025-03-01', 1, 1, 'completed', 0),
       ('C', 2, 902, 901, 20250301, '2025-03-01', 1, 1, 'completed', 0);
SELECT pg_temp.line('D', 901, 902, 20250301);
SELECT pg_temp.line('E', 901, 901, 20250303);
-- an update to a missing key
UPDATE fact_order_line SET customer_key = 903 WHERE order_id = 'A';
SELECT order_id, customer_key, product_key, date_key FROM fact_order_line ORDER BY order_id;

-- a referenced dimension row cannot be deleted, re-keyed or truncated away
DELETE FROM dim_customer WHERE customer_key = 901;
UPDATE dim_product SET product_key = 904 WHERE product_key = 901;
DELETE FROM dim_date WHERE date_key = 20250302;
TRUNCATE dim_date;
-- an unreferenced one can; updating other columns of a referenced one too
INSERT INTO dim_customer (customer_key, customer_id, valid_from) VALUES (905, 'K5', '2025-01-01');
DELETE FROM dim_customer WHERE customer_key = 905;
UPDATE dim_customer SET name = 'K one' WHERE customer_key = 901;
-- facts and dimension truncated together
BEGIN;
TRUNCATE fact_order_line, dim_date;
SELECT count(*) AS days_left FROM dim_date;
ROLLBACK;
SELECT count(*) AS lines, count(DISTINCT customer_key) AS customers FROM fact_order_line;

-- a transaction loading lines locks the rows they reference FOR KEY SHARE,
-- as a foreign key's check does: a concurrent delete of a customer only
-- its uncommitted line references waits for it (a lock timeout in a
-- second session) instead of leaving the line orphaned
INSERT INTO dim_customer (customer_key, customer_id, valid_from) VALUES (906, 'K6', '2025-01-01');
CREATE EXTENSION IF NOT EXISTS dblink;
BEGIN;
SELECT pg_temp.line('F', 906, 901, 20250301);
SELECT locktype, mode FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
WHERE l.pid = pg_backend_pid() AND c.relname = 'dim_customer' AND l.locktype = 'relation' ORDER BY mode;
SELECT dblink_exec('dbname=' || current_database(),
                   'SET lock_timeout = ''200ms''; DELETE FROM customer_analytics.dim_customer WHERE customer_key = 906') AS concurrent_delete;
ROLLBACK;
DROP EXTENSION dblink;

TRUNCATE fact_order_line;
DELETE FROM dim_customer WHERE customer_key <> -1;
DELETE FROM dim_product WHERE product_key <> -1;
DELETE FROM dim_date;
