
/*
 * The pipeline: what Airflow and `dbt build` did, inside the database.
 *
 * run_pipeline() runs the steps of a scope in dependency order: ingest the
 * landing directories, transform(), data-quality checks, refresh of every
 * materialized view built on the star schema (order derived from
 * pg_depend, user views included), then the tasks that act on the results
 * (alerts) and the purge of old history.  It is a procedure that commits
 * after every step, so a failed step is recorded, not rolled back with the
 * rest.  One run at a time: a second one is logged as skipped.
 */

CREATE FUNCTION customer_analytics.qualified_name(rel regclass)
RETURNS text
LANGUAGE sql STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_catalog.format('%I.%I', n.nspname, c.relname)
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel $$;
COMMENT ON FUNCTION customer_analytics.qualified_name(regclass) IS
    'schema.name of a relation whatever the search_path (how pipeline steps name the views they refresh)';

/* Landing directories that the ingest step loads, in load_order */
CREATE TABLE customer_analytics.landing (
    target     regclass NOT NULL,
    directory  text NOT NULL CHECK (directory LIKE '/%'),
    pattern    text NOT NULL DEFAULT '*.csv',
    load_order integer NOT NULL DEFAULT 100,
    enabled    boolean NOT NULL DEFAULT true,
    PRIMARY KEY (target, directory, pattern)
);
COMMENT ON TABLE customer_analytics.landing IS
    'Landing directories the pipeline''s ingest step loads with ingest_directory(target, directory, pattern), in load_order (dimensions before facts)';
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.landing', '');

/* Steps besides the view refreshes; users may add their own */
CREATE TABLE customer_analytics.pipeline_task (
    task       text PRIMARY KEY CHECK (task !~ '^refresh '),
    scope      text NOT NULL DEFAULT 'all',
    command    text NOT NULL,
    depends_on text[] NOT NULL DEFAULT '{}',
    feeds      text[] NOT NULL DEFAULT '{}',
    ordinal    integer NOT NULL DEFAULT 500,
    builtin    boolean NOT NULL DEFAULT false,
    enabled    boolean NOT NULL DEFAULT true,
    reads      text[] NOT NULL DEFAULT '{}'
);
COMMENT ON TABLE customer_analytics.pipeline_task IS
    'Steps of run_pipeline() other than the view refreshes (which come from pg_depend): the SQL to run, the steps it depends on (a task name or ''refresh <schema.view>''), the tables it writes (feeds: the refresh of every view reading them waits for it), the tables it reads (reads: an error-severity check failing on one blocks it, as it blocks a view reading the table), its scope, and an ordinal ordering steps that are ready together. A command that is a SELECT returns the rows it affected; $1 is the run id';
INSERT INTO customer_analytics.pipeline_task (task, command, depends_on, ordinal, builtin) VALUES
    ('ingest', 'SELECT customer_analytics.pipeline_ingest($1)', '{}', 10, true),
    ('transform', 'SELECT sum(rows_affected)::bigint FROM customer_analytics.transform()', '{ingest}', 20, true),
    ('checks', 'SELECT customer_analytics.pipeline_checks($1)', '{transform}', 30, true),
    ('purge', 'SELECT customer_analytics.pipeline_purge()', '{}', 1000, true);
-- the sales rollups (60_anomalies.sql) and the RFM scores (50_rfm.sql) before
-- the views that read them, then the anomaly alerts once their view is fresh
INSERT INTO customer_analytics.pipeline_task (task, command, depends_on, feeds, reads, ordinal, builtin) VALUES
    ('sales rollup', 'SELECT customer_analytics.refresh_sales_rollup()', '{transform}',
     '{customer_analytics.sales_rollup_day,customer_analytics.sales_rollup_category}',
     '{customer_analytics.fact_order_line,customer_analytics.dim_product,customer_analytics.dim_customer}', 40, true),
    ('customer rfm', 'SELECT customer_analytics.refresh_customer_rfm()', '{transform}',
     '{customer_analytics.customer_rfm_score,customer_analytics.customer_rfm_refresh,customer_analytics_internal.rfm_segment_stat}',
     '{customer_analytics.fact_order_line,customer_analytics.dim_customer}', 45, true),
    ('anomaly alerts', 'SELECT customer_analytics.alert_new_anomalies()', '{"refresh customer_analytics.anomalies"}', '{}', '{}', 300, true);
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.pipeline_task', 'WHERE NOT builtin');

