-- The pipeline: plan from pg_depend (users' views included), a run with
-- its log, a failing error-severity check that stops only what depends on
-- it, retries of transient failures, a failed step blocking its
-- dependents, history purge, cron schedules.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
SET customer_analytics.pipeline_retry_backoff = 0;

CALL pg_temp.reset_warehouse(also => '{alert}');
SELECT count(*) > 0 AS generated FROM generate_sample_data(customers => 200, days => 60, seed => 42);

------------------------------------------------------------------------
-- the plan: steps in dependency order, users' views included
------------------------------------------------------------------------
CREATE VIEW public.rfm_champions AS SELECT * FROM customer_rfm WHERE segment = 'Champions';
CREATE MATERIALIZED VIEW public.champion_count AS SELECT count(*) AS champions FROM public.rfm_champions;
CREATE MATERIALIZED VIEW public.champion_share AS
SELECT c.champions, s.customers FROM public.champion_count c, (SELECT sum(customers) AS customers FROM segment_summary) s;
CREATE MATERIALIZED VIEW public.product_count AS SELECT count(*) AS products FROM dim_product;

SELECT level, matview, depends_on, concurrent FROM refresh_plan() ORDER BY level, matview::text;
SELECT step_no, step, depends_on FROM pipeline_plan() ORDER BY step_no;
-- every step comes after all it depends on
SELECT count(*) AS order_violations
FROM pipeline_plan() s, unnest(s.depends_on) d
JOIN pipeline_plan() dep ON dep.step = d
WHERE dep.step_no >= s.step_no;

------------------------------------------------------------------------
-- a run
------------------------------------------------------------------------
CALL run_pipeline();
SELECT run_id, scope, status, triggered_by, error FROM pipeline_run ORDER BY run_id;
SELECT step_no, step, status, attempts, rows_affected > 0 AS did_work, sqlstate, error
FROM pipeline_step WHERE run_id = 1 ORDER BY step_no;
-- the checks ran and were logged; the stale sample data fails the (warn) freshness check only
SELECT check_name, severity, passed, failing_rows FROM quality_result WHERE run_id = 1 ORDER BY check_name;
SELECT kind, subject, severity FROM alert ORDER BY alert_id;
-- the views are populated
SELECT (SELECT count(*) FROM customer_rfm) > 0 AS rfm_filled, (SELECT champions FROM public.champion_count) > 0 AS champions_filled,
       (SELECT products FROM public.product_count) = (SELECT count(*) FROM dim_product) AS products_counted;
SELECT matview, last_step_status, refreshed_at IS NOT NULL AS refreshed FROM view_freshness ORDER BY matview::text;

------------------------------------------------------------------------
-- run_checks: every kind, failing rows and samples
------------------------------------------------------------------------
INSERT INTO quality_check (name, kind, target, column_name, params, severity) VALUES
  ('status is known', 'accepted_values', 'customer_analytics.fact_order_line', 'status', '{"values": ["completed", "cancelled", "returned"]}', 'error'),
  ('customer id present', 'not_null', 'customer_analytics.dim_customer', 'customer_id', '{}', 'error'),
  ('channel is web (wrong on purpose)', 'accepted_values', 'customer_analytics.fact_order_line', 'channel', '{"values": ["web"]}', 'error'),
  ('customer email unique', 'unique', 'customer_analytics.dim_customer', 'email, valid_from', '{}', 'warn'),
  ('orders fresh within 10 years', 'freshness', 'customer_analytics.fact_order_line', 'order_ts', '{"max_age": "10 years"}', 'warn'),
  ('no such table', 'not_null', 'public.no_such_table', 'x', '{}', 'warn');
SELECT check_name, kind, severity, passed, failing_rows, CASE jsonb_typeof(sample) WHEN 'array' THEN jsonb_array_length(sample) END AS sample_rows
FROM run_checks() WHERE check_name NOT IN ('orders are fresh', 'events are fresh', 'order volume is usual') ORDER BY check_name;
SELECT sample FROM run_checks(only_target => 'public.no_such_table');
-- row_count_change scores the newest day against the days before it (stats_agg, zscore)
CREATE TABLE public.visits AS
SELECT timestamptz '2025-03-01 00:00+00' + d * interval '1 day' + i * interval '1 minute' AS ts
FROM generate_series(0, 28) d, generate_series(1, 100 + d % 3 * 5 + CASE WHEN d = 28 THEN 300 ELSE 0 END) i;
INSERT INTO quality_check (name, kind, target, column_name, params, severity) VALUES
  ('visits volume', 'row_count_change', 'public.visits', 'ts', '{"days": 28, "threshold": 3}', 'warn');
SELECT check_name, passed, failing_rows, sample->0->>'rows' AS newest_day_rows, (sample->0->>'z')::numeric > 3 AS z_above_3
FROM run_checks(only_target => 'public.visits');
DELETE FROM public.visits WHERE ts >= '2025-03-29' AND ts < '2025-03-29 00:00+00'::timestamptz + interval '1 day' AND extract(minute FROM ts) + 60 * extract(hour FROM ts) > 105;
SELECT check_name, passed, failing_rows FROM run_checks(only_target => 'public.visits');
DELETE FROM quality_check WHERE name = 'visits volume';
DROP TABLE public.visits;
DELETE FROM quality_check WHERE name = 'no such table';
-- each kind finds what it should
SELECT quality_check_sql(c) FROM quality_check c WHERE name IN ('event customer exists', 'customer email unique') ORDER BY name;
-- fact_event has no foreign keys (for speed): the check catches an orphan
INSERT INTO fact_event (event_id, event_ts, date_key, customer_key, session_id, event_type, stage_id)
SELECT 'ORPHAN', event_ts, date_key, 999999, 'S-ORPHAN', 'page_view', 0 FROM fact_event LIMIT 1;
SELECT check_name, passed, failing_rows, sample->0->>'event_id' AS sample_event
FROM run_checks(only_target => 'customer_analytics.fact_event') WHERE check_name = 'event customer exists';
DELETE FROM fact_event WHERE event_id = 'ORPHAN';

------------------------------------------------------------------------
-- an error-severity failure stops only the views built on its table
------------------------------------------------------------------------
TRUNCATE alert;
CALL run_pipeline();
SELECT run_id, status, error FROM pipeline_run WHERE run_id = 2;
SELECT step, status, error FROM pipeline_step WHERE run_id = 2 ORDER BY step_no;
SELECT kind, subject, severity, details->>'failing_rows' AS failing_rows FROM alert WHERE kind = 'quality_check' ORDER BY subject;
DELETE FROM quality_check WHERE NOT builtin;

------------------------------------------------------------------------
-- transient failures are retried; a failed step blocks its dependents
------------------------------------------------------------------------
CREATE SEQUENCE public.flaky_calls;
CREATE FUNCTION public.flaky() RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('public.flaky_calls') < 3 THEN
        RAISE EXCEPTION 'could not serialize access' USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN 42;
END $$;
INSERT INTO pipeline_task (task, command, depends_on, ordinal) VALUES
  ('flaky', 'SELECT public.flaky()', '{transform}', 40),
  ('broken', 'SELECT 1 / 0', '{transform}', 41),
  ('after broken', 'SELECT 1', '{broken}', 42),
  ('after rfm', 'SELECT count(*) FROM customer_analytics.customer_rfm', '{"customer rfm"}', 200);
SELECT step_no, step, depends_on FROM pipeline_plan() WHERE step IN ('flaky', 'broken', 'after broken', 'after rfm', 'customer rfm') ORDER BY step_no;
CALL run_pipeline();
SELECT run_id, status, error FROM pipeline_run WHERE run_id = 3;
SELECT step, status, attempts, rows_affected, sqlstate, error
FROM pipeline_step WHERE run_id = 3 AND step IN ('flaky', 'broken', 'after broken', 'after rfm') ORDER BY step_no;
SELECT kind, subject, details->>'sqlstate' AS sqlstate FROM alert WHERE kind = 'pipeline';
-- no more retries than allowed
SET customer_analytics.pipeline_retries = 0;
SELECT setval('public.flaky_calls', 1, false);
CALL run_pipeline();
SELECT step, status, attempts, sqlstate FROM pipeline_step WHERE run_id = 4 AND step = 'flaky';
RESET customer_analytics.pipeline_retries;
-- a cycle is refused, naming its steps
UPDATE pipeline_task SET depends_on = '{"after broken"}' WHERE task = 'broken';
SELECT * FROM pipeline_plan();
DELETE FROM pipeline_task WHERE NOT builtin;

------------------------------------------------------------------------
-- other scopes, history purge
------------------------------------------------------------------------
INSERT INTO pipeline_task (task, scope, command) VALUES ('count events', 'minute', 'SELECT count(*) FROM customer_analytics.fact_event');
SELECT step_no, step FROM pipeline_plan('minute');
CALL run_pipeline('minute');
SELECT scope, status FROM pipeline_run WHERE run_id = 5;
DELETE FROM pipeline_task WHERE NOT builtin;
UPDATE pipeline_run SET started_at = started_at - interval '40 days' WHERE run_id <= 2;
CALL run_pipeline();
SELECT run_id FROM pipeline_run ORDER BY run_id;
SELECT count(*) AS steps_of_purged_runs FROM pipeline_step WHERE run_id <= 2;
SELECT scope, last_run_id, last_status, last_error IS NOT NULL AS has_error FROM pipeline_status ORDER BY scope;

------------------------------------------------------------------------
-- cron schedules
------------------------------------------------------------------------
SELECT s, cron_next_run(s, '2026-01-30 10:07:30+00') AS next
FROM unnest(ARRAY['*/15 * * * *', '0 3 * * 1', '30 2 1,15 * *', '0 0 31 * *', '0 9 * * 1-5', '0 12 13 * 5',
                  '@hourly', '@daily', '@weekly', '@monthly', '@yearly', '0 0 30 2 *', '59 23 * * 7']) s;
SELECT cron_next_run('* * * *');
SELECT cron_next_run('61 * * * *');
SELECT cron_next_run('*/0 * * * *');
SELECT cron_next_run('@often');
SELECT cron_next_run('30 seconds', '2026-01-30 10:07:30+00');

DROP MATERIALIZED VIEW public.champion_share, public.champion_count, public.product_count;
DROP VIEW public.rfm_champions;
DROP FUNCTION public.flaky();
DROP SEQUENCE public.flaky_calls;

------------------------------------------------------------------------
-- the purge step alone in a fresh session (a cron job, bench/citus.sh's
-- steps one by one): its retention setting exists only once the module
-- is loaded, which nothing has done there yet; the documented default
-- (30 days) applies, and a setting given before the load is obeyed
------------------------------------------------------------------------
\c
\i :abs_srcdir/sql/include/settings.sql
SET search_path = customer_analytics, public;
SELECT current_setting('customer_analytics.history_retention', true) IS NULL AS setting_not_defined_yet;
UPDATE pipeline_run SET started_at = started_at - interval '31 days' WHERE run_id = 3;
UPDATE pipeline_run SET started_at = started_at - interval '29 days' WHERE run_id = 4;
SELECT pipeline_purge() >= 1 AS purged;
SELECT run_id FROM pipeline_run ORDER BY run_id;
\c
\i :abs_srcdir/sql/include/settings.sql
SET search_path = customer_analytics, public;
SET customer_analytics.history_retention = '28 days';
SELECT pipeline_purge() >= 1 AS purged;
SELECT run_id FROM pipeline_run ORDER BY run_id;
