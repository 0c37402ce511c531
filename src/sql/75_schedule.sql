
/*
 * Scheduling the pipeline with pg_cron, in either set-up: pg_cron serves
 * this database (cron.database_name = this one: call it directly), or it
 * lives in another database, usually "postgres" (reach it over a loopback
 * connection, cron_remote_query()).  pg_cron is a soft dependency: without
 * it only these functions fail, with a hint.
 */

CREATE FUNCTION customer_analytics.cron_next_run(schedule text, after timestamptz DEFAULT now())
RETURNS timestamptz
AS 'MODULE_PATHNAME', 'ca_cron_next_run'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.cron_next_run(text, timestamptz) IS
    'When a pg_cron schedule next fires after a time, in UTC; it accepts exactly what pg_cron accepts (five fields with names of months and days, @hourly and the other shorthands, $ and ''N seconds'' of pg_cron 1.5/1.6); NULL for @reboot and for a date that never comes';

CREATE FUNCTION customer_analytics.cron_remote_query(query text, params text[] DEFAULT '{}', hint_statement text DEFAULT NULL)
RETURNS SETOF jsonb
AS 'MODULE_PATHNAME', 'ca_cron_remote_query'
LANGUAGE C VOLATILE;
REVOKE ALL ON FUNCTION customer_analytics.cron_remote_query(text, text[], text) FROM PUBLIC;
COMMENT ON FUNCTION customer_analytics.cron_remote_query(text, text[], text) IS
    'Runs a query in pg_cron''s database (cron.database_name) over a loopback connection as the current user (or customer_analytics.cron_conninfo) and returns its rows as jsonb; on a failed connection the hint gives the statement to run there by hand';

CREATE FUNCTION customer_analytics.pg_cron_location()
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN current_setting('shared_preload_libraries') !~ '(^|[ ,])pg_cron($|[ ,])' THEN 'not loaded'
        WHEN current_setting('cron.database_name', true) = current_database() THEN 'this database'
        ELSE 'database ' || COALESCE(current_setting('cron.database_name', true), 'postgres')
    END
$$;
COMMENT ON FUNCTION customer_analytics.pg_cron_location() IS
    'Where pg_cron runs: ''not loaded'', ''this database'' or ''database <name>'' (cron.database_name)';

/* Run a statement against pg_cron wherever it is; rows as jsonb */
CREATE FUNCTION customer_analytics.pg_cron_query(query text, params text[] DEFAULT '{}')
RETURNS SETOF jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    loc text := customer_analytics.pg_cron_location();
    by_hand text;
BEGIN
    IF loc = 'not loaded' THEN
        RAISE EXCEPTION 'pg_cron is not loaded in this server'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Add to postgresql.conf: shared_preload_libraries = ''pg_cron'' and cron.database_name = '''
                         || current_database() || ''' (or keep ''postgres''), restart the server, then run CREATE EXTENSION pg_cron in that database.';
    END IF;
    -- the statement with its parameters written in, for a hint
    by_hand := query;
    FOR i IN REVERSE COALESCE(array_length(params, 1), 0) .. 1 LOOP
        by_hand := replace(by_hand, '$' || i, quote_nullable(params[i]));
    END LOOP;
    IF loc = 'this database' THEN
        IF to_regclass('cron.job') IS NULL THEN
            RAISE EXCEPTION 'pg_cron is loaded for this database but its extension is not created'
                USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Run CREATE EXTENSION pg_cron;';
        END IF;
        RETURN QUERY EXECUTE format('WITH q AS (%s) SELECT to_jsonb(q) FROM q', by_hand);
    ELSE
        RETURN QUERY SELECT * FROM customer_analytics.cron_remote_query(query, params, by_hand);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION customer_analytics.pg_cron_query(text, text[]) FROM PUBLIC;
COMMENT ON FUNCTION customer_analytics.pg_cron_query(text, text[]) IS
    'Runs a query against pg_cron''s tables and functions, directly when pg_cron serves this database, else in its database over a loopback connection';

CREATE FUNCTION customer_analytics.pipeline_job_name(scope text DEFAULT 'all')
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 'customer_analytics ' || pg_catalog.current_database() || ' ' || scope $$;
COMMENT ON FUNCTION customer_analytics.pipeline_job_name(text) IS
    'The pg_cron job name of this database''s pipeline for a scope';