/* How often a view needs refreshing, when not at every run */
CREATE TABLE customer_analytics.refresh_policy (
    matview      text PRIMARY KEY,
    min_interval interval NOT NULL CHECK (min_interval >= '0'),
    builtin      boolean NOT NULL DEFAULT false
);
COMMENT ON TABLE customer_analytics.refresh_policy IS
    'Views the pipeline refreshes less often than every run: a refresh step is skipped while the view''s last successful refresh is younger than min_interval (models refitted daily, say). matview is schema.name';
INSERT INTO customer_analytics.refresh_policy (matview, min_interval, builtin) VALUES
    ('customer_analytics.clv_model', '1 day', true),
    ('customer_analytics.sales_forecast_accuracy', '1 day', true),
    ('customer_analytics.customer_clv', '1 day', true);
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.refresh_policy', 'WHERE NOT builtin');

CREATE FUNCTION customer_analytics.session_client()
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN a.backend_type = 'client backend' THEN COALESCE(NULLIF(a.application_name, ''), 'client')
                ELSE a.backend_type END   -- pg_cron's background workers say pg_cron
    FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()
$$;
COMMENT ON FUNCTION customer_analytics.session_client() IS
    'Who is running this session: the application name of a client, or the kind of background worker (pg_cron)';

CREATE TABLE customer_analytics.pipeline_run (
    run_id       bigserial PRIMARY KEY,
    scope        text NOT NULL,
    status       text NOT NULL DEFAULT 'running'
                 CHECK (status IN ('running', 'succeeded', 'failed', 'skipped')),
    started_at   timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    finished_at  timestamptz,
    triggered_by text DEFAULT customer_analytics.session_client(),
    run_by       name NOT NULL DEFAULT CURRENT_USER,
    backend_pid  integer NOT NULL DEFAULT pg_catalog.pg_backend_pid(),
    error        text
);
CREATE INDEX pipeline_run_started_idx ON customer_analytics.pipeline_run (started_at);
COMMENT ON TABLE customer_analytics.pipeline_run IS
    'One row per run_pipeline() call: scope, status (running, succeeded, failed, skipped), times, who triggered it (pg_cron runs say pg_cron), and why it failed or was skipped';
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.pipeline_run', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.pipeline_run_run_id_seq', '');

CREATE TABLE customer_analytics.pipeline_step (
    run_id        bigint NOT NULL REFERENCES customer_analytics.pipeline_run ON DELETE CASCADE,
    step_no       integer NOT NULL,
    step          text NOT NULL,
    depends_on    text[] NOT NULL DEFAULT '{}',
    status        text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'blocked', 'retrying', 'skipped')),
    attempts      integer NOT NULL DEFAULT 1,
    started_at    timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    finished_at   timestamptz,
    rows_affected bigint,
    sqlstate      text,
    error         text,
    PRIMARY KEY (run_id, step)
);
COMMENT ON TABLE customer_analytics.pipeline_step IS
    'One row per step of a run: status (succeeded, failed, blocked by a failed dependency or check, retrying, skipped: refreshed recently enough by its refresh policy), attempts, times, rows affected, and the error with its SQLSTATE';
-- the latest refresh of a view: refresh_policy and view_freshness look it up by step
CREATE INDEX pipeline_step_step_idx ON customer_analytics.pipeline_step (step, finished_at);
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.pipeline_step', '');

/* ---------------------------------------------------------------------
 * Dependency order of the materialized views
 * --------------------------------------------------------------------- */

/*
 * Every materialized view built, directly or through plain views, on the
 * extension's objects (ours and users' own), with the materialized views
 * and tables it reads.  From pg_depend: a view's _RETURN rule depends on
 * the relations it reads (a regclass constant counts too).
 */
