-- Checks over what changed: after random appends, updates, deletes, late
-- data and new customer versions, run_checks() over the changes finds
-- exactly what run_checks(full => true) finds on the same database (same
-- verdict, same number of failing rows), and most checks did run over the
-- changes only.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
SET customer_analytics.full_checks_interval = '100 years';

CALL pg_temp.reset_warehouse();
SELECT count(*) > 0 AS generated FROM generate_sample_data(customers => 200, days => 60, seed => 5);
SELECT count(*) > 0 AS transformed FROM transform();
-- what earlier tests left: forgotten, so that the first pass here is whole
DELETE FROM customer_analytics_internal.quality_check_progress;

-- a user table tracked like the built-in ones, with a check of every kind
CREATE TABLE public.signup (id integer PRIMARY KEY, email text, plan text, customer_key bigint, at timestamptz);
SELECT track_check_changes('public.signup');
INSERT INTO public.signup
SELECT g, 'u' || g || '@example.com', (ARRAY['free', 'pro'])[1 + g % 2], customer_key, '2030-01-01'::timestamptz + g * interval '1 minute'
FROM (SELECT row_number() OVER (ORDER BY customer_id, valid_from)::integer AS g, customer_key FROM dim_customer WHERE customer_key > 0) c
WHERE g <= 150;
INSERT INTO quality_check (name, kind, target, column_name, params, severity) VALUES
    ('t signup email set', 'not_null', 'public.signup', 'email', '{}', 'warn'),
    ('t signup email unique', 'unique', 'public.signup', 'email', '{}', 'warn'),
    ('t signup email and plan unique', 'unique', 'public.signup', 'email, plan', '{}', 'warn'),
    ('t signup plan known', 'accepted_values', 'public.signup', 'plan', '{"values": ["free", "pro"]}', 'warn'),
    ('t signup customer exists', 'relationship', 'public.signup', 'customer_key',
     '{"to": "customer_analytics.dim_customer", "field": "customer_key"}', 'warn'),
    ('t signup fresh', 'freshness', 'public.signup', 'at', '{"max_age": "1 day"}', 'warn'),
    ('t event channel known', 'accepted_values', 'customer_analytics.fact_event', 'channel',
     jsonb_build_object('values', ARRAY(SELECT DISTINCT channel FROM fact_event WHERE channel IS NOT NULL)), 'warn'),
    ('t line order id unique', 'unique', 'customer_analytics.fact_order_line', 'order_id, line_number', '{}', 'warn'),
    -- a user's incremental custom check, under the documented contract
    ('t no zero quantity', 'custom', 'customer_analytics.fact_order_line', NULL,
     '{"sql": "SELECT order_id, line_number FROM customer_analytics.fact_order_line WHERE quantity > 90",
       "incremental_sql": "SELECT order_id, line_number FROM customer_analytics.changed_rows(NULL::customer_analytics.fact_order_line) WHERE quantity > 90"}',
     'warn');

CREATE TEMP TABLE round_result (round integer, check_name text, incremental boolean, passed boolean, failing_rows bigint, full_passed boolean, full_failing bigint);
-- a pass over the changes, then a full pass on the same state
CREATE FUNCTION pg_temp.compare(r integer) RETURNS void LANGUAGE sql AS $$
    INSERT INTO round_result (round, check_name, incremental, passed, failing_rows)
    SELECT r, check_name, incremental, passed, failing_rows FROM customer_analytics.run_checks();
    UPDATE round_result x SET full_passed = f.passed, full_failing = f.failing_rows
    FROM customer_analytics.run_checks("full" => true) f WHERE x.round = r AND x.check_name = f.check_name;
$$;

SELECT pg_temp.compare(0);   -- the first pass is whole: nothing known yet
SELECT pg_temp.compare(1);   -- nothing changed: every incremental check passes over nothing