CREATE FUNCTION customer_analytics.schedule_pipeline(schedule text DEFAULT '*/15 * * * *', scope text DEFAULT 'all')
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM customer_analytics.pipeline_task WHERE pipeline_task.scope = schedule_pipeline.scope)
       AND scope <> 'all' THEN
        RAISE EXCEPTION 'the pipeline has no scope "%"', scope
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Scopes are those of customer_analytics.pipeline_task; ''all'' runs everything.';
    END IF;
    -- pg_cron itself judges the schedule: the version that runs it decides
    BEGIN
        RETURN (SELECT (j->>'jobid')::bigint FROM customer_analytics.pg_cron_query(
            'SELECT cron.schedule_in_database($1, $2, $3, $4) AS jobid',
            ARRAY[customer_analytics.pipeline_job_name(scope), schedule,
                  format('CALL customer_analytics.run_pipeline(%L)', scope), current_database()]) j);
    EXCEPTION WHEN invalid_parameter_value THEN
        -- pg_cron says only "invalid schedule": ours names the field and why
        PERFORM customer_analytics.cron_next_run(schedule);
        RAISE;
    END;
END
$$;
REVOKE ALL ON FUNCTION customer_analytics.schedule_pipeline(text, text) FROM PUBLIC;
COMMENT ON FUNCTION customer_analytics.schedule_pipeline(text, text) IS
    'Schedules CALL run_pipeline(scope) with pg_cron (default every 15 minutes), in this database wherever pg_cron lives; scheduling again changes the schedule. Returns the pg_cron job id';

CREATE FUNCTION customer_analytics.unschedule_pipeline(scope text DEFAULT 'all')
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN COALESCE((SELECT (j->>'unscheduled')::boolean FROM customer_analytics.pg_cron_query(
        'SELECT cron.unschedule(jobid) AS unscheduled FROM cron.job WHERE jobname = $1 AND database = $2',
        ARRAY[customer_analytics.pipeline_job_name(scope), current_database()]) j), false);
END
$$;
REVOKE ALL ON FUNCTION customer_analytics.unschedule_pipeline(text) FROM PUBLIC;
COMMENT ON FUNCTION customer_analytics.unschedule_pipeline(text) IS
    'Removes the pg_cron job of this database''s pipeline for a scope; false if there was none';

CREATE FUNCTION customer_analytics.pipeline_jobs()
RETURNS TABLE (jobid bigint, jobname text, schedule text, command text, database text, active boolean,
               next_run timestamptz)
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (j->>'jobid')::bigint, j->>'jobname', j->>'schedule', j->>'command', j->>'database',
           (j->>'active')::boolean, customer_analytics.cron_next_run(j->>'schedule', now())
    FROM customer_analytics.pg_cron_query(
        'SELECT jobid, jobname, schedule, command, database, active FROM cron.job WHERE jobname LIKE $1 AND database = $2',
        ARRAY['customer_analytics ' || current_database() || ' %', current_database()]) j
    ORDER BY 1
$$;
REVOKE ALL ON FUNCTION customer_analytics.pipeline_jobs() FROM PUBLIC;
COMMENT ON FUNCTION customer_analytics.pipeline_jobs() IS
    'This database''s pipeline jobs in pg_cron, with when each runs next';

CREATE FUNCTION customer_analytics.pipeline_cron_runs(max_rows integer DEFAULT 20)
RETURNS TABLE (jobid bigint, runid bigint, status text, return_message text, start_time timestamptz, end_time timestamptz)
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (j->>'jobid')::bigint, (j->>'runid')::bigint, j->>'status', j->>'return_message',
           (j->>'start_time')::timestamptz, (j->>'end_time')::timestamptz
    FROM customer_analytics.pg_cron_query(
        'SELECT d.jobid, d.runid, d.status, d.return_message, d.start_time, d.end_time
         FROM cron.job_run_details d JOIN cron.job USING (jobid)
         WHERE job.jobname LIKE $1 AND job.database = $2 ORDER BY d.runid DESC LIMIT $3::int',
        ARRAY['customer_analytics ' || current_database() || ' %', current_database(), max_rows::text]) j
    ORDER BY 2 DESC
$$;
REVOKE ALL ON FUNCTION customer_analytics.pipeline_cron_runs(integer) FROM PUBLIC;
COMMENT ON FUNCTION customer_analytics.pipeline_cron_runs(integer) IS
    'pg_cron''s own record (cron.job_run_details) of the latest runs of this database''s pipeline jobs';

