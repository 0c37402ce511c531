-- The order lines' bulk write: transform() checks the keys of its whole
-- batch with one anti-join instead of a query per line, where that is sound,
-- and the foreign keys stay declared and enforced for every other writer.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql

CALL pg_temp.reset_warehouse(dates => true);
SELECT count(*) > 0 AS generated FROM generate_sample_data(customers => 200, days => 30, seed => 5, events => false);

-- when the per-row checks may be skipped: READ COMMITTED, a role that may
-- set session_replication_role, no trigger of a user's, not Citus
BEGIN;
SELECT customer_analytics_internal.fact_bulk_write_ok('customer_analytics.fact_order_line') AS superuser_read_committed;
-- and then no other session may delete a dimension row until commit
SELECT mode FROM pg_locks
WHERE locktype = 'relation' AND pid = pg_backend_pid() AND granted
  AND relation IN ('customer_analytics.dim_customer'::regclass, 'customer_analytics.dim_product'::regclass,
                   'customer_analytics.dim_date'::regclass)
  AND mode = 'ShareLock'
ORDER BY relation::regclass::text;
ROLLBACK;
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT customer_analytics_internal.fact_bulk_write_ok('customer_analytics.fact_order_line') AS repeatable_read;
ROLLBACK;
BEGIN;
SET LOCAL session_replication_role = local;
SELECT customer_analytics_internal.fact_bulk_write_ok('customer_analytics.fact_order_line') AS replication_role_not_origin;
ROLLBACK;
CREATE ROLE ca_bulk_nopriv;
GRANT USAGE ON SCHEMA customer_analytics, customer_analytics_internal TO ca_bulk_nopriv;
BEGIN;
SET LOCAL ROLE ca_bulk_nopriv;
SELECT customer_analytics_internal.fact_bulk_write_ok('customer_analytics.fact_order_line') AS role_without_the_privilege;
ROLLBACK;

-- a user's trigger on the facts fires for every line transform() writes:
-- the bulk write is not taken
CREATE TABLE fact_audit (order_id text, line_number integer);
CREATE FUNCTION fact_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fact_audit VALUES (NEW.order_id, NEW.line_number);
    RETURN NEW;
END $$;
CREATE TRIGGER fact_audit AFTER INSERT ON customer_analytics.fact_order_line
    FOR EACH ROW EXECUTE FUNCTION fact_audit_row();
BEGIN;
SELECT customer_analytics_internal.fact_bulk_write_ok('customer_analytics.fact_order_line') AS with_a_user_trigger;
ROLLBACK;
SELECT count(*) > 0 AS transformed FROM transform();
SELECT (SELECT count(*) FROM fact_audit) = (SELECT count(*) FROM customer_analytics.fact_order_line) AS audit_saw_every_line,
       (SELECT count(*) FROM fact_audit) > 0 AS some_lines;
DROP TRIGGER fact_audit ON customer_analytics.fact_order_line;

-- the same staged lines through the bulk write give the same facts (keys
-- compared by what they name: the reset renumbers the dimensions)
CREATE TEMP VIEW facts_named AS
SELECT f.order_id, f.line_number, c.customer_id, p.product_id, d.date, f.order_ts, f.quantity,
       f.unit_price, f.discount, f.status
FROM customer_analytics.fact_order_line f
JOIN customer_analytics.dim_customer c USING (customer_key)
JOIN customer_analytics.dim_product p USING (product_key)
JOIN customer_analytics.dim_date d USING (date_key);
CREATE TEMP TABLE facts_row_checked AS SELECT * FROM facts_named;
CALL pg_temp.reset_warehouse(dates => true);
SELECT count(*) > 0 AS generated FROM generate_sample_data(customers => 200, days => 30, seed => 5, events => false);
SELECT count(*) > 0 AS transformed FROM transform();
SELECT (SELECT count(*) FROM facts_named) = (SELECT count(*) FROM customer_analytics.fact_order_line) AS every_line_named,
       (SELECT count(*) FROM facts_named) = (SELECT count(*) FROM facts_row_checked) AS as_many_lines,
       (SELECT count(*) FROM ((TABLE facts_named EXCEPT ALL TABLE facts_row_checked)
                              UNION ALL (TABLE facts_row_checked EXCEPT ALL TABLE facts_named)) d) AS lines_differing;
SHOW session_replication_role;

-- the foreign keys still hold for everyone else
\set VERBOSITY terse
INSERT INTO customer_analytics.fact_order_line (order_id, line_number, customer_key, product_key, date_key,
                                                order_ts, quantity, unit_price, discount, status, channel,
                                                updated_at, stage_id)
SELECT 'HAND-1', 1, 987654321, product_key, date_key, order_ts, quantity, unit_price, discount, status, channel,
       updated_at, stage_id
FROM customer_analytics.fact_order_line ORDER BY order_id, line_number LIMIT 1;
DELETE FROM customer_analytics.dim_product
WHERE product_key = (SELECT product_key FROM customer_analytics.fact_order_line ORDER BY order_id, line_number LIMIT 1);
\set VERBOSITY default

-- the set-wise check names the first line whose key is in no dimension
BEGIN;
CREATE TEMP TABLE ca_order_lines ON COMMIT DROP AS
SELECT order_id, line_number, customer_key, product_key, date_key FROM customer_analytics.fact_order_line
ORDER BY order_id, line_number LIMIT 3;
SELECT 'every key found' AS checked FROM (SELECT customer_analytics_internal.check_order_line_keys()) c;
UPDATE ca_order_lines SET date_key = 19000101
WHERE (order_id, line_number) = (SELECT order_id, line_number FROM ca_order_lines ORDER BY order_id DESC, line_number DESC LIMIT 1);
-- (terse: the keys' numbers depend on the tests run before)
\set VERBOSITY terse
SELECT customer_analytics_internal.check_order_line_keys();
\set VERBOSITY default
ROLLBACK;

DROP TABLE fact_audit;
DROP FUNCTION fact_audit_row();
REVOKE USAGE ON SCHEMA customer_analytics, customer_analytics_internal FROM ca_bulk_nopriv;
DROP ROLE ca_bulk_nopriv;