CREATE FUNCTION customer_analytics.refresh_plan()
RETURNS TABLE (level integer, matview regclass, depends_on regclass[], reads regclass[], concurrent boolean)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH RECURSIVE direct AS (
        SELECT DISTINCT r.ev_class AS viewid, d.refobjid AS uses
        FROM pg_rewrite r
        JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                        AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class
    ), reach AS (          -- what each matview reads, looking through plain views
        SELECT d.viewid AS mv, d.uses FROM direct d JOIN pg_class c ON c.oid = d.viewid WHERE c.relkind = 'm'
        UNION
        SELECT r.mv, d.uses FROM reach r JOIN pg_class c ON c.oid = r.uses AND c.relkind = 'v'
                                         JOIN direct d ON d.viewid = r.uses
    ), ours AS (
        SELECT DISTINCT r.mv FROM reach r JOIN pg_class c ON c.oid = r.uses
        WHERE c.relnamespace = 'customer_analytics'::regnamespace
        UNION
        SELECT c.oid FROM pg_class c WHERE c.relkind = 'm' AND c.relnamespace = 'customer_analytics'::regnamespace
    ), edges AS (
        SELECT DISTINCT r.mv, r.uses FROM reach r JOIN ours o ON o.mv = r.mv
        JOIN pg_class c ON c.oid = r.uses AND c.relkind = 'm' JOIN ours o2 ON o2.mv = r.uses
    ), depth AS (
        SELECT mv, 0 AS level FROM ours
        UNION ALL
        SELECT e.mv, d.level + 1 FROM depth d JOIN edges e ON e.uses = d.mv WHERE d.level < 100
    )
    SELECT max(d.level)::integer, d.mv::regclass,
           ARRAY(SELECT e.uses::regclass FROM edges e WHERE e.mv = d.mv ORDER BY e.uses::regclass::text),
           ARRAY(SELECT DISTINCT r.uses::regclass FROM reach r JOIN pg_class c ON c.oid = r.uses AND c.relkind IN ('r', 'p', 'f', 'm')
                 WHERE r.mv = d.mv ORDER BY 1),
           c.relispopulated AND EXISTS (
               SELECT FROM pg_index i WHERE i.indrelid = d.mv AND i.indisunique AND i.indisvalid
                 AND i.indpred IS NULL AND i.indexprs IS NULL)
    FROM depth d JOIN pg_class c ON c.oid = d.mv
    GROUP BY d.mv, c.relispopulated
    ORDER BY 1, 2::text
$$;
COMMENT ON FUNCTION customer_analytics.refresh_plan() IS
    'The materialized views built on the extension''s objects (users'' own included), with their level (0 = reads only tables), the materialized views they depend on, the tables they read, and whether they can be refreshed concurrently; derived from pg_depend';

/*
 * The steps of a scope in an order that respects every dependency
 * (Kahn's algorithm; ties by ordinal, then name).
 */
CREATE FUNCTION customer_analytics.pipeline_plan(scope text DEFAULT 'all')
RETURNS TABLE (step_no integer, step text, command text, depends_on text[])
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    placed text[] := '{}';
    pick record;
    n integer := 0;