CREATE FUNCTION customer_analytics.pipeline_purge_cron_history(older_than interval)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF customer_analytics.pg_cron_location() = 'not loaded'
       OR (customer_analytics.pg_cron_location() = 'this database' AND to_regclass('cron.job') IS NULL) THEN
        RETURN 0;
    END IF;
    RETURN (SELECT count(*) FROM customer_analytics.pg_cron_query(
        'DELETE FROM cron.job_run_details d USING cron.job j
         WHERE j.jobid = d.jobid AND j.jobname LIKE $1 AND j.database = $2
           AND d.end_time < now() - $3::interval RETURNING d.runid',
        ARRAY['customer_analytics ' || current_database() || ' %', current_database(), older_than::text]));
END
$$;
COMMENT ON FUNCTION customer_analytics.pipeline_purge_cron_history(interval) IS
    'Deletes pg_cron''s run details of this database''s pipeline jobs older than the interval (pg_cron keeps them forever); returns how many';

CREATE FUNCTION customer_analytics.pipeline_jobs_if_reachable()
RETURNS TABLE (jobid bigint, jobname text, schedule text, active boolean, next_run timestamptz)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY SELECT j.jobid, j.jobname, j.schedule, j.active, j.next_run FROM customer_analytics.pipeline_jobs() j;
EXCEPTION WHEN OTHERS THEN
    RETURN;     -- pg_cron not loaded or not reachable: no schedule to show
END
$$;
COMMENT ON FUNCTION customer_analytics.pipeline_jobs_if_reachable() IS
    'pipeline_jobs(), or nothing when pg_cron is not loaded or cannot be reached (for pipeline_status)';

CREATE VIEW customer_analytics.pipeline_status AS
WITH scopes AS (
    SELECT DISTINCT scope FROM customer_analytics.pipeline_run
    UNION SELECT DISTINCT scope FROM customer_analytics.pipeline_task WHERE enabled
    UNION SELECT 'all'
), jobs AS (
    SELECT * FROM customer_analytics.pipeline_jobs_if_reachable()
)
SELECT s.scope,
       last.run_id AS last_run_id, last.status AS last_status, last.started_at AS last_started_at,
       last.finished_at - last.started_at AS last_duration,
       ok.finished_at AS last_success_at,
       fail.started_at AS last_failure_at, fail.error AS last_error,
       j.schedule, j.active AS schedule_active, j.next_run
FROM scopes s
LEFT JOIN LATERAL (SELECT * FROM customer_analytics.pipeline_run r WHERE r.scope = s.scope AND r.status <> 'skipped'
                   ORDER BY r.run_id DESC LIMIT 1) last ON true
LEFT JOIN LATERAL (SELECT * FROM customer_analytics.pipeline_run r WHERE r.scope = s.scope AND r.status = 'succeeded'
                   ORDER BY r.run_id DESC LIMIT 1) ok ON true
LEFT JOIN LATERAL (SELECT * FROM customer_analytics.pipeline_run r WHERE r.scope = s.scope AND r.status = 'failed'
                   ORDER BY r.run_id DESC LIMIT 1) fail ON true
LEFT JOIN jobs j ON j.jobname = customer_analytics.pipeline_job_name(s.scope);
COMMENT ON VIEW customer_analytics.pipeline_status IS
    'Per pipeline scope: the last run and its status, the last success and the last failure with its error, and the pg_cron schedule with its next run (empty when pg_cron cannot be reached)';

CREATE VIEW customer_analytics.view_freshness AS
SELECT p.matview, p.level, ok.refreshed_at, now() - ok.refreshed_at AS age,
       (SELECT s.status FROM customer_analytics.pipeline_step s
        WHERE s.step = v.step ORDER BY s.run_id DESC LIMIT 1) AS last_step_status
FROM customer_analytics.refresh_plan() p
CROSS JOIN LATERAL (SELECT 'refresh ' || customer_analytics.qualified_name(p.matview) AS step) v
CROSS JOIN LATERAL (SELECT max(s.finished_at) AS refreshed_at FROM customer_analytics.pipeline_step s
                    WHERE s.step = v.step AND s.status = 'succeeded') ok;
COMMENT ON VIEW customer_analytics.view_freshness IS
    'Each materialized view the pipeline refreshes: when it was last refreshed successfully, how long ago, and the status of its latest refresh step';
