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
                                                updated_at, stage_id, customer_ref)
SELECT 'HAND-1', 1, 987654321, product_key, date_key, order_ts, quantity, unit_price, discount, status, channel,
       updated_at, stage_id, customer_ref
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

-- The events' first load (fact_event empty) stitches anonymous events from
-- the batch before writing them; otherwise they are written, then stitched.
-- Both paths on the same batch give the same rows and the same counts, ties
-- in time, a customer not in the dimension (-1) and anonymous events after
-- the last identified one included.  The batch is large enough (10,000
-- events or more) for the first load to build fact_event's secondary
-- indexes after its rows: they are the same indexes afterwards.
CALL pg_temp.reset_warehouse(dates => true);
CREATE TEMP TABLE event_indexes AS
SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'customer_analytics' AND tablename = 'fact_event';
SELECT count(*) > 0 AS generated FROM generate_sample_data(customers => 2000, days => 90, seed => 5);
SELECT count(*) > 0 AS transformed FROM transform();
INSERT INTO customer_analytics.stg_events (event_id, event_ts, customer_id, session_id, event_type)
VALUES ('bk-1', '2025-01-10 10:00+00', NULL, 'bk-s1', 'page_view'),
       ('bk-2', '2025-01-10 10:05+00', NULL, 'bk-s1', 'page_view'),
       ('bk-3', '2025-01-10 10:05+00', 'bk-nobody', 'bk-s1', 'add_to_cart'),  -- same time as bk-2
       ('bk-4', '2025-01-10 10:06+00', NULL, 'bk-s1', 'page_view'),
       ('bk-5', '2025-01-10 10:07+00', 'bk-nobody', 'bk-s1', 'checkout'),
       ('bk-6', '2025-01-10 10:09+00', NULL, 'bk-s1', 'page_view');          -- after the last identified: stays anonymous
TRUNCATE customer_analytics.fact_event;
CREATE TEMP TABLE first_counts AS
SELECT step, rows_affected FROM transform_events(full_refresh => true);
CREATE TEMP TABLE first_rows AS
SELECT event_id, event_ts, date_key, customer_key, customer_id, customer_stitched, session_id,
       event_type, product_key, order_id, channel, device
FROM customer_analytics.fact_event;
SELECT (SELECT rows_affected FROM first_counts WHERE step = 'fact_event') >= 10000 AS large_batch,
       (SELECT count(*) FROM event_indexes) AS indexes,
       (SELECT count(*) FROM (SELECT indexname, indexdef FROM pg_indexes
                              WHERE schemaname = 'customer_analytics' AND tablename = 'fact_event'
                              EXCEPT SELECT * FROM event_indexes) d) AS indexes_changed;
SELECT (SELECT rows_affected FROM first_counts WHERE step = 'fact_event_stitched') > 0 AS some_stitched,
       (SELECT count(*) FROM first_rows WHERE customer_stitched)
       = (SELECT rows_affected FROM first_counts WHERE step = 'fact_event_stitched') AS counted;
SELECT event_id, customer_id, customer_key, customer_stitched FROM first_rows WHERE session_id = 'bk-s1' ORDER BY event_id;
-- the other path: one event of another session in the table first
TRUNCATE customer_analytics.fact_event;
INSERT INTO customer_analytics.fact_event (event_id, event_ts, date_key, session_id, event_type, stage_id)
VALUES ('bk-sentinel', '2025-01-10 09:00+00', 20250110, 'bk-sentinel', 'page_view', 0);
SELECT f.step, f.rows_affected = o.rows_affected AS same_count
FROM first_counts f JOIN transform_events(full_refresh => true) o USING (step) ORDER BY f.step;
SELECT count(*) AS rows_that_differ FROM (
    (SELECT * FROM first_rows
     EXCEPT ALL
     SELECT event_id, event_ts, date_key, customer_key, customer_id, customer_stitched, session_id,
            event_type, product_key, order_id, channel, device
     FROM customer_analytics.fact_event WHERE event_id <> 'bk-sentinel')
    UNION ALL
    (SELECT event_id, event_ts, date_key, customer_key, customer_id, customer_stitched, session_id,
            event_type, product_key, order_id, channel, device
     FROM customer_analytics.fact_event WHERE event_id <> 'bk-sentinel'
     EXCEPT ALL
     SELECT * FROM first_rows)) d;

-- which indexes a first load builds after its rows, and when: a batch of
-- 10,000 rows or more into an empty table, its secondary indexes only
-- (not the primary key), given back as they were
BEGIN;
TRUNCATE customer_analytics.fact_event;
SELECT customer_analytics_internal.defer_fact_indexes('customer_analytics.fact_event', 9999) IS NULL AS small_batch_keeps_them,
       customer_analytics_internal.defer_fact_indexes('customer_analytics.fact_order_line', 10000) IS NULL AS table_not_empty_keeps_them;
CREATE TEMP TABLE deferred ON COMMIT DROP AS
SELECT customer_analytics_internal.defer_fact_indexes('customer_analytics.fact_event', 10000) AS defs;
SELECT cardinality(defs) AS dropped FROM deferred;
SELECT indexname FROM pg_indexes WHERE schemaname = 'customer_analytics' AND tablename = 'fact_event' ORDER BY 1;
SELECT customer_analytics_internal.restore_fact_indexes(defs) FROM deferred;
SELECT count(*) AS indexes_changed FROM (
    (SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'customer_analytics' AND tablename = 'fact_event'
     EXCEPT SELECT * FROM event_indexes)
    UNION ALL
    (SELECT * FROM event_indexes
     EXCEPT SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'customer_analytics' AND tablename = 'fact_event')) d;
ROLLBACK;

-- (the clickstream tests that follow start from no events)
TRUNCATE customer_analytics.stg_events, customer_analytics.fact_event;