BEGIN
    CREATE TEMP TABLE IF NOT EXISTS ca_plan_steps (step text, command text, depends_on text[], ordinal int) ON COMMIT DROP;
    TRUNCATE ca_plan_steps;
    INSERT INTO ca_plan_steps
    SELECT t.task, t.command, t.depends_on, t.ordinal
    FROM customer_analytics.pipeline_task t WHERE t.enabled AND t.scope = pipeline_plan.scope;
    IF scope = 'all' THEN
        INSERT INTO ca_plan_steps
        SELECT 'refresh ' || customer_analytics.qualified_name(p.matview),
               format('REFRESH MATERIALIZED VIEW %s%s', CASE WHEN p.concurrent THEN 'CONCURRENTLY ' ELSE '' END, p.matview),
               ARRAY['checks'] || ARRAY(SELECT 'refresh ' || customer_analytics.qualified_name(x) FROM unnest(p.depends_on) x)
                   || ARRAY(SELECT t.task FROM customer_analytics.pipeline_task t
                            WHERE t.enabled AND t.scope = 'all'
                              AND t.feeds && ARRAY(SELECT customer_analytics.qualified_name(x) FROM unnest(p.reads) x)
                            ORDER BY t.task),
               100 + p.level
        FROM customer_analytics.refresh_plan() p;
    END IF;
    -- a dependency on a step that is not in this plan is no dependency;
    -- the others keep their order (the semi-join alone may not)
    UPDATE ca_plan_steps s SET depends_on = ARRAY(SELECT u.d FROM unnest(s.depends_on) WITH ORDINALITY u(d, i)
                                                  WHERE u.d IN (SELECT step FROM ca_plan_steps) ORDER BY u.i);
    LOOP
        SELECT s.* INTO pick FROM ca_plan_steps s
        WHERE NOT s.step = ANY (placed) AND s.depends_on <@ placed
        ORDER BY s.ordinal, s.step LIMIT 1;
        EXIT WHEN NOT FOUND;
        n := n + 1;
        placed := placed || pick.step;
        step_no := n; step := pick.step; command := pick.command; depends_on := pick.depends_on;
        RETURN NEXT;
    END LOOP;
    IF n < (SELECT count(*) FROM ca_plan_steps) THEN
        RAISE EXCEPTION 'the pipeline''s steps depend on each other in a cycle'
            USING ERRCODE = 'invalid_recursion',
                  DETAIL = 'Steps in the cycle: ' || (SELECT string_agg(step, ', ' ORDER BY step) FROM ca_plan_steps WHERE NOT step = ANY (placed)) || '.',
                  HINT = 'Fix depends_on in customer_analytics.pipeline_task.';
    END IF;
END
$$;
COMMENT ON FUNCTION customer_analytics.pipeline_plan(text) IS
    'The steps run_pipeline(scope) will run, in order: tasks of pipeline_task and, for scope all, a refresh step per materialized view in dependency order';

/* ---------------------------------------------------------------------
 * Steps
 * --------------------------------------------------------------------- */

CREATE FUNCTION customer_analytics.pipeline_ingest(run_id bigint)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    l record;
    f record;
    total bigint := 0;
BEGIN
    FOR l IN SELECT * FROM customer_analytics.landing WHERE enabled ORDER BY load_order, target::text, directory LOOP
        FOR f IN SELECT * FROM customer_analytics.ingest_directory(l.target, l.directory, l.pattern) LOOP
            total := total + COALESCE(f.rows_loaded, 0);
            IF f.status = 'failed' THEN
                PERFORM customer_analytics.raise_alert('ingest', f.file,
                    jsonb_build_object('target', l.target::text, 'load_id', f.load_id, 'run_id', run_id),
                    dedup_key => 'ingest:' || f.load_id, severity => 'error');
            END IF;
        END LOOP;
    END LOOP;
    RETURN total;
END
$$;
COMMENT ON FUNCTION customer_analytics.pipeline_ingest(bigint) IS
    'The pipeline''s ingest step: ingest_directory() on every enabled landing directory; a file that fails raises an alert. Returns the rows loaded';

CREATE FUNCTION customer_analytics.pipeline_purge()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- the setting exists only once the module is loaded, which a session
    -- that runs this step alone (a cron job, a fresh connection) has not done
    keep interval := COALESCE(NULLIF(current_setting('customer_analytics.history_retention', true), ''), '30 days')::interval;
    runs bigint;
    cron_rows bigint := 0;
BEGIN
    DELETE FROM customer_analytics.pipeline_run WHERE started_at < now() - keep AND status <> 'running';
    GET DIAGNOSTICS runs = ROW_COUNT;
    DELETE FROM customer_analytics.quality_result WHERE run_id IS NULL AND checked_at < now() - keep;
    -- pg_cron's history is purged where it can be reached; when it cannot
    -- (pg_cron loaded but its extension not created, a refused loopback
    -- connection) our own history is still purged
    BEGIN
        cron_rows := customer_analytics.pipeline_purge_cron_history(keep);
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_cron''s run details were not purged: %', SQLERRM;
    END;
    RETURN runs + cron_rows;
