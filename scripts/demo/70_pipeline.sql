-- Demo step: the whole pipeline in one call, then on a pg_cron schedule.
-- psql variables: out (the landing directories are under it)
\set landing :out '/landing'
\pset footer off
\echo '== the landing directories the pipeline loads (files already loaded are passed over)'
INSERT INTO customer_analytics.landing (target, directory, load_order) VALUES
    ('customer_analytics.stg_customers', :'landing' || '/customers', 10),
    ('customer_analytics.stg_products', :'landing' || '/products', 20),
    ('customer_analytics.stg_orders', :'landing' || '/orders', 30),
    ('customer_analytics.stg_events', :'landing' || '/events', 40)
ON CONFLICT DO NOTHING;
SELECT target, directory, pattern FROM customer_analytics.landing ORDER BY load_order;

\echo '== the plan: steps in dependency order (view order from pg_depend)'
SELECT step_no, step, depends_on FROM customer_analytics.pipeline_plan() ORDER BY step_no;

\echo '== CALL customer_analytics.run_pipeline()'
SET client_min_messages = warning;
CALL customer_analytics.run_pipeline();
RESET client_min_messages;
SELECT s.step, s.status, s.attempts, s.rows_affected,
       round(extract(epoch FROM s.finished_at - s.started_at)::numeric, 3) AS seconds, s.error
FROM customer_analytics.pipeline_step s
WHERE s.run_id = (SELECT max(run_id) FROM customer_analytics.pipeline_run)
ORDER BY s.step_no;
\echo '== data-quality checks of that run'
SELECT check_name, severity, passed, failing_rows
FROM customer_analytics.quality_result
WHERE run_id = (SELECT max(run_id) FROM customer_analytics.pipeline_run)
ORDER BY passed, check_name;

\echo '== scheduling it with pg_cron every minute, and waiting for pg_cron to run it (up to 70 s)'
SELECT customer_analytics.pg_cron_location() AS pg_cron_runs_in;
SELECT customer_analytics.schedule_pipeline('* * * * *') AS jobid;
SELECT jobname, schedule, next_run FROM customer_analytics.pipeline_jobs();
DO $$
BEGIN
    FOR i IN 1 .. 140 LOOP
        EXIT WHEN EXISTS (SELECT FROM customer_analytics.pipeline_run
                          WHERE triggered_by = 'pg_cron' AND status <> 'running');
        PERFORM pg_sleep(0.5);
    END LOOP;
END $$;
\echo '== pg_cron''s record of the run (cron.job_run_details)'
SELECT jobid, runid, status, return_message, start_time, end_time FROM customer_analytics.pipeline_cron_runs(5);
\echo '== the pipeline''s record of its runs (pipeline_run)'
SELECT run_id, scope, status, triggered_by, started_at, finished_at - started_at AS duration, error
FROM customer_analytics.pipeline_run ORDER BY run_id;
\echo '== from now on every 15 minutes'
SELECT customer_analytics.schedule_pipeline('*/15 * * * *') AS jobid;
SELECT scope, last_status, last_success_at, schedule, next_run FROM customer_analytics.pipeline_status;
SELECT matview, refreshed_at, last_step_status FROM customer_analytics.view_freshness ORDER BY level, matview::text;
