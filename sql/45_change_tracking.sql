-- Change tracking without statement triggers.  transform() and
-- refresh_customer_rfm() queue what they change (rfm_new_line,
-- rfm_dirty_customer, sales_dirty_day, clickstream_change, check_change,
-- rfm_segment_stat) themselves, in the statements that write it, so the
-- incremental refreshes work where statement triggers with transition
-- tables cannot (Citus).  With the rollup, clickstream and segment-sum
-- triggers disabled, a day of changes through transform() (new orders, a
-- re-staged line, a customer's new version, a product changing category,
-- a late-arriving customer, new, stitched, late-keyed and corrected events)
-- and the incremental refreshes give what the full rebuilds give.  The
-- check triggers stay enabled: while a writer runs they return at once, so
-- check_change holds the writers' own records.  Last, with every trigger
-- back: a writer's change is queued once, and a change by hand is still
-- queued by the triggers.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
-- recency from after every order line: customer_rfm is scored from its rollup
SET customer_analytics.as_of = '2030-01-01 00:00+00';

CALL pg_temp.reset_warehouse(also => '{event_transform_state, clickstream_state}', dates => true);
SELECT count(*) > 0 AS generated FROM generate_sample_data(customers => 300, days => 60, seed => 23);
SELECT count(*) > 0 AS transformed FROM transform();
SELECT refresh_sales_rollup() > 0 AS sales_built, refresh_customer_rfm() > 0 AS rfm_built;
SELECT sum(rows_affected) > 0 AS sessions_built FROM refresh_sessions();
SELECT count(*) AS checks_run FROM run_checks(full => true);

DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT g.tgrelid::regclass AS rel, g.tgname FROM pg_trigger g
             WHERE NOT g.tgisinternal
               AND g.tgfoid IN ('customer_analytics_internal.note_dirty_customers()'::regprocedure,
                                'customer_analytics_internal.note_dirty_sales_days()'::regprocedure,
                                'customer_analytics_internal.fact_event_changed()'::regprocedure,
                                'customer_analytics_internal.maintain_rfm_segment_stat()'::regprocedure)
    LOOP
        EXECUTE format('ALTER TABLE %s DISABLE TRIGGER %I', t.rel, t.tgname);
    END LOOP;
END
$$;
SELECT g.tgrelid::regclass AS table_name, count(*) AS triggers_disabled
FROM pg_trigger g WHERE NOT g.tgisinternal AND g.tgenabled = 'D' GROUP BY 1 ORDER BY 1;

-- a day of changes, staged
SELECT max(order_ts) AS last_ts FROM fact_order_line \gset
SELECT max(event_ts) AS last_event FROM fact_event \gset
SELECT setseed(0.45);
-- new orders of known customers
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel)
SELECT 'CT-' || g, l, (SELECT customer_id FROM stg_customers ORDER BY customer_id OFFSET (g * 7) % 250 LIMIT 1),
       (SELECT product_id FROM stg_products ORDER BY product_id OFFSET (g * 3 + l) % 50 LIMIT 1),
       :'last_ts'::timestamptz - interval '1 day' + (g % 5) * interval '7 hours',
       1 + (random() * 3)::int, round((5 + random() * 100)::numeric, 2), 0, 'completed', 'web'
FROM generate_series(1, 40) g, generate_series(1, 1 + g % 3) l;
-- a line worth less than nothing (the check "no negative revenue" fails on it)
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel)
SELECT 'CT-BAD', 1, min(customer_id), (SELECT min(product_id) FROM stg_products), :'last_ts', 1, 10, 25, 'completed', 'web'
FROM stg_customers;
-- an old line staged again with another quantity (an update, not an insert)
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel)
SELECT order_id, line_number, customer_id, product_id, order_ts, quantity + 5, unit_price, discount, status, channel
FROM stg_orders WHERE order_id = (SELECT min(order_id) FROM stg_orders WHERE order_id NOT LIKE 'CT-%');
-- a customer moves (a new version) and a product changes category
INSERT INTO stg_customers (customer_id, name, email, city, state, country, signup_date, updated_at)
SELECT customer_id, name, email, 'Elsewhere', state, country, signup_date, :'last_ts'::timestamptz - interval '2 days'
FROM stg_customers WHERE customer_id = (SELECT customer_id FROM stg_customers ORDER BY customer_id OFFSET 7 LIMIT 1);
INSERT INTO stg_products (product_id, name, category, subcategory, unit_cost, list_price)
SELECT product_id, name, 'Moved', subcategory, unit_cost, list_price
FROM stg_products WHERE product_id = (SELECT product_id FROM stg_products ORDER BY product_id OFFSET 3 LIMIT 1);
-- a customer whose order line and events arrive before them
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel)
SELECT 'CT-LATE', 1, 'CT-LATE-CUSTOMER', min(product_id), :'last_ts', 2, 30, 0, 'completed', 'app' FROM stg_products;
-- events: an anonymous visit that logs in at the cart (stitched), the late
-- customer's visit, and an old event delivered again with a corrected channel
INSERT INTO stg_events (event_id, event_ts, customer_id, session_id, event_type, product_id, channel, device)
VALUES ('ct-e1', :'last_event'::timestamptz + interval '1 minute', NULL, 'ct-s1', 'page_view', NULL, 'web', 'mobile'),
       ('ct-e2', :'last_event'::timestamptz + interval '2 minutes', NULL, 'ct-s1', 'product_view',
        (SELECT min(product_id) FROM stg_products), 'web', 'mobile'),
       ('ct-e3', :'last_event'::timestamptz + interval '3 minutes',
        (SELECT min(customer_id) FROM stg_customers), 'ct-s1', 'add_to_cart',
        (SELECT min(product_id) FROM stg_products), 'web', 'mobile'),
       ('ct-e4', :'last_event'::timestamptz + interval '4 minutes', 'CT-LATE-CUSTOMER', 'ct-s2', 'page_view', NULL, 'app', 'desktop');