END
$$;
COMMENT ON FUNCTION customer_analytics.pipeline_purge() IS
    'The pipeline''s purge step: deletes runs, steps and check results older than customer_analytics.history_retention, and pg_cron''s run details of this database''s pipeline jobs; returns the rows deleted';

CREATE FUNCTION customer_analytics.pipeline_lock_key(scope text DEFAULT 'all')
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT customer_analytics_internal.lock_key(scope) $$;
COMMENT ON FUNCTION customer_analytics.pipeline_lock_key(text) IS
    'The advisory lock (session level, bigint key) a running pipeline of a scope holds: one run per scope at a time';

/* Run one step in a subtransaction and record it; returns its status ('retry' to try again) */
CREATE FUNCTION customer_analytics_internal.pipeline_execute_step(run bigint, step_no integer, step text, command text,
                                                         depends_on text[], attempt integer)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    blocker text;
    affected bigint;
    st text;
    msg text;
    detail text;
    failed_checks text;
BEGIN
    -- a failed dependency blocks the step (a failed check only blocks what reads its table)
    SELECT string_agg(s.step, ', ' ORDER BY s.step_no) INTO blocker
    FROM customer_analytics.pipeline_step s
    WHERE s.run_id = run AND s.step = ANY (depends_on) AND s.step <> 'checks' AND s.status IN ('failed', 'blocked');
    -- (refresh_plan() walks pg_depend: only worth it when an error check failed)
    IF blocker IS NULL AND EXISTS (SELECT FROM customer_analytics.quality_result r
                                   WHERE r.run_id = run AND NOT r.passed AND r.severity = 'error') THEN
        IF step LIKE 'refresh %' THEN
            SELECT string_agg(DISTINCT format('%s (%s)', r.check_name, c.target), ', ') INTO failed_checks
            FROM customer_analytics.quality_result r
            JOIN customer_analytics.quality_check c ON c.name = r.check_name
            JOIN customer_analytics.refresh_plan() p ON 'refresh ' || customer_analytics.qualified_name(p.matview) = step
            WHERE r.run_id = run AND NOT r.passed AND r.severity = 'error'
              AND (to_regclass(c.target) = ANY (p.reads) OR c.kind = 'custom');
        ELSE
            -- a task that declares what it reads is blocked the same way
            SELECT string_agg(DISTINCT format('%s (%s)', r.check_name, c.target), ', ') INTO failed_checks
            FROM customer_analytics.quality_result r
            JOIN customer_analytics.quality_check c ON c.name = r.check_name
            JOIN customer_analytics.pipeline_task t ON t.task = step AND cardinality(t.reads) > 0
            WHERE r.run_id = run AND NOT r.passed AND r.severity = 'error'
              AND (to_regclass(c.target) = ANY (ARRAY(SELECT to_regclass(x) FROM unnest(t.reads) x)) OR c.kind = 'custom');
        END IF;
    END IF;
    -- a view refreshed recently enough by its policy is left alone
    IF blocker IS NULL AND failed_checks IS NULL AND step LIKE 'refresh %' AND EXISTS (
           SELECT FROM customer_analytics.refresh_policy rp
           JOIN customer_analytics.pipeline_step ps ON ps.step = 'refresh ' || rp.matview AND ps.status = 'succeeded'
           WHERE 'refresh ' || rp.matview = step AND ps.finished_at > clock_timestamp() - rp.min_interval) THEN
        INSERT INTO customer_analytics.pipeline_step (run_id, step_no, step, depends_on, status, attempts, finished_at, error)
        VALUES (run, step_no, step, depends_on, 'skipped', 0, clock_timestamp(), 'refreshed recently enough (refresh_policy)')
        ON CONFLICT ON CONSTRAINT pipeline_step_pkey DO UPDATE SET status = 'skipped', error = EXCLUDED.error;
        RETURN 'skipped';
    END IF;
    IF blocker IS NOT NULL OR failed_checks IS NOT NULL THEN
        INSERT INTO customer_analytics.pipeline_step (run_id, step_no, step, depends_on, status, attempts, finished_at, error)
        VALUES (run, step_no, step, depends_on, 'blocked', 0, clock_timestamp(),
                CASE WHEN blocker IS NOT NULL THEN 'not run: step ' || blocker || ' did not succeed'
                     ELSE 'not run: error-severity checks failed on what it reads: ' || failed_checks END)
        ON CONFLICT ON CONSTRAINT pipeline_step_pkey DO UPDATE SET status = 'blocked', error = EXCLUDED.error,
            finished_at = EXCLUDED.finished_at;
        RETURN 'blocked';
    END IF;

    INSERT INTO customer_analytics.pipeline_step (run_id, step_no, step, depends_on, status, attempts)
    VALUES (run, step_no, step, depends_on, 'running', attempt)
    ON CONFLICT ON CONSTRAINT pipeline_step_pkey DO UPDATE SET status = 'running', attempts = attempt,
        sqlstate = NULL, error = NULL;
    BEGIN
        IF command ~* '^\s*(SELECT|WITH)\M' THEN
            EXECUTE command INTO affected USING run;
        ELSE
            EXECUTE command;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, detail = PG_EXCEPTION_DETAIL;
        -- transient failures are retried (serialization, deadlock, lock timeout, connection, resources)
        IF (st IN ('40001', '40P01', '55P03') OR st LIKE '08%' OR st LIKE '53%')
           AND attempt <= current_setting('customer_analytics.pipeline_retries')::integer THEN
            UPDATE customer_analytics.pipeline_step s SET status = 'retrying', sqlstate = st, error = msg
            WHERE s.run_id = run AND s.step = pipeline_execute_step.step;
            RETURN 'retry';
        END IF;
        UPDATE customer_analytics.pipeline_step s
        SET status = 'failed', finished_at = clock_timestamp(), sqlstate = st,
            error = msg || COALESCE(' (' || NULLIF(detail, '') || ')', '')
        WHERE s.run_id = run AND s.step = pipeline_execute_step.step;
        PERFORM customer_analytics.raise_alert('pipeline', step,
            jsonb_build_object('run_id', run, 'sqlstate', st, 'error', msg),
            dedup_key => format('pipeline:%s:%s', run, step), severity => 'error');
        RETURN 'failed';
    END;

    IF step = 'checks' AND EXISTS (SELECT FROM customer_analytics.quality_result r
                                   WHERE r.run_id = run AND NOT r.passed AND r.severity = 'error') THEN
        UPDATE customer_analytics.pipeline_step s
        SET status = 'failed', finished_at = clock_timestamp(), rows_affected = affected, sqlstate = '23000',
            error = 'error-severity checks failed: ' ||
                    (SELECT string_agg(r.check_name, ', ' ORDER BY r.check_name) FROM customer_analytics.quality_result r
                     WHERE r.run_id = run AND NOT r.passed AND r.severity = 'error')
        WHERE s.run_id = run AND s.step = 'checks';
        RETURN 'failed';
    END IF;
    UPDATE customer_analytics.pipeline_step s
    SET status = 'succeeded', finished_at = clock_timestamp(), rows_affected = affected
    WHERE s.run_id = run AND s.step = pipeline_execute_step.step;
    RETURN 'succeeded';
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.pipeline_execute_step(bigint, integer, text, text, text[], integer) IS
    'Runs one pipeline step unless a dependency failed, records it in pipeline_step, and says succeeded, failed, blocked or retry';

