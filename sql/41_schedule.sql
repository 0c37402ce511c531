-- Scheduling with pg_cron in both set-ups, and a real run by pg_cron:
--  1. pg_cron serves this database (cron.database_name = contrib_regression)
--  2. the warehouse is another database: jobs are made over a loopback
--     connection to the cron database
-- This test waits for pg_cron's next minute (up to ~70 s).
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
SELECT customer_analytics.pg_cron_location();
-- make the scheduled runs quick: nothing to load, a tiny schema
TRUNCATE customer_analytics.pipeline_run CASCADE;

------------------------------------------------------------------------
-- set-up 1: this database
------------------------------------------------------------------------
SELECT customer_analytics.schedule_pipeline('*/5 * * * *') > 0 AS scheduled;
-- scheduling again changes the schedule of the same job
SELECT customer_analytics.schedule_pipeline('* * * * *') > 0 AS rescheduled;
SELECT jobname, schedule, command, database, active, next_run = date_trunc('minute', now()) + interval '1 minute' AS next_minute
FROM customer_analytics.pipeline_jobs();
SELECT count(*) AS cron_jobs FROM cron.job;
SELECT customer_analytics.schedule_pipeline('61 * * * *');
SELECT customer_analytics.schedule_pipeline('* * * * *', 'no such scope');

------------------------------------------------------------------------
-- set-up 2: another database reaches pg_cron over a loopback connection
------------------------------------------------------------------------
CREATE DATABASE ca_elsewhere;
\c ca_elsewhere
\i :abs_srcdir/sql/include/settings.sql
CREATE EXTENSION customer_analytics;
SELECT customer_analytics.pg_cron_location();
SELECT to_regclass('cron.job') AS cron_job_here;
SELECT customer_analytics.schedule_pipeline('* * * * *') > 0 AS scheduled;
SELECT jobname, schedule, database, active FROM customer_analytics.pipeline_jobs();
-- when the connection cannot be made, the hint says what to run by hand
SET customer_analytics.cron_conninfo = 'host=/nonexistent dbname=contrib_regression';
DO $$
DECLARE
    hint text;
BEGIN
    PERFORM customer_analytics.schedule_pipeline('0 * * * *');
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS hint = PG_EXCEPTION_HINT;
    RAISE WARNING '% (SQLSTATE %)', SQLERRM, SQLSTATE USING HINT = hint;
END $$;
RESET customer_analytics.cron_conninfo;

-- wait for pg_cron's next minute to run both jobs
DO $$
BEGIN
    FOR i IN 1 .. 150 LOOP
        EXIT WHEN EXISTS (SELECT FROM customer_analytics.pipeline_run WHERE status <> 'running');
        PERFORM pg_sleep(0.5);
    END LOOP;
END $$;
-- pg_cron records the job as done just after the CALL returns
DO $$
BEGIN
    FOR i IN 1 .. 20 LOOP
        EXIT WHEN NOT EXISTS (SELECT FROM customer_analytics.pipeline_cron_runs() WHERE status IN ('starting', 'running'));
        PERFORM pg_sleep(0.5);
    END LOOP;
END $$;
SELECT scope, status, triggered_by, run_by FROM customer_analytics.pipeline_run ORDER BY run_id LIMIT 1;
SELECT status, return_message FROM customer_analytics.pipeline_cron_runs() ORDER BY runid LIMIT 1;
SELECT customer_analytics.unschedule_pipeline() AS unscheduled, customer_analytics.unschedule_pipeline() AS again;
SELECT count(*) AS jobs_left FROM customer_analytics.pipeline_jobs();
SELECT scope, last_status, schedule FROM customer_analytics.pipeline_status;

\c contrib_regression
\i :abs_srcdir/sql/include/preamble.sql
-- the cron job of this database ran in the same minute
DO $$
BEGIN
    FOR i IN 1 .. 60 LOOP
        EXIT WHEN EXISTS (SELECT FROM customer_analytics.pipeline_run WHERE status <> 'running');
        PERFORM pg_sleep(0.5);
    END LOOP;
END $$;
SELECT scope, status, triggered_by FROM customer_analytics.pipeline_run ORDER BY run_id LIMIT 1;
DO $$
BEGIN
    FOR i IN 1 .. 20 LOOP
        EXIT WHEN NOT EXISTS (SELECT FROM cron.job_run_details WHERE status IN ('starting', 'running'));
        PERFORM pg_sleep(0.5);
    END LOOP;
END $$;
SELECT j.jobname, d.status, d.return_message
FROM cron.job_run_details d JOIN cron.job j USING (jobid) ORDER BY d.runid LIMIT 1;
SELECT scope, last_status, schedule, next_run IS NOT NULL AS has_next_run FROM customer_analytics.pipeline_status WHERE scope = 'all';
-- the purge removes pg_cron's run details of this database's jobs too
SELECT customer_analytics.pipeline_purge_cron_history('0 seconds') >= 1 AS purged;
SELECT count(*) AS our_run_details_left
FROM cron.job_run_details d JOIN cron.job j USING (jobid) WHERE j.database = current_database();
SELECT customer_analytics.unschedule_pipeline();
SELECT count(*) AS cron_jobs FROM cron.job;
DROP DATABASE ca_elsewhere;