INSERT INTO stg_events (event_id, event_ts, customer_id, session_id, event_type, product_id, order_id, channel, device)
SELECT event_id, event_ts, customer_id, session_id, event_type, product_id, order_id, 'corrected', device
FROM stg_events WHERE event_id = (SELECT event_id FROM fact_event ORDER BY event_ts DESC, event_id LIMIT 1 OFFSET 10);
SELECT step, rows_affected FROM transform() WHERE rows_affected > 0 ORDER BY step;
-- the late customer arrives: their line and event are re-keyed
INSERT INTO stg_customers (customer_id, name, country, updated_at)
VALUES ('CT-LATE-CUSTOMER', 'Late Customer', 'France', '2000-01-01');
SELECT step, rows_affected FROM transform() WHERE rows_affected > 0 ORDER BY step;

-- the queues were filled without the triggers
SELECT (SELECT count(*) FROM customer_analytics_internal.rfm_new_line) AS rfm_new_lines,
       (SELECT count(*) FROM customer_analytics_internal.rfm_dirty_customer) AS rfm_dirty_customers,
       (SELECT count(*) FROM customer_analytics_internal.sales_dirty_day) > 1 AS sales_days_dirty,
       (SELECT count(*) FROM customer_analytics_internal.clickstream_change) >= 3 AS visitors_changed;
SELECT rel, op, count(*) AS queued FROM customer_analytics_internal.check_change GROUP BY 1, 2 ORDER BY 1, 2;

-- the incremental refreshes
SELECT refresh_sales_rollup() BETWEEN 1 AND 60 AS some_days_recomputed;
SELECT refresh_customer_rfm() > 0 AS rfm_refreshed;
SELECT sum(rows_affected) > 0 AS sessions_refreshed FROM refresh_sessions();
REFRESH MATERIALIZED VIEW daily_sales;
REFRESH MATERIALIZED VIEW product_category_sales;
REFRESH MATERIALIZED VIEW segment_summary;
CREATE TEMP TABLE checks_incremental AS SELECT * FROM run_checks();
SELECT check_name, passed, failing_rows, incremental FROM checks_incremental ORDER BY check_name;
CREATE TEMP TABLE inc_sales_day AS TABLE sales_rollup_day;
CREATE TEMP TABLE inc_sales_category AS TABLE sales_rollup_category;
CREATE TEMP TABLE inc_daily_sales AS TABLE daily_sales;
CREATE TEMP TABLE inc_category_sales AS TABLE product_category_sales;
CREATE TEMP TABLE inc_rfm AS
SELECT customer_key, customer_id, recency_days, frequency, monetary, r, f, m, rfm_cell, segment FROM customer_rfm;
CREATE TEMP TABLE inc_segments AS TABLE segment_summary;
CREATE TEMP TABLE inc_sessions AS SELECT * FROM sessions;
CREATE TEMP TABLE inc_funnel AS SELECT * FROM funnel_daily;

-- the full rebuilds
SELECT refresh_sales_rollup(true) > 0 AS sales_rebuilt, refresh_customer_rfm(true) >= 0 AS rfm_rebuilt;
SELECT sum(rows_affected) > 0 AS sessions_rebuilt FROM refresh_sessions(true);
REFRESH MATERIALIZED VIEW daily_sales;
REFRESH MATERIALIZED VIEW product_category_sales;
REFRESH MATERIALIZED VIEW segment_summary;
CREATE TEMP TABLE checks_full AS SELECT * FROM run_checks(full => true);
CREATE TEMP VIEW rfm_full AS SELECT * FROM rfm(reference_time());