CREATE FUNCTION pg_temp.mutate(r integer) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    k integer := r % 5;
BEGIN
    -- an append of new orders, some with bad values
    INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel)
    SELECT 'T' || r || '-' || g, 1, (SELECT customer_id FROM dim_customer WHERE customer_key > 0 ORDER BY customer_id, valid_from OFFSET abs(hashint4(g + r * 1000)) % 150 LIMIT 1),
           (SELECT product_id FROM dim_product WHERE product_key > 0 ORDER BY product_key LIMIT 1),
           now() - abs(hashint4(g * 7 + r)) % 30 * interval '1 day', CASE WHEN abs(hashint4(g + r * 31)) % 20 = 0 THEN 99 ELSE 1 END, 10,
           CASE WHEN abs(hashint4(g + r * 57)) % 20 = 0 THEN 50 ELSE 0 END, 'completed', 'web'
    FROM generate_series(1, 20) g;
    -- late data: lines of old days, and a changed version of existing lines
    INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel)
    SELECT order_id || '-late' || r, 1, c.customer_id, p.product_id, order_ts - interval '40 days', 1, unit_price, 0, 'completed', channel
    FROM fact_order_line f JOIN dim_customer c USING (customer_key) JOIN dim_product p USING (product_key)
    WHERE abs(hashtext(f.order_id || f.line_number || r)) % 100 = 0;
    PERFORM count(*) FROM transform();
    -- direct updates and deletes, each round a different kind of damage (or repair)
    IF k = 0 THEN
        UPDATE fact_event SET customer_key = 900000 + r WHERE event_id IN (SELECT event_id FROM fact_event WHERE abs(hashtext(event_id || r)) % 500 = 0);
        UPDATE public.signup SET email = 'dup@example.com' WHERE id IN (SELECT id FROM public.signup WHERE abs(hashint4(id + r * 1000)) % 33 = 0);
    ELSIF k = 1 THEN
        UPDATE fact_event SET customer_key = NULL WHERE customer_key >= 900000;
        UPDATE public.signup SET email = 'u' || id || '@example.com' WHERE email = 'dup@example.com';
        -- a customer version only events point at disappears
        DELETE FROM dim_customer WHERE customer_key = (
            SELECT c.customer_key FROM dim_customer c WHERE c.customer_key > 0
              AND NOT EXISTS (SELECT FROM fact_order_line f WHERE f.customer_key = c.customer_key)
              AND EXISTS (SELECT FROM fact_event e WHERE e.customer_key = c.customer_key)
            ORDER BY c.customer_id, c.valid_from LIMIT 1);
    ELSIF k = 2 THEN
        UPDATE fact_event SET customer_key = NULL
        WHERE customer_key IS NOT NULL AND customer_key NOT IN (SELECT customer_key FROM dim_customer);
        DELETE FROM public.signup WHERE id IN (SELECT id FROM public.signup WHERE abs(hashint4(id + r * 1000)) % 20 = 0);
        UPDATE public.signup SET plan = 'gold', email = NULL WHERE id = (SELECT min(id) FROM public.signup);
        UPDATE fact_order_line SET quantity = 95 WHERE (order_id, line_number) IN
            (SELECT order_id, line_number FROM fact_order_line WHERE abs(hashtext(order_id || line_number || r)) % 200 = 0);
    ELSIF k = 3 THEN
        UPDATE public.signup SET plan = 'free', email = 'fixed' || id WHERE plan = 'gold' OR email IS NULL;
        UPDATE fact_order_line SET quantity = 1 WHERE quantity > 90;
        UPDATE fact_order_line SET discount = 0 WHERE revenue < 0;
        UPDATE public.signup s SET customer_key = NULL
        WHERE NOT EXISTS (SELECT FROM dim_customer c WHERE c.customer_key = s.customer_key);
        -- lines back on the version of their customer in effect at order time
        UPDATE fact_order_line f SET customer_key = v.customer_key
        FROM dim_customer c, dim_customer v
        WHERE c.customer_key = f.customer_key AND c.customer_key > 0 AND v.customer_id = c.customer_id
          AND f.order_ts >= v.valid_from AND f.order_ts < v.valid_to AND v.customer_key <> c.customer_key;
        -- a line moved out of its customer version's period
        UPDATE fact_order_line SET order_ts = '1990-01-01' WHERE (order_id, line_number) =
            (SELECT f.order_id, f.line_number FROM fact_order_line f JOIN dim_customer c USING (customer_key)
             WHERE EXISTS (SELECT FROM dim_customer v WHERE v.customer_id = c.customer_id AND v.valid_from < c.valid_from)
             ORDER BY 1, 2 LIMIT 1);
    ELSE
        UPDATE fact_order_line f SET order_ts = c.valid_from FROM dim_customer c
        WHERE c.customer_key = f.customer_key AND f.order_ts = '1990-01-01';
        -- new versions of some customers, dated inside their history
        INSERT INTO stg_customers (customer_id, name, email, city, country, signup_date, updated_at)
        SELECT customer_id, name || ' v' || r, email, city, country, signup_date, now() - interval '20 days'
        FROM dim_customer WHERE is_current AND customer_key > 0 AND abs(hashtext(customer_id || r)) % 20 = 0;
        PERFORM count(*) FROM transform();
        DELETE FROM public.signup WHERE id IN (SELECT id FROM public.signup WHERE abs(hashint4(id + r * 1000)) % 20 = 0);
    END IF;