/* How a run ended: failed if a step failed or was blocked (the errors of the failed ones) */
CREATE PROCEDURE customer_analytics.pipeline_finish(run bigint)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    UPDATE customer_analytics.pipeline_run r
    SET finished_at = pg_catalog.clock_timestamp(),
        status = CASE WHEN EXISTS (SELECT FROM customer_analytics.pipeline_step p
                                   WHERE p.run_id = run AND p.status IN ('failed', 'blocked'))
                      THEN 'failed' ELSE 'succeeded' END,
        error = (SELECT pg_catalog.string_agg(p.step || ': ' || p.error, '; ' ORDER BY p.step_no)
                 FROM customer_analytics.pipeline_step p WHERE p.run_id = run AND p.status = 'failed')
    WHERE r.run_id = run;
END;
COMMENT ON PROCEDURE customer_analytics.pipeline_finish(bigint) IS
    'The end of a run_pipeline() run: sets its finish time, its status (failed when a step failed or was blocked) and the errors of the failed steps';

CREATE PROCEDURE customer_analytics.run_pipeline(scope text DEFAULT 'all')
LANGUAGE plpgsql
-- No SET clause: a procedure with one cannot commit.  So everything here
-- is schema-qualified, operators and type names included: a caller's
-- search_path (e.g. public first) must not choose what runs.
AS $$
DECLARE
    run bigint;
    s record;
    status pg_catalog.text;
    attempt integer;
    holder integer;