SELECT 'sales_rollup_day' AS what, count(*) AS differences
FROM ((TABLE inc_sales_day EXCEPT ALL TABLE sales_rollup_day) UNION ALL (TABLE sales_rollup_day EXCEPT ALL TABLE inc_sales_day)) x
UNION ALL
SELECT 'sales_rollup_category', count(*)
FROM ((TABLE inc_sales_category EXCEPT ALL TABLE sales_rollup_category)
      UNION ALL (TABLE sales_rollup_category EXCEPT ALL TABLE inc_sales_category)) x
UNION ALL
SELECT 'daily_sales', count(*)
FROM ((TABLE inc_daily_sales EXCEPT ALL TABLE daily_sales) UNION ALL (TABLE daily_sales EXCEPT ALL TABLE inc_daily_sales)) x
UNION ALL
SELECT 'product_category_sales', count(*)
FROM ((TABLE inc_category_sales EXCEPT ALL TABLE product_category_sales)
      UNION ALL (TABLE product_category_sales EXCEPT ALL TABLE inc_category_sales)) x
UNION ALL
SELECT 'customer_rfm', count(*)
FROM ((TABLE inc_rfm EXCEPT ALL TABLE rfm_full) UNION ALL (TABLE rfm_full EXCEPT ALL TABLE inc_rfm)) x
UNION ALL
SELECT 'segment_summary', count(*)
FROM ((TABLE inc_segments EXCEPT ALL TABLE segment_summary) UNION ALL (TABLE segment_summary EXCEPT ALL TABLE inc_segments)) x
UNION ALL
SELECT 'sessions', count(*)
FROM ((TABLE inc_sessions EXCEPT ALL TABLE sessions) UNION ALL (TABLE sessions EXCEPT ALL TABLE inc_sessions)) x
UNION ALL
SELECT 'funnel_daily', count(*)
FROM ((TABLE inc_funnel EXCEPT ALL TABLE funnel_daily) UNION ALL (TABLE funnel_daily EXCEPT ALL TABLE inc_funnel)) x
UNION ALL
SELECT 'checks', count(*)
FROM ((SELECT check_name, passed, failing_rows FROM checks_incremental
       EXCEPT ALL SELECT check_name, passed, failing_rows FROM checks_full)
      UNION ALL (SELECT check_name, passed, failing_rows FROM checks_full
                 EXCEPT ALL SELECT check_name, passed, failing_rows FROM checks_incremental)) x
ORDER BY 1;
-- what changed is in the results: the line worth less than nothing, the
-- stitched visit, the late customer
SELECT passed, failing_rows FROM checks_incremental WHERE check_name = 'no negative revenue';
SELECT event_id, customer_id IS NOT NULL AS identified, customer_stitched, customer_key <> -1 AS keyed
FROM fact_event WHERE event_id LIKE 'ct-e%' ORDER BY event_id;
SELECT order_id, c.customer_id FROM fact_order_line f JOIN dim_customer c USING (customer_key)
WHERE order_id = 'CT-LATE';

-- every trigger back: a writer's change is queued once (the triggers
-- return at once while it writes), a change by hand by the triggers
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT g.tgrelid::regclass AS rel, g.tgname FROM pg_trigger g
             WHERE NOT g.tgisinternal AND g.tgenabled = 'D'
    LOOP
        EXECUTE format('ALTER TABLE %s ENABLE TRIGGER %I', t.rel, t.tgname);
    END LOOP;
END
$$;
SELECT refresh_customer_rfm() >= 0 AS rfm_refreshed, refresh_sales_rollup() >= 0 AS sales_refreshed;
SELECT count(*) >= 0 AS checked FROM run_checks();
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel)
SELECT 'CT-ONCE', 1, min(customer_id), (SELECT min(product_id) FROM stg_products), :'last_ts', 1, 10, 0, 'completed', 'web'
FROM stg_customers;
SELECT step, rows_affected FROM transform() WHERE rows_affected > 0 ORDER BY step;
SELECT (SELECT count(*) FROM customer_analytics_internal.rfm_new_line) AS rfm_new_lines,
       (SELECT count(*) FROM customer_analytics_internal.sales_dirty_day) AS sales_days_dirty,
       (SELECT count(*) FROM customer_analytics_internal.check_change) AS checks_queued;
UPDATE fact_order_line SET quantity = quantity + 1 WHERE order_id = 'CT-1';
SELECT (SELECT count(*) FROM customer_analytics_internal.rfm_dirty_customer) AS rfm_dirty_customers,
       (SELECT count(*) FROM customer_analytics_internal.sales_dirty_day) AS sales_days_dirty,
       (SELECT count(*) FROM customer_analytics_internal.check_change WHERE op = 'o') AS old_rows_queued;

-- the following tests start without events or order lines
TRUNCATE stg_events, stg_orders, fact_event;
TRUNCATE fact_order_line CASCADE;