END
$$;

DO $$ BEGIN
    FOR r IN 2..16 LOOP
        PERFORM pg_temp.mutate(r);
        PERFORM pg_temp.compare(r);
    END LOOP;
END $$;

-- no difference between the two passes, in any round
SELECT round, check_name, incremental, passed, failing_rows, full_passed, full_failing
FROM round_result WHERE passed IS DISTINCT FROM full_passed OR failing_rows IS DISTINCT FROM full_failing
ORDER BY 1, 2;
-- what the rounds found (freshness and volume left out: they follow the clock)
SELECT round, string_agg(check_name || ' ' || failing_rows, ', ' ORDER BY check_name) AS failing
FROM round_result
WHERE NOT passed AND check_name NOT IN ('orders are fresh', 'events are fresh', 'order volume is usual', 't signup fresh')
GROUP BY 1 ORDER BY 1;
-- and how: after the first pass, the checks ran over the changes unless they had failed
SELECT round, count(*) FILTER (WHERE incremental) AS over_changes, count(*) FILTER (WHERE NOT incremental) AS whole
FROM round_result WHERE check_name NOT IN ('orders are fresh', 'events are fresh', 'order volume is usual', 't signup fresh')
GROUP BY 1 ORDER BY 1;
-- failures first found by a pass over the changes
SELECT count(*) > 5 AS found_incrementally FROM round_result WHERE incremental AND NOT passed;

-- changed_rows() outside a pass is every row; full => true runs every
-- check whole; a table without a primary key cannot be tracked
SELECT (SELECT count(*) FROM changed_rows(NULL::public.signup)) = (SELECT count(*) FROM public.signup) AS every_row;
SELECT changed_rows(1);
SELECT count(*) FILTER (WHERE incremental) AS over_changes FROM run_checks("full" => true);
CREATE TABLE public.keyless (x integer);
SELECT track_check_changes('public.keyless');
DROP TABLE public.keyless;
-- a TRUNCATE makes the table's checks run whole once
TRUNCATE public.signup;
SELECT check_name, incremental, passed FROM run_checks() WHERE check_name LIKE 't signup%' ORDER BY 1;
SELECT check_name, incremental, passed FROM run_checks() WHERE check_name LIKE 't signup%' ORDER BY 1;

DELETE FROM quality_check WHERE name LIKE 't %';
DROP TABLE public.signup;
-- the following tests start without events or order lines
TRUNCATE stg_events, stg_orders, fact_event;
TRUNCATE fact_order_line CASCADE;
RESET customer_analytics.full_checks_interval;