BEGIN
    -- a run cancelled in this session may have left its lock behind
    WHILE EXISTS (SELECT FROM pg_catalog.pg_locks l
                  WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory'
                    AND l.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()
                    AND ((l.classid::bigint OPERATOR(pg_catalog.<<) 32) OPERATOR(pg_catalog.|) l.objid::bigint)
                        OPERATOR(pg_catalog.=) customer_analytics.pipeline_lock_key(scope)) LOOP
        PERFORM pg_catalog.pg_advisory_unlock(customer_analytics.pipeline_lock_key(scope));
    END LOOP;
    IF NOT pg_catalog.pg_try_advisory_lock(customer_analytics.pipeline_lock_key(scope)) THEN
        SELECT l.pid INTO holder FROM pg_catalog.pg_locks l
        WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory' AND l.granted
          AND ((l.classid::bigint OPERATOR(pg_catalog.<<) 32) OPERATOR(pg_catalog.|) l.objid::bigint)
              OPERATOR(pg_catalog.=) customer_analytics.pipeline_lock_key(scope);
        INSERT INTO customer_analytics.pipeline_run (scope, status, finished_at, error)
        VALUES (scope, 'skipped', pg_catalog.clock_timestamp(),
                pg_catalog.concat('another run was in progress', ' (backend ' OPERATOR(pg_catalog.||) holder OPERATOR(pg_catalog.||) ')'));
        RAISE NOTICE 'pipeline run skipped: another run is in progress';
        COMMIT;
        RETURN;
    END IF;
    -- holding the lock, no other run is alive: one left running was interrupted
    UPDATE customer_analytics.pipeline_run r SET status = 'failed', finished_at = pg_catalog.clock_timestamp(),
        error = 'interrupted (server stopped or run cancelled)'
    WHERE r.status OPERATOR(pg_catalog.=) 'running';
    INSERT INTO customer_analytics.pipeline_run (scope) VALUES (scope) RETURNING run_id INTO run;
    COMMIT;

    FOR s IN SELECT * FROM customer_analytics.pipeline_plan(scope) ORDER BY step_no LOOP
        attempt := 0;
        LOOP
            attempt := pg_catalog.int4pl(attempt, 1);
            status := customer_analytics_internal.pipeline_execute_step(run, s.step_no, s.step, s.command, s.depends_on, attempt);
            COMMIT;
            EXIT WHEN status OPERATOR(pg_catalog.<>) 'retry';
            PERFORM pg_catalog.pg_sleep(pg_catalog.float8mul(
                pg_catalog.current_setting('customer_analytics.pipeline_retry_backoff')::pg_catalog.float8,
                pg_catalog.pow(2::pg_catalog.float8, pg_catalog.int4mi(attempt, 1)::pg_catalog.float8)));
        END LOOP;
    END LOOP;

    CALL customer_analytics.pipeline_finish(run);
    COMMIT;
    PERFORM pg_catalog.pg_advisory_unlock(customer_analytics.pipeline_lock_key(scope));
END
$$;
COMMENT ON PROCEDURE customer_analytics.run_pipeline(text) IS
    'Runs the pipeline (CALL customer_analytics.run_pipeline()): every step of pipeline_plan(scope) in order, committing after each, retrying transient failures, blocking the steps that depend on a failed one; logged in pipeline_run and pipeline_step. A second run while one is in progress is skipped and logged';
