/*
 * customer_analytics 0.1 -> 0.2
 *
 * search_path safety: the functions that had no SET search_path now either
 * have one or qualify every operator and type name (the ones the planner
 * inlines, and run_pipeline(), a procedure, which cannot have a SET clause
 * and commit); run_pipeline() ends a run through pipeline_finish().
 * clv_model gets a unique index, so that the pipeline refreshes it
 * CONCURRENTLY (readers were locked out while the models were refitted).
 * Privileges: grant_analyst(), grant_loader(), revoke_access(), and
 * reject_reader, whose roles may read every rejected line.
 * customer_rfm becomes a view over customer_rfm_score, which the pipeline's
 * 'customer rfm' task keeps incrementally (refresh_customer_rfm()); its
 * rows carry over.  A view of your own on customer_rfm blocks the update:
 * drop it first, create it again after.
 *
 * Each statement matches the piece of src/sql/ it comes from, so an
 * upgraded 0.1 has the catalog of a fresh 0.2 (t/005_upgrade.pl).
 */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION customer_analytics UPDATE TO '0.2'" to load this file. \quit


-- 30_transform.sql: inlined, so qualified

CREATE OR REPLACE FUNCTION customer_analytics.date_key(day date)
RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT (((pg_catalog.date_part('year', day) OPERATOR(pg_catalog.*) 10000)
             OPERATOR(pg_catalog.+) (pg_catalog.date_part('month', day) OPERATOR(pg_catalog.*) 100))
            OPERATOR(pg_catalog.+) pg_catalog.date_part('day', day))::integer
$$;

CREATE OR REPLACE FUNCTION customer_analytics.ca_newly_staged(xid xid8, lo xid8, hi xid8,
                                                   cur pg_snapshot, prev pg_snapshot, own xid8)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT (xid OPERATOR(pg_catalog.>=) lo AND xid OPERATOR(pg_catalog.<) hi
            AND pg_catalog.pg_visible_in_snapshot(xid, cur)
            AND (prev IS NULL OR NOT pg_catalog.pg_visible_in_snapshot(xid, prev)))
           OR xid OPERATOR(pg_catalog.=) own
$$;

-- 50_rfm.sql

CREATE OR REPLACE FUNCTION customer_analytics.top_customers_limit()
    RETURNS integer
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT (CASE WHEN pg_catalog.current_setting('customer_analytics.top_customers', true) OPERATOR(pg_catalog.<>) ''
                       THEN pg_catalog.current_setting('customer_analytics.top_customers', true)
                       ELSE '100' END)::integer $$;

CREATE OR REPLACE FUNCTION customer_analytics.rfm_map_coverage(map text)
RETURNS TABLE (r integer, f integer, m integer, rules integer, segments text[])
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT gr.r, gf.f, gm.m, count(s.segment)::integer,
           array_agg(s.segment ORDER BY s.segment) FILTER (WHERE s.segment IS NOT NULL)
    FROM generate_series(1, 5) AS gr(r)
    CROSS JOIN generate_series(1, 5) AS gf(f)
    CROSS JOIN generate_series(1, 5) AS gm(m)
    LEFT JOIN customer_analytics.rfm_segment_rule s
           ON s.map_name = map
          AND gr.r BETWEEN s.r_min AND s.r_max
          AND gf.f BETWEEN s.f_min AND s.f_max
          AND gm.m BETWEEN s.m_min AND s.m_max
          AND (gf.f + gm.m) / 2.0 BETWEEN s.fm_min AND s.fm_max
    GROUP BY gr.r, gf.f, gm.m
$$;

CREATE OR REPLACE FUNCTION customer_analytics.rfm_check_segment_map(map text)
RETURNS TABLE (cell text, problem text)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('%s%s%s', r, f, m),
           CASE WHEN rules = 0 THEN 'no rule names it'
                ELSE format('%s rules name it: %s', rules, array_to_string(segments, ', ')) END
    FROM customer_analytics.rfm_map_coverage(map)
    WHERE rules <> 1
    ORDER BY 1
$$;

CREATE OR REPLACE FUNCTION customer_analytics.rfm_segment_cells(map text)
RETURNS TABLE (r integer, f integer, m integer, segment text)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT r, f, m, segments[1] FROM customer_analytics.rfm_map_coverage(map) WHERE rules = 1
$$;

CREATE OR REPLACE FUNCTION customer_analytics.rfm_segment(r integer, f integer, m integer,
                                               map text DEFAULT NULL)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.segment
    FROM customer_analytics.rfm_segment_rule s
    WHERE s.map_name = COALESCE(map, NULLIF(pg_catalog.current_setting('customer_analytics.rfm_segment_map', true), ''), 'default')
      AND r BETWEEN s.r_min AND s.r_max AND f BETWEEN s.f_min AND s.f_max
      AND m BETWEEN s.m_min AND s.m_max AND (f + m) / 2.0 BETWEEN s.fm_min AND s.fm_max
$$;

-- 70_pipeline.sql

CREATE OR REPLACE FUNCTION customer_analytics.qualified_name(rel regclass)
RETURNS text
LANGUAGE sql STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_catalog.format('%I.%I', n.nspname, c.relname)
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel $$;

CREATE OR REPLACE FUNCTION customer_analytics.pipeline_lock_key(scope text DEFAULT 'all')
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT (7411::bigint OPERATOR(pg_catalog.<<) 32)
             OPERATOR(pg_catalog.|) (pg_catalog.hashtext(scope)::bigint OPERATOR(pg_catalog.&) 4294967295) $$;

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

CREATE OR REPLACE PROCEDURE customer_analytics.run_pipeline(scope text DEFAULT 'all')
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
            status := customer_analytics.pipeline_execute_step(run, s.step_no, s.step, s.command, s.depends_on, attempt);
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

-- 75_schedule.sql

CREATE OR REPLACE FUNCTION customer_analytics.pipeline_job_name(scope text DEFAULT 'all')
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 'customer_analytics ' || pg_catalog.current_database() || ' ' || scope $$;

-- 80_clickstream.sql

CREATE OR REPLACE FUNCTION customer_analytics.track_event(
    event_type  text,
    session_id  text,
    customer_id text DEFAULT NULL,
    product_id  text DEFAULT NULL,
    order_id    text DEFAULT NULL,
    channel     text DEFAULT NULL,
    device      text DEFAULT NULL,
    event_ts    timestamptz DEFAULT NULL,
    event_id    text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    id pg_catalog.text := COALESCE(event_id, pg_catalog.gen_random_uuid()::pg_catalog.text);
BEGIN
    IF event_type IS NULL
       OR NOT event_type OPERATOR(pg_catalog.=) ANY ('{page_view,product_view,add_to_cart,checkout,purchase}'::pg_catalog.text[]) THEN
        RAISE EXCEPTION 'invalid event_type: %', COALESCE(pg_catalog.quote_literal(event_type), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'Argument event_type of track_event().',
                  HINT = 'Use page_view, product_view, add_to_cart, checkout or purchase.';
    END IF;
    IF session_id IS NULL OR session_id OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION 'track_event() needs a session_id'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = pg_catalog.format('Argument session_id was %s for a %s event.',
                                             COALESCE(pg_catalog.quote_literal(session_id), 'NULL'), event_type),
                  HINT = 'Pass the visitor''s session or cookie id.';
    END IF;
    IF id OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION 'track_event() got an empty event_id'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass NULL to have one generated.';
    END IF;
    INSERT INTO customer_analytics.stg_events
        (event_id, event_ts, customer_id, session_id, event_type, product_id, order_id, channel, device)
    VALUES (id, COALESCE(event_ts, pg_catalog.clock_timestamp()), customer_id, session_id, event_type,
            product_id, order_id, channel, device);
    RETURN id;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.visitor(customer_id text, session_id text)
    RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT CASE WHEN customer_id IS NOT NULL THEN 'c:' OPERATOR(pg_catalog.||) customer_id
                      ELSE 's:' OPERATOR(pg_catalog.||) session_id END $$;

-- 90_forecast.sql: clv_model (one row) refreshed CONCURRENTLY by the pipeline
CREATE UNIQUE INDEX clv_model_as_of_idx ON customer_analytics.clv_model (as_of);

-- 95_privileges.sql (new)

CREATE TABLE customer_analytics.reject_reader (
    role regrole PRIMARY KEY
);
COMMENT ON TABLE customer_analytics.reject_reader IS
    'Roles (and their members) that may read every rejected line in ingest_reject, not only those of their own loads; filled by grant_analyst(role, raw_rejects => true)';
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.reject_reader', '');
-- the policy below reads it as the querying user
GRANT SELECT ON customer_analytics.reject_reader TO PUBLIC;

CREATE POLICY ingest_reject_reader ON customer_analytics.ingest_reject FOR SELECT
    USING (EXISTS (SELECT FROM customer_analytics.reject_reader r
                   WHERE pg_catalog.pg_has_role(CURRENT_USER, r.role::oid, 'MEMBER')));

CREATE FUNCTION customer_analytics.grant_analyst(grantee regrole, raw_rejects boolean DEFAULT false)
RETURNS SETOF text
LANGUAGE plpgsql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel regclass;
    stmt text;
BEGIN
    stmt := format('GRANT USAGE ON SCHEMA customer_analytics TO %s', grantee);
    EXECUTE stmt;
    RETURN NEXT stmt;
    -- every table and view but the staging tables and the raw rejects
    FOR rel IN SELECT c.oid FROM pg_class c
               WHERE c.relnamespace = 'customer_analytics'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
                 AND c.relname NOT LIKE 'stg\_%' AND c.relname <> 'ingest_reject'
               ORDER BY c.relname LOOP
        stmt := format('GRANT SELECT ON %s TO %s', rel, grantee);
        EXECUTE stmt;
        RETURN NEXT stmt;
    END LOOP;
    IF raw_rejects THEN
        stmt := format('GRANT SELECT ON customer_analytics.ingest_reject TO %s', grantee);
        EXECUTE stmt;
        RETURN NEXT stmt;
        INSERT INTO customer_analytics.reject_reader VALUES (grantee) ON CONFLICT DO NOTHING;
        RETURN NEXT format('INSERT INTO customer_analytics.reject_reader VALUES (%L)', grantee);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION customer_analytics.grant_analyst(regrole, boolean) FROM PUBLIC;
COMMENT ON FUNCTION customer_analytics.grant_analyst(regrole, boolean) IS
    'Lets a role read the star schema, every view and the pipeline''s and ingestion''s records (not the staging tables); with raw_rejects, every rejected raw line too (else none). Returns the statements it ran';

CREATE FUNCTION customer_analytics.grant_loader(grantee regrole)
RETURNS SETOF text
LANGUAGE plpgsql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    obj text;
    stmt text;
BEGIN
    stmt := format('GRANT USAGE ON SCHEMA customer_analytics TO %s', grantee);
    EXECUTE stmt;
    RETURN NEXT stmt;
    FOR stmt IN
        -- the staging tables, and the sequences their defaults draw from
        SELECT format('GRANT SELECT, INSERT ON %s TO %s', c.oid::regclass, grantee)
        FROM pg_class c
        WHERE c.relnamespace = 'customer_analytics'::regnamespace AND c.relkind = 'r' AND c.relname LIKE 'stg\_%'
        UNION ALL
        -- a load's own record and rejects (row-level security: its own only)
        SELECT format('GRANT SELECT, INSERT ON %s TO %s', t::regclass, grantee)
        FROM unnest(ARRAY['customer_analytics.ingest_load', 'customer_analytics.ingest_reject']) t
        UNION ALL
        SELECT format('GRANT SELECT ON %s TO %s', t::regclass, grantee)
        FROM unnest(ARRAY['customer_analytics.imputation_rule', 'customer_analytics.ingest_summary']) t
        UNION ALL
        SELECT DISTINCT format('GRANT USAGE ON SEQUENCE %s TO %s', d.refobjid::regclass, grantee)
        FROM pg_attrdef a
        JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = a.oid
                        AND d.refclassid = 'pg_class'::regclass
        JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
        WHERE a.adrelid IN (SELECT c.oid FROM pg_class c
                            WHERE c.relnamespace = 'customer_analytics'::regnamespace
                              AND (c.relname LIKE 'stg\_%' OR c.relname IN ('ingest_load', 'ingest_reject')))
        ORDER BY 1
    LOOP
        EXECUTE stmt;
        RETURN NEXT stmt;
    END LOOP;
    -- ingest_csv/ingest_csv_text draw load ids outside the defaults
    stmt := format('GRANT USAGE ON SEQUENCE customer_analytics.load_id_seq TO %s', grantee);
    EXECUTE stmt;
    RETURN NEXT stmt;
END
$$;
REVOKE ALL ON FUNCTION customer_analytics.grant_loader(regrole) FROM PUBLIC;
COMMENT ON FUNCTION customer_analytics.grant_loader(regrole) IS
    'Lets a role load data: INSERT into the staging tables (ingest_csv_text, track_event, COPY), its own ingest_load records and rejects. Reading server files with ingest_csv needs pg_read_server_files besides (granted apart, on purpose). Returns the statements it ran';

CREATE FUNCTION customer_analytics.revoke_access(grantee regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    stmt text;
BEGIN
    DELETE FROM customer_analytics.reject_reader r WHERE r.role = grantee;
    FOR stmt IN
        SELECT format('REVOKE ALL ON %s FROM %s', c.oid::regclass, grantee)
        FROM pg_class c
        WHERE c.relnamespace = 'customer_analytics'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
          AND c.relname <> 'reject_reader'
        ORDER BY c.relname
    LOOP
        EXECUTE stmt;
    END LOOP;
    EXECUTE format('REVOKE USAGE ON SCHEMA customer_analytics FROM %s', grantee);
END
$$;
REVOKE ALL ON FUNCTION customer_analytics.revoke_access(regrole) FROM PUBLIC;
COMMENT ON FUNCTION customer_analytics.revoke_access(regrole) IS
    'Takes back what grant_analyst() and grant_loader() gave a role (every privilege on the extension''s tables, views and sequences, and the schema)';

-- Changed after the privilege work (kept in step with src/sql/): an index for
-- the freshness and volume checks, refresh_policy, the volume check in one
-- pass, skipped refresh steps, forecasts read from the sales rollup.

CREATE INDEX fact_order_line_ts_idx ON customer_analytics.fact_order_line (order_ts);
CREATE INDEX pipeline_step_step_idx ON customer_analytics.pipeline_step (step, finished_at);

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

ALTER TABLE customer_analytics.pipeline_step DROP CONSTRAINT pipeline_step_status_check,
    ADD CONSTRAINT pipeline_step_status_check CHECK (status IN ('running', 'succeeded', 'failed', 'blocked', 'retrying', 'skipped'));

COMMENT ON TABLE customer_analytics.pipeline_step IS
    'One row per step of a run: status (succeeded, failed, blocked by a failed dependency or check, retrying, skipped: refreshed recently enough by its refresh policy), attempts, times, rows affected, and the error with its SQLSTATE';

CREATE OR REPLACE FUNCTION customer_analytics.quality_check_sql(c customer_analytics.quality_check)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tbl text;
    cols text;
BEGIN
    IF c.kind <> 'custom' THEN
        IF to_regclass(c.target) IS NULL THEN
            RAISE EXCEPTION 'quality check "%": table "%" does not exist', c.name, c.target
                USING ERRCODE = 'undefined_table';
        END IF;
        tbl := to_regclass(c.target)::text;
        IF c.column_name IS NOT NULL THEN
            SELECT string_agg(quote_ident(btrim(x)), ', ') INTO cols FROM unnest(string_to_array(c.column_name, ',')) x;
        END IF;
    END IF;
    RETURN CASE c.kind
        WHEN 'not_null' THEN format('SELECT * FROM %s WHERE %s IS NULL', tbl, cols)
        WHEN 'unique' THEN format('SELECT %s, count(*) AS occurrences FROM %s GROUP BY %s HAVING count(*) > 1', cols, tbl, cols)
        WHEN 'relationship' THEN format(
            'SELECT x.* FROM %s x WHERE x.%s IS NOT NULL AND NOT EXISTS (SELECT FROM %s y WHERE y.%I = x.%s)',
            tbl, cols, to_regclass(c.params->>'to')::text, c.params->>'field', cols)
        WHEN 'accepted_values' THEN format(
            'SELECT %s, count(*) AS occurrences FROM %s WHERE %s IS NOT NULL AND %s::text <> ALL (%L::text[]) GROUP BY 1',
            cols, tbl, cols, cols, ARRAY(SELECT jsonb_array_elements_text(c.params->'values')))
        WHEN 'freshness' THEN format(
            'SELECT max(%s) AS newest, now() - max(%s) AS age FROM %s HAVING max(%s) IS NULL OR max(%s) < now() - %L::interval',
            cols, cols, tbl, cols, cols, COALESCE(c.params->>'max_age', '1 day'))
        WHEN 'row_count_change' THEN format(
            -- the newest whole day: a day the clock has not finished yet
            -- (a live shop's morning) is not scored as a whole day
            $q$WITH newest AS (SELECT CASE WHEN date_trunc('day', max(%1$s)) + interval '1 day' > now()
                                           THEN date_trunc('day', max(%1$s)) - interval '1 day'
                                           ELSE date_trunc('day', max(%1$s)) END AS day FROM %2$s),
               counts AS (
                   SELECT date_trunc('day', t.%1$s) AS day, count(*) AS n
                   FROM %2$s t, newest
                   WHERE t.%1$s >= newest.day - %3$s * interval '1 day' GROUP BY 1
               ), days AS (
                   SELECT d AS day, COALESCE(c.n, 0) AS n
                   FROM newest, generate_series(newest.day - %3$s * interval '1 day', newest.day, interval '1 day') d
                   LEFT JOIN counts c ON c.day = d
               ), scored AS (
                   SELECT day, n, customer_analytics.zscore(n, customer_analytics.stats_agg(n::float8) OVER w) AS z
                   FROM days WINDOW w AS (ORDER BY day ROWS BETWEEN %3$s PRECEDING AND 1 PRECEDING)
               )
               SELECT scored.day::date AS day, scored.n AS rows, round(scored.z::numeric, 2) AS z FROM scored, newest
               WHERE scored.day = newest.day AND abs(scored.z) > %4$s$q$,
            COALESCE(cols, 'loaded_at'), tbl, COALESCE((c.params->>'days')::int, 28),
            COALESCE((c.params->>'threshold')::float8, 3))
        WHEN 'custom' THEN c.params->>'sql'
    END;
END
$$;
COMMENT ON FUNCTION customer_analytics.quality_check_sql(customer_analytics.quality_check) IS
    'The SQL that returns the failing rows of a quality check';

CREATE OR REPLACE FUNCTION customer_analytics.pipeline_execute_step(run bigint, step_no integer, step text, command text,
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
COMMENT ON FUNCTION customer_analytics.pipeline_execute_step(bigint, integer, text, text, text[], integer) IS
    'Runs one pipeline step unless a dependency failed, records it in pipeline_step, and says succeeded, failed, blocked or retry';

CREATE OR REPLACE FUNCTION customer_analytics.sales_series(first_day date, last_day date)
RETURNS TABLE (scope text, category text, day date, revenue float8)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    -- from the sales rollup (refresh_sales_rollup() keeps it current),
    -- not from the order lines: a row per day and category
    WITH lines AS (
        SELECT r.day, r.category, r.revenue
        FROM customer_analytics.sales_rollup_category r
        WHERE r.day BETWEEN first_day AND last_day
    ),
    series AS (
        SELECT 'total' AS scope, '(all)' AS category
        WHERE EXISTS (SELECT FROM lines)
        UNION ALL
        SELECT DISTINCT 'category', l.category FROM lines l
    ),
    filled AS (
        SELECT 'total' AS scope, '(all)' AS category, l.day, l.revenue FROM lines l
        UNION ALL
        SELECT 'category', l.category, l.day, l.revenue FROM lines l
        UNION ALL
        -- every day of every series, so that a day without sales is a 0
        SELECT s.scope, s.category, g.day::date, 0
        FROM series s CROSS JOIN generate_series(first_day, last_day, interval '1 day') AS g(day)
    )
    SELECT x.scope, x.category, x.day, sum(x.revenue)::float8
    FROM filled x
    GROUP BY x.scope, x.category, x.day
$$;
COMMENT ON FUNCTION customer_analytics.sales_series(date, date) IS
    'Daily revenue of completed order lines from first_day to last_day, one row per day (0 on days without sales): the total (scope ''total'', category ''(all)'') and each category that sold in the period (scope ''category'')';

CREATE OR REPLACE FUNCTION customer_analytics.refresh_forecasts()
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    alerts integer;
BEGIN
    PERFORM customer_analytics.refresh_sales_rollup();
    SELECT count(*) INTO alerts FROM customer_analytics.alert_forecast_misses();
    REFRESH MATERIALIZED VIEW customer_analytics.sales_forecast;
    REFRESH MATERIALIZED VIEW customer_analytics.sales_forecast_accuracy;
    REFRESH MATERIALIZED VIEW customer_analytics.clv_model;
    REFRESH MATERIALIZED VIEW customer_analytics.customer_clv;
    RETURN alerts;
END
$$;
COMMENT ON FUNCTION customer_analytics.refresh_forecasts() IS
    'The pipeline step after transform(): raise forecast_miss alerts for the days just loaded (alert_forecast_misses), then refresh sales_forecast, sales_forecast_accuracy, clv_model and customer_clv in that order; returns the number of alerts raised';

UPDATE customer_analytics.pipeline_task SET depends_on = '{"sales rollup"}' WHERE task = 'forecast misses' AND builtin;

CREATE OR REPLACE FUNCTION customer_analytics.pipeline_purge()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    keep interval := current_setting('customer_analytics.history_retention')::interval;
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

-- view_freshness reads each view's latest refresh once
CREATE OR REPLACE VIEW customer_analytics.view_freshness AS
SELECT p.matview, p.level, ok.refreshed_at, now() - ok.refreshed_at AS age,
       (SELECT s.status FROM customer_analytics.pipeline_step s
        WHERE s.step = v.step ORDER BY s.run_id DESC LIMIT 1) AS last_step_status
FROM customer_analytics.refresh_plan() p
CROSS JOIN LATERAL (SELECT 'refresh ' || customer_analytics.qualified_name(p.matview) AS step) v
CROSS JOIN LATERAL (SELECT max(s.finished_at) AS refreshed_at FROM customer_analytics.pipeline_step s
                    WHERE s.step = v.step AND s.status = 'succeeded') ok;

-- 50_rfm.sql: customer_rfm is kept incrementally (a view over a table that
-- refresh_customer_rfm() updates in place, for the customers whose lines
-- changed) instead of a materialized view refreshed CONCURRENTLY

/*
 * customer_rfm, kept incrementally.  Scoring needs every customer (the
 * quintile breaks move with each purchase), but a customer's recency,
 * frequency and monetary inputs only change with their order lines or
 * versions.  refresh_customer_rfm() keeps those inputs per customer in
 * rfm_rollup_customer: a new order (all of its lines new) is added to its
 * customer's row from rfm_new_line; any other change (an updated or deleted
 * line, a new version of the customer, a line added to an older order)
 * notes the customer in rfm_dirty_customer, and their row is recomputed
 * from their lines.  Then every customer is scored from the rollup and only
 * the rows whose scores changed are written: readers never wait, and there
 * is no REFRESH ... CONCURRENTLY diff of the whole view.
 */
CREATE TABLE customer_analytics.rfm_rollup_customer (
    customer_id  text PRIMARY KEY,
    customer_key bigint,
    last_order   timestamptz,
    frequency    bigint NOT NULL,
    monetary     numeric NOT NULL
);
COMMENT ON TABLE customer_analytics.rfm_rollup_customer IS
    'Per customer with a completed line: the current version''s key, last purchase, purchases and monetary value (rfm_agg over one row per order, returns apart), kept incrementally by refresh_customer_rfm(); derived data, rebuilt with refresh_customer_rfm(true)';

CREATE TABLE customer_analytics.rfm_dirty_customer (
    customer_id text UNIQUE NULLS NOT DISTINCT
);
COMMENT ON TABLE customer_analytics.rfm_dirty_customer IS
    'Customers whose order lines or versions changed since the last refresh_customer_rfm() (NULL: everyone, after a TRUNCATE)';

CREATE TABLE customer_analytics.rfm_new_line (
    customer_id text NOT NULL,
    order_id    text NOT NULL,
    line_number integer NOT NULL,
    order_ts    timestamptz NOT NULL,
    revenue     numeric NOT NULL,
    purchase    boolean NOT NULL
);
COMMENT ON TABLE customer_analytics.rfm_new_line IS
    'Order lines inserted since the last refresh_customer_rfm() (purchase: a completed line of a known customer, not a credit line worth nothing); an order whose lines are all here is added to its customer''s rollup without reading their other lines';

CREATE TABLE customer_analytics.customer_rfm_score (
    customer_id  text PRIMARY KEY,
    customer_key bigint,
    recency_days integer NOT NULL,
    frequency    bigint NOT NULL,
    monetary     numeric NOT NULL,
    r            integer NOT NULL,
    f            integer NOT NULL,
    m            integer NOT NULL,
    rfm_cell     text NOT NULL,
    segment      text NOT NULL
);
CREATE INDEX customer_rfm_score_segment_idx ON customer_analytics.customer_rfm_score (segment);
-- top_customers reads the first rows of this order, not all of them
CREATE INDEX customer_rfm_score_monetary_idx ON customer_analytics.customer_rfm_score (monetary DESC, customer_id);
COMMENT ON TABLE customer_analytics.customer_rfm_score IS
    'The scores behind customer_rfm, written by refresh_customer_rfm() (only the rows that changed)';

CREATE TABLE customer_analytics.customer_rfm_refresh (
    id           boolean PRIMARY KEY DEFAULT true CHECK (id),
    as_of        timestamptz NOT NULL,
    refreshed_at timestamptz NOT NULL
);
COMMENT ON TABLE customer_analytics.customer_rfm_refresh IS
    'One row: the reference time of the scores in customer_rfm_score and when refresh_customer_rfm() last wrote them';
-- what analysts read is dumped like a materialized view's contents; the
-- rollup is rebuilt by the first refresh after a restore
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.customer_rfm_score', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.customer_rfm_refresh', '');

CREATE FUNCTION customer_analytics.note_dirty_customers()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO customer_analytics.rfm_dirty_customer VALUES (NULL) ON CONFLICT DO NOTHING;
    ELSIF TG_TABLE_NAME = 'dim_customer' THEN
        -- a new, changed or removed version moves the customer's current key
        -- or which lines are theirs
        IF TG_OP = 'INSERT' THEN
            INSERT INTO customer_analytics.rfm_dirty_customer
            SELECT DISTINCT customer_id FROM new_rows ON CONFLICT DO NOTHING;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO customer_analytics.rfm_dirty_customer
            SELECT DISTINCT customer_id FROM old_rows ON CONFLICT DO NOTHING;
        ELSE
            INSERT INTO customer_analytics.rfm_dirty_customer
            SELECT customer_id FROM old_rows UNION SELECT customer_id FROM new_rows ON CONFLICT DO NOTHING;
        END IF;
    ELSIF TG_OP = 'INSERT' THEN
        -- new lines are usually new orders: queued, added without a recompute
        INSERT INTO customer_analytics.rfm_new_line (customer_id, order_id, line_number, order_ts, revenue, purchase)
        SELECT c.customer_id, r.order_id, r.line_number, r.order_ts, r.revenue,
               r.status = 'completed' AND r.customer_key <> -1 AND (r.quantity > 0 OR r.revenue <> 0)
        FROM new_rows r JOIN customer_analytics.dim_customer c USING (customer_key);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO customer_analytics.rfm_dirty_customer
        SELECT DISTINCT c.customer_id
        FROM (SELECT DISTINCT customer_key FROM old_rows) r
        JOIN customer_analytics.dim_customer c USING (customer_key)
        ON CONFLICT DO NOTHING;
    ELSE
        INSERT INTO customer_analytics.rfm_dirty_customer
        SELECT DISTINCT c.customer_id
        FROM (SELECT customer_key FROM old_rows UNION SELECT customer_key FROM new_rows) r
        JOIN customer_analytics.dim_customer c USING (customer_key)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION customer_analytics.note_dirty_customers() IS
    'Statement trigger: queues new order lines in rfm_new_line, and notes in rfm_dirty_customer the customers whose order lines or versions changed otherwise';

CREATE TRIGGER fact_order_line_dirty_customers_ins AFTER INSERT ON customer_analytics.fact_order_line
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics.note_dirty_customers();
CREATE TRIGGER fact_order_line_dirty_customers_upd AFTER UPDATE ON customer_analytics.fact_order_line
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics.note_dirty_customers();
CREATE TRIGGER fact_order_line_dirty_customers_del AFTER DELETE ON customer_analytics.fact_order_line
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics.note_dirty_customers();
CREATE TRIGGER fact_order_line_dirty_customers_trunc AFTER TRUNCATE ON customer_analytics.fact_order_line
    FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics.note_dirty_customers();
CREATE TRIGGER dim_customer_dirty_customers_ins AFTER INSERT ON customer_analytics.dim_customer
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics.note_dirty_customers();
CREATE TRIGGER dim_customer_dirty_customers_upd AFTER UPDATE ON customer_analytics.dim_customer
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics.note_dirty_customers();
CREATE TRIGGER dim_customer_dirty_customers_del AFTER DELETE ON customer_analytics.dim_customer
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics.note_dirty_customers();
CREATE TRIGGER dim_customer_dirty_customers_trunc AFTER TRUNCATE ON customer_analytics.dim_customer
    FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics.note_dirty_customers();

/*
 * What rfm() returns on the star schema, scored from rfm_rollup_customer
 * instead of the facts (src/rfm.c): the same breaks and scores.  Valid
 * while no order line is later than as_of (the rollup holds them all).
 */
CREATE FUNCTION customer_analytics.rfm_from_rollup(as_of timestamptz)
RETURNS TABLE (customer_key bigint, customer_id text, recency_days integer, frequency bigint,
               monetary numeric, r integer, f integer, m integer, rfm_cell text, segment text)
AS 'MODULE_PATHNAME', 'ca_rfm_from_rollup'
LANGUAGE C STABLE STRICT PARALLEL RESTRICTED
ROWS 10000;
COMMENT ON FUNCTION customer_analytics.rfm_from_rollup(timestamptz) IS
    'rfm(as_of) of the star schema computed from rfm_rollup_customer (the same rows, much faster); what refresh_customer_rfm() writes while no order line is later than as_of';

CREATE FUNCTION customer_analytics.refresh_customer_rfm(full_refresh boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ids text[];
    everyone boolean;
    as_of timestamptz := customer_analytics.reference_time();
    map text := COALESCE(NULLIF(current_setting('customer_analytics.rfm_segment_map', true), ''), 'default');
    redo bigint;
    rounds integer := 0;
    later boolean;
    changed bigint;
BEGIN
    -- one maintainer at a time; readers never wait
    PERFORM pg_advisory_xact_lock(hashtext('customer_analytics.refresh_customer_rfm'));
    IF (SELECT count(*) FROM customer_analytics.rfm_segment_cells(map)) <> 125 THEN
        RAISE EXCEPTION 'RFM segment map "%" does not name all 125 cells', map
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('See SELECT * FROM customer_analytics.rfm_check_segment_map(%L);', map);
    END IF;
    LOOP
        rounds := rounds + 1;
        -- take the noted customers (those noted by transactions still running stay for next time)
        WITH taken AS (DELETE FROM customer_analytics.rfm_dirty_customer RETURNING customer_id)
        SELECT array_agg(customer_id) FILTER (WHERE customer_id IS NOT NULL), bool_or(customer_id IS NULL)
        INTO ids, everyone FROM taken;
        IF full_refresh OR everyone
           OR (NOT EXISTS (SELECT FROM customer_analytics.rfm_rollup_customer)
               AND EXISTS (SELECT FROM customer_analytics.fact_order_line)) THEN
            DELETE FROM customer_analytics.rfm_rollup_customer;
            ids := NULL;
            everyone := true;
            full_refresh := false;
        ELSIF ids IS NOT NULL THEN
            DELETE FROM customer_analytics.rfm_rollup_customer WHERE customer_id IN (SELECT unnest(ids));
        END IF;
        IF everyone OR ids IS NOT NULL THEN
            -- rfm()'s inputs: completed lines of known customers; the lines
            -- of an order are one purchase (at its latest line), a return
            -- (negative revenue) stands alone: grouped by order and, for a
            -- return, by its line.  A credit line worth nothing (negative
            -- quantity at price 0) is neither.  The queued lines this statement sees are
            -- in the facts it reads: they are consumed here, not added again
            -- below.
            WITH consumed AS (
                DELETE FROM customer_analytics.rfm_new_line q
                WHERE everyone OR q.customer_id IN (SELECT unnest(ids))
            )
            INSERT INTO customer_analytics.rfm_rollup_customer (customer_id, customer_key, last_order, frequency, monetary)
            SELECT o.customer_id, cur.customer_key, (o.s).last_order, (o.s).frequency, (o.s).monetary
            FROM (SELECT x.customer_id, customer_analytics.rfm_agg(x.ts, x.amount) AS s
                  FROM (SELECT c.customer_id, max(fl.order_ts) AS ts, sum(fl.revenue) AS amount
                        FROM customer_analytics.fact_order_line fl
                        JOIN customer_analytics.dim_customer c ON c.customer_key = fl.customer_key
                        WHERE fl.status = 'completed' AND c.customer_key <> -1
                          AND (fl.quantity > 0 OR fl.revenue <> 0)
                          AND (everyone OR c.customer_id IN (SELECT unnest(ids)))
                        GROUP BY c.customer_id, fl.order_id, CASE WHEN fl.revenue < 0 THEN fl.line_number END) x
                  GROUP BY x.customer_id) o
            LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = o.customer_id AND cur.is_current
                                                         AND cur.customer_key <> -1;
        END IF;

        -- new orders are added to their customers' rows; an order that had
        -- lines before (its line count in the facts is larger) is not new:
        -- its customers are recomputed in the next round
        WITH taken AS (
            DELETE FROM customer_analytics.rfm_new_line RETURNING *
        ), orders AS (
            SELECT t.order_id,
                   count(*) = (SELECT count(*) FROM customer_analytics.fact_order_line f
                               WHERE f.order_id = t.order_id) AS whole
            FROM taken t GROUP BY t.order_id
        ), noted AS (
            INSERT INTO customer_analytics.rfm_dirty_customer
            SELECT DISTINCT t.customer_id FROM taken t JOIN orders o USING (order_id) WHERE NOT o.whole
            ON CONFLICT DO NOTHING
            RETURNING 1
        ), per_order AS (            -- grouped as above
            SELECT t.customer_id, max(t.order_ts) AS ts, sum(t.revenue) AS amount
            FROM taken t JOIN orders o USING (order_id)
            WHERE o.whole AND t.purchase
            GROUP BY t.customer_id, t.order_id, CASE WHEN t.revenue < 0 THEN t.line_number END
        ), added AS (
            INSERT INTO customer_analytics.rfm_rollup_customer AS u (customer_id, customer_key, last_order, frequency, monetary)
            SELECT p.customer_id, cur.customer_key, (p.s).last_order, (p.s).frequency, (p.s).monetary
            FROM (SELECT customer_id, customer_analytics.rfm_agg(ts, amount) AS s FROM per_order GROUP BY customer_id) p
            LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = p.customer_id AND cur.is_current
                                                         AND cur.customer_key <> -1
            ON CONFLICT (customer_id) DO UPDATE
                SET last_order = greatest(u.last_order, excluded.last_order),
                    frequency = u.frequency + excluded.frequency,
                    monetary = u.monetary + excluded.monetary
            RETURNING 1
        )
        SELECT count(*) FROM noted INTO redo;   -- (added runs all the same)
        EXIT WHEN redo = 0 OR rounds >= 10;
    END LOOP;

    -- lines later than as_of (an as_of in the past) are not in rfm(as_of):
    -- then the scores come from the facts
    later := EXISTS (SELECT FROM customer_analytics.fact_order_line WHERE order_ts > as_of);
    WITH scored AS (
        SELECT * FROM customer_analytics.rfm(as_of) WHERE later
        UNION ALL
        SELECT * FROM customer_analytics.rfm_from_rollup(as_of) WHERE NOT later
    ), diff AS MATERIALIZED (      -- one pass over both: what to write
        SELECT s.*, t.customer_id AS old_customer_id
        FROM scored s FULL JOIN customer_analytics.customer_rfm_score t ON t.customer_id = s.customer_id
        WHERE s.customer_id IS NULL OR t.customer_id IS NULL
           OR (t.customer_key, t.recency_days, t.frequency, t.monetary, t.rfm_cell, t.segment)
              IS DISTINCT FROM (s.customer_key, s.recency_days, s.frequency, s.monetary, s.rfm_cell, s.segment)
    ), updated AS (
        UPDATE customer_analytics.customer_rfm_score t
        SET customer_key = d.customer_key, recency_days = d.recency_days, frequency = d.frequency,
            monetary = d.monetary, r = d.r, f = d.f, m = d.m, rfm_cell = d.rfm_cell, segment = d.segment
        FROM diff d
        WHERE t.customer_id = d.customer_id AND d.old_customer_id IS NOT NULL
        RETURNING 1
    ), inserted AS (
        INSERT INTO customer_analytics.customer_rfm_score
            (customer_id, customer_key, recency_days, frequency, monetary, r, f, m, rfm_cell, segment)
        SELECT d.customer_id, d.customer_key, d.recency_days, d.frequency, d.monetary, d.r, d.f, d.m, d.rfm_cell, d.segment
        FROM diff d WHERE d.old_customer_id IS NULL
        RETURNING 1
    ), deleted AS (
        DELETE FROM customer_analytics.customer_rfm_score t
        USING diff d
        WHERE t.customer_id = d.old_customer_id AND d.customer_id IS NULL
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM updated) + (SELECT count(*) FROM inserted) + (SELECT count(*) FROM deleted)
    INTO changed;
    INSERT INTO customer_analytics.customer_rfm_refresh (id, as_of, refreshed_at)
    VALUES (true, as_of, clock_timestamp())
    ON CONFLICT (id) DO UPDATE SET as_of = EXCLUDED.as_of, refreshed_at = EXCLUDED.refreshed_at;
    RETURN changed;
END
$$;
COMMENT ON FUNCTION customer_analytics.refresh_customer_rfm(boolean) IS
    'Brings customer_rfm up to date as of reference_time(): adds new orders to their customers'' RFM inputs, recomputes the inputs of customers whose lines or versions changed otherwise (everyone with full_refresh, after a TRUNCATE, or when the rollup is empty), rescores every customer and writes the rows that changed; returns their number. The pipeline calls it after transform()';

-- the scores of the last refresh carry over; the rollup is built by the
-- first refresh_customer_rfm() (it is empty)
DO $$
BEGIN
    IF (SELECT relispopulated FROM pg_catalog.pg_class WHERE oid = 'customer_analytics.customer_rfm'::pg_catalog.regclass) THEN
        INSERT INTO customer_analytics.customer_rfm_score
            (customer_id, customer_key, recency_days, frequency, monetary, r, f, m, rfm_cell, segment)
        SELECT customer_id, customer_key, recency_days, frequency, monetary, r, f, m, rfm_cell, segment
        FROM customer_analytics.customer_rfm;
        INSERT INTO customer_analytics.customer_rfm_refresh (id, as_of, refreshed_at)
        SELECT true, max(as_of), pg_catalog.now() FROM customer_analytics.customer_rfm HAVING count(*) > 0;
    END IF;
END
$$;
-- (a view of your own on customer_rfm must be dropped before the update
-- and created again after it)
DROP MATERIALIZED VIEW customer_analytics.top_customers;
DROP MATERIALIZED VIEW customer_analytics.segment_summary;
DROP MATERIALIZED VIEW customer_analytics.customer_rfm;

CREATE VIEW customer_analytics.customer_rfm AS
SELECT s.customer_id, s.customer_key, s.recency_days, s.frequency, s.monetary,
       s.r, s.f, s.m, s.rfm_cell, s.segment, a.as_of
FROM customer_analytics.customer_rfm_score s
CROSS JOIN customer_analytics.customer_rfm_refresh a;
COMMENT ON VIEW customer_analytics.customer_rfm IS
    'RFM scores and segment of every customer, as of reference_time() at the last refresh_customer_rfm() (setting customer_analytics.as_of, else the time of the refresh); the same rows as rfm(as_of)';

CREATE MATERIALIZED VIEW customer_analytics.top_customers AS
SELECT t.rank, t.customer_id, t.customer_key, d.name, d.email, d.city, d.country,
       t.monetary, t.frequency, t.recency_days, t.rfm_cell, t.segment
FROM (SELECT c.*, row_number() OVER (ORDER BY c.monetary DESC, c.customer_id) AS rank
      FROM customer_analytics.customer_rfm c) t
LEFT JOIN customer_analytics.dim_customer d ON d.customer_key = t.customer_key
WHERE t.rank <= customer_analytics.top_customers_limit();
CREATE UNIQUE INDEX top_customers_rank_idx ON customer_analytics.top_customers (rank);
COMMENT ON MATERIALIZED VIEW customer_analytics.top_customers IS
    'The customers with the highest monetary value (how many: customer_analytics.top_customers, default 100), with their current details and segment';

CREATE MATERIALIZED VIEW customer_analytics.segment_summary AS
SELECT c.segment,
       count(*) AS customers,
       sum(c.monetary) AS revenue,
       round(sum(c.monetary) / NULLIF(sum(sum(c.monetary)) OVER (), 0), 4) AS revenue_share,
       round(sum(c.monetary) / NULLIF(sum(c.frequency), 0), 2) AS avg_order_value,
       round(avg(c.frequency), 2) AS avg_orders,
       round(avg(c.recency_days), 1) AS avg_recency_days
FROM customer_analytics.customer_rfm c
GROUP BY c.segment;
CREATE UNIQUE INDEX segment_summary_segment_idx ON customer_analytics.segment_summary (segment);
COMMENT ON MATERIALIZED VIEW customer_analytics.segment_summary IS
    'Per RFM segment: customers, revenue and its share of all revenue, average order value, average orders and recency';

-- 70_pipeline.sql: tasks say what they read (an error-severity check on it
-- blocks them); the RFM scores are a task, no longer a view refresh

ALTER TABLE customer_analytics.pipeline_task ADD COLUMN reads text[] NOT NULL DEFAULT '{}';
COMMENT ON TABLE customer_analytics.pipeline_task IS
    'Steps of run_pipeline() other than the view refreshes (which come from pg_depend): the SQL to run, the steps it depends on (a task name or ''refresh <schema.view>''), the tables it writes (feeds: the refresh of every view reading them waits for it), the tables it reads (reads: an error-severity check failing on one blocks it, as it blocks a view reading the table), its scope, and an ordinal ordering steps that are ready together. A command that is a SELECT returns the rows it affected; $1 is the run id';
UPDATE customer_analytics.pipeline_task
SET reads = '{customer_analytics.fact_order_line,customer_analytics.dim_product,customer_analytics.dim_customer}'
WHERE task = 'sales rollup' AND builtin;
INSERT INTO customer_analytics.pipeline_task (task, command, depends_on, feeds, reads, ordinal, builtin) VALUES
    ('customer rfm', 'SELECT customer_analytics.refresh_customer_rfm()', '{transform}',
     '{customer_analytics.customer_rfm_score,customer_analytics.customer_rfm_refresh}',
     '{customer_analytics.fact_order_line,customer_analytics.dim_customer}', 45, true);
-- users' steps that waited for the old view's refresh wait for the task
UPDATE customer_analytics.pipeline_task
SET depends_on = pg_catalog.array_replace(depends_on, 'refresh customer_analytics.customer_rfm', 'customer rfm')
WHERE NOT builtin;

-- 10_schema.sql, 70_pipeline.sql: the checks read indexes where they can,
-- and run each check's query once

CREATE INDEX fact_order_line_negative_revenue_idx ON customer_analytics.fact_order_line (revenue) WHERE revenue < 0;
UPDATE customer_analytics.quality_check
SET params = '{"sql": "SELECT f.order_id, f.line_number, f.order_ts, c.valid_from, c.valid_to FROM customer_analytics.dim_customer c CROSS JOIN LATERAL (SELECT l.order_id, l.line_number, l.order_ts FROM customer_analytics.fact_order_line l WHERE l.customer_key = c.customer_key AND NOT (l.order_ts >= c.valid_from AND l.order_ts < c.valid_to) OFFSET 0) f WHERE c.customer_key <> -1 AND EXISTS (SELECT FROM customer_analytics.dim_customer v WHERE v.customer_id = c.customer_id AND v.valid_from < c.valid_from)"}'
WHERE name = 'order line has its customer version' AND builtin;

CREATE OR REPLACE FUNCTION customer_analytics.run_checks(run_id bigint DEFAULT NULL, only_target text DEFAULT NULL)
RETURNS TABLE (check_name text, kind text, target text, severity text, passed boolean,
               failing_rows bigint, sample jsonb)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c customer_analytics.quality_check;
    q text;
BEGIN
    FOR c IN SELECT * FROM customer_analytics.quality_check qc
             WHERE qc.enabled AND (only_target IS NULL OR qc.target = only_target) ORDER BY qc.name LOOP
        check_name := c.name; kind := c.kind; target := c.target; severity := c.severity;
        BEGIN
            q := customer_analytics.quality_check_sql(c);
            -- the check's query runs once: its failing rows (usually none) are kept for the sample
            EXECUTE format('WITH failing AS MATERIALIZED (%s) '
                           'SELECT (SELECT count(*) FROM failing), '
                           '(SELECT jsonb_agg(to_jsonb(s)) FROM (SELECT * FROM failing f LIMIT 5) s)', q)
                INTO failing_rows, sample;
        EXCEPTION WHEN OTHERS THEN
            -- a check that cannot run has failed, with its error as the sample
            failing_rows := -1;
            sample := jsonb_build_object('error', SQLERRM, 'sqlstate', SQLSTATE);
        END;
        passed := failing_rows = 0;
        INSERT INTO customer_analytics.quality_result (run_id, check_name, severity, passed, failing_rows, sample)
        VALUES (run_checks.run_id, c.name, c.severity, passed, failing_rows, sample);
        IF NOT passed THEN
            PERFORM customer_analytics.raise_alert('quality_check', c.name,
                jsonb_build_object('target', c.target, 'kind', c.kind, 'failing_rows', failing_rows, 'sample', sample,
                                   'run_id', run_checks.run_id),
                dedup_key => format('quality_check:%s:%s', c.name, COALESCE(run_checks.run_id::text, clock_timestamp()::text)),
                severity => CASE c.severity WHEN 'error' THEN 'error' ELSE 'warn' END);
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

-- 90_forecast.sql: the first and last day of sales through the order_ts
-- index instead of a join of every line with dim_date

CREATE OR REPLACE FUNCTION customer_analytics.sales_training_end()
RETURNS date
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    -- the newest line through the order_ts index: its day is its date_key's
    SELECT LEAST((customer_analytics.reference_time() AT TIME ZONE customer_analytics.business_timezone())::date - 1,
                 (SELECT (max(f.order_ts) AT TIME ZONE customer_analytics.business_timezone())::date
                  FROM customer_analytics.fact_order_line f))
$$;
CREATE OR REPLACE FUNCTION customer_analytics.sales_training_start()
RETURNS date
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (min(f.order_ts) AT TIME ZONE customer_analytics.business_timezone())::date
    FROM customer_analytics.fact_order_line f
    WHERE f.status = 'completed'
$$;

-- 30_transform.sql: transform() and transform_events() choose their window
-- of staged transactions with one function

CREATE FUNCTION customer_analytics.ca_staged_window(last_snapshot pg_snapshot, last_system bigint,
                                                    this_system bigint, full_refresh boolean,
                                                    OUT snap pg_snapshot, OUT prev pg_snapshot,
                                                    OUT lo xid8, OUT hi xid8)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    snap := pg_current_snapshot();
    IF full_refresh OR last_snapshot IS NULL OR last_system <> this_system
       OR pg_snapshot_xmin(last_snapshot) > pg_snapshot_xmax(snap) THEN
        prev := NULL;           -- everything staged so far
        lo := '0'::xid8;
    ELSE
        prev := last_snapshot;
        lo := pg_snapshot_xmin(prev);   -- all below were visible to the last run
    END IF;
    hi := pg_snapshot_xmax(snap);
END
$$;
COMMENT ON FUNCTION customer_analytics.ca_staged_window(pg_snapshot, bigint, bigint, boolean) IS
    'Internal to transform() and transform_events(): this run''s snapshot and the window of staged transactions it takes (prev NULL: every staged row)';

CREATE OR REPLACE FUNCTION customer_analytics.transform(full_refresh boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, pg_temp
AS $$
DECLARE
    saved       transform_state;
    snap        pg_snapshot;
    prev        pg_snapshot;
    lo          xid8;
    hi          xid8;
    own_xid     xid8;
    sysid       bigint;
    tz          text := business_timezone();
    n           bigint;
    new_keys    boolean := false;
    unknown_before boolean;
BEGIN
    -- one transform at a time; the second waits, then sees the first's work
    PERFORM pg_advisory_xact_lock(hashtext('customer_analytics.transform'));

    SELECT system_identifier INTO sysid FROM pg_control_system();
    SELECT * INTO saved FROM transform_state;
    SELECT w.snap, w.prev, w.lo, w.hi INTO snap, prev, lo, hi
    FROM ca_staged_window(saved.snapshot, saved.system_identifier, sysid, full_refresh) w;
    own_xid := pg_current_xact_id_if_assigned();

    /* the staged rows of this run, latest version per natural key */
    CREATE TEMP TABLE ca_batch_products ON COMMIT DROP AS
    SELECT DISTINCT ON (s.product_id)
           s.product_id, s.name, COALESCE(NULLIF(s.category, ''), 'Unknown') AS category,
           s.subcategory, s.unit_cost, s.list_price, s.updated_at, s.stage_id
    FROM stg_products s
    WHERE ca_newly_staged(s.staged_xid, lo, hi, snap, prev, own_xid)
    ORDER BY s.product_id, s.stage_id DESC;

    CREATE TEMP TABLE ca_batch_customers ON COMMIT DROP AS
    SELECT DISTINCT ON (s.customer_id, COALESCE(s.updated_at, s.loaded_at))
           s.customer_id, s.name, s.email, s.city, s.state, s.country, s.signup_date,
           COALESCE(s.updated_at, s.loaded_at) AS version_ts
    FROM stg_customers s
    WHERE ca_newly_staged(s.staged_xid, lo, hi, snap, prev, own_xid)
    ORDER BY s.customer_id, COALESCE(s.updated_at, s.loaded_at), s.stage_id DESC;

    CREATE TEMP TABLE ca_batch_orders ON COMMIT DROP AS
    SELECT DISTINCT ON (s.order_id, s.line_number) s.*
    FROM stg_orders s
    WHERE ca_newly_staged(s.staged_xid, lo, hi, snap, prev, own_xid)
    ORDER BY s.order_id, s.line_number, s.stage_id DESC;

    ANALYZE ca_batch_products, ca_batch_customers, ca_batch_orders;

    /* products: type 1, the latest staged version overwrites */
    INSERT INTO dim_product AS d (product_id, name, category, subcategory, unit_cost, list_price,
                                  updated_at, stage_id)
    SELECT product_id, name, category, subcategory, unit_cost, list_price, updated_at, stage_id
    FROM ca_batch_products
    ON CONFLICT (product_id) DO UPDATE
        SET name = excluded.name, category = excluded.category, subcategory = excluded.subcategory,
            unit_cost = excluded.unit_cost, list_price = excluded.list_price,
            updated_at = excluded.updated_at, stage_id = excluded.stage_id
        WHERE excluded.stage_id > d.stage_id
          AND (d.name, d.category, d.subcategory, d.unit_cost, d.list_price)
              IS DISTINCT FROM
              (excluded.name, excluded.category, excluded.subcategory, excluded.unit_cost, excluded.list_price);
    GET DIAGNOSTICS n = ROW_COUNT;
    step := 'dim_product'; rows_affected := n; RETURN NEXT;
    new_keys := new_keys OR n > 0;

    /*
     * customers: type 2.  Chain each customer's current version with the
     * staged versions newer than it, keep the versions whose attributes
     * differ from their predecessor, close the current version at the first
     * of them and insert them, each valid until the next.  Staged versions
     * not newer than the current one are history already superseded and
     * are ignored.
     */
    CREATE TEMP TABLE ca_new_versions ON COMMIT DROP AS
    WITH cur AS (
        SELECT d.customer_id, d.name, d.email, d.city, d.state, d.country, d.signup_date,
               d.valid_from AS version_ts, false AS is_new
        FROM dim_customer d
        WHERE d.is_current AND d.customer_id IN (SELECT customer_id FROM ca_batch_customers)
    ), chain AS (
        SELECT * FROM cur
        UNION ALL
        SELECT b.customer_id, b.name, b.email, b.city, b.state, b.country, b.signup_date,
               b.version_ts, true
        FROM ca_batch_customers b
        LEFT JOIN cur c ON c.customer_id = b.customer_id
        WHERE c.customer_id IS NULL OR b.version_ts > c.version_ts
    ), diffed AS (
        SELECT ch.*,
               ROW(ch.name, ch.email, ch.city, ch.state, ch.country, ch.signup_date)
                   IS DISTINCT FROM
               lag(ROW(ch.name, ch.email, ch.city, ch.state, ch.country, ch.signup_date))
                   OVER (PARTITION BY ch.customer_id ORDER BY ch.version_ts) AS changed
        FROM chain ch
    )
    SELECT df.customer_id, df.name, df.email, df.city, df.state, df.country,
           df.signup_date, df.version_ts
    FROM diffed df
    WHERE df.is_new AND df.changed;

    UPDATE dim_customer d
    SET valid_to = f.first_ts, is_current = false
    FROM (SELECT customer_id, min(version_ts) AS first_ts
          FROM ca_new_versions GROUP BY customer_id) f
    WHERE d.customer_id = f.customer_id AND d.is_current;

    INSERT INTO dim_customer (customer_id, name, email, city, state, country, signup_date,
                              valid_from, valid_to, is_current)
    SELECT nv.customer_id, nv.name, nv.email, nv.city, nv.state, nv.country, nv.signup_date,
           nv.version_ts,
           COALESCE(lead(nv.version_ts) OVER w, 'infinity'),
           lead(nv.version_ts) OVER w IS NULL
    FROM ca_new_versions nv
    WINDOW w AS (PARTITION BY nv.customer_id ORDER BY nv.version_ts);
    GET DIAGNOSTICS n = ROW_COUNT;
    step := 'dim_customer'; rows_affected := n; RETURN NEXT;
    new_keys := new_keys OR n > 0;
    -- the fact joins below are planned on these statistics
    IF new_keys THEN
        ANALYZE dim_customer, dim_product;
    END IF;

    /* calendar */
    SELECT ensure_dim_date(min(d), max(d)) INTO n
    FROM (SELECT (order_ts AT TIME ZONE tz)::date AS d FROM ca_batch_orders) days;
    step := 'dim_date'; rows_affected := n; RETURN NEXT;

    /*
     * The customer version in effect at a timestamp.  A timestamp older
     * than a customer's first known version belongs to that first version
     * (its range is opened to -infinity here); an id not in the dimension,
     * or a guest, is the unknown member.
     */
    CREATE TEMP TABLE ca_customer_lookup ON COMMIT DROP AS
    SELECT d.customer_id, d.customer_key,
           CASE WHEN row_number() OVER (PARTITION BY d.customer_id ORDER BY d.valid_from) = 1
                THEN '-infinity'::timestamptz ELSE d.valid_from END AS valid_from,
           d.valid_to
    FROM dim_customer d
    WHERE d.customer_key <> -1
      AND d.customer_id IN (SELECT o.customer_id FROM ca_batch_orders o);
    ANALYZE ca_customer_lookup;

    /*
     * Lines already pointing at an unknown member before this run are the
     * only ones the late-dimension repair below can change: the lines this
     * run writes are looked up in the dimensions as they now are.
     */
    unknown_before := new_keys AND EXISTS (SELECT 1 FROM fact_order_line
                                           WHERE customer_key = -1 OR product_key = -1);

    /* order lines */
    INSERT INTO fact_order_line AS f
        (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity,
         unit_price, discount, status, channel, updated_at, stage_id, load_id)
    SELECT s.order_id, s.line_number,
           COALESCE(c.customer_key, -1),
           COALESCE(p.product_key, -1),
           date_key((s.order_ts AT TIME ZONE tz)::date),
           s.order_ts, s.quantity, s.unit_price, s.discount, s.status, s.channel,
           s.updated_at, s.stage_id, s.load_id
    FROM ca_batch_orders s
    LEFT JOIN ca_customer_lookup c
           ON c.customer_id = s.customer_id AND s.order_ts >= c.valid_from AND s.order_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id
    ON CONFLICT (order_id, line_number) DO UPDATE
        SET customer_key = excluded.customer_key, product_key = excluded.product_key,
            date_key = excluded.date_key, order_ts = excluded.order_ts,
            quantity = excluded.quantity, unit_price = excluded.unit_price,
            discount = excluded.discount, status = excluded.status,
            channel = excluded.channel, updated_at = excluded.updated_at,
            stage_id = excluded.stage_id, load_id = excluded.load_id
        WHERE excluded.stage_id > f.stage_id
          AND (f.customer_key, f.product_key, f.order_ts, f.quantity, f.unit_price,
               f.discount, f.status, f.channel, f.updated_at)
              IS DISTINCT FROM
              (excluded.customer_key, excluded.product_key, excluded.order_ts, excluded.quantity,
               excluded.unit_price, excluded.discount, excluded.status, excluded.channel,
               excluded.updated_at);
    GET DIAGNOSTICS n = ROW_COUNT;
    step := 'fact_order_line'; rows_affected := n; RETURN NEXT;

    /*
     * Late-arriving dimensions: lines that were mapped to an unknown member
     * because their customer or product had not arrived yet get the real
     * key once it has.  Only needed when this run added dimension rows.
     */
    n := 0;
    IF unknown_before THEN
        WITH latest AS (
            SELECT DISTINCT ON (s.order_id, s.line_number)
                   s.order_id, s.line_number, s.customer_id, s.product_id, s.order_ts
            FROM stg_orders s
            JOIN fact_order_line f USING (order_id, line_number)
            WHERE f.customer_key = -1 OR f.product_key = -1
            ORDER BY s.order_id, s.line_number, s.stage_id DESC
        ), versions AS (
            SELECT d.customer_id, d.customer_key,
                   CASE WHEN row_number() OVER (PARTITION BY d.customer_id ORDER BY d.valid_from) = 1
                        THEN '-infinity'::timestamptz ELSE d.valid_from END AS valid_from,
                   d.valid_to
            FROM dim_customer d
            WHERE d.customer_key <> -1 AND d.customer_id IN (SELECT l.customer_id FROM latest l)
        ), resolved AS (
            SELECT l.order_id, l.line_number,
                   COALESCE(v.customer_key, -1) AS customer_key,
                   COALESCE(p.product_key, -1) AS product_key
            FROM latest l
            LEFT JOIN versions v
                   ON v.customer_id = l.customer_id AND l.order_ts >= v.valid_from AND l.order_ts < v.valid_to
            LEFT JOIN dim_product p ON p.product_id = l.product_id
        )
        UPDATE fact_order_line f
        SET customer_key = r.customer_key, product_key = r.product_key
        FROM resolved r
        WHERE f.order_id = r.order_id AND f.line_number = r.line_number
          AND (f.customer_key, f.product_key) IS DISTINCT FROM (r.customer_key, r.product_key);
        GET DIAGNOSTICS n = ROW_COUNT;
    END IF;
    step := 'late_dimension_fixes'; rows_affected := n; RETURN NEXT;

    INSERT INTO transform_state (singleton, snapshot, system_identifier, last_run_at)
    VALUES (true, snap, sysid, now())
    ON CONFLICT (singleton) DO UPDATE
        SET snapshot = excluded.snapshot,
            system_identifier = excluded.system_identifier,
            last_run_at = excluded.last_run_at;

    DROP TABLE ca_batch_products, ca_batch_customers, ca_batch_orders,
               ca_new_versions, ca_customer_lookup;

    /* clickstream events: their own snapshot, so refresh_clickstream() can run them alone */
    RETURN QUERY SELECT * FROM transform_events(full_refresh);
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.transform_events(full_refresh boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, pg_temp
AS $$
DECLARE
    saved       event_transform_state;
    snap        pg_snapshot;
    prev        pg_snapshot;
    lo          xid8;
    hi          xid8;
    own_xid     xid8;
    sysid       bigint;
    tz          text := business_timezone();
    lateness    interval := event_lateness();
    cutoff      timestamptz;
    mark        timestamptz;
    n           bigint;
    late        record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('customer_analytics.transform_events'));

    SELECT system_identifier INTO sysid FROM pg_control_system();
    SELECT * INTO saved FROM event_transform_state;
    SELECT w.snap, w.prev, w.lo, w.hi INTO snap, prev, lo, hi
    FROM ca_staged_window(saved.snapshot, saved.system_identifier, sysid, full_refresh) w;
    own_xid := pg_current_xact_id_if_assigned();
    IF prev IS NOT NULL THEN
        cutoff := saved.watermark - lateness;   -- NULL: no limit, or nothing processed yet
    END IF;

    CREATE TEMP TABLE ca_batch_events ON COMMIT DROP AS
    SELECT DISTINCT ON (s.event_id) s.*
    FROM stg_events s
    WHERE ca_newly_staged(s.staged_xid, lo, hi, snap, prev, own_xid)
    ORDER BY s.event_id, s.stage_id DESC;

    /* too late for an incremental run: leave them staged, say so */
    n := 0;
    IF cutoff IS NOT NULL THEN
        WITH gone AS (
            DELETE FROM ca_batch_events b
            WHERE b.event_ts < cutoff
              -- rows the previous run took from its own transaction come again: not late
              AND b.staged_xid IS DISTINCT FROM saved.own_xid
            RETURNING b.event_ts, b.load_id
        )
        SELECT count(*) AS events, min(event_ts) AS oldest, max(event_ts) AS newest,
               array_agg(DISTINCT load_id) FILTER (WHERE load_id IS NOT NULL) AS loads
        INTO late FROM gone;
        n := late.events;
        IF n > 0 THEN
            PERFORM raise_alert('late_events', 'stg_events',
                                jsonb_build_object('events', n, 'oldest', late.oldest,
                                                   'newest', late.newest, 'cutoff', cutoff,
                                                   'loads', late.loads),
                                severity => 'warn');
        END IF;
    END IF;
    step := 'fact_event_too_late'; rows_affected := n; RETURN NEXT;
    ANALYZE ca_batch_events;

    PERFORM ensure_dim_date(min((event_ts AT TIME ZONE tz)::date), max((event_ts AT TIME ZONE tz)::date))
    FROM ca_batch_events;

    CREATE TEMP TABLE ca_event_customers ON COMMIT DROP AS
    SELECT d.customer_id, d.customer_key,
           CASE WHEN row_number() OVER (PARTITION BY d.customer_id ORDER BY d.valid_from) = 1
                THEN '-infinity'::timestamptz ELSE d.valid_from END AS valid_from,
           d.valid_to
    FROM dim_customer d
    WHERE d.customer_key <> -1
      AND d.customer_id IN (SELECT e.customer_id FROM ca_batch_events e);
    ANALYZE ca_event_customers;

    /* anonymous stays NULL, an unknown id is -1 */
    INSERT INTO fact_event AS f
        (event_id, event_ts, date_key, customer_key, customer_id, customer_stitched, session_id,
         event_type, product_key, order_id, channel, device, stage_id, load_id)
    SELECT s.event_id, s.event_ts, date_key((s.event_ts AT TIME ZONE tz)::date),
           CASE WHEN s.customer_id IS NULL THEN NULL
                ELSE COALESCE(c.customer_key, -1) END,
           s.customer_id, false,
           s.session_id, s.event_type,
           CASE WHEN s.product_id IS NULL THEN NULL ELSE COALESCE(p.product_key, -1) END,
           s.order_id, s.channel, s.device, s.stage_id, s.load_id
    FROM ca_batch_events s
    LEFT JOIN ca_event_customers c
           ON c.customer_id = s.customer_id AND s.event_ts >= c.valid_from AND s.event_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id
    ON CONFLICT (event_id) DO UPDATE
        SET event_ts = excluded.event_ts, date_key = excluded.date_key,
            customer_key = excluded.customer_key, customer_id = excluded.customer_id,
            customer_stitched = false, session_id = excluded.session_id,
            event_type = excluded.event_type, product_key = excluded.product_key,
            order_id = excluded.order_id, channel = excluded.channel,
            device = excluded.device, stage_id = excluded.stage_id, load_id = excluded.load_id
        WHERE excluded.stage_id > f.stage_id
          AND (f.event_ts, f.customer_key, f.customer_id, f.customer_stitched, f.session_id,
               f.event_type, f.product_key, f.order_id, f.channel, f.device)
              IS DISTINCT FROM
              (excluded.event_ts, excluded.customer_key, excluded.customer_id, false,
               excluded.session_id, excluded.event_type, excluded.product_key,
               excluded.order_id, excluded.channel, excluded.device);
    GET DIAGNOSTICS n = ROW_COUNT;
    step := 'fact_event'; rows_affected := n; RETURN NEXT;

    /*
     * Identity stitching, over the whole of every session this run touched
     * (an identifying event may arrive after the anonymous ones, or before).
     * Walking a session backwards in time, each identified event opens a
     * group; the anonymous events in its group precede it and take its
     * customer.
     */
    -- only sessions where something can change: an anonymous event and an
    -- identified one, or events stitched before
    CREATE TEMP TABLE ca_stitch_sessions ON COMMIT DROP AS
    SELECT f.session_id
    FROM fact_event f
    WHERE f.session_id IN (SELECT b.session_id FROM ca_batch_events b)
    GROUP BY f.session_id
    HAVING (bool_or(f.customer_id IS NULL) AND bool_or(f.customer_id IS NOT NULL))
           OR bool_or(f.customer_stitched);
    ANALYZE ca_stitch_sessions;
    WITH sess AS (
        SELECT f.event_id, f.customer_key, f.customer_id, f.customer_stitched,
               count(*) FILTER (WHERE f.customer_id IS NOT NULL AND NOT f.customer_stitched)
                   OVER (PARTITION BY f.session_id ORDER BY f.event_ts DESC, f.event_id DESC
                         ROWS UNBOUNDED PRECEDING) AS grp,
               f.session_id
        FROM fact_event f
        WHERE f.session_id IN (SELECT c.session_id FROM ca_stitch_sessions c)
    ), linked AS (
        SELECT s.event_id, s.customer_key, s.customer_id, s.customer_stitched,
               max(s.customer_key) FILTER (WHERE s.customer_id IS NOT NULL AND NOT s.customer_stitched)
                   OVER g AS new_key,
               max(s.customer_id) FILTER (WHERE s.customer_id IS NOT NULL AND NOT s.customer_stitched)
                   OVER g AS new_id
        FROM sess s
        WINDOW g AS (PARTITION BY s.session_id, s.grp)
    )
    UPDATE fact_event f
    SET customer_key = l.new_key, customer_id = l.new_id, customer_stitched = l.new_id IS NOT NULL
    FROM linked l
    WHERE f.event_id = l.event_id
      AND (l.customer_id IS NULL OR l.customer_stitched)
      AND (l.customer_key, l.customer_id, l.customer_stitched)
          IS DISTINCT FROM (l.new_key, l.new_id, l.new_id IS NOT NULL);
    GET DIAGNOSTICS n = ROW_COUNT;
    step := 'fact_event_stitched'; rows_affected := n; RETURN NEXT;

    /* late-arriving customers: -1 becomes the version in effect */
    WITH versions AS (
        SELECT d.customer_id, d.customer_key,
               CASE WHEN row_number() OVER (PARTITION BY d.customer_id ORDER BY d.valid_from) = 1
                    THEN '-infinity'::timestamptz ELSE d.valid_from END AS valid_from,
               d.valid_to
        FROM dim_customer d
        WHERE d.customer_key <> -1
          AND d.customer_id IN (SELECT e.customer_id FROM fact_event e WHERE e.customer_key = -1)
    )
    UPDATE fact_event f
    SET customer_key = v.customer_key
    FROM versions v
    WHERE f.customer_key = -1 AND v.customer_id = f.customer_id
      AND f.event_ts >= v.valid_from AND f.event_ts < v.valid_to;
    GET DIAGNOSTICS n = ROW_COUNT;
    step := 'fact_event_late_customers'; rows_affected := n; RETURN NEXT;

    IF prev IS NULL THEN        -- a full pass: everything staged counts
        SELECT max(b.event_ts) INTO mark FROM ca_batch_events b;
    ELSE
        SELECT GREATEST(saved.watermark, max(b.event_ts)) INTO mark FROM ca_batch_events b;
    END IF;
    IF mark > now() THEN
        mark := now();
    END IF;
    INSERT INTO event_transform_state (singleton, snapshot, own_xid, system_identifier, watermark, last_run_at)
    VALUES (true, snap, own_xid, sysid, mark, now())
    ON CONFLICT (singleton) DO UPDATE
        SET snapshot = excluded.snapshot,
            own_xid = excluded.own_xid,
            system_identifier = excluded.system_identifier,
            watermark = excluded.watermark,
            last_run_at = excluded.last_run_at;

    DROP TABLE ca_batch_events, ca_event_customers, ca_stitch_sessions;
END
$$;

-- issue 21: cron_next_run() takes pg_cron's grammar and schedule_pipeline() leaves the verdict to pg_cron;
-- money_units() shows rfm's two numeric conversions side by side, for the tests
COMMENT ON FUNCTION customer_analytics.cron_next_run(text, timestamptz) IS
    'When a pg_cron schedule next fires after a time, in UTC; it accepts exactly what pg_cron accepts (five fields with names of months and days, @hourly and the other shorthands, $ and ''N seconds'' of pg_cron 1.5/1.6); NULL for @reboot and for a date that never comes';

CREATE OR REPLACE FUNCTION customer_analytics.schedule_pipeline(schedule text DEFAULT '*/15 * * * *', scope text DEFAULT 'all')
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

CREATE FUNCTION customer_analytics.money_units(amount numeric, public_api boolean)
    RETURNS bigint
    AS 'MODULE_PATHNAME', 'ca_money_units' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.money_units(numeric, boolean) IS
    'Internal, for tests: an amount in the units of 0.0001 that rfm sums, read from numeric''s stored digits (public_api false, where 128-bit integers exist) or through numeric''s public functions; an error for a NaN, an infinity, more than 4 decimals or too large a value';

-- issue 16: data time (reference_time() = end of the data unless as_of is set), credit notes,
-- the business calendar (closed_day; closed days out of the anomaly series and the forecasts),
-- the day in progress (day_in_progress(), intraday_orders(), alert_intraday())
COMMENT ON FUNCTION customer_analytics.reference_time() IS
    'The time recency, CLV and the last complete day are measured from: customer_analytics.as_of if set (''now'' is the wall clock), else the end of the data (midnight after the day of the last completed order line, business time zone), never later than now';
CREATE OR REPLACE FUNCTION customer_analytics.rfm(
    as_of           timestamptz DEFAULT customer_analytics.reference_time(),
    source          regclass    DEFAULT 'customer_analytics.fact_order_line',
    customer_column text        DEFAULT NULL,
    ts_column       text        DEFAULT NULL,
    amount_column   text        DEFAULT NULL,
    order_column    text        DEFAULT NULL)
RETURNS TABLE (customer_key bigint, customer_id text, recency_days integer, frequency bigint,
               monetary numeric, r integer, f integer, m integer, rfm_cell text, segment text)
AS 'MODULE_PATHNAME', 'ca_rfm'
LANGUAGE C STABLE PARALLEL RESTRICTED;
ALTER TABLE customer_analytics.stg_orders
    DROP CONSTRAINT stg_orders_quantity_check,
    ADD CONSTRAINT stg_orders_quantity_check CHECK (quantity <> 0),
    ADD CONSTRAINT stg_orders_credit_without_discount CHECK (quantity > 0 OR discount = 0);
ALTER TABLE customer_analytics.fact_order_line
    DROP CONSTRAINT fact_order_line_quantity_check,
    ADD CONSTRAINT fact_order_line_quantity_check CHECK (quantity <> 0),
    ADD CONSTRAINT fact_order_line_credit_without_discount CHECK (quantity > 0 OR discount = 0);

COMMENT ON COLUMN customer_analytics.fact_order_line.quantity IS
    'Units; negative on a credit note''s line (a return booked as its own line, status completed): its revenue is negative and nets against sales, it is no purchase';

CREATE OR REPLACE FUNCTION customer_analytics.refresh_sales_rollup(full_refresh boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    days date[];
    keys integer[];
BEGIN
    -- one maintainer at a time; readers of the rollups never wait
    PERFORM pg_advisory_xact_lock(hashtext('customer_analytics.refresh_sales_rollup'));
    -- take the noted days (days noted by transactions still running stay for next time)
    WITH taken AS (DELETE FROM customer_analytics.sales_dirty_day RETURNING day)
    SELECT array_agg(day) INTO days FROM taken;
    IF full_refresh OR '-infinity' = ANY (days)
       OR (NOT EXISTS (SELECT FROM customer_analytics.sales_rollup_day)
           AND EXISTS (SELECT FROM customer_analytics.fact_order_line)) THEN
        DELETE FROM customer_analytics.sales_rollup_day;
        DELETE FROM customer_analytics.sales_rollup_category;
        keys := NULL;                   -- every day
    ELSIF days IS NULL THEN
        RETURN 0;
    ELSE
        keys := ARRAY(SELECT customer_analytics.date_key(d) FROM unnest(days) d);
        DELETE FROM customer_analytics.sales_rollup_day WHERE day = ANY (days);
        DELETE FROM customer_analytics.sales_rollup_category WHERE day = ANY (days);
    END IF;

    INSERT INTO customer_analytics.sales_rollup_day (day, revenue, orders, customers)
    -- credit notes (negative quantity) net against revenue but are no
    -- orders, and their customers did not buy that day
    SELECT d.date, sum(f.revenue), count(DISTINCT f.order_id) FILTER (WHERE f.quantity > 0),
           count(DISTINCT c.customer_id) FILTER (WHERE f.customer_key <> -1 AND f.quantity > 0)
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
    JOIN customer_analytics.dim_customer c ON c.customer_key = f.customer_key
    WHERE f.status = 'completed' AND (keys IS NULL OR f.date_key = ANY (keys))
    GROUP BY d.date;

    INSERT INTO customer_analytics.sales_rollup_category (day, category, revenue, orders, units)
    SELECT d.date, p.category, sum(f.revenue), count(DISTINCT f.order_id) FILTER (WHERE f.quantity > 0), sum(f.quantity)
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
    JOIN customer_analytics.dim_product p ON p.product_key = f.product_key
    WHERE f.status = 'completed' AND (keys IS NULL OR f.date_key = ANY (keys))
    GROUP BY d.date, p.category;

    RETURN CASE WHEN keys IS NULL THEN (SELECT count(*) FROM customer_analytics.sales_rollup_day)
                ELSE cardinality(keys) END;
END
$$;
COMMENT ON FUNCTION customer_analytics.refresh_sales_rollup(boolean) IS
    'Recomputes the sales rollups for the days whose order lines changed since the last call (all days with full_refresh, after a TRUNCATE, or when the rollups are empty); returns the number of days recomputed. The pipeline calls it before refreshing daily_sales and product_category_sales';

COMMENT ON MATERIALIZED VIEW customer_analytics.daily_sales IS
    'Completed sales per day, every day from the first to the last sale (0 on a day without): revenue net of credit notes, orders (a credit note is none), distinct known customers who bought (guests not counted), average order value. Built from sales_rollup_day: run refresh_sales_rollup() first (the pipeline does)';

COMMENT ON MATERIALIZED VIEW customer_analytics.product_category_sales IS
    'Completed sales per product category and period, at two grains in one view: grain ''day'' (every day from the first to the last sale, 0 on a day without) and grain ''month'' (period_start = first day of the month, the sum of its days: an order counts on each day it has lines in the category): revenue net of credit notes, orders with a line in the category (a credit note is none), units net of returned ones. Built from sales_rollup_category';

UPDATE customer_analytics.quality_check
SET params = '{"sql": "SELECT order_id, line_number, quantity, unit_price, discount, revenue FROM customer_analytics.fact_order_line WHERE revenue < 0 AND quantity > 0"}'
WHERE name = 'no negative revenue' AND builtin;

CREATE OR REPLACE FUNCTION customer_analytics.clv_summary(as_of timestamptz)
RETURNS TABLE (customer_id text, first_purchase date, x float8, t_x float8, "T" float8, m_x float8,
               purchase_days bigint, revenue numeric)
LANGUAGE sql STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH days AS (
        SELECT c.customer_id, d.date AS day, sum(f.revenue) AS revenue, bool_or(f.quantity > 0) AS purchase
        FROM customer_analytics.fact_order_line f
        JOIN customer_analytics.dim_customer c ON c.customer_key = f.customer_key
        JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
        WHERE f.status = 'completed' AND f.customer_key <> -1 AND f.order_ts < as_of
        GROUP BY c.customer_id, d.date
    ),
    -- a day of credit notes alone is no purchase: it nets against the
    -- purchase day before it (the first one, when it comes earlier)
    numbered AS (
        SELECT days.*, GREATEST(count(*) FILTER (WHERE days.purchase)
                                    OVER (PARTITION BY days.customer_id ORDER BY days.day), 1) AS purchase_no
        FROM days
    ),
    purchases AS (
        SELECT n.customer_id, min(n.day) FILTER (WHERE n.purchase) AS day, sum(n.revenue) AS revenue
        FROM numbered n
        GROUP BY n.customer_id, n.purchase_no
        HAVING bool_or(n.purchase)
    ),
    ranked AS (
        SELECT p.*, min(p.day) OVER (PARTITION BY p.customer_id) AS first_day
        FROM purchases p
    )
    SELECT r.customer_id, r.first_day,
           (count(*) - 1)::float8,
           (max(r.day) - r.first_day)::float8,
           GREATEST((as_of AT TIME ZONE customer_analytics.business_timezone())::date - r.first_day, 0)::float8,
           NULLIF(GREATEST(avg(r.revenue) FILTER (WHERE r.day > r.first_day), 0), 0)::float8,
           count(*), sum(r.revenue)
    FROM ranked r
    GROUP BY r.customer_id, r.first_day
$$;
COMMENT ON FUNCTION customer_analytics.clv_summary(timestamptz) IS
    'Each known customer''s purchase history before as_of, in days, as BG/NBD and Gamma-Gamma take it: a purchase is a day with completed order lines other than credit notes'' (negative quantity); a day of credit notes alone nets against the purchase day before it. x = purchase days after the first, t_x = days from the first to the last, T = days from the first to as_of, m_x = mean net revenue of the repeat purchase days (NULL without any, or when they net to nothing), revenue = net revenue';

COMMENT ON FUNCTION customer_analytics.gamma_gamma_expected_value(customer_analytics.gamma_gamma_model, float8, float8) IS
    'Expected spend per future purchase of a customer with x repeat purchases of mean value m_x: p (gamma + x m_x) / (p x + q - 1); the population mean p gamma / (q - 1) when x = 0 (m_x may then be NULL). NULL for a NULL model or x, and for a NULL m_x with x > 0 (repeat purchases all returned)';

CREATE TABLE customer_analytics.closed_day (
    day     date UNIQUE,
    weekday smallint UNIQUE CHECK (weekday BETWEEN 1 AND 7),
    name    text NOT NULL CHECK (name <> ''),
    CHECK ((day IS NULL) <> (weekday IS NULL))
);
COMMENT ON TABLE customer_analytics.closed_day IS
    'The shop''s closed days: a date (a holiday, a closure) or a recurring ISO weekday (1 = Monday .. 7 = Sunday), each with a name; one row per date or weekday (a duplicate is refused). Closed days are not scored by the anomaly views, are in none of their baselines, are forecast as 0 and never alerted as forecast misses. Weekdays without any sale are closed without a row here (idle_weekdays())';
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.closed_day', '');

CREATE FUNCTION customer_analytics.idle_weekdays()
RETURNS SETOF smallint
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- from the daily rollup (a row per day with lines), not the order lines
    RETURN QUERY
    WITH trading AS (
        SELECT r.day FROM customer_analytics.sales_rollup_day r WHERE r.orders > 0
    )
    SELECT w::smallint
    FROM generate_series(1, 7) w
    WHERE (SELECT max(t.day) - min(t.day) FROM trading t) >= 27
      AND NOT EXISTS (SELECT FROM trading t WHERE extract(isodow FROM t.day) = w)
    ORDER BY 1;
END
$$;
COMMENT ON FUNCTION customer_analytics.idle_weekdays() IS
    'ISO weekdays (1 = Monday .. 7 = Sunday) on which the shop never took an order in a sales history of at least four weeks (sales_rollup_day): closed without being entered in closed_day';

CREATE FUNCTION customer_analytics.closed_days(first_day date, last_day date)
RETURNS TABLE (day date, name text)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH idle AS MATERIALIZED (
        SELECT w FROM customer_analytics.idle_weekdays() w
    )
    SELECT g.day,
           COALESCE(d.name, w.name, 'never trades on ' || trim(to_char(g.day, 'Day')))
    FROM (SELECT x::date AS day FROM generate_series(first_day, last_day, interval '1 day') x) g
    LEFT JOIN customer_analytics.closed_day d ON d.day = g.day
    LEFT JOIN customer_analytics.closed_day w ON w.weekday = extract(isodow FROM g.day)
    WHERE d.day IS NOT NULL OR w.weekday IS NOT NULL
       OR extract(isodow FROM g.day) IN (SELECT i.w FROM idle i)
$$;
COMMENT ON FUNCTION customer_analytics.closed_days(date, date) IS
    'The closed days from first_day to last_day with their names: the dates and weekdays of closed_day and the weekdays on which the shop never trades (idle_weekdays())';

/*
 * The day in progress.  The last day of the data is not a whole day while
 * it is today (a live shop's morning), nor when it stops well before the
 * hour its weekday usually does (an export cut at noon): scored as a whole
 * day it would be a "drop" every morning.  Usual: the earliest last order
 * of the same weekday over the 8 weeks before, less an hour of slack.
 */
CREATE FUNCTION customer_analytics.day_in_progress()
RETURNS date
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tz text := customer_analytics.business_timezone();
    last_ts timestamptz;
    last_day date;
    usual interval;
BEGIN
    -- through the order_ts index: the newest lines, then one day at a time
    SELECT max(f.order_ts) INTO last_ts FROM customer_analytics.fact_order_line f WHERE f.status = 'completed';
    IF last_ts IS NULL THEN
        RETURN NULL;
    END IF;
    last_day := (last_ts AT TIME ZONE tz)::date;
    IF last_day >= (now() AT TIME ZONE tz)::date THEN
        RETURN last_day;
    END IF;
    SELECT min(x.t) INTO usual
    FROM generate_series(1, 8) k
    CROSS JOIN LATERAL (
        SELECT max(f.order_ts AT TIME ZONE tz) - (last_day - 7 * k)::timestamp AS t
        FROM customer_analytics.fact_order_line f
        WHERE f.status = 'completed'
          AND f.order_ts >= (last_day - 7 * k)::timestamp AT TIME ZONE tz
          AND f.order_ts < (last_day - 7 * k + 1)::timestamp AT TIME ZONE tz
    ) x;
    IF (last_ts AT TIME ZONE tz) - last_day::timestamp < usual - interval '1 hour' THEN
        RETURN last_day;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION customer_analytics.day_in_progress() IS
    'The last day with completed order lines when it is not a whole day yet: it is today (business time zone), or its last line came more than an hour earlier than on any of the same weekdays of the 8 weeks before (an export cut during the day); else NULL. The anomaly series and the forecasts leave it out';

-- closed days and the day in progress are left out: not scored, and in no
-- baseline
CREATE OR REPLACE VIEW customer_analytics.order_count_series AS
WITH closed AS MATERIALIZED (
    SELECT c.day FROM customer_analytics.closed_days((SELECT min(r.day) FROM customer_analytics.sales_rollup_day r),
                                                     (SELECT max(r.day) FROM customer_analytics.sales_rollup_day r)) c
    UNION ALL
    SELECT p.day FROM customer_analytics.day_in_progress() p(day) WHERE p.day IS NOT NULL
)
SELECT category AS series, period_start::timestamp AT TIME ZONE 'UTC' AS ts, orders
FROM customer_analytics.product_category_sales
WHERE grain = 'day' AND period_start NOT IN (SELECT day FROM closed)
UNION ALL
SELECT 'total', day::timestamp AT TIME ZONE 'UTC', orders
FROM customer_analytics.daily_sales
WHERE day NOT IN (SELECT day FROM closed);
COMMENT ON VIEW customer_analytics.order_count_series IS
    'Daily order counts per product category and for the whole shop (series ''total''), closed days (closed_days()) and the day in progress (day_in_progress()) left out: what the anomalies view scores';

DROP MATERIALIZED VIEW customer_analytics.sales_forecast;
CREATE MATERIALIZED VIEW customer_analytics.sales_forecast AS
WITH closed AS MATERIALIZED (
    SELECT c.day FROM customer_analytics.closed_days(customer_analytics.sales_training_start(),
                                                     customer_analytics.sales_training_end() + 28) c
),
-- fitted on open days (a closed day is NULL: no observation)
m AS (
    SELECT s.scope, s.category,
           customer_analytics.holt_winters(s.day, CASE WHEN s.day NOT IN (SELECT c.day FROM closed c) THEN s.revenue END)
               AS model
    FROM customer_analytics.sales_series(customer_analytics.sales_training_start(),
                                         customer_analytics.sales_training_end()) s
    GROUP BY s.scope, s.category
)
SELECT m.scope, m.category, f.ts AS day,
       CASE WHEN x.closed THEN 0 ELSE f.yhat END AS revenue,
       CASE WHEN x.closed THEN 0 ELSE f.lo END AS revenue_lo,
       CASE WHEN x.closed THEN 0 ELSE f.hi END AS revenue_hi,
       (m.model).last_ts AS trained_through, (m.model).alpha, (m.model).beta, (m.model).gamma,
       (m.model).residual_sd
FROM m
CROSS JOIN LATERAL customer_analytics.forecast(m.model, 28, 0.95) f
CROSS JOIN LATERAL (SELECT f.ts IN (SELECT c.day FROM closed c) AS closed) x
WHERE m.model IS NOT NULL;
CREATE UNIQUE INDEX sales_forecast_key_idx ON customer_analytics.sales_forecast (scope, category, day);
COMMENT ON MATERIALIZED VIEW customer_analytics.sales_forecast IS
    'Revenue forecast for the 28 days after sales_training_end(), overall (scope ''total'', category ''(all)'') and per category: Holt-Winters with weekly seasonality fitted on the open days of all history, with a 95% prediction interval [revenue_lo, revenue_hi]; 0 on closed days (closed_days()). Accuracy: sales_forecast_accuracy';

CREATE OR REPLACE FUNCTION customer_analytics.sales_forecast_backtest(
    last_day date DEFAULT NULL, holdout integer DEFAULT 28, first_day date DEFAULT NULL)
RETURNS TABLE (scope text, category text, trained_through date, holdout_days integer,
               scored_days integer, mape_holt_winters float8, mape_seasonal_naive float8,
               improvement float8, alpha float8, beta float8, gamma float8)
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lo date := COALESCE(first_day, customer_analytics.sales_training_start());
    hi date := COALESCE(last_day, customer_analytics.sales_training_end());
BEGIN
    IF holdout IS NULL OR holdout < 1 THEN
        RAISE EXCEPTION 'holdout must be at least 1 day, not %', holdout
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH s AS (
        SELECT * FROM customer_analytics.sales_series(lo, hi)
    ),
    closed AS MATERIALIZED (
        SELECT c.day FROM customer_analytics.closed_days(lo, hi) c
    ),
    -- fitted on open days (a closed day is NULL: no observation)
    m AS (
        SELECT s.scope, s.category,
               customer_analytics.holt_winters(s.day, CASE WHEN s.day NOT IN (SELECT c.day FROM closed c) THEN s.revenue END)
                   AS model
        FROM s WHERE s.day <= hi - holdout
        GROUP BY s.scope, s.category
    ),
    scored AS (
        SELECT m.scope, m.category, (m.model).last_ts, (m.model).alpha, (m.model).beta,
               (m.model).gamma, a.revenue AS actual,
               CASE WHEN f.ts IN (SELECT c.day FROM closed c) THEN 0 ELSE f.yhat END AS yhat,
               -- seasonal naive: the same weekday in the last week of training
               (SELECT n.revenue FROM s n
                WHERE n.scope = m.scope AND n.category = m.category
                  AND n.day = (m.model).last_ts - 7 + 1 + ((f.ts - (m.model).last_ts - 1) % 7)) AS naive
        FROM m
        CROSS JOIN LATERAL customer_analytics.forecast(m.model, holdout) f
        JOIN s a ON a.scope = m.scope AND a.category = m.category AND a.day = f.ts
        WHERE m.model IS NOT NULL
    )
    SELECT sc.scope, sc.category, min(sc.last_ts), holdout,
           count(*) FILTER (WHERE sc.actual > 0)::integer,
           100 * avg(abs(sc.actual - sc.yhat) / sc.actual) FILTER (WHERE sc.actual > 0),
           100 * avg(abs(sc.actual - sc.naive) / sc.actual) FILTER (WHERE sc.actual > 0),
           1 - avg(abs(sc.actual - sc.yhat) / sc.actual) FILTER (WHERE sc.actual > 0)
               / NULLIF(avg(abs(sc.actual - sc.naive) / sc.actual) FILTER (WHERE sc.actual > 0), 0),
           min(sc.alpha), min(sc.beta), min(sc.gamma)
    FROM scored sc
    GROUP BY sc.scope, sc.category;
END
$$;
COMMENT ON FUNCTION customer_analytics.sales_forecast_backtest(date, integer, date) IS
    'Backtest of the sales forecast: for the total and each category, Holt-Winters is fitted on the open days up to last_day - holdout and forecasts the holdout days (0 on closed days); returns the mean absolute percentage error (in %, over the days with sales) of that forecast and of the seasonal-naive forecast (same weekday of the last training week), and improvement = 1 - mape_holt_winters / mape_seasonal_naive';

CREATE OR REPLACE FUNCTION customer_analytics.alert_forecast_misses()
RETURNS TABLE (alert_id bigint, category text, day date, actual float8, forecast float8,
               lower_bound float8, miss float8)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    done date := customer_analytics.sales_training_end();
    first_day date;
BEGIN
    SELECT min(f.day) INTO first_day FROM customer_analytics.sales_forecast f;
    IF first_day IS NULL OR done IS NULL OR done < first_day THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH actual AS (
        SELECT s.scope, s.category, s.day, s.revenue
        FROM customer_analytics.sales_series(first_day, done) s
    ),
    missed AS (
        SELECT f.scope, f.category, f.day, COALESCE(a.revenue, 0) AS actual,
               f.revenue AS forecast, f.revenue_lo AS lower_bound
        FROM customer_analytics.sales_forecast f
        LEFT JOIN actual a ON a.scope = f.scope AND a.category = f.category AND a.day = f.day
        WHERE f.day <= done AND COALESCE(a.revenue, 0) < f.revenue_lo
          AND f.day NOT IN (SELECT c.day FROM customer_analytics.closed_days(first_day, done) c)
    )
    SELECT r.alert_id, r.category, r.day, r.actual, r.forecast, r.lower_bound, r.miss
    FROM (
        SELECT customer_analytics.raise_alert(
                   'forecast_miss',
                   x.category,
                   jsonb_build_object('day', x.day, 'scope', x.scope, 'category', x.category,
                                      'actual', round(x.actual::numeric, 2),
                                      'forecast', round(x.forecast::numeric, 2),
                                      'lower_bound', round(x.lower_bound::numeric, 2),
                                      'miss', round((x.lower_bound - x.actual)::numeric, 2),
                                      'shortfall_vs_forecast', round((x.forecast - x.actual)::numeric, 2),
                                      'shortfall_pct', round((100 * (x.forecast - x.actual) / NULLIF(x.forecast, 0))::numeric, 1)),
                   'forecast_miss:' || x.scope || ':' || x.category || ':' || x.day,
                   'warn') AS alert_id,
               x.category, x.day, x.actual, x.forecast, x.lower_bound,
               x.lower_bound - x.actual AS miss
        FROM missed x
        ORDER BY x.day, x.scope DESC, x.category
    ) r
    WHERE r.alert_id IS NOT NULL;
END
$$;
COMMENT ON FUNCTION customer_analytics.alert_forecast_misses() IS
    'Compare the complete days of sales since sales_forecast was refreshed with its forecast; every day and series (total or category) whose revenue fell below the lower bound raises one forecast_miss alert (closed days never) (with the actual, the forecast, the bound and the size of the miss). Returns the alerts raised now. Call it after loading, before refreshing sales_forecast';

COMMENT ON AGGREGATE customer_analytics.holt_winters(date, float8) IS
    'Additive Holt-Winters model (damped additive trend, weekly seasonality) of a daily series, rows in any order: values of the same day are summed, a day without rows counts as 0, a NULL value closes its day (no observation: the state runs over it unchanged), a NULL day is skipped; alpha, beta, gamma in [0, 1] and the damping phi in [0.8, 1] fitted by minimising the one-step squared error (Nelder-Mead). NULL when the series spans fewer than two periods, or its first or second period is closed throughout';

COMMENT ON TYPE customer_analytics.hw_model IS
    'A fitted additive Holt-Winters model of a daily series: period, smoothing parameters alpha (level), beta (trend), gamma (season), trend damping phi (1 = undamped), the final level and trend (per day), seasonals[k] = seasonal term of day last_ts + k (k = 1 .. period), sum of squared one-step errors after the first period (sse), days in the series (n), its first and last day, and the residual standard deviation sqrt(sse / the open days after the first period)';

CREATE OR REPLACE FUNCTION customer_analytics.sales_training_end()
RETURNS date
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    -- the newest line through the order_ts index: its day is its date_key's
    SELECT LEAST((customer_analytics.reference_time() AT TIME ZONE customer_analytics.business_timezone())::date - 1,
                 (SELECT (max(f.order_ts) AT TIME ZONE customer_analytics.business_timezone())::date
                  FROM customer_analytics.fact_order_line f),
                 customer_analytics.day_in_progress() - 1)
$$;
COMMENT ON FUNCTION customer_analytics.sales_training_end() IS
    'Last complete day of sales: the day before reference_time() (setting customer_analytics.as_of, else the end of the data) in the business time zone, or the last day with order lines if that is earlier, never the day in progress (day_in_progress())';

/*
 * Scoring the day in progress as it goes: the orders placed so far today,
 * and in the last hour, against the same hours of the same weekday over
 * the 8 weeks before (their median: one week's flash sale or outage does
 * not move it).  An outage shows as an hour without the orders that hour
 * usually brings, long before the day could be judged whole.  A Poisson
 * lower tail below 0.001 flags it; an hour usually holding fewer than 3
 * orders is too quiet to tell.
 */
CREATE FUNCTION customer_analytics.intraday_orders(at timestamptz DEFAULT now())
RETURNS TABLE (day date, hour_end time, orders_so_far bigint, expected_so_far float8,
               orders_last_hour bigint, expected_last_hour float8, p_value float8, outage boolean)
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tz text := customer_analytics.business_timezone();
    local_at timestamp := at AT TIME ZONE tz;
    today date := (at AT TIME ZONE tz)::date;
    since_midnight interval := (at AT TIME ZONE tz) - (at AT TIME ZONE tz)::date;
    p_day float8;
    p_hour float8;
BEGIN
    IF today IN (SELECT c.day FROM customer_analytics.closed_days(today, today) c) THEN
        RETURN;
    END IF;
    WITH days AS (
        SELECT today - 7 * k AS d FROM generate_series(0, 8) k
    ),
    counted AS (
        SELECT x.d,
               (SELECT count(DISTINCT f.order_id) FROM customer_analytics.fact_order_line f
                WHERE f.status = 'completed' AND f.quantity > 0
                  AND f.order_ts >= x.d::timestamp AT TIME ZONE tz
                  AND f.order_ts < (x.d + since_midnight) AT TIME ZONE tz) AS so_far,
               (SELECT count(DISTINCT f.order_id) FROM customer_analytics.fact_order_line f
                WHERE f.status = 'completed' AND f.quantity > 0
                  AND f.order_ts >= (x.d + since_midnight - interval '1 hour') AT TIME ZONE tz
                  AND f.order_ts >= x.d::timestamp AT TIME ZONE tz
                  AND f.order_ts < (x.d + since_midnight) AT TIME ZONE tz) AS last_hour
        FROM days x
        WHERE x.d = today
           OR x.d NOT IN (SELECT c.day FROM customer_analytics.closed_days(today - 56, today - 7) c)
    )
    SELECT today, local_at::time,
           (SELECT c.so_far FROM counted c WHERE c.d = today),
           (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY c.so_far) FROM counted c WHERE c.d < today),
           (SELECT c.last_hour FROM counted c WHERE c.d = today),
           (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY c.last_hour) FROM counted c WHERE c.d < today)
    INTO day, hour_end, orders_so_far, expected_so_far, orders_last_hour, expected_last_hour;
    IF expected_so_far IS NULL THEN
        RETURN;                 -- no history for this weekday yet
    END IF;
    p_day := customer_analytics.poisson_lower_tail(orders_so_far, expected_so_far);
    p_hour := CASE WHEN expected_last_hour >= 3
                   THEN customer_analytics.poisson_lower_tail(orders_last_hour, expected_last_hour) ELSE 1 END;
    p_value := LEAST(p_day, p_hour);
    outage := p_value < 0.001 AND GREATEST(expected_so_far, expected_last_hour) >= 3;
    RETURN NEXT;
END
$$;
COMMENT ON FUNCTION customer_analytics.intraday_orders(timestamptz) IS
    'The day in progress scored as it goes, at a time (default now): orders so far that day and in the hour before, against the median of the same hours of the same weekday over the 8 weeks before (closed days left out); p_value = the smaller Poisson lower tail of the two, outage when it is below 0.001. No row on a closed day or without history';

CREATE FUNCTION customer_analytics.poisson_lower_tail(k bigint, lambda float8)
RETURNS float8
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    -- P(X <= k) for X ~ Poisson(lambda), summed in logs (no overflow)
    SELECT CASE WHEN lambda <= 0 THEN 1.0
                WHEN k >= lambda THEN 1.0   -- not a shortfall: no need to sum
                ELSE LEAST(1.0, (SELECT sum(exp(-lambda + i * ln(lambda)
                                               - COALESCE((SELECT sum(ln(j)) FROM generate_series(1, i) j), 0)))
                                 FROM generate_series(0, k) i)) END
$$;
COMMENT ON FUNCTION customer_analytics.poisson_lower_tail(bigint, float8) IS
    'P(X <= k) for X Poisson with mean lambda (1 when k >= lambda: no shortfall); what intraday_orders() scores a count with';

CREATE FUNCTION customer_analytics.alert_intraday(at timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    i record;
BEGIN
    SELECT * INTO i FROM customer_analytics.intraday_orders(at);
    IF i IS NULL OR NOT i.outage THEN
        RETURN 0;
    END IF;
    -- one alert per day: the first run that sees the outage raises it
    RETURN (customer_analytics.raise_alert(
        'intraday_drop', 'total',
        jsonb_build_object('day', i.day, 'at', i.hour_end, 'orders_so_far', i.orders_so_far,
                           'expected_so_far', round(i.expected_so_far::numeric, 1),
                           'orders_last_hour', i.orders_last_hour,
                           'expected_last_hour', round(i.expected_last_hour::numeric, 1),
                           'p_value', i.p_value),
        'intraday_drop:' || i.day, 'warn') IS NOT NULL)::integer;
END
$$;
COMMENT ON FUNCTION customer_analytics.alert_intraday(timestamptz) IS
    'Raise an intraday_drop alert (once a day) when intraday_orders(at) finds an outage in the day in progress; returns the number raised (0 or 1). The pipeline calls it after transform()';

INSERT INTO customer_analytics.pipeline_task (task, command, depends_on, ordinal, builtin) VALUES
    ('intraday alerts', 'SELECT customer_analytics.alert_intraday()', '{transform}', 36, true);

-- issue 20: count-aware anomaly detection (method count, p_value, exposure)
-- and the anomalies view on it.  detect_anomalies() gains a column, so it
-- is dropped and created again, and the view that reads it with it.
DROP MATERIALIZED VIEW customer_analytics.anomalies;
DROP FUNCTION customer_analytics.detect_anomalies(text, text, integer, float8, integer, text, float8, integer, text);
DROP FUNCTION customer_analytics.detect_anomalies(regclass, text, text, text, text, integer, float8, integer, text, float8, integer, text);
CREATE FUNCTION customer_analytics.detect_anomalies(
    query               text,
    method              text    DEFAULT 'seasonal',
    window_size         integer DEFAULT 28,
    threshold           float8  DEFAULT NULL,
    min_history         integer DEFAULT 28,
    direction           text    DEFAULT 'both',
    min_relative_change float8  DEFAULT 0,
    seasons             integer DEFAULT 4,
    scale               text    DEFAULT 'linear')
RETURNS TABLE (series text, ts timestamptz, value float8, expected float8, z float8,
               robust_z float8, direction text, is_anomaly boolean, p_value float8)
AS 'MODULE_PATHNAME', 'ca_detect_anomalies_query_v2'
LANGUAGE C STABLE PARALLEL RESTRICTED;
COMMENT ON FUNCTION customer_analytics.detect_anomalies(text, text, integer, float8, integer, text, float8, integer, text) IS
    'Score every point of the series a query returns (columns: series key, timestamp, value, and optionally the exposure: the fraction of the period observed, 0 = not scored) against a baseline that never includes the point: method trailing (mean and z over the window_size previous points), robust (median and robust z over them), seasonal (the median of the same weekday in the previous seasons weeks, then the z and robust z of the residual over the window; both must pass; on the chosen scale: linear, sqrt or log) or count (whole counts: expected = level of the previous seasons weeks x weekday profile of the window_size previous periods, two-sided negative binomial tail probability p_value, its variance the baseline''s own uncertainty plus the overdispersion of the window when Pearson''s statistic shows it, Poisson otherwise; z is its normal score). Flags points whose |z| passes threshold (default customer_analytics.zscore_threshold; for the count method p_value <= customer_analytics.anomaly_false_alarms_per_year / points a year) in the wanted direction (both, spike, drop), after min_history earlier points, when they differ from the expected value by at least min_relative_change of it';

CREATE FUNCTION customer_analytics.detect_anomalies(
    source              regclass,
    series_column       text,
    ts_column           text,
    value_column        text,
    method              text    DEFAULT 'seasonal',
    window_size         integer DEFAULT 28,
    threshold           float8  DEFAULT NULL,
    min_history         integer DEFAULT 28,
    direction           text    DEFAULT 'both',
    min_relative_change float8  DEFAULT 0,
    seasons             integer DEFAULT 4,
    scale               text    DEFAULT 'linear',
    exposure_column     text    DEFAULT NULL)
RETURNS TABLE (series text, ts timestamptz, value float8, expected float8, z float8,
               robust_z float8, direction text, is_anomaly boolean, p_value float8)
AS 'MODULE_PATHNAME', 'ca_detect_anomalies_table_v2'
LANGUAGE C STABLE PARALLEL RESTRICTED;
COMMENT ON FUNCTION customer_analytics.detect_anomalies(regclass, text, text, text, text, integer, float8, integer, text, float8, integer, text, text) IS
    'detect_anomalies() over a table or view: name its series key, timestamp and value columns (and optionally the exposure column)';

CREATE MATERIALIZED VIEW customer_analytics.anomalies AS
SELECT a.series, (a.ts AT TIME ZONE 'UTC')::date AS day, a.value::bigint AS orders,
       round(a.expected::numeric, 1) AS expected, a.z, a.p_value, a.direction
FROM customer_analytics.detect_anomalies('customer_analytics.order_count_series'::regclass, 'series', 'ts', 'orders',
        method => 'count', window_size => 112, seasons => 8) a
WHERE a.is_anomaly;
CREATE UNIQUE INDEX anomalies_series_day_idx ON customer_analytics.anomalies (series, day);
COMMENT ON MATERIALIZED VIEW customer_analytics.anomalies IS
    'Days with an anomalous number of orders, per product category and for the shop as a whole (series ''total''): detect_anomalies() with the count method (expected orders from the level of the 8 previous weeks and the weekday profile of the 112 previous days; p_value: two-sided negative binomial tail probability; z: its normal score), flagged when p_value <= customer_analytics.anomaly_false_alarms_per_year / 365.25. Built on daily_sales and product_category_sales: refresh those first (refresh_sales_views() does all three)';

CREATE OR REPLACE FUNCTION customer_analytics.alert_new_anomalies()
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a record;
    raised integer := 0;
BEGIN
    FOR a IN SELECT * FROM customer_analytics.anomalies an
             WHERE NOT EXISTS (SELECT FROM customer_analytics.alert al
                               WHERE al.dedup_key = 'anomaly:' || an.series || ':' || an.day)
             ORDER BY day, series LOOP
        IF customer_analytics.raise_alert(
               'anomaly', a.series,
               jsonb_build_object('day', a.day, 'orders', a.orders, 'expected', a.expected,
                                  'z', round(a.z::numeric, 2), 'p_value', to_char(a.p_value, '9.99EEEE')::numeric,
                                  'direction', a.direction),
               'anomaly:' || a.series || ':' || a.day) IS NOT NULL THEN
            raised := raised + 1;
        END IF;
    END LOOP;
    RETURN raised;
END
$$;
COMMENT ON FUNCTION customer_analytics.alert_new_anomalies()
    IS 'Raise an alert (kind anomaly, NOTIFY customer_analytics_alerts) for every row of the anomalies view not alerted before (one alert per series and day, ever: dedup_key anomaly:<series>:<day>); returns how many were raised';

-- issue 18: what a BG/NBD fit is (degenerate data says so)
CREATE FUNCTION customer_analytics.bgnbd_fit_status(model customer_analytics.bgnbd_model)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    -- a degenerate history says so here rather than through parameters
    -- at the edge of their range: without repeat purchases bgnbd_fit fits
    -- nothing; without dropout its limit is a / (a + b) -> 0
    SELECT CASE WHEN model IS NULL OR (model).customers IS NULL THEN 'no customers'
                WHEN (model).r IS NULL THEN 'no repeat purchases'
                WHEN (model).a / ((model).a + (model).b) < 1e-4 THEN 'no dropout observed'
                ELSE 'fitted' END
$$;
COMMENT ON FUNCTION customer_analytics.bgnbd_fit_status(customer_analytics.bgnbd_model) IS
    'What a bgnbd_fit result is: fitted; no customers (NULL); no repeat purchases (no parameters: nothing to fit); no dropout observed (a / (a + b) below 1e-4: the fit went to the limit where everyone is alive)';

-- issue 15: pipeline_plan() keeps each step's dependencies in their declared
-- order (a semi-join returned them in the planner's order, which differs on 18)
CREATE OR REPLACE FUNCTION customer_analytics.pipeline_plan(scope text DEFAULT 'all')
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

-- issue 22: checks over what changed (check_change queue, run_checks(full), incremental built-in checks)
ALTER TABLE customer_analytics.quality_result ADD COLUMN incremental boolean;
COMMENT ON COLUMN customer_analytics.quality_result.incremental IS
    'The check ran over the rows changed since the previous pass only (false: over whole tables)';
COMMENT ON TABLE customer_analytics.quality_check IS
    'Data-quality checks (dbt tests): not_null, unique (column_name may list several), relationship (params: to, field), accepted_values (params: values), freshness (params: max_age), row_count_change (params: days, threshold), custom (params: sql returning the failing rows; incremental_sql, optional: the failing rows among what changed, reading changed_rows()). An error-severity failure stops the refresh of the views built on its target';
UPDATE customer_analytics.quality_check SET params = '{"sql": "SELECT f.order_id, f.line_number, f.order_ts, c.valid_from, c.valid_to FROM customer_analytics.dim_customer c CROSS JOIN LATERAL (SELECT l.order_id, l.line_number, l.order_ts FROM customer_analytics.fact_order_line l WHERE l.customer_key = c.customer_key AND NOT (l.order_ts >= c.valid_from AND l.order_ts < c.valid_to) OFFSET 0) f WHERE c.customer_key <> -1 AND EXISTS (SELECT FROM customer_analytics.dim_customer v WHERE v.customer_id = c.customer_id AND v.valid_from < c.valid_from)", "incremental_sql": "SELECT l.order_id, l.line_number, l.order_ts, c.valid_from, c.valid_to FROM customer_analytics.changed_rows(NULL::customer_analytics.fact_order_line) l JOIN customer_analytics.dim_customer c ON c.customer_key = l.customer_key WHERE c.customer_key <> -1 AND NOT (l.order_ts >= c.valid_from AND l.order_ts < c.valid_to) AND EXISTS (SELECT FROM customer_analytics.dim_customer v WHERE v.customer_id = c.customer_id AND v.valid_from < c.valid_from) UNION SELECT f.order_id, f.line_number, f.order_ts, c.valid_from, c.valid_to FROM customer_analytics.dim_customer c CROSS JOIN LATERAL (SELECT l.order_id, l.line_number, l.order_ts FROM customer_analytics.fact_order_line l WHERE l.customer_key = c.customer_key AND NOT (l.order_ts >= c.valid_from AND l.order_ts < c.valid_to) OFFSET 0) f WHERE c.customer_key <> -1 AND c.customer_id IN (SELECT customer_id FROM customer_analytics.changed_rows(NULL::customer_analytics.dim_customer)) AND EXISTS (SELECT FROM customer_analytics.dim_customer v WHERE v.customer_id = c.customer_id AND v.valid_from < c.valid_from)"}' WHERE name = 'order line has its customer version' AND builtin;
UPDATE customer_analytics.quality_check SET params = '{"sql": "SELECT order_id, line_number, quantity, unit_price, discount, revenue FROM customer_analytics.fact_order_line WHERE revenue < 0 AND quantity > 0", "incremental_sql": "SELECT order_id, line_number, quantity, unit_price, discount, revenue FROM customer_analytics.changed_rows(NULL::customer_analytics.fact_order_line) WHERE revenue < 0 AND quantity > 0"}' WHERE name = 'no negative revenue' AND builtin;
DROP FUNCTION customer_analytics.run_checks(bigint, text);
/*
 * Checks over what changed.
 *
 * A scheduled run appends a day to a history of years: checking every row
 * of every table at each run would make the checks grow with the history.
 * So statement triggers on the tables the built-in checks read queue the
 * primary keys of the rows each statement wrote (and the old contents of
 * rows it updated or deleted) in check_change, in the writer's own
 * transaction.  run_checks() takes that queue with DELETE ... RETURNING
 * after taking its lock: a change is consumed only once its rows are
 * visible to the checks that follow, and a writer still open keeps its
 * changes queued for the next run (snapshot-safe, like rfm_new_line).
 *
 * A check runs over the changes only when its previous result is known to
 * hold for everything older: it passed at the previous pass of the checks,
 * its definition did not change since, and its last full run is younger
 * than customer_analytics.full_checks_interval.  Otherwise it runs over
 * whole tables (and a check that failed stays full until it passes, so a
 * run reports the same failing rows either way).
 */
CREATE TABLE customer_analytics.check_change (
    rel     regclass NOT NULL,
    op      "char" NOT NULL CHECK (op IN ('n', 'o', 'T')),
    key     jsonb,
    old_row jsonb
);
CREATE INDEX check_change_rel_idx ON customer_analytics.check_change (rel, op);
COMMENT ON TABLE customer_analytics.check_change IS
    'Rows written since the checks last ran, queued by statement triggers (track_check_changes): op n is a row inserted or updated (key: its primary key), o a row as it was before an update or delete (old_row), T the whole table (truncated, or a statement too big to queue row by row). Consumed by run_checks(); not dumped: the first run after a restore checks everything';

CREATE TABLE customer_analytics.quality_check_progress (
    check_name text PRIMARY KEY REFERENCES customer_analytics.quality_check ON DELETE CASCADE ON UPDATE CASCADE,
    pass_no    bigint NOT NULL,
    definition text NOT NULL,
    passed     boolean NOT NULL,
    full_at    timestamptz NOT NULL,
    state      jsonb
);
COMMENT ON TABLE customer_analytics.quality_check_progress IS
    'Per check: the pass of run_checks() that last ran it, the definition it ran (md5), whether it passed, when it last ran over whole tables, and what an incremental run carries over (freshness: the newest value). Derived: not dumped';

CREATE SEQUENCE customer_analytics.check_pass_seq;
COMMENT ON SEQUENCE customer_analytics.check_pass_seq IS
    'Numbers the passes of run_checks() that consume check_change';

/* The primary key columns of a table, in key order */
CREATE FUNCTION customer_analytics.ca_key_columns(rel regclass)
RETURNS text[]
LANGUAGE sql STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT array_agg(a.attname::text ORDER BY k.n)
    FROM pg_index i
    CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, n)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = rel AND i.indisprimary
$$;
COMMENT ON FUNCTION customer_analytics.ca_key_columns(regclass) IS
    'Internal: the primary key columns of a table (how check_change names a row)';

CREATE FUNCTION customer_analytics.ca_note_check_change()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    keyexpr text;
    n bigint;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM customer_analytics.check_change WHERE rel = TG_RELID;
        INSERT INTO customer_analytics.check_change (rel, op) VALUES (TG_RELID, 'T');
        RETURN NULL;
    END IF;
    -- a table already due for a whole check needs no detail
    IF EXISTS (SELECT FROM customer_analytics.check_change WHERE rel = TG_RELID AND op = 'T') THEN
        RETURN NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT count(*) INTO n FROM new_rows;
        -- a first load or a backfill: checking the whole table once costs
        -- less than queuing and reading back a million keys
        IF n > 1000000 THEN
            DELETE FROM customer_analytics.check_change WHERE rel = TG_RELID;
            INSERT INTO customer_analytics.check_change (rel, op) VALUES (TG_RELID, 'T');
            RETURN NULL;
        END IF;
        SELECT 'jsonb_build_object(' || string_agg(format('%L, r.%I', c, c), ', ') || ')' INTO keyexpr
        FROM unnest(customer_analytics.ca_key_columns(TG_RELID)) c;
        EXECUTE format('INSERT INTO customer_analytics.check_change (rel, op, key) SELECT $1, ''n'', %s FROM new_rows r',
                       keyexpr) USING TG_RELID;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO customer_analytics.check_change (rel, op, old_row)
        SELECT TG_RELID, 'o', to_jsonb(r) FROM old_rows r;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION customer_analytics.ca_note_check_change() IS
    'Internal: statement trigger queuing in check_change the rows a statement wrote, for the checks over what changed';

CREATE FUNCTION customer_analytics.track_check_changes(rel regclass)
RETURNS void
LANGUAGE plpgsql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t text;
BEGIN
    IF customer_analytics.ca_key_columns(rel) IS NULL THEN
        RAISE EXCEPTION 'table % has no primary key', rel
            USING ERRCODE = 'invalid_table_definition',
                  DETAIL = 'Changed rows are queued by their primary key.',
                  HINT = 'Add a primary key, or leave the table untracked: its checks then run over the whole table.';
    END IF;
    t := (SELECT c.relname FROM pg_class c WHERE c.oid = rel);
    EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics.ca_note_check_change()', t || '_check_change_ins', rel);
    EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics.ca_note_check_change()', t || '_check_change_upd', rel);
    EXECUTE format('CREATE TRIGGER %I AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics.ca_note_check_change()', t || '_check_change_del', rel);
    EXECUTE format('CREATE TRIGGER %I AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics.ca_note_check_change()', t || '_check_change_trunc', rel);
    -- what happened before the triggers is unknown: the first pass reads it all
    INSERT INTO customer_analytics.check_change (rel, op) VALUES (rel, 'T');
END
$$;
COMMENT ON FUNCTION customer_analytics.track_check_changes(regclass) IS
    'Queues the changes of a table (with a primary key) for the checks over what changed: statement triggers write check_change. The built-in targets are tracked already; an untracked table''s checks run over all its rows';

SELECT customer_analytics.track_check_changes(t)
FROM unnest(ARRAY['customer_analytics.fact_order_line', 'customer_analytics.fact_event',
                  'customer_analytics.dim_customer', 'customer_analytics.dim_product']::regclass[]) t;

CREATE FUNCTION customer_analytics.ca_tracked(rel regclass)
RETURNS boolean
LANGUAGE sql STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = rel AND NOT t.tgisinternal AND t.tgenabled <> 'D'
                     AND t.tgfoid = 'customer_analytics.ca_note_check_change()'::regprocedure AND t.tgtype & 4 <> 0)
$$;
COMMENT ON FUNCTION customer_analytics.ca_tracked(regclass) IS
    'Internal: whether the inserts into a table are queued in check_change';

/*
 * The rows of a table that the running pass of the checks has to look at:
 * inside run_checks(), those inserted or updated since the previous pass;
 * anywhere else (or for a table whose changes are not tracked, or that
 * must be checked whole), every row.  Incremental custom checks read their
 * table through it.
 */
CREATE FUNCTION customer_analytics.changed_rows(tbl anyelement)
RETURNS SETOF anyelement
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_rel oid := (SELECT t.typrelid FROM pg_type t WHERE t.oid = pg_typeof(tbl));
    rel regclass;
    keys text[];
BEGIN
    IF target_rel IS NULL OR target_rel = 0 THEN
        RAISE EXCEPTION 'changed_rows() takes a row of a table, e.g. NULL::schema.table'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    rel := target_rel;
    IF to_regclass('pg_temp.ca_check_changes') IS NULL OR NOT customer_analytics.ca_tracked(rel) THEN
        RETURN QUERY EXECUTE format('SELECT * FROM %s', rel);
        RETURN;
    END IF;
    IF EXISTS (SELECT FROM pg_temp.ca_check_changes c WHERE c.rel = target_rel AND c.op = 'T') THEN
        RETURN QUERY EXECUTE format('SELECT * FROM %s', rel);
        RETURN;
    END IF;
    keys := customer_analytics.ca_key_columns(rel);
    RETURN QUERY EXECUTE format(
        'SELECT t.* FROM (SELECT DISTINCT %s FROM pg_temp.ca_check_changes c, jsonb_populate_record(NULL::%s, c.key) k '
        'WHERE c.rel = $1 AND c.op = ''n'') k JOIN %s t ON %s',
        (SELECT string_agg(format('k.%I', x), ', ') FROM unnest(keys) x), rel, rel,
        (SELECT string_agg(format('t.%I = k.%I', x, x), ' AND ') FROM unnest(keys) x))
        USING rel;
END
$$;
COMMENT ON FUNCTION customer_analytics.changed_rows(anyelement) IS
    'changed_rows(NULL::schema.table): inside run_checks(), the rows of the table inserted or updated since the previous pass of the checks; elsewhere, or for a table not tracked (track_check_changes), every row. What an incremental custom check reads instead of its table';

/* The query returning the failing rows of a check among what changed; NULL: the check only runs whole */
CREATE FUNCTION customer_analytics.quality_check_incremental_sql(c customer_analytics.quality_check)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tbl regclass;
    cols text[];
    chg text;
    to_tbl regclass;
BEGIN
    IF c.kind = 'custom' THEN
        RETURN c.params->>'incremental_sql';
    END IF;
    tbl := to_regclass(c.target);
    -- untracked tables and windowed checks (row_count_change reads a fixed
    -- number of days by the index on its column) run whole
    IF tbl IS NULL OR c.kind = 'row_count_change' OR NOT customer_analytics.ca_tracked(tbl) THEN
        RETURN NULL;
    END IF;
    -- a value deleted from an untracked referenced table would go unseen
    IF c.kind = 'relationship' AND NOT COALESCE(customer_analytics.ca_tracked(to_regclass(c.params->>'to')), false) THEN
        RETURN NULL;
    END IF;
    cols := ARRAY(SELECT quote_ident(btrim(x)) FROM unnest(string_to_array(c.column_name, ',')) x);
    chg := format('customer_analytics.changed_rows(NULL::%s)', tbl);
    RETURN CASE c.kind
        WHEN 'not_null' THEN format('SELECT * FROM %s WHERE %s IS NULL', chg, array_to_string(cols, ', '))
        -- the groups of the changed values, counted over the whole table
        -- (by an index on the columns when there is one); a NULL key groups
        -- with the other NULLs as GROUP BY does
        WHEN 'unique' THEN format(
            $q$WITH k AS MATERIALIZED (SELECT DISTINCT %1$s FROM %2$s)
               SELECT %1$s, count(*) AS occurrences FROM (
                   SELECT %1$s FROM %3$s t WHERE (%4$s) IN (SELECT %1$s FROM k WHERE %5$s)
                   UNION ALL
                   SELECT %1$s FROM %3$s t
                   WHERE EXISTS (SELECT FROM k WHERE NOT (%5$s)) AND NOT (%6$s)
                     AND EXISTS (SELECT FROM k WHERE ROW(%1$s) IS NOT DISTINCT FROM ROW(%4$s))
               ) u GROUP BY %1$s HAVING count(*) > 1$q$,
            array_to_string(cols, ', '), chg, tbl,
            (SELECT string_agg('t.' || x, ', ') FROM unnest(cols) x),
            (SELECT string_agg(x || ' IS NOT NULL', ' AND ') FROM unnest(cols) x),
            (SELECT string_agg('t.' || x || ' IS NOT NULL', ' AND ') FROM unnest(cols) x))
        -- changed rows pointing nowhere, and rows pointing at a value that an
        -- update or delete took away from the referenced table
        WHEN 'relationship' THEN format(
            $q$SELECT x.* FROM %1$s x WHERE x.%2$s IS NOT NULL AND NOT EXISTS (SELECT FROM %3$s y WHERE y.%4$I = x.%2$s)
               UNION ALL
               SELECT x.* FROM %5$s x
               WHERE x.%2$s IN (SELECT v FROM (SELECT DISTINCT (jsonb_populate_record(NULL::%3$s, o.old_row)).%4$I AS v
                                               FROM pg_temp.ca_check_changes o WHERE o.rel = %6$L::regclass AND o.op = 'o') g
                                WHERE NOT EXISTS (SELECT FROM %3$s y WHERE y.%4$I = g.v))
                 AND NOT EXISTS (SELECT FROM pg_temp.ca_check_changes n
                                 WHERE n.rel = %7$L::regclass AND n.op = 'n' AND n.key = %8$s)$q$,
            chg, cols[1], to_regclass(c.params->>'to'), c.params->>'field', tbl, to_regclass(c.params->>'to')::oid,
            tbl::oid,
            (SELECT 'jsonb_build_object(' || string_agg(format('%L, x.%I', k, k), ', ') || ')'
             FROM unnest(customer_analytics.ca_key_columns(tbl)) k))
        WHEN 'accepted_values' THEN format(
            'SELECT %s, count(*) AS occurrences FROM %s x WHERE %s IS NOT NULL AND %s::text <> ALL (%L::text[]) GROUP BY 1',
            cols[1], chg, cols[1], cols[1], ARRAY(SELECT jsonb_array_elements_text(c.params->'values')))
        -- the newest value: the previous pass's, or a changed row's
        WHEN 'freshness' THEN format(
            'SELECT newest, now() - newest AS age FROM (SELECT GREATEST((SELECT max(%1$s) FROM %2$s), $1::%4$s) AS newest) s '
            'WHERE newest IS NULL OR newest < now() - %3$L::interval',
            cols[1], chg, COALESCE(c.params->>'max_age', '1 day'),
            (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
             WHERE a.attrelid = tbl AND a.attname = btrim(c.column_name)))
    END;
END
$$;
COMMENT ON FUNCTION customer_analytics.quality_check_incremental_sql(customer_analytics.quality_check) IS
    'The SQL that returns the failing rows of a quality check among the rows changed since the previous pass (and the rows a change elsewhere can invalidate); NULL when the check always runs over whole tables';

/* Whether an update or delete since the previous pass may have moved the newest value of a column */
CREATE FUNCTION customer_analytics.ca_newest_moved(rel regclass, col text, newest text)
RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    moved boolean;
BEGIN
    IF newest IS NULL THEN
        RETURN EXISTS (SELECT FROM pg_temp.ca_check_changes x WHERE x.rel = ca_newest_moved.rel AND x.op = 'o');
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT FROM pg_temp.ca_check_changes x WHERE x.rel = $1 AND x.op = ''o'' '
                   'AND NOT (jsonb_populate_record(NULL::%s, x.old_row)).%I < $2::%s)',
                   rel, col, (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                              WHERE a.attrelid = rel AND a.attname = col))
        INTO moved USING rel, newest;
    RETURN moved;
END
$$;
COMMENT ON FUNCTION customer_analytics.ca_newest_moved(regclass, text, text) IS
    'Internal to run_checks(): whether a row updated or deleted since the previous pass held a value of the column at least as new as that pass''s newest (else the newest stands and a freshness check needs only the changed rows)';

CREATE FUNCTION customer_analytics.run_checks(run_id bigint DEFAULT NULL, only_target text DEFAULT NULL,
                                              "full" boolean DEFAULT false)
RETURNS TABLE (check_name text, kind text, target text, severity text, passed boolean,
               failing_rows bigint, sample jsonb, incremental boolean)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c customer_analytics.quality_check;
    q text;
    prog customer_analytics.quality_check_progress;
    pass bigint;
    prev_pass bigint;
    def text;
    whole_tables regclass[];
    newest text;
    -- (a session that has not loaded the library yet has no such setting:
    -- its default, or the placeholder a configuration file made)
    full_every interval := COALESCE(NULLIF(current_setting('customer_analytics.full_checks_interval', true), ''), '1 day')::interval;
BEGIN
    IF only_target IS NULL THEN
        -- one pass at a time: a pass takes the queue only once the previous
        -- one has recorded what it found
        PERFORM pg_advisory_xact_lock(hashtext('customer_analytics.run_checks'));
        SELECT max(p.pass_no) INTO prev_pass FROM customer_analytics.quality_check_progress p;
        pass := nextval('customer_analytics.check_pass_seq');
        CREATE TEMP TABLE IF NOT EXISTS ca_check_changes (LIKE customer_analytics.check_change) ON COMMIT DROP;
        TRUNCATE ca_check_changes;
        WITH taken AS (DELETE FROM customer_analytics.check_change RETURNING *)
        INSERT INTO ca_check_changes SELECT * FROM taken;
        ANALYZE ca_check_changes;
        whole_tables := ARRAY(SELECT DISTINCT x.rel FROM ca_check_changes x WHERE x.op = 'T');
    END IF;
    FOR c IN SELECT * FROM customer_analytics.quality_check qc
             WHERE qc.enabled AND (only_target IS NULL OR qc.target = only_target) ORDER BY qc.name LOOP
        check_name := c.name; kind := c.kind; target := c.target; severity := c.severity;
        def := md5(concat_ws('|', c.kind, c.target, c.column_name, c.params::text));
        SELECT * INTO prog FROM customer_analytics.quality_check_progress p WHERE p.check_name = c.name;
        newest := NULL;
        BEGIN
            q := NULL;
            incremental := false;
            -- (nested: the queue's temporary table exists only in a pass)
            IF pass IS NOT NULL AND NOT "full" AND prog.passed AND prog.pass_no = prev_pass AND prog.definition = def
               AND prog.full_at > now() - full_every THEN
                IF c.kind = 'custom' OR NOT (to_regclass(c.target) = ANY (whole_tables)
                                             OR COALESCE(to_regclass(c.params->>'to') = ANY (whole_tables), false)) THEN
                    -- a row updated or deleted may have been the newest (the
                    -- clickstream's stitching updates events every run, all
                    -- older than the newest: those leave it where it was)
                    IF c.kind <> 'freshness' OR NOT customer_analytics.ca_newest_moved(to_regclass(c.target),
                                                                                       btrim(c.column_name),
                                                                                       prog.state->>'newest') THEN
                        q := customer_analytics.quality_check_incremental_sql(c);
                        incremental := q IS NOT NULL;
                    END IF;
                END IF;
            END IF;
            IF NOT incremental THEN
                q := customer_analytics.quality_check_sql(c);
            END IF;
            -- the check's query runs once: its failing rows (usually none) are kept for the sample
            EXECUTE format('WITH failing AS MATERIALIZED (%s) '
                           'SELECT (SELECT count(*) FROM failing), '
                           '(SELECT jsonb_agg(to_jsonb(s)) FROM (SELECT * FROM failing f LIMIT 5) s)', q)
                INTO failing_rows, sample USING prog.state->>'newest';
            -- freshness carries the newest value over to the next pass
            IF c.kind = 'freshness' AND pass IS NOT NULL THEN
                -- (as JSON: ISO 8601, read back whatever the DateStyle)
                IF incremental THEN
                    EXECUTE format('SELECT to_jsonb(GREATEST((SELECT max(%I) FROM customer_analytics.changed_rows(NULL::%s)), $1::%s)) #>> ''{}''',
                                   btrim(c.column_name), to_regclass(c.target),
                                   (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                                    WHERE a.attrelid = to_regclass(c.target) AND a.attname = btrim(c.column_name)))
                        INTO newest USING prog.state->>'newest';
                ELSE
                    EXECUTE format('SELECT to_jsonb(max(%I)) #>> ''{}'' FROM %s', btrim(c.column_name), to_regclass(c.target))
                        INTO newest;
                END IF;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            -- a check that cannot run has failed, with its error as the sample
            failing_rows := -1;
            sample := jsonb_build_object('error', SQLERRM, 'sqlstate', SQLSTATE);
        END;
        passed := failing_rows = 0;
        INSERT INTO customer_analytics.quality_result (run_id, check_name, severity, passed, failing_rows, sample, incremental)
        VALUES (run_checks.run_id, c.name, c.severity, passed, failing_rows, sample, incremental);
        IF pass IS NOT NULL THEN
            INSERT INTO customer_analytics.quality_check_progress AS p (check_name, pass_no, definition, passed, full_at, state)
            VALUES (c.name, pass, def, passed, CASE WHEN incremental THEN prog.full_at ELSE now() END,
                    CASE WHEN newest IS NOT NULL THEN jsonb_build_object('newest', newest) END)
            ON CONFLICT ON CONSTRAINT quality_check_progress_pkey DO UPDATE
                SET pass_no = EXCLUDED.pass_no, definition = EXCLUDED.definition, passed = EXCLUDED.passed,
                    full_at = EXCLUDED.full_at, state = EXCLUDED.state;
        END IF;
        IF NOT passed THEN
            PERFORM customer_analytics.raise_alert('quality_check', c.name,
                jsonb_build_object('target', c.target, 'kind', c.kind, 'failing_rows', failing_rows, 'sample', sample,
                                   'run_id', run_checks.run_id),
                dedup_key => format('quality_check:%s:%s', c.name, COALESCE(run_checks.run_id::text, clock_timestamp()::text)),
                severity => CASE c.severity WHEN 'error' THEN 'error' ELSE 'warn' END);
        END IF;
        RETURN NEXT;
    END LOOP;
    IF pass IS NOT NULL THEN
        DROP TABLE ca_check_changes;
    END IF;
END
$$;
COMMENT ON FUNCTION customer_analytics.run_checks(bigint, text, boolean) IS
    'Runs every enabled quality check (or those of one target, over whole tables): a row per check with passed, the number of failing rows (-1: the check itself failed), a sample of up to 5, and whether it ran over the rows changed since the previous pass only (incremental) or over whole tables (full => true, a check that failed or changed, or whose last full run is older than customer_analytics.full_checks_interval); logs each in quality_result and raises an alert for each failure';


-- issue 16: the forecast's multiplicative seasonality (hw_model.seasonality)
ALTER TYPE customer_analytics.hw_model ADD ATTRIBUTE seasonality text;
COMMENT ON TYPE customer_analytics.hw_model IS
    'A fitted Holt-Winters model of a daily series: period, smoothing parameters alpha (level), beta (trend), gamma (season), trend damping phi (1 = undamped), the final level and trend (per day), seasonals[k] = seasonal term of day last_ts + k (k = 1 .. period), sum of squared one-step errors after the first period (sse), days in the series (n), its first and last day, the residual standard deviation sqrt(sse / the open days after the first period), and seasonality: additive (the seasonal terms are added to the level) or multiplicative (they are factors of it)';
COMMENT ON AGGREGATE customer_analytics.holt_winters(date, float8) IS
    'Holt-Winters model (damped additive trend, weekly seasonality) of a daily series, rows in any order: values of the same day are summed, a day without rows counts as 0, a NULL value closes its day (no observation: the state runs over it unchanged), a NULL day is skipped; alpha, beta, gamma in [0, 1] and the damping phi in [0.8, 1] fitted by minimising the one-step squared error (Nelder-Mead); the seasonality additive or, for a series positive on every open day, multiplicative when that fits with the smaller one-step error. NULL when the series spans fewer than two periods, or its first or second period is closed throughout';
COMMENT ON AGGREGATE customer_analytics.holt_winters(date, float8, integer) IS
    'Holt-Winters model of a daily series with the given seasonal period in days (2 .. 366; taken from the first row); see holt_winters(date, float8)';
COMMENT ON AGGREGATE customer_analytics.holt_winters(date, float8, integer, float8, float8, float8) IS
    'Holt-Winters model with smoothing parameters alpha, beta, gamma in [0, 1] given (taken from the first row); a NULL parameter is fitted, and so is the damping phi. See holt_winters(date, float8)';
COMMENT ON AGGREGATE customer_analytics.holt_winters(date, float8, integer, float8, float8, float8, float8) IS
    'Holt-Winters model with smoothing parameters alpha, beta, gamma in [0, 1] and trend damping phi in [0.8, 1] given (taken from the first row; phi = 1 is the classic undamped model); a NULL parameter is fitted. See holt_winters(date, float8)';
COMMENT ON FUNCTION customer_analytics.forecast(customer_analytics.hw_model, integer, float8) IS
    'The next horizon days after the model''s last day: point forecast yhat and a prediction interval [lo, hi] at the given level (approximation: normal errors with the in-sample residual standard deviation and the analytic h-step variance of additive damped Holt-Winters, ETS(A,Ad,A), or for a multiplicative model that of ETS(A,Ad,M) with its seasonal factors taken as known, ignoring the uncertainty of the fitted parameters; not clipped at 0)';

-- issue 20: anomalies a small shop can trust (second part): the count
-- method carries the level forward by the series' growth and tests the
-- other series of a flagged day together (customer_analytics.anomaly_same_day_fdr);
-- the anomalies view flags changes of at least 50% only
COMMENT ON FUNCTION customer_analytics.detect_anomalies(text, text, integer, float8, integer, text, float8, integer, text) IS
    'Score every point of the series a query returns (columns: series key, timestamp, value, and optionally the exposure: the fraction of the period observed, 0 = not scored) against a baseline that never includes the point: method trailing (mean and z over the window_size previous points), robust (median and robust z over them), seasonal (the median of the same weekday in the previous seasons weeks, then the z and robust z of the residual over the window; both must pass; on the chosen scale: linear, sqrt or log) or count (whole counts: expected = level of the previous seasons weeks, carried forward by the growth of the window, x weekday profile of the window_size previous periods, two-sided negative binomial tail probability p_value, its variance the baseline''s own uncertainty plus the overdispersion of the window when Pearson''s statistic shows it, Poisson otherwise; z is its normal score). Flags points whose |z| passes threshold (default customer_analytics.zscore_threshold; for the count method p_value <= customer_analytics.anomaly_false_alarms_per_year / points a year, then, at a time where a point is flagged, the other series'' points that moved the same way by Benjamini-Hochberg at customer_analytics.anomaly_same_day_fdr) in the wanted direction (both, spike, drop), after min_history earlier points, when they differ from the expected value by at least min_relative_change of it';
DROP MATERIALIZED VIEW customer_analytics.anomalies;
CREATE MATERIALIZED VIEW customer_analytics.anomalies AS
SELECT a.series, (a.ts AT TIME ZONE 'UTC')::date AS day, a.value::bigint AS orders,
       round(a.expected::numeric, 1) AS expected, a.z, a.p_value, a.direction
FROM customer_analytics.detect_anomalies('customer_analytics.order_count_series'::regclass, 'series', 'ts', 'orders',
        method => 'count', window_size => 112, seasons => 8, min_relative_change => 0.5) a
WHERE a.is_anomaly;
CREATE UNIQUE INDEX anomalies_series_day_idx ON customer_analytics.anomalies (series, day);
COMMENT ON MATERIALIZED VIEW customer_analytics.anomalies IS
    'Days with an anomalous number of orders, per product category and for the shop as a whole (series ''total''): detect_anomalies() with the count method (expected orders from the level of the 8 previous weeks, carried forward by the growth of the 112 previous days, and the weekday profile of those days; p_value: two-sided negative binomial tail probability; z: its normal score), flagged when p_value <= customer_analytics.anomaly_false_alarms_per_year / 365.25, or, on a day with such a flag, by Benjamini-Hochberg at customer_analytics.anomaly_same_day_fdr among the day''s other series that moved the same way; changes of at least 50% of the expected orders only. Built on daily_sales and product_category_sales: refresh those first (refresh_sales_views() does all three)';

-- issue 21: what the extension keeps for itself moves to the schema
-- customer_analytics_internal (change queues, run states, trigger and
-- helper functions), so that customer_analytics holds what README.md
-- documents; transform() and transform_events() in steps sharing one
-- customer-version lookup and one lock key; the stats accessors no longer
-- shadow the built-in count, variance and stddev aggregates.
CREATE SCHEMA customer_analytics_internal;
COMMENT ON SCHEMA customer_analytics_internal IS
    'customer_analytics: internal queues, states and helper functions of the customer_analytics extension (not an interface)';
ALTER TABLE customer_analytics.rfm_new_line SET SCHEMA customer_analytics_internal;
ALTER TABLE customer_analytics.transform_state SET SCHEMA customer_analytics_internal;
ALTER TABLE customer_analytics.event_transform_state SET SCHEMA customer_analytics_internal;
ALTER TABLE customer_analytics.rfm_dirty_customer SET SCHEMA customer_analytics_internal;
ALTER TABLE customer_analytics.sales_dirty_day SET SCHEMA customer_analytics_internal;
ALTER TABLE customer_analytics.check_change SET SCHEMA customer_analytics_internal;
ALTER TABLE customer_analytics.quality_check_progress SET SCHEMA customer_analytics_internal;
ALTER TABLE customer_analytics.clickstream_change SET SCHEMA customer_analytics_internal;
ALTER TABLE customer_analytics.clickstream_state SET SCHEMA customer_analytics_internal;
ALTER SEQUENCE customer_analytics.check_pass_seq SET SCHEMA customer_analytics_internal;
ALTER FUNCTION customer_analytics.ca_newly_staged(xid8, xid8, xid8, pg_snapshot, pg_snapshot, xid8) SET SCHEMA customer_analytics_internal;
ALTER FUNCTION customer_analytics_internal.ca_newly_staged(xid8, xid8, xid8, pg_snapshot, pg_snapshot, xid8) RENAME TO newly_staged;
ALTER FUNCTION customer_analytics.ca_staged_window(pg_snapshot, bigint, bigint, boolean) SET SCHEMA customer_analytics_internal;
ALTER FUNCTION customer_analytics_internal.ca_staged_window(pg_snapshot, bigint, bigint, boolean) RENAME TO staged_window;
ALTER FUNCTION customer_analytics.ca_key_columns(regclass) SET SCHEMA customer_analytics_internal;
ALTER FUNCTION customer_analytics_internal.ca_key_columns(regclass) RENAME TO key_columns;
ALTER FUNCTION customer_analytics.ca_note_check_change() SET SCHEMA customer_analytics_internal;
ALTER FUNCTION customer_analytics_internal.ca_note_check_change() RENAME TO note_check_change;
ALTER FUNCTION customer_analytics.ca_tracked(regclass) SET SCHEMA customer_analytics_internal;
ALTER FUNCTION customer_analytics_internal.ca_tracked(regclass) RENAME TO tracked;
ALTER FUNCTION customer_analytics.ca_newest_moved(regclass, text, text) SET SCHEMA customer_analytics_internal;
ALTER FUNCTION customer_analytics_internal.ca_newest_moved(regclass, text, text) RENAME TO newest_moved;
ALTER FUNCTION customer_analytics.ca_fact_event_changed() SET SCHEMA customer_analytics_internal;
ALTER FUNCTION customer_analytics_internal.ca_fact_event_changed() RENAME TO fact_event_changed;
ALTER FUNCTION customer_analytics.note_dirty_customers() SET SCHEMA customer_analytics_internal;
ALTER FUNCTION customer_analytics.note_dirty_sales_days() SET SCHEMA customer_analytics_internal;
ALTER FUNCTION customer_analytics.money_units(numeric, boolean) SET SCHEMA customer_analytics_internal;
ALTER FUNCTION customer_analytics.rfm_segment_rule_guard() SET SCHEMA customer_analytics_internal;
ALTER FUNCTION customer_analytics.pipeline_execute_step(bigint, integer, text, text, text[], integer) SET SCHEMA customer_analytics_internal;
ALTER FUNCTION customer_analytics.count(customer_analytics.stats) RENAME TO stats_count;
ALTER FUNCTION customer_analytics.mean(customer_analytics.stats) RENAME TO stats_mean;
ALTER FUNCTION customer_analytics.variance(customer_analytics.stats) RENAME TO stats_variance;
ALTER FUNCTION customer_analytics.stddev(customer_analytics.stats) RENAME TO stats_stddev;

-- issue 22: customer_rfm_score keeps each customer's last purchase instead
-- of their recency, and customer_rfm counts recency from it, so that a day
-- passing rewrites no row (the rows keep their recency exactly: the
-- rollup's last purchase where it gives the stored recency, else as_of
-- minus the stored whole days)
ALTER TABLE customer_analytics.customer_rfm_score ADD COLUMN last_purchase timestamptz;
UPDATE customer_analytics.customer_rfm_score s
SET last_purchase = COALESCE(
        (SELECT u.last_order FROM customer_analytics.rfm_rollup_customer u
         WHERE u.customer_id = s.customer_id
           AND trunc(EXTRACT(epoch FROM a.as_of - u.last_order) / 86400)::integer = s.recency_days),
        a.as_of - s.recency_days * interval '86400 seconds')
FROM customer_analytics.customer_rfm_refresh a;
DELETE FROM customer_analytics.customer_rfm_score WHERE last_purchase IS NULL;
ALTER TABLE customer_analytics.customer_rfm_score ALTER COLUMN last_purchase SET NOT NULL;
CREATE OR REPLACE VIEW customer_analytics.customer_rfm AS
SELECT s.customer_id, s.customer_key,
       trunc(EXTRACT(epoch FROM a.as_of - s.last_purchase) / 86400)::integer AS recency_days,
       s.frequency, s.monetary, s.r, s.f, s.m, s.rfm_cell, s.segment, a.as_of
FROM customer_analytics.customer_rfm_score s
CROSS JOIN customer_analytics.customer_rfm_refresh a;
ALTER TABLE customer_analytics.customer_rfm_score DROP COLUMN recency_days;

CREATE FUNCTION customer_analytics_internal.lock_key(name text)
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT (7411::bigint OPERATOR(pg_catalog.<<) 32)
             OPERATOR(pg_catalog.|) (pg_catalog.hashtext(name)::bigint OPERATOR(pg_catalog.&) 4294967295) $$;

CREATE FUNCTION customer_analytics_internal.customer_versions(customer_ids text[])
RETURNS TABLE (customer_id text, customer_key bigint, valid_from timestamptz, valid_to timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT d.customer_id, d.customer_key,
           CASE WHEN pg_catalog.row_number() OVER (PARTITION BY d.customer_id ORDER BY d.valid_from)
                     OPERATOR(pg_catalog.=) 1
                THEN '-infinity'::timestamptz ELSE d.valid_from END,
           d.valid_to
    FROM customer_analytics.dim_customer d
    WHERE d.customer_key OPERATOR(pg_catalog.<>) -1
      AND d.customer_id IN (SELECT pg_catalog.unnest(customer_ids))
$$;

CREATE FUNCTION customer_analytics_internal.stage_order_batch(snap pg_snapshot, prev pg_snapshot,
                                                              lo xid8, hi xid8, own_xid xid8)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
BEGIN
    /* the staged rows of this run, latest version per natural key */
    CREATE TEMP TABLE ca_batch_products ON COMMIT DROP AS
    SELECT DISTINCT ON (s.product_id)
           s.product_id, s.name, COALESCE(NULLIF(s.category, ''), 'Unknown') AS category,
           s.subcategory, s.unit_cost, s.list_price, s.updated_at, s.stage_id
    FROM stg_products s
    WHERE newly_staged(s.staged_xid, lo, hi, snap, prev, own_xid)
    ORDER BY s.product_id, s.stage_id DESC;

    CREATE TEMP TABLE ca_batch_customers ON COMMIT DROP AS
    SELECT DISTINCT ON (s.customer_id, COALESCE(s.updated_at, s.loaded_at))
           s.customer_id, s.name, s.email, s.city, s.state, s.country, s.signup_date,
           COALESCE(s.updated_at, s.loaded_at) AS version_ts
    FROM stg_customers s
    WHERE newly_staged(s.staged_xid, lo, hi, snap, prev, own_xid)
    ORDER BY s.customer_id, COALESCE(s.updated_at, s.loaded_at), s.stage_id DESC;

    CREATE TEMP TABLE ca_batch_orders ON COMMIT DROP AS
    SELECT DISTINCT ON (s.order_id, s.line_number) s.*
    FROM stg_orders s
    WHERE newly_staged(s.staged_xid, lo, hi, snap, prev, own_xid)
    ORDER BY s.order_id, s.line_number, s.stage_id DESC;

    ANALYZE ca_batch_products, ca_batch_customers, ca_batch_orders;
END
$$;

CREATE FUNCTION customer_analytics_internal.load_dim_product()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO dim_product AS d (product_id, name, category, subcategory, unit_cost, list_price,
                                  updated_at, stage_id)
    SELECT product_id, name, category, subcategory, unit_cost, list_price, updated_at, stage_id
    FROM ca_batch_products
    ON CONFLICT (product_id) DO UPDATE
        SET name = excluded.name, category = excluded.category, subcategory = excluded.subcategory,
            unit_cost = excluded.unit_cost, list_price = excluded.list_price,
            updated_at = excluded.updated_at, stage_id = excluded.stage_id
        WHERE excluded.stage_id > d.stage_id
          AND (d.name, d.category, d.subcategory, d.unit_cost, d.list_price)
              IS DISTINCT FROM
              (excluded.name, excluded.category, excluded.subcategory, excluded.unit_cost, excluded.list_price);
    GET DIAGNOSTICS n = ROW_COUNT;
    -- the fact joins that follow are planned on these statistics
    IF n > 0 THEN
        ANALYZE dim_product;
    END IF;
    RETURN n;
END
$$;

CREATE FUNCTION customer_analytics_internal.load_dim_customer()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    CREATE TEMP TABLE ca_new_versions ON COMMIT DROP AS
    WITH cur AS (
        SELECT d.customer_id, d.name, d.email, d.city, d.state, d.country, d.signup_date,
               d.valid_from AS version_ts, false AS is_new
        FROM dim_customer d
        WHERE d.is_current AND d.customer_id IN (SELECT customer_id FROM ca_batch_customers)
    ), chain AS (
        SELECT * FROM cur
        UNION ALL
        SELECT b.customer_id, b.name, b.email, b.city, b.state, b.country, b.signup_date,
               b.version_ts, true
        FROM ca_batch_customers b
        LEFT JOIN cur c ON c.customer_id = b.customer_id
        WHERE c.customer_id IS NULL OR b.version_ts > c.version_ts
    ), diffed AS (
        SELECT ch.*,
               ROW(ch.name, ch.email, ch.city, ch.state, ch.country, ch.signup_date)
                   IS DISTINCT FROM
               lag(ROW(ch.name, ch.email, ch.city, ch.state, ch.country, ch.signup_date))
                   OVER (PARTITION BY ch.customer_id ORDER BY ch.version_ts) AS changed
        FROM chain ch
    )
    SELECT df.customer_id, df.name, df.email, df.city, df.state, df.country,
           df.signup_date, df.version_ts
    FROM diffed df
    WHERE df.is_new AND df.changed;

    UPDATE dim_customer d
    SET valid_to = f.first_ts, is_current = false
    FROM (SELECT customer_id, min(version_ts) AS first_ts
          FROM ca_new_versions GROUP BY customer_id) f
    WHERE d.customer_id = f.customer_id AND d.is_current;

    INSERT INTO dim_customer (customer_id, name, email, city, state, country, signup_date,
                              valid_from, valid_to, is_current)
    SELECT nv.customer_id, nv.name, nv.email, nv.city, nv.state, nv.country, nv.signup_date,
           nv.version_ts,
           COALESCE(lead(nv.version_ts) OVER w, 'infinity'),
           lead(nv.version_ts) OVER w IS NULL
    FROM ca_new_versions nv
    WINDOW w AS (PARTITION BY nv.customer_id ORDER BY nv.version_ts);
    GET DIAGNOSTICS n = ROW_COUNT;
    DROP TABLE ca_new_versions;
    IF n > 0 THEN
        ANALYZE dim_customer;
    END IF;
    RETURN n;
END
$$;

CREATE FUNCTION customer_analytics_internal.load_fact_order_line()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    tz text := business_timezone();
    n bigint;
BEGIN
    CREATE TEMP TABLE ca_customer_lookup ON COMMIT DROP AS
    SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT o.customer_id FROM ca_batch_orders o
                                          WHERE o.customer_id IS NOT NULL));
    ANALYZE ca_customer_lookup;

    INSERT INTO fact_order_line AS f
        (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity,
         unit_price, discount, status, channel, updated_at, stage_id, load_id)
    SELECT s.order_id, s.line_number,
           COALESCE(c.customer_key, -1),
           COALESCE(p.product_key, -1),
           date_key((s.order_ts AT TIME ZONE tz)::date),
           s.order_ts, s.quantity, s.unit_price, s.discount, s.status, s.channel,
           s.updated_at, s.stage_id, s.load_id
    FROM ca_batch_orders s
    LEFT JOIN ca_customer_lookup c
           ON c.customer_id = s.customer_id AND s.order_ts >= c.valid_from AND s.order_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id
    ON CONFLICT (order_id, line_number) DO UPDATE
        SET customer_key = excluded.customer_key, product_key = excluded.product_key,
            date_key = excluded.date_key, order_ts = excluded.order_ts,
            quantity = excluded.quantity, unit_price = excluded.unit_price,
            discount = excluded.discount, status = excluded.status,
            channel = excluded.channel, updated_at = excluded.updated_at,
            stage_id = excluded.stage_id, load_id = excluded.load_id
        WHERE excluded.stage_id > f.stage_id
          AND (f.customer_key, f.product_key, f.order_ts, f.quantity, f.unit_price,
               f.discount, f.status, f.channel, f.updated_at)
              IS DISTINCT FROM
              (excluded.customer_key, excluded.product_key, excluded.order_ts, excluded.quantity,
               excluded.unit_price, excluded.discount, excluded.status, excluded.channel,
               excluded.updated_at);
    GET DIAGNOSTICS n = ROW_COUNT;
    DROP TABLE ca_customer_lookup;
    RETURN n;
END
$$;

CREATE FUNCTION customer_analytics_internal.repair_order_line_keys()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    WITH latest AS (
        SELECT DISTINCT ON (s.order_id, s.line_number)
               s.order_id, s.line_number, s.customer_id, s.product_id, s.order_ts
        FROM stg_orders s
        JOIN fact_order_line f USING (order_id, line_number)
        WHERE f.customer_key = -1 OR f.product_key = -1
        ORDER BY s.order_id, s.line_number, s.stage_id DESC
    ), resolved AS (
        SELECT l.order_id, l.line_number,
               COALESCE(v.customer_key, -1) AS customer_key,
               COALESCE(p.product_key, -1) AS product_key
        FROM latest l
        LEFT JOIN customer_versions(ARRAY(SELECT DISTINCT l2.customer_id FROM latest l2)) v
               ON v.customer_id = l.customer_id AND l.order_ts >= v.valid_from AND l.order_ts < v.valid_to
        LEFT JOIN dim_product p ON p.product_id = l.product_id
    )
    UPDATE fact_order_line f
    SET customer_key = r.customer_key, product_key = r.product_key
    FROM resolved r
    WHERE f.order_id = r.order_id AND f.line_number = r.line_number
      AND (f.customer_key, f.product_key) IS DISTINCT FROM (r.customer_key, r.product_key);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

CREATE FUNCTION customer_analytics_internal.stage_event_batch(snap pg_snapshot, prev pg_snapshot,
                                                              lo xid8, hi xid8, own_xid xid8)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
BEGIN
    CREATE TEMP TABLE ca_batch_events ON COMMIT DROP AS
    SELECT DISTINCT ON (s.event_id) s.*
    FROM stg_events s
    WHERE newly_staged(s.staged_xid, lo, hi, snap, prev, own_xid)
    ORDER BY s.event_id, s.stage_id DESC;
END
$$;

CREATE FUNCTION customer_analytics_internal.hold_back_late_events(cutoff timestamptz, previous_own_xid xid8)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    late record;
BEGIN
    WITH gone AS (
        DELETE FROM ca_batch_events b
        WHERE b.event_ts < cutoff
          -- rows the previous run took from its own transaction come again: not late
          AND b.staged_xid IS DISTINCT FROM previous_own_xid
        RETURNING b.event_ts, b.load_id
    )
    SELECT count(*) AS events, min(event_ts) AS oldest, max(event_ts) AS newest,
           array_agg(DISTINCT load_id) FILTER (WHERE load_id IS NOT NULL) AS loads
    INTO late FROM gone;
    IF late.events > 0 THEN
        PERFORM raise_alert('late_events', 'stg_events',
                            jsonb_build_object('events', late.events, 'oldest', late.oldest,
                                               'newest', late.newest, 'cutoff', cutoff,
                                               'loads', late.loads),
                            severity => 'warn');
    END IF;
    RETURN late.events;
END
$$;

CREATE FUNCTION customer_analytics_internal.load_fact_event()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    tz text := business_timezone();
    n bigint;
BEGIN
    CREATE TEMP TABLE ca_event_customers ON COMMIT DROP AS
    SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT e.customer_id FROM ca_batch_events e
                                          WHERE e.customer_id IS NOT NULL));
    ANALYZE ca_event_customers;

    INSERT INTO fact_event AS f
        (event_id, event_ts, date_key, customer_key, customer_id, customer_stitched, session_id,
         event_type, product_key, order_id, channel, device, stage_id, load_id)
    SELECT s.event_id, s.event_ts, date_key((s.event_ts AT TIME ZONE tz)::date),
           CASE WHEN s.customer_id IS NULL THEN NULL
                ELSE COALESCE(c.customer_key, -1) END,
           s.customer_id, false,
           s.session_id, s.event_type,
           CASE WHEN s.product_id IS NULL THEN NULL ELSE COALESCE(p.product_key, -1) END,
           s.order_id, s.channel, s.device, s.stage_id, s.load_id
    FROM ca_batch_events s
    LEFT JOIN ca_event_customers c
           ON c.customer_id = s.customer_id AND s.event_ts >= c.valid_from AND s.event_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id
    ON CONFLICT (event_id) DO UPDATE
        SET event_ts = excluded.event_ts, date_key = excluded.date_key,
            customer_key = excluded.customer_key, customer_id = excluded.customer_id,
            customer_stitched = false, session_id = excluded.session_id,
            event_type = excluded.event_type, product_key = excluded.product_key,
            order_id = excluded.order_id, channel = excluded.channel,
            device = excluded.device, stage_id = excluded.stage_id, load_id = excluded.load_id
        WHERE excluded.stage_id > f.stage_id
          AND (f.event_ts, f.customer_key, f.customer_id, f.customer_stitched, f.session_id,
               f.event_type, f.product_key, f.order_id, f.channel, f.device)
              IS DISTINCT FROM
              (excluded.event_ts, excluded.customer_key, excluded.customer_id, false,
               excluded.session_id, excluded.event_type, excluded.product_key,
               excluded.order_id, excluded.channel, excluded.device);
    GET DIAGNOSTICS n = ROW_COUNT;
    DROP TABLE ca_event_customers;
    RETURN n;
END
$$;

CREATE FUNCTION customer_analytics_internal.stitch_sessions()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    -- only sessions where something can change: an anonymous event and an
    -- identified one, or events stitched before
    CREATE TEMP TABLE ca_stitch_sessions ON COMMIT DROP AS
    SELECT f.session_id
    FROM fact_event f
    WHERE f.session_id IN (SELECT b.session_id FROM ca_batch_events b)
    GROUP BY f.session_id
    HAVING (bool_or(f.customer_id IS NULL) AND bool_or(f.customer_id IS NOT NULL))
           OR bool_or(f.customer_stitched);
    ANALYZE ca_stitch_sessions;
    WITH sess AS (
        SELECT f.event_id, f.customer_key, f.customer_id, f.customer_stitched,
               count(*) FILTER (WHERE f.customer_id IS NOT NULL AND NOT f.customer_stitched)
                   OVER (PARTITION BY f.session_id ORDER BY f.event_ts DESC, f.event_id DESC
                         ROWS UNBOUNDED PRECEDING) AS grp,
               f.session_id
        FROM fact_event f
        WHERE f.session_id IN (SELECT c.session_id FROM ca_stitch_sessions c)
    ), linked AS (
        SELECT s.event_id, s.customer_key, s.customer_id, s.customer_stitched,
               max(s.customer_key) FILTER (WHERE s.customer_id IS NOT NULL AND NOT s.customer_stitched)
                   OVER g AS new_key,
               max(s.customer_id) FILTER (WHERE s.customer_id IS NOT NULL AND NOT s.customer_stitched)
                   OVER g AS new_id
        FROM sess s
        WINDOW g AS (PARTITION BY s.session_id, s.grp)
    )
    UPDATE fact_event f
    SET customer_key = l.new_key, customer_id = l.new_id, customer_stitched = l.new_id IS NOT NULL
    FROM linked l
    WHERE f.event_id = l.event_id
      AND (l.customer_id IS NULL OR l.customer_stitched)
      AND (l.customer_key, l.customer_id, l.customer_stitched)
          IS DISTINCT FROM (l.new_key, l.new_id, l.new_id IS NOT NULL);
    GET DIAGNOSTICS n = ROW_COUNT;
    DROP TABLE ca_stitch_sessions;
    RETURN n;
END
$$;

CREATE FUNCTION customer_analytics_internal.repair_event_customer_keys()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE fact_event f
    SET customer_key = v.customer_key
    FROM customer_versions(ARRAY(SELECT DISTINCT e.customer_id FROM fact_event e
                                 WHERE e.customer_key = -1)) v
    WHERE f.customer_key = -1 AND v.customer_id = f.customer_id
      AND f.event_ts >= v.valid_from AND f.event_ts < v.valid_to;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

CREATE FUNCTION customer_analytics_internal.rfm_orders(customer_ids text[], up_to timestamptz)
RETURNS TABLE (customer_id text, ts timestamptz, amount numeric)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT c.customer_id, pg_catalog.max(fl.order_ts), pg_catalog.sum(fl.revenue)
    FROM customer_analytics.fact_order_line fl
    JOIN customer_analytics.dim_customer c ON c.customer_key OPERATOR(pg_catalog.=) fl.customer_key
    WHERE fl.status OPERATOR(pg_catalog.=) 'completed' AND c.customer_key OPERATOR(pg_catalog.<>) -1
      AND (fl.quantity OPERATOR(pg_catalog.>) 0 OR fl.revenue OPERATOR(pg_catalog.<>) 0)
      AND fl.order_ts OPERATOR(pg_catalog.<=) up_to
      AND (customer_ids IS NULL OR c.customer_id IN (SELECT pg_catalog.unnest(customer_ids)))
    GROUP BY c.customer_id, fl.order_id,
             CASE WHEN fl.revenue OPERATOR(pg_catalog.<) 0 THEN fl.line_number END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.raise_alert(
    kind      text,
    subject   text,
    details   jsonb DEFAULT '{}',
    dedup_key text DEFAULT NULL,
    severity  text DEFAULT 'warn')
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    new_id  bigint;
    payload jsonb;
BEGIN
    IF kind IS NULL OR subject IS NULL THEN
        RAISE EXCEPTION 'an alert needs a kind and a subject'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF severity IS NOT NULL AND severity NOT IN ('info', 'warn', 'error') THEN
        RAISE EXCEPTION 'invalid alert severity "%"', severity
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use info, warn or error.';
    END IF;
    INSERT INTO alert AS a (kind, subject, severity, details, dedup_key)
    VALUES (kind, subject, COALESCE(severity, 'warn'), COALESCE(details, '{}'),
            COALESCE(dedup_key, kind || ':' || subject || ':' || md5(COALESCE(details, '{}')::text)))
    ON CONFLICT ON CONSTRAINT alert_dedup_key_key DO NOTHING
    RETURNING a.alert_id INTO new_id;
    IF new_id IS NOT NULL THEN
        payload := jsonb_build_object('alert_id', new_id, 'kind', kind, 'subject', subject,
                                      'severity', COALESCE(severity, 'warn'), 'details', details);
        -- NOTIFY payloads must stay under 8000 bytes: drop the details if too big
        IF octet_length(payload::text) > 7900 THEN
            payload := payload - 'details' || jsonb_build_object('details_truncated', true);
        END IF;
        PERFORM pg_notify('customer_analytics_alerts', payload::text);
    END IF;
    RETURN new_id;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.acknowledge_alert(alert_id bigint)
RETURNS boolean
LANGUAGE sql VOLATILE STRICT
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
    WITH acked AS (
        UPDATE customer_analytics.alert a
        SET acknowledged = true, acknowledged_at = now(), acknowledged_by = current_user
        WHERE a.alert_id = acknowledge_alert.alert_id AND NOT a.acknowledged
        RETURNING 1
    )
    SELECT EXISTS (SELECT FROM acked)
$$;

CREATE OR REPLACE FUNCTION customer_analytics.date_key(day date)
RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT (((pg_catalog.date_part('year', day) OPERATOR(pg_catalog.*) 10000)
             OPERATOR(pg_catalog.+) (pg_catalog.date_part('month', day) OPERATOR(pg_catalog.*) 100))
            OPERATOR(pg_catalog.+) pg_catalog.date_part('day', day))::integer
$$;

CREATE OR REPLACE FUNCTION customer_analytics.ensure_dim_date(from_day date, to_day date)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    lo date;
    hi date;
    added bigint;
BEGIN
    IF from_day IS NULL OR to_day IS NULL THEN
        RETURN 0;
    END IF;
    IF to_day - from_day > 36600 THEN
        RAISE EXCEPTION 'date range % to % is longer than 100 years', from_day, to_day
            USING ERRCODE = 'data_exception',
                  HINT = 'A timestamp far in the past or future was staged; find it in the staging tables and correct it.';
    END IF;
    -- keep the calendar contiguous from its first to its last day
    SELECT LEAST(min(date), from_day), GREATEST(max(date), to_day) INTO lo, hi FROM dim_date;
    lo := COALESCE(lo, from_day);
    hi := COALESCE(hi, to_day);
    INSERT INTO dim_date (date_key, date, year, quarter, month, month_name,
                          iso_year, iso_week, day_of_week, day_name, is_weekend)
    SELECT date_key(d), d,
           date_part('year', d), date_part('quarter', d), date_part('month', d),
           to_char(d, 'FMMonth'),
           date_part('isoyear', d), date_part('week', d), date_part('isodow', d),
           to_char(d, 'FMDay'), date_part('isodow', d) >= 6
    FROM generate_series(lo, hi, interval '1 day') AS g(ts),
         LATERAL (SELECT g.ts::date AS d) AS x
    ON CONFLICT (date_key) DO NOTHING;
    GET DIAGNOSTICS added = ROW_COUNT;
    RETURN added;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.newly_staged(xid xid8, lo xid8, hi xid8,
                                                         cur pg_snapshot, prev pg_snapshot, own xid8)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT (xid OPERATOR(pg_catalog.>=) lo AND xid OPERATOR(pg_catalog.<) hi
            AND pg_catalog.pg_visible_in_snapshot(xid, cur)
            AND (prev IS NULL OR NOT pg_catalog.pg_visible_in_snapshot(xid, prev)))
           OR xid OPERATOR(pg_catalog.=) own
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.staged_window(last_snapshot pg_snapshot, last_system bigint,
                                                          this_system bigint, full_refresh boolean,
                                                          OUT snap pg_snapshot, OUT prev pg_snapshot,
                                                          OUT lo xid8, OUT hi xid8)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    snap := pg_current_snapshot();
    IF full_refresh OR last_snapshot IS NULL OR last_system <> this_system
       OR pg_snapshot_xmin(last_snapshot) > pg_snapshot_xmax(snap) THEN
        prev := NULL;           -- everything staged so far
        lo := '0'::xid8;
    ELSE
        prev := last_snapshot;
        lo := pg_snapshot_xmin(prev);   -- all below were visible to the last run
    END IF;
    hi := pg_snapshot_xmax(snap);
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.transform(full_refresh boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    saved       transform_state;
    w           record;
    sysid       bigint;
    tz          text := business_timezone();
    products    bigint;
    customers   bigint;
    unknown_before boolean;
BEGIN
    -- one transform at a time; the second waits, then sees the first's work
    PERFORM pg_advisory_xact_lock(lock_key('transform()'));

    SELECT system_identifier INTO sysid FROM pg_control_system();
    SELECT * INTO saved FROM transform_state;
    SELECT * INTO w FROM staged_window(saved.snapshot, saved.system_identifier, sysid, full_refresh);
    PERFORM stage_order_batch(w.snap, w.prev, w.lo, w.hi, pg_current_xact_id_if_assigned());

    products := load_dim_product();
    customers := load_dim_customer();
    RETURN QUERY VALUES ('dim_product', products), ('dim_customer', customers);
    RETURN QUERY SELECT 'dim_date', ensure_dim_date(min(d), max(d))
                 FROM (SELECT (order_ts AT TIME ZONE tz)::date AS d FROM ca_batch_orders) days;

    /*
     * Lines already pointing at an unknown member before this run are the
     * only ones the repair of late-arriving dimensions can change (the lines
     * this run writes are looked up in the dimensions as they now are), and
     * only if this run added dimension rows.
     */
    unknown_before := products + customers > 0
                      AND EXISTS (SELECT FROM fact_order_line WHERE customer_key = -1 OR product_key = -1);
    RETURN QUERY SELECT 'fact_order_line', load_fact_order_line();
    RETURN QUERY SELECT 'late_dimension_fixes',
                        CASE WHEN unknown_before THEN repair_order_line_keys() ELSE 0 END;

    INSERT INTO transform_state (singleton, snapshot, system_identifier, last_run_at)
    VALUES (true, w.snap, sysid, now())
    ON CONFLICT (singleton) DO UPDATE
        SET snapshot = excluded.snapshot,
            system_identifier = excluded.system_identifier,
            last_run_at = excluded.last_run_at;

    DROP TABLE ca_batch_products, ca_batch_customers, ca_batch_orders;

    /* clickstream events: their own snapshot, so refresh_clickstream() can run them alone */
    RETURN QUERY SELECT * FROM transform_events(full_refresh);
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.transform_events(full_refresh boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    saved       event_transform_state;
    w           record;
    own_xid     xid8 := pg_current_xact_id_if_assigned();
    sysid       bigint;
    tz          text := business_timezone();
    cutoff      timestamptz;
    mark        timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key('transform_events()'));

    SELECT system_identifier INTO sysid FROM pg_control_system();
    SELECT * INTO saved FROM event_transform_state;
    SELECT * INTO w FROM staged_window(saved.snapshot, saved.system_identifier, sysid, full_refresh);
    IF w.prev IS NOT NULL THEN
        cutoff := saved.watermark - event_lateness();   -- NULL: no limit, or nothing processed yet
    END IF;
    PERFORM stage_event_batch(w.snap, w.prev, w.lo, w.hi, own_xid);

    RETURN QUERY SELECT 'fact_event_too_late',
                        CASE WHEN cutoff IS NULL THEN 0 ELSE hold_back_late_events(cutoff, saved.own_xid) END;
    ANALYZE ca_batch_events;
    PERFORM ensure_dim_date(min((event_ts AT TIME ZONE tz)::date), max((event_ts AT TIME ZONE tz)::date))
    FROM ca_batch_events;

    RETURN QUERY SELECT 'fact_event', load_fact_event();
    RETURN QUERY SELECT 'fact_event_stitched', stitch_sessions();
    RETURN QUERY SELECT 'fact_event_late_customers', repair_event_customer_keys();

    IF w.prev IS NULL THEN      -- a full pass: everything staged counts
        SELECT max(b.event_ts) INTO mark FROM ca_batch_events b;
    ELSE
        SELECT GREATEST(saved.watermark, max(b.event_ts)) INTO mark FROM ca_batch_events b;
    END IF;
    IF mark > now() THEN
        mark := now();
    END IF;
    INSERT INTO event_transform_state (singleton, snapshot, own_xid, system_identifier, watermark, last_run_at)
    VALUES (true, w.snap, own_xid, sysid, mark, now())
    ON CONFLICT (singleton) DO UPDATE
        SET snapshot = excluded.snapshot,
            own_xid = excluded.own_xid,
            system_identifier = excluded.system_identifier,
            watermark = excluded.watermark,
            last_run_at = excluded.last_run_at;

    DROP TABLE ca_batch_events;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.rfm_segment_rule_guard()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    maps text[];
    map text;
    bad text;
BEGIN
    IF TG_WHEN = 'BEFORE' THEN
        -- the built-in map is read-only (an upgrade script may set
        -- customer_analytics.installing to change it)
        IF (TG_OP <> 'INSERT' AND OLD.map_name = 'default') OR (TG_OP <> 'DELETE' AND NEW.map_name = 'default') THEN
            IF current_setting('customer_analytics.installing', true) = 'on' THEN
                RETURN COALESCE(NEW, OLD);
            END IF;
            RAISE EXCEPTION 'the built-in segment map "default" cannot be changed'
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'Add your rules under another map_name and SET customer_analytics.rfm_segment_map to it.';
        END IF;
        RETURN COALESCE(NEW, OLD);
    END IF;
    -- deferred: check every map this transaction touched, once it is complete
    maps := ARRAY(SELECT DISTINCT x FROM unnest(ARRAY[OLD.map_name, NEW.map_name]) x WHERE x IS NOT NULL);
    FOREACH map IN ARRAY maps LOOP
        IF EXISTS (SELECT FROM rfm_segment_rule WHERE map_name = map) THEN
            SELECT string_agg(cell || ' (' || problem || ')', ', ') INTO bad
            FROM (SELECT * FROM rfm_check_segment_map(map) LIMIT 10) p;
            IF bad IS NOT NULL THEN
                RAISE EXCEPTION 'RFM segment map "%" does not name each of the 125 cells exactly once', map
                    USING ERRCODE = 'check_violation',
                          DETAIL = 'Cells: ' || bad || '.',
                          HINT = format('SELECT * FROM customer_analytics.rfm_check_segment_map(%L) lists them all.', map);
            END IF;
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.note_dirty_customers()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO customer_analytics_internal.rfm_dirty_customer VALUES (NULL) ON CONFLICT DO NOTHING;
    ELSIF TG_TABLE_NAME = 'dim_customer' THEN
        -- a new, changed or removed version moves the customer's current key
        -- or which lines are theirs
        IF TG_OP = 'INSERT' THEN
            INSERT INTO customer_analytics_internal.rfm_dirty_customer
            SELECT DISTINCT customer_id FROM new_rows ON CONFLICT DO NOTHING;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO customer_analytics_internal.rfm_dirty_customer
            SELECT DISTINCT customer_id FROM old_rows ON CONFLICT DO NOTHING;
        ELSE
            INSERT INTO customer_analytics_internal.rfm_dirty_customer
            SELECT customer_id FROM old_rows UNION SELECT customer_id FROM new_rows ON CONFLICT DO NOTHING;
        END IF;
    ELSIF TG_OP = 'INSERT' THEN
        -- new lines are usually new orders: queued, added without a recompute
        INSERT INTO customer_analytics_internal.rfm_new_line (customer_id, order_id, line_number, order_ts, revenue, purchase)
        SELECT c.customer_id, r.order_id, r.line_number, r.order_ts, r.revenue,
               r.status = 'completed' AND r.customer_key <> -1 AND (r.quantity > 0 OR r.revenue <> 0)
        FROM new_rows r JOIN customer_analytics.dim_customer c USING (customer_key);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO customer_analytics_internal.rfm_dirty_customer
        SELECT DISTINCT c.customer_id
        FROM (SELECT DISTINCT customer_key FROM old_rows) r
        JOIN customer_analytics.dim_customer c USING (customer_key)
        ON CONFLICT DO NOTHING;
    ELSE
        INSERT INTO customer_analytics_internal.rfm_dirty_customer
        SELECT DISTINCT c.customer_id
        FROM (SELECT customer_key FROM old_rows UNION SELECT customer_key FROM new_rows) r
        JOIN customer_analytics.dim_customer c USING (customer_key)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.refresh_customer_rfm(full_refresh boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ids text[];
    everyone boolean;
    as_of timestamptz := customer_analytics.reference_time();
    map text := COALESCE(NULLIF(current_setting('customer_analytics.rfm_segment_map', true), ''), 'default');
    redo bigint;
    rounds integer := 0;
    later boolean;
    changed bigint;
BEGIN
    -- one maintainer at a time; readers never wait
    PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('refresh_customer_rfm()'));
    IF (SELECT count(*) FROM customer_analytics.rfm_segment_cells(map)) <> 125 THEN
        RAISE EXCEPTION 'RFM segment map "%" does not name all 125 cells', map
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('See SELECT * FROM customer_analytics.rfm_check_segment_map(%L);', map);
    END IF;
    LOOP
        rounds := rounds + 1;
        -- take the noted customers (those noted by transactions still running stay for next time)
        WITH taken AS (DELETE FROM customer_analytics_internal.rfm_dirty_customer RETURNING customer_id)
        SELECT array_agg(customer_id) FILTER (WHERE customer_id IS NOT NULL), bool_or(customer_id IS NULL)
        INTO ids, everyone FROM taken;
        IF full_refresh OR everyone
           OR (NOT EXISTS (SELECT FROM customer_analytics.rfm_rollup_customer)
               AND EXISTS (SELECT FROM customer_analytics.fact_order_line)) THEN
            DELETE FROM customer_analytics.rfm_rollup_customer;
            ids := NULL;
            everyone := true;
            full_refresh := false;
        ELSIF ids IS NOT NULL THEN
            DELETE FROM customer_analytics.rfm_rollup_customer WHERE customer_id IN (SELECT unnest(ids));
        END IF;
        IF everyone OR ids IS NOT NULL THEN
            -- The queued lines this statement sees are in the facts it
            -- reads: they are consumed here, not added again below.
            WITH consumed AS (
                DELETE FROM customer_analytics_internal.rfm_new_line q
                WHERE everyone OR q.customer_id IN (SELECT unnest(ids))
            )
            INSERT INTO customer_analytics.rfm_rollup_customer (customer_id, customer_key, last_order, frequency, monetary)
            SELECT o.customer_id, cur.customer_key, (o.s).last_order, (o.s).frequency, (o.s).monetary
            FROM (SELECT x.customer_id, customer_analytics.rfm_agg(x.ts, x.amount) AS s
                  FROM customer_analytics_internal.rfm_orders(CASE WHEN NOT everyone THEN ids END,
                                                              'infinity') x
                  GROUP BY x.customer_id) o
            LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = o.customer_id AND cur.is_current
                                                         AND cur.customer_key <> -1;
        END IF;

        -- new orders are added to their customers' rows; an order that had
        -- lines before (its line count in the facts is larger) is not new:
        -- its customers are recomputed in the next round
        WITH taken AS (
            DELETE FROM customer_analytics_internal.rfm_new_line RETURNING *
        ), orders AS (
            SELECT t.order_id,
                   count(*) = (SELECT count(*) FROM customer_analytics.fact_order_line f
                               WHERE f.order_id = t.order_id) AS whole
            FROM taken t GROUP BY t.order_id
        ), noted AS (
            INSERT INTO customer_analytics_internal.rfm_dirty_customer
            SELECT DISTINCT t.customer_id FROM taken t JOIN orders o USING (order_id) WHERE NOT o.whole
            ON CONFLICT DO NOTHING
            RETURNING 1
        ), per_order AS (            -- grouped as above
            SELECT t.customer_id, max(t.order_ts) AS ts, sum(t.revenue) AS amount
            FROM taken t JOIN orders o USING (order_id)
            WHERE o.whole AND t.purchase
            GROUP BY t.customer_id, t.order_id, CASE WHEN t.revenue < 0 THEN t.line_number END
        ), added AS (
            INSERT INTO customer_analytics.rfm_rollup_customer AS u (customer_id, customer_key, last_order, frequency, monetary)
            SELECT p.customer_id, cur.customer_key, (p.s).last_order, (p.s).frequency, (p.s).monetary
            FROM (SELECT customer_id, customer_analytics.rfm_agg(ts, amount) AS s FROM per_order GROUP BY customer_id) p
            LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = p.customer_id AND cur.is_current
                                                         AND cur.customer_key <> -1
            ON CONFLICT (customer_id) DO UPDATE
                SET last_order = greatest(u.last_order, excluded.last_order),
                    frequency = u.frequency + excluded.frequency,
                    monetary = u.monetary + excluded.monetary
            RETURNING 1
        )
        SELECT count(*) FROM noted INTO redo;   -- (added runs all the same)
        EXIT WHEN redo = 0 OR rounds >= 10;
    END LOOP;

    -- lines later than as_of (an as_of in the past) are not in rfm(as_of):
    -- then the scores come from the facts
    -- (the last purchase as of then comes from the same inputs)
    later := EXISTS (SELECT FROM customer_analytics.fact_order_line WHERE order_ts > as_of);
    WITH scored AS (
        SELECT s.*, p.last_order AS last_purchase
        FROM customer_analytics.rfm(as_of) s
        JOIN (SELECT x.customer_id, (customer_analytics.rfm_agg(x.ts, x.amount)).last_order
              FROM customer_analytics_internal.rfm_orders(NULL, as_of) x
              GROUP BY x.customer_id) p ON p.customer_id = s.customer_id
        WHERE later
        UNION ALL
        SELECT s.*, u.last_order
        FROM customer_analytics.rfm_from_rollup(as_of) s
        JOIN customer_analytics.rfm_rollup_customer u ON u.customer_id = s.customer_id
        WHERE NOT later
    ), diff AS MATERIALIZED (      -- one pass over both: what to write
        SELECT s.*, t.customer_id AS old_customer_id
        FROM scored s FULL JOIN customer_analytics.customer_rfm_score t ON t.customer_id = s.customer_id
        WHERE s.customer_id IS NULL OR t.customer_id IS NULL
           OR (t.customer_key, t.last_purchase, t.frequency, t.monetary, t.rfm_cell, t.segment)
              IS DISTINCT FROM (s.customer_key, s.last_purchase, s.frequency, s.monetary, s.rfm_cell, s.segment)
    ), updated AS (
        UPDATE customer_analytics.customer_rfm_score t
        SET customer_key = d.customer_key, last_purchase = d.last_purchase, frequency = d.frequency,
            monetary = d.monetary, r = d.r, f = d.f, m = d.m, rfm_cell = d.rfm_cell, segment = d.segment
        FROM diff d
        WHERE t.customer_id = d.customer_id AND d.old_customer_id IS NOT NULL
        RETURNING 1
    ), inserted AS (
        INSERT INTO customer_analytics.customer_rfm_score
            (customer_id, customer_key, last_purchase, frequency, monetary, r, f, m, rfm_cell, segment)
        SELECT d.customer_id, d.customer_key, d.last_purchase, d.frequency, d.monetary, d.r, d.f, d.m, d.rfm_cell, d.segment
        FROM diff d WHERE d.old_customer_id IS NULL
        RETURNING 1
    ), deleted AS (
        DELETE FROM customer_analytics.customer_rfm_score t
        USING diff d
        WHERE t.customer_id = d.old_customer_id AND d.customer_id IS NULL
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM updated) + (SELECT count(*) FROM inserted) + (SELECT count(*) FROM deleted)
    INTO changed;
    INSERT INTO customer_analytics.customer_rfm_refresh (id, as_of, refreshed_at)
    VALUES (true, as_of, clock_timestamp())
    ON CONFLICT (id) DO UPDATE SET as_of = EXCLUDED.as_of, refreshed_at = EXCLUDED.refreshed_at;
    RETURN changed;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.note_dirty_sales_days()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO customer_analytics_internal.sales_dirty_day VALUES ('-infinity') ON CONFLICT DO NOTHING;
    ELSIF TG_TABLE_NAME = 'dim_product' THEN
        -- a product moved to another category: every day it sold on
        INSERT INTO customer_analytics_internal.sales_dirty_day
        SELECT DISTINCT d.date
        FROM old_rows o JOIN new_rows n USING (product_key)
        JOIN customer_analytics.fact_order_line f ON f.product_key = n.product_key
        JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
        WHERE o.category IS DISTINCT FROM n.category
        ON CONFLICT DO NOTHING;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO customer_analytics_internal.sales_dirty_day
        SELECT DISTINCT d.date FROM new_rows r JOIN customer_analytics.dim_date d USING (date_key)
        ON CONFLICT DO NOTHING;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO customer_analytics_internal.sales_dirty_day
        SELECT DISTINCT d.date FROM old_rows r JOIN customer_analytics.dim_date d USING (date_key)
        ON CONFLICT DO NOTHING;
    ELSE
        INSERT INTO customer_analytics_internal.sales_dirty_day
        SELECT DISTINCT d.date
        FROM (SELECT date_key FROM old_rows UNION SELECT date_key FROM new_rows) r
        JOIN customer_analytics.dim_date d USING (date_key)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.refresh_sales_rollup(full_refresh boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    days date[];
    keys integer[];
BEGIN
    -- one maintainer at a time; readers of the rollups never wait
    PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('refresh_sales_rollup()'));
    -- take the noted days (days noted by transactions still running stay for next time)
    WITH taken AS (DELETE FROM customer_analytics_internal.sales_dirty_day RETURNING day)
    SELECT array_agg(day) INTO days FROM taken;
    IF full_refresh OR '-infinity' = ANY (days)
       OR (NOT EXISTS (SELECT FROM customer_analytics.sales_rollup_day)
           AND EXISTS (SELECT FROM customer_analytics.fact_order_line)) THEN
        DELETE FROM customer_analytics.sales_rollup_day;
        DELETE FROM customer_analytics.sales_rollup_category;
        keys := NULL;                   -- every day
    ELSIF days IS NULL THEN
        RETURN 0;
    ELSE
        keys := ARRAY(SELECT customer_analytics.date_key(d) FROM unnest(days) d);
        DELETE FROM customer_analytics.sales_rollup_day WHERE day = ANY (days);
        DELETE FROM customer_analytics.sales_rollup_category WHERE day = ANY (days);
    END IF;

    INSERT INTO customer_analytics.sales_rollup_day (day, revenue, orders, customers)
    -- credit notes (negative quantity) net against revenue but are no
    -- orders, and their customers did not buy that day
    SELECT d.date, sum(f.revenue), count(DISTINCT f.order_id) FILTER (WHERE f.quantity > 0),
           count(DISTINCT c.customer_id) FILTER (WHERE f.customer_key <> -1 AND f.quantity > 0)
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
    JOIN customer_analytics.dim_customer c ON c.customer_key = f.customer_key
    WHERE f.status = 'completed' AND (keys IS NULL OR f.date_key = ANY (keys))
    GROUP BY d.date;

    INSERT INTO customer_analytics.sales_rollup_category (day, category, revenue, orders, units)
    SELECT d.date, p.category, sum(f.revenue), count(DISTINCT f.order_id) FILTER (WHERE f.quantity > 0), sum(f.quantity)
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
    JOIN customer_analytics.dim_product p ON p.product_key = f.product_key
    WHERE f.status = 'completed' AND (keys IS NULL OR f.date_key = ANY (keys))
    GROUP BY d.date, p.category;

    RETURN CASE WHEN keys IS NULL THEN (SELECT count(*) FROM customer_analytics.sales_rollup_day)
                ELSE cardinality(keys) END;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.pipeline_lock_key(scope text DEFAULT 'all')
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT customer_analytics_internal.lock_key(scope) $$;

CREATE OR REPLACE PROCEDURE customer_analytics.run_pipeline(scope text DEFAULT 'all')
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

CREATE OR REPLACE FUNCTION customer_analytics_internal.note_check_change()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    keyexpr text;
    n bigint;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM customer_analytics_internal.check_change WHERE rel = TG_RELID;
        INSERT INTO customer_analytics_internal.check_change (rel, op) VALUES (TG_RELID, 'T');
        RETURN NULL;
    END IF;
    -- a table already due for a whole check needs no detail
    IF EXISTS (SELECT FROM customer_analytics_internal.check_change WHERE rel = TG_RELID AND op = 'T') THEN
        RETURN NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT count(*) INTO n FROM new_rows;
        -- a first load or a backfill: checking the whole table once costs
        -- less than queuing and reading back a million keys
        IF n > 1000000 THEN
            DELETE FROM customer_analytics_internal.check_change WHERE rel = TG_RELID;
            INSERT INTO customer_analytics_internal.check_change (rel, op) VALUES (TG_RELID, 'T');
            RETURN NULL;
        END IF;
        SELECT 'jsonb_build_object(' || string_agg(format('%L, r.%I', c, c), ', ') || ')' INTO keyexpr
        FROM unnest(customer_analytics_internal.key_columns(TG_RELID)) c;
        EXECUTE format('INSERT INTO customer_analytics_internal.check_change (rel, op, key) SELECT $1, ''n'', %s FROM new_rows r',
                       keyexpr) USING TG_RELID;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO customer_analytics_internal.check_change (rel, op, old_row)
        SELECT TG_RELID, 'o', to_jsonb(r) FROM old_rows r;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.track_check_changes(rel regclass)
RETURNS void
LANGUAGE plpgsql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t text;
BEGIN
    IF customer_analytics_internal.key_columns(rel) IS NULL THEN
        RAISE EXCEPTION 'table % has no primary key', rel
            USING ERRCODE = 'invalid_table_definition',
                  DETAIL = 'Changed rows are queued by their primary key.',
                  HINT = 'Add a primary key, or leave the table untracked: its checks then run over the whole table.';
    END IF;
    t := (SELECT c.relname FROM pg_class c WHERE c.oid = rel);
    EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_check_change()', t || '_check_change_ins', rel);
    EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_check_change()', t || '_check_change_upd', rel);
    EXECUTE format('CREATE TRIGGER %I AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_check_change()', t || '_check_change_del', rel);
    EXECUTE format('CREATE TRIGGER %I AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_check_change()', t || '_check_change_trunc', rel);
    -- what happened before the triggers is unknown: the first pass reads it all
    INSERT INTO customer_analytics_internal.check_change (rel, op) VALUES (rel, 'T');
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.tracked(rel regclass)
RETURNS boolean
LANGUAGE sql STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = rel AND NOT t.tgisinternal AND t.tgenabled <> 'D'
                     AND t.tgfoid = 'customer_analytics_internal.note_check_change()'::regprocedure AND t.tgtype & 4 <> 0)
$$;

CREATE OR REPLACE FUNCTION customer_analytics.changed_rows(tbl anyelement)
RETURNS SETOF anyelement
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_rel oid := (SELECT t.typrelid FROM pg_type t WHERE t.oid = pg_typeof(tbl));
    rel regclass;
    keys text[];
BEGIN
    IF target_rel IS NULL OR target_rel = 0 THEN
        RAISE EXCEPTION 'changed_rows() takes a row of a table, e.g. NULL::schema.table'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    rel := target_rel;
    IF to_regclass('pg_temp.ca_check_changes') IS NULL OR NOT customer_analytics_internal.tracked(rel) THEN
        RETURN QUERY EXECUTE format('SELECT * FROM %s', rel);
        RETURN;
    END IF;
    IF EXISTS (SELECT FROM pg_temp.ca_check_changes c WHERE c.rel = target_rel AND c.op = 'T') THEN
        RETURN QUERY EXECUTE format('SELECT * FROM %s', rel);
        RETURN;
    END IF;
    keys := customer_analytics_internal.key_columns(rel);
    RETURN QUERY EXECUTE format(
        'SELECT t.* FROM (SELECT DISTINCT %s FROM pg_temp.ca_check_changes c, jsonb_populate_record(NULL::%s, c.key) k '
        'WHERE c.rel = $1 AND c.op = ''n'') k JOIN %s t ON %s',
        (SELECT string_agg(format('k.%I', x), ', ') FROM unnest(keys) x), rel, rel,
        (SELECT string_agg(format('t.%I = k.%I', x, x), ' AND ') FROM unnest(keys) x))
        USING rel;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.quality_check_incremental_sql(c customer_analytics.quality_check)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tbl regclass;
    cols text[];
    chg text;
    to_tbl regclass;
BEGIN
    IF c.kind = 'custom' THEN
        RETURN c.params->>'incremental_sql';
    END IF;
    tbl := to_regclass(c.target);
    -- untracked tables and windowed checks (row_count_change reads a fixed
    -- number of days by the index on its column) run whole
    IF tbl IS NULL OR c.kind = 'row_count_change' OR NOT customer_analytics_internal.tracked(tbl) THEN
        RETURN NULL;
    END IF;
    -- a value deleted from an untracked referenced table would go unseen
    IF c.kind = 'relationship' AND NOT COALESCE(customer_analytics_internal.tracked(to_regclass(c.params->>'to')), false) THEN
        RETURN NULL;
    END IF;
    cols := ARRAY(SELECT quote_ident(btrim(x)) FROM unnest(string_to_array(c.column_name, ',')) x);
    chg := format('customer_analytics.changed_rows(NULL::%s)', tbl);
    RETURN CASE c.kind
        WHEN 'not_null' THEN format('SELECT * FROM %s WHERE %s IS NULL', chg, array_to_string(cols, ', '))
        -- the groups of the changed values, counted over the whole table
        -- (by an index on the columns when there is one); a NULL key groups
        -- with the other NULLs as GROUP BY does
        WHEN 'unique' THEN format(
            $q$WITH k AS MATERIALIZED (SELECT DISTINCT %1$s FROM %2$s)
               SELECT %1$s, count(*) AS occurrences FROM (
                   SELECT %1$s FROM %3$s t WHERE (%4$s) IN (SELECT %1$s FROM k WHERE %5$s)
                   UNION ALL
                   SELECT %1$s FROM %3$s t
                   WHERE EXISTS (SELECT FROM k WHERE NOT (%5$s)) AND NOT (%6$s)
                     AND EXISTS (SELECT FROM k WHERE ROW(%1$s) IS NOT DISTINCT FROM ROW(%4$s))
               ) u GROUP BY %1$s HAVING count(*) > 1$q$,
            array_to_string(cols, ', '), chg, tbl,
            (SELECT string_agg('t.' || x, ', ') FROM unnest(cols) x),
            (SELECT string_agg(x || ' IS NOT NULL', ' AND ') FROM unnest(cols) x),
            (SELECT string_agg('t.' || x || ' IS NOT NULL', ' AND ') FROM unnest(cols) x))
        -- changed rows pointing nowhere, and rows pointing at a value that an
        -- update or delete took away from the referenced table
        WHEN 'relationship' THEN format(
            $q$SELECT x.* FROM %1$s x WHERE x.%2$s IS NOT NULL AND NOT EXISTS (SELECT FROM %3$s y WHERE y.%4$I = x.%2$s)
               UNION ALL
               SELECT x.* FROM %5$s x
               WHERE x.%2$s IN (SELECT v FROM (SELECT DISTINCT (jsonb_populate_record(NULL::%3$s, o.old_row)).%4$I AS v
                                               FROM pg_temp.ca_check_changes o WHERE o.rel = %6$L::regclass AND o.op = 'o') g
                                WHERE NOT EXISTS (SELECT FROM %3$s y WHERE y.%4$I = g.v))
                 AND NOT EXISTS (SELECT FROM pg_temp.ca_check_changes n
                                 WHERE n.rel = %7$L::regclass AND n.op = 'n' AND n.key = %8$s)$q$,
            chg, cols[1], to_regclass(c.params->>'to'), c.params->>'field', tbl, to_regclass(c.params->>'to')::oid,
            tbl::oid,
            (SELECT 'jsonb_build_object(' || string_agg(format('%L, x.%I', k, k), ', ') || ')'
             FROM unnest(customer_analytics_internal.key_columns(tbl)) k))
        WHEN 'accepted_values' THEN format(
            'SELECT %s, count(*) AS occurrences FROM %s x WHERE %s IS NOT NULL AND %s::text <> ALL (%L::text[]) GROUP BY 1',
            cols[1], chg, cols[1], cols[1], ARRAY(SELECT jsonb_array_elements_text(c.params->'values')))
        -- the newest value: the previous pass's, or a changed row's
        WHEN 'freshness' THEN format(
            'SELECT newest, now() - newest AS age FROM (SELECT GREATEST((SELECT max(%1$s) FROM %2$s), $1::%4$s) AS newest) s '
            'WHERE newest IS NULL OR newest < now() - %3$L::interval',
            cols[1], chg, COALESCE(c.params->>'max_age', '1 day'),
            (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
             WHERE a.attrelid = tbl AND a.attname = btrim(c.column_name)))
    END;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.newest_moved(rel regclass, col text, newest text)
RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    moved boolean;
BEGIN
    IF newest IS NULL THEN
        RETURN EXISTS (SELECT FROM pg_temp.ca_check_changes x WHERE x.rel = newest_moved.rel AND x.op = 'o');
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT FROM pg_temp.ca_check_changes x WHERE x.rel = $1 AND x.op = ''o'' '
                   'AND NOT (jsonb_populate_record(NULL::%s, x.old_row)).%I < $2::%s)',
                   rel, col, (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                              WHERE a.attrelid = rel AND a.attname = col))
        INTO moved USING rel, newest;
    RETURN moved;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.run_checks(run_id bigint DEFAULT NULL, only_target text DEFAULT NULL,
                                              "full" boolean DEFAULT false)
RETURNS TABLE (check_name text, kind text, target text, severity text, passed boolean,
               failing_rows bigint, sample jsonb, incremental boolean)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c customer_analytics.quality_check;
    q text;
    prog customer_analytics_internal.quality_check_progress;
    pass bigint;
    prev_pass bigint;
    def text;
    whole_tables regclass[];
    newest text;
    -- (a session that has not loaded the library yet has no such setting:
    -- its default, or the placeholder a configuration file made)
    full_every interval := COALESCE(NULLIF(current_setting('customer_analytics.full_checks_interval', true), ''), '1 day')::interval;
BEGIN
    IF only_target IS NULL THEN
        -- one pass at a time: a pass takes the queue only once the previous
        -- one has recorded what it found
        PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('run_checks()'));
        SELECT max(p.pass_no) INTO prev_pass FROM customer_analytics_internal.quality_check_progress p;
        pass := nextval('customer_analytics_internal.check_pass_seq');
        CREATE TEMP TABLE IF NOT EXISTS ca_check_changes (LIKE customer_analytics_internal.check_change) ON COMMIT DROP;
        TRUNCATE ca_check_changes;
        WITH taken AS (DELETE FROM customer_analytics_internal.check_change RETURNING *)
        INSERT INTO ca_check_changes SELECT * FROM taken;
        ANALYZE ca_check_changes;
        whole_tables := ARRAY(SELECT DISTINCT x.rel FROM ca_check_changes x WHERE x.op = 'T');
    END IF;
    FOR c IN SELECT * FROM customer_analytics.quality_check qc
             WHERE qc.enabled AND (only_target IS NULL OR qc.target = only_target) ORDER BY qc.name LOOP
        check_name := c.name; kind := c.kind; target := c.target; severity := c.severity;
        def := md5(concat_ws('|', c.kind, c.target, c.column_name, c.params::text));
        SELECT * INTO prog FROM customer_analytics_internal.quality_check_progress p WHERE p.check_name = c.name;
        newest := NULL;
        BEGIN
            q := NULL;
            incremental := false;
            -- (nested: the queue's temporary table exists only in a pass)
            IF pass IS NOT NULL AND NOT "full" AND prog.passed AND prog.pass_no = prev_pass AND prog.definition = def
               AND prog.full_at > now() - full_every THEN
                IF c.kind = 'custom' OR NOT (to_regclass(c.target) = ANY (whole_tables)
                                             OR COALESCE(to_regclass(c.params->>'to') = ANY (whole_tables), false)) THEN
                    -- a row updated or deleted may have been the newest (the
                    -- clickstream's stitching updates events every run, all
                    -- older than the newest: those leave it where it was)
                    IF c.kind <> 'freshness' OR NOT customer_analytics_internal.newest_moved(to_regclass(c.target),
                                                                                       btrim(c.column_name),
                                                                                       prog.state->>'newest') THEN
                        q := customer_analytics.quality_check_incremental_sql(c);
                        incremental := q IS NOT NULL;
                    END IF;
                END IF;
            END IF;
            IF NOT incremental THEN
                q := customer_analytics.quality_check_sql(c);
            END IF;
            -- the check's query runs once: its failing rows (usually none) are kept for the sample
            EXECUTE format('WITH failing AS MATERIALIZED (%s) '
                           'SELECT (SELECT count(*) FROM failing), '
                           '(SELECT jsonb_agg(to_jsonb(s)) FROM (SELECT * FROM failing f LIMIT 5) s)', q)
                INTO failing_rows, sample USING prog.state->>'newest';
            -- freshness carries the newest value over to the next pass
            IF c.kind = 'freshness' AND pass IS NOT NULL THEN
                -- (as JSON: ISO 8601, read back whatever the DateStyle)
                IF incremental THEN
                    EXECUTE format('SELECT to_jsonb(GREATEST((SELECT max(%I) FROM customer_analytics.changed_rows(NULL::%s)), $1::%s)) #>> ''{}''',
                                   btrim(c.column_name), to_regclass(c.target),
                                   (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                                    WHERE a.attrelid = to_regclass(c.target) AND a.attname = btrim(c.column_name)))
                        INTO newest USING prog.state->>'newest';
                ELSE
                    EXECUTE format('SELECT to_jsonb(max(%I)) #>> ''{}'' FROM %s', btrim(c.column_name), to_regclass(c.target))
                        INTO newest;
                END IF;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            -- a check that cannot run has failed, with its error as the sample
            failing_rows := -1;
            sample := jsonb_build_object('error', SQLERRM, 'sqlstate', SQLSTATE);
        END;
        passed := failing_rows = 0;
        INSERT INTO customer_analytics.quality_result (run_id, check_name, severity, passed, failing_rows, sample, incremental)
        VALUES (run_checks.run_id, c.name, c.severity, passed, failing_rows, sample, incremental);
        IF pass IS NOT NULL THEN
            INSERT INTO customer_analytics_internal.quality_check_progress AS p (check_name, pass_no, definition, passed, full_at, state)
            VALUES (c.name, pass, def, passed, CASE WHEN incremental THEN prog.full_at ELSE now() END,
                    CASE WHEN newest IS NOT NULL THEN jsonb_build_object('newest', newest) END)
            ON CONFLICT ON CONSTRAINT quality_check_progress_pkey DO UPDATE
                SET pass_no = EXCLUDED.pass_no, definition = EXCLUDED.definition, passed = EXCLUDED.passed,
                    full_at = EXCLUDED.full_at, state = EXCLUDED.state;
        END IF;
        IF NOT passed THEN
            PERFORM customer_analytics.raise_alert('quality_check', c.name,
                jsonb_build_object('target', c.target, 'kind', c.kind, 'failing_rows', failing_rows, 'sample', sample,
                                   'run_id', run_checks.run_id),
                dedup_key => format('quality_check:%s:%s', c.name, COALESCE(run_checks.run_id::text, clock_timestamp()::text)),
                severity => CASE c.severity WHEN 'error' THEN 'error' ELSE 'warn' END);
        END IF;
        RETURN NEXT;
    END LOOP;
    IF pass IS NOT NULL THEN
        DROP TABLE ca_check_changes;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.fact_event_changed()
    RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        -- no facts, no sessions; and the next event run is a full pass, so
        -- that the old watermark does not turn everything staged into late
        TRUNCATE clickstream_change, sessions;
        DELETE FROM event_transform_state;
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO clickstream_change (visitor, since)
        SELECT visitor(o.customer_id, o.session_id), min(o.event_ts) FROM old_rows o GROUP BY 1;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        INSERT INTO clickstream_change (visitor, since)
        SELECT visitor(n.customer_id, n.session_id), min(n.event_ts) FROM new_rows n GROUP BY 1;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.refresh_sessions(full_rebuild boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    gap     interval := session_gap();
    tz      text := business_timezone();
    st      clickstream_state;
    n       bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('transform_events()'));
    SELECT * INTO st FROM clickstream_state;
    IF st IS NULL OR st.session_gap <> gap OR st.timezone <> tz THEN
        full_rebuild := true;
    END IF;

    IF full_rebuild THEN
        TRUNCATE clickstream_change;
        DELETE FROM sessions;
        GET DIAGNOSTICS n = ROW_COUNT;
        CREATE TEMP TABLE ca_session_events ON COMMIT DROP AS
        SELECT visitor(f.customer_id, f.session_id) AS visitor, f.event_id, f.event_ts,
               f.customer_id, f.customer_key, f.event_type, f.channel, f.device
        FROM fact_event f;
    ELSE
        CREATE TEMP TABLE ca_changed ON COMMIT DROP AS
        WITH taken AS (DELETE FROM clickstream_change RETURNING visitor, since)
        SELECT visitor, min(since) AS since FROM taken GROUP BY visitor;
        ANALYZE ca_changed;

        WITH gone AS (
            DELETE FROM sessions s
            WHERE (s.visitor, s.session_start) IN
                  (SELECT x.visitor, x.session_start
                   FROM ca_changed c
                   CROSS JOIN LATERAL (SELECT o.visitor, o.session_start FROM sessions o
                                       WHERE o.visitor = c.visitor AND o.session_end >= c.since - gap
                                       OFFSET 0) x)
            RETURNING s.visitor, s.session_start
        ), firsts AS (
            SELECT visitor, min(session_start) AS first_start, count(*) AS removed
            FROM gone GROUP BY visitor
        ), moved AS (
            UPDATE ca_changed c SET since = LEAST(c.since, f.first_start)
            FROM firsts f WHERE f.visitor = c.visitor
        )
        SELECT COALESCE(sum(removed), 0) INTO n FROM firsts;

        /*
         * Each changed visitor's events since its time, looked up through
         * the indexes one visitor at a time (OFFSET 0 keeps each lookup a
         * parameterised scan): a join the planner may hash would read the
         * whole dimension and the visitors' whole histories, a cost that
         * grows with the shop instead of with what changed.
         */
        CREATE TEMP TABLE ca_session_events ON COMMIT DROP AS
        SELECT c.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
               f.event_type, f.channel, f.device
        FROM ca_changed c
        CROSS JOIN LATERAL (SELECT d.customer_key FROM dim_customer d
                            WHERE d.customer_id = substr(c.visitor, 3) AND d.customer_key <> -1
                            OFFSET 0) d
        CROSS JOIN LATERAL (SELECT * FROM fact_event f
                            WHERE f.customer_key = d.customer_key AND f.event_ts >= c.since
                            OFFSET 0) f
        WHERE c.visitor LIKE 'c:%'
        UNION ALL
        SELECT c.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
               f.event_type, f.channel, f.device
        FROM ca_changed c
        CROSS JOIN LATERAL (SELECT * FROM fact_event f
                            WHERE f.customer_key = -1 AND f.customer_id = substr(c.visitor, 3)
                              AND f.event_ts >= c.since
                            OFFSET 0) f
        WHERE c.visitor LIKE 'c:%'
        UNION ALL
        SELECT c.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
               f.event_type, f.channel, f.device
        FROM ca_changed c
        CROSS JOIN LATERAL (SELECT * FROM fact_event f
                            WHERE f.session_id = substr(c.visitor, 3) AND f.event_ts >= c.since
                              AND f.customer_id IS NULL
                            OFFSET 0) f
        WHERE c.visitor LIKE 's:%';
        DROP TABLE ca_changed;
    END IF;
    RETURN QUERY VALUES ('sessions_removed', n);
    ANALYZE ca_session_events;

    INSERT INTO sessions (visitor, session_start, session_end, date_key, customer_id, customer_key,
                          events, pages, product_views, add_to_carts, checkouts, purchases,
                          channel, device)
    SELECT e.visitor, min(e.event_ts), max(e.event_ts),
           date_key((min(e.event_ts) AT TIME ZONE tz)::date),
           (array_agg(e.customer_id ORDER BY e.event_ts DESC, e.event_id DESC)
                FILTER (WHERE e.customer_id IS NOT NULL))[1],
           (array_agg(e.customer_key ORDER BY e.event_ts DESC, e.event_id DESC)
                FILTER (WHERE e.customer_key IS NOT NULL))[1],
           count(*),
           count(*) FILTER (WHERE e.event_type IN ('page_view', 'product_view')),
           count(*) FILTER (WHERE e.event_type = 'product_view'),
           count(*) FILTER (WHERE e.event_type = 'add_to_cart'),
           count(*) FILTER (WHERE e.event_type = 'checkout'),
           count(*) FILTER (WHERE e.event_type = 'purchase'),
           (array_agg(e.channel ORDER BY e.event_ts, e.event_id))[1],
           (array_agg(e.device ORDER BY e.event_ts, e.event_id))[1]
    FROM (SELECT x.*,
                 session_number(x.event_ts, gap) OVER (PARTITION BY x.visitor ORDER BY x.event_ts, x.event_id) AS sn
          FROM ca_session_events x) e
    GROUP BY e.visitor, e.sn;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN QUERY VALUES ('sessions_written', n);
    DROP TABLE ca_session_events;

    INSERT INTO clickstream_state (singleton, session_gap, timezone, last_run_at)
    VALUES (true, gap, tz, now())
    ON CONFLICT (singleton) DO UPDATE
        SET session_gap = excluded.session_gap, timezone = excluded.timezone,
            last_run_at = excluded.last_run_at;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.refresh_clickstream(full_refresh boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
BEGIN
    RETURN QUERY SELECT * FROM transform_events(full_refresh);
    RETURN QUERY SELECT * FROM refresh_sessions(full_refresh);
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.grant_analyst(grantee regrole, raw_rejects boolean DEFAULT false)
RETURNS SETOF text
LANGUAGE plpgsql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel regclass;
    stmt text;
BEGIN
    stmt := format('GRANT USAGE ON SCHEMA customer_analytics TO %s', grantee);
    EXECUTE stmt;
    RETURN NEXT stmt;
    -- the functions find their internal helpers there (nothing in it is granted)
    stmt := format('GRANT USAGE ON SCHEMA customer_analytics_internal TO %s', grantee);
    EXECUTE stmt;
    RETURN NEXT stmt;
    -- every table and view but the staging tables and the raw rejects
    FOR rel IN SELECT c.oid FROM pg_class c
               WHERE c.relnamespace = 'customer_analytics'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
                 AND c.relname NOT LIKE 'stg\_%' AND c.relname <> 'ingest_reject'
               ORDER BY c.relname LOOP
        stmt := format('GRANT SELECT ON %s TO %s', rel, grantee);
        EXECUTE stmt;
        RETURN NEXT stmt;
    END LOOP;
    IF raw_rejects THEN
        stmt := format('GRANT SELECT ON customer_analytics.ingest_reject TO %s', grantee);
        EXECUTE stmt;
        RETURN NEXT stmt;
        INSERT INTO customer_analytics.reject_reader VALUES (grantee) ON CONFLICT DO NOTHING;
        RETURN NEXT format('INSERT INTO customer_analytics.reject_reader VALUES (%L)', grantee);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.grant_loader(grantee regrole)
RETURNS SETOF text
LANGUAGE plpgsql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    obj text;
    stmt text;
BEGIN
    stmt := format('GRANT USAGE ON SCHEMA customer_analytics TO %s', grantee);
    EXECUTE stmt;
    RETURN NEXT stmt;
    -- the functions find their internal helpers there (nothing in it is granted)
    stmt := format('GRANT USAGE ON SCHEMA customer_analytics_internal TO %s', grantee);
    EXECUTE stmt;
    RETURN NEXT stmt;
    FOR stmt IN
        -- the staging tables, and the sequences their defaults draw from
        SELECT format('GRANT SELECT, INSERT ON %s TO %s', c.oid::regclass, grantee)
        FROM pg_class c
        WHERE c.relnamespace = 'customer_analytics'::regnamespace AND c.relkind = 'r' AND c.relname LIKE 'stg\_%'
        UNION ALL
        -- a load's own record and rejects (row-level security: its own only)
        SELECT format('GRANT SELECT, INSERT ON %s TO %s', t::regclass, grantee)
        FROM unnest(ARRAY['customer_analytics.ingest_load', 'customer_analytics.ingest_reject']) t
        UNION ALL
        SELECT format('GRANT SELECT ON %s TO %s', t::regclass, grantee)
        FROM unnest(ARRAY['customer_analytics.imputation_rule', 'customer_analytics.ingest_summary']) t
        UNION ALL
        SELECT DISTINCT format('GRANT USAGE ON SEQUENCE %s TO %s', d.refobjid::regclass, grantee)
        FROM pg_attrdef a
        JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = a.oid
                        AND d.refclassid = 'pg_class'::regclass
        JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
        WHERE a.adrelid IN (SELECT c.oid FROM pg_class c
                            WHERE c.relnamespace = 'customer_analytics'::regnamespace
                              AND (c.relname LIKE 'stg\_%' OR c.relname IN ('ingest_load', 'ingest_reject')))
        ORDER BY 1
    LOOP
        EXECUTE stmt;
        RETURN NEXT stmt;
    END LOOP;
    -- ingest_csv/ingest_csv_text draw load ids outside the defaults
    stmt := format('GRANT USAGE ON SEQUENCE customer_analytics.load_id_seq TO %s', grantee);
    EXECUTE stmt;
    RETURN NEXT stmt;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.revoke_access(grantee regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    stmt text;
BEGIN
    DELETE FROM customer_analytics.reject_reader r WHERE r.role = grantee;
    FOR stmt IN
        SELECT format('REVOKE ALL ON %s FROM %s', c.oid::regclass, grantee)
        FROM pg_class c
        WHERE c.relnamespace = 'customer_analytics'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
          AND c.relname <> 'reject_reader'
        ORDER BY c.relname
    LOOP
        EXECUTE stmt;
    END LOOP;
    EXECUTE format('REVOKE USAGE ON SCHEMA customer_analytics, customer_analytics_internal FROM %s', grantee);
END
$$;

COMMENT ON TABLE customer_analytics_internal.event_transform_state IS
    'Where the event part of transform() (transform_events) stopped: its own snapshot, so that events can be processed every minute apart from the batch tables, and the event-time watermark (latest event time processed, never later than the run) from which the lateness window is counted; own_xid: the run''s own transaction, whose rows the next run sees again';
COMMENT ON TABLE customer_analytics_internal.transform_state IS
    'Where transform() stopped: the staged rows of transactions visible in snapshot are done; a different system_identifier (restored cluster) forces a full pass';
COMMENT ON FUNCTION customer_analytics_internal.lock_key(text) IS
    'Internal: the bigint advisory lock key of a named operation of the extension (''transform()'', ''refresh_customer_rfm()'', a pipeline scope ...)';
COMMENT ON FUNCTION customer_analytics_internal.customer_versions(text[]) IS
    'Internal: the versions of the given customers with the range each is in effect over, the first opened to -infinity (a fact is keyed to the version in effect at its time)';
COMMENT ON FUNCTION customer_analytics_internal.stage_order_batch(pg_snapshot, pg_snapshot, xid8, xid8, xid8) IS
    'Internal to transform(): the staged products, customers and order lines of this run (latest version per natural key) in temporary tables';
COMMENT ON FUNCTION customer_analytics_internal.load_dim_product() IS
    'Internal to transform(): the batch''s products into dim_product (type 1); returns the rows written';
COMMENT ON FUNCTION customer_analytics_internal.load_dim_customer() IS
    'Internal to transform(): the batch''s customer versions into dim_customer (type 2: a changed version closes the current one); returns the versions inserted';
COMMENT ON FUNCTION customer_analytics_internal.load_fact_order_line() IS
    'Internal to transform(): the batch''s order lines into fact_order_line (upsert on order and line, the latest staged version wins, unknown members for missing keys); returns the rows written';
COMMENT ON FUNCTION customer_analytics_internal.repair_order_line_keys() IS
    'Internal to transform(): order lines keyed to an unknown member whose customer or product has arrived since get its key; returns the lines re-keyed';
COMMENT ON FUNCTION customer_analytics_internal.stage_event_batch(pg_snapshot, pg_snapshot, xid8, xid8, xid8) IS
    'Internal to transform_events(): the staged events of this run (latest version per event id) in a temporary table';
COMMENT ON FUNCTION customer_analytics_internal.hold_back_late_events(timestamptz, xid8) IS
    'Internal to transform_events(): takes the events older than the cutoff out of the batch (they stay staged) and alerts; returns how many';
COMMENT ON FUNCTION customer_analytics_internal.load_fact_event() IS
    'Internal to transform_events(): the batch''s events into fact_event (upsert on event_id, the latest staged version wins; anonymous stays NULL, an unknown customer is -1); returns the rows written';
COMMENT ON FUNCTION customer_analytics_internal.stitch_sessions() IS
    'Internal to transform_events(): anonymous events of the batch''s sessions take the customer of the next identified event of their session; returns the events changed';
COMMENT ON FUNCTION customer_analytics_internal.repair_event_customer_keys() IS
    'Internal to transform_events(): events keyed to the unknown customer whose customer has arrived since get the version in effect; returns the events re-keyed';
COMMENT ON TABLE customer_analytics_internal.rfm_dirty_customer IS
    'Customers whose order lines or versions changed since the last refresh_customer_rfm() (NULL: everyone, after a TRUNCATE)';
COMMENT ON TABLE customer_analytics_internal.rfm_new_line IS
    'Order lines inserted since the last refresh_customer_rfm() (purchase: a completed line of a known customer, not a credit line worth nothing); an order whose lines are all here is added to its customer''s rollup without reading their other lines';
COMMENT ON TABLE customer_analytics.customer_rfm_score IS
    'The scores behind customer_rfm, written by refresh_customer_rfm() (only the rows that changed); recency is computed by the view from last_purchase, so that time passing rewrites nothing';
COMMENT ON COLUMN customer_analytics.customer_rfm_score.last_purchase IS
    'Time of the customer''s last purchase (returns do not move it) up to the as_of of the refresh; customer_rfm''s recency_days is counted from it';
COMMENT ON FUNCTION customer_analytics_internal.rfm_orders(text[], timestamptz) IS
    'Internal: rfm()''s inputs on the star schema, one row per purchase (an order) or return (a credit line) of the given customers (NULL: all) up to a time';
COMMENT ON TABLE customer_analytics_internal.sales_dirty_day IS
    'Days whose order lines changed since the last refresh_sales_rollup() (-infinity: everything, after a TRUNCATE)';
COMMENT ON TABLE customer_analytics_internal.check_change IS
    'Rows written since the checks last ran, queued by statement triggers (track_check_changes): op n is a row inserted or updated (key: its primary key), o a row as it was before an update or delete (old_row), T the whole table (truncated, or a statement too big to queue row by row). Consumed by run_checks(); not dumped: the first run after a restore checks everything';
COMMENT ON TABLE customer_analytics_internal.quality_check_progress IS
    'Per check: the pass of run_checks() that last ran it, the definition it ran (md5), whether it passed, when it last ran over whole tables, and what an incremental run carries over (freshness: the newest value). Derived: not dumped';
COMMENT ON SEQUENCE customer_analytics_internal.check_pass_seq IS
    'Numbers the passes of run_checks() that consume check_change';
COMMENT ON TABLE customer_analytics_internal.clickstream_change IS
    'Internal: visitors whose events changed since the last refresh_clickstream(), from when (filled by a trigger on fact_event)';
COMMENT ON TABLE customer_analytics_internal.clickstream_state IS
    'Internal: the settings the sessions table was built with; a different gap or time zone makes refresh_clickstream() rebuild it';
COMMENT ON FUNCTION customer_analytics.revoke_access(regrole) IS
    'Takes back what grant_analyst() and grant_loader() gave a role (every privilege on the extension''s tables, views and sequences, and the schemas)';

-- issue 18: the full rebuild of the RFM rollup from rfm()'s C scan (rfm_rollup_rows)
CREATE FUNCTION customer_analytics_internal.rfm_rollup_rows(up_to timestamptz)
RETURNS TABLE (customer_id text, customer_key bigint, last_order timestamptz, frequency bigint, monetary numeric)
AS 'MODULE_PATHNAME', 'ca_rfm_rollup_rows'
LANGUAGE C STABLE STRICT PARALLEL RESTRICTED
ROWS 10000;
COMMENT ON FUNCTION customer_analytics_internal.rfm_rollup_rows(timestamptz) IS
    'Internal: rfm_rollup_customer''s rows for every customer with a counted line up to a time (the current version''s key, last purchase, purchases, monetary value), from one C scan of the facts as rfm() reads them';

CREATE OR REPLACE FUNCTION customer_analytics.refresh_customer_rfm(full_refresh boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ids text[];
    everyone boolean;
    as_of timestamptz := customer_analytics.reference_time();
    map text := COALESCE(NULLIF(current_setting('customer_analytics.rfm_segment_map', true), ''), 'default');
    redo bigint;
    rounds integer := 0;
    later boolean;
    changed bigint;
BEGIN
    -- one maintainer at a time; readers never wait
    PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('refresh_customer_rfm()'));
    IF (SELECT count(*) FROM customer_analytics.rfm_segment_cells(map)) <> 125 THEN
        RAISE EXCEPTION 'RFM segment map "%" does not name all 125 cells', map
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('See SELECT * FROM customer_analytics.rfm_check_segment_map(%L);', map);
    END IF;
    LOOP
        rounds := rounds + 1;
        -- take the noted customers (those noted by transactions still running stay for next time)
        WITH taken AS (DELETE FROM customer_analytics_internal.rfm_dirty_customer RETURNING customer_id)
        SELECT array_agg(customer_id) FILTER (WHERE customer_id IS NOT NULL), bool_or(customer_id IS NULL)
        INTO ids, everyone FROM taken;
        IF full_refresh OR everyone
           OR (NOT EXISTS (SELECT FROM customer_analytics.rfm_rollup_customer)
               AND EXISTS (SELECT FROM customer_analytics.fact_order_line)) THEN
            DELETE FROM customer_analytics.rfm_rollup_customer;
            ids := NULL;
            everyone := true;
            full_refresh := false;
        ELSIF ids IS NOT NULL THEN
            DELETE FROM customer_analytics.rfm_rollup_customer WHERE customer_id IN (SELECT unnest(ids));
        END IF;
        -- The queued lines these statements see are in the facts they
        -- read: they are consumed here, not added again below.
        IF everyone THEN
            WITH consumed AS (
                DELETE FROM customer_analytics_internal.rfm_new_line
            )
            INSERT INTO customer_analytics.rfm_rollup_customer (customer_id, customer_key, last_order, frequency, monetary)
            SELECT r.customer_id, r.customer_key, r.last_order, r.frequency, r.monetary
            FROM customer_analytics_internal.rfm_rollup_rows('infinity') r;
        ELSIF ids IS NOT NULL THEN
            -- a few customers: their lines through the indexes
            WITH consumed AS (
                DELETE FROM customer_analytics_internal.rfm_new_line q
                WHERE q.customer_id IN (SELECT unnest(ids))
            )
            INSERT INTO customer_analytics.rfm_rollup_customer (customer_id, customer_key, last_order, frequency, monetary)
            SELECT o.customer_id, cur.customer_key, (o.s).last_order, (o.s).frequency, (o.s).monetary
            FROM (SELECT x.customer_id, customer_analytics.rfm_agg(x.ts, x.amount) AS s
                  FROM customer_analytics_internal.rfm_orders(ids, 'infinity') x
                  GROUP BY x.customer_id) o
            LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = o.customer_id AND cur.is_current
                                                         AND cur.customer_key <> -1;
        END IF;

        -- new orders are added to their customers' rows; an order that had
        -- lines before (its line count in the facts is larger) is not new:
        -- its customers are recomputed in the next round
        WITH taken AS (
            DELETE FROM customer_analytics_internal.rfm_new_line RETURNING *
        ), orders AS (
            SELECT t.order_id,
                   count(*) = (SELECT count(*) FROM customer_analytics.fact_order_line f
                               WHERE f.order_id = t.order_id) AS whole
            FROM taken t GROUP BY t.order_id
        ), noted AS (
            INSERT INTO customer_analytics_internal.rfm_dirty_customer
            SELECT DISTINCT t.customer_id FROM taken t JOIN orders o USING (order_id) WHERE NOT o.whole
            ON CONFLICT DO NOTHING
            RETURNING 1
        ), per_order AS (            -- grouped as above
            SELECT t.customer_id, max(t.order_ts) AS ts, sum(t.revenue) AS amount
            FROM taken t JOIN orders o USING (order_id)
            WHERE o.whole AND t.purchase
            GROUP BY t.customer_id, t.order_id, CASE WHEN t.revenue < 0 THEN t.line_number END
        ), added AS (
            INSERT INTO customer_analytics.rfm_rollup_customer AS u (customer_id, customer_key, last_order, frequency, monetary)
            SELECT p.customer_id, cur.customer_key, (p.s).last_order, (p.s).frequency, (p.s).monetary
            FROM (SELECT customer_id, customer_analytics.rfm_agg(ts, amount) AS s FROM per_order GROUP BY customer_id) p
            LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = p.customer_id AND cur.is_current
                                                         AND cur.customer_key <> -1
            ON CONFLICT (customer_id) DO UPDATE
                SET last_order = greatest(u.last_order, excluded.last_order),
                    frequency = u.frequency + excluded.frequency,
                    monetary = u.monetary + excluded.monetary
            RETURNING 1
        )
        SELECT count(*) FROM noted INTO redo;   -- (added runs all the same)
        EXIT WHEN redo = 0 OR rounds >= 10;
    END LOOP;

    -- lines later than as_of (an as_of in the past) are not in rfm(as_of):
    -- then the scores come from the facts
    -- (the last purchase as of then comes from the same inputs)
    later := EXISTS (SELECT FROM customer_analytics.fact_order_line WHERE order_ts > as_of);
    WITH scored AS (
        SELECT s.*, p.last_order AS last_purchase
        FROM customer_analytics.rfm(as_of) s
        JOIN (SELECT x.customer_id, (customer_analytics.rfm_agg(x.ts, x.amount)).last_order
              FROM customer_analytics_internal.rfm_orders(NULL, as_of) x
              GROUP BY x.customer_id) p ON p.customer_id = s.customer_id
        WHERE later
        UNION ALL
        SELECT s.*, u.last_order
        FROM customer_analytics.rfm_from_rollup(as_of) s
        JOIN customer_analytics.rfm_rollup_customer u ON u.customer_id = s.customer_id
        WHERE NOT later
    ), diff AS MATERIALIZED (      -- one pass over both: what to write
        SELECT s.*, t.customer_id AS old_customer_id
        FROM scored s FULL JOIN customer_analytics.customer_rfm_score t ON t.customer_id = s.customer_id
        WHERE s.customer_id IS NULL OR t.customer_id IS NULL
           OR (t.customer_key, t.last_purchase, t.frequency, t.monetary, t.rfm_cell, t.segment)
              IS DISTINCT FROM (s.customer_key, s.last_purchase, s.frequency, s.monetary, s.rfm_cell, s.segment)
    ), updated AS (
        UPDATE customer_analytics.customer_rfm_score t
        SET customer_key = d.customer_key, last_purchase = d.last_purchase, frequency = d.frequency,
            monetary = d.monetary, r = d.r, f = d.f, m = d.m, rfm_cell = d.rfm_cell, segment = d.segment
        FROM diff d
        WHERE t.customer_id = d.customer_id AND d.old_customer_id IS NOT NULL
        RETURNING 1
    ), inserted AS (
        INSERT INTO customer_analytics.customer_rfm_score
            (customer_id, customer_key, last_purchase, frequency, monetary, r, f, m, rfm_cell, segment)
        SELECT d.customer_id, d.customer_key, d.last_purchase, d.frequency, d.monetary, d.r, d.f, d.m, d.rfm_cell, d.segment
        FROM diff d WHERE d.old_customer_id IS NULL
        RETURNING 1
    ), deleted AS (
        DELETE FROM customer_analytics.customer_rfm_score t
        USING diff d
        WHERE t.customer_id = d.old_customer_id AND d.customer_id IS NULL
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM updated) + (SELECT count(*) FROM inserted) + (SELECT count(*) FROM deleted)
    INTO changed;
    INSERT INTO customer_analytics.customer_rfm_refresh (id, as_of, refreshed_at)
    VALUES (true, as_of, clock_timestamp())
    ON CONFLICT (id) DO UPDATE SET as_of = EXCLUDED.as_of, refreshed_at = EXCLUDED.refreshed_at;
    RETURN changed;
END
$$;

-- issue 22: segment_summary and top_customers cost what changed: segment_summary
-- reads per-segment sums kept by a trigger on customer_rfm_score
-- (avg_recency_days becomes the average of exact day counts), top_customers
-- reads the first rows of customer_rfm_score_monetary_idx and looks their
-- details up by key; the 'customer rfm' task feeds the sums
/*
 * segment_summary's sums per segment, kept by a statement trigger on
 * customer_rfm_score from the rows each statement writes: the summary then
 * costs the number of segments, not of customers.  Derived from
 * customer_rfm_score, so not dumped: restoring the scores' rows fires the
 * trigger and fills it again.
 */
CREATE TABLE customer_analytics_internal.rfm_segment_stat (
    segment         text PRIMARY KEY,
    customers       bigint NOT NULL,
    monetary        numeric NOT NULL,
    frequency       bigint NOT NULL,
    -- recency is counted from last_purchase at as_of: a sum of epochs
    -- gives the average age at any as_of without visiting a customer
    purchase_epochs numeric NOT NULL
);
COMMENT ON TABLE customer_analytics_internal.rfm_segment_stat IS
    'Per segment of customer_rfm_score: customers, sums of monetary, frequency and last_purchase (epoch seconds); kept by a trigger on customer_rfm_score, read by segment_summary. Derived: not dumped, refilled when the scores are restored';

CREATE FUNCTION customer_analytics_internal.maintain_rfm_segment_stat()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM customer_analytics_internal.rfm_segment_stat;
        RETURN NULL;
    END IF;
    -- the transition tables that exist depend on the operation
    EXECUTE format($q$
        INSERT INTO customer_analytics_internal.rfm_segment_stat AS s
        SELECT segment, sum(n)::bigint, sum(n * monetary), sum(n * frequency)::bigint,
               sum(n * EXTRACT(epoch FROM last_purchase))
        FROM (%s) c (n, segment, monetary, frequency, last_purchase)
        GROUP BY segment
        ORDER BY segment    -- two writers lock the segments in the same order
        ON CONFLICT (segment) DO UPDATE
            SET customers = s.customers + excluded.customers,
                monetary = s.monetary + excluded.monetary,
                frequency = s.frequency + excluded.frequency,
                purchase_epochs = s.purchase_epochs + excluded.purchase_epochs$q$,
        CASE TG_OP
            WHEN 'INSERT' THEN 'SELECT 1, segment, monetary, frequency, last_purchase FROM new_rows'
            WHEN 'DELETE' THEN 'SELECT -1, segment, monetary, frequency, last_purchase FROM old_rows'
            ELSE 'SELECT 1, segment, monetary, frequency, last_purchase FROM new_rows
                  UNION ALL SELECT -1, segment, monetary, frequency, last_purchase FROM old_rows'
        END);
    DELETE FROM customer_analytics_internal.rfm_segment_stat WHERE customers = 0;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.maintain_rfm_segment_stat() IS
    'Statement trigger on customer_rfm_score: adds the rows a statement wrote to rfm_segment_stat and takes away the rows it replaced or deleted';

CREATE TRIGGER customer_rfm_score_segment_stat_ins AFTER INSERT ON customer_analytics.customer_rfm_score
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.maintain_rfm_segment_stat();
CREATE TRIGGER customer_rfm_score_segment_stat_upd AFTER UPDATE ON customer_analytics.customer_rfm_score
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.maintain_rfm_segment_stat();
CREATE TRIGGER customer_rfm_score_segment_stat_del AFTER DELETE ON customer_analytics.customer_rfm_score
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.maintain_rfm_segment_stat();
CREATE TRIGGER customer_rfm_score_segment_stat_trunc AFTER TRUNCATE ON customer_analytics.customer_rfm_score
    FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.maintain_rfm_segment_stat();
-- the scores kept through the upgrade
INSERT INTO customer_analytics_internal.rfm_segment_stat
SELECT segment, count(*), sum(monetary), sum(frequency), sum(EXTRACT(epoch FROM last_purchase))
FROM customer_analytics.customer_rfm_score GROUP BY segment;

DROP MATERIALIZED VIEW customer_analytics.top_customers;
DROP MATERIALIZED VIEW customer_analytics.segment_summary;

-- The LIMIT makes the planner read the first rows of
-- customer_rfm_score_monetary_idx, and the OFFSET 0 fence makes it look up
-- their details by key: a hash join would read every customer's version.
CREATE MATERIALIZED VIEW customer_analytics.top_customers AS
SELECT t.rank, t.customer_id, t.customer_key, d.name, d.email, d.city, d.country,
       t.monetary, t.frequency, t.recency_days, t.rfm_cell, t.segment
FROM (SELECT c.*, row_number() OVER (ORDER BY c.monetary DESC, c.customer_id) AS rank
      FROM (SELECT * FROM customer_analytics.customer_rfm
            ORDER BY monetary DESC, customer_id
            LIMIT customer_analytics.top_customers_limit()) c) t
LEFT JOIN LATERAL (SELECT x.name, x.email, x.city, x.country FROM customer_analytics.dim_customer x
                   WHERE x.customer_key = t.customer_key OFFSET 0) d ON true;
CREATE UNIQUE INDEX top_customers_rank_idx ON customer_analytics.top_customers (rank);
COMMENT ON MATERIALIZED VIEW customer_analytics.top_customers IS
    'The customers with the highest monetary value (how many: customer_analytics.top_customers, default 100), with their current details and segment';

-- avg_recency_days: the average of exact (fractional) day counts, which
-- the sums give; customer_rfm's recency_days are whole days
CREATE MATERIALIZED VIEW customer_analytics.segment_summary AS
SELECT g.segment,
       g.customers,
       g.monetary AS revenue,
       round(g.monetary / NULLIF(sum(g.monetary) OVER (), 0), 4) AS revenue_share,
       round(g.monetary / NULLIF(g.frequency, 0), 2) AS avg_order_value,
       round(g.frequency::numeric / g.customers, 2) AS avg_orders,
       round((g.customers * EXTRACT(epoch FROM a.as_of) - g.purchase_epochs) / (g.customers * 86400), 1)
           AS avg_recency_days
FROM customer_analytics_internal.rfm_segment_stat g
CROSS JOIN customer_analytics.customer_rfm_refresh a;
CREATE UNIQUE INDEX segment_summary_segment_idx ON customer_analytics.segment_summary (segment);
COMMENT ON MATERIALIZED VIEW customer_analytics.segment_summary IS
    'Per RFM segment: customers, revenue and its share of all revenue, average order value, average orders and average recency in days (exact, to 0.1 day)';
UPDATE customer_analytics.pipeline_task
SET feeds = '{customer_analytics.customer_rfm_score,customer_analytics.customer_rfm_refresh,customer_analytics_internal.rfm_segment_stat}'
WHERE task = 'customer rfm' AND builtin;

-- issue 22: the repair of late-arriving dimensions reads a queue of the
-- lines it can repair (unknown member, known customer or product id), not
-- the whole staging history; filled here from the facts and staging once
CREATE TABLE customer_analytics_internal.unknown_member_line (
    order_id    text NOT NULL,
    line_number integer NOT NULL,
    customer_id text,
    product_id  text,
    PRIMARY KEY (order_id, line_number)
);
COMMENT ON TABLE customer_analytics_internal.unknown_member_line IS
    'Internal: order lines keyed to an unknown member whose customer or product id is known (a dimension row that has not arrived yet); transform() repairs them when it adds dimension rows';
SELECT pg_catalog.pg_extension_config_dump('customer_analytics_internal.unknown_member_line', '');
INSERT INTO customer_analytics_internal.unknown_member_line (order_id, line_number, customer_id, product_id)
SELECT l.order_id, l.line_number, l.customer_id, l.product_id
FROM (SELECT DISTINCT ON (s.order_id, s.line_number) s.order_id, s.line_number, s.customer_id, s.product_id,
             f.customer_key, f.product_key
      FROM customer_analytics.stg_orders s
      JOIN customer_analytics.fact_order_line f USING (order_id, line_number)
      WHERE f.customer_key = -1 OR f.product_key = -1
      ORDER BY s.order_id, s.line_number, s.stage_id DESC) l
WHERE (l.customer_key = -1 AND l.customer_id IS NOT NULL) OR (l.product_key = -1 AND l.product_id IS NOT NULL);

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_fact_order_line()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    tz text := business_timezone();
    n bigint;
BEGIN
    CREATE TEMP TABLE ca_customer_lookup ON COMMIT DROP AS
    SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT o.customer_id FROM ca_batch_orders o
                                          WHERE o.customer_id IS NOT NULL));
    ANALYZE ca_customer_lookup;

    INSERT INTO fact_order_line AS f
        (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity,
         unit_price, discount, status, channel, updated_at, stage_id, load_id)
    SELECT s.order_id, s.line_number,
           COALESCE(c.customer_key, -1),
           COALESCE(p.product_key, -1),
           date_key((s.order_ts AT TIME ZONE tz)::date),
           s.order_ts, s.quantity, s.unit_price, s.discount, s.status, s.channel,
           s.updated_at, s.stage_id, s.load_id
    FROM ca_batch_orders s
    LEFT JOIN ca_customer_lookup c
           ON c.customer_id = s.customer_id AND s.order_ts >= c.valid_from AND s.order_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id
    ON CONFLICT (order_id, line_number) DO UPDATE
        SET customer_key = excluded.customer_key, product_key = excluded.product_key,
            date_key = excluded.date_key, order_ts = excluded.order_ts,
            quantity = excluded.quantity, unit_price = excluded.unit_price,
            discount = excluded.discount, status = excluded.status,
            channel = excluded.channel, updated_at = excluded.updated_at,
            stage_id = excluded.stage_id, load_id = excluded.load_id
        WHERE excluded.stage_id > f.stage_id
          AND (f.customer_key, f.product_key, f.order_ts, f.quantity, f.unit_price,
               f.discount, f.status, f.channel, f.updated_at)
              IS DISTINCT FROM
              (excluded.customer_key, excluded.product_key, excluded.order_ts, excluded.quantity,
               excluded.unit_price, excluded.discount, excluded.status, excluded.channel,
               excluded.updated_at);
    GET DIAGNOSTICS n = ROW_COUNT;
    -- the lines of this batch a later dimension row may repair (a batch
    -- line that did resolve leaves the queue)
    MERGE INTO unknown_member_line q
    USING (SELECT s.order_id, s.line_number, s.customer_id, s.product_id,
                  (s.customer_id IS NOT NULL AND c.customer_key IS NULL)
                  OR (s.product_id IS NOT NULL AND p.product_key IS NULL) AS unresolved
           FROM ca_batch_orders s
           LEFT JOIN ca_customer_lookup c
                  ON c.customer_id = s.customer_id AND s.order_ts >= c.valid_from AND s.order_ts < c.valid_to
           LEFT JOIN dim_product p ON p.product_id = s.product_id) b
    ON q.order_id = b.order_id AND q.line_number = b.line_number
    WHEN MATCHED AND NOT b.unresolved THEN DELETE
    WHEN MATCHED THEN UPDATE SET customer_id = b.customer_id, product_id = b.product_id
    WHEN NOT MATCHED AND b.unresolved THEN
        INSERT (order_id, line_number, customer_id, product_id)
        VALUES (b.order_id, b.line_number, b.customer_id, b.product_id);
    DROP TABLE ca_customer_lookup;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.repair_order_line_keys()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    CREATE TEMP TABLE ca_repairs ON COMMIT DROP AS
    SELECT q.order_id, q.line_number, q.customer_id, q.product_id, f.order_id IS NULL AS gone,
           COALESCE(v.customer_key, -1) AS customer_key,
           COALESCE(p.product_key, -1) AS product_key
    FROM unknown_member_line q
    LEFT JOIN fact_order_line f ON f.order_id = q.order_id AND f.line_number = q.line_number
    LEFT JOIN customer_versions(ARRAY(SELECT DISTINCT u.customer_id FROM unknown_member_line u
                                      WHERE u.customer_id IS NOT NULL)) v
           ON v.customer_id = q.customer_id AND f.order_ts >= v.valid_from AND f.order_ts < v.valid_to
    LEFT JOIN dim_product p ON p.product_id = q.product_id;

    UPDATE fact_order_line f
    SET customer_key = r.customer_key, product_key = r.product_key
    FROM ca_repairs r
    WHERE NOT r.gone AND f.order_id = r.order_id AND f.line_number = r.line_number
      AND (f.customer_key, f.product_key) IS DISTINCT FROM (r.customer_key, r.product_key);
    GET DIAGNOSTICS n = ROW_COUNT;

    -- resolved (or no longer in the facts): out of the queue
    DELETE FROM unknown_member_line q
    USING ca_repairs r
    WHERE q.order_id = r.order_id AND q.line_number = r.line_number
      AND (r.gone OR ((r.customer_key <> -1 OR r.customer_id IS NULL)
                      AND (r.product_key <> -1 OR r.product_id IS NULL)));
    DROP TABLE ca_repairs;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.transform(full_refresh boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    saved       transform_state;
    w           record;
    sysid       bigint;
    tz          text := business_timezone();
    products    bigint;
    customers   bigint;
    unknown_before boolean;
BEGIN
    -- one transform at a time; the second waits, then sees the first's work
    PERFORM pg_advisory_xact_lock(lock_key('transform()'));

    SELECT system_identifier INTO sysid FROM pg_control_system();
    SELECT * INTO saved FROM transform_state;
    SELECT * INTO w FROM staged_window(saved.snapshot, saved.system_identifier, sysid, full_refresh);
    PERFORM stage_order_batch(w.snap, w.prev, w.lo, w.hi, pg_current_xact_id_if_assigned());

    products := load_dim_product();
    customers := load_dim_customer();
    RETURN QUERY VALUES ('dim_product', products), ('dim_customer', customers);
    RETURN QUERY SELECT 'dim_date', ensure_dim_date(min(d), max(d))
                 FROM (SELECT (order_ts AT TIME ZONE tz)::date AS d FROM ca_batch_orders) days;

    /*
     * Lines already pointing at an unknown member before this run are the
     * only ones the repair of late-arriving dimensions can change (the lines
     * this run writes are looked up in the dimensions as they now are), and
     * only if this run added dimension rows.
     */
    unknown_before := products + customers > 0 AND EXISTS (SELECT FROM unknown_member_line);
    RETURN QUERY SELECT 'fact_order_line', load_fact_order_line();
    RETURN QUERY SELECT 'late_dimension_fixes',
                        CASE WHEN unknown_before THEN repair_order_line_keys() ELSE 0 END;

    INSERT INTO transform_state (singleton, snapshot, system_identifier, last_run_at)
    VALUES (true, w.snap, sysid, now())
    ON CONFLICT (singleton) DO UPDATE
        SET snapshot = excluded.snapshot,
            system_identifier = excluded.system_identifier,
            last_run_at = excluded.last_run_at;

    DROP TABLE ca_batch_products, ca_batch_customers, ca_batch_orders;

    /* clickstream events: their own snapshot, so refresh_clickstream() can run them alone */
    RETURN QUERY SELECT * FROM transform_events(full_refresh);
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.repair_order_line_keys() IS
    'Internal to transform(): order lines keyed to an unknown member whose customer or product has arrived since get its key (read from the queue unknown_member_line, not from the staging history); returns the lines re-keyed';

-- issue 22: the dimensions' statistics renewed by transform() only when a
-- dimension grew by a tenth or more

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_dim_product()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO dim_product AS d (product_id, name, category, subcategory, unit_cost, list_price,
                                  updated_at, stage_id)
    SELECT product_id, name, category, subcategory, unit_cost, list_price, updated_at, stage_id
    FROM ca_batch_products
    ON CONFLICT (product_id) DO UPDATE
        SET name = excluded.name, category = excluded.category, subcategory = excluded.subcategory,
            unit_cost = excluded.unit_cost, list_price = excluded.list_price,
            updated_at = excluded.updated_at, stage_id = excluded.stage_id
        WHERE excluded.stage_id > d.stage_id
          AND (d.name, d.category, d.subcategory, d.unit_cost, d.list_price)
              IS DISTINCT FROM
              (excluded.name, excluded.category, excluded.subcategory, excluded.unit_cost, excluded.list_price);
    GET DIAGNOSTICS n = ROW_COUNT;
    -- the fact joins that follow are planned on these statistics: renewed
    -- when the table grew by a tenth or more (a few rows more do not change
    -- a plan, and ANALYZE reads up to 30,000 rows whatever the change)
    IF n > 0 AND n * 10 >= (SELECT GREATEST(c.reltuples, 0) FROM pg_class c
                            WHERE c.oid = 'customer_analytics.dim_product'::regclass) THEN
        ANALYZE dim_product;
    END IF;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_dim_customer()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    CREATE TEMP TABLE ca_new_versions ON COMMIT DROP AS
    WITH cur AS (
        SELECT d.customer_id, d.name, d.email, d.city, d.state, d.country, d.signup_date,
               d.valid_from AS version_ts, false AS is_new
        FROM dim_customer d
        WHERE d.is_current AND d.customer_id IN (SELECT customer_id FROM ca_batch_customers)
    ), chain AS (
        SELECT * FROM cur
        UNION ALL
        SELECT b.customer_id, b.name, b.email, b.city, b.state, b.country, b.signup_date,
               b.version_ts, true
        FROM ca_batch_customers b
        LEFT JOIN cur c ON c.customer_id = b.customer_id
        WHERE c.customer_id IS NULL OR b.version_ts > c.version_ts
    ), diffed AS (
        SELECT ch.*,
               ROW(ch.name, ch.email, ch.city, ch.state, ch.country, ch.signup_date)
                   IS DISTINCT FROM
               lag(ROW(ch.name, ch.email, ch.city, ch.state, ch.country, ch.signup_date))
                   OVER (PARTITION BY ch.customer_id ORDER BY ch.version_ts) AS changed
        FROM chain ch
    )
    SELECT df.customer_id, df.name, df.email, df.city, df.state, df.country,
           df.signup_date, df.version_ts
    FROM diffed df
    WHERE df.is_new AND df.changed;

    UPDATE dim_customer d
    SET valid_to = f.first_ts, is_current = false
    FROM (SELECT customer_id, min(version_ts) AS first_ts
          FROM ca_new_versions GROUP BY customer_id) f
    WHERE d.customer_id = f.customer_id AND d.is_current;

    INSERT INTO dim_customer (customer_id, name, email, city, state, country, signup_date,
                              valid_from, valid_to, is_current)
    SELECT nv.customer_id, nv.name, nv.email, nv.city, nv.state, nv.country, nv.signup_date,
           nv.version_ts,
           COALESCE(lead(nv.version_ts) OVER w, 'infinity'),
           lead(nv.version_ts) OVER w IS NULL
    FROM ca_new_versions nv
    WINDOW w AS (PARTITION BY nv.customer_id ORDER BY nv.version_ts);
    GET DIAGNOSTICS n = ROW_COUNT;
    DROP TABLE ca_new_versions;
    -- (as for products: only when the table grew by a tenth or more)
    IF n > 0 AND n * 10 >= (SELECT GREATEST(c.reltuples, 0) FROM pg_class c
                            WHERE c.oid = 'customer_analytics.dim_customer'::regclass) THEN
        ANALYZE dim_customer;
    END IF;
    RETURN n;
END
$$;

-- issue 18: scoring from the facts (an as_of in the past) takes the last
-- purchase from rfm_rollup_rows(), the C scan the full rebuild uses
CREATE OR REPLACE FUNCTION customer_analytics.refresh_customer_rfm(full_refresh boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ids text[];
    everyone boolean;
    as_of timestamptz := customer_analytics.reference_time();
    map text := COALESCE(NULLIF(current_setting('customer_analytics.rfm_segment_map', true), ''), 'default');
    redo bigint;
    rounds integer := 0;
    later boolean;
    changed bigint;
BEGIN
    -- one maintainer at a time; readers never wait
    PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('refresh_customer_rfm()'));
    IF (SELECT count(*) FROM customer_analytics.rfm_segment_cells(map)) <> 125 THEN
        RAISE EXCEPTION 'RFM segment map "%" does not name all 125 cells', map
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('See SELECT * FROM customer_analytics.rfm_check_segment_map(%L);', map);
    END IF;
    LOOP
        rounds := rounds + 1;
        -- take the noted customers (those noted by transactions still running stay for next time)
        WITH taken AS (DELETE FROM customer_analytics_internal.rfm_dirty_customer RETURNING customer_id)
        SELECT array_agg(customer_id) FILTER (WHERE customer_id IS NOT NULL), bool_or(customer_id IS NULL)
        INTO ids, everyone FROM taken;
        IF full_refresh OR everyone
           OR (NOT EXISTS (SELECT FROM customer_analytics.rfm_rollup_customer)
               AND EXISTS (SELECT FROM customer_analytics.fact_order_line)) THEN
            DELETE FROM customer_analytics.rfm_rollup_customer;
            ids := NULL;
            everyone := true;
            full_refresh := false;
        ELSIF ids IS NOT NULL THEN
            DELETE FROM customer_analytics.rfm_rollup_customer WHERE customer_id IN (SELECT unnest(ids));
        END IF;
        -- The queued lines these statements see are in the facts they
        -- read: they are consumed here, not added again below.
        IF everyone THEN
            WITH consumed AS (
                DELETE FROM customer_analytics_internal.rfm_new_line
            )
            INSERT INTO customer_analytics.rfm_rollup_customer (customer_id, customer_key, last_order, frequency, monetary)
            SELECT r.customer_id, r.customer_key, r.last_order, r.frequency, r.monetary
            FROM customer_analytics_internal.rfm_rollup_rows('infinity') r;
        ELSIF ids IS NOT NULL THEN
            -- a few customers: their lines through the indexes
            WITH consumed AS (
                DELETE FROM customer_analytics_internal.rfm_new_line q
                WHERE q.customer_id IN (SELECT unnest(ids))
            )
            INSERT INTO customer_analytics.rfm_rollup_customer (customer_id, customer_key, last_order, frequency, monetary)
            SELECT o.customer_id, cur.customer_key, (o.s).last_order, (o.s).frequency, (o.s).monetary
            FROM (SELECT x.customer_id, customer_analytics.rfm_agg(x.ts, x.amount) AS s
                  FROM customer_analytics_internal.rfm_orders(ids, 'infinity') x
                  GROUP BY x.customer_id) o
            LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = o.customer_id AND cur.is_current
                                                         AND cur.customer_key <> -1;
        END IF;

        -- new orders are added to their customers' rows; an order that had
        -- lines before (its line count in the facts is larger) is not new:
        -- its customers are recomputed in the next round
        WITH taken AS (
            DELETE FROM customer_analytics_internal.rfm_new_line RETURNING *
        ), orders AS (
            SELECT t.order_id,
                   count(*) = (SELECT count(*) FROM customer_analytics.fact_order_line f
                               WHERE f.order_id = t.order_id) AS whole
            FROM taken t GROUP BY t.order_id
        ), noted AS (
            INSERT INTO customer_analytics_internal.rfm_dirty_customer
            SELECT DISTINCT t.customer_id FROM taken t JOIN orders o USING (order_id) WHERE NOT o.whole
            ON CONFLICT DO NOTHING
            RETURNING 1
        ), per_order AS (            -- grouped as above
            SELECT t.customer_id, max(t.order_ts) AS ts, sum(t.revenue) AS amount
            FROM taken t JOIN orders o USING (order_id)
            WHERE o.whole AND t.purchase
            GROUP BY t.customer_id, t.order_id, CASE WHEN t.revenue < 0 THEN t.line_number END
        ), added AS (
            INSERT INTO customer_analytics.rfm_rollup_customer AS u (customer_id, customer_key, last_order, frequency, monetary)
            SELECT p.customer_id, cur.customer_key, (p.s).last_order, (p.s).frequency, (p.s).monetary
            FROM (SELECT customer_id, customer_analytics.rfm_agg(ts, amount) AS s FROM per_order GROUP BY customer_id) p
            LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = p.customer_id AND cur.is_current
                                                         AND cur.customer_key <> -1
            ON CONFLICT (customer_id) DO UPDATE
                SET last_order = greatest(u.last_order, excluded.last_order),
                    frequency = u.frequency + excluded.frequency,
                    monetary = u.monetary + excluded.monetary
            RETURNING 1
        )
        SELECT count(*) FROM noted INTO redo;   -- (added runs all the same)
        EXIT WHEN redo = 0 OR rounds >= 10;
    END LOOP;

    -- lines later than as_of (an as_of in the past) are not in rfm(as_of):
    -- then the scores come from the facts
    -- (the last purchase as of then from the same C scan of the inputs)
    later := EXISTS (SELECT FROM customer_analytics.fact_order_line WHERE order_ts > as_of);
    WITH scored AS (
        SELECT s.*, p.last_order AS last_purchase
        FROM customer_analytics.rfm(as_of) s
        JOIN customer_analytics_internal.rfm_rollup_rows(as_of) p ON p.customer_id = s.customer_id
        WHERE later
        UNION ALL
        SELECT s.*, u.last_order
        FROM customer_analytics.rfm_from_rollup(as_of) s
        JOIN customer_analytics.rfm_rollup_customer u ON u.customer_id = s.customer_id
        WHERE NOT later
    ), diff AS MATERIALIZED (      -- one pass over both: what to write
        SELECT s.*, t.customer_id AS old_customer_id
        FROM scored s FULL JOIN customer_analytics.customer_rfm_score t ON t.customer_id = s.customer_id
        WHERE s.customer_id IS NULL OR t.customer_id IS NULL
           OR (t.customer_key, t.last_purchase, t.frequency, t.monetary, t.rfm_cell, t.segment)
              IS DISTINCT FROM (s.customer_key, s.last_purchase, s.frequency, s.monetary, s.rfm_cell, s.segment)
    ), updated AS (
        UPDATE customer_analytics.customer_rfm_score t
        SET customer_key = d.customer_key, last_purchase = d.last_purchase, frequency = d.frequency,
            monetary = d.monetary, r = d.r, f = d.f, m = d.m, rfm_cell = d.rfm_cell, segment = d.segment
        FROM diff d
        WHERE t.customer_id = d.customer_id AND d.old_customer_id IS NOT NULL
        RETURNING 1
    ), inserted AS (
        INSERT INTO customer_analytics.customer_rfm_score
            (customer_id, customer_key, last_purchase, frequency, monetary, r, f, m, rfm_cell, segment)
        SELECT d.customer_id, d.customer_key, d.last_purchase, d.frequency, d.monetary, d.r, d.f, d.m, d.rfm_cell, d.segment
        FROM diff d WHERE d.old_customer_id IS NULL
        RETURNING 1
    ), deleted AS (
        DELETE FROM customer_analytics.customer_rfm_score t
        USING diff d
        WHERE t.customer_id = d.old_customer_id AND d.customer_id IS NULL
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM updated) + (SELECT count(*) FROM inserted) + (SELECT count(*) FROM deleted)
    INTO changed;
    INSERT INTO customer_analytics.customer_rfm_refresh (id, as_of, refreshed_at)
    VALUES (true, as_of, clock_timestamp())
    ON CONFLICT (id) DO UPDATE SET as_of = EXCLUDED.as_of, refreshed_at = EXCLUDED.refreshed_at;
    RETURN changed;
END
$$;

-- issue 17: distributed layout on Citus (distribute(), its plan and bookkeeping; see src/sql/97_distribute.sql and docs/scaling.md)
CREATE TABLE customer_analytics_internal.cluster_layout (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    distributed_at  timestamptz NOT NULL,
    shard_count     integer NOT NULL,
    dropped_triggers text[] NOT NULL,
    full_refresh_needed boolean NOT NULL DEFAULT true
);
-- not dumped: it describes this database's catalog, and a restored
-- database has the single-node layout (distribute() must run again)
COMMENT ON TABLE customer_analytics_internal.cluster_layout IS
    'Internal: set by distribute() on a Citus coordinator: when, with how many shards, the change-queue triggers it dropped (their definitions), and that the incremental refreshes need full refreshes until the writers record their own changes';

/*
 * The layout itself, one row per table that leaves the single-node layout,
 * in the order Citus accepts them (reference tables before the tables
 * whose foreign keys point at them; the first distributed table fixes the
 * co-location group of the others).
 */
CREATE FUNCTION customer_analytics_internal.cluster_layout_plan()
RETURNS TABLE (ordinal integer, table_name regclass, citus_kind text, distribution_column text)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM (VALUES
        (1, 'customer_analytics.dim_date'::regclass, 'reference', NULL::text),
        (2, 'customer_analytics.dim_product', 'reference', NULL),
        (3, 'customer_analytics.dim_customer', 'reference', NULL),
        (4, 'customer_analytics.stg_products', 'reference', NULL),
        (5, 'customer_analytics.fact_order_line', 'distributed', 'order_id'),
        (6, 'customer_analytics.stg_orders', 'distributed', 'order_id'),
        (7, 'customer_analytics_internal.unknown_member_line', 'distributed', 'order_id'),
        (8, 'customer_analytics.fact_event', 'distributed', 'event_id'),
        (9, 'customer_analytics.stg_events', 'distributed', 'event_id'),
        (10, 'customer_analytics.stg_customers', 'distributed', 'customer_id')
    ) AS p (ordinal, table_name, citus_kind, distribution_column)
$$;
COMMENT ON FUNCTION customer_analytics_internal.cluster_layout_plan() IS
    'Internal to distribute(): the tables it converts, in order: reference tables first, then the distributed ones with their distribution column (co-located with the first)';

CREATE FUNCTION customer_analytics.distribute(shard_count integer DEFAULT NULL)
RETURNS TABLE (table_name regclass, citus_kind text, distribution_column text, shards integer)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    shards_wanted integer;
    plan record;
    trg record;
    fk record;
    worker record;
    messages text;
    dropped text[] := '{}';
    fks text[] := '{}';
    first_distributed regclass;
    on_coordinator boolean;
    workers bigint;
    -- the statements that take the triggers and foreign keys off, run
    -- here and on every worker
    drop_sql text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION 'distribute() needs Citus, and the extension citus is not installed in database %',
                        current_database()
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'distribute() converts the star schema to Citus distributed and reference tables; on a single PostgreSQL server the schema stays as it is and every function works on it.',
                  HINT = 'On a Citus coordinator: CREATE EXTENSION citus, add the workers with citus_add_node(), then call distribute() there.';
    END IF;
    EXECUTE 'SELECT pg_catalog.citus_is_coordinator()' INTO on_coordinator;
    IF NOT on_coordinator THEN
        RAISE EXCEPTION 'distribute() must run on the Citus coordinator, and this node is a worker'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'Only the coordinator holds the metadata that create_distributed_table() changes.',
                  HINT = 'Connect to the coordinator and call customer_analytics.distribute() there.';
    END IF;

    -- a concurrent call waits, then finds the layout done
    LOCK TABLE cluster_layout IN EXCLUSIVE MODE;
    IF EXISTS (SELECT FROM cluster_layout) THEN
        RAISE NOTICE 'the star schema is distributed already (since %)',
                     (SELECT distributed_at FROM cluster_layout)
            USING DETAIL = 'distribute() changed nothing; the rows below are the current layout.';
    ELSE
        EXECUTE 'SELECT count(*) FROM pg_catalog.citus_get_active_worker_nodes()' INTO workers;
        IF workers = 0 THEN
            RAISE EXCEPTION 'distribute() found no active Citus worker node'
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'The shards of the facts would have nowhere to go.',
                      HINT = 'Add the workers with citus_add_node(host, port) (and, for pg_cron and the coordinator''s own queries, citus_set_coordinator_host()), then call distribute() again.';
        END IF;
        IF EXISTS (SELECT FROM cluster_layout_plan() p
                   JOIN pg_dist_partition d ON d.logicalrelid = p.table_name) THEN
            RAISE EXCEPTION 'distribute() found tables of the star schema already converted by hand: %',
                            (SELECT string_agg(qualified_name(p.table_name), ', ' ORDER BY p.ordinal)
                             FROM cluster_layout_plan() p
                             JOIN pg_dist_partition d ON d.logicalrelid = p.table_name)
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'distribute() converts the whole layout at once, from the single-node one, and does not guess what a conversion by hand left.',
                      HINT = 'Undo it with undistribute_table() for each of those tables, then call distribute().';
        END IF;
        shards_wanted := COALESCE(shard_count, current_setting('citus.shard_count')::integer);
        IF shards_wanted < 1 THEN
            RAISE EXCEPTION 'distribute(shard_count => %): the shard count must be at least 1', shard_count
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Leave it out to take citus.shard_count, or give a few shards per worker core.';
        END IF;

        -- the facts' foreign keys, to put back after the conversion
        FOR fk IN
            SELECT qualified_name(c.conrelid::regclass) AS rel, c.conname, pg_get_constraintdef(c.oid) AS def
            FROM pg_constraint c
            WHERE c.contype = 'f'
              AND c.conrelid IN (SELECT p.table_name FROM cluster_layout_plan() p)
            ORDER BY 1, 2
        LOOP
            fks := fks || format('ALTER TABLE %s ADD CONSTRAINT %I %s', fk.rel, fk.conname, fk.def);
        END LOOP;

        drop_sql := '';
        FOR trg IN
            SELECT qualified_name(t.tgrelid::regclass) AS rel, t.tgname, pg_get_triggerdef(t.oid) AS def
            FROM pg_trigger t
            WHERE NOT t.tgisinternal
              AND t.tgrelid IN (SELECT p.table_name FROM cluster_layout_plan() p)
            ORDER BY 1, 2
        LOOP
            dropped := dropped || trg.def;
            drop_sql := drop_sql || format('DROP TRIGGER IF EXISTS %I ON %s;', trg.tgname, trg.rel);
        END LOOP;
        FOR fk IN
            SELECT qualified_name(c.conrelid::regclass) AS rel, c.conname
            FROM pg_constraint c
            WHERE c.contype = 'f'
              AND c.conrelid IN (SELECT p.table_name FROM cluster_layout_plan() p)
            ORDER BY 1, 2
        LOOP
            drop_sql := drop_sql || format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I;', fk.rel, fk.conname);
        END LOOP;

        -- the workers first: a failure there leaves this node untouched,
        -- and the statements are idempotent, so a second call finishes
        IF drop_sql <> '' THEN
            FOR worker IN
                SELECT r.nodename, r.nodeport, r.result
                FROM run_command_on_workers(format('DO %L', 'BEGIN ' || drop_sql || ' END')) r
                WHERE NOT r.success
            LOOP
                RAISE EXCEPTION 'distribute() could not take the triggers and foreign keys off the star schema on worker %:%',
                                worker.nodename, worker.nodeport
                    USING ERRCODE = 'object_not_in_prerequisite_state',
                          DETAIL = worker.result,
                          HINT = 'Make the worker reachable from the coordinator (citus.node_conninfo, pg_hba.conf) and call distribute() again: what it did so far is done again harmlessly.';
            END LOOP;
            EXECUTE drop_sql;
        END IF;

        -- one connection per worker: the dimensions' foreign keys and the
        -- reference tables are then created in this one transaction
        PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);
        -- Citus's notices about copying the rows and the shell's data
        -- (which is truncated here) would only confuse
        messages := current_setting('client_min_messages');
        PERFORM set_config('client_min_messages', 'warning', true);
        FOR plan IN SELECT * FROM cluster_layout_plan() p ORDER BY p.ordinal LOOP
            IF plan.citus_kind = 'reference' THEN
                PERFORM create_reference_table(plan.table_name);
            ELSIF first_distributed IS NULL THEN
                PERFORM create_distributed_table(plan.table_name, plan.distribution_column,
                                                 shard_count => shards_wanted, colocate_with => 'none');
                first_distributed := plan.table_name;
            ELSE
                PERFORM create_distributed_table(plan.table_name, plan.distribution_column,
                                                 colocate_with => first_distributed::text);
            END IF;
            -- the rows now live in the shards: the shell keeps none
            PERFORM truncate_local_data_after_distributing_table(plan.table_name);
        END LOOP;
        PERFORM set_config('client_min_messages', messages, true);
        FOR i IN 1 .. coalesce(array_length(fks, 1), 0) LOOP
            EXECUTE fks[i];
        END LOOP;

        INSERT INTO cluster_layout (distributed_at, shard_count, dropped_triggers)
        VALUES (clock_timestamp(), shards_wanted, dropped);
        -- what the dropped triggers would have queued: everything, once
        INSERT INTO rfm_dirty_customer VALUES (NULL) ON CONFLICT DO NOTHING;
        INSERT INTO sales_dirty_day VALUES ('-infinity') ON CONFLICT DO NOTHING;
    END IF;

    RETURN QUERY
    SELECT p.table_name, p.citus_kind, p.distribution_column,
           (SELECT count(*)::integer FROM pg_dist_shard s WHERE s.logicalrelid = p.table_name)
    FROM cluster_layout_plan() p
    ORDER BY p.ordinal;
END
$$;
COMMENT ON FUNCTION customer_analytics.distribute(integer) IS
    'On a Citus coordinator: converts the installed (possibly loaded) star schema to its distributed layout (facts and staging by order_id / event_id / customer_id, co-located; dimensions as reference tables; the rest local) and returns the layout; a second call changes nothing; refused where Citus is absent or on a worker';
REVOKE ALL ON FUNCTION customer_analytics.distribute(integer) FROM PUBLIC;

-- issue 20: min_relative_change is a factor either way for the count method
-- (half or twice the expected orders at 0.5), in the view's and the
-- function's descriptions
COMMENT ON FUNCTION customer_analytics.detect_anomalies(text, text, integer, float8, integer, text, float8, integer, text) IS
    'Score every point of the series a query returns (columns: series key, timestamp, value, and optionally the exposure: the fraction of the period observed, 0 = not scored) against a baseline that never includes the point: method trailing (mean and z over the window_size previous points), robust (median and robust z over them), seasonal (the median of the same weekday in the previous seasons weeks, then the z and robust z of the residual over the window; both must pass; on the chosen scale: linear, sqrt or log) or count (whole counts: expected = level of the previous seasons weeks, carried forward by the growth of the window, x weekday profile of the window_size previous periods, two-sided negative binomial tail probability p_value, its variance the baseline''s own uncertainty plus the overdispersion of the window when Pearson''s statistic shows it, Poisson otherwise; z is its normal score). Flags points whose |z| passes threshold (default customer_analytics.zscore_threshold; for the count method p_value <= customer_analytics.anomaly_false_alarms_per_year / points a year, then, at a time where a point is flagged, the other series'' points that moved the same way by Benjamini-Hochberg at customer_analytics.anomaly_same_day_fdr) in the wanted direction (both, spike, drop), after min_history earlier points, when they differ from the expected value by at least min_relative_change of it (for the count method a factor either way: at most 1 - min_relative_change or, below 1, at least 1 / (1 - min_relative_change) times the expected count; 0.5: half or twice)';
COMMENT ON MATERIALIZED VIEW customer_analytics.anomalies IS
    'Days with an anomalous number of orders, per product category and for the shop as a whole (series ''total''): detect_anomalies() with the count method (expected orders from the level of the 8 previous weeks, carried forward by the growth of the 112 previous days, and the weekday profile of those days; p_value: two-sided negative binomial tail probability; z: its normal score), flagged when p_value <= customer_analytics.anomaly_false_alarms_per_year / 365.25, or, on a day with such a flag, by Benjamini-Hochberg at customer_analytics.anomaly_same_day_fdr among the day''s other series that moved the same way; only changes to half the expected orders or less, or to twice or more. Built on daily_sales and product_category_sales: refresh those first (refresh_sales_views() does all three)';

-- issue 17: change tracking without statement triggers: transform()'s steps and
-- refresh_customer_rfm() queue what they change themselves (RETURNING into the
-- queues), the statement triggers return at once while they write (setting
-- customer_analytics_internal.own_writer), and load_fact_order_line() resolves
-- its batch once (issue 18)
CREATE OR REPLACE FUNCTION customer_analytics_internal.own_writer()
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT COALESCE(pg_catalog.current_setting('customer_analytics_internal.own_writer', true), '')
             OPERATOR(pg_catalog.=) 'on' $$;
COMMENT ON FUNCTION customer_analytics_internal.own_writer() IS
    'Internal: whether one of the extension''s writers (which queue their own changes) is writing; the change-queue triggers then do nothing';

CREATE OR REPLACE FUNCTION customer_analytics_internal.check_queue(rel regclass, batch bigint)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT FROM customer_analytics_internal.check_change c
               WHERE c.rel = check_queue.rel AND c.op = 'T') THEN
        RETURN false;
    END IF;
    IF batch > 1000000 THEN
        DELETE FROM customer_analytics_internal.check_change c WHERE c.rel = check_queue.rel;
        INSERT INTO customer_analytics_internal.check_change (rel, op) VALUES (check_queue.rel, 'T');
        RETURN false;
    END IF;
    RETURN true;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.check_queue(regclass, bigint) IS
    'Internal: whether a writer of the extension queues the rows of a batch it writes into a table in check_change row by row (false: the table is due for a whole check, queued here for a batch of more than a million rows)';

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_dim_product()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    n bigint;
    detail boolean := check_queue('customer_analytics.dim_product', (SELECT count(*) FROM ca_batch_products));
BEGIN
    WITH was AS MATERIALIZED (
        SELECT d.* FROM dim_product d WHERE d.product_id IN (SELECT b.product_id FROM ca_batch_products b)
    ), written AS (
        INSERT INTO dim_product AS d (product_id, name, category, subcategory, unit_cost, list_price,
                                      updated_at, stage_id)
        SELECT product_id, name, category, subcategory, unit_cost, list_price, updated_at, stage_id
        FROM ca_batch_products
        ON CONFLICT (product_id) DO UPDATE
            SET name = excluded.name, category = excluded.category, subcategory = excluded.subcategory,
                unit_cost = excluded.unit_cost, list_price = excluded.list_price,
                updated_at = excluded.updated_at, stage_id = excluded.stage_id
            WHERE excluded.stage_id > d.stage_id
              AND (d.name, d.category, d.subcategory, d.unit_cost, d.list_price)
                  IS DISTINCT FROM
                  (excluded.name, excluded.category, excluded.subcategory, excluded.unit_cost, excluded.list_price)
        RETURNING d.product_key, d.category
    ), moved AS (           -- a product moved to another category: every day it sold on
        INSERT INTO sales_dirty_day
        SELECT DISTINCT dd.date
        FROM written w JOIN was o USING (product_key)
        JOIN fact_order_line f ON f.product_key = w.product_key
        JOIN dim_date dd ON dd.date_key = f.date_key
        WHERE o.category IS DISTINCT FROM w.category
        ON CONFLICT DO NOTHING
    ), checked AS (
        INSERT INTO check_change (rel, op, key, old_row)
        SELECT 'customer_analytics.dim_product'::regclass, 'n', jsonb_build_object('product_key', w.product_key), NULL
        FROM written w WHERE detail
        UNION ALL
        SELECT 'customer_analytics.dim_product'::regclass, 'o', NULL, to_jsonb(o)
        FROM written w JOIN was o USING (product_key) WHERE detail
    )
    SELECT count(*) INTO n FROM written;
    -- the fact joins that follow are planned on these statistics: renewed
    -- when the table grew by a tenth or more (a few rows more do not change
    -- a plan, and ANALYZE reads up to 30,000 rows whatever the change)
    IF n > 0 AND n * 10 >= (SELECT GREATEST(c.reltuples, 0) FROM pg_class c
                            WHERE c.oid = 'customer_analytics.dim_product'::regclass) THEN
        ANALYZE dim_product;
    END IF;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_dim_customer()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    n bigint;
    detail boolean;
BEGIN
    CREATE TEMP TABLE ca_new_versions ON COMMIT DROP AS
    WITH cur AS (
        SELECT d.customer_id, d.name, d.email, d.city, d.state, d.country, d.signup_date,
               d.valid_from AS version_ts, false AS is_new
        FROM dim_customer d
        WHERE d.is_current AND d.customer_id IN (SELECT customer_id FROM ca_batch_customers)
    ), chain AS (
        SELECT * FROM cur
        UNION ALL
        SELECT b.customer_id, b.name, b.email, b.city, b.state, b.country, b.signup_date,
               b.version_ts, true
        FROM ca_batch_customers b
        LEFT JOIN cur c ON c.customer_id = b.customer_id
        WHERE c.customer_id IS NULL OR b.version_ts > c.version_ts
    ), diffed AS (
        SELECT ch.*,
               ROW(ch.name, ch.email, ch.city, ch.state, ch.country, ch.signup_date)
                   IS DISTINCT FROM
               lag(ROW(ch.name, ch.email, ch.city, ch.state, ch.country, ch.signup_date))
                   OVER (PARTITION BY ch.customer_id ORDER BY ch.version_ts) AS changed
        FROM chain ch
    )
    SELECT df.customer_id, df.name, df.email, df.city, df.state, df.country,
           df.signup_date, df.version_ts
    FROM diffed df
    WHERE df.is_new AND df.changed;

    detail := check_queue('customer_analytics.dim_customer', (SELECT count(*) FROM ca_new_versions));

    -- a new version moves the customer's current key and which lines are
    -- theirs: their RFM inputs are recomputed
    WITH closed AS (
        UPDATE dim_customer d
        SET valid_to = f.first_ts, is_current = false
        FROM (SELECT customer_id, min(version_ts) AS first_ts
              FROM ca_new_versions GROUP BY customer_id) f,
             dim_customer was
        WHERE d.customer_id = f.customer_id AND d.is_current AND was.customer_key = d.customer_key
        RETURNING d.customer_key, d.customer_id, to_jsonb(was) AS old_row
    ), dirty AS (
        INSERT INTO rfm_dirty_customer
        SELECT DISTINCT c.customer_id FROM closed c
        ON CONFLICT DO NOTHING
    )
    INSERT INTO check_change (rel, op, key, old_row)
    SELECT 'customer_analytics.dim_customer'::regclass, x.op, x.key, x.old_row
    FROM closed c
    CROSS JOIN LATERAL (VALUES ('n'::"char", jsonb_build_object('customer_key', c.customer_key), NULL::jsonb),
                               ('o', NULL, c.old_row)) x (op, key, old_row)
    WHERE detail;

    WITH added AS (
        INSERT INTO dim_customer (customer_id, name, email, city, state, country, signup_date,
                                  valid_from, valid_to, is_current)
        SELECT nv.customer_id, nv.name, nv.email, nv.city, nv.state, nv.country, nv.signup_date,
               nv.version_ts,
               COALESCE(lead(nv.version_ts) OVER w, 'infinity'),
               lead(nv.version_ts) OVER w IS NULL
        FROM ca_new_versions nv
        WINDOW w AS (PARTITION BY nv.customer_id ORDER BY nv.version_ts)
        RETURNING customer_key, customer_id
    ), dirty AS (
        INSERT INTO rfm_dirty_customer
        SELECT DISTINCT a.customer_id FROM added a
        ON CONFLICT DO NOTHING
    ), checked AS (
        INSERT INTO check_change (rel, op, key)
        SELECT 'customer_analytics.dim_customer'::regclass, 'n', jsonb_build_object('customer_key', a.customer_key)
        FROM added a WHERE detail
    )
    SELECT count(*) INTO n FROM added;
    DROP TABLE ca_new_versions;
    -- (as for products: only when the table grew by a tenth or more)
    IF n > 0 AND n * 10 >= (SELECT GREATEST(c.reltuples, 0) FROM pg_class c
                            WHERE c.oid = 'customer_analytics.dim_customer'::regclass) THEN
        ANALYZE dim_customer;
    END IF;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.note_order_line_updates(detail boolean)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    SELECT count(*) INTO n FROM ca_line_changes;
    IF n > 0 THEN
        WITH keys AS (
            SELECT (c.new ->> 'customer_key')::bigint AS customer_key, (c.new ->> 'date_key')::integer AS date_key
            FROM ca_line_changes c
            UNION
            SELECT (c.old ->> 'customer_key')::bigint, (c.old ->> 'date_key')::integer
            FROM ca_line_changes c
        ), dirty AS (
            INSERT INTO rfm_dirty_customer
            SELECT DISTINCT d.customer_id
            FROM (SELECT DISTINCT k.customer_key FROM keys k) k JOIN dim_customer d USING (customer_key)
            ON CONFLICT DO NOTHING
        ), days AS (
            INSERT INTO sales_dirty_day
            SELECT DISTINCT d.date
            FROM (SELECT DISTINCT k.date_key FROM keys k) k JOIN dim_date d USING (date_key)
            ON CONFLICT DO NOTHING
        )
        INSERT INTO check_change (rel, op, key, old_row)
        SELECT 'customer_analytics.fact_order_line'::regclass, x.op, x.key, x.old_row
        FROM ca_line_changes c
        CROSS JOIN LATERAL (VALUES ('n'::"char", jsonb_build_object('order_id', c.new -> 'order_id',
                                                                    'line_number', c.new -> 'line_number'),
                                    NULL::jsonb),
                                   ('o', NULL, c.old)) x (op, key, old_row)
        WHERE detail;
    END IF;
    DROP TABLE ca_line_changes;
    RETURN n;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.note_order_line_updates(boolean) IS
    'Internal: queues the order lines a writer of the extension updated (temporary table ca_line_changes: new and old row) for the RFM and sales rollups and, detail true, row by row for the checks; returns their number';

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_fact_order_line()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    tz text := business_timezone();
    batch bigint;
    added bigint;
    changed bigint := 0;
    detail boolean;
BEGIN
    CREATE TEMP TABLE ca_customer_lookup ON COMMIT DROP AS
    SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT o.customer_id FROM ca_batch_orders o
                                          WHERE o.customer_id IS NOT NULL));
    ANALYZE ca_customer_lookup;

    CREATE TEMP TABLE ca_order_lines ON COMMIT DROP AS
    SELECT s.order_id, s.line_number,
           COALESCE(c.customer_key, -1) AS customer_key,
           COALESCE(p.product_key, -1) AS product_key,
           date_key((s.order_ts AT TIME ZONE tz)::date) AS date_key,
           s.order_ts, s.quantity, s.unit_price, s.discount, s.status, s.channel,
           s.updated_at, s.stage_id, s.load_id, s.customer_id, s.product_id,
           (s.customer_id IS NOT NULL AND c.customer_key IS NULL)
           OR (s.product_id IS NOT NULL AND p.product_key IS NULL) AS unresolved
    FROM ca_batch_orders s
    LEFT JOIN ca_customer_lookup c
           ON c.customer_id = s.customer_id AND s.order_ts >= c.valid_from AND s.order_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id;
    DROP TABLE ca_customer_lookup;
    SELECT count(*) INTO batch FROM ca_order_lines;
    detail := check_queue('customer_analytics.fact_order_line', batch);

    -- new lines are usually new orders: queued to be added to their
    -- customers' RFM inputs without a recompute
    WITH written AS (
        INSERT INTO fact_order_line AS f
            (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity,
             unit_price, discount, status, channel, updated_at, stage_id, load_id)
        SELECT r.order_id, r.line_number, r.customer_key, r.product_key, r.date_key,
               r.order_ts, r.quantity, r.unit_price, r.discount, r.status, r.channel,
               r.updated_at, r.stage_id, r.load_id
        FROM ca_order_lines r
        ON CONFLICT (order_id, line_number) DO NOTHING
        RETURNING f.order_id, f.line_number, f.customer_key, f.date_key, f.order_ts, f.quantity,
                  f.revenue, f.status
    ), rfm AS (
        INSERT INTO rfm_new_line (customer_id, order_id, line_number, order_ts, revenue, purchase)
        SELECT c.customer_id, w.order_id, w.line_number, w.order_ts, w.revenue,
               w.status = 'completed' AND w.customer_key <> -1 AND (w.quantity > 0 OR w.revenue <> 0)
        FROM written w JOIN dim_customer c USING (customer_key)
    ), days AS (
        INSERT INTO sales_dirty_day
        SELECT DISTINCT d.date FROM (SELECT DISTINCT w.date_key FROM written w) k JOIN dim_date d USING (date_key)
        ON CONFLICT DO NOTHING
    ), checked AS (
        INSERT INTO check_change (rel, op, key)
        SELECT 'customer_analytics.fact_order_line'::regclass, 'n',
               jsonb_build_object('order_id', w.order_id, 'line_number', w.line_number)
        FROM written w WHERE detail
    )
    SELECT count(*) INTO added FROM written;

    -- lines already in the facts: a later staged version that differs wins
    IF added < batch THEN
        CREATE TEMP TABLE ca_line_changes (new jsonb, old jsonb) ON COMMIT DROP;
        WITH upd AS (
            UPDATE fact_order_line f
            SET customer_key = r.customer_key, product_key = r.product_key,
                date_key = r.date_key, order_ts = r.order_ts,
                quantity = r.quantity, unit_price = r.unit_price,
                discount = r.discount, status = r.status,
                channel = r.channel, updated_at = r.updated_at,
                stage_id = r.stage_id, load_id = r.load_id
            FROM ca_order_lines r, fact_order_line was
            WHERE f.order_id = r.order_id AND f.line_number = r.line_number
              AND was.order_id = r.order_id AND was.line_number = r.line_number
              AND r.stage_id > f.stage_id
              AND (f.customer_key, f.product_key, f.order_ts, f.quantity, f.unit_price,
                   f.discount, f.status, f.channel, f.updated_at)
                  IS DISTINCT FROM
                  (r.customer_key, r.product_key, r.order_ts, r.quantity,
                   r.unit_price, r.discount, r.status, r.channel, r.updated_at)
            RETURNING to_jsonb(f) AS new, to_jsonb(was) AS old
        )
        INSERT INTO ca_line_changes SELECT * FROM upd;
        changed := note_order_line_updates(detail);
    END IF;

    -- the lines of this batch a later dimension row may repair (a batch
    -- line that did resolve leaves the queue)
    MERGE INTO unknown_member_line q
    USING ca_order_lines b
    ON q.order_id = b.order_id AND q.line_number = b.line_number
    WHEN MATCHED AND NOT b.unresolved THEN DELETE
    WHEN MATCHED THEN UPDATE SET customer_id = b.customer_id, product_id = b.product_id
    WHEN NOT MATCHED AND b.unresolved THEN
        INSERT (order_id, line_number, customer_id, product_id)
        VALUES (b.order_id, b.line_number, b.customer_id, b.product_id);
    DROP TABLE ca_order_lines;
    RETURN added + changed;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.repair_order_line_keys()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    n bigint;
BEGIN
    CREATE TEMP TABLE ca_repairs ON COMMIT DROP AS
    SELECT q.order_id, q.line_number, q.customer_id, q.product_id, f.order_id IS NULL AS gone,
           COALESCE(v.customer_key, -1) AS customer_key,
           COALESCE(p.product_key, -1) AS product_key
    FROM unknown_member_line q
    LEFT JOIN fact_order_line f ON f.order_id = q.order_id AND f.line_number = q.line_number
    LEFT JOIN customer_versions(ARRAY(SELECT DISTINCT u.customer_id FROM unknown_member_line u
                                      WHERE u.customer_id IS NOT NULL)) v
           ON v.customer_id = q.customer_id AND f.order_ts >= v.valid_from AND f.order_ts < v.valid_to
    LEFT JOIN dim_product p ON p.product_id = q.product_id;

    CREATE TEMP TABLE ca_line_changes (new jsonb, old jsonb) ON COMMIT DROP;
    WITH upd AS (
        UPDATE fact_order_line f
        SET customer_key = r.customer_key, product_key = r.product_key
        FROM ca_repairs r, fact_order_line was
        WHERE NOT r.gone AND f.order_id = r.order_id AND f.line_number = r.line_number
          AND was.order_id = f.order_id AND was.line_number = f.line_number
          AND (f.customer_key, f.product_key) IS DISTINCT FROM (r.customer_key, r.product_key)
        RETURNING to_jsonb(f) AS new, to_jsonb(was) AS old
    )
    INSERT INTO ca_line_changes SELECT * FROM upd;
    SELECT count(*) INTO n FROM ca_line_changes;
    n := note_order_line_updates(check_queue('customer_analytics.fact_order_line', n));

    -- resolved (or no longer in the facts): out of the queue
    DELETE FROM unknown_member_line q
    USING ca_repairs r
    WHERE q.order_id = r.order_id AND q.line_number = r.line_number
      AND (r.gone OR ((r.customer_key <> -1 OR r.customer_id IS NULL)
                      AND (r.product_key <> -1 OR r.product_id IS NULL)));
    DROP TABLE ca_repairs;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.note_event_updates(detail boolean)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    SELECT count(*) INTO n FROM ca_event_changes;
    IF n > 0 THEN
        WITH queued AS (
            INSERT INTO clickstream_change (visitor, since)
            SELECT v.visitor, min(v.event_ts)
            FROM ca_event_changes c
            CROSS JOIN LATERAL (VALUES (visitor(c.new ->> 'customer_id', c.new ->> 'session_id'),
                                        (c.new ->> 'event_ts')::timestamptz),
                                       (visitor(c.old ->> 'customer_id', c.old ->> 'session_id'),
                                        (c.old ->> 'event_ts')::timestamptz)) v (visitor, event_ts)
            GROUP BY v.visitor
        )
        INSERT INTO check_change (rel, op, key, old_row)
        SELECT 'customer_analytics.fact_event'::regclass, x.op, x.key, x.old_row
        FROM ca_event_changes c
        CROSS JOIN LATERAL (VALUES ('n'::"char", jsonb_build_object('event_id', c.new -> 'event_id'), NULL::jsonb),
                                   ('o', NULL, c.old)) x (op, key, old_row)
        WHERE detail;
    END IF;
    DROP TABLE ca_event_changes;
    RETURN n;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.note_event_updates(boolean) IS
    'Internal: queues the events a writer of the extension updated (temporary table ca_event_changes: new and old row) for refresh_clickstream() and, detail true, row by row for the checks; returns their number';

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_fact_event()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    tz text := business_timezone();
    batch bigint;
    added bigint;
    changed bigint := 0;
    detail boolean;
BEGIN
    CREATE TEMP TABLE ca_event_customers ON COMMIT DROP AS
    SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT e.customer_id FROM ca_batch_events e
                                          WHERE e.customer_id IS NOT NULL));
    ANALYZE ca_event_customers;

    CREATE TEMP TABLE ca_event_rows ON COMMIT DROP AS
    SELECT s.event_id, s.event_ts, date_key((s.event_ts AT TIME ZONE tz)::date) AS date_key,
           CASE WHEN s.customer_id IS NULL THEN NULL
                ELSE COALESCE(c.customer_key, -1) END AS customer_key,
           s.customer_id, s.session_id, s.event_type,
           CASE WHEN s.product_id IS NULL THEN NULL ELSE COALESCE(p.product_key, -1) END AS product_key,
           s.order_id, s.channel, s.device, s.stage_id, s.load_id
    FROM ca_batch_events s
    LEFT JOIN ca_event_customers c
           ON c.customer_id = s.customer_id AND s.event_ts >= c.valid_from AND s.event_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id;
    DROP TABLE ca_event_customers;
    SELECT count(*) INTO batch FROM ca_event_rows;
    detail := check_queue('customer_analytics.fact_event', batch);

    -- into an empty table (a first load) without ON CONFLICT, as the
    -- order lines (load_fact_order_line)
    EXECUTE format($sql$
    WITH written AS (
        INSERT INTO fact_event AS f
            (event_id, event_ts, date_key, customer_key, customer_id, customer_stitched, session_id,
             event_type, product_key, order_id, channel, device, stage_id, load_id)
        SELECT r.event_id, r.event_ts, r.date_key, r.customer_key, r.customer_id, false, r.session_id,
               r.event_type, r.product_key, r.order_id, r.channel, r.device, r.stage_id, r.load_id
        FROM ca_event_rows r
        %s
        RETURNING f.event_id, f.event_ts, f.customer_id, f.session_id
    ), queued AS (
        INSERT INTO clickstream_change (visitor, since)
        SELECT visitor(w.customer_id, w.session_id), min(w.event_ts) FROM written w GROUP BY 1
    ), checked AS (
        INSERT INTO check_change (rel, op, key)
        SELECT 'customer_analytics.fact_event'::regclass, 'n', jsonb_build_object('event_id', w.event_id)
        FROM written w WHERE $1
    )
    SELECT count(*) FROM written
    $sql$, CASE WHEN EXISTS (SELECT FROM fact_event) THEN 'ON CONFLICT (event_id) DO NOTHING' END)
    INTO added USING detail;

    -- events already in the facts: a later staged version that differs wins
    IF added < batch THEN
        CREATE TEMP TABLE ca_event_changes (new jsonb, old jsonb) ON COMMIT DROP;
        WITH upd AS (
            UPDATE fact_event f
            SET event_ts = r.event_ts, date_key = r.date_key,
                customer_key = r.customer_key, customer_id = r.customer_id,
                customer_stitched = false, session_id = r.session_id,
                event_type = r.event_type, product_key = r.product_key,
                order_id = r.order_id, channel = r.channel,
                device = r.device, stage_id = r.stage_id, load_id = r.load_id
            FROM ca_event_rows r, fact_event was
            WHERE f.event_id = r.event_id AND was.event_id = r.event_id
              AND r.stage_id > f.stage_id
              AND (f.event_ts, f.customer_key, f.customer_id, f.customer_stitched, f.session_id,
                   f.event_type, f.product_key, f.order_id, f.channel, f.device)
                  IS DISTINCT FROM
                  (r.event_ts, r.customer_key, r.customer_id, false,
                   r.session_id, r.event_type, r.product_key,
                   r.order_id, r.channel, r.device)
            RETURNING to_jsonb(f) AS new, to_jsonb(was) AS old
        )
        INSERT INTO ca_event_changes SELECT * FROM upd;
        changed := note_event_updates(detail);
    END IF;
    DROP TABLE ca_event_rows;
    RETURN added + changed;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.stitch_sessions()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    n bigint;
BEGIN
    -- only sessions where something can change: an anonymous event and an
    -- identified one, or events stitched before
    CREATE TEMP TABLE ca_stitch_sessions ON COMMIT DROP AS
    SELECT f.session_id
    FROM fact_event f
    WHERE f.session_id IN (SELECT b.session_id FROM ca_batch_events b)
    GROUP BY f.session_id
    HAVING (bool_or(f.customer_id IS NULL) AND bool_or(f.customer_id IS NOT NULL))
           OR bool_or(f.customer_stitched);
    ANALYZE ca_stitch_sessions;
    CREATE TEMP TABLE ca_event_changes (new jsonb, old jsonb) ON COMMIT DROP;
    WITH sess AS (
        SELECT f.event_id, f.customer_key, f.customer_id, f.customer_stitched,
               count(*) FILTER (WHERE f.customer_id IS NOT NULL AND NOT f.customer_stitched)
                   OVER (PARTITION BY f.session_id ORDER BY f.event_ts DESC, f.event_id DESC
                         ROWS UNBOUNDED PRECEDING) AS grp,
               f.session_id
        FROM fact_event f
        WHERE f.session_id IN (SELECT c.session_id FROM ca_stitch_sessions c)
    ), linked AS (
        SELECT s.event_id, s.customer_key, s.customer_id, s.customer_stitched,
               max(s.customer_key) FILTER (WHERE s.customer_id IS NOT NULL AND NOT s.customer_stitched)
                   OVER g AS new_key,
               max(s.customer_id) FILTER (WHERE s.customer_id IS NOT NULL AND NOT s.customer_stitched)
                   OVER g AS new_id
        FROM sess s
        WINDOW g AS (PARTITION BY s.session_id, s.grp)
    ), upd AS (
        UPDATE fact_event f
        SET customer_key = l.new_key, customer_id = l.new_id, customer_stitched = l.new_id IS NOT NULL
        FROM linked l
        WHERE f.event_id = l.event_id
          AND (l.customer_id IS NULL OR l.customer_stitched)
          AND (l.customer_key, l.customer_id, l.customer_stitched)
              IS DISTINCT FROM (l.new_key, l.new_id, l.new_id IS NOT NULL)
        -- only the customer columns change: the old row is the new one with theirs
        RETURNING to_jsonb(f) AS new,
                  to_jsonb(f) || jsonb_build_object('customer_key', l.customer_key, 'customer_id', l.customer_id,
                                                    'customer_stitched', l.customer_stitched) AS old
    )
    INSERT INTO ca_event_changes SELECT * FROM upd;
    SELECT count(*) INTO n FROM ca_event_changes;
    n := note_event_updates(check_queue('customer_analytics.fact_event', n));
    DROP TABLE ca_stitch_sessions;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.repair_event_customer_keys()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    n bigint;
BEGIN
    CREATE TEMP TABLE ca_event_changes (new jsonb, old jsonb) ON COMMIT DROP;
    WITH upd AS (
        UPDATE fact_event f
        SET customer_key = v.customer_key
        FROM customer_versions(ARRAY(SELECT DISTINCT e.customer_id FROM fact_event e
                                     WHERE e.customer_key = -1)) v
        WHERE f.customer_key = -1 AND v.customer_id = f.customer_id
          AND f.event_ts >= v.valid_from AND f.event_ts < v.valid_to
        RETURNING to_jsonb(f) AS new, to_jsonb(f) || '{"customer_key": -1}' AS old
    )
    INSERT INTO ca_event_changes SELECT * FROM upd;
    SELECT count(*) INTO n FROM ca_event_changes;
    n := note_event_updates(check_queue('customer_analytics.fact_event', n));
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.note_dirty_customers()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- one of the extension's writers queues its own changes
    IF customer_analytics_internal.own_writer() THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO customer_analytics_internal.rfm_dirty_customer VALUES (NULL) ON CONFLICT DO NOTHING;
    ELSIF TG_TABLE_NAME = 'dim_customer' THEN
        -- a new, changed or removed version moves the customer's current key
        -- or which lines are theirs
        IF TG_OP = 'INSERT' THEN
            INSERT INTO customer_analytics_internal.rfm_dirty_customer
            SELECT DISTINCT customer_id FROM new_rows ON CONFLICT DO NOTHING;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO customer_analytics_internal.rfm_dirty_customer
            SELECT DISTINCT customer_id FROM old_rows ON CONFLICT DO NOTHING;
        ELSE
            INSERT INTO customer_analytics_internal.rfm_dirty_customer
            SELECT customer_id FROM old_rows UNION SELECT customer_id FROM new_rows ON CONFLICT DO NOTHING;
        END IF;
    ELSIF TG_OP = 'INSERT' THEN
        -- new lines are usually new orders: queued, added without a recompute
        INSERT INTO customer_analytics_internal.rfm_new_line (customer_id, order_id, line_number, order_ts, revenue, purchase)
        SELECT c.customer_id, r.order_id, r.line_number, r.order_ts, r.revenue,
               r.status = 'completed' AND r.customer_key <> -1 AND (r.quantity > 0 OR r.revenue <> 0)
        FROM new_rows r JOIN customer_analytics.dim_customer c USING (customer_key);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO customer_analytics_internal.rfm_dirty_customer
        SELECT DISTINCT c.customer_id
        FROM (SELECT DISTINCT customer_key FROM old_rows) r
        JOIN customer_analytics.dim_customer c USING (customer_key)
        ON CONFLICT DO NOTHING;
    ELSE
        INSERT INTO customer_analytics_internal.rfm_dirty_customer
        SELECT DISTINCT c.customer_id
        FROM (SELECT customer_key FROM old_rows UNION SELECT customer_key FROM new_rows) r
        JOIN customer_analytics.dim_customer c USING (customer_key)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.maintain_rfm_segment_stat()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- one of the extension's writers queues its own changes
    IF customer_analytics_internal.own_writer() THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM customer_analytics_internal.rfm_segment_stat;
        RETURN NULL;
    END IF;
    -- the transition tables that exist depend on the operation
    EXECUTE format($q$
        INSERT INTO customer_analytics_internal.rfm_segment_stat AS s
        SELECT segment, sum(n)::bigint, sum(n * monetary), sum(n * frequency)::bigint,
               sum(n * EXTRACT(epoch FROM last_purchase))
        FROM (%s) c (n, segment, monetary, frequency, last_purchase)
        GROUP BY segment
        ORDER BY segment    -- two writers lock the segments in the same order
        ON CONFLICT (segment) DO UPDATE
            SET customers = s.customers + excluded.customers,
                monetary = s.monetary + excluded.monetary,
                frequency = s.frequency + excluded.frequency,
                purchase_epochs = s.purchase_epochs + excluded.purchase_epochs$q$,
        CASE TG_OP
            WHEN 'INSERT' THEN 'SELECT 1, segment, monetary, frequency, last_purchase FROM new_rows'
            WHEN 'DELETE' THEN 'SELECT -1, segment, monetary, frequency, last_purchase FROM old_rows'
            ELSE 'SELECT 1, segment, monetary, frequency, last_purchase FROM new_rows
                  UNION ALL SELECT -1, segment, monetary, frequency, last_purchase FROM old_rows'
        END);
    DELETE FROM customer_analytics_internal.rfm_segment_stat WHERE customers = 0;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.refresh_customer_rfm(full_refresh boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    ids text[];
    everyone boolean;
    as_of timestamptz := customer_analytics.reference_time();
    map text := COALESCE(NULLIF(current_setting('customer_analytics.rfm_segment_map', true), ''), 'default');
    redo bigint;
    rounds integer := 0;
    later boolean;
    changed bigint;
BEGIN
    -- one maintainer at a time; readers never wait
    PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('refresh_customer_rfm()'));
    IF (SELECT count(*) FROM customer_analytics.rfm_segment_cells(map)) <> 125 THEN
        RAISE EXCEPTION 'RFM segment map "%" does not name all 125 cells', map
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('See SELECT * FROM customer_analytics.rfm_check_segment_map(%L);', map);
    END IF;
    LOOP
        rounds := rounds + 1;
        -- take the noted customers (those noted by transactions still running stay for next time)
        WITH taken AS (DELETE FROM customer_analytics_internal.rfm_dirty_customer RETURNING customer_id)
        SELECT array_agg(customer_id) FILTER (WHERE customer_id IS NOT NULL), bool_or(customer_id IS NULL)
        INTO ids, everyone FROM taken;
        IF full_refresh OR everyone
           OR (NOT EXISTS (SELECT FROM customer_analytics.rfm_rollup_customer)
               AND EXISTS (SELECT FROM customer_analytics.fact_order_line)) THEN
            DELETE FROM customer_analytics.rfm_rollup_customer;
            ids := NULL;
            everyone := true;
            full_refresh := false;
        ELSIF ids IS NOT NULL THEN
            DELETE FROM customer_analytics.rfm_rollup_customer WHERE customer_id IN (SELECT unnest(ids));
        END IF;
        -- The queued lines these statements see are in the facts they
        -- read: they are consumed here, not added again below.
        IF everyone THEN
            WITH consumed AS (
                DELETE FROM customer_analytics_internal.rfm_new_line
            )
            INSERT INTO customer_analytics.rfm_rollup_customer (customer_id, customer_key, last_order, frequency, monetary)
            SELECT r.customer_id, r.customer_key, r.last_order, r.frequency, r.monetary
            FROM customer_analytics_internal.rfm_rollup_rows('infinity') r;
        ELSIF ids IS NOT NULL THEN
            -- a few customers: their lines through the indexes
            WITH consumed AS (
                DELETE FROM customer_analytics_internal.rfm_new_line q
                WHERE q.customer_id IN (SELECT unnest(ids))
            )
            INSERT INTO customer_analytics.rfm_rollup_customer (customer_id, customer_key, last_order, frequency, monetary)
            SELECT o.customer_id, cur.customer_key, (o.s).last_order, (o.s).frequency, (o.s).monetary
            FROM (SELECT x.customer_id, customer_analytics.rfm_agg(x.ts, x.amount) AS s
                  FROM customer_analytics_internal.rfm_orders(ids, 'infinity') x
                  GROUP BY x.customer_id) o
            LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = o.customer_id AND cur.is_current
                                                         AND cur.customer_key <> -1;
        END IF;

        -- new orders are added to their customers' rows; an order that had
        -- lines before (its line count in the facts is larger) is not new:
        -- its customers are recomputed in the next round
        WITH taken AS (
            DELETE FROM customer_analytics_internal.rfm_new_line RETURNING *
        ), orders AS (
            SELECT t.order_id,
                   count(*) = (SELECT count(*) FROM customer_analytics.fact_order_line f
                               WHERE f.order_id = t.order_id) AS whole
            FROM taken t GROUP BY t.order_id
        ), noted AS (
            INSERT INTO customer_analytics_internal.rfm_dirty_customer
            SELECT DISTINCT t.customer_id FROM taken t JOIN orders o USING (order_id) WHERE NOT o.whole
            ON CONFLICT DO NOTHING
            RETURNING 1
        ), per_order AS (            -- grouped as above
            SELECT t.customer_id, max(t.order_ts) AS ts, sum(t.revenue) AS amount
            FROM taken t JOIN orders o USING (order_id)
            WHERE o.whole AND t.purchase
            GROUP BY t.customer_id, t.order_id, CASE WHEN t.revenue < 0 THEN t.line_number END
        ), added AS (
            INSERT INTO customer_analytics.rfm_rollup_customer AS u (customer_id, customer_key, last_order, frequency, monetary)
            SELECT p.customer_id, cur.customer_key, (p.s).last_order, (p.s).frequency, (p.s).monetary
            FROM (SELECT customer_id, customer_analytics.rfm_agg(ts, amount) AS s FROM per_order GROUP BY customer_id) p
            LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = p.customer_id AND cur.is_current
                                                         AND cur.customer_key <> -1
            ON CONFLICT (customer_id) DO UPDATE
                SET last_order = greatest(u.last_order, excluded.last_order),
                    frequency = u.frequency + excluded.frequency,
                    monetary = u.monetary + excluded.monetary
            RETURNING 1
        )
        SELECT count(*) FROM noted INTO redo;   -- (added runs all the same)
        EXIT WHEN redo = 0 OR rounds >= 10;
    END LOOP;

    -- lines later than as_of (an as_of in the past) are not in rfm(as_of):
    -- then the scores come from the facts
    -- (the last purchase as of then from the same C scan of the inputs)
    later := EXISTS (SELECT FROM customer_analytics.fact_order_line WHERE order_ts > as_of);
    WITH scored AS (
        SELECT s.*, p.last_order AS last_purchase
        FROM customer_analytics.rfm(as_of) s
        JOIN customer_analytics_internal.rfm_rollup_rows(as_of) p ON p.customer_id = s.customer_id
        WHERE later
        UNION ALL
        SELECT s.*, u.last_order
        FROM customer_analytics.rfm_from_rollup(as_of) s
        JOIN customer_analytics.rfm_rollup_customer u ON u.customer_id = s.customer_id
        WHERE NOT later
    ), diff AS MATERIALIZED (      -- one pass over both: what to write
        SELECT s.*, t.customer_id AS old_customer_id, t.segment AS old_segment, t.monetary AS old_monetary,
               t.frequency AS old_frequency, t.last_purchase AS old_last_purchase
        FROM scored s FULL JOIN customer_analytics.customer_rfm_score t ON t.customer_id = s.customer_id
        WHERE s.customer_id IS NULL OR t.customer_id IS NULL
           OR (t.customer_key, t.last_purchase, t.frequency, t.monetary, t.rfm_cell, t.segment)
              IS DISTINCT FROM (s.customer_key, s.last_purchase, s.frequency, s.monetary, s.rfm_cell, s.segment)
    ), updated AS (
        UPDATE customer_analytics.customer_rfm_score t
        SET customer_key = d.customer_key, last_purchase = d.last_purchase, frequency = d.frequency,
            monetary = d.monetary, r = d.r, f = d.f, m = d.m, rfm_cell = d.rfm_cell, segment = d.segment
        FROM diff d
        WHERE t.customer_id = d.customer_id AND d.old_customer_id IS NOT NULL
        RETURNING t.segment, t.monetary, t.frequency, t.last_purchase,
                  d.old_segment, d.old_monetary, d.old_frequency, d.old_last_purchase
    ), inserted AS (
        INSERT INTO customer_analytics.customer_rfm_score
            (customer_id, customer_key, last_purchase, frequency, monetary, r, f, m, rfm_cell, segment)
        SELECT d.customer_id, d.customer_key, d.last_purchase, d.frequency, d.monetary, d.r, d.f, d.m, d.rfm_cell, d.segment
        FROM diff d WHERE d.old_customer_id IS NULL
        RETURNING segment, monetary, frequency, last_purchase
    ), deleted AS (
        DELETE FROM customer_analytics.customer_rfm_score t
        USING diff d
        WHERE t.customer_id = d.old_customer_id AND d.customer_id IS NULL
        RETURNING t.segment, t.monetary, t.frequency, t.last_purchase
    ), stat AS (            -- segment_summary's sums: the rows written in, the rows replaced out
        INSERT INTO customer_analytics_internal.rfm_segment_stat AS g
        SELECT c.segment, sum(c.n)::bigint, sum(c.n * c.monetary), sum(c.n * c.frequency)::bigint,
               sum(c.n * EXTRACT(epoch FROM c.last_purchase))
        FROM (SELECT 1, u.segment, u.monetary, u.frequency, u.last_purchase FROM updated u
              UNION ALL
              SELECT -1, u.old_segment, u.old_monetary, u.old_frequency, u.old_last_purchase FROM updated u
              UNION ALL
              SELECT 1, i.segment, i.monetary, i.frequency, i.last_purchase FROM inserted i
              UNION ALL
              SELECT -1, x.segment, x.monetary, x.frequency, x.last_purchase FROM deleted x)
             c (n, segment, monetary, frequency, last_purchase)
        GROUP BY c.segment
        ORDER BY c.segment
        ON CONFLICT (segment) DO UPDATE
            SET customers = g.customers + excluded.customers,
                monetary = g.monetary + excluded.monetary,
                frequency = g.frequency + excluded.frequency,
                purchase_epochs = g.purchase_epochs + excluded.purchase_epochs
    )
    SELECT (SELECT count(*) FROM updated) + (SELECT count(*) FROM inserted) + (SELECT count(*) FROM deleted)
    INTO changed;
    DELETE FROM customer_analytics_internal.rfm_segment_stat WHERE customers = 0;
    INSERT INTO customer_analytics.customer_rfm_refresh (id, as_of, refreshed_at)
    VALUES (true, as_of, clock_timestamp())
    ON CONFLICT (id) DO UPDATE SET as_of = EXCLUDED.as_of, refreshed_at = EXCLUDED.refreshed_at;
    RETURN changed;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.note_dirty_sales_days()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- one of the extension's writers queues its own changes
    IF customer_analytics_internal.own_writer() THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO customer_analytics_internal.sales_dirty_day VALUES ('-infinity') ON CONFLICT DO NOTHING;
    ELSIF TG_TABLE_NAME = 'dim_product' THEN
        -- a product moved to another category: every day it sold on
        INSERT INTO customer_analytics_internal.sales_dirty_day
        SELECT DISTINCT d.date
        FROM old_rows o JOIN new_rows n USING (product_key)
        JOIN customer_analytics.fact_order_line f ON f.product_key = n.product_key
        JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
        WHERE o.category IS DISTINCT FROM n.category
        ON CONFLICT DO NOTHING;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO customer_analytics_internal.sales_dirty_day
        SELECT DISTINCT d.date FROM new_rows r JOIN customer_analytics.dim_date d USING (date_key)
        ON CONFLICT DO NOTHING;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO customer_analytics_internal.sales_dirty_day
        SELECT DISTINCT d.date FROM old_rows r JOIN customer_analytics.dim_date d USING (date_key)
        ON CONFLICT DO NOTHING;
    ELSE
        INSERT INTO customer_analytics_internal.sales_dirty_day
        SELECT DISTINCT d.date
        FROM (SELECT date_key FROM old_rows UNION SELECT date_key FROM new_rows) r
        JOIN customer_analytics.dim_date d USING (date_key)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.fact_event_changed()
    RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
BEGIN
    -- one of the extension's writers queues its own changes
    IF customer_analytics_internal.own_writer() THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        -- no facts, no sessions; and the next event run is a full pass, so
        -- that the old watermark does not turn everything staged into late
        TRUNCATE clickstream_change, sessions;
        DELETE FROM event_transform_state;
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO clickstream_change (visitor, since)
        SELECT visitor(o.customer_id, o.session_id), min(o.event_ts) FROM old_rows o GROUP BY 1;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        INSERT INTO clickstream_change (visitor, since)
        SELECT visitor(n.customer_id, n.session_id), min(n.event_ts) FROM new_rows n GROUP BY 1;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.note_check_change()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    keyexpr text;
    n bigint;
BEGIN
    -- one of the extension's writers queues its own changes
    IF customer_analytics_internal.own_writer() THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM customer_analytics_internal.check_change WHERE rel = TG_RELID;
        INSERT INTO customer_analytics_internal.check_change (rel, op) VALUES (TG_RELID, 'T');
        RETURN NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        -- the writers' rule: nothing row by row for a table already due for a
        -- whole check, and a batch too big to queue makes it due (a statement
        -- that wrote nothing has nothing to queue)
        SELECT count(*) INTO n FROM new_rows;
        IF n = 0 OR NOT customer_analytics_internal.check_queue(TG_RELID, n) THEN
            RETURN NULL;
        END IF;
        SELECT 'jsonb_build_object(' || string_agg(format('%L, r.%I', c, c), ', ') || ')' INTO keyexpr
        FROM unnest(customer_analytics_internal.key_columns(TG_RELID)) c;
        EXECUTE format('INSERT INTO customer_analytics_internal.check_change (rel, op, key) SELECT $1, ''n'', %s FROM new_rows r',
                       keyexpr) USING TG_RELID;
    END IF;
    -- a table already due for a whole check needs no detail
    IF TG_OP = 'DELETE'
       AND EXISTS (SELECT FROM customer_analytics_internal.check_change WHERE rel = TG_RELID AND op = 'T') THEN
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO customer_analytics_internal.check_change (rel, op, old_row)
        SELECT TG_RELID, 'o', to_jsonb(r) FROM old_rows r;
    END IF;
    RETURN NULL;
END
$$;

-- issue 18: transform() writes its order lines without a query per line where that is sound (the batch's keys checked in one anti-join); a first load queues no row per line (RFM: everyone due; checks: the whole table)
CREATE FUNCTION customer_analytics_internal.fact_bulk_write_ok(fact regclass)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    on_citus boolean := false;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed'
       OR current_setting('session_replication_role') <> 'origin'
       OR NOT has_parameter_privilege('session_replication_role', 'SET')
       OR EXISTS (SELECT FROM pg_trigger t
                  WHERE t.tgrelid = fact AND NOT t.tgisinternal
                    AND NOT EXISTS (SELECT FROM pg_depend e JOIN pg_extension x ON x.oid = e.refobjid
                                    WHERE e.classid = 'pg_proc'::regclass AND e.objid = t.tgfoid
                                      AND e.refclassid = 'pg_extension'::regclass AND e.deptype = 'e'
                                      AND x.extname = 'customer_analytics')) THEN
        RETURN false;
    END IF;
    IF to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL THEN
        EXECUTE 'SELECT EXISTS (SELECT FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1)'
            INTO on_citus USING fact;
        IF on_citus THEN
            RETURN false;
        END IF;
    END IF;
    LOCK TABLE dim_customer, dim_product, dim_date IN SHARE MODE;
    RETURN true;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.fact_bulk_write_ok(regclass) IS
    'Internal to transform(): whether the next write into the fact table may skip the foreign keys'' per-row checks (READ COMMITTED, a role that may set session_replication_role, no trigger but the keys'' and the extension''s, not a Citus table); if so, locks the dimensions SHARE until commit';

CREATE FUNCTION customer_analytics_internal.check_order_line_keys()
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    bad record;
BEGIN
    SELECT r.order_id, r.line_number, r.customer_key, r.product_key, r.date_key INTO bad
    FROM ca_order_lines r
    WHERE NOT EXISTS (SELECT FROM dim_customer c WHERE c.customer_key = r.customer_key)
       OR NOT EXISTS (SELECT FROM dim_product p WHERE p.product_key = r.product_key)
       OR NOT EXISTS (SELECT FROM dim_date d WHERE d.date_key = r.date_key)
    ORDER BY r.order_id, r.line_number
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'order line % / % refers to a dimension row that does not exist', bad.order_id, bad.line_number
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = format('customer_key %s, product_key %s, date_key %s: one of them is in no dimension table; nothing of this transform() is kept.',
                                  bad.customer_key, bad.product_key, bad.date_key),
                  HINT = 'A dimension row was removed while transform() ran, or the dimensions were changed by hand: restore it, or run transform(full_refresh => true).';
    END IF;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.check_order_line_keys() IS
    'Internal to transform(): the keys of the batch''s order lines (ca_order_lines) checked against the dimensions in one anti-join, after a write that skipped the per-row checks; raises foreign_key_violation naming the first line whose key is missing';

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_fact_order_line()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    tz text := business_timezone();
    batch bigint;
    added bigint;
    changed bigint := 0;
    detail boolean;
    fast boolean;
    line_queue boolean := true;
BEGIN
    CREATE TEMP TABLE ca_customer_lookup ON COMMIT DROP AS
    SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT o.customer_id FROM ca_batch_orders o
                                          WHERE o.customer_id IS NOT NULL));
    ANALYZE ca_customer_lookup;

    CREATE TEMP TABLE ca_order_lines ON COMMIT DROP AS
    SELECT s.order_id, s.line_number,
           COALESCE(c.customer_key, -1) AS customer_key,
           COALESCE(p.product_key, -1) AS product_key,
           date_key((s.order_ts AT TIME ZONE tz)::date) AS date_key,
           s.order_ts, s.quantity, s.unit_price, s.discount, s.status, s.channel,
           s.updated_at, s.stage_id, s.load_id, s.customer_id, s.product_id,
           (s.customer_id IS NOT NULL AND c.customer_key IS NULL)
           OR (s.product_id IS NOT NULL AND p.product_key IS NULL) AS unresolved
    FROM ca_batch_orders s
    LEFT JOIN ca_customer_lookup c
           ON c.customer_id = s.customer_id AND s.order_ts >= c.valid_from AND s.order_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id;
    DROP TABLE ca_customer_lookup;
    SELECT count(*) INTO batch FROM ca_order_lines;
    detail := check_queue('customer_analytics.fact_order_line', batch);

    -- (session_replication_role is set here, not in a function with SET
    -- clauses of its own, which would undo it on return; this function's
    -- own SET clauses undo it on return or error)
    fast := fact_bulk_write_ok('customer_analytics.fact_order_line');
    IF fast THEN
        PERFORM set_config('session_replication_role', 'replica', true);
    END IF;
    -- new lines are usually new orders: queued to be added to their
    -- customers' RFM inputs without a recompute.  With no rollup yet the
    -- next refresh builds it from the facts whatever is queued: one mark
    -- that everyone is due (NULL) instead of a row per line
    IF NOT EXISTS (SELECT FROM customer_analytics.rfm_rollup_customer) THEN
        INSERT INTO rfm_dirty_customer VALUES (NULL) ON CONFLICT DO NOTHING;
        line_queue := false;
    END IF;
    -- Into an empty table (a first load) the lines go in without ON
    -- CONFLICT: nothing can conflict (the batch has one row per line, and
    -- transform() runs alone), and the arbiter's check before every insert
    -- costs a plain load 30% to 80% more
    EXECUTE format($sql$
    WITH written AS (
        INSERT INTO fact_order_line AS f
            (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity,
             unit_price, discount, status, channel, updated_at, stage_id, load_id)
        SELECT r.order_id, r.line_number, r.customer_key, r.product_key, r.date_key,
               r.order_ts, r.quantity, r.unit_price, r.discount, r.status, r.channel,
               r.updated_at, r.stage_id, r.load_id
        FROM ca_order_lines r
        %s
        RETURNING f.order_id, f.line_number, f.customer_key, f.date_key, f.order_ts, f.quantity,
                  f.revenue, f.status
    ), rfm AS (
        INSERT INTO rfm_new_line (customer_id, order_id, line_number, order_ts, revenue, purchase)
        SELECT c.customer_id, w.order_id, w.line_number, w.order_ts, w.revenue,
               w.status = 'completed' AND w.customer_key <> -1 AND (w.quantity > 0 OR w.revenue <> 0)
        FROM written w JOIN dim_customer c USING (customer_key)
        WHERE $1
    ), days AS (
        INSERT INTO sales_dirty_day
        SELECT DISTINCT d.date FROM (SELECT DISTINCT w.date_key FROM written w) k JOIN dim_date d USING (date_key)
        ON CONFLICT DO NOTHING
    ), checked AS (
        INSERT INTO check_change (rel, op, key)
        SELECT 'customer_analytics.fact_order_line'::regclass, 'n',
               jsonb_build_object('order_id', w.order_id, 'line_number', w.line_number)
        FROM written w WHERE $2
    )
    SELECT count(*) FROM written
    $sql$, CASE WHEN EXISTS (SELECT FROM fact_order_line) THEN 'ON CONFLICT (order_id, line_number) DO NOTHING' END)
    INTO added USING line_queue, detail;
    IF fast THEN
        PERFORM set_config('session_replication_role', 'origin', true);
        PERFORM check_order_line_keys();
    END IF;

    -- lines already in the facts: a later staged version that differs wins
    IF added < batch THEN
        CREATE TEMP TABLE ca_line_changes (new jsonb, old jsonb) ON COMMIT DROP;
        WITH upd AS (
            UPDATE fact_order_line f
            SET customer_key = r.customer_key, product_key = r.product_key,
                date_key = r.date_key, order_ts = r.order_ts,
                quantity = r.quantity, unit_price = r.unit_price,
                discount = r.discount, status = r.status,
                channel = r.channel, updated_at = r.updated_at,
                stage_id = r.stage_id, load_id = r.load_id
            FROM ca_order_lines r, fact_order_line was
            WHERE f.order_id = r.order_id AND f.line_number = r.line_number
              AND was.order_id = r.order_id AND was.line_number = r.line_number
              AND r.stage_id > f.stage_id
              AND (f.customer_key, f.product_key, f.order_ts, f.quantity, f.unit_price,
                   f.discount, f.status, f.channel, f.updated_at)
                  IS DISTINCT FROM
                  (r.customer_key, r.product_key, r.order_ts, r.quantity,
                   r.unit_price, r.discount, r.status, r.channel, r.updated_at)
            RETURNING to_jsonb(f) AS new, to_jsonb(was) AS old
        )
        INSERT INTO ca_line_changes SELECT * FROM upd;
        changed := note_order_line_updates(detail);
    END IF;

    -- the lines of this batch a later dimension row may repair (a batch
    -- line that did resolve leaves the queue)
    MERGE INTO unknown_member_line q
    USING ca_order_lines b
    ON q.order_id = b.order_id AND q.line_number = b.line_number
    WHEN MATCHED AND NOT b.unresolved THEN DELETE
    WHEN MATCHED THEN UPDATE SET customer_id = b.customer_id, product_id = b.product_id
    WHEN NOT MATCHED AND b.unresolved THEN
        INSERT (order_id, line_number, customer_id, product_id)
        VALUES (b.order_id, b.line_number, b.customer_id, b.product_id);
    DROP TABLE ca_order_lines;
    RETURN added + changed;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.check_queue(rel regclass, batch bigint)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    first_load boolean;
BEGIN
    IF EXISTS (SELECT FROM customer_analytics_internal.check_change c
               WHERE c.rel = check_queue.rel AND c.op = 'T') THEN
        RETURN false;
    END IF;
    -- a batch of a million rows, or a table's first load (the whole table
    -- is the batch: reading it costs less than queuing every row)
    EXECUTE format('SELECT NOT EXISTS (SELECT FROM %s)', rel) INTO first_load;
    IF batch > 1000000 OR first_load THEN
        DELETE FROM customer_analytics_internal.check_change c WHERE c.rel = check_queue.rel;
        INSERT INTO customer_analytics_internal.check_change (rel, op) VALUES (check_queue.rel, 'T');
        RETURN false;
    END IF;
    RETURN true;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.check_queue(regclass, bigint) IS
    'Internal: whether a writer of the extension queues the rows of a batch it writes into a table in check_change row by row (false: the table is due for a whole check, queued here for a batch of more than a million rows or a table''s first load)';

-- issue 18: clv_summary() in C (one scan of the order lines, sorted as
-- integers), what a clv_model refresh spent most of its time on
CREATE OR REPLACE FUNCTION customer_analytics.clv_summary(as_of timestamptz)
RETURNS TABLE (customer_id text, first_purchase date, x float8, t_x float8, "T" float8, m_x float8,
               purchase_days bigint, revenue numeric)
AS 'MODULE_PATHNAME', 'ca_clv_summary'
LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;

-- issue 17 sales views, anomalies, forecasts, checks, track_event on the cluster:
-- day_in_progress() and intraday_orders() query a day at a time instead of
-- a lateral join over generate_series, refresh_sales_rollup()'s EXISTS has
-- a column, the customer-version check reaches the later versions' lines
-- through an array of their keys (all plan on Citus); track_event() is
-- refused on a Citus worker
CREATE OR REPLACE FUNCTION customer_analytics.day_in_progress()
RETURNS date
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tz text := customer_analytics.business_timezone();
    last_ts timestamptz;
    last_day date;
    usual interval;
    latest interval;
BEGIN
    -- through the order_ts index: the newest lines, then one day at a time
    SELECT max(f.order_ts) INTO last_ts FROM customer_analytics.fact_order_line f WHERE f.status = 'completed';
    IF last_ts IS NULL THEN
        RETURN NULL;
    END IF;
    last_day := (last_ts AT TIME ZONE tz)::date;
    IF last_day >= (now() AT TIME ZONE tz)::date THEN
        RETURN last_day;
    END IF;
    -- one query per week rather than a lateral join over generate_series,
    -- which Citus cannot push down: each is one day's range of the
    -- order_ts index, on a single node as on every shard
    FOR k IN 1 .. 8 LOOP
        SELECT max(f.order_ts AT TIME ZONE tz) - (last_day - 7 * k)::timestamp INTO latest
        FROM customer_analytics.fact_order_line f
        WHERE f.status = 'completed'
          AND f.order_ts >= (last_day - 7 * k)::timestamp AT TIME ZONE tz
          AND f.order_ts < (last_day - 7 * k + 1)::timestamp AT TIME ZONE tz;
        usual := LEAST(usual, latest);  -- LEAST ignores NULLs: a week without lines
    END LOOP;
    IF (last_ts AT TIME ZONE tz) - last_day::timestamp < usual - interval '1 hour' THEN
        RETURN last_day;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.intraday_orders(at timestamptz DEFAULT now())
RETURNS TABLE (day date, hour_end time, orders_so_far bigint, expected_so_far float8,
               orders_last_hour bigint, expected_last_hour float8, p_value float8, outage boolean)
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tz text := customer_analytics.business_timezone();
    local_at timestamp := at AT TIME ZONE tz;
    today date := (at AT TIME ZONE tz)::date;
    since_midnight interval := (at AT TIME ZONE tz) - (at AT TIME ZONE tz)::date;
    p_day float8;
    p_hour float8;
    closed date[];
    d date;
    n_so_far bigint;
    n_last_hour bigint;
    past_so_far bigint[] := '{}';     -- the same weekday of the weeks before, open days
    past_last_hour bigint[] := '{}';
BEGIN
    IF today IN (SELECT c.day FROM customer_analytics.closed_days(today, today) c) THEN
        RETURN;
    END IF;
    closed := ARRAY(SELECT c.day FROM customer_analytics.closed_days(today - 56, today - 7) c);
    -- one query per day rather than subqueries correlated with a series of
    -- days, which Citus cannot push down: each reads one day's range of the
    -- order_ts index, on a single node as on every shard
    FOR k IN 0 .. 8 LOOP
        d := today - 7 * k;
        CONTINUE WHEN k > 0 AND d = ANY (closed);
        SELECT count(DISTINCT f.order_id),
               count(DISTINCT f.order_id) FILTER (
                   WHERE f.order_ts >= (d + since_midnight - interval '1 hour') AT TIME ZONE tz)
        INTO n_so_far, n_last_hour
        FROM customer_analytics.fact_order_line f
        WHERE f.status = 'completed' AND f.quantity > 0
          AND f.order_ts >= d::timestamp AT TIME ZONE tz
          AND f.order_ts < (d + since_midnight) AT TIME ZONE tz;
        IF k = 0 THEN
            orders_so_far := n_so_far;
            orders_last_hour := n_last_hour;
        ELSE
            past_so_far := past_so_far || n_so_far;
            past_last_hour := past_last_hour || n_last_hour;
        END IF;
    END LOOP;
    day := today;
    hour_end := local_at::time;
    SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY v) INTO expected_so_far FROM unnest(past_so_far) v;
    SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY v) INTO expected_last_hour FROM unnest(past_last_hour) v;
    IF expected_so_far IS NULL THEN
        RETURN;                 -- no history for this weekday yet
    END IF;
    p_day := customer_analytics.poisson_lower_tail(orders_so_far, expected_so_far);
    p_hour := CASE WHEN expected_last_hour >= 3
                   THEN customer_analytics.poisson_lower_tail(orders_last_hour, expected_last_hour) ELSE 1 END;
    p_value := LEAST(p_day, p_hour);
    outage := p_value < 0.001 AND GREATEST(expected_so_far, expected_last_hour) >= 3;
    RETURN NEXT;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.refresh_sales_rollup(full_refresh boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    days date[];
    keys integer[];
BEGIN
    -- one maintainer at a time; readers of the rollups never wait
    PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('refresh_sales_rollup()'));
    -- take the noted days (days noted by transactions still running stay for next time)
    WITH taken AS (DELETE FROM customer_analytics_internal.sales_dirty_day RETURNING day)
    SELECT array_agg(day) INTO days FROM taken;
    IF full_refresh OR '-infinity' = ANY (days)
       -- (SELECT 1: Citus cannot plan an EXISTS without columns)
       OR (NOT EXISTS (SELECT 1 FROM customer_analytics.sales_rollup_day)
           AND EXISTS (SELECT 1 FROM customer_analytics.fact_order_line)) THEN
        DELETE FROM customer_analytics.sales_rollup_day;
        DELETE FROM customer_analytics.sales_rollup_category;
        keys := NULL;                   -- every day
    ELSIF days IS NULL THEN
        RETURN 0;
    ELSE
        keys := ARRAY(SELECT customer_analytics.date_key(d) FROM unnest(days) d);
        DELETE FROM customer_analytics.sales_rollup_day WHERE day = ANY (days);
        DELETE FROM customer_analytics.sales_rollup_category WHERE day = ANY (days);
    END IF;

    INSERT INTO customer_analytics.sales_rollup_day (day, revenue, orders, customers)
    -- credit notes (negative quantity) net against revenue but are no
    -- orders, and their customers did not buy that day
    SELECT d.date, sum(f.revenue), count(DISTINCT f.order_id) FILTER (WHERE f.quantity > 0),
           count(DISTINCT c.customer_id) FILTER (WHERE f.customer_key <> -1 AND f.quantity > 0)
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
    JOIN customer_analytics.dim_customer c ON c.customer_key = f.customer_key
    WHERE f.status = 'completed' AND (keys IS NULL OR f.date_key = ANY (keys))
    GROUP BY d.date;

    INSERT INTO customer_analytics.sales_rollup_category (day, category, revenue, orders, units)
    SELECT d.date, p.category, sum(f.revenue), count(DISTINCT f.order_id) FILTER (WHERE f.quantity > 0), sum(f.quantity)
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
    JOIN customer_analytics.dim_product p ON p.product_key = f.product_key
    WHERE f.status = 'completed' AND (keys IS NULL OR f.date_key = ANY (keys))
    GROUP BY d.date, p.category;

    RETURN CASE WHEN keys IS NULL THEN (SELECT count(*) FROM customer_analytics.sales_rollup_day)
                ELSE cardinality(keys) END;
END
$$;

UPDATE customer_analytics.quality_check SET params = '{"sql": "SELECT l.order_id, l.line_number, l.order_ts, c.valid_from, c.valid_to FROM customer_analytics.fact_order_line l JOIN customer_analytics.dim_customer c ON c.customer_key = l.customer_key WHERE l.customer_key = ANY (ARRAY(SELECT v.customer_key FROM customer_analytics.dim_customer v WHERE v.customer_key <> -1 AND EXISTS (SELECT 1 FROM customer_analytics.dim_customer w WHERE w.customer_id = v.customer_id AND w.valid_from < v.valid_from))) AND NOT (l.order_ts >= c.valid_from AND l.order_ts < c.valid_to)", "incremental_sql": "SELECT l.order_id, l.line_number, l.order_ts, c.valid_from, c.valid_to FROM customer_analytics.changed_rows(NULL::customer_analytics.fact_order_line) l JOIN customer_analytics.dim_customer c ON c.customer_key = l.customer_key WHERE c.customer_key <> -1 AND NOT (l.order_ts >= c.valid_from AND l.order_ts < c.valid_to) AND EXISTS (SELECT 1 FROM customer_analytics.dim_customer v WHERE v.customer_id = c.customer_id AND v.valid_from < c.valid_from) UNION SELECT l.order_id, l.line_number, l.order_ts, c.valid_from, c.valid_to FROM customer_analytics.fact_order_line l JOIN customer_analytics.dim_customer c ON c.customer_key = l.customer_key WHERE l.customer_key = ANY (ARRAY(SELECT v.customer_key FROM customer_analytics.dim_customer v WHERE v.customer_key <> -1 AND v.customer_id IN (SELECT customer_id FROM customer_analytics.changed_rows(NULL::customer_analytics.dim_customer)) AND EXISTS (SELECT 1 FROM customer_analytics.dim_customer w WHERE w.customer_id = v.customer_id AND w.valid_from < v.valid_from))) AND NOT (l.order_ts >= c.valid_from AND l.order_ts < c.valid_to)"}'
WHERE name = 'order line has its customer version' AND builtin;

CREATE FUNCTION customer_analytics_internal.on_citus_worker()
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'ca_on_citus_worker' LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics_internal.on_citus_worker() IS
    'Internal: whether this node is a Citus worker (its group in pg_dist_local_group is not 0), where track_event() is refused; false without Citus, at the cost of one syscache lookup';

CREATE OR REPLACE FUNCTION customer_analytics.track_event(
    event_type  text,
    session_id  text,
    customer_id text DEFAULT NULL,
    product_id  text DEFAULT NULL,
    order_id    text DEFAULT NULL,
    channel     text DEFAULT NULL,
    device      text DEFAULT NULL,
    event_ts    timestamptz DEFAULT NULL,
    event_id    text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    id pg_catalog.text := COALESCE(event_id, pg_catalog.gen_random_uuid()::pg_catalog.text);
BEGIN
    IF event_type IS NULL
       OR NOT event_type OPERATOR(pg_catalog.=) ANY ('{page_view,product_view,add_to_cart,checkout,purchase}'::pg_catalog.text[]) THEN
        RAISE EXCEPTION 'invalid event_type: %', COALESCE(pg_catalog.quote_literal(event_type), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'Argument event_type of track_event().',
                  HINT = 'Use page_view, product_view, add_to_cart, checkout or purchase.';
    END IF;
    IF session_id IS NULL OR session_id OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION 'track_event() needs a session_id'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = pg_catalog.format('Argument session_id was %s for a %s event.',
                                             COALESCE(pg_catalog.quote_literal(session_id), 'NULL'), event_type),
                  HINT = 'Pass the visitor''s session or cookie id.';
    END IF;
    IF id OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION 'track_event() got an empty event_id'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass NULL to have one generated.';
    END IF;
    -- after the checks of the arguments: a bad call is told what is wrong with it first
    IF customer_analytics_internal.on_citus_worker() THEN
        RAISE EXCEPTION 'track_event() must run on the Citus coordinator, and this node is a worker'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'Before distribute(), an event tracked here would stay in this worker''s own copy of stg_events, which nothing reads; the pipeline that moves events on, the sessions and the change queues are the coordinator''s.',
                  HINT = 'Connect to the coordinator and call customer_analytics.track_event() there.';
    END IF;
    INSERT INTO customer_analytics.stg_events
        (event_id, event_ts, customer_id, session_id, event_type, product_id, order_id, channel, device)
    VALUES (id, COALESCE(event_ts, pg_catalog.clock_timestamp()), customer_id, session_id, event_type,
            product_id, order_id, channel, device);
    RETURN id;
END
$$;
COMMENT ON FUNCTION customer_analytics.track_event(text, text, text, text, text, text, text, timestamptz, text) IS
    'Record one clickstream event from an application into stg_events; returns its event_id (a new UUID when none is given). event_ts defaults to the current time. Safe with many concurrent writers (no unique index, no lock); a plain INSERT or COPY into stg_events is the equivalent bulk path. transform() or refresh_clickstream() moves it on. On a Citus cluster, call it on the coordinator: on a worker it is refused (SQLSTATE 55000)';

-- issue 17 RFM and CLV on the cluster: rfm() of the distributed star schema, refresh_customer_rfm() and its rebuild read the facts through SQL Citus plans (see docs/scaling.md)
CREATE OR REPLACE FUNCTION customer_analytics.refresh_customer_rfm(full_refresh boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    ids text[];
    everyone boolean;
    as_of timestamptz := customer_analytics.reference_time();
    map text := COALESCE(NULLIF(current_setting('customer_analytics.rfm_segment_map', true), ''), 'default');
    redo bigint;
    rounds integer := 0;
    later boolean;
    changed bigint;
BEGIN
    -- one maintainer at a time; readers never wait
    PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('refresh_customer_rfm()'));
    IF (SELECT count(*) FROM customer_analytics.rfm_segment_cells(map)) <> 125 THEN
        RAISE EXCEPTION 'RFM segment map "%" does not name all 125 cells', map
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('See SELECT * FROM customer_analytics.rfm_check_segment_map(%L);', map);
    END IF;
    LOOP
        rounds := rounds + 1;
        -- take the noted customers (those noted by transactions still running stay for next time)
        WITH taken AS (DELETE FROM customer_analytics_internal.rfm_dirty_customer RETURNING customer_id)
        SELECT array_agg(customer_id) FILTER (WHERE customer_id IS NOT NULL), bool_or(customer_id IS NULL)
        INTO ids, everyone FROM taken;
        -- (the subqueries select a column: Citus plans no EXISTS without)
        IF full_refresh OR everyone
           OR (NOT EXISTS (SELECT 1 FROM customer_analytics.rfm_rollup_customer)
               AND EXISTS (SELECT 1 FROM customer_analytics.fact_order_line)) THEN
            DELETE FROM customer_analytics.rfm_rollup_customer;
            ids := NULL;
            everyone := true;
            full_refresh := false;
        ELSIF ids IS NOT NULL THEN
            DELETE FROM customer_analytics.rfm_rollup_customer WHERE customer_id IN (SELECT unnest(ids));
        END IF;
        -- The queued lines these statements see are in the facts they
        -- read: they are consumed here, not added again below.
        IF everyone THEN
            WITH consumed AS (
                DELETE FROM customer_analytics_internal.rfm_new_line
            )
            INSERT INTO customer_analytics.rfm_rollup_customer (customer_id, customer_key, last_order, frequency, monetary)
            SELECT r.customer_id, r.customer_key, r.last_order, r.frequency, r.monetary
            FROM customer_analytics_internal.rfm_rollup_rows('infinity') r;
        ELSIF ids IS NOT NULL THEN
            -- a few customers: their lines through the indexes (the
            -- query of rfm_orders(ids, 'infinity') written out: Citus
            -- inlines no SQL function over a distributed table, and runs
            -- none with parameters; on one node the plan is the same)
            WITH consumed AS (
                DELETE FROM customer_analytics_internal.rfm_new_line q
                WHERE q.customer_id IN (SELECT unnest(ids))
            )
            INSERT INTO customer_analytics.rfm_rollup_customer (customer_id, customer_key, last_order, frequency, monetary)
            SELECT o.customer_id, cur.customer_key, (o.s).last_order, (o.s).frequency, (o.s).monetary
            FROM (SELECT x.customer_id, customer_analytics.rfm_agg(x.ts, x.amount) AS s
                  FROM (SELECT c.customer_id, max(fl.order_ts) AS ts, sum(fl.revenue) AS amount
                        FROM customer_analytics.fact_order_line fl
                        JOIN customer_analytics.dim_customer c ON c.customer_key = fl.customer_key
                        WHERE fl.status = 'completed' AND c.customer_key <> -1
                          AND (fl.quantity > 0 OR fl.revenue <> 0)
                          AND c.customer_id IN (SELECT unnest(ids))
                        GROUP BY c.customer_id, fl.order_id,
                                 CASE WHEN fl.revenue < 0 THEN fl.line_number END) x
                  GROUP BY x.customer_id) o
            LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = o.customer_id AND cur.is_current
                                                         AND cur.customer_key <> -1;
        END IF;

        -- new orders are added to their customers' rows; an order that had
        -- lines before (its line count in the facts is larger) is not new:
        -- its customers are recomputed in the next round
        WITH taken AS (
            DELETE FROM customer_analytics_internal.rfm_new_line RETURNING *
        ), queued AS (
            SELECT t.order_id, count(*) AS n FROM taken t GROUP BY t.order_id
        ), orders AS (
            -- the facts' lines counted in a join, not a subquery per order:
            -- Citus plans no correlated subquery next to a CTE
            SELECT q.order_id, q.n = COALESCE(f.n, 0) AS whole
            FROM queued q
            LEFT JOIN (SELECT f.order_id, count(*) AS n FROM customer_analytics.fact_order_line f
                       WHERE f.order_id IN (SELECT order_id FROM queued)
                       GROUP BY f.order_id) f USING (order_id)
        ), noted AS (
            INSERT INTO customer_analytics_internal.rfm_dirty_customer
            SELECT DISTINCT t.customer_id FROM taken t JOIN orders o USING (order_id) WHERE NOT o.whole
            ON CONFLICT DO NOTHING
            RETURNING 1
        ), per_order AS (            -- grouped as above
            SELECT t.customer_id, max(t.order_ts) AS ts, sum(t.revenue) AS amount
            FROM taken t JOIN orders o USING (order_id)
            WHERE o.whole AND t.purchase
            GROUP BY t.customer_id, t.order_id, CASE WHEN t.revenue < 0 THEN t.line_number END
        ), added AS (
            INSERT INTO customer_analytics.rfm_rollup_customer AS u (customer_id, customer_key, last_order, frequency, monetary)
            SELECT p.customer_id, cur.customer_key, (p.s).last_order, (p.s).frequency, (p.s).monetary
            FROM (SELECT customer_id, customer_analytics.rfm_agg(ts, amount) AS s FROM per_order GROUP BY customer_id) p
            LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = p.customer_id AND cur.is_current
                                                         AND cur.customer_key <> -1
            ON CONFLICT (customer_id) DO UPDATE
                SET last_order = greatest(u.last_order, excluded.last_order),
                    frequency = u.frequency + excluded.frequency,
                    monetary = u.monetary + excluded.monetary
            RETURNING 1
        )
        SELECT count(*) FROM noted INTO redo;   -- (added runs all the same)
        EXIT WHEN redo = 0 OR rounds >= 10;
    END LOOP;

    -- lines later than as_of (an as_of in the past) are not in rfm(as_of):
    -- then the scores come from the facts
    -- (the last purchase as of then from the same C scan of the inputs)
    later := EXISTS (SELECT 1 FROM customer_analytics.fact_order_line WHERE order_ts > as_of);
    WITH scored AS (
        SELECT s.*, p.last_order AS last_purchase
        FROM customer_analytics.rfm(as_of) s
        JOIN customer_analytics_internal.rfm_rollup_rows(as_of) p ON p.customer_id = s.customer_id
        WHERE later
        UNION ALL
        SELECT s.*, u.last_order
        FROM customer_analytics.rfm_from_rollup(as_of) s
        JOIN customer_analytics.rfm_rollup_customer u ON u.customer_id = s.customer_id
        WHERE NOT later
    ), diff AS MATERIALIZED (      -- one pass over both: what to write
        SELECT s.*, t.customer_id AS old_customer_id, t.segment AS old_segment, t.monetary AS old_monetary,
               t.frequency AS old_frequency, t.last_purchase AS old_last_purchase
        FROM scored s FULL JOIN customer_analytics.customer_rfm_score t ON t.customer_id = s.customer_id
        WHERE s.customer_id IS NULL OR t.customer_id IS NULL
           OR (t.customer_key, t.last_purchase, t.frequency, t.monetary, t.rfm_cell, t.segment)
              IS DISTINCT FROM (s.customer_key, s.last_purchase, s.frequency, s.monetary, s.rfm_cell, s.segment)
    ), updated AS (
        UPDATE customer_analytics.customer_rfm_score t
        SET customer_key = d.customer_key, last_purchase = d.last_purchase, frequency = d.frequency,
            monetary = d.monetary, r = d.r, f = d.f, m = d.m, rfm_cell = d.rfm_cell, segment = d.segment
        FROM diff d
        WHERE t.customer_id = d.customer_id AND d.old_customer_id IS NOT NULL
        RETURNING t.segment, t.monetary, t.frequency, t.last_purchase,
                  d.old_segment, d.old_monetary, d.old_frequency, d.old_last_purchase
    ), inserted AS (
        INSERT INTO customer_analytics.customer_rfm_score
            (customer_id, customer_key, last_purchase, frequency, monetary, r, f, m, rfm_cell, segment)
        SELECT d.customer_id, d.customer_key, d.last_purchase, d.frequency, d.monetary, d.r, d.f, d.m, d.rfm_cell, d.segment
        FROM diff d WHERE d.old_customer_id IS NULL
        RETURNING segment, monetary, frequency, last_purchase
    ), deleted AS (
        DELETE FROM customer_analytics.customer_rfm_score t
        USING diff d
        WHERE t.customer_id = d.old_customer_id AND d.customer_id IS NULL
        RETURNING t.segment, t.monetary, t.frequency, t.last_purchase
    ), stat AS (            -- segment_summary's sums: the rows written in, the rows replaced out
        INSERT INTO customer_analytics_internal.rfm_segment_stat AS g
        SELECT c.segment, sum(c.n)::bigint, sum(c.n * c.monetary), sum(c.n * c.frequency)::bigint,
               sum(c.n * EXTRACT(epoch FROM c.last_purchase))
        FROM (SELECT 1, u.segment, u.monetary, u.frequency, u.last_purchase FROM updated u
              UNION ALL
              SELECT -1, u.old_segment, u.old_monetary, u.old_frequency, u.old_last_purchase FROM updated u
              UNION ALL
              SELECT 1, i.segment, i.monetary, i.frequency, i.last_purchase FROM inserted i
              UNION ALL
              SELECT -1, x.segment, x.monetary, x.frequency, x.last_purchase FROM deleted x)
             c (n, segment, monetary, frequency, last_purchase)
        GROUP BY c.segment
        ORDER BY c.segment
        ON CONFLICT (segment) DO UPDATE
            SET customers = g.customers + excluded.customers,
                monetary = g.monetary + excluded.monetary,
                frequency = g.frequency + excluded.frequency,
                purchase_epochs = g.purchase_epochs + excluded.purchase_epochs
    )
    SELECT (SELECT count(*) FROM updated) + (SELECT count(*) FROM inserted) + (SELECT count(*) FROM deleted)
    INTO changed;
    DELETE FROM customer_analytics_internal.rfm_segment_stat WHERE customers = 0;
    INSERT INTO customer_analytics.customer_rfm_refresh (id, as_of, refreshed_at)
    VALUES (true, as_of, clock_timestamp())
    ON CONFLICT (id) DO UPDATE SET as_of = EXCLUDED.as_of, refreshed_at = EXCLUDED.refreshed_at;
    RETURN changed;
END
$$;

-- issue 17 transform on the cluster: transform(), transform_events(), their steps and the pipeline on a Citus cluster (docs/scaling.md)

CREATE FUNCTION customer_analytics_internal.citus_managed(rel regclass)
RETURNS boolean
LANGUAGE plpgsql STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    managed boolean;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN false;
    END IF;
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1)'
        INTO managed USING rel;
    RETURN managed;
END
$$;

COMMENT ON FUNCTION customer_analytics_internal.citus_managed(regclass) IS
    'Internal: whether a table is a Citus distributed or reference table (false where Citus is not installed); the writers choose their cluster path by it';

CREATE FUNCTION customer_analytics_internal.cluster_writes_begin()
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    was text;
BEGIN
    IF NOT citus_managed('customer_analytics.dim_customer') THEN
        RETURN NULL;
    END IF;
    was := current_setting('citus.multi_shard_modify_mode');
    PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);
    RETURN was;
END
$$;

COMMENT ON FUNCTION customer_analytics_internal.cluster_writes_begin() IS
    'Internal to transform() and transform_events(): on Citus, one connection per node for the rest of the transaction (dimensions, reference tables, are written after multi-shard statements); returns the previous citus.multi_shard_modify_mode, or NULL on a single node';

CREATE FUNCTION customer_analytics_internal.cluster_writes_end(was text)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF was IS NOT NULL THEN
        PERFORM set_config('citus.multi_shard_modify_mode', was, true);
    END IF;
END
$$;

COMMENT ON FUNCTION customer_analytics_internal.cluster_writes_end(text) IS
    'Internal: puts back the citus.multi_shard_modify_mode that cluster_writes_begin() returned (NULL: nothing to do)';

CREATE OR REPLACE FUNCTION customer_analytics.ensure_dim_date(from_day date, to_day date)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    lo date;
    hi date;
    added bigint;
BEGIN
    IF from_day IS NULL OR to_day IS NULL THEN
        RETURN 0;
    END IF;
    IF to_day - from_day > 36600 THEN
        RAISE EXCEPTION 'date range % to % is longer than 100 years', from_day, to_day
            USING ERRCODE = 'data_exception',
                  HINT = 'A timestamp far in the past or future was staged; find it in the staging tables and correct it.';
    END IF;
    -- keep the calendar contiguous from its first to its last day
    SELECT LEAST(min(date), from_day), GREATEST(max(date), to_day) INTO lo, hi FROM dim_date;
    lo := COALESCE(lo, from_day);
    hi := COALESCE(hi, to_day);
    -- the days added counted from what the INSERT returns: on Citus (a
    -- reference table) its row count is that of the rows sent, conflicting
    -- or not
    WITH ins AS (
        INSERT INTO dim_date (date_key, date, year, quarter, month, month_name,
                              iso_year, iso_week, day_of_week, day_name, is_weekend)
        SELECT date_key(d), d,
               date_part('year', d), date_part('quarter', d), date_part('month', d),
               to_char(d, 'FMMonth'),
               date_part('isoyear', d), date_part('week', d), date_part('isodow', d),
               to_char(d, 'FMDay'), date_part('isodow', d) >= 6
        FROM generate_series(lo, hi, interval '1 day') AS g(ts),
             LATERAL (SELECT g.ts::date AS d) AS x
        ON CONFLICT (date_key) DO NOTHING
        RETURNING 1
    )
    SELECT count(*) INTO added FROM ins;
    RETURN added;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.fact_bulk_write_ok(fact regclass)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed'
       OR current_setting('session_replication_role') <> 'origin'
       OR NOT has_parameter_privilege('session_replication_role', 'SET')
       OR EXISTS (SELECT FROM pg_trigger t
                  WHERE t.tgrelid = fact AND NOT t.tgisinternal
                    AND NOT EXISTS (SELECT FROM pg_depend e JOIN pg_extension x ON x.oid = e.refobjid
                                    WHERE e.classid = 'pg_proc'::regclass AND e.objid = t.tgfoid
                                      AND e.refclassid = 'pg_extension'::regclass AND e.deptype = 'e'
                                      AND x.extname = 'customer_analytics')) THEN
        RETURN false;
    END IF;
    IF citus_managed(fact) THEN
        RETURN false;
    END IF;
    LOCK TABLE dim_customer, dim_product, dim_date IN SHARE MODE;
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_dim_product()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    n bigint;
    detail boolean := check_queue('customer_analytics.dim_product', (SELECT count(*) FROM ca_batch_products));
BEGIN
    WITH was AS MATERIALIZED (
        SELECT d.* FROM dim_product d WHERE d.product_id IN (SELECT b.product_id FROM ca_batch_products b)
    ), written AS (
        INSERT INTO dim_product AS d (product_id, name, category, subcategory, unit_cost, list_price,
                                      updated_at, stage_id)
        SELECT product_id, name, category, subcategory, unit_cost, list_price, updated_at, stage_id
        FROM ca_batch_products
        ON CONFLICT (product_id) DO UPDATE
            SET name = excluded.name, category = excluded.category, subcategory = excluded.subcategory,
                unit_cost = excluded.unit_cost, list_price = excluded.list_price,
                updated_at = excluded.updated_at, stage_id = excluded.stage_id
            WHERE excluded.stage_id > d.stage_id
              AND (d.name, d.category, d.subcategory, d.unit_cost, d.list_price)
                  IS DISTINCT FROM
                  (excluded.name, excluded.category, excluded.subcategory, excluded.unit_cost, excluded.list_price)
        RETURNING d.product_key, d.category
    ), moved AS (           -- a product moved to another category: every day it sold on
        INSERT INTO sales_dirty_day
        SELECT DISTINCT dd.date
        FROM written w JOIN was o USING (product_key)
        JOIN fact_order_line f ON f.product_key = w.product_key
        JOIN dim_date dd ON dd.date_key = f.date_key
        WHERE o.category IS DISTINCT FROM w.category
        ON CONFLICT DO NOTHING
    ), checked AS (
        INSERT INTO check_change (rel, op, key, old_row)
        SELECT 'customer_analytics.dim_product'::regclass, 'n', jsonb_build_object('product_key', w.product_key), NULL
        FROM written w WHERE detail
        UNION ALL
        SELECT 'customer_analytics.dim_product'::regclass, 'o', NULL, to_jsonb(o)
        FROM written w JOIN was o USING (product_key) WHERE detail
    )
    SELECT count(*) INTO n FROM written;
    -- the fact joins that follow are planned on these statistics: renewed
    -- when the table grew by a tenth or more (a few rows more do not change
    -- a plan, and ANALYZE reads up to 30,000 rows whatever the change)
    -- (not on Citus: its ANALYZE of a reference table runs over
    -- connections of its own, which it refuses once this transaction has
    -- written the coordinator's copy; and the shell's statistics do not
    -- plan the queries over the shards)
    IF n > 0 AND n * 10 >= (SELECT GREATEST(c.reltuples, 0) FROM pg_class c
                            WHERE c.oid = 'customer_analytics.dim_product'::regclass)
       AND NOT citus_managed('customer_analytics.dim_product') THEN
        ANALYZE dim_product;
    END IF;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_dim_customer()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    n bigint;
    detail boolean;
BEGIN
    CREATE TEMP TABLE ca_new_versions ON COMMIT DROP AS
    WITH cur AS (
        SELECT d.customer_id, d.name, d.email, d.city, d.state, d.country, d.signup_date,
               d.valid_from AS version_ts, false AS is_new
        FROM dim_customer d
        WHERE d.is_current AND d.customer_id IN (SELECT customer_id FROM ca_batch_customers)
    ), chain AS (
        SELECT * FROM cur
        UNION ALL
        SELECT b.customer_id, b.name, b.email, b.city, b.state, b.country, b.signup_date,
               b.version_ts, true
        FROM ca_batch_customers b
        LEFT JOIN cur c ON c.customer_id = b.customer_id
        WHERE c.customer_id IS NULL OR b.version_ts > c.version_ts
    ), diffed AS (
        SELECT ch.*,
               ROW(ch.name, ch.email, ch.city, ch.state, ch.country, ch.signup_date)
                   IS DISTINCT FROM
               lag(ROW(ch.name, ch.email, ch.city, ch.state, ch.country, ch.signup_date))
                   OVER (PARTITION BY ch.customer_id ORDER BY ch.version_ts) AS changed
        FROM chain ch
    )
    SELECT df.customer_id, df.name, df.email, df.city, df.state, df.country,
           df.signup_date, df.version_ts
    FROM diffed df
    WHERE df.is_new AND df.changed;

    detail := check_queue('customer_analytics.dim_customer', (SELECT count(*) FROM ca_new_versions));

    -- a new version moves the customer's current key and which lines are
    -- theirs: their RFM inputs are recomputed.  (The closing versions and
    -- the old rows are materialised in CTEs, the UPDATE returns plain
    -- columns: so Citus can run it on dim_customer, a reference table
    -- there, which it may not join to a temporary table, nor return a
    -- function of.)
    WITH f AS MATERIALIZED (
        SELECT nv.customer_id, min(nv.version_ts) AS first_ts
        FROM ca_new_versions nv GROUP BY nv.customer_id
    ), was AS MATERIALIZED (
        SELECT d.* FROM dim_customer d
        WHERE d.is_current AND d.customer_id IN (SELECT f.customer_id FROM f)
    ), closed AS (
        UPDATE dim_customer d
        SET valid_to = f.first_ts, is_current = false
        FROM f
        WHERE d.customer_id = f.customer_id AND d.is_current
        RETURNING d.customer_key, d.customer_id
    ), dirty AS (
        INSERT INTO rfm_dirty_customer
        SELECT DISTINCT c.customer_id FROM closed c
        ON CONFLICT DO NOTHING
    )
    INSERT INTO check_change (rel, op, key, old_row)
    SELECT 'customer_analytics.dim_customer'::regclass, x.op, x.key, x.old_row
    FROM closed c JOIN was w USING (customer_key)
    CROSS JOIN LATERAL (VALUES ('n'::"char", jsonb_build_object('customer_key', c.customer_key), NULL::jsonb),
                               ('o', NULL, to_jsonb(w))) x (op, key, old_row)
    WHERE detail;

    WITH added AS (
        INSERT INTO dim_customer (customer_id, name, email, city, state, country, signup_date,
                                  valid_from, valid_to, is_current)
        SELECT nv.customer_id, nv.name, nv.email, nv.city, nv.state, nv.country, nv.signup_date,
               nv.version_ts,
               COALESCE(lead(nv.version_ts) OVER w, 'infinity'),
               lead(nv.version_ts) OVER w IS NULL
        FROM ca_new_versions nv
        WINDOW w AS (PARTITION BY nv.customer_id ORDER BY nv.version_ts)
        RETURNING customer_key, customer_id
    ), dirty AS (
        INSERT INTO rfm_dirty_customer
        SELECT DISTINCT a.customer_id FROM added a
        ON CONFLICT DO NOTHING
    ), checked AS (
        INSERT INTO check_change (rel, op, key)
        SELECT 'customer_analytics.dim_customer'::regclass, 'n', jsonb_build_object('customer_key', a.customer_key)
        FROM added a WHERE detail
    )
    SELECT count(*) INTO n FROM added;
    DROP TABLE ca_new_versions;
    -- (as for products: only when the table grew by a tenth or more, and
    -- not on Citus)
    IF n > 0 AND n * 10 >= (SELECT GREATEST(c.reltuples, 0) FROM pg_class c
                            WHERE c.oid = 'customer_analytics.dim_customer'::regclass)
       AND NOT citus_managed('customer_analytics.dim_customer') THEN
        ANALYZE dim_customer;
    END IF;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_fact_order_line()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    tz text := business_timezone();
    batch bigint;
    added bigint;
    changed bigint := 0;
    detail boolean;
    fast boolean;
    line_queue boolean := true;
BEGIN
    CREATE TEMP TABLE ca_customer_lookup ON COMMIT DROP AS
    SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT o.customer_id FROM ca_batch_orders o
                                          WHERE o.customer_id IS NOT NULL));
    ANALYZE ca_customer_lookup;

    CREATE TEMP TABLE ca_order_lines ON COMMIT DROP AS
    SELECT s.order_id, s.line_number,
           COALESCE(c.customer_key, -1) AS customer_key,
           COALESCE(p.product_key, -1) AS product_key,
           date_key((s.order_ts AT TIME ZONE tz)::date) AS date_key,
           s.order_ts, s.quantity, s.unit_price, s.discount, s.status, s.channel,
           s.updated_at, s.stage_id, s.load_id, s.customer_id, s.product_id,
           (s.customer_id IS NOT NULL AND c.customer_key IS NULL)
           OR (s.product_id IS NOT NULL AND p.product_key IS NULL) AS unresolved
    FROM ca_batch_orders s
    LEFT JOIN ca_customer_lookup c
           ON c.customer_id = s.customer_id AND s.order_ts >= c.valid_from AND s.order_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id;
    DROP TABLE ca_customer_lookup;
    SELECT count(*) INTO batch FROM ca_order_lines;
    detail := check_queue('customer_analytics.fact_order_line', batch);

    -- (session_replication_role is set here, not in a function with SET
    -- clauses of its own, which would undo it on return; this function's
    -- own SET clauses undo it on return or error)
    fast := fact_bulk_write_ok('customer_analytics.fact_order_line');
    IF fast THEN
        PERFORM set_config('session_replication_role', 'replica', true);
    END IF;
    -- new lines are usually new orders: queued to be added to their
    -- customers' RFM inputs without a recompute.  With no rollup yet the
    -- next refresh builds it from the facts whatever is queued: one mark
    -- that everyone is due (NULL) instead of a row per line
    IF NOT EXISTS (SELECT FROM customer_analytics.rfm_rollup_customer) THEN
        INSERT INTO rfm_dirty_customer VALUES (NULL) ON CONFLICT DO NOTHING;
        line_queue := false;
    END IF;
    -- Into an empty table (a first load) the lines go in without ON
    -- CONFLICT: nothing can conflict (the batch has one row per line, and
    -- transform() runs alone), and the arbiter's check before every insert
    -- costs a plain load 30% to 80% more
    EXECUTE format($sql$
    WITH written AS (
        INSERT INTO fact_order_line AS f
            (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity,
             unit_price, discount, status, channel, updated_at, stage_id, load_id)
        SELECT r.order_id, r.line_number, r.customer_key, r.product_key, r.date_key,
               r.order_ts, r.quantity, r.unit_price, r.discount, r.status, r.channel,
               r.updated_at, r.stage_id, r.load_id
        FROM ca_order_lines r
        %s
        RETURNING f.order_id, f.line_number, f.customer_key, f.date_key, f.order_ts, f.quantity,
                  f.revenue, f.status
    ), rfm AS (
        INSERT INTO rfm_new_line (customer_id, order_id, line_number, order_ts, revenue, purchase)
        SELECT c.customer_id, w.order_id, w.line_number, w.order_ts, w.revenue,
               w.status = 'completed' AND w.customer_key <> -1 AND (w.quantity > 0 OR w.revenue <> 0)
        FROM written w JOIN dim_customer c USING (customer_key)
        WHERE $1
    ), days AS (
        INSERT INTO sales_dirty_day
        SELECT DISTINCT d.date FROM (SELECT DISTINCT w.date_key FROM written w) k JOIN dim_date d USING (date_key)
        ON CONFLICT DO NOTHING
    ), checked AS (
        INSERT INTO check_change (rel, op, key)
        SELECT 'customer_analytics.fact_order_line'::regclass, 'n',
               jsonb_build_object('order_id', w.order_id, 'line_number', w.line_number)
        FROM written w WHERE $2
    )
    SELECT count(*) FROM written
    $sql$, CASE WHEN EXISTS (SELECT 1 FROM fact_order_line) THEN 'ON CONFLICT (order_id, line_number) DO NOTHING' END)
    INTO added USING line_queue, detail;
    IF fast THEN
        PERFORM set_config('session_replication_role', 'origin', true);
        PERFORM check_order_line_keys();
    END IF;

    -- lines already in the facts: a later staged version that differs wins.
    -- (The batch and the old rows are materialised in CTEs, and the UPDATE
    -- returns its rows as they are: so Citus can run it on the distributed
    -- facts, which it may not join to a temporary table, nor return a
    -- function of.)
    IF added < batch THEN
        CREATE TEMP TABLE ca_line_changes (new jsonb, old jsonb) ON COMMIT DROP;
        WITH r AS MATERIALIZED (
            SELECT * FROM ca_order_lines
        ), was AS MATERIALIZED (
            SELECT f.* FROM fact_order_line f
            WHERE (f.order_id, f.line_number) IN (SELECT r.order_id, r.line_number FROM r)
        ), upd AS (
            UPDATE fact_order_line f
            SET customer_key = r.customer_key, product_key = r.product_key,
                date_key = r.date_key, order_ts = r.order_ts,
                quantity = r.quantity, unit_price = r.unit_price,
                discount = r.discount, status = r.status,
                channel = r.channel, updated_at = r.updated_at,
                stage_id = r.stage_id, load_id = r.load_id
            FROM r
            WHERE f.order_id = r.order_id AND f.line_number = r.line_number
              AND r.stage_id > f.stage_id
              AND (f.customer_key, f.product_key, f.order_ts, f.quantity, f.unit_price,
                   f.discount, f.status, f.channel, f.updated_at)
                  IS DISTINCT FROM
                  (r.customer_key, r.product_key, r.order_ts, r.quantity,
                   r.unit_price, r.discount, r.status, r.channel, r.updated_at)
            RETURNING f.*
        )
        INSERT INTO ca_line_changes
        SELECT to_jsonb(u), to_jsonb(w) FROM upd u JOIN was w USING (order_id, line_number);
        changed := note_order_line_updates(detail);
    END IF;

    -- the lines of this batch a later dimension row may repair (a batch
    -- line that did resolve leaves the queue)
    IF NOT citus_managed('customer_analytics_internal.unknown_member_line') THEN
        MERGE INTO unknown_member_line q
        USING ca_order_lines b
        ON q.order_id = b.order_id AND q.line_number = b.line_number
        WHEN MATCHED AND NOT b.unresolved THEN DELETE
        WHEN MATCHED THEN UPDATE SET customer_id = b.customer_id, product_id = b.product_id
        WHEN NOT MATCHED AND b.unresolved THEN
            INSERT (order_id, line_number, customer_id, product_id)
            VALUES (b.order_id, b.line_number, b.customer_id, b.product_id);
    ELSE
        -- the same in two statements: Citus does not MERGE a temporary
        -- table into a distributed one
        WITH resolved AS MATERIALIZED (
            SELECT b.order_id, b.line_number FROM ca_order_lines b WHERE NOT b.unresolved
        )
        DELETE FROM unknown_member_line q
        USING resolved b
        WHERE q.order_id = b.order_id AND q.line_number = b.line_number;
        INSERT INTO unknown_member_line AS q (order_id, line_number, customer_id, product_id)
        SELECT b.order_id, b.line_number, b.customer_id, b.product_id
        FROM ca_order_lines b
        WHERE b.unresolved
        ON CONFLICT (order_id, line_number) DO UPDATE
            SET customer_id = excluded.customer_id, product_id = excluded.product_id;
    END IF;
    DROP TABLE ca_order_lines;
    RETURN added + changed;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.repair_order_line_keys()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    n bigint;
BEGIN
    -- (the queued lines and their customers' versions materialised apart:
    -- Citus would otherwise send customer_versions(), which reads a table,
    -- to the shards of the facts)
    CREATE TEMP TABLE ca_repairs ON COMMIT DROP AS
    WITH q AS MATERIALIZED (
        SELECT q.order_id, q.line_number, q.customer_id, q.product_id, f.order_id IS NULL AS gone,
               f.order_ts
        FROM unknown_member_line q
        LEFT JOIN fact_order_line f ON f.order_id = q.order_id AND f.line_number = q.line_number
    ), v AS MATERIALIZED (
        SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT q.customer_id FROM q
                                              WHERE q.customer_id IS NOT NULL))
    )
    SELECT q.order_id, q.line_number, q.customer_id, q.product_id, q.gone,
           COALESCE(v.customer_key, -1) AS customer_key,
           COALESCE(p.product_key, -1) AS product_key
    FROM q
    LEFT JOIN v ON v.customer_id = q.customer_id AND q.order_ts >= v.valid_from AND q.order_ts < v.valid_to
    LEFT JOIN dim_product p ON p.product_id = q.product_id;

    -- (materialised in CTEs, as the update in load_fact_order_line(), for
    -- Citus)
    CREATE TEMP TABLE ca_line_changes (new jsonb, old jsonb) ON COMMIT DROP;
    WITH r AS MATERIALIZED (
        SELECT r.order_id, r.line_number, r.customer_key, r.product_key
        FROM ca_repairs r WHERE NOT r.gone
    ), was AS MATERIALIZED (
        SELECT f.* FROM fact_order_line f
        WHERE (f.order_id, f.line_number) IN (SELECT r.order_id, r.line_number FROM r)
    ), upd AS (
        UPDATE fact_order_line f
        SET customer_key = r.customer_key, product_key = r.product_key
        FROM r
        WHERE f.order_id = r.order_id AND f.line_number = r.line_number
          AND (f.customer_key, f.product_key) IS DISTINCT FROM (r.customer_key, r.product_key)
        RETURNING f.*
    )
    INSERT INTO ca_line_changes
    SELECT to_jsonb(u), to_jsonb(w) FROM upd u JOIN was w USING (order_id, line_number);
    SELECT count(*) INTO n FROM ca_line_changes;
    n := note_order_line_updates(check_queue('customer_analytics.fact_order_line', n));

    -- resolved (or no longer in the facts): out of the queue
    WITH done AS MATERIALIZED (
        SELECT r.order_id, r.line_number FROM ca_repairs r
        WHERE r.gone OR ((r.customer_key <> -1 OR r.customer_id IS NULL)
                         AND (r.product_key <> -1 OR r.product_id IS NULL))
    )
    DELETE FROM unknown_member_line q
    USING done r
    WHERE q.order_id = r.order_id AND q.line_number = r.line_number;
    DROP TABLE ca_repairs;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.transform(full_refresh boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    saved       transform_state;
    w           record;
    sysid       bigint;
    tz          text := business_timezone();
    products    bigint;
    customers   bigint;
    unknown_before boolean;
    modify_mode text;
BEGIN
    -- one transform at a time; the second waits, then sees the first's work
    PERFORM pg_advisory_xact_lock(lock_key('transform()'));
    modify_mode := cluster_writes_begin();

    SELECT system_identifier INTO sysid FROM pg_control_system();
    SELECT * INTO saved FROM transform_state;
    SELECT * INTO w FROM staged_window(saved.snapshot, saved.system_identifier, sysid, full_refresh);
    PERFORM stage_order_batch(w.snap, w.prev, w.lo, w.hi, pg_current_xact_id_if_assigned());

    products := load_dim_product();
    customers := load_dim_customer();
    RETURN QUERY VALUES ('dim_product', products), ('dim_customer', customers);
    RETURN QUERY SELECT 'dim_date', ensure_dim_date(min(d), max(d))
                 FROM (SELECT (order_ts AT TIME ZONE tz)::date AS d FROM ca_batch_orders) days;

    /*
     * Lines already pointing at an unknown member before this run are the
     * only ones the repair of late-arriving dimensions can change (the lines
     * this run writes are looked up in the dimensions as they now are), and
     * only if this run added dimension rows.
     */
    unknown_before := products + customers > 0 AND EXISTS (SELECT 1 FROM unknown_member_line);
    RETURN QUERY SELECT 'fact_order_line', load_fact_order_line();
    RETURN QUERY SELECT 'late_dimension_fixes',
                        CASE WHEN unknown_before THEN repair_order_line_keys() ELSE 0 END;

    INSERT INTO transform_state (singleton, snapshot, system_identifier, last_run_at)
    VALUES (true, w.snap, sysid, now())
    ON CONFLICT (singleton) DO UPDATE
        SET snapshot = excluded.snapshot,
            system_identifier = excluded.system_identifier,
            last_run_at = excluded.last_run_at;

    DROP TABLE ca_batch_products, ca_batch_customers, ca_batch_orders;

    /* clickstream events: their own snapshot, so refresh_clickstream() can run them alone */
    RETURN QUERY SELECT * FROM transform_events(full_refresh);
    PERFORM cluster_writes_end(modify_mode);
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_fact_event()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    tz text := business_timezone();
    batch bigint;
    added bigint;
    changed bigint := 0;
    detail boolean;
BEGIN
    CREATE TEMP TABLE ca_event_customers ON COMMIT DROP AS
    SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT e.customer_id FROM ca_batch_events e
                                          WHERE e.customer_id IS NOT NULL));
    ANALYZE ca_event_customers;

    CREATE TEMP TABLE ca_event_rows ON COMMIT DROP AS
    SELECT s.event_id, s.event_ts, date_key((s.event_ts AT TIME ZONE tz)::date) AS date_key,
           CASE WHEN s.customer_id IS NULL THEN NULL
                ELSE COALESCE(c.customer_key, -1) END AS customer_key,
           s.customer_id, s.session_id, s.event_type,
           CASE WHEN s.product_id IS NULL THEN NULL ELSE COALESCE(p.product_key, -1) END AS product_key,
           s.order_id, s.channel, s.device, s.stage_id, s.load_id
    FROM ca_batch_events s
    LEFT JOIN ca_event_customers c
           ON c.customer_id = s.customer_id AND s.event_ts >= c.valid_from AND s.event_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id;
    DROP TABLE ca_event_customers;
    SELECT count(*) INTO batch FROM ca_event_rows;
    detail := check_queue('customer_analytics.fact_event', batch);

    -- into an empty table (a first load) without ON CONFLICT, as the
    -- order lines (load_fact_order_line)
    EXECUTE format($sql$
    WITH written AS (
        INSERT INTO fact_event AS f
            (event_id, event_ts, date_key, customer_key, customer_id, customer_stitched, session_id,
             event_type, product_key, order_id, channel, device, stage_id, load_id)
        SELECT r.event_id, r.event_ts, r.date_key, r.customer_key, r.customer_id, false, r.session_id,
               r.event_type, r.product_key, r.order_id, r.channel, r.device, r.stage_id, r.load_id
        FROM ca_event_rows r
        %s
        RETURNING f.event_id, f.event_ts, f.customer_id, f.session_id
    ), queued AS (
        INSERT INTO clickstream_change (visitor, since)
        SELECT visitor(w.customer_id, w.session_id), min(w.event_ts) FROM written w GROUP BY 1
    ), checked AS (
        INSERT INTO check_change (rel, op, key)
        SELECT 'customer_analytics.fact_event'::regclass, 'n', jsonb_build_object('event_id', w.event_id)
        FROM written w WHERE $1
    )
    SELECT count(*) FROM written
    $sql$, CASE WHEN EXISTS (SELECT 1 FROM fact_event) THEN 'ON CONFLICT (event_id) DO NOTHING' END)
    INTO added USING detail;

    -- events already in the facts: a later staged version that differs wins
    IF added < batch THEN
        CREATE TEMP TABLE ca_event_changes (new jsonb, old jsonb) ON COMMIT DROP;
        -- (in CTEs, for Citus, as the order lines' update)
        WITH r AS MATERIALIZED (
            SELECT * FROM ca_event_rows
        ), was AS MATERIALIZED (
            SELECT f.* FROM fact_event f WHERE f.event_id IN (SELECT r.event_id FROM r)
        ), upd AS (
            UPDATE fact_event f
            SET event_ts = r.event_ts, date_key = r.date_key,
                customer_key = r.customer_key, customer_id = r.customer_id,
                customer_stitched = false, session_id = r.session_id,
                event_type = r.event_type, product_key = r.product_key,
                order_id = r.order_id, channel = r.channel,
                device = r.device, stage_id = r.stage_id, load_id = r.load_id
            FROM r
            WHERE f.event_id = r.event_id
              AND r.stage_id > f.stage_id
              AND (f.event_ts, f.customer_key, f.customer_id, f.customer_stitched, f.session_id,
                   f.event_type, f.product_key, f.order_id, f.channel, f.device)
                  IS DISTINCT FROM
                  (r.event_ts, r.customer_key, r.customer_id, false,
                   r.session_id, r.event_type, r.product_key,
                   r.order_id, r.channel, r.device)
            RETURNING f.*
        )
        INSERT INTO ca_event_changes
        SELECT to_jsonb(u), to_jsonb(w) FROM upd u JOIN was w USING (event_id);
        changed := note_event_updates(detail);
    END IF;
    DROP TABLE ca_event_rows;
    RETURN added + changed;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.stitch_sessions()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    n bigint;
BEGIN
    -- only sessions where something can change: an anonymous event and an
    -- identified one, or events stitched before
    CREATE TEMP TABLE ca_stitch_sessions ON COMMIT DROP AS
    SELECT f.session_id
    FROM fact_event f
    WHERE f.session_id IN (SELECT b.session_id FROM ca_batch_events b)
    GROUP BY f.session_id
    HAVING (bool_or(f.customer_id IS NULL) AND bool_or(f.customer_id IS NOT NULL))
           OR bool_or(f.customer_stitched);
    ANALYZE ca_stitch_sessions;
    CREATE TEMP TABLE ca_event_changes (new jsonb, old jsonb) ON COMMIT DROP;
    -- (the new customer of each event materialised, the UPDATE returning
    -- plain rows: for Citus, as the order lines' update)
    WITH sess AS MATERIALIZED (
        SELECT f.event_id, f.customer_key, f.customer_id, f.customer_stitched,
               count(*) FILTER (WHERE f.customer_id IS NOT NULL AND NOT f.customer_stitched)
                   OVER (PARTITION BY f.session_id ORDER BY f.event_ts DESC, f.event_id DESC
                         ROWS UNBOUNDED PRECEDING) AS grp,
               f.session_id
        FROM fact_event f
        WHERE f.session_id IN (SELECT c.session_id FROM ca_stitch_sessions c)
    ), linked AS MATERIALIZED (
        SELECT s.event_id, s.customer_key, s.customer_id, s.customer_stitched,
               max(s.customer_key) FILTER (WHERE s.customer_id IS NOT NULL AND NOT s.customer_stitched)
                   OVER g AS new_key,
               max(s.customer_id) FILTER (WHERE s.customer_id IS NOT NULL AND NOT s.customer_stitched)
                   OVER g AS new_id
        FROM sess s
        WINDOW g AS (PARTITION BY s.session_id, s.grp)
    ), upd AS (
        UPDATE fact_event f
        SET customer_key = l.new_key, customer_id = l.new_id, customer_stitched = l.new_id IS NOT NULL
        FROM linked l
        WHERE f.event_id = l.event_id
          AND (l.customer_id IS NULL OR l.customer_stitched)
          AND (l.customer_key, l.customer_id, l.customer_stitched)
              IS DISTINCT FROM (l.new_key, l.new_id, l.new_id IS NOT NULL)
        RETURNING f.*
    )
    -- only the customer columns change: the old row is the new one with theirs
    INSERT INTO ca_event_changes
    SELECT to_jsonb(u),
           to_jsonb(u) || jsonb_build_object('customer_key', l.customer_key, 'customer_id', l.customer_id,
                                             'customer_stitched', l.customer_stitched)
    FROM upd u JOIN linked l USING (event_id);
    SELECT count(*) INTO n FROM ca_event_changes;
    n := note_event_updates(check_queue('customer_analytics.fact_event', n));
    DROP TABLE ca_stitch_sessions;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.repair_event_customer_keys()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    n bigint;
BEGIN
    CREATE TEMP TABLE ca_event_changes (new jsonb, old jsonb) ON COMMIT DROP;
    -- (the versions materialised, the UPDATE returning plain rows: for Citus)
    WITH v AS MATERIALIZED (
        SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT e.customer_id FROM fact_event e
                                              WHERE e.customer_key = -1))
    ), upd AS (
        UPDATE fact_event f
        SET customer_key = v.customer_key
        FROM v
        WHERE f.customer_key = -1 AND v.customer_id = f.customer_id
          AND f.event_ts >= v.valid_from AND f.event_ts < v.valid_to
        RETURNING f.*
    )
    INSERT INTO ca_event_changes
    SELECT to_jsonb(u), to_jsonb(u) || '{"customer_key": -1}' FROM upd u;
    SELECT count(*) INTO n FROM ca_event_changes;
    n := note_event_updates(check_queue('customer_analytics.fact_event', n));
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics.transform_events(full_refresh boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    saved       event_transform_state;
    w           record;
    own_xid     xid8 := pg_current_xact_id_if_assigned();
    sysid       bigint;
    tz          text := business_timezone();
    cutoff      timestamptz;
    mark        timestamptz;
    modify_mode text;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key('transform_events()'));
    modify_mode := cluster_writes_begin();

    SELECT system_identifier INTO sysid FROM pg_control_system();
    SELECT * INTO saved FROM event_transform_state;
    SELECT * INTO w FROM staged_window(saved.snapshot, saved.system_identifier, sysid, full_refresh);
    IF w.prev IS NOT NULL THEN
        cutoff := saved.watermark - event_lateness();   -- NULL: no limit, or nothing processed yet
    END IF;
    PERFORM stage_event_batch(w.snap, w.prev, w.lo, w.hi, own_xid);

    RETURN QUERY SELECT 'fact_event_too_late',
                        CASE WHEN cutoff IS NULL THEN 0 ELSE hold_back_late_events(cutoff, saved.own_xid) END;
    ANALYZE ca_batch_events;
    PERFORM ensure_dim_date(min((event_ts AT TIME ZONE tz)::date), max((event_ts AT TIME ZONE tz)::date))
    FROM ca_batch_events;

    RETURN QUERY SELECT 'fact_event', load_fact_event();
    RETURN QUERY SELECT 'fact_event_stitched', stitch_sessions();
    RETURN QUERY SELECT 'fact_event_late_customers', repair_event_customer_keys();

    IF w.prev IS NULL THEN      -- a full pass: everything staged counts
        SELECT max(b.event_ts) INTO mark FROM ca_batch_events b;
    ELSE
        SELECT GREATEST(saved.watermark, max(b.event_ts)) INTO mark FROM ca_batch_events b;
    END IF;
    IF mark > now() THEN
        mark := now();
    END IF;
    INSERT INTO event_transform_state (singleton, snapshot, own_xid, system_identifier, watermark, last_run_at)
    VALUES (true, w.snap, own_xid, sysid, mark, now())
    ON CONFLICT (singleton) DO UPDATE
        SET snapshot = excluded.snapshot,
            own_xid = excluded.own_xid,
            system_identifier = excluded.system_identifier,
            watermark = excluded.watermark,
            last_run_at = excluded.last_run_at;

    DROP TABLE ca_batch_events;
    PERFORM cluster_writes_end(modify_mode);
END
$$;

CREATE OR REPLACE FUNCTION customer_analytics_internal.check_queue(rel regclass, batch bigint)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    first_load boolean;
BEGIN
    IF EXISTS (SELECT FROM customer_analytics_internal.check_change c
               WHERE c.rel = check_queue.rel AND c.op = 'T') THEN
        RETURN false;
    END IF;
    -- a batch of a million rows, or a table's first load (the whole table
    -- is the batch: reading it costs less than queuing every row)
    EXECUTE format('SELECT NOT EXISTS (SELECT 1 FROM %s)', rel) INTO first_load;
    IF batch > 1000000 OR first_load THEN
        DELETE FROM customer_analytics_internal.check_change c WHERE c.rel = check_queue.rel;
        INSERT INTO customer_analytics_internal.check_change (rel, op) VALUES (check_queue.rel, 'T');
        RETURN false;
    END IF;
    RETURN true;
END
$$;

CREATE FUNCTION customer_analytics_internal.changed_session_events_on_cluster()
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
BEGIN
    CREATE TEMP TABLE ca_session_events ON COMMIT DROP AS
    WITH c AS MATERIALIZED (
        SELECT c.visitor, c.since, substr(c.visitor, 3) AS id, c.visitor LIKE 'c:%' AS is_customer
        FROM ca_changed c
        WHERE c.visitor LIKE 'c:%' OR c.visitor LIKE 's:%'
    ), k AS MATERIALIZED (
        SELECT c.visitor, c.since, d.customer_key
        FROM c JOIN dim_customer d ON d.customer_id = c.id AND d.customer_key <> -1
        WHERE c.is_customer
    )
    SELECT k.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
           f.event_type, f.channel, f.device
    FROM k JOIN fact_event f ON f.customer_key = k.customer_key AND f.event_ts >= k.since
    UNION ALL
    SELECT c.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
           f.event_type, f.channel, f.device
    FROM c JOIN fact_event f ON f.customer_key = -1 AND f.customer_id = c.id AND f.event_ts >= c.since
    WHERE c.is_customer
    UNION ALL
    SELECT c.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
           f.event_type, f.channel, f.device
    FROM c JOIN fact_event f ON f.session_id = c.id AND f.event_ts >= c.since AND f.customer_id IS NULL
    WHERE NOT c.is_customer;
END
$$;

COMMENT ON FUNCTION customer_analytics_internal.changed_session_events_on_cluster() IS
    'Internal to refresh_sessions() on Citus: the events of the visitors queued as changed (ca_changed) into ca_session_events, by a join Citus sends to the shards instead of one lookup per visitor';

CREATE OR REPLACE FUNCTION customer_analytics.refresh_sessions(full_rebuild boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    gap     interval := session_gap();
    tz      text := business_timezone();
    st      clickstream_state;
    n       bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('transform_events()'));
    SELECT * INTO st FROM clickstream_state;
    IF st IS NULL OR st.session_gap <> gap OR st.timezone <> tz THEN
        full_rebuild := true;
    END IF;

    IF full_rebuild THEN
        TRUNCATE clickstream_change;
        DELETE FROM sessions;
        GET DIAGNOSTICS n = ROW_COUNT;
        CREATE TEMP TABLE ca_session_events ON COMMIT DROP AS
        SELECT visitor(f.customer_id, f.session_id) AS visitor, f.event_id, f.event_ts,
               f.customer_id, f.customer_key, f.event_type, f.channel, f.device
        FROM fact_event f;
    ELSE
        CREATE TEMP TABLE ca_changed ON COMMIT DROP AS
        WITH taken AS (DELETE FROM clickstream_change RETURNING visitor, since)
        SELECT visitor, min(since) AS since FROM taken GROUP BY visitor;
        ANALYZE ca_changed;

        WITH gone AS (
            DELETE FROM sessions s
            WHERE (s.visitor, s.session_start) IN
                  (SELECT x.visitor, x.session_start
                   FROM ca_changed c
                   CROSS JOIN LATERAL (SELECT o.visitor, o.session_start FROM sessions o
                                       WHERE o.visitor = c.visitor AND o.session_end >= c.since - gap
                                       OFFSET 0) x)
            RETURNING s.visitor, s.session_start
        ), firsts AS (
            SELECT visitor, min(session_start) AS first_start, count(*) AS removed
            FROM gone GROUP BY visitor
        ), moved AS (
            UPDATE ca_changed c SET since = LEAST(c.since, f.first_start)
            FROM firsts f WHERE f.visitor = c.visitor
        )
        SELECT COALESCE(sum(removed), 0) INTO n FROM firsts;

        IF citus_managed('customer_analytics.fact_event') THEN
            PERFORM changed_session_events_on_cluster();
        ELSE
        /*
         * Each changed visitor's events since its time, looked up through
         * the indexes one visitor at a time (OFFSET 0 keeps each lookup a
         * parameterised scan): a join the planner may hash would read the
         * whole dimension and the visitors' whole histories, a cost that
         * grows with the shop instead of with what changed.
         */
        CREATE TEMP TABLE ca_session_events ON COMMIT DROP AS
        SELECT c.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
               f.event_type, f.channel, f.device
        FROM ca_changed c
        CROSS JOIN LATERAL (SELECT d.customer_key FROM dim_customer d
                            WHERE d.customer_id = substr(c.visitor, 3) AND d.customer_key <> -1
                            OFFSET 0) d
        CROSS JOIN LATERAL (SELECT * FROM fact_event f
                            WHERE f.customer_key = d.customer_key AND f.event_ts >= c.since
                            OFFSET 0) f
        WHERE c.visitor LIKE 'c:%'
        UNION ALL
        SELECT c.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
               f.event_type, f.channel, f.device
        FROM ca_changed c
        CROSS JOIN LATERAL (SELECT * FROM fact_event f
                            WHERE f.customer_key = -1 AND f.customer_id = substr(c.visitor, 3)
                              AND f.event_ts >= c.since
                            OFFSET 0) f
        WHERE c.visitor LIKE 'c:%'
        UNION ALL
        SELECT c.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
               f.event_type, f.channel, f.device
        FROM ca_changed c
        CROSS JOIN LATERAL (SELECT * FROM fact_event f
                            WHERE f.session_id = substr(c.visitor, 3) AND f.event_ts >= c.since
                              AND f.customer_id IS NULL
                            OFFSET 0) f
        WHERE c.visitor LIKE 's:%';
        END IF;
        DROP TABLE ca_changed;
    END IF;
    RETURN QUERY VALUES ('sessions_removed', n);
    ANALYZE ca_session_events;

    INSERT INTO sessions (visitor, session_start, session_end, date_key, customer_id, customer_key,
                          events, pages, product_views, add_to_carts, checkouts, purchases,
                          channel, device)
    SELECT e.visitor, min(e.event_ts), max(e.event_ts),
           date_key((min(e.event_ts) AT TIME ZONE tz)::date),
           (array_agg(e.customer_id ORDER BY e.event_ts DESC, e.event_id DESC)
                FILTER (WHERE e.customer_id IS NOT NULL))[1],
           (array_agg(e.customer_key ORDER BY e.event_ts DESC, e.event_id DESC)
                FILTER (WHERE e.customer_key IS NOT NULL))[1],
           count(*),
           count(*) FILTER (WHERE e.event_type IN ('page_view', 'product_view')),
           count(*) FILTER (WHERE e.event_type = 'product_view'),
           count(*) FILTER (WHERE e.event_type = 'add_to_cart'),
           count(*) FILTER (WHERE e.event_type = 'checkout'),
           count(*) FILTER (WHERE e.event_type = 'purchase'),
           (array_agg(e.channel ORDER BY e.event_ts, e.event_id))[1],
           (array_agg(e.device ORDER BY e.event_ts, e.event_id))[1]
    FROM (SELECT x.*,
                 session_number(x.event_ts, gap) OVER (PARTITION BY x.visitor ORDER BY x.event_ts, x.event_id) AS sn
          FROM ca_session_events x) e
    GROUP BY e.visitor, e.sn;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN QUERY VALUES ('sessions_written', n);
    DROP TABLE ca_session_events;

    INSERT INTO clickstream_state (singleton, session_gap, timezone, last_run_at)
    VALUES (true, gap, tz, now())
    ON CONFLICT (singleton) DO UPDATE
        SET session_gap = excluded.session_gap, timezone = excluded.timezone,
            last_run_at = excluded.last_run_at;
END
$$;

-- issue 18: a first event load stitched before it is written; transform() and
-- transform_events() without JIT; a large first load builds the secondary indexes
-- after its rows; the batch tables analyzed on the columns their joins use
CREATE FUNCTION customer_analytics_internal.defer_fact_indexes(fact regclass, batch bigint)
RETURNS text[]
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    defs text[];
    empty boolean;
    idx record;
BEGIN
    IF batch < 10000 OR customer_analytics_internal.citus_managed(fact)
       OR NOT pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = fact), 'USAGE') THEN
        RETURN NULL;
    END IF;
    EXECUTE format('SELECT NOT EXISTS (SELECT 1 FROM %s)', fact) INTO empty;
    IF NOT empty THEN
        RETURN NULL;
    END IF;
    FOR idx IN
        SELECT i.indexrelid::regclass AS name, pg_get_indexdef(i.indexrelid) AS def
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        WHERE i.indrelid = fact AND NOT i.indisunique AND i.indisvalid
          AND c.reltablespace = 0
          AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
          AND NOT EXISTS (SELECT 1 FROM pg_description d WHERE d.objoid = i.indexrelid)
        ORDER BY i.indexrelid
    LOOP
        EXECUTE format('DROP INDEX %s', idx.name);
        defs := defs || idx.def;
    END LOOP;
    RETURN defs;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.defer_fact_indexes(regclass, bigint) IS
    'Internal to transform(): before a first load of 10,000 rows or more into an empty fact table it owns (not on Citus), drops the table''s secondary indexes and returns their definitions for restore_fact_indexes(); NULL when it drops none';

CREATE FUNCTION customer_analytics_internal.restore_fact_indexes(defs text[])
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    def text;
BEGIN
    FOREACH def IN ARRAY COALESCE(defs, '{}') LOOP
        EXECUTE def;
    END LOOP;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.restore_fact_indexes(text[]) IS
    'Internal to transform(): builds again the indexes defer_fact_indexes() dropped, from their definitions';

CREATE FUNCTION customer_analytics_internal.load_first_events(OUT written bigint, OUT stitched bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    tz text := business_timezone();
    batch bigint := (SELECT count(*) FROM ca_batch_events);
    deferred text[];
BEGIN
    CREATE TEMP TABLE ca_event_stitch ON COMMIT DROP AS
    WITH mixed AS (
        SELECT b.session_id
        FROM ca_batch_events b
        GROUP BY b.session_id
        HAVING bool_or(b.customer_id IS NULL) AND bool_or(b.customer_id IS NOT NULL)
    ), sess AS (
        SELECT b.event_id, b.event_ts, b.customer_id, b.session_id,
               count(b.customer_id) OVER (PARTITION BY b.session_id ORDER BY b.event_ts DESC, b.event_id DESC
                                          ROWS UNBOUNDED PRECEDING) AS grp
        FROM ca_batch_events b
        WHERE b.session_id IN (SELECT m.session_id FROM mixed m)
    ), linked AS (
        SELECT s.event_id, s.customer_id,
               max(s.customer_id) OVER g AS new_id,
               max(s.event_ts) FILTER (WHERE s.customer_id IS NOT NULL) OVER g AS opener_ts
        FROM sess s
        WINDOW g AS (PARTITION BY s.session_id, s.grp)
    )
    SELECT l.event_id, l.new_id AS customer_id, l.opener_ts
    FROM linked l
    WHERE l.customer_id IS NULL AND l.new_id IS NOT NULL;
    SELECT count(*) INTO stitched FROM ca_event_stitch;
    ANALYZE ca_event_stitch (event_id);

    -- the table's first load is checked whole: nothing is queued row by row
    PERFORM check_queue('customer_analytics.fact_event', batch);
    deferred := defer_fact_indexes('customer_analytics.fact_event', batch);

    WITH written AS (
        INSERT INTO fact_event AS f
            (event_id, event_ts, date_key, customer_key, customer_id, customer_stitched, session_id,
             event_type, product_key, order_id, channel, device, stage_id, load_id)
        SELECT s.event_id, s.event_ts, date_key((s.event_ts AT TIME ZONE tz)::date),
               CASE WHEN k.customer_id IS NULL THEN NULL ELSE COALESCE(c.customer_key, -1) END,
               k.customer_id, st.event_id IS NOT NULL, s.session_id, s.event_type,
               CASE WHEN s.product_id IS NULL THEN NULL ELSE COALESCE(p.product_key, -1) END,
               s.order_id, s.channel, s.device, s.stage_id, s.load_id
        FROM ca_batch_events s
        LEFT JOIN ca_event_stitch st ON st.event_id = s.event_id
        CROSS JOIN LATERAL (SELECT COALESCE(s.customer_id, st.customer_id) AS customer_id,
                                   COALESCE(st.opener_ts, s.event_ts) AS version_ts) k
        LEFT JOIN ca_event_customers c
               ON c.customer_id = k.customer_id AND k.version_ts >= c.valid_from AND k.version_ts < c.valid_to
        LEFT JOIN dim_product p ON p.product_id = s.product_id
        RETURNING f.event_ts, f.customer_id, f.session_id
    ), queued AS (
        INSERT INTO clickstream_change (visitor, since)
        SELECT visitor(w.customer_id, w.session_id), min(w.event_ts) FROM written w GROUP BY 1
    )
    SELECT count(*) INTO written FROM written;
    PERFORM restore_fact_indexes(deferred);
    DROP TABLE ca_event_stitch;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.load_first_events() IS
    'Internal to transform_events(): the batch''s events into an empty fact_event, anonymous events stitched as stitch_sessions() would stitch them; returns the events written and the events stitched';

CREATE OR REPLACE FUNCTION customer_analytics_internal.stage_order_batch(snap pg_snapshot, prev pg_snapshot,
                                                              lo xid8, hi xid8, own_xid xid8)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
BEGIN
    /* the staged rows of this run, latest version per natural key */
    CREATE TEMP TABLE ca_batch_products ON COMMIT DROP AS
    SELECT DISTINCT ON (s.product_id)
           s.product_id, s.name, COALESCE(NULLIF(s.category, ''), 'Unknown') AS category,
           s.subcategory, s.unit_cost, s.list_price, s.updated_at, s.stage_id
    FROM stg_products s
    WHERE newly_staged(s.staged_xid, lo, hi, snap, prev, own_xid)
    ORDER BY s.product_id, s.stage_id DESC;

    CREATE TEMP TABLE ca_batch_customers ON COMMIT DROP AS
    SELECT DISTINCT ON (s.customer_id, COALESCE(s.updated_at, s.loaded_at))
           s.customer_id, s.name, s.email, s.city, s.state, s.country, s.signup_date,
           COALESCE(s.updated_at, s.loaded_at) AS version_ts
    FROM stg_customers s
    WHERE newly_staged(s.staged_xid, lo, hi, snap, prev, own_xid)
    ORDER BY s.customer_id, COALESCE(s.updated_at, s.loaded_at), s.stage_id DESC;

    CREATE TEMP TABLE ca_batch_orders ON COMMIT DROP AS
    SELECT DISTINCT ON (s.order_id, s.line_number) s.*
    FROM stg_orders s
    WHERE newly_staged(s.staged_xid, lo, hi, snap, prev, own_xid)
    ORDER BY s.order_id, s.line_number, s.stage_id DESC;

    -- statistics of the columns the batch is joined and filtered on: the
    -- row counts and these are what the plans need, and the others' cost
    -- (text columns above all) was most of a small batch's staging time
    ANALYZE ca_batch_products (product_id), ca_batch_customers (customer_id, version_ts),
            ca_batch_orders (order_id, line_number, customer_id, product_id, order_ts);
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.stage_order_batch(pg_snapshot, pg_snapshot, xid8, xid8, xid8) IS
    'Internal to transform(): the staged products, customers and order lines of this run (latest version per natural key) in temporary tables';

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_dim_product()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    n bigint;
    detail boolean := check_queue('customer_analytics.dim_product', (SELECT count(*) FROM ca_batch_products));
BEGIN
    WITH was AS MATERIALIZED (
        SELECT d.* FROM dim_product d WHERE d.product_id IN (SELECT b.product_id FROM ca_batch_products b)
    ), written AS (
        INSERT INTO dim_product AS d (product_id, name, category, subcategory, unit_cost, list_price,
                                      updated_at, stage_id)
        SELECT product_id, name, category, subcategory, unit_cost, list_price, updated_at, stage_id
        FROM ca_batch_products
        ON CONFLICT (product_id) DO UPDATE
            SET name = excluded.name, category = excluded.category, subcategory = excluded.subcategory,
                unit_cost = excluded.unit_cost, list_price = excluded.list_price,
                updated_at = excluded.updated_at, stage_id = excluded.stage_id
            WHERE excluded.stage_id > d.stage_id
              AND (d.name, d.category, d.subcategory, d.unit_cost, d.list_price)
                  IS DISTINCT FROM
                  (excluded.name, excluded.category, excluded.subcategory, excluded.unit_cost, excluded.list_price)
        RETURNING d.product_key, d.category
    ), moved AS (           -- a product moved to another category: every day it sold on
        INSERT INTO sales_dirty_day
        SELECT DISTINCT dd.date
        FROM written w JOIN was o USING (product_key)
        JOIN fact_order_line f ON f.product_key = w.product_key
        JOIN dim_date dd ON dd.date_key = f.date_key
        WHERE o.category IS DISTINCT FROM w.category
        ON CONFLICT DO NOTHING
    ), checked AS (
        INSERT INTO check_change (rel, op, key, old_row)
        SELECT 'customer_analytics.dim_product'::regclass, 'n', jsonb_build_object('product_key', w.product_key), NULL
        FROM written w WHERE detail
        UNION ALL
        SELECT 'customer_analytics.dim_product'::regclass, 'o', NULL, to_jsonb(o)
        FROM written w JOIN was o USING (product_key) WHERE detail
    )
    SELECT count(*) INTO n FROM written;
    -- the fact joins that follow are planned on these statistics: renewed
    -- when the table grew by a tenth or more (a few rows more do not change
    -- a plan, and ANALYZE reads up to 30,000 rows whatever the change)
    -- (not on Citus: its ANALYZE of a reference table runs over
    -- connections of its own, which it refuses once this transaction has
    -- written the coordinator's copy; and the shell's statistics do not
    -- plan the queries over the shards).  Only the columns those joins
    -- use: autovacuum analyzes the rest after the commit
    IF n > 0 AND n * 10 >= (SELECT GREATEST(c.reltuples, 0) FROM pg_class c
                            WHERE c.oid = 'customer_analytics.dim_product'::regclass)
       AND NOT citus_managed('customer_analytics.dim_product') THEN
        ANALYZE dim_product (product_key, product_id, category);
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.load_dim_product() IS
    'Internal to transform(): the batch''s products into dim_product (type 1); returns the rows written';

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_dim_customer()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    n bigint;
    detail boolean;
BEGIN
    CREATE TEMP TABLE ca_new_versions ON COMMIT DROP AS
    WITH cur AS (
        SELECT d.customer_id, d.name, d.email, d.city, d.state, d.country, d.signup_date,
               d.valid_from AS version_ts, false AS is_new
        FROM dim_customer d
        WHERE d.is_current AND d.customer_id IN (SELECT customer_id FROM ca_batch_customers)
    ), chain AS (
        SELECT * FROM cur
        UNION ALL
        SELECT b.customer_id, b.name, b.email, b.city, b.state, b.country, b.signup_date,
               b.version_ts, true
        FROM ca_batch_customers b
        LEFT JOIN cur c ON c.customer_id = b.customer_id
        WHERE c.customer_id IS NULL OR b.version_ts > c.version_ts
    ), diffed AS (
        SELECT ch.*,
               ROW(ch.name, ch.email, ch.city, ch.state, ch.country, ch.signup_date)
                   IS DISTINCT FROM
               lag(ROW(ch.name, ch.email, ch.city, ch.state, ch.country, ch.signup_date))
                   OVER (PARTITION BY ch.customer_id ORDER BY ch.version_ts) AS changed
        FROM chain ch
    )
    SELECT df.customer_id, df.name, df.email, df.city, df.state, df.country,
           df.signup_date, df.version_ts
    FROM diffed df
    WHERE df.is_new AND df.changed;

    detail := check_queue('customer_analytics.dim_customer', (SELECT count(*) FROM ca_new_versions));

    -- a new version moves the customer's current key and which lines are
    -- theirs: their RFM inputs are recomputed.  (The closing versions and
    -- the old rows are materialised in CTEs, the UPDATE returns plain
    -- columns: so Citus can run it on dim_customer, a reference table
    -- there, which it may not join to a temporary table, nor return a
    -- function of.)
    WITH f AS MATERIALIZED (
        SELECT nv.customer_id, min(nv.version_ts) AS first_ts
        FROM ca_new_versions nv GROUP BY nv.customer_id
    ), was AS MATERIALIZED (
        SELECT d.* FROM dim_customer d
        WHERE d.is_current AND d.customer_id IN (SELECT f.customer_id FROM f)
    ), closed AS (
        UPDATE dim_customer d
        SET valid_to = f.first_ts, is_current = false
        FROM f
        WHERE d.customer_id = f.customer_id AND d.is_current
        RETURNING d.customer_key, d.customer_id
    ), dirty AS (
        INSERT INTO rfm_dirty_customer
        SELECT DISTINCT c.customer_id FROM closed c
        ON CONFLICT DO NOTHING
    )
    INSERT INTO check_change (rel, op, key, old_row)
    SELECT 'customer_analytics.dim_customer'::regclass, x.op, x.key, x.old_row
    FROM closed c JOIN was w USING (customer_key)
    CROSS JOIN LATERAL (VALUES ('n'::"char", jsonb_build_object('customer_key', c.customer_key), NULL::jsonb),
                               ('o', NULL, to_jsonb(w))) x (op, key, old_row)
    WHERE detail;

    WITH added AS (
        INSERT INTO dim_customer (customer_id, name, email, city, state, country, signup_date,
                                  valid_from, valid_to, is_current)
        SELECT nv.customer_id, nv.name, nv.email, nv.city, nv.state, nv.country, nv.signup_date,
               nv.version_ts,
               COALESCE(lead(nv.version_ts) OVER w, 'infinity'),
               lead(nv.version_ts) OVER w IS NULL
        FROM ca_new_versions nv
        WINDOW w AS (PARTITION BY nv.customer_id ORDER BY nv.version_ts)
        RETURNING customer_key, customer_id
    ), dirty AS (
        INSERT INTO rfm_dirty_customer
        SELECT DISTINCT a.customer_id FROM added a
        ON CONFLICT DO NOTHING
    ), checked AS (
        INSERT INTO check_change (rel, op, key)
        SELECT 'customer_analytics.dim_customer'::regclass, 'n', jsonb_build_object('customer_key', a.customer_key)
        FROM added a WHERE detail
    )
    SELECT count(*) INTO n FROM added;
    DROP TABLE ca_new_versions;
    -- (as for products: only when the table grew by a tenth or more, and
    -- not on Citus)
    IF n > 0 AND n * 10 >= (SELECT GREATEST(c.reltuples, 0) FROM pg_class c
                            WHERE c.oid = 'customer_analytics.dim_customer'::regclass)
       AND NOT citus_managed('customer_analytics.dim_customer') THEN
        ANALYZE dim_customer (customer_key, customer_id, valid_from, valid_to, is_current);
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.load_dim_customer() IS
    'Internal to transform(): the batch''s customer versions into dim_customer (type 2: a changed version closes the current one); returns the versions inserted';

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_fact_order_line()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    tz text := business_timezone();
    batch bigint;
    added bigint;
    changed bigint := 0;
    detail boolean;
    fast boolean;
    line_queue boolean := true;
    deferred text[];
BEGIN
    CREATE TEMP TABLE ca_customer_lookup ON COMMIT DROP AS
    SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT o.customer_id FROM ca_batch_orders o
                                          WHERE o.customer_id IS NOT NULL));
    ANALYZE ca_customer_lookup (customer_id, valid_from, valid_to);

    CREATE TEMP TABLE ca_order_lines ON COMMIT DROP AS
    SELECT s.order_id, s.line_number,
           COALESCE(c.customer_key, -1) AS customer_key,
           COALESCE(p.product_key, -1) AS product_key,
           date_key((s.order_ts AT TIME ZONE tz)::date) AS date_key,
           s.order_ts, s.quantity, s.unit_price, s.discount, s.status, s.channel,
           s.updated_at, s.stage_id, s.load_id, s.customer_id, s.product_id,
           (s.customer_id IS NOT NULL AND c.customer_key IS NULL)
           OR (s.product_id IS NOT NULL AND p.product_key IS NULL) AS unresolved
    FROM ca_batch_orders s
    LEFT JOIN ca_customer_lookup c
           ON c.customer_id = s.customer_id AND s.order_ts >= c.valid_from AND s.order_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id;
    DROP TABLE ca_customer_lookup;
    SELECT count(*) INTO batch FROM ca_order_lines;
    detail := check_queue('customer_analytics.fact_order_line', batch);
    deferred := defer_fact_indexes('customer_analytics.fact_order_line', batch);

    -- (session_replication_role is set here, not in a function with SET
    -- clauses of its own, which would undo it on return; this function's
    -- own SET clauses undo it on return or error)
    fast := fact_bulk_write_ok('customer_analytics.fact_order_line');
    IF fast THEN
        PERFORM set_config('session_replication_role', 'replica', true);
    END IF;
    -- new lines are usually new orders: queued to be added to their
    -- customers' RFM inputs without a recompute.  With no rollup yet the
    -- next refresh builds it from the facts whatever is queued: one mark
    -- that everyone is due (NULL) instead of a row per line
    IF NOT EXISTS (SELECT FROM customer_analytics.rfm_rollup_customer) THEN
        INSERT INTO rfm_dirty_customer VALUES (NULL) ON CONFLICT DO NOTHING;
        line_queue := false;
    END IF;
    -- Into an empty table (a first load) the lines go in without ON
    -- CONFLICT: nothing can conflict (the batch has one row per line, and
    -- transform() runs alone), and the arbiter's check before every insert
    -- costs a plain load 30% to 80% more
    EXECUTE format($sql$
    WITH written AS (
        INSERT INTO fact_order_line AS f
            (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity,
             unit_price, discount, status, channel, updated_at, stage_id, load_id)
        SELECT r.order_id, r.line_number, r.customer_key, r.product_key, r.date_key,
               r.order_ts, r.quantity, r.unit_price, r.discount, r.status, r.channel,
               r.updated_at, r.stage_id, r.load_id
        FROM ca_order_lines r
        %s
        RETURNING f.order_id, f.line_number, f.customer_key, f.date_key, f.order_ts, f.quantity,
                  f.revenue, f.status
    ), rfm AS (
        INSERT INTO rfm_new_line (customer_id, order_id, line_number, order_ts, revenue, purchase)
        SELECT c.customer_id, w.order_id, w.line_number, w.order_ts, w.revenue,
               w.status = 'completed' AND w.customer_key <> -1 AND (w.quantity > 0 OR w.revenue <> 0)
        FROM written w JOIN dim_customer c USING (customer_key)
        WHERE $1
    ), days AS (
        INSERT INTO sales_dirty_day
        SELECT DISTINCT d.date FROM (SELECT DISTINCT w.date_key FROM written w) k JOIN dim_date d USING (date_key)
        ON CONFLICT DO NOTHING
    ), checked AS (
        INSERT INTO check_change (rel, op, key)
        SELECT 'customer_analytics.fact_order_line'::regclass, 'n',
               jsonb_build_object('order_id', w.order_id, 'line_number', w.line_number)
        FROM written w WHERE $2
    )
    SELECT count(*) FROM written
    $sql$, CASE WHEN EXISTS (SELECT 1 FROM fact_order_line) THEN 'ON CONFLICT (order_id, line_number) DO NOTHING' END)
    INTO added USING line_queue, detail;
    IF fast THEN
        PERFORM set_config('session_replication_role', 'origin', true);
        PERFORM check_order_line_keys();
    END IF;
    PERFORM restore_fact_indexes(deferred);

    -- lines already in the facts: a later staged version that differs wins.
    -- (The batch and the old rows are materialised in CTEs, and the UPDATE
    -- returns its rows as they are: so Citus can run it on the distributed
    -- facts, which it may not join to a temporary table, nor return a
    -- function of.)
    IF added < batch THEN
        CREATE TEMP TABLE ca_line_changes (new jsonb, old jsonb) ON COMMIT DROP;
        WITH r AS MATERIALIZED (
            SELECT * FROM ca_order_lines
        ), was AS MATERIALIZED (
            SELECT f.* FROM fact_order_line f
            WHERE (f.order_id, f.line_number) IN (SELECT r.order_id, r.line_number FROM r)
        ), upd AS (
            UPDATE fact_order_line f
            SET customer_key = r.customer_key, product_key = r.product_key,
                date_key = r.date_key, order_ts = r.order_ts,
                quantity = r.quantity, unit_price = r.unit_price,
                discount = r.discount, status = r.status,
                channel = r.channel, updated_at = r.updated_at,
                stage_id = r.stage_id, load_id = r.load_id
            FROM r
            WHERE f.order_id = r.order_id AND f.line_number = r.line_number
              AND r.stage_id > f.stage_id
              AND (f.customer_key, f.product_key, f.order_ts, f.quantity, f.unit_price,
                   f.discount, f.status, f.channel, f.updated_at)
                  IS DISTINCT FROM
                  (r.customer_key, r.product_key, r.order_ts, r.quantity,
                   r.unit_price, r.discount, r.status, r.channel, r.updated_at)
            RETURNING f.*
        )
        INSERT INTO ca_line_changes
        SELECT to_jsonb(u), to_jsonb(w) FROM upd u JOIN was w USING (order_id, line_number);
        changed := note_order_line_updates(detail);
    END IF;

    -- the lines of this batch a later dimension row may repair (a batch
    -- line that did resolve leaves the queue)
    IF NOT citus_managed('customer_analytics_internal.unknown_member_line') THEN
        MERGE INTO unknown_member_line q
        USING ca_order_lines b
        ON q.order_id = b.order_id AND q.line_number = b.line_number
        WHEN MATCHED AND NOT b.unresolved THEN DELETE
        WHEN MATCHED THEN UPDATE SET customer_id = b.customer_id, product_id = b.product_id
        WHEN NOT MATCHED AND b.unresolved THEN
            INSERT (order_id, line_number, customer_id, product_id)
            VALUES (b.order_id, b.line_number, b.customer_id, b.product_id);
    ELSE
        -- the same in two statements: Citus does not MERGE a temporary
        -- table into a distributed one
        WITH resolved AS MATERIALIZED (
            SELECT b.order_id, b.line_number FROM ca_order_lines b WHERE NOT b.unresolved
        )
        DELETE FROM unknown_member_line q
        USING resolved b
        WHERE q.order_id = b.order_id AND q.line_number = b.line_number;
        INSERT INTO unknown_member_line AS q (order_id, line_number, customer_id, product_id)
        SELECT b.order_id, b.line_number, b.customer_id, b.product_id
        FROM ca_order_lines b
        WHERE b.unresolved
        ON CONFLICT (order_id, line_number) DO UPDATE
            SET customer_id = excluded.customer_id, product_id = excluded.product_id;
    END IF;
    DROP TABLE ca_order_lines;
    RETURN added + changed;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.load_fact_order_line() IS
    'Internal to transform(): the batch''s order lines into fact_order_line (upsert on order and line, the latest staged version wins, unknown members for missing keys); returns the rows written';

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_fact_event()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    tz text := business_timezone();
    batch bigint;
    added bigint;
    changed bigint := 0;
    detail boolean;
BEGIN
    CREATE TEMP TABLE ca_event_rows ON COMMIT DROP AS
    SELECT s.event_id, s.event_ts, date_key((s.event_ts AT TIME ZONE tz)::date) AS date_key,
           CASE WHEN s.customer_id IS NULL THEN NULL
                ELSE COALESCE(c.customer_key, -1) END AS customer_key,
           s.customer_id, s.session_id, s.event_type,
           CASE WHEN s.product_id IS NULL THEN NULL ELSE COALESCE(p.product_key, -1) END AS product_key,
           s.order_id, s.channel, s.device, s.stage_id, s.load_id
    FROM ca_batch_events s
    LEFT JOIN ca_event_customers c
           ON c.customer_id = s.customer_id AND s.event_ts >= c.valid_from AND s.event_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id;
    SELECT count(*) INTO batch FROM ca_event_rows;
    detail := check_queue('customer_analytics.fact_event', batch);

    -- into an empty table (a first load) without ON CONFLICT, as the
    -- order lines (load_fact_order_line)
    EXECUTE format($sql$
    WITH written AS (
        INSERT INTO fact_event AS f
            (event_id, event_ts, date_key, customer_key, customer_id, customer_stitched, session_id,
             event_type, product_key, order_id, channel, device, stage_id, load_id)
        SELECT r.event_id, r.event_ts, r.date_key, r.customer_key, r.customer_id, false, r.session_id,
               r.event_type, r.product_key, r.order_id, r.channel, r.device, r.stage_id, r.load_id
        FROM ca_event_rows r
        %s
        RETURNING f.event_id, f.event_ts, f.customer_id, f.session_id
    ), queued AS (
        INSERT INTO clickstream_change (visitor, since)
        SELECT visitor(w.customer_id, w.session_id), min(w.event_ts) FROM written w GROUP BY 1
    ), checked AS (
        INSERT INTO check_change (rel, op, key)
        SELECT 'customer_analytics.fact_event'::regclass, 'n', jsonb_build_object('event_id', w.event_id)
        FROM written w WHERE $1
    )
    SELECT count(*) FROM written
    $sql$, CASE WHEN EXISTS (SELECT 1 FROM fact_event) THEN 'ON CONFLICT (event_id) DO NOTHING' END)
    INTO added USING detail;

    -- events already in the facts: a later staged version that differs wins
    IF added < batch THEN
        CREATE TEMP TABLE ca_event_changes (new jsonb, old jsonb) ON COMMIT DROP;
        -- (in CTEs, for Citus, as the order lines' update)
        WITH r AS MATERIALIZED (
            SELECT * FROM ca_event_rows
        ), was AS MATERIALIZED (
            SELECT f.* FROM fact_event f WHERE f.event_id IN (SELECT r.event_id FROM r)
        ), upd AS (
            UPDATE fact_event f
            SET event_ts = r.event_ts, date_key = r.date_key,
                customer_key = r.customer_key, customer_id = r.customer_id,
                customer_stitched = false, session_id = r.session_id,
                event_type = r.event_type, product_key = r.product_key,
                order_id = r.order_id, channel = r.channel,
                device = r.device, stage_id = r.stage_id, load_id = r.load_id
            FROM r
            WHERE f.event_id = r.event_id
              AND r.stage_id > f.stage_id
              AND (f.event_ts, f.customer_key, f.customer_id, f.customer_stitched, f.session_id,
                   f.event_type, f.product_key, f.order_id, f.channel, f.device)
                  IS DISTINCT FROM
                  (r.event_ts, r.customer_key, r.customer_id, false,
                   r.session_id, r.event_type, r.product_key,
                   r.order_id, r.channel, r.device)
            RETURNING f.*
        )
        INSERT INTO ca_event_changes
        SELECT to_jsonb(u), to_jsonb(w) FROM upd u JOIN was w USING (event_id);
        changed := note_event_updates(detail);
    END IF;
    DROP TABLE ca_event_rows;
    RETURN added + changed;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.load_fact_event() IS
    'Internal to transform_events(): the batch''s events into fact_event (upsert on event_id, the latest staged version wins; anonymous stays NULL, an unknown customer is -1); returns the rows written';

CREATE OR REPLACE FUNCTION customer_analytics.transform(full_refresh boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
-- the batch statements are bound by writes (heap, index entries, WAL), which
-- JIT does not speed up; compiling one cost up to 0.4 s on a 55k-line batch
SET jit = off
AS $$
DECLARE
    saved       transform_state;
    w           record;
    sysid       bigint;
    tz          text := business_timezone();
    products    bigint;
    customers   bigint;
    unknown_before boolean;
    modify_mode text;
BEGIN
    -- one transform at a time; the second waits, then sees the first's work
    PERFORM pg_advisory_xact_lock(lock_key('transform()'));
    modify_mode := cluster_writes_begin();

    SELECT system_identifier INTO sysid FROM pg_control_system();
    SELECT * INTO saved FROM transform_state;
    SELECT * INTO w FROM staged_window(saved.snapshot, saved.system_identifier, sysid, full_refresh);
    PERFORM stage_order_batch(w.snap, w.prev, w.lo, w.hi, pg_current_xact_id_if_assigned());

    products := load_dim_product();
    customers := load_dim_customer();
    RETURN QUERY VALUES ('dim_product', products), ('dim_customer', customers);
    RETURN QUERY SELECT 'dim_date', ensure_dim_date(min(d), max(d))
                 FROM (SELECT (order_ts AT TIME ZONE tz)::date AS d FROM ca_batch_orders) days;

    /*
     * Lines already pointing at an unknown member before this run are the
     * only ones the repair of late-arriving dimensions can change (the lines
     * this run writes are looked up in the dimensions as they now are), and
     * only if this run added dimension rows.
     */
    unknown_before := products + customers > 0 AND EXISTS (SELECT 1 FROM unknown_member_line);
    RETURN QUERY SELECT 'fact_order_line', load_fact_order_line();
    RETURN QUERY SELECT 'late_dimension_fixes',
                        CASE WHEN unknown_before THEN repair_order_line_keys() ELSE 0 END;

    INSERT INTO transform_state (singleton, snapshot, system_identifier, last_run_at)
    VALUES (true, w.snap, sysid, now())
    ON CONFLICT (singleton) DO UPDATE
        SET snapshot = excluded.snapshot,
            system_identifier = excluded.system_identifier,
            last_run_at = excluded.last_run_at;

    DROP TABLE ca_batch_products, ca_batch_customers, ca_batch_orders;

    /* clickstream events: their own snapshot, so refresh_clickstream() can run them alone */
    RETURN QUERY SELECT * FROM transform_events(full_refresh);
    PERFORM cluster_writes_end(modify_mode);
END
$$;
COMMENT ON FUNCTION customer_analytics.transform(boolean) IS
    'Move staged rows into the star schema: products (SCD1), customers (SCD2), calendar, order lines and events (upsert on natural keys, newer versions win, unknown members for missing keys, late-arriving dimensions repaired). Incremental: only rows staged since the last run; full_refresh => true reprocesses all staged rows (safe: idempotent). Events go through transform_events(). Returns the rows written per step';

CREATE OR REPLACE FUNCTION customer_analytics.transform_events(full_refresh boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
-- the batch statements are bound by writes (heap, index entries, WAL), which
-- JIT does not speed up; compiling one cost up to 0.4 s on a 55k-line batch
SET jit = off
AS $$
DECLARE
    saved       event_transform_state;
    w           record;
    own_xid     xid8 := pg_current_xact_id_if_assigned();
    sysid       bigint;
    tz          text := business_timezone();
    cutoff      timestamptz;
    mark        timestamptz;
    modify_mode text;
    first       record;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key('transform_events()'));
    modify_mode := cluster_writes_begin();

    SELECT system_identifier INTO sysid FROM pg_control_system();
    SELECT * INTO saved FROM event_transform_state;
    SELECT * INTO w FROM staged_window(saved.snapshot, saved.system_identifier, sysid, full_refresh);
    IF w.prev IS NOT NULL THEN
        cutoff := saved.watermark - event_lateness();   -- NULL: no limit, or nothing processed yet
    END IF;
    PERFORM stage_event_batch(w.snap, w.prev, w.lo, w.hi, own_xid);

    RETURN QUERY SELECT 'fact_event_too_late',
                        CASE WHEN cutoff IS NULL THEN 0 ELSE hold_back_late_events(cutoff, saved.own_xid) END;
    ANALYZE ca_batch_events (event_id, session_id, customer_id, product_id, event_ts);
    PERFORM ensure_dim_date(min((event_ts AT TIME ZONE tz)::date), max((event_ts AT TIME ZONE tz)::date))
    FROM ca_batch_events;
    -- the versions of the batch's customers, which either loader keys its
    -- events to
    CREATE TEMP TABLE ca_event_customers ON COMMIT DROP AS
    SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT e.customer_id FROM ca_batch_events e
                                          WHERE e.customer_id IS NOT NULL));
    ANALYZE ca_event_customers (customer_id, valid_from, valid_to);

    -- (on Citus the general path, whose statements are written to run there)
    IF NOT EXISTS (SELECT 1 FROM fact_event) AND NOT citus_managed('customer_analytics.fact_event') THEN
        SELECT * INTO first FROM load_first_events();
        RETURN QUERY SELECT 'fact_event', first.written;
        RETURN QUERY SELECT 'fact_event_stitched', first.stitched;
    ELSE
        RETURN QUERY SELECT 'fact_event', load_fact_event();
        RETURN QUERY SELECT 'fact_event_stitched', stitch_sessions();
    END IF;
    RETURN QUERY SELECT 'fact_event_late_customers', repair_event_customer_keys();

    IF w.prev IS NULL THEN      -- a full pass: everything staged counts
        SELECT max(b.event_ts) INTO mark FROM ca_batch_events b;
    ELSE
        SELECT GREATEST(saved.watermark, max(b.event_ts)) INTO mark FROM ca_batch_events b;
    END IF;
    IF mark > now() THEN
        mark := now();
    END IF;
    INSERT INTO event_transform_state (singleton, snapshot, own_xid, system_identifier, watermark, last_run_at)
    VALUES (true, w.snap, own_xid, sysid, mark, now())
    ON CONFLICT (singleton) DO UPDATE
        SET snapshot = excluded.snapshot,
            own_xid = excluded.own_xid,
            system_identifier = excluded.system_identifier,
            watermark = excluded.watermark,
            last_run_at = excluded.last_run_at;

    DROP TABLE ca_batch_events, ca_event_customers;
    PERFORM cluster_writes_end(modify_mode);
END
$$;
COMMENT ON FUNCTION customer_analytics.transform_events(boolean) IS
    'The clickstream part of transform(), on its own snapshot: newly staged events into fact_event (upsert on event_id, the latest staged version wins), anonymous events stitched to the next identified event of their session, events of late-arriving customers re-pointed. Events older than the watermark minus customer_analytics.event_lateness are left staged, counted and alerted (a full refresh loads them). Returns the rows written per step';


-- issue 17 pipeline steps on the cluster: pipeline_purge() in a session where the module is not loaded yet (its setting then undefined) applies the documented default
CREATE OR REPLACE FUNCTION customer_analytics.pipeline_purge()
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

-- issue 17 layout by customer: fact_order_line and unknown_member_line get customer_ref (the line's customer whatever its version, '#guest:' || order_id for a guest), filled by transform(); on a Citus cluster distribute() distributes both by it, keyed on (order_id, line_number, customer_ref), and transform() moves a line that changes customer (docs/scaling.md)
CREATE FUNCTION customer_analytics_internal.order_customer_ref(customer_id text, order_id text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT COALESCE(customer_id, '#guest:' OPERATOR(pg_catalog.||) order_id) $$;
COMMENT ON FUNCTION customer_analytics_internal.order_customer_ref(text, text) IS
    'Internal: fact_order_line.customer_ref of a staged line: its customer_id, or ''#guest:'' || order_id for a guest checkout';

ALTER TABLE customer_analytics.fact_order_line ADD COLUMN customer_ref text;
-- the lines already loaded: the customer of their version, or, on the
-- unknown member, the customer_id their line was staged with (the repair
-- queue keeps it for a late customer; the staged row the fact came from
-- otherwise), or a guest's.  The change-queue triggers stand aside (as
-- for the extension's own writers): no line changes what any report reads
SELECT pg_catalog.set_config('customer_analytics_internal.own_writer', 'on', true);
UPDATE customer_analytics.fact_order_line f
SET customer_ref = x.customer_ref
FROM (SELECT l.order_id, l.line_number,
             customer_analytics_internal.order_customer_ref(COALESCE(c.customer_id, q.customer_id, s.customer_id),
                                                            l.order_id) AS customer_ref
      FROM customer_analytics.fact_order_line l
      LEFT JOIN customer_analytics.dim_customer c ON c.customer_key = l.customer_key AND c.customer_key <> -1
      LEFT JOIN customer_analytics_internal.unknown_member_line q
             ON q.order_id = l.order_id AND q.line_number = l.line_number
      LEFT JOIN customer_analytics.stg_orders s
             ON l.customer_key = -1 AND s.order_id = l.order_id AND s.line_number = l.line_number
            AND s.stage_id = l.stage_id) x
WHERE f.order_id = x.order_id AND f.line_number = x.line_number;
SELECT pg_catalog.set_config('customer_analytics_internal.own_writer', '', true);
ALTER TABLE customer_analytics.fact_order_line ALTER COLUMN customer_ref SET NOT NULL;
COMMENT ON COLUMN customer_analytics.fact_order_line.customer_ref IS
    'The customer the line belongs to, whatever its version: the staged customer_id (dim_customer.customer_id of every version, also while the line waits on the unknown member for a late customer), or ''#guest:'' || order_id for a guest checkout; never NULL. A Citus cluster distributes the facts by it (docs/scaling.md)';

ALTER TABLE customer_analytics_internal.unknown_member_line ADD COLUMN customer_ref text;
UPDATE customer_analytics_internal.unknown_member_line
SET customer_ref = customer_analytics_internal.order_customer_ref(customer_id, order_id);
ALTER TABLE customer_analytics_internal.unknown_member_line ALTER COLUMN customer_ref SET NOT NULL;

CREATE FUNCTION customer_analytics_internal.move_order_lines()
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
BEGIN
    CREATE TEMP TABLE ca_moved_lines (order_id text, line_number integer, old jsonb) ON COMMIT DROP;
    WITH r AS MATERIALIZED (
        SELECT b.order_id, b.line_number, b.customer_ref, b.stage_id FROM ca_order_lines b WHERE b.moving
    ), gone AS (
        DELETE FROM fact_order_line f
        USING r
        WHERE f.order_id = r.order_id AND f.line_number = r.line_number
          AND f.customer_ref <> r.customer_ref AND r.stage_id > f.stage_id
        RETURNING f.*
    )
    INSERT INTO ca_moved_lines SELECT g.order_id, g.line_number, to_jsonb(g) FROM gone g;
    WITH moved AS (
        INSERT INTO fact_order_line AS f
            (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity,
             unit_price, discount, status, channel, updated_at, stage_id, load_id, customer_ref)
        SELECT r.order_id, r.line_number, r.customer_key, r.product_key, r.date_key,
               r.order_ts, r.quantity, r.unit_price, r.discount, r.status, r.channel,
               r.updated_at, r.stage_id, r.load_id, r.customer_ref
        FROM ca_order_lines r
        WHERE r.moving
          AND EXISTS (SELECT 1 FROM ca_moved_lines m WHERE m.order_id = r.order_id AND m.line_number = r.line_number)
        RETURNING f.*
    )
    INSERT INTO ca_line_changes
    SELECT to_jsonb(n), m.old FROM moved n JOIN ca_moved_lines m USING (order_id, line_number);
    DROP TABLE ca_moved_lines;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.move_order_lines() IS
    'Internal to transform() on a Citus cluster: the batch''s lines staged again under another customer deleted from their old shard and inserted on the new one (the latest staged version wins), recorded in ca_line_changes';

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_fact_order_line()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    tz text := business_timezone();
    batch bigint;
    added bigint;
    changed bigint := 0;
    detail boolean;
    fast boolean;
    line_queue boolean := true;
    deferred text[];
    on_cluster boolean := citus_managed('customer_analytics.fact_order_line');
    conflict text;
BEGIN
    CREATE TEMP TABLE ca_customer_lookup ON COMMIT DROP AS
    SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT o.customer_id FROM ca_batch_orders o
                                          WHERE o.customer_id IS NOT NULL));
    ANALYZE ca_customer_lookup (customer_id, valid_from, valid_to);

    CREATE TEMP TABLE ca_order_lines ON COMMIT DROP AS
    SELECT s.order_id, s.line_number,
           COALESCE(c.customer_key, -1) AS customer_key,
           COALESCE(p.product_key, -1) AS product_key,
           date_key((s.order_ts AT TIME ZONE tz)::date) AS date_key,
           s.order_ts, s.quantity, s.unit_price, s.discount, s.status, s.channel,
           s.updated_at, s.stage_id, s.load_id, s.customer_id, s.product_id,
           order_customer_ref(s.customer_id, s.order_id) AS customer_ref,
           (s.customer_id IS NOT NULL AND c.customer_key IS NULL)
           OR (s.product_id IS NOT NULL AND p.product_key IS NULL) AS unresolved,
           false AS moving
    FROM ca_batch_orders s
    LEFT JOIN ca_customer_lookup c
           ON c.customer_id = s.customer_id AND s.order_ts >= c.valid_from AND s.order_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id;
    DROP TABLE ca_customer_lookup;
    SELECT count(*) INTO batch FROM ca_order_lines;
    detail := check_queue('customer_analytics.fact_order_line', batch);
    deferred := defer_fact_indexes('customer_analytics.fact_order_line', batch);

    /*
     * On a cluster the facts are distributed by customer_ref and keyed on
     * (order_id, line_number, customer_ref) (docs/scaling.md): a line
     * staged again under another customer conflicts with nothing there and
     * would become a second row on another shard.  Those lines are set
     * apart (moving) and moved below, deleted from the old shard and
     * inserted on the new one.
     */
    IF on_cluster AND EXISTS (SELECT 1 FROM fact_order_line) THEN
        WITH r AS MATERIALIZED (
            SELECT b.order_id, b.line_number FROM ca_order_lines b
        ), there AS MATERIALIZED (
            SELECT f.order_id, f.line_number, f.customer_ref FROM fact_order_line f
            WHERE (f.order_id, f.line_number) IN (SELECT r.order_id, r.line_number FROM r)
        )
        UPDATE ca_order_lines b SET moving = true
        FROM there t
        WHERE t.order_id = b.order_id AND t.line_number = b.line_number AND t.customer_ref <> b.customer_ref;
    END IF;

    -- (session_replication_role is set here, not in a function with SET
    -- clauses of its own, which would undo it on return; this function's
    -- own SET clauses undo it on return or error)
    fast := fact_bulk_write_ok('customer_analytics.fact_order_line');
    IF fast THEN
        PERFORM set_config('session_replication_role', 'replica', true);
    END IF;
    -- new lines are usually new orders: queued to be added to their
    -- customers' RFM inputs without a recompute.  With no rollup yet the
    -- next refresh builds it from the facts whatever is queued: one mark
    -- that everyone is due (NULL) instead of a row per line
    IF NOT EXISTS (SELECT FROM customer_analytics.rfm_rollup_customer) THEN
        INSERT INTO rfm_dirty_customer VALUES (NULL) ON CONFLICT DO NOTHING;
        line_queue := false;
    END IF;
    -- Into an empty table (a first load) the lines go in without ON
    -- CONFLICT: nothing can conflict (the batch has one row per line, and
    -- transform() runs alone), and the arbiter's check before every insert
    -- costs a plain load 30% to 80% more
    IF EXISTS (SELECT 1 FROM fact_order_line) THEN
        conflict := CASE WHEN on_cluster THEN 'ON CONFLICT (order_id, line_number, customer_ref) DO NOTHING'
                         ELSE 'ON CONFLICT (order_id, line_number) DO NOTHING' END;
    END IF;
    EXECUTE format($sql$
    WITH written AS (
        INSERT INTO fact_order_line AS f
            (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity,
             unit_price, discount, status, channel, updated_at, stage_id, load_id, customer_ref)
        SELECT r.order_id, r.line_number, r.customer_key, r.product_key, r.date_key,
               r.order_ts, r.quantity, r.unit_price, r.discount, r.status, r.channel,
               r.updated_at, r.stage_id, r.load_id, r.customer_ref
        FROM ca_order_lines r
        WHERE NOT r.moving
        %s
        RETURNING f.order_id, f.line_number, f.customer_key, f.date_key, f.order_ts, f.quantity,
                  f.revenue, f.status
    ), rfm AS (
        INSERT INTO rfm_new_line (customer_id, order_id, line_number, order_ts, revenue, purchase)
        SELECT c.customer_id, w.order_id, w.line_number, w.order_ts, w.revenue,
               w.status = 'completed' AND w.customer_key <> -1 AND (w.quantity > 0 OR w.revenue <> 0)
        FROM written w JOIN dim_customer c USING (customer_key)
        WHERE $1
    ), days AS (
        INSERT INTO sales_dirty_day
        SELECT DISTINCT d.date FROM (SELECT DISTINCT w.date_key FROM written w) k JOIN dim_date d USING (date_key)
        ON CONFLICT DO NOTHING
    ), checked AS (
        INSERT INTO check_change (rel, op, key)
        SELECT 'customer_analytics.fact_order_line'::regclass, 'n',
               jsonb_build_object('order_id', w.order_id, 'line_number', w.line_number)
        FROM written w WHERE $2
    )
    SELECT count(*) FROM written
    $sql$, conflict)
    INTO added USING line_queue, detail;
    IF fast THEN
        PERFORM set_config('session_replication_role', 'origin', true);
        PERFORM check_order_line_keys();
    END IF;
    PERFORM restore_fact_indexes(deferred);

    -- lines already in the facts: a later staged version that differs wins.
    -- (The batch and the old rows are materialised in CTEs, and the UPDATE
    -- returns its rows as they are: so Citus can run it on the distributed
    -- facts, which it may not join to a temporary table, nor return a
    -- function of.  Citus refuses to SET the distribution column even to
    -- its own value: on a cluster customer_ref changes by a move only.)
    IF added < batch THEN
        CREATE TEMP TABLE ca_line_changes (new jsonb, old jsonb) ON COMMIT DROP;
        EXECUTE format($sql$
        WITH r AS MATERIALIZED (
            SELECT * FROM ca_order_lines WHERE NOT moving
        ), was AS MATERIALIZED (
            SELECT f.* FROM fact_order_line f
            WHERE (f.order_id, f.line_number) IN (SELECT r.order_id, r.line_number FROM r)
        ), upd AS (
            UPDATE fact_order_line f
            SET customer_key = r.customer_key, product_key = r.product_key,
                date_key = r.date_key, order_ts = r.order_ts,
                quantity = r.quantity, unit_price = r.unit_price,
                discount = r.discount, status = r.status,
                channel = r.channel, updated_at = r.updated_at,
                stage_id = r.stage_id, load_id = r.load_id %s
            FROM r
            WHERE f.order_id = r.order_id AND f.line_number = r.line_number
              AND r.stage_id > f.stage_id
              AND (f.customer_key, f.product_key, f.order_ts, f.quantity, f.unit_price,
                   f.discount, f.status, f.channel, f.updated_at, f.customer_ref)
                  IS DISTINCT FROM
                  (r.customer_key, r.product_key, r.order_ts, r.quantity,
                   r.unit_price, r.discount, r.status, r.channel, r.updated_at, r.customer_ref)
            RETURNING f.*
        )
        INSERT INTO ca_line_changes
        SELECT to_jsonb(u), to_jsonb(w) FROM upd u JOIN was w USING (order_id, line_number)
        $sql$, CASE WHEN NOT on_cluster THEN ', customer_ref = r.customer_ref' END);
        IF on_cluster THEN
            PERFORM move_order_lines();
        END IF;
        changed := note_order_line_updates(detail);
    END IF;

    -- the lines of this batch a later dimension row may repair (a batch
    -- line that did resolve leaves the queue)
    IF NOT citus_managed('customer_analytics_internal.unknown_member_line') THEN
        MERGE INTO unknown_member_line q
        USING ca_order_lines b
        ON q.order_id = b.order_id AND q.line_number = b.line_number
        WHEN MATCHED AND NOT b.unresolved THEN DELETE
        WHEN MATCHED THEN UPDATE SET customer_id = b.customer_id, product_id = b.product_id,
                                     customer_ref = b.customer_ref
        WHEN NOT MATCHED AND b.unresolved THEN
            INSERT (order_id, line_number, customer_id, product_id, customer_ref)
            VALUES (b.order_id, b.line_number, b.customer_id, b.product_id, b.customer_ref);
    ELSE
        -- the same in two statements: Citus does not MERGE a temporary
        -- table into a distributed one.  A line that moved to another
        -- customer leaves its old shard's queue, as its fact did
        WITH b AS MATERIALIZED (
            SELECT b.order_id, b.line_number, b.customer_ref, b.unresolved FROM ca_order_lines b
        )
        DELETE FROM unknown_member_line q
        USING b
        WHERE q.order_id = b.order_id AND q.line_number = b.line_number
          AND (NOT b.unresolved OR q.customer_ref <> b.customer_ref);
        INSERT INTO unknown_member_line AS q (order_id, line_number, customer_id, product_id, customer_ref)
        SELECT b.order_id, b.line_number, b.customer_id, b.product_id, b.customer_ref
        FROM ca_order_lines b
        WHERE b.unresolved
        ON CONFLICT (order_id, line_number, customer_ref) DO UPDATE
            SET customer_id = excluded.customer_id, product_id = excluded.product_id;
    END IF;
    DROP TABLE ca_order_lines;
    RETURN added + changed;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.load_fact_order_line() IS
    'Internal to transform(): the batch''s order lines into fact_order_line (upsert on order and line, the latest staged version wins, unknown members for missing keys); returns the rows written';

CREATE OR REPLACE FUNCTION customer_analytics_internal.repair_order_line_keys()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    n bigint;
BEGIN
    -- (the queued lines and their customers' versions materialised apart:
    -- Citus would otherwise send customer_versions(), which reads a table,
    -- to the shards of the facts)
    CREATE TEMP TABLE ca_repairs ON COMMIT DROP AS
    -- (joined on customer_ref too: on a cluster both tables are
    -- distributed by it, and Citus joins them shard by shard only so)
    WITH q AS MATERIALIZED (
        SELECT q.order_id, q.line_number, q.customer_ref, q.customer_id, q.product_id,
               f.order_id IS NULL AS gone, f.order_ts
        FROM unknown_member_line q
        LEFT JOIN fact_order_line f
               ON f.customer_ref = q.customer_ref AND f.order_id = q.order_id AND f.line_number = q.line_number
    ), v AS MATERIALIZED (
        SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT q.customer_id FROM q
                                              WHERE q.customer_id IS NOT NULL))
    )
    SELECT q.order_id, q.line_number, q.customer_ref, q.customer_id, q.product_id, q.gone,
           COALESCE(v.customer_key, -1) AS customer_key,
           COALESCE(p.product_key, -1) AS product_key
    FROM q
    LEFT JOIN v ON v.customer_id = q.customer_id AND q.order_ts >= v.valid_from AND q.order_ts < v.valid_to
    LEFT JOIN dim_product p ON p.product_id = q.product_id;

    -- (materialised in CTEs, as the update in load_fact_order_line(), for
    -- Citus)
    CREATE TEMP TABLE ca_line_changes (new jsonb, old jsonb) ON COMMIT DROP;
    WITH r AS MATERIALIZED (
        SELECT r.order_id, r.line_number, r.customer_ref, r.customer_key, r.product_key
        FROM ca_repairs r WHERE NOT r.gone
    ), was AS MATERIALIZED (
        SELECT f.* FROM fact_order_line f
        WHERE (f.order_id, f.line_number, f.customer_ref) IN (SELECT r.order_id, r.line_number, r.customer_ref FROM r)
    ), upd AS (
        UPDATE fact_order_line f
        SET customer_key = r.customer_key, product_key = r.product_key
        FROM r
        WHERE f.customer_ref = r.customer_ref AND f.order_id = r.order_id AND f.line_number = r.line_number
          AND (f.customer_key, f.product_key) IS DISTINCT FROM (r.customer_key, r.product_key)
        RETURNING f.*
    )
    INSERT INTO ca_line_changes
    SELECT to_jsonb(u), to_jsonb(w) FROM upd u JOIN was w USING (order_id, line_number);
    SELECT count(*) INTO n FROM ca_line_changes;
    n := note_order_line_updates(check_queue('customer_analytics.fact_order_line', n));

    -- resolved (or no longer in the facts): out of the queue
    WITH done AS MATERIALIZED (
        SELECT r.order_id, r.line_number, r.customer_ref FROM ca_repairs r
        WHERE r.gone OR ((r.customer_key <> -1 OR r.customer_id IS NULL)
                         AND (r.product_key <> -1 OR r.product_id IS NULL))
    )
    DELETE FROM unknown_member_line q
    USING done r
    WHERE q.customer_ref = r.customer_ref AND q.order_id = r.order_id AND q.line_number = r.line_number;
    DROP TABLE ca_repairs;
    RETURN n;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.repair_order_line_keys() IS
    'Internal to transform(): order lines keyed to an unknown member whose customer or product has arrived since get its key (read from the queue unknown_member_line, not from the staging history); returns the lines re-keyed';

DROP FUNCTION customer_analytics_internal.cluster_layout_plan();
CREATE FUNCTION customer_analytics_internal.cluster_layout_plan()
RETURNS TABLE (ordinal integer, table_name regclass, citus_kind text, distribution_column text,
               cluster_key text[])
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM (VALUES
        (1, 'customer_analytics.dim_date'::regclass, 'reference', NULL::text, NULL::text[]),
        (2, 'customer_analytics.dim_product', 'reference', NULL, NULL),
        (3, 'customer_analytics.dim_customer', 'reference', NULL, NULL),
        (4, 'customer_analytics.stg_products', 'reference', NULL, NULL),
        (5, 'customer_analytics.fact_order_line', 'distributed', 'customer_ref',
         '{order_id,line_number,customer_ref}'),
        (6, 'customer_analytics.stg_orders', 'distributed', 'order_id', NULL),
        (7, 'customer_analytics_internal.unknown_member_line', 'distributed', 'customer_ref',
         '{order_id,line_number,customer_ref}'),
        (8, 'customer_analytics.fact_event', 'distributed', 'event_id', NULL),
        (9, 'customer_analytics.stg_events', 'distributed', 'event_id', NULL),
        (10, 'customer_analytics.stg_customers', 'distributed', 'customer_id', NULL)
    ) AS p (ordinal, table_name, citus_kind, distribution_column, cluster_key)
$$;
COMMENT ON FUNCTION customer_analytics_internal.cluster_layout_plan() IS
    'Internal to distribute(): the tables it converts, in order: reference tables first, then the distributed ones with their distribution column (co-located with the first) and, where the single-node primary key lacks that column, the primary key they get on the cluster (cluster_key)';

CREATE OR REPLACE FUNCTION customer_analytics.distribute(shard_count integer DEFAULT NULL)
RETURNS TABLE (table_name regclass, citus_kind text, distribution_column text, shards integer)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    shards_wanted integer;
    plan record;
    trg record;
    fk record;
    worker record;
    messages text;
    dropped text[] := '{}';
    fks text[] := '{}';
    first_distributed regclass;
    on_coordinator boolean;
    workers bigint;
    -- the statements that take the triggers and foreign keys off and
    -- swap the primary keys for the cluster's, run here and on every worker
    drop_sql text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION 'distribute() needs Citus, and the extension citus is not installed in database %',
                        current_database()
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'distribute() converts the star schema to Citus distributed and reference tables; on a single PostgreSQL server the schema stays as it is and every function works on it.',
                  HINT = 'On a Citus coordinator: CREATE EXTENSION citus, add the workers with citus_add_node(), then call distribute() there.';
    END IF;
    EXECUTE 'SELECT pg_catalog.citus_is_coordinator()' INTO on_coordinator;
    IF NOT on_coordinator THEN
        RAISE EXCEPTION 'distribute() must run on the Citus coordinator, and this node is a worker'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'Only the coordinator holds the metadata that create_distributed_table() changes.',
                  HINT = 'Connect to the coordinator and call customer_analytics.distribute() there.';
    END IF;

    -- a concurrent call waits, then finds the layout done
    LOCK TABLE cluster_layout IN EXCLUSIVE MODE;
    IF EXISTS (SELECT FROM cluster_layout) THEN
        RAISE NOTICE 'the star schema is distributed already (since %)',
                     (SELECT distributed_at FROM cluster_layout)
            USING DETAIL = 'distribute() changed nothing; the rows below are the current layout.';
    ELSE
        EXECUTE 'SELECT count(*) FROM pg_catalog.citus_get_active_worker_nodes()' INTO workers;
        IF workers = 0 THEN
            RAISE EXCEPTION 'distribute() found no active Citus worker node'
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'The shards of the facts would have nowhere to go.',
                      HINT = 'Add the workers with citus_add_node(host, port) (and, for pg_cron and the coordinator''s own queries, citus_set_coordinator_host()), then call distribute() again.';
        END IF;
        IF EXISTS (SELECT FROM cluster_layout_plan() p
                   JOIN pg_dist_partition d ON d.logicalrelid = p.table_name) THEN
            RAISE EXCEPTION 'distribute() found tables of the star schema already converted by hand: %',
                            (SELECT string_agg(qualified_name(p.table_name), ', ' ORDER BY p.ordinal)
                             FROM cluster_layout_plan() p
                             JOIN pg_dist_partition d ON d.logicalrelid = p.table_name)
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'distribute() converts the whole layout at once, from the single-node one, and does not guess what a conversion by hand left.',
                      HINT = 'Undo it with undistribute_table() for each of those tables, then call distribute().';
        END IF;
        shards_wanted := COALESCE(shard_count, current_setting('citus.shard_count')::integer);
        IF shards_wanted < 1 THEN
            RAISE EXCEPTION 'distribute(shard_count => %): the shard count must be at least 1', shard_count
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Leave it out to take citus.shard_count, or give a few shards per worker core.';
        END IF;

        -- the facts' foreign keys, to put back after the conversion
        FOR fk IN
            SELECT qualified_name(c.conrelid::regclass) AS rel, c.conname, pg_get_constraintdef(c.oid) AS def
            FROM pg_constraint c
            WHERE c.contype = 'f'
              AND c.conrelid IN (SELECT p.table_name FROM cluster_layout_plan() p)
            ORDER BY 1, 2
        LOOP
            fks := fks || format('ALTER TABLE %s ADD CONSTRAINT %I %s', fk.rel, fk.conname, fk.def);
        END LOOP;

        drop_sql := '';
        FOR trg IN
            SELECT qualified_name(t.tgrelid::regclass) AS rel, t.tgname, pg_get_triggerdef(t.oid) AS def
            FROM pg_trigger t
            WHERE NOT t.tgisinternal
              AND t.tgrelid IN (SELECT p.table_name FROM cluster_layout_plan() p)
            ORDER BY 1, 2
        LOOP
            dropped := dropped || trg.def;
            drop_sql := drop_sql || format('DROP TRIGGER IF EXISTS %I ON %s;', trg.tgname, trg.rel);
        END LOOP;
        FOR fk IN
            SELECT qualified_name(c.conrelid::regclass) AS rel, c.conname
            FROM pg_constraint c
            WHERE c.contype = 'f'
              AND c.conrelid IN (SELECT p.table_name FROM cluster_layout_plan() p)
            ORDER BY 1, 2
        LOOP
            drop_sql := drop_sql || format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I;', fk.rel, fk.conname);
        END LOOP;
        -- the primary keys swapped for the cluster's (Citus refuses a
        -- unique index without the distribution column), under the same
        -- name; on the workers' copies too, which Citus keeps as the
        -- tables' shells there (dropped and added again: idempotent)
        FOR fk IN
            SELECT qualified_name(p.table_name) AS rel, c.conname,
                   (SELECT string_agg(quote_ident(k), ', ' ORDER BY n) FROM unnest(p.cluster_key) WITH ORDINALITY u (k, n)) AS cols
            FROM cluster_layout_plan() p
            JOIN pg_constraint c ON c.conrelid = p.table_name AND c.contype = 'p'
            WHERE p.cluster_key IS NOT NULL
            ORDER BY p.ordinal
        LOOP
            drop_sql := drop_sql || format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I;', fk.rel, fk.conname)
                                 || format('ALTER TABLE %s ADD CONSTRAINT %I PRIMARY KEY (%s);', fk.rel, fk.conname, fk.cols);
        END LOOP;

        -- the workers first: a failure there leaves this node untouched,
        -- and the statements are idempotent, so a second call finishes
        IF drop_sql <> '' THEN
            FOR worker IN
                SELECT r.nodename, r.nodeport, r.result
                FROM run_command_on_workers(format('DO %L', 'BEGIN ' || drop_sql || ' END')) r
                WHERE NOT r.success
            LOOP
                RAISE EXCEPTION 'distribute() could not take the triggers and foreign keys off the star schema on worker %:%',
                                worker.nodename, worker.nodeport
                    USING ERRCODE = 'object_not_in_prerequisite_state',
                          DETAIL = worker.result,
                          HINT = 'Make the worker reachable from the coordinator (citus.node_conninfo, pg_hba.conf) and call distribute() again: what it did so far is done again harmlessly.';
            END LOOP;
            EXECUTE drop_sql;
        END IF;

        -- one connection per worker: the dimensions' foreign keys and the
        -- reference tables are then created in this one transaction
        PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);
        -- Citus's notices about copying the rows and the shell's data
        -- (which is truncated here) would only confuse
        messages := current_setting('client_min_messages');
        PERFORM set_config('client_min_messages', 'warning', true);
        FOR plan IN SELECT * FROM cluster_layout_plan() p ORDER BY p.ordinal LOOP
            IF plan.citus_kind = 'reference' THEN
                PERFORM create_reference_table(plan.table_name);
            ELSIF first_distributed IS NULL THEN
                PERFORM create_distributed_table(plan.table_name, plan.distribution_column,
                                                 shard_count => shards_wanted, colocate_with => 'none');
                first_distributed := plan.table_name;
            ELSE
                PERFORM create_distributed_table(plan.table_name, plan.distribution_column,
                                                 colocate_with => first_distributed::text);
            END IF;
            -- the rows now live in the shards: the shell keeps none
            PERFORM truncate_local_data_after_distributing_table(plan.table_name);
        END LOOP;
        PERFORM set_config('client_min_messages', messages, true);
        FOR i IN 1 .. coalesce(array_length(fks, 1), 0) LOOP
            EXECUTE fks[i];
        END LOOP;

        INSERT INTO cluster_layout (distributed_at, shard_count, dropped_triggers)
        VALUES (clock_timestamp(), shards_wanted, dropped);
        -- what the dropped triggers would have queued: everything, once
        INSERT INTO rfm_dirty_customer VALUES (NULL) ON CONFLICT DO NOTHING;
        INSERT INTO sales_dirty_day VALUES ('-infinity') ON CONFLICT DO NOTHING;
    END IF;

    RETURN QUERY
    SELECT p.table_name, p.citus_kind, p.distribution_column,
           (SELECT count(*)::integer FROM pg_dist_shard s WHERE s.logicalrelid = p.table_name)
    FROM cluster_layout_plan() p
    ORDER BY p.ordinal;
END
$$;
COMMENT ON FUNCTION customer_analytics.distribute(integer) IS
    'On a Citus coordinator: converts the installed (possibly loaded) star schema to its distributed layout (order facts and their repair queue by customer_ref, keyed on (order_id, line_number, customer_ref); staging and events by order_id / event_id / customer_id, all co-located; dimensions as reference tables; the rest local) and returns the layout; a second call changes nothing; refused where Citus is absent or on a worker';

-- issue 17 layout by session: fact_event and stg_events distributed by session_id, fact_event's key (session_id, event_id) on the cluster, an event that changed session moved; the stitching and the anonymous visitors' sessions on the shards (docs/scaling.md)
CREATE OR REPLACE FUNCTION customer_analytics_internal.load_fact_event()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    tz text := business_timezone();
    batch bigint;
    added bigint;
    moved bigint := 0;
    changed bigint := 0;
    detail boolean;
    on_cluster boolean := citus_managed('customer_analytics.fact_event');
BEGIN
    CREATE TEMP TABLE ca_event_rows ON COMMIT DROP AS
    SELECT s.event_id, s.event_ts, date_key((s.event_ts AT TIME ZONE tz)::date) AS date_key,
           CASE WHEN s.customer_id IS NULL THEN NULL
                ELSE COALESCE(c.customer_key, -1) END AS customer_key,
           s.customer_id, s.session_id, s.event_type,
           CASE WHEN s.product_id IS NULL THEN NULL ELSE COALESCE(p.product_key, -1) END AS product_key,
           s.order_id, s.channel, s.device, s.stage_id, s.load_id
    FROM ca_batch_events s
    LEFT JOIN ca_event_customers c
           ON c.customer_id = s.customer_id AND s.event_ts >= c.valid_from AND s.event_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id;
    SELECT count(*) INTO batch FROM ca_event_rows;
    detail := check_queue('customer_analytics.fact_event', batch);
    CREATE TEMP TABLE ca_event_changes (new jsonb, old jsonb) ON COMMIT DROP;

    IF on_cluster THEN
        -- where each event of the batch is now, if anywhere
        CREATE TEMP TABLE ca_event_placed ON COMMIT DROP AS
        WITH r AS MATERIALIZED (
            SELECT r.event_id FROM ca_event_rows r
        )
        SELECT f.event_id, f.session_id, f.stage_id
        FROM fact_event f WHERE f.event_id IN (SELECT r.event_id FROM r);
        -- an older version than the row under another session: nothing to write
        DELETE FROM ca_event_rows r
        USING ca_event_placed p
        WHERE p.event_id = r.event_id AND p.session_id <> r.session_id AND r.stage_id <= p.stage_id;
        -- a newer one: the old row goes (from its old session's shard) ...
        CREATE TEMP TABLE ca_event_moved (event_id text, old jsonb) ON COMMIT DROP;
        WITH m AS MATERIALIZED (
            SELECT p.session_id, p.event_id
            FROM ca_event_placed p JOIN ca_event_rows r USING (event_id)
            WHERE p.session_id <> r.session_id
        ), gone AS (
            DELETE FROM fact_event f
            USING m
            WHERE f.session_id = m.session_id AND f.event_id = m.event_id
            RETURNING f.*
        )
        INSERT INTO ca_event_moved SELECT g.event_id, to_jsonb(g) FROM gone g;
        -- ... and its new version is inserted on the new one
        WITH m AS MATERIALIZED (
            SELECT r.*, m.old
            FROM ca_event_rows r JOIN ca_event_moved m USING (event_id)
        ), ins AS (
            INSERT INTO fact_event AS f
                (event_id, event_ts, date_key, customer_key, customer_id, customer_stitched, session_id,
                 event_type, product_key, order_id, channel, device, stage_id, load_id)
            SELECT m.event_id, m.event_ts, m.date_key, m.customer_key, m.customer_id, false, m.session_id,
                   m.event_type, m.product_key, m.order_id, m.channel, m.device, m.stage_id, m.load_id
            FROM m
            RETURNING f.*
        )
        INSERT INTO ca_event_changes
        SELECT to_jsonb(i), m.old FROM ins i JOIN m USING (event_id);
        GET DIAGNOSTICS moved = ROW_COUNT;
        DELETE FROM ca_event_rows r USING ca_event_moved m WHERE m.event_id = r.event_id;
        DROP TABLE ca_event_placed, ca_event_moved;
    END IF;

    -- into an empty table (a first load) without ON CONFLICT, as the
    -- order lines (load_fact_order_line); on Citus the key holds the
    -- session
    EXECUTE format($sql$
    WITH written AS (
        INSERT INTO fact_event AS f
            (event_id, event_ts, date_key, customer_key, customer_id, customer_stitched, session_id,
             event_type, product_key, order_id, channel, device, stage_id, load_id)
        SELECT r.event_id, r.event_ts, r.date_key, r.customer_key, r.customer_id, false, r.session_id,
               r.event_type, r.product_key, r.order_id, r.channel, r.device, r.stage_id, r.load_id
        FROM ca_event_rows r
        %s
        RETURNING f.event_id, f.event_ts, f.customer_id, f.session_id
    ), queued AS (
        INSERT INTO clickstream_change (visitor, since)
        SELECT visitor(w.customer_id, w.session_id), min(w.event_ts) FROM written w GROUP BY 1
    ), checked AS (
        INSERT INTO check_change (rel, op, key)
        SELECT 'customer_analytics.fact_event'::regclass, 'n', jsonb_build_object('event_id', w.event_id)
        FROM written w WHERE $1
    )
    SELECT count(*) FROM written
    $sql$, CASE WHEN on_cluster THEN 'ON CONFLICT (session_id, event_id) DO NOTHING'
                WHEN EXISTS (SELECT 1 FROM fact_event) THEN 'ON CONFLICT (event_id) DO NOTHING' END)
    INTO added USING detail;

    -- events already in the facts: a later staged version that differs wins
    IF added + moved < batch THEN
        -- (in CTEs, for Citus, as the order lines' update; there, an event
        -- that changed session was moved above, and Citus refuses a SET of
        -- the distribution column even to its own value)
        EXECUTE format($sql$
        WITH r AS MATERIALIZED (
            SELECT * FROM ca_event_rows
        ), was AS MATERIALIZED (
            SELECT f.* FROM fact_event f WHERE f.event_id IN (SELECT r.event_id FROM r)
        ), upd AS (
            UPDATE fact_event f
            SET event_ts = r.event_ts, date_key = r.date_key,
                customer_key = r.customer_key, customer_id = r.customer_id,
                customer_stitched = false, %s
                event_type = r.event_type, product_key = r.product_key,
                order_id = r.order_id, channel = r.channel,
                device = r.device, stage_id = r.stage_id, load_id = r.load_id
            FROM r
            WHERE f.event_id = r.event_id %s
              AND r.stage_id > f.stage_id
              AND (f.event_ts, f.customer_key, f.customer_id, f.customer_stitched, f.session_id,
                   f.event_type, f.product_key, f.order_id, f.channel, f.device)
                  IS DISTINCT FROM
                  (r.event_ts, r.customer_key, r.customer_id, false,
                   r.session_id, r.event_type, r.product_key,
                   r.order_id, r.channel, r.device)
            RETURNING f.*
        )
        INSERT INTO ca_event_changes
        SELECT to_jsonb(u), to_jsonb(w) FROM upd u JOIN was w USING (event_id)
        $sql$, CASE WHEN NOT on_cluster THEN 'session_id = r.session_id,' END,
               CASE WHEN on_cluster THEN 'AND f.session_id = r.session_id' END);
    END IF;
    changed := note_event_updates(detail);
    DROP TABLE ca_event_rows;
    RETURN added + changed;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.load_fact_event() IS
    'Internal to transform_events(): the batch''s events into fact_event (upsert on event_id, the latest staged version wins; anonymous stays NULL, an unknown customer is -1; on Citus an event that changed session is moved to its new session''s shard); returns the rows written';

CREATE OR REPLACE FUNCTION customer_analytics_internal.stitch_sessions()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    n bigint;
BEGIN
    -- only sessions where something can change: an anonymous event and an
    -- identified one, or events stitched before
    CREATE TEMP TABLE ca_stitch_sessions ON COMMIT DROP AS
    SELECT f.session_id
    FROM fact_event f
    WHERE f.session_id IN (SELECT b.session_id FROM ca_batch_events b)
    GROUP BY f.session_id
    HAVING (bool_or(f.customer_id IS NULL) AND bool_or(f.customer_id IS NOT NULL))
           OR bool_or(f.customer_stitched);
    ANALYZE ca_stitch_sessions;
    CREATE TEMP TABLE ca_event_changes (new jsonb, old jsonb) ON COMMIT DROP;
    -- One statement, joined on (session_id, event_id), whose windows are
    -- partitioned by the session: on Citus (events by session_id) each
    -- shard stitches its own sessions and updates them, and only the
    -- sessions' ids go out and the changed rows come back.  The old
    -- customer columns are returned beside the new row (to_jsonb() is not
    -- immutable, which Citus wants in RETURNING).
    WITH upd AS (
        UPDATE fact_event f
        SET customer_key = l.new_key, customer_id = l.new_id, customer_stitched = l.new_id IS NOT NULL
        FROM (SELECT s.session_id, s.event_id, s.customer_key, s.customer_id, s.customer_stitched,
                     max(s.customer_key) FILTER (WHERE s.customer_id IS NOT NULL AND NOT s.customer_stitched)
                         OVER g AS new_key,
                     max(s.customer_id) FILTER (WHERE s.customer_id IS NOT NULL AND NOT s.customer_stitched)
                         OVER g AS new_id
              FROM (SELECT e.session_id, e.event_id, e.customer_key, e.customer_id, e.customer_stitched,
                           count(*) FILTER (WHERE e.customer_id IS NOT NULL AND NOT e.customer_stitched)
                               OVER (PARTITION BY e.session_id ORDER BY e.event_ts DESC, e.event_id DESC
                                     ROWS UNBOUNDED PRECEDING) AS grp
                    FROM fact_event e
                    WHERE e.session_id IN (SELECT c.session_id FROM ca_stitch_sessions c)) s
              WINDOW g AS (PARTITION BY s.session_id, s.grp)) l
        WHERE f.session_id = l.session_id AND f.event_id = l.event_id
          AND (l.customer_id IS NULL OR l.customer_stitched)
          AND (l.customer_key, l.customer_id, l.customer_stitched)
              IS DISTINCT FROM (l.new_key, l.new_id, l.new_id IS NOT NULL)
        RETURNING f.*, l.customer_key AS was_key, l.customer_id AS was_id, l.customer_stitched AS was_stitched
    )
    -- only the customer columns change: the old row is the new one with theirs
    INSERT INTO ca_event_changes
    SELECT n.new, n.new || jsonb_build_object('customer_key', u.was_key, 'customer_id', u.was_id,
                                              'customer_stitched', u.was_stitched)
    FROM upd u
    CROSS JOIN LATERAL (SELECT to_jsonb(u) - '{was_key,was_id,was_stitched}'::text[] AS new) n;
    SELECT count(*) INTO n FROM ca_event_changes;
    n := note_event_updates(check_queue('customer_analytics.fact_event', n));
    DROP TABLE ca_stitch_sessions;
    RETURN n;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.stitch_sessions() IS
    'Internal to transform_events(): anonymous events of the batch''s sessions take the customer of the next identified event of their session; returns the events changed';

CREATE OR REPLACE FUNCTION customer_analytics_internal.changed_session_events_on_cluster()
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
BEGIN
    CREATE TEMP TABLE ca_session_events ON COMMIT DROP AS
    WITH c AS MATERIALIZED (
        SELECT c.visitor, c.since, substr(c.visitor, 3) AS id, c.visitor LIKE 'c:%' AS is_customer
        FROM ca_changed c
        WHERE c.visitor LIKE 'c:%'
    ), k AS MATERIALIZED (
        SELECT c.visitor, c.since, d.customer_key
        FROM c JOIN dim_customer d ON d.customer_id = c.id AND d.customer_key <> -1
        WHERE c.is_customer
    )
    SELECT k.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
           f.event_type, f.channel, f.device
    FROM k JOIN fact_event f ON f.customer_key = k.customer_key AND f.event_ts >= k.since
    UNION ALL
    SELECT c.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
           f.event_type, f.channel, f.device
    FROM c JOIN fact_event f ON f.customer_key = -1 AND f.customer_id = c.id AND f.event_ts >= c.since
    WHERE c.is_customer;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.changed_session_events_on_cluster() IS
    'Internal to refresh_sessions() on Citus: the events of the identified visitors queued as changed (ca_changed) into ca_session_events, by a join Citus sends to the shards instead of one lookup per visitor';

CREATE FUNCTION customer_analytics_internal.anonymous_sessions_on_cluster(gap interval, tz text, changed boolean)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE format($sql$
    INSERT INTO sessions (visitor, session_start, session_end, date_key, customer_id, customer_key,
                          events, pages, product_views, add_to_carts, checkouts, purchases,
                          channel, device)
    SELECT 's:' || e.session_id, min(e.event_ts), max(e.event_ts),
           date_key((min(e.event_ts) AT TIME ZONE %L)::date), NULL, NULL,
           count(*),
           count(*) FILTER (WHERE e.event_type IN ('page_view', 'product_view')),
           count(*) FILTER (WHERE e.event_type = 'product_view'),
           count(*) FILTER (WHERE e.event_type = 'add_to_cart'),
           count(*) FILTER (WHERE e.event_type = 'checkout'),
           count(*) FILTER (WHERE e.event_type = 'purchase'),
           (array_agg(e.channel ORDER BY e.event_ts, e.event_id))[1],
           (array_agg(e.device ORDER BY e.event_ts, e.event_id))[1]
    FROM (SELECT f.session_id, f.event_id, f.event_ts, f.event_type, f.channel, f.device,
                 session_number(f.event_ts, %L::interval)
                     OVER (PARTITION BY f.session_id ORDER BY f.event_ts, f.event_id) AS sn
          FROM fact_event f
          %s
          WHERE f.customer_id IS NULL) e
    GROUP BY e.session_id, e.sn
    $sql$, tz, gap,
    CASE WHEN changed THEN
        $j$JOIN (SELECT substr(c.visitor, 3) AS session_id, c.since FROM ca_changed c
                 WHERE c.visitor LIKE 's:%') c ON c.session_id = f.session_id AND f.event_ts >= c.since$j$
    END);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.anonymous_sessions_on_cluster(interval, text, boolean) IS
    'Internal to refresh_sessions() on Citus: the sessions of anonymous visitors (all, or those queued in ca_changed) cut and summed on the shards of fact_event, which is distributed by session_id; returns the sessions written';

CREATE OR REPLACE FUNCTION customer_analytics.refresh_sessions(full_rebuild boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    gap     interval := session_gap();
    tz      text := business_timezone();
    st      clickstream_state;
    n       bigint;
    -- on Citus the anonymous visitors' sessions are written on the shards
    on_cluster boolean := citus_managed('customer_analytics.fact_event');
    anonymous bigint := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('transform_events()'));
    SELECT * INTO st FROM clickstream_state;
    IF st IS NULL OR st.session_gap <> gap OR st.timezone <> tz THEN
        full_rebuild := true;
    END IF;

    IF full_rebuild THEN
        TRUNCATE clickstream_change;
        DELETE FROM sessions;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF on_cluster THEN
            anonymous := anonymous_sessions_on_cluster(gap, tz, false);
            CREATE TEMP TABLE ca_session_events ON COMMIT DROP AS
            SELECT visitor(f.customer_id, f.session_id) AS visitor, f.event_id, f.event_ts,
                   f.customer_id, f.customer_key, f.event_type, f.channel, f.device
            FROM fact_event f
            WHERE f.customer_id IS NOT NULL;
        ELSE
        CREATE TEMP TABLE ca_session_events ON COMMIT DROP AS
        SELECT visitor(f.customer_id, f.session_id) AS visitor, f.event_id, f.event_ts,
               f.customer_id, f.customer_key, f.event_type, f.channel, f.device
        FROM fact_event f;
        END IF;
    ELSE
        CREATE TEMP TABLE ca_changed ON COMMIT DROP AS
        WITH taken AS (DELETE FROM clickstream_change RETURNING visitor, since)
        SELECT visitor, min(since) AS since FROM taken GROUP BY visitor;
        ANALYZE ca_changed;

        WITH gone AS (
            DELETE FROM sessions s
            WHERE (s.visitor, s.session_start) IN
                  (SELECT x.visitor, x.session_start
                   FROM ca_changed c
                   CROSS JOIN LATERAL (SELECT o.visitor, o.session_start FROM sessions o
                                       WHERE o.visitor = c.visitor AND o.session_end >= c.since - gap
                                       OFFSET 0) x)
            RETURNING s.visitor, s.session_start
        ), firsts AS (
            SELECT visitor, min(session_start) AS first_start, count(*) AS removed
            FROM gone GROUP BY visitor
        ), moved AS (
            UPDATE ca_changed c SET since = LEAST(c.since, f.first_start)
            FROM firsts f WHERE f.visitor = c.visitor
        )
        SELECT COALESCE(sum(removed), 0) INTO n FROM firsts;

        IF on_cluster THEN
            anonymous := anonymous_sessions_on_cluster(gap, tz, true);
            PERFORM changed_session_events_on_cluster();
        ELSE
        /*
         * Each changed visitor's events since its time, looked up through
         * the indexes one visitor at a time (OFFSET 0 keeps each lookup a
         * parameterised scan): a join the planner may hash would read the
         * whole dimension and the visitors' whole histories, a cost that
         * grows with the shop instead of with what changed.
         */
        CREATE TEMP TABLE ca_session_events ON COMMIT DROP AS
        SELECT c.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
               f.event_type, f.channel, f.device
        FROM ca_changed c
        CROSS JOIN LATERAL (SELECT d.customer_key FROM dim_customer d
                            WHERE d.customer_id = substr(c.visitor, 3) AND d.customer_key <> -1
                            OFFSET 0) d
        CROSS JOIN LATERAL (SELECT * FROM fact_event f
                            WHERE f.customer_key = d.customer_key AND f.event_ts >= c.since
                            OFFSET 0) f
        WHERE c.visitor LIKE 'c:%'
        UNION ALL
        SELECT c.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
               f.event_type, f.channel, f.device
        FROM ca_changed c
        CROSS JOIN LATERAL (SELECT * FROM fact_event f
                            WHERE f.customer_key = -1 AND f.customer_id = substr(c.visitor, 3)
                              AND f.event_ts >= c.since
                            OFFSET 0) f
        WHERE c.visitor LIKE 'c:%'
        UNION ALL
        SELECT c.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
               f.event_type, f.channel, f.device
        FROM ca_changed c
        CROSS JOIN LATERAL (SELECT * FROM fact_event f
                            WHERE f.session_id = substr(c.visitor, 3) AND f.event_ts >= c.since
                              AND f.customer_id IS NULL
                            OFFSET 0) f
        WHERE c.visitor LIKE 's:%';
        END IF;
        DROP TABLE ca_changed;
    END IF;
    RETURN QUERY VALUES ('sessions_removed', n);
    ANALYZE ca_session_events;

    INSERT INTO sessions (visitor, session_start, session_end, date_key, customer_id, customer_key,
                          events, pages, product_views, add_to_carts, checkouts, purchases,
                          channel, device)
    SELECT e.visitor, min(e.event_ts), max(e.event_ts),
           date_key((min(e.event_ts) AT TIME ZONE tz)::date),
           (array_agg(e.customer_id ORDER BY e.event_ts DESC, e.event_id DESC)
                FILTER (WHERE e.customer_id IS NOT NULL))[1],
           (array_agg(e.customer_key ORDER BY e.event_ts DESC, e.event_id DESC)
                FILTER (WHERE e.customer_key IS NOT NULL))[1],
           count(*),
           count(*) FILTER (WHERE e.event_type IN ('page_view', 'product_view')),
           count(*) FILTER (WHERE e.event_type = 'product_view'),
           count(*) FILTER (WHERE e.event_type = 'add_to_cart'),
           count(*) FILTER (WHERE e.event_type = 'checkout'),
           count(*) FILTER (WHERE e.event_type = 'purchase'),
           (array_agg(e.channel ORDER BY e.event_ts, e.event_id))[1],
           (array_agg(e.device ORDER BY e.event_ts, e.event_id))[1]
    FROM (SELECT x.*,
                 session_number(x.event_ts, gap) OVER (PARTITION BY x.visitor ORDER BY x.event_ts, x.event_id) AS sn
          FROM ca_session_events x) e
    GROUP BY e.visitor, e.sn;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN QUERY VALUES ('sessions_written', n + anonymous);
    DROP TABLE ca_session_events;

    INSERT INTO clickstream_state (singleton, session_gap, timezone, last_run_at)
    VALUES (true, gap, tz, now())
    ON CONFLICT (singleton) DO UPDATE
        SET session_gap = excluded.session_gap, timezone = excluded.timezone,
            last_run_at = excluded.last_run_at;
END
$$;
COMMENT ON FUNCTION customer_analytics.refresh_sessions(boolean) IS
    'Bring the sessions table up to date with fact_event: rebuild the sessions of the visitors whose events changed since the last call (all of them with full_rebuild, or when the session gap or time zone setting changed). Returns the sessions removed and written';

-- issue 17 layouts merged: the plan and distribute() with the order facts by customer_ref and the events by session_id
CREATE OR REPLACE FUNCTION customer_analytics_internal.cluster_layout_plan()
RETURNS TABLE (ordinal integer, table_name regclass, citus_kind text, distribution_column text,
               cluster_key text[])
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM (VALUES
        (1, 'customer_analytics.dim_date'::regclass, 'reference', NULL::text, NULL::text[]),
        (2, 'customer_analytics.dim_product', 'reference', NULL, NULL),
        (3, 'customer_analytics.dim_customer', 'reference', NULL, NULL),
        (4, 'customer_analytics.stg_products', 'reference', NULL, NULL),
        (5, 'customer_analytics.fact_order_line', 'distributed', 'customer_ref',
         '{order_id,line_number,customer_ref}'),
        (6, 'customer_analytics.stg_orders', 'distributed', 'order_id', NULL),
        (7, 'customer_analytics_internal.unknown_member_line', 'distributed', 'customer_ref',
         '{order_id,line_number,customer_ref}'),
        (8, 'customer_analytics.fact_event', 'distributed', 'session_id',
         '{session_id,event_id}'),
        (9, 'customer_analytics.stg_events', 'distributed', 'session_id', NULL),
        (10, 'customer_analytics.stg_customers', 'distributed', 'customer_id', NULL)
    ) AS p (ordinal, table_name, citus_kind, distribution_column, cluster_key)
$$;
COMMENT ON FUNCTION customer_analytics_internal.cluster_layout_plan() IS
    'Internal to distribute(): the tables it converts, in order: reference tables first, then the distributed ones with their distribution column (co-located with the first) and, where the single-node primary key lacks that column, the primary key they get on the cluster (cluster_key)';


CREATE OR REPLACE FUNCTION customer_analytics.distribute(shard_count integer DEFAULT NULL)
RETURNS TABLE (table_name regclass, citus_kind text, distribution_column text, shards integer)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    shards_wanted integer;
    plan record;
    trg record;
    fk record;
    worker record;
    messages text;
    dropped text[] := '{}';
    fks text[] := '{}';
    first_distributed regclass;
    on_coordinator boolean;
    workers bigint;
    -- the statements that take the triggers and foreign keys off and
    -- swap the primary keys for the cluster's, run here and on every worker
    drop_sql text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION 'distribute() needs Citus, and the extension citus is not installed in database %',
                        current_database()
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'distribute() converts the star schema to Citus distributed and reference tables; on a single PostgreSQL server the schema stays as it is and every function works on it.',
                  HINT = 'On a Citus coordinator: CREATE EXTENSION citus, add the workers with citus_add_node(), then call distribute() there.';
    END IF;
    EXECUTE 'SELECT pg_catalog.citus_is_coordinator()' INTO on_coordinator;
    IF NOT on_coordinator THEN
        RAISE EXCEPTION 'distribute() must run on the Citus coordinator, and this node is a worker'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'Only the coordinator holds the metadata that create_distributed_table() changes.',
                  HINT = 'Connect to the coordinator and call customer_analytics.distribute() there.';
    END IF;

    -- a concurrent call waits, then finds the layout done
    LOCK TABLE cluster_layout IN EXCLUSIVE MODE;
    IF EXISTS (SELECT FROM cluster_layout) THEN
        RAISE NOTICE 'the star schema is distributed already (since %)',
                     (SELECT distributed_at FROM cluster_layout)
            USING DETAIL = 'distribute() changed nothing; the rows below are the current layout.';
    ELSE
        EXECUTE 'SELECT count(*) FROM pg_catalog.citus_get_active_worker_nodes()' INTO workers;
        IF workers = 0 THEN
            RAISE EXCEPTION 'distribute() found no active Citus worker node'
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'The shards of the facts would have nowhere to go.',
                      HINT = 'Add the workers with citus_add_node(host, port) (and, for pg_cron and the coordinator''s own queries, citus_set_coordinator_host()), then call distribute() again.';
        END IF;
        IF EXISTS (SELECT FROM cluster_layout_plan() p
                   JOIN pg_dist_partition d ON d.logicalrelid = p.table_name) THEN
            RAISE EXCEPTION 'distribute() found tables of the star schema already converted by hand: %',
                            (SELECT string_agg(qualified_name(p.table_name), ', ' ORDER BY p.ordinal)
                             FROM cluster_layout_plan() p
                             JOIN pg_dist_partition d ON d.logicalrelid = p.table_name)
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'distribute() converts the whole layout at once, from the single-node one, and does not guess what a conversion by hand left.',
                      HINT = 'Undo it with undistribute_table() for each of those tables, then call distribute().';
        END IF;
        shards_wanted := COALESCE(shard_count, current_setting('citus.shard_count')::integer);
        IF shards_wanted < 1 THEN
            RAISE EXCEPTION 'distribute(shard_count => %): the shard count must be at least 1', shard_count
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Leave it out to take citus.shard_count, or give a few shards per worker core.';
        END IF;

        -- the facts' foreign keys, to put back after the conversion
        FOR fk IN
            SELECT qualified_name(c.conrelid::regclass) AS rel, c.conname, pg_get_constraintdef(c.oid) AS def
            FROM pg_constraint c
            WHERE c.contype = 'f'
              AND c.conrelid IN (SELECT p.table_name FROM cluster_layout_plan() p)
            ORDER BY 1, 2
        LOOP
            fks := fks || format('ALTER TABLE %s ADD CONSTRAINT %I %s', fk.rel, fk.conname, fk.def);
        END LOOP;

        drop_sql := '';
        FOR trg IN
            SELECT qualified_name(t.tgrelid::regclass) AS rel, t.tgname, pg_get_triggerdef(t.oid) AS def
            FROM pg_trigger t
            WHERE NOT t.tgisinternal
              AND t.tgrelid IN (SELECT p.table_name FROM cluster_layout_plan() p)
            ORDER BY 1, 2
        LOOP
            dropped := dropped || trg.def;
            drop_sql := drop_sql || format('DROP TRIGGER IF EXISTS %I ON %s;', trg.tgname, trg.rel);
        END LOOP;
        FOR fk IN
            SELECT qualified_name(c.conrelid::regclass) AS rel, c.conname
            FROM pg_constraint c
            WHERE c.contype = 'f'
              AND c.conrelid IN (SELECT p.table_name FROM cluster_layout_plan() p)
            ORDER BY 1, 2
        LOOP
            drop_sql := drop_sql || format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I;', fk.rel, fk.conname);
        END LOOP;
        -- the primary keys swapped for the cluster's (Citus refuses a
        -- unique index without the distribution column), under the same
        -- name; on the workers' copies too, which Citus keeps as the
        -- tables' shells there (dropped and added again: idempotent)
        FOR fk IN
            SELECT qualified_name(p.table_name) AS rel, c.conname,
                   (SELECT string_agg(quote_ident(k), ', ' ORDER BY n) FROM unnest(p.cluster_key) WITH ORDINALITY u (k, n)) AS cols
            FROM cluster_layout_plan() p
            JOIN pg_constraint c ON c.conrelid = p.table_name AND c.contype = 'p'
            WHERE p.cluster_key IS NOT NULL
            ORDER BY p.ordinal
        LOOP
            drop_sql := drop_sql || format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I;', fk.rel, fk.conname)
                                 || format('ALTER TABLE %s ADD CONSTRAINT %I PRIMARY KEY (%s);', fk.rel, fk.conname, fk.cols);
        END LOOP;

        -- fact_event's key holds its session on the cluster (swapped
        -- above), and a plain index on event_id stays beside it: an event
        -- re-staged under another session is found by it on every shard,
        -- without a scan
        drop_sql := drop_sql || 'CREATE INDEX IF NOT EXISTS fact_event_event_id_idx ON customer_analytics.fact_event (event_id);';

        -- the workers first: a failure there leaves this node untouched,
        -- and the statements are idempotent, so a second call finishes
        IF drop_sql <> '' THEN
            FOR worker IN
                SELECT r.nodename, r.nodeport, r.result
                FROM run_command_on_workers(format('DO %L', 'BEGIN ' || drop_sql || ' END')) r
                WHERE NOT r.success
            LOOP
                RAISE EXCEPTION 'distribute() could not take the triggers and foreign keys off the star schema on worker %:%',
                                worker.nodename, worker.nodeport
                    USING ERRCODE = 'object_not_in_prerequisite_state',
                          DETAIL = worker.result,
                          HINT = 'Make the worker reachable from the coordinator (citus.node_conninfo, pg_hba.conf) and call distribute() again: what it did so far is done again harmlessly.';
            END LOOP;
            EXECUTE drop_sql;
        END IF;

        -- one connection per worker: the dimensions' foreign keys and the
        -- reference tables are then created in this one transaction
        PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);
        -- Citus's notices about copying the rows and the shell's data
        -- (which is truncated here) would only confuse
        messages := current_setting('client_min_messages');
        PERFORM set_config('client_min_messages', 'warning', true);
        FOR plan IN SELECT * FROM cluster_layout_plan() p ORDER BY p.ordinal LOOP
            IF plan.citus_kind = 'reference' THEN
                PERFORM create_reference_table(plan.table_name);
            ELSIF first_distributed IS NULL THEN
                PERFORM create_distributed_table(plan.table_name, plan.distribution_column,
                                                 shard_count => shards_wanted, colocate_with => 'none');
                first_distributed := plan.table_name;
            ELSE
                PERFORM create_distributed_table(plan.table_name, plan.distribution_column,
                                                 colocate_with => first_distributed::text);
            END IF;
            -- the rows now live in the shards: the shell keeps none
            PERFORM truncate_local_data_after_distributing_table(plan.table_name);
        END LOOP;
        PERFORM set_config('client_min_messages', messages, true);
        FOR i IN 1 .. coalesce(array_length(fks, 1), 0) LOOP
            EXECUTE fks[i];
        END LOOP;

        INSERT INTO cluster_layout (distributed_at, shard_count, dropped_triggers)
        VALUES (clock_timestamp(), shards_wanted, dropped);
        -- what the dropped triggers would have queued: everything, once
        INSERT INTO rfm_dirty_customer VALUES (NULL) ON CONFLICT DO NOTHING;
        INSERT INTO sales_dirty_day VALUES ('-infinity') ON CONFLICT DO NOTHING;
    END IF;

    RETURN QUERY
    SELECT p.table_name, p.citus_kind, p.distribution_column,
           (SELECT count(*)::integer FROM pg_dist_shard s WHERE s.logicalrelid = p.table_name)
    FROM cluster_layout_plan() p
    ORDER BY p.ordinal;
END
$$;
COMMENT ON FUNCTION customer_analytics.distribute(integer) IS
    'On a Citus coordinator: converts the installed (possibly loaded) star schema to its distributed layout (order facts and their repair queue by customer_ref, keyed on (order_id, line_number, customer_ref); events and their staging by session_id, fact_event keyed on (session_id, event_id); staged lines by order_id, staged customers by customer_id; all co-located; dimensions as reference tables; the rest local) and returns the layout; a second call changes nothing; refused where Citus is absent or on a worker';



-- issue 17 staging mark: staged_xid's default is staging_xid(), pg_current_xact_id() but refused where Citus evaluates it on a worker or in a connection of its own (an INSERT ... SELECT from a Citus table that Citus does not push down whole, or a statement run on a worker), whose transaction ids transform() would miss
CREATE FUNCTION customer_analytics_internal.staging_xid()
    RETURNS xid8
    AS 'MODULE_PATHNAME', 'ca_staging_xid' LANGUAGE C STABLE PARALLEL UNSAFE;
COMMENT ON FUNCTION customer_analytics_internal.staging_xid() IS
    'Internal: the default of the staging tables'' staged_xid, the current top-level transaction id as pg_current_xact_id() gives it; refused (SQLSTATE 55000) where it is evaluated on a Citus worker or in a connection Citus opened for another session, whose transaction ids transform() does not know: a statement run on a worker, or an INSERT ... SELECT from a Citus table that Citus pulls to the coordinator or repartitions (stage such rows through a local or temporary table)';
ALTER TABLE customer_analytics.stg_customers ALTER COLUMN staged_xid SET DEFAULT customer_analytics_internal.staging_xid();
ALTER TABLE customer_analytics.stg_products ALTER COLUMN staged_xid SET DEFAULT customer_analytics_internal.staging_xid();
ALTER TABLE customer_analytics.stg_orders ALTER COLUMN staged_xid SET DEFAULT customer_analytics_internal.staging_xid();
ALTER TABLE customer_analytics.stg_events ALTER COLUMN staged_xid SET DEFAULT customer_analytics_internal.staging_xid();

-- issue 17 transform on the cluster: transform()'s tests whether a distributed table is empty take one row per shard (EXISTS over a LIMIT 1), not every row of every shard shipped to the coordinator; the stitching sends the shards its sessions as an array literal (docs/scaling.md)

CREATE OR REPLACE FUNCTION customer_analytics_internal.load_fact_order_line()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    tz text := business_timezone();
    batch bigint;
    added bigint;
    changed bigint := 0;
    detail boolean;
    fast boolean;
    line_queue boolean := true;
    deferred text[];
    on_cluster boolean := citus_managed('customer_analytics.fact_order_line');
    conflict text;
    -- (LIMIT 1: Citus runs the subquery of an EXISTS over a distributed
    -- table first and whole, every row of every shard shipped to the
    -- coordinator, unless a LIMIT goes down to the shards with it; a
    -- single node drops the LIMIT from an EXISTS)
    filled boolean := EXISTS (SELECT 1 FROM customer_analytics.fact_order_line LIMIT 1);
BEGIN
    CREATE TEMP TABLE ca_customer_lookup ON COMMIT DROP AS
    SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT o.customer_id FROM ca_batch_orders o
                                          WHERE o.customer_id IS NOT NULL));
    ANALYZE ca_customer_lookup (customer_id, valid_from, valid_to);

    CREATE TEMP TABLE ca_order_lines ON COMMIT DROP AS
    SELECT s.order_id, s.line_number,
           COALESCE(c.customer_key, -1) AS customer_key,
           COALESCE(p.product_key, -1) AS product_key,
           date_key((s.order_ts AT TIME ZONE tz)::date) AS date_key,
           s.order_ts, s.quantity, s.unit_price, s.discount, s.status, s.channel,
           s.updated_at, s.stage_id, s.load_id, s.customer_id, s.product_id,
           order_customer_ref(s.customer_id, s.order_id) AS customer_ref,
           (s.customer_id IS NOT NULL AND c.customer_key IS NULL)
           OR (s.product_id IS NOT NULL AND p.product_key IS NULL) AS unresolved,
           false AS moving
    FROM ca_batch_orders s
    LEFT JOIN ca_customer_lookup c
           ON c.customer_id = s.customer_id AND s.order_ts >= c.valid_from AND s.order_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id;
    DROP TABLE ca_customer_lookup;
    SELECT count(*) INTO batch FROM ca_order_lines;
    detail := check_queue('customer_analytics.fact_order_line', batch);
    deferred := defer_fact_indexes('customer_analytics.fact_order_line', batch);

    /*
     * On a cluster the facts are distributed by customer_ref and keyed on
     * (order_id, line_number, customer_ref) (docs/scaling.md): a line
     * staged again under another customer conflicts with nothing there and
     * would become a second row on another shard.  Those lines are set
     * apart (moving) and moved below, deleted from the old shard and
     * inserted on the new one.
     */
    IF on_cluster AND filled THEN
        WITH r AS MATERIALIZED (
            SELECT b.order_id, b.line_number FROM ca_order_lines b
        ), there AS MATERIALIZED (
            SELECT f.order_id, f.line_number, f.customer_ref FROM fact_order_line f
            WHERE (f.order_id, f.line_number) IN (SELECT r.order_id, r.line_number FROM r)
        )
        UPDATE ca_order_lines b SET moving = true
        FROM there t
        WHERE t.order_id = b.order_id AND t.line_number = b.line_number AND t.customer_ref <> b.customer_ref;
    END IF;

    -- (session_replication_role is set here, not in a function with SET
    -- clauses of its own, which would undo it on return; this function's
    -- own SET clauses undo it on return or error)
    fast := fact_bulk_write_ok('customer_analytics.fact_order_line');
    IF fast THEN
        PERFORM set_config('session_replication_role', 'replica', true);
    END IF;
    -- new lines are usually new orders: queued to be added to their
    -- customers' RFM inputs without a recompute.  With no rollup yet the
    -- next refresh builds it from the facts whatever is queued: one mark
    -- that everyone is due (NULL) instead of a row per line
    IF NOT EXISTS (SELECT FROM customer_analytics.rfm_rollup_customer) THEN
        INSERT INTO rfm_dirty_customer VALUES (NULL) ON CONFLICT DO NOTHING;
        line_queue := false;
    END IF;
    -- Into an empty table (a first load) the lines go in without ON
    -- CONFLICT: nothing can conflict (the batch has one row per line, and
    -- transform() runs alone), and the arbiter's check before every insert
    -- costs a plain load 30% to 80% more
    IF filled THEN
        conflict := CASE WHEN on_cluster THEN 'ON CONFLICT (order_id, line_number, customer_ref) DO NOTHING'
                         ELSE 'ON CONFLICT (order_id, line_number) DO NOTHING' END;
    END IF;
    EXECUTE format($sql$
    WITH written AS (
        INSERT INTO fact_order_line AS f
            (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity,
             unit_price, discount, status, channel, updated_at, stage_id, load_id, customer_ref)
        SELECT r.order_id, r.line_number, r.customer_key, r.product_key, r.date_key,
               r.order_ts, r.quantity, r.unit_price, r.discount, r.status, r.channel,
               r.updated_at, r.stage_id, r.load_id, r.customer_ref
        FROM ca_order_lines r
        WHERE NOT r.moving
        %s
        RETURNING f.order_id, f.line_number, f.customer_key, f.date_key, f.order_ts, f.quantity,
                  f.revenue, f.status
    ), rfm AS (
        INSERT INTO rfm_new_line (customer_id, order_id, line_number, order_ts, revenue, purchase)
        SELECT c.customer_id, w.order_id, w.line_number, w.order_ts, w.revenue,
               w.status = 'completed' AND w.customer_key <> -1 AND (w.quantity > 0 OR w.revenue <> 0)
        FROM written w JOIN dim_customer c USING (customer_key)
        WHERE $1
    ), days AS (
        INSERT INTO sales_dirty_day
        SELECT DISTINCT d.date FROM (SELECT DISTINCT w.date_key FROM written w) k JOIN dim_date d USING (date_key)
        ON CONFLICT DO NOTHING
    ), checked AS (
        INSERT INTO check_change (rel, op, key)
        SELECT 'customer_analytics.fact_order_line'::regclass, 'n',
               jsonb_build_object('order_id', w.order_id, 'line_number', w.line_number)
        FROM written w WHERE $2
    )
    SELECT count(*) FROM written
    $sql$, conflict)
    INTO added USING line_queue, detail;
    IF fast THEN
        PERFORM set_config('session_replication_role', 'origin', true);
        PERFORM check_order_line_keys();
    END IF;
    PERFORM restore_fact_indexes(deferred);

    -- lines already in the facts: a later staged version that differs wins.
    -- (The batch and the old rows are materialised in CTEs, and the UPDATE
    -- returns its rows as they are: so Citus can run it on the distributed
    -- facts, which it may not join to a temporary table, nor return a
    -- function of.  Citus refuses to SET the distribution column even to
    -- its own value: on a cluster customer_ref changes by a move only.)
    IF added < batch THEN
        CREATE TEMP TABLE ca_line_changes (new jsonb, old jsonb) ON COMMIT DROP;
        EXECUTE format($sql$
        WITH r AS MATERIALIZED (
            SELECT * FROM ca_order_lines WHERE NOT moving
        ), was AS MATERIALIZED (
            SELECT f.* FROM fact_order_line f
            WHERE (f.order_id, f.line_number) IN (SELECT r.order_id, r.line_number FROM r)
        ), upd AS (
            UPDATE fact_order_line f
            SET customer_key = r.customer_key, product_key = r.product_key,
                date_key = r.date_key, order_ts = r.order_ts,
                quantity = r.quantity, unit_price = r.unit_price,
                discount = r.discount, status = r.status,
                channel = r.channel, updated_at = r.updated_at,
                stage_id = r.stage_id, load_id = r.load_id %s
            FROM r
            WHERE f.order_id = r.order_id AND f.line_number = r.line_number
              AND r.stage_id > f.stage_id
              AND (f.customer_key, f.product_key, f.order_ts, f.quantity, f.unit_price,
                   f.discount, f.status, f.channel, f.updated_at, f.customer_ref)
                  IS DISTINCT FROM
                  (r.customer_key, r.product_key, r.order_ts, r.quantity,
                   r.unit_price, r.discount, r.status, r.channel, r.updated_at, r.customer_ref)
            RETURNING f.*
        )
        INSERT INTO ca_line_changes
        SELECT to_jsonb(u), to_jsonb(w) FROM upd u JOIN was w USING (order_id, line_number)
        $sql$, CASE WHEN NOT on_cluster THEN ', customer_ref = r.customer_ref' END);
        IF on_cluster THEN
            PERFORM move_order_lines();
        END IF;
        changed := note_order_line_updates(detail);
    END IF;

    -- the lines of this batch a later dimension row may repair (a batch
    -- line that did resolve leaves the queue)
    IF NOT citus_managed('customer_analytics_internal.unknown_member_line') THEN
        MERGE INTO unknown_member_line q
        USING ca_order_lines b
        ON q.order_id = b.order_id AND q.line_number = b.line_number
        WHEN MATCHED AND NOT b.unresolved THEN DELETE
        WHEN MATCHED THEN UPDATE SET customer_id = b.customer_id, product_id = b.product_id,
                                     customer_ref = b.customer_ref
        WHEN NOT MATCHED AND b.unresolved THEN
            INSERT (order_id, line_number, customer_id, product_id, customer_ref)
            VALUES (b.order_id, b.line_number, b.customer_id, b.product_id, b.customer_ref);
    ELSE
        -- the same in two statements: Citus does not MERGE a temporary
        -- table into a distributed one.  A line that moved to another
        -- customer leaves its old shard's queue, as its fact did
        WITH b AS MATERIALIZED (
            SELECT b.order_id, b.line_number, b.customer_ref, b.unresolved FROM ca_order_lines b
        )
        DELETE FROM unknown_member_line q
        USING b
        WHERE q.order_id = b.order_id AND q.line_number = b.line_number
          AND (NOT b.unresolved OR q.customer_ref <> b.customer_ref);
        INSERT INTO unknown_member_line AS q (order_id, line_number, customer_id, product_id, customer_ref)
        SELECT b.order_id, b.line_number, b.customer_id, b.product_id, b.customer_ref
        FROM ca_order_lines b
        WHERE b.unresolved
        ON CONFLICT (order_id, line_number, customer_ref) DO UPDATE
            SET customer_id = excluded.customer_id, product_id = excluded.product_id;
    END IF;
    DROP TABLE ca_order_lines;
    RETURN added + changed;
END
$$;


CREATE OR REPLACE FUNCTION customer_analytics.transform(full_refresh boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
-- the batch statements are bound by writes (heap, index entries, WAL), which
-- JIT does not speed up; compiling one cost up to 0.4 s on a 55k-line batch
SET jit = off
AS $$
DECLARE
    saved       transform_state;
    w           record;
    sysid       bigint;
    tz          text := business_timezone();
    products    bigint;
    customers   bigint;
    unknown_before boolean;
    modify_mode text;
BEGIN
    -- one transform at a time; the second waits, then sees the first's work
    PERFORM pg_advisory_xact_lock(lock_key('transform()'));
    modify_mode := cluster_writes_begin();

    SELECT system_identifier INTO sysid FROM pg_control_system();
    SELECT * INTO saved FROM transform_state;
    SELECT * INTO w FROM staged_window(saved.snapshot, saved.system_identifier, sysid, full_refresh);
    PERFORM stage_order_batch(w.snap, w.prev, w.lo, w.hi, pg_current_xact_id_if_assigned());

    products := load_dim_product();
    customers := load_dim_customer();
    RETURN QUERY VALUES ('dim_product', products), ('dim_customer', customers);
    RETURN QUERY SELECT 'dim_date', ensure_dim_date(min(d), max(d))
                 FROM (SELECT (order_ts AT TIME ZONE tz)::date AS d FROM ca_batch_orders) days;

    /*
     * Lines already pointing at an unknown member before this run are the
     * only ones the repair of late-arriving dimensions can change (the lines
     * this run writes are looked up in the dimensions as they now are), and
     * only if this run added dimension rows.
     */
    -- (LIMIT 1 for Citus, as in load_fact_order_line())
    unknown_before := products + customers > 0 AND EXISTS (SELECT 1 FROM unknown_member_line LIMIT 1);
    RETURN QUERY SELECT 'fact_order_line', load_fact_order_line();
    RETURN QUERY SELECT 'late_dimension_fixes',
                        CASE WHEN unknown_before THEN repair_order_line_keys() ELSE 0 END;

    INSERT INTO transform_state (singleton, snapshot, system_identifier, last_run_at)
    VALUES (true, w.snap, sysid, now())
    ON CONFLICT (singleton) DO UPDATE
        SET snapshot = excluded.snapshot,
            system_identifier = excluded.system_identifier,
            last_run_at = excluded.last_run_at;

    DROP TABLE ca_batch_products, ca_batch_customers, ca_batch_orders;

    /* clickstream events: their own snapshot, so refresh_clickstream() can run them alone */
    RETURN QUERY SELECT * FROM transform_events(full_refresh);
    PERFORM cluster_writes_end(modify_mode);
END
$$;


CREATE OR REPLACE FUNCTION customer_analytics_internal.load_fact_event()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    tz text := business_timezone();
    batch bigint;
    added bigint;
    moved bigint := 0;
    changed bigint := 0;
    detail boolean;
    on_cluster boolean := citus_managed('customer_analytics.fact_event');
BEGIN
    CREATE TEMP TABLE ca_event_rows ON COMMIT DROP AS
    SELECT s.event_id, s.event_ts, date_key((s.event_ts AT TIME ZONE tz)::date) AS date_key,
           CASE WHEN s.customer_id IS NULL THEN NULL
                ELSE COALESCE(c.customer_key, -1) END AS customer_key,
           s.customer_id, s.session_id, s.event_type,
           CASE WHEN s.product_id IS NULL THEN NULL ELSE COALESCE(p.product_key, -1) END AS product_key,
           s.order_id, s.channel, s.device, s.stage_id, s.load_id
    FROM ca_batch_events s
    LEFT JOIN ca_event_customers c
           ON c.customer_id = s.customer_id AND s.event_ts >= c.valid_from AND s.event_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id;
    SELECT count(*) INTO batch FROM ca_event_rows;
    detail := check_queue('customer_analytics.fact_event', batch);
    CREATE TEMP TABLE ca_event_changes (new jsonb, old jsonb) ON COMMIT DROP;

    IF on_cluster THEN
        -- where each event of the batch is now, if anywhere
        CREATE TEMP TABLE ca_event_placed ON COMMIT DROP AS
        WITH r AS MATERIALIZED (
            SELECT r.event_id FROM ca_event_rows r
        )
        SELECT f.event_id, f.session_id, f.stage_id
        FROM fact_event f WHERE f.event_id IN (SELECT r.event_id FROM r);
        -- an older version than the row under another session: nothing to write
        DELETE FROM ca_event_rows r
        USING ca_event_placed p
        WHERE p.event_id = r.event_id AND p.session_id <> r.session_id AND r.stage_id <= p.stage_id;
        -- a newer one: the old row goes (from its old session's shard) ...
        CREATE TEMP TABLE ca_event_moved (event_id text, old jsonb) ON COMMIT DROP;
        WITH m AS MATERIALIZED (
            SELECT p.session_id, p.event_id
            FROM ca_event_placed p JOIN ca_event_rows r USING (event_id)
            WHERE p.session_id <> r.session_id
        ), gone AS (
            DELETE FROM fact_event f
            USING m
            WHERE f.session_id = m.session_id AND f.event_id = m.event_id
            RETURNING f.*
        )
        INSERT INTO ca_event_moved SELECT g.event_id, to_jsonb(g) FROM gone g;
        -- ... and its new version is inserted on the new one
        WITH m AS MATERIALIZED (
            SELECT r.*, m.old
            FROM ca_event_rows r JOIN ca_event_moved m USING (event_id)
        ), ins AS (
            INSERT INTO fact_event AS f
                (event_id, event_ts, date_key, customer_key, customer_id, customer_stitched, session_id,
                 event_type, product_key, order_id, channel, device, stage_id, load_id)
            SELECT m.event_id, m.event_ts, m.date_key, m.customer_key, m.customer_id, false, m.session_id,
                   m.event_type, m.product_key, m.order_id, m.channel, m.device, m.stage_id, m.load_id
            FROM m
            RETURNING f.*
        )
        INSERT INTO ca_event_changes
        SELECT to_jsonb(i), m.old FROM ins i JOIN m USING (event_id);
        GET DIAGNOSTICS moved = ROW_COUNT;
        DELETE FROM ca_event_rows r USING ca_event_moved m WHERE m.event_id = r.event_id;
        DROP TABLE ca_event_placed, ca_event_moved;
    END IF;

    -- into an empty table (a first load) without ON CONFLICT, as the
    -- order lines (load_fact_order_line); on Citus the key holds the
    -- session
    EXECUTE format($sql$
    WITH written AS (
        INSERT INTO fact_event AS f
            (event_id, event_ts, date_key, customer_key, customer_id, customer_stitched, session_id,
             event_type, product_key, order_id, channel, device, stage_id, load_id)
        SELECT r.event_id, r.event_ts, r.date_key, r.customer_key, r.customer_id, false, r.session_id,
               r.event_type, r.product_key, r.order_id, r.channel, r.device, r.stage_id, r.load_id
        FROM ca_event_rows r
        %s
        RETURNING f.event_id, f.event_ts, f.customer_id, f.session_id
    ), queued AS (
        INSERT INTO clickstream_change (visitor, since)
        SELECT visitor(w.customer_id, w.session_id), min(w.event_ts) FROM written w GROUP BY 1
    ), checked AS (
        INSERT INTO check_change (rel, op, key)
        SELECT 'customer_analytics.fact_event'::regclass, 'n', jsonb_build_object('event_id', w.event_id)
        FROM written w WHERE $1
    )
    SELECT count(*) FROM written
    $sql$, CASE WHEN on_cluster THEN 'ON CONFLICT (session_id, event_id) DO NOTHING'
                WHEN EXISTS (SELECT 1 FROM fact_event LIMIT 1) THEN 'ON CONFLICT (event_id) DO NOTHING' END)
    INTO added USING detail;

    -- events already in the facts: a later staged version that differs wins
    IF added + moved < batch THEN
        -- (in CTEs, for Citus, as the order lines' update; there, an event
        -- that changed session was moved above, and Citus refuses a SET of
        -- the distribution column even to its own value)
        EXECUTE format($sql$
        WITH r AS MATERIALIZED (
            SELECT * FROM ca_event_rows
        ), was AS MATERIALIZED (
            SELECT f.* FROM fact_event f WHERE f.event_id IN (SELECT r.event_id FROM r)
        ), upd AS (
            UPDATE fact_event f
            SET event_ts = r.event_ts, date_key = r.date_key,
                customer_key = r.customer_key, customer_id = r.customer_id,
                customer_stitched = false, %s
                event_type = r.event_type, product_key = r.product_key,
                order_id = r.order_id, channel = r.channel,
                device = r.device, stage_id = r.stage_id, load_id = r.load_id
            FROM r
            WHERE f.event_id = r.event_id %s
              AND r.stage_id > f.stage_id
              AND (f.event_ts, f.customer_key, f.customer_id, f.customer_stitched, f.session_id,
                   f.event_type, f.product_key, f.order_id, f.channel, f.device)
                  IS DISTINCT FROM
                  (r.event_ts, r.customer_key, r.customer_id, false,
                   r.session_id, r.event_type, r.product_key,
                   r.order_id, r.channel, r.device)
            RETURNING f.*
        )
        INSERT INTO ca_event_changes
        SELECT to_jsonb(u), to_jsonb(w) FROM upd u JOIN was w USING (event_id)
        $sql$, CASE WHEN NOT on_cluster THEN 'session_id = r.session_id,' END,
               CASE WHEN on_cluster THEN 'AND f.session_id = r.session_id' END);
    END IF;
    changed := note_event_updates(detail);
    DROP TABLE ca_event_rows;
    RETURN added + changed;
END
$$;


CREATE OR REPLACE FUNCTION customer_analytics_internal.stitch_sessions()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    n bigint;
    on_cluster boolean := citus_managed('customer_analytics.fact_event');
    in_stitched text := 'IN (SELECT c.session_id FROM ca_stitch_sessions c)';
    stitch_rows text := '';
BEGIN
    -- only sessions where something can change: an anonymous event and an
    -- identified one, or events stitched before
    CREATE TEMP TABLE ca_stitch_sessions ON COMMIT DROP AS
    SELECT f.session_id
    FROM fact_event f
    WHERE f.session_id IN (SELECT b.session_id FROM ca_batch_events b)
    GROUP BY f.session_id
    HAVING (bool_or(f.customer_id IS NULL) AND bool_or(f.customer_id IS NOT NULL))
           OR bool_or(f.customer_stitched);
    ANALYZE ca_stitch_sessions;
    -- On Citus the stitched sessions go to the shards as an array literal,
    -- not as a subquery over the temporary table: that one becomes an
    -- intermediate result whose size the shards' planner guesses, and the
    -- UPDATE then read whole shards (a hash join over a sequential scan,
    -- 0.3 to 0.5 s a shard, seen) where the session index finds a few
    -- hundred rows; and Citus sends it only to the sessions' shards.  (Not
    -- for the look-up above: every shard would get every session of the
    -- batch, and over-estimated, scan itself whole in parallel)
    IF on_cluster THEN
        in_stitched := format('= ANY (%L::text[])',
                             ARRAY(SELECT c.session_id FROM ca_stitch_sessions c ORDER BY 1));
        stitch_rows := 'AND f.session_id ' || in_stitched;
    END IF;
    CREATE TEMP TABLE ca_event_changes (new jsonb, old jsonb) ON COMMIT DROP;
    -- One statement, joined on (session_id, event_id), whose windows are
    -- partitioned by the session: on Citus (events by session_id) each
    -- shard stitches its own sessions and updates them, and only the
    -- sessions' ids go out and the changed rows come back.  The old
    -- customer columns are returned beside the new row (to_jsonb() is not
    -- immutable, which Citus wants in RETURNING).
    EXECUTE format($sql$
    WITH upd AS (
        UPDATE fact_event f
        SET customer_key = l.new_key, customer_id = l.new_id, customer_stitched = l.new_id IS NOT NULL
        FROM (SELECT s.session_id, s.event_id, s.customer_key, s.customer_id, s.customer_stitched,
                     max(s.customer_key) FILTER (WHERE s.customer_id IS NOT NULL AND NOT s.customer_stitched)
                         OVER g AS new_key,
                     max(s.customer_id) FILTER (WHERE s.customer_id IS NOT NULL AND NOT s.customer_stitched)
                         OVER g AS new_id
              FROM (SELECT e.session_id, e.event_id, e.customer_key, e.customer_id, e.customer_stitched,
                           count(*) FILTER (WHERE e.customer_id IS NOT NULL AND NOT e.customer_stitched)
                               OVER (PARTITION BY e.session_id ORDER BY e.event_ts DESC, e.event_id DESC
                                     ROWS UNBOUNDED PRECEDING) AS grp
                    FROM fact_event e
                    WHERE e.session_id %s) s
              WINDOW g AS (PARTITION BY s.session_id, s.grp)) l
        WHERE f.session_id = l.session_id AND f.event_id = l.event_id %s
          AND (l.customer_id IS NULL OR l.customer_stitched)
          AND (l.customer_key, l.customer_id, l.customer_stitched)
              IS DISTINCT FROM (l.new_key, l.new_id, l.new_id IS NOT NULL)
        RETURNING f.*, l.customer_key AS was_key, l.customer_id AS was_id, l.customer_stitched AS was_stitched
    )
    -- only the customer columns change: the old row is the new one with theirs
    INSERT INTO ca_event_changes
    SELECT n.new, n.new || jsonb_build_object('customer_key', u.was_key, 'customer_id', u.was_id,
                                              'customer_stitched', u.was_stitched)
    FROM upd u
    CROSS JOIN LATERAL (SELECT to_jsonb(u) - '{was_key,was_id,was_stitched}'::text[] AS new) n
    $sql$, in_stitched, stitch_rows);
    SELECT count(*) INTO n FROM ca_event_changes;
    n := note_event_updates(check_queue('customer_analytics.fact_event', n));
    DROP TABLE ca_stitch_sessions;
    RETURN n;
END
$$;


CREATE OR REPLACE FUNCTION customer_analytics.transform_events(full_refresh boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
-- the batch statements are bound by writes (heap, index entries, WAL), which
-- JIT does not speed up; compiling one cost up to 0.4 s on a 55k-line batch
SET jit = off
AS $$
DECLARE
    saved       event_transform_state;
    w           record;
    own_xid     xid8 := pg_current_xact_id_if_assigned();
    sysid       bigint;
    tz          text := business_timezone();
    cutoff      timestamptz;
    mark        timestamptz;
    modify_mode text;
    first       record;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key('transform_events()'));
    modify_mode := cluster_writes_begin();

    SELECT system_identifier INTO sysid FROM pg_control_system();
    SELECT * INTO saved FROM event_transform_state;
    SELECT * INTO w FROM staged_window(saved.snapshot, saved.system_identifier, sysid, full_refresh);
    IF w.prev IS NOT NULL THEN
        cutoff := saved.watermark - event_lateness();   -- NULL: no limit, or nothing processed yet
    END IF;
    PERFORM stage_event_batch(w.snap, w.prev, w.lo, w.hi, own_xid);

    RETURN QUERY SELECT 'fact_event_too_late',
                        CASE WHEN cutoff IS NULL THEN 0 ELSE hold_back_late_events(cutoff, saved.own_xid) END;
    ANALYZE ca_batch_events (event_id, session_id, customer_id, product_id, event_ts);
    PERFORM ensure_dim_date(min((event_ts AT TIME ZONE tz)::date), max((event_ts AT TIME ZONE tz)::date))
    FROM ca_batch_events;
    -- the versions of the batch's customers, which either loader keys its
    -- events to
    CREATE TEMP TABLE ca_event_customers ON COMMIT DROP AS
    SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT e.customer_id FROM ca_batch_events e
                                          WHERE e.customer_id IS NOT NULL));
    ANALYZE ca_event_customers (customer_id, valid_from, valid_to);

    -- (on Citus the general path, whose statements are written to run
    -- there; LIMIT 1 for Citus, as in load_fact_order_line())
    IF NOT EXISTS (SELECT 1 FROM fact_event LIMIT 1) AND NOT citus_managed('customer_analytics.fact_event') THEN
        SELECT * INTO first FROM load_first_events();
        RETURN QUERY SELECT 'fact_event', first.written;
        RETURN QUERY SELECT 'fact_event_stitched', first.stitched;
    ELSE
        RETURN QUERY SELECT 'fact_event', load_fact_event();
        RETURN QUERY SELECT 'fact_event_stitched', stitch_sessions();
    END IF;
    RETURN QUERY SELECT 'fact_event_late_customers', repair_event_customer_keys();

    IF w.prev IS NULL THEN      -- a full pass: everything staged counts
        SELECT max(b.event_ts) INTO mark FROM ca_batch_events b;
    ELSE
        SELECT GREATEST(saved.watermark, max(b.event_ts)) INTO mark FROM ca_batch_events b;
    END IF;
    IF mark > now() THEN
        mark := now();
    END IF;
    INSERT INTO event_transform_state (singleton, snapshot, own_xid, system_identifier, watermark, last_run_at)
    VALUES (true, w.snap, own_xid, sysid, mark, now())
    ON CONFLICT (singleton) DO UPDATE
        SET snapshot = excluded.snapshot,
            own_xid = excluded.own_xid,
            system_identifier = excluded.system_identifier,
            watermark = excluded.watermark,
            last_run_at = excluded.last_run_at;

    DROP TABLE ca_batch_events, ca_event_customers;
    PERFORM cluster_writes_end(modify_mode);
END
$$;


CREATE OR REPLACE FUNCTION customer_analytics_internal.check_queue(rel regclass, batch bigint)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    first_load boolean;
BEGIN
    IF EXISTS (SELECT FROM customer_analytics_internal.check_change c
               WHERE c.rel = check_queue.rel AND c.op = 'T') THEN
        RETURN false;
    END IF;
    -- a batch of a million rows, or a table's first load (the whole table
    -- is the batch: reading it costs less than queuing every row).  LIMIT
    -- 1: on Citus the subquery of an EXISTS over a distributed table runs
    -- first and whole (every row shipped to the coordinator) unless a
    -- LIMIT goes down to the shards with it; a single node drops it
    EXECUTE format('SELECT NOT EXISTS (SELECT 1 FROM %s LIMIT 1)', rel) INTO first_load;
    IF batch > 1000000 OR first_load THEN
        DELETE FROM customer_analytics_internal.check_change c WHERE c.rel = check_queue.rel;
        INSERT INTO customer_analytics_internal.check_change (rel, op) VALUES (check_queue.rel, 'T');
        RETURN false;
    END IF;
    RETURN true;
END
$$;

-- issue 17: fact_event keyed on (event_id, session_id) on the cluster, the event first, so that the key's index finds an event that changed session (no separate index on event_id)
CREATE OR REPLACE FUNCTION customer_analytics_internal.cluster_layout_plan()
RETURNS TABLE (ordinal integer, table_name regclass, citus_kind text, distribution_column text,
               cluster_key text[])
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM (VALUES
        (1, 'customer_analytics.dim_date'::regclass, 'reference', NULL::text, NULL::text[]),
        (2, 'customer_analytics.dim_product', 'reference', NULL, NULL),
        (3, 'customer_analytics.dim_customer', 'reference', NULL, NULL),
        (4, 'customer_analytics.stg_products', 'reference', NULL, NULL),
        (5, 'customer_analytics.fact_order_line', 'distributed', 'customer_ref',
         '{order_id,line_number,customer_ref}'),
        (6, 'customer_analytics.stg_orders', 'distributed', 'order_id', NULL),
        (7, 'customer_analytics_internal.unknown_member_line', 'distributed', 'customer_ref',
         '{order_id,line_number,customer_ref}'),
        (8, 'customer_analytics.fact_event', 'distributed', 'session_id',
         '{event_id,session_id}'),
        (9, 'customer_analytics.stg_events', 'distributed', 'session_id', NULL),
        (10, 'customer_analytics.stg_customers', 'distributed', 'customer_id', NULL)
    ) AS p (ordinal, table_name, citus_kind, distribution_column, cluster_key)
$$;
COMMENT ON FUNCTION customer_analytics_internal.cluster_layout_plan() IS
    'Internal to distribute(): the tables it converts, in order: reference tables first, then the distributed ones with their distribution column (co-located with the first) and, where the single-node primary key lacks that column, the primary key they get on the cluster (cluster_key)';


CREATE OR REPLACE FUNCTION customer_analytics.distribute(shard_count integer DEFAULT NULL)
RETURNS TABLE (table_name regclass, citus_kind text, distribution_column text, shards integer)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    shards_wanted integer;
    plan record;
    trg record;
    fk record;
    worker record;
    messages text;
    dropped text[] := '{}';
    fks text[] := '{}';
    first_distributed regclass;
    on_coordinator boolean;
    workers bigint;
    -- the statements that take the triggers and foreign keys off and
    -- swap the primary keys for the cluster's, run here and on every worker
    drop_sql text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION 'distribute() needs Citus, and the extension citus is not installed in database %',
                        current_database()
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'distribute() converts the star schema to Citus distributed and reference tables; on a single PostgreSQL server the schema stays as it is and every function works on it.',
                  HINT = 'On a Citus coordinator: CREATE EXTENSION citus, add the workers with citus_add_node(), then call distribute() there.';
    END IF;
    EXECUTE 'SELECT pg_catalog.citus_is_coordinator()' INTO on_coordinator;
    IF NOT on_coordinator THEN
        RAISE EXCEPTION 'distribute() must run on the Citus coordinator, and this node is a worker'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'Only the coordinator holds the metadata that create_distributed_table() changes.',
                  HINT = 'Connect to the coordinator and call customer_analytics.distribute() there.';
    END IF;

    -- a concurrent call waits, then finds the layout done
    LOCK TABLE cluster_layout IN EXCLUSIVE MODE;
    IF EXISTS (SELECT FROM cluster_layout) THEN
        RAISE NOTICE 'the star schema is distributed already (since %)',
                     (SELECT distributed_at FROM cluster_layout)
            USING DETAIL = 'distribute() changed nothing; the rows below are the current layout.';
    ELSE
        EXECUTE 'SELECT count(*) FROM pg_catalog.citus_get_active_worker_nodes()' INTO workers;
        IF workers = 0 THEN
            RAISE EXCEPTION 'distribute() found no active Citus worker node'
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'The shards of the facts would have nowhere to go.',
                      HINT = 'Add the workers with citus_add_node(host, port) (and, for pg_cron and the coordinator''s own queries, citus_set_coordinator_host()), then call distribute() again.';
        END IF;
        IF EXISTS (SELECT FROM cluster_layout_plan() p
                   JOIN pg_dist_partition d ON d.logicalrelid = p.table_name) THEN
            RAISE EXCEPTION 'distribute() found tables of the star schema already converted by hand: %',
                            (SELECT string_agg(qualified_name(p.table_name), ', ' ORDER BY p.ordinal)
                             FROM cluster_layout_plan() p
                             JOIN pg_dist_partition d ON d.logicalrelid = p.table_name)
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'distribute() converts the whole layout at once, from the single-node one, and does not guess what a conversion by hand left.',
                      HINT = 'Undo it with undistribute_table() for each of those tables, then call distribute().';
        END IF;
        shards_wanted := COALESCE(shard_count, current_setting('citus.shard_count')::integer);
        IF shards_wanted < 1 THEN
            RAISE EXCEPTION 'distribute(shard_count => %): the shard count must be at least 1', shard_count
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Leave it out to take citus.shard_count, or give a few shards per worker core.';
        END IF;

        -- the facts' foreign keys, to put back after the conversion
        FOR fk IN
            SELECT qualified_name(c.conrelid::regclass) AS rel, c.conname, pg_get_constraintdef(c.oid) AS def
            FROM pg_constraint c
            WHERE c.contype = 'f'
              AND c.conrelid IN (SELECT p.table_name FROM cluster_layout_plan() p)
            ORDER BY 1, 2
        LOOP
            fks := fks || format('ALTER TABLE %s ADD CONSTRAINT %I %s', fk.rel, fk.conname, fk.def);
        END LOOP;

        drop_sql := '';
        FOR trg IN
            SELECT qualified_name(t.tgrelid::regclass) AS rel, t.tgname, pg_get_triggerdef(t.oid) AS def
            FROM pg_trigger t
            WHERE NOT t.tgisinternal
              AND t.tgrelid IN (SELECT p.table_name FROM cluster_layout_plan() p)
            ORDER BY 1, 2
        LOOP
            dropped := dropped || trg.def;
            drop_sql := drop_sql || format('DROP TRIGGER IF EXISTS %I ON %s;', trg.tgname, trg.rel);
        END LOOP;
        FOR fk IN
            SELECT qualified_name(c.conrelid::regclass) AS rel, c.conname
            FROM pg_constraint c
            WHERE c.contype = 'f'
              AND c.conrelid IN (SELECT p.table_name FROM cluster_layout_plan() p)
            ORDER BY 1, 2
        LOOP
            drop_sql := drop_sql || format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I;', fk.rel, fk.conname);
        END LOOP;
        -- the primary keys swapped for the cluster's (Citus refuses a
        -- unique index without the distribution column), under the same
        -- name; on the workers' copies too, which Citus keeps as the
        -- tables' shells there (dropped and added again: idempotent)
        FOR fk IN
            SELECT qualified_name(p.table_name) AS rel, c.conname,
                   (SELECT string_agg(quote_ident(k), ', ' ORDER BY n) FROM unnest(p.cluster_key) WITH ORDINALITY u (k, n)) AS cols
            FROM cluster_layout_plan() p
            JOIN pg_constraint c ON c.conrelid = p.table_name AND c.contype = 'p'
            WHERE p.cluster_key IS NOT NULL
            ORDER BY p.ordinal
        LOOP
            drop_sql := drop_sql || format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I;', fk.rel, fk.conname)
                                 || format('ALTER TABLE %s ADD CONSTRAINT %I PRIMARY KEY (%s);', fk.rel, fk.conname, fk.cols);
        END LOOP;

        -- the workers first: a failure there leaves this node untouched,
        -- and the statements are idempotent, so a second call finishes
        IF drop_sql <> '' THEN
            FOR worker IN
                SELECT r.nodename, r.nodeport, r.result
                FROM run_command_on_workers(format('DO %L', 'BEGIN ' || drop_sql || ' END')) r
                WHERE NOT r.success
            LOOP
                RAISE EXCEPTION 'distribute() could not take the triggers and foreign keys off the star schema on worker %:%',
                                worker.nodename, worker.nodeport
                    USING ERRCODE = 'object_not_in_prerequisite_state',
                          DETAIL = worker.result,
                          HINT = 'Make the worker reachable from the coordinator (citus.node_conninfo, pg_hba.conf) and call distribute() again: what it did so far is done again harmlessly.';
            END LOOP;
            EXECUTE drop_sql;
        END IF;

        -- one connection per worker: the dimensions' foreign keys and the
        -- reference tables are then created in this one transaction
        PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);
        -- Citus's notices about copying the rows and the shell's data
        -- (which is truncated here) would only confuse
        messages := current_setting('client_min_messages');
        PERFORM set_config('client_min_messages', 'warning', true);
        FOR plan IN SELECT * FROM cluster_layout_plan() p ORDER BY p.ordinal LOOP
            IF plan.citus_kind = 'reference' THEN
                PERFORM create_reference_table(plan.table_name);
            ELSIF first_distributed IS NULL THEN
                PERFORM create_distributed_table(plan.table_name, plan.distribution_column,
                                                 shard_count => shards_wanted, colocate_with => 'none');
                first_distributed := plan.table_name;
            ELSE
                PERFORM create_distributed_table(plan.table_name, plan.distribution_column,
                                                 colocate_with => first_distributed::text);
            END IF;
            -- the rows now live in the shards: the shell keeps none
            PERFORM truncate_local_data_after_distributing_table(plan.table_name);
        END LOOP;
        PERFORM set_config('client_min_messages', messages, true);
        FOR i IN 1 .. coalesce(array_length(fks, 1), 0) LOOP
            EXECUTE fks[i];
        END LOOP;

        INSERT INTO cluster_layout (distributed_at, shard_count, dropped_triggers)
        VALUES (clock_timestamp(), shards_wanted, dropped);
        -- what the dropped triggers would have queued: everything, once
        INSERT INTO rfm_dirty_customer VALUES (NULL) ON CONFLICT DO NOTHING;
        INSERT INTO sales_dirty_day VALUES ('-infinity') ON CONFLICT DO NOTHING;
    END IF;

    RETURN QUERY
    SELECT p.table_name, p.citus_kind, p.distribution_column,
           (SELECT count(*)::integer FROM pg_dist_shard s WHERE s.logicalrelid = p.table_name)
    FROM cluster_layout_plan() p
    ORDER BY p.ordinal;
END
$$;
COMMENT ON FUNCTION customer_analytics.distribute(integer) IS
    'On a Citus coordinator: converts the installed (possibly loaded) star schema to its distributed layout (order facts and their repair queue by customer_ref, keyed on (order_id, line_number, customer_ref); events and their staging by session_id, fact_event keyed on (event_id, session_id); staged lines by order_id, staged customers by customer_id; all co-located; dimensions as reference tables; the rest local) and returns the layout; a second call changes nothing; refused where Citus is absent or on a worker';

-- every emptiness probe through has_rows(), whose LIMIT keeps Citus from shipping every row of a distributed table to the coordinator
CREATE FUNCTION customer_analytics_internal.has_rows(rel regclass)
RETURNS boolean
LANGUAGE plpgsql STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    found boolean;
BEGIN
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s LIMIT 1)', rel) INTO found;
    RETURN found;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.has_rows(regclass) IS
    'Internal: whether a table holds a row, read so that Citus asks each shard for one row at most (an EXISTS over a distributed table without a LIMIT ships every row to the coordinator)';


CREATE OR REPLACE FUNCTION customer_analytics_internal.defer_fact_indexes(fact regclass, batch bigint)
RETURNS text[]
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    defs text[];
    idx record;
BEGIN
    IF batch < 10000 OR customer_analytics_internal.citus_managed(fact)
       OR NOT pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = fact), 'USAGE') THEN
        RETURN NULL;
    END IF;
    IF customer_analytics_internal.has_rows(fact) THEN
        RETURN NULL;
    END IF;
    FOR idx IN
        SELECT i.indexrelid::regclass AS name, pg_get_indexdef(i.indexrelid) AS def
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        WHERE i.indrelid = fact AND NOT i.indisunique AND i.indisvalid
          AND c.reltablespace = 0
          AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
          AND NOT EXISTS (SELECT 1 FROM pg_description d WHERE d.objoid = i.indexrelid)
        ORDER BY i.indexrelid
    LOOP
        EXECUTE format('DROP INDEX %s', idx.name);
        defs := defs || idx.def;
    END LOOP;
    RETURN defs;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.defer_fact_indexes(regclass, bigint) IS
    'Internal to transform(): before a first load of 10,000 rows or more into an empty fact table it owns (not on Citus), drops the table''s secondary indexes and returns their definitions for restore_fact_indexes(); NULL when it drops none';


CREATE OR REPLACE FUNCTION customer_analytics_internal.load_fact_order_line()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    tz text := business_timezone();
    batch bigint;
    added bigint;
    changed bigint := 0;
    detail boolean;
    fast boolean;
    line_queue boolean := true;
    deferred text[];
    on_cluster boolean := citus_managed('customer_analytics.fact_order_line');
    conflict text;
    filled boolean := customer_analytics_internal.has_rows('customer_analytics.fact_order_line');
BEGIN
    CREATE TEMP TABLE ca_customer_lookup ON COMMIT DROP AS
    SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT o.customer_id FROM ca_batch_orders o
                                          WHERE o.customer_id IS NOT NULL));
    ANALYZE ca_customer_lookup (customer_id, valid_from, valid_to);

    CREATE TEMP TABLE ca_order_lines ON COMMIT DROP AS
    SELECT s.order_id, s.line_number,
           COALESCE(c.customer_key, -1) AS customer_key,
           COALESCE(p.product_key, -1) AS product_key,
           date_key((s.order_ts AT TIME ZONE tz)::date) AS date_key,
           s.order_ts, s.quantity, s.unit_price, s.discount, s.status, s.channel,
           s.updated_at, s.stage_id, s.load_id, s.customer_id, s.product_id,
           order_customer_ref(s.customer_id, s.order_id) AS customer_ref,
           (s.customer_id IS NOT NULL AND c.customer_key IS NULL)
           OR (s.product_id IS NOT NULL AND p.product_key IS NULL) AS unresolved,
           false AS moving
    FROM ca_batch_orders s
    LEFT JOIN ca_customer_lookup c
           ON c.customer_id = s.customer_id AND s.order_ts >= c.valid_from AND s.order_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id;
    DROP TABLE ca_customer_lookup;
    SELECT count(*) INTO batch FROM ca_order_lines;
    detail := check_queue('customer_analytics.fact_order_line', batch);
    deferred := defer_fact_indexes('customer_analytics.fact_order_line', batch);

    /*
     * On a cluster the facts are distributed by customer_ref and keyed on
     * (order_id, line_number, customer_ref) (docs/scaling.md): a line
     * staged again under another customer conflicts with nothing there and
     * would become a second row on another shard.  Those lines are set
     * apart (moving) and moved below, deleted from the old shard and
     * inserted on the new one.
     */
    IF on_cluster AND filled THEN
        WITH r AS MATERIALIZED (
            SELECT b.order_id, b.line_number FROM ca_order_lines b
        ), there AS MATERIALIZED (
            SELECT f.order_id, f.line_number, f.customer_ref FROM fact_order_line f
            WHERE (f.order_id, f.line_number) IN (SELECT r.order_id, r.line_number FROM r)
        )
        UPDATE ca_order_lines b SET moving = true
        FROM there t
        WHERE t.order_id = b.order_id AND t.line_number = b.line_number AND t.customer_ref <> b.customer_ref;
    END IF;

    -- (session_replication_role is set here, not in a function with SET
    -- clauses of its own, which would undo it on return; this function's
    -- own SET clauses undo it on return or error)
    fast := fact_bulk_write_ok('customer_analytics.fact_order_line');
    IF fast THEN
        PERFORM set_config('session_replication_role', 'replica', true);
    END IF;
    -- new lines are usually new orders: queued to be added to their
    -- customers' RFM inputs without a recompute.  With no rollup yet the
    -- next refresh builds it from the facts whatever is queued: one mark
    -- that everyone is due (NULL) instead of a row per line
    IF NOT EXISTS (SELECT FROM customer_analytics.rfm_rollup_customer) THEN
        INSERT INTO rfm_dirty_customer VALUES (NULL) ON CONFLICT DO NOTHING;
        line_queue := false;
    END IF;
    -- Into an empty table (a first load) the lines go in without ON
    -- CONFLICT: nothing can conflict (the batch has one row per line, and
    -- transform() runs alone), and the arbiter's check before every insert
    -- costs a plain load 30% to 80% more
    IF filled THEN
        conflict := CASE WHEN on_cluster THEN 'ON CONFLICT (order_id, line_number, customer_ref) DO NOTHING'
                         ELSE 'ON CONFLICT (order_id, line_number) DO NOTHING' END;
    END IF;
    EXECUTE format($sql$
    WITH written AS (
        INSERT INTO fact_order_line AS f
            (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity,
             unit_price, discount, status, channel, updated_at, stage_id, load_id, customer_ref)
        SELECT r.order_id, r.line_number, r.customer_key, r.product_key, r.date_key,
               r.order_ts, r.quantity, r.unit_price, r.discount, r.status, r.channel,
               r.updated_at, r.stage_id, r.load_id, r.customer_ref
        FROM ca_order_lines r
        WHERE NOT r.moving
        %s
        RETURNING f.order_id, f.line_number, f.customer_key, f.date_key, f.order_ts, f.quantity,
                  f.revenue, f.status
    ), rfm AS (
        INSERT INTO rfm_new_line (customer_id, order_id, line_number, order_ts, revenue, purchase)
        SELECT c.customer_id, w.order_id, w.line_number, w.order_ts, w.revenue,
               w.status = 'completed' AND w.customer_key <> -1 AND (w.quantity > 0 OR w.revenue <> 0)
        FROM written w JOIN dim_customer c USING (customer_key)
        WHERE $1
    ), days AS (
        INSERT INTO sales_dirty_day
        SELECT DISTINCT d.date FROM (SELECT DISTINCT w.date_key FROM written w) k JOIN dim_date d USING (date_key)
        ON CONFLICT DO NOTHING
    ), checked AS (
        INSERT INTO check_change (rel, op, key)
        SELECT 'customer_analytics.fact_order_line'::regclass, 'n',
               jsonb_build_object('order_id', w.order_id, 'line_number', w.line_number)
        FROM written w WHERE $2
    )
    SELECT count(*) FROM written
    $sql$, conflict)
    INTO added USING line_queue, detail;
    IF fast THEN
        PERFORM set_config('session_replication_role', 'origin', true);
        PERFORM check_order_line_keys();
    END IF;
    PERFORM restore_fact_indexes(deferred);

    -- lines already in the facts: a later staged version that differs wins.
    -- (The batch and the old rows are materialised in CTEs, and the UPDATE
    -- returns its rows as they are: so Citus can run it on the distributed
    -- facts, which it may not join to a temporary table, nor return a
    -- function of.  Citus refuses to SET the distribution column even to
    -- its own value: on a cluster customer_ref changes by a move only.)
    IF added < batch THEN
        CREATE TEMP TABLE ca_line_changes (new jsonb, old jsonb) ON COMMIT DROP;
        EXECUTE format($sql$
        WITH r AS MATERIALIZED (
            SELECT * FROM ca_order_lines WHERE NOT moving
        ), was AS MATERIALIZED (
            SELECT f.* FROM fact_order_line f
            WHERE (f.order_id, f.line_number) IN (SELECT r.order_id, r.line_number FROM r)
        ), upd AS (
            UPDATE fact_order_line f
            SET customer_key = r.customer_key, product_key = r.product_key,
                date_key = r.date_key, order_ts = r.order_ts,
                quantity = r.quantity, unit_price = r.unit_price,
                discount = r.discount, status = r.status,
                channel = r.channel, updated_at = r.updated_at,
                stage_id = r.stage_id, load_id = r.load_id %s
            FROM r
            WHERE f.order_id = r.order_id AND f.line_number = r.line_number
              AND r.stage_id > f.stage_id
              AND (f.customer_key, f.product_key, f.order_ts, f.quantity, f.unit_price,
                   f.discount, f.status, f.channel, f.updated_at, f.customer_ref)
                  IS DISTINCT FROM
                  (r.customer_key, r.product_key, r.order_ts, r.quantity,
                   r.unit_price, r.discount, r.status, r.channel, r.updated_at, r.customer_ref)
            RETURNING f.*
        )
        INSERT INTO ca_line_changes
        SELECT to_jsonb(u), to_jsonb(w) FROM upd u JOIN was w USING (order_id, line_number)
        $sql$, CASE WHEN NOT on_cluster THEN ', customer_ref = r.customer_ref' END);
        IF on_cluster THEN
            PERFORM move_order_lines();
        END IF;
        changed := note_order_line_updates(detail);
    END IF;

    -- the lines of this batch a later dimension row may repair (a batch
    -- line that did resolve leaves the queue)
    IF NOT citus_managed('customer_analytics_internal.unknown_member_line') THEN
        MERGE INTO unknown_member_line q
        USING ca_order_lines b
        ON q.order_id = b.order_id AND q.line_number = b.line_number
        WHEN MATCHED AND NOT b.unresolved THEN DELETE
        WHEN MATCHED THEN UPDATE SET customer_id = b.customer_id, product_id = b.product_id,
                                     customer_ref = b.customer_ref
        WHEN NOT MATCHED AND b.unresolved THEN
            INSERT (order_id, line_number, customer_id, product_id, customer_ref)
            VALUES (b.order_id, b.line_number, b.customer_id, b.product_id, b.customer_ref);
    ELSE
        -- the same in two statements: Citus does not MERGE a temporary
        -- table into a distributed one.  A line that moved to another
        -- customer leaves its old shard's queue, as its fact did
        WITH b AS MATERIALIZED (
            SELECT b.order_id, b.line_number, b.customer_ref, b.unresolved FROM ca_order_lines b
        )
        DELETE FROM unknown_member_line q
        USING b
        WHERE q.order_id = b.order_id AND q.line_number = b.line_number
          AND (NOT b.unresolved OR q.customer_ref <> b.customer_ref);
        INSERT INTO unknown_member_line AS q (order_id, line_number, customer_id, product_id, customer_ref)
        SELECT b.order_id, b.line_number, b.customer_id, b.product_id, b.customer_ref
        FROM ca_order_lines b
        WHERE b.unresolved
        ON CONFLICT (order_id, line_number, customer_ref) DO UPDATE
            SET customer_id = excluded.customer_id, product_id = excluded.product_id;
    END IF;
    DROP TABLE ca_order_lines;
    RETURN added + changed;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.load_fact_order_line() IS
    'Internal to transform(): the batch''s order lines into fact_order_line (upsert on order and line, the latest staged version wins, unknown members for missing keys); returns the rows written';


CREATE OR REPLACE FUNCTION customer_analytics.transform(full_refresh boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
-- the batch statements are bound by writes (heap, index entries, WAL), which
-- JIT does not speed up; compiling one cost up to 0.4 s on a 55k-line batch
SET jit = off
AS $$
DECLARE
    saved       transform_state;
    w           record;
    sysid       bigint;
    tz          text := business_timezone();
    products    bigint;
    customers   bigint;
    unknown_before boolean;
    modify_mode text;
BEGIN
    -- one transform at a time; the second waits, then sees the first's work
    PERFORM pg_advisory_xact_lock(lock_key('transform()'));
    modify_mode := cluster_writes_begin();

    SELECT system_identifier INTO sysid FROM pg_control_system();
    SELECT * INTO saved FROM transform_state;
    SELECT * INTO w FROM staged_window(saved.snapshot, saved.system_identifier, sysid, full_refresh);
    PERFORM stage_order_batch(w.snap, w.prev, w.lo, w.hi, pg_current_xact_id_if_assigned());

    products := load_dim_product();
    customers := load_dim_customer();
    RETURN QUERY VALUES ('dim_product', products), ('dim_customer', customers);
    RETURN QUERY SELECT 'dim_date', ensure_dim_date(min(d), max(d))
                 FROM (SELECT (order_ts AT TIME ZONE tz)::date AS d FROM ca_batch_orders) days;

    /*
     * Lines already pointing at an unknown member before this run are the
     * only ones the repair of late-arriving dimensions can change (the lines
     * this run writes are looked up in the dimensions as they now are), and
     * only if this run added dimension rows.
     */
    unknown_before := products + customers > 0
                      AND has_rows('customer_analytics_internal.unknown_member_line');
    RETURN QUERY SELECT 'fact_order_line', load_fact_order_line();
    RETURN QUERY SELECT 'late_dimension_fixes',
                        CASE WHEN unknown_before THEN repair_order_line_keys() ELSE 0 END;

    INSERT INTO transform_state (singleton, snapshot, system_identifier, last_run_at)
    VALUES (true, w.snap, sysid, now())
    ON CONFLICT (singleton) DO UPDATE
        SET snapshot = excluded.snapshot,
            system_identifier = excluded.system_identifier,
            last_run_at = excluded.last_run_at;

    DROP TABLE ca_batch_products, ca_batch_customers, ca_batch_orders;

    /* clickstream events: their own snapshot, so refresh_clickstream() can run them alone */
    RETURN QUERY SELECT * FROM transform_events(full_refresh);
    PERFORM cluster_writes_end(modify_mode);
END
$$;
COMMENT ON FUNCTION customer_analytics.transform(boolean) IS
    'Move staged rows into the star schema: products (SCD1), customers (SCD2), calendar, order lines and events (upsert on natural keys, newer versions win, unknown members for missing keys, late-arriving dimensions repaired). Incremental: only rows staged since the last run; full_refresh => true reprocesses all staged rows (safe: idempotent). Events go through transform_events(). Returns the rows written per step';


CREATE OR REPLACE FUNCTION customer_analytics_internal.load_fact_event()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    tz text := business_timezone();
    batch bigint;
    added bigint;
    moved bigint := 0;
    changed bigint := 0;
    detail boolean;
    on_cluster boolean := citus_managed('customer_analytics.fact_event');
BEGIN
    CREATE TEMP TABLE ca_event_rows ON COMMIT DROP AS
    SELECT s.event_id, s.event_ts, date_key((s.event_ts AT TIME ZONE tz)::date) AS date_key,
           CASE WHEN s.customer_id IS NULL THEN NULL
                ELSE COALESCE(c.customer_key, -1) END AS customer_key,
           s.customer_id, s.session_id, s.event_type,
           CASE WHEN s.product_id IS NULL THEN NULL ELSE COALESCE(p.product_key, -1) END AS product_key,
           s.order_id, s.channel, s.device, s.stage_id, s.load_id
    FROM ca_batch_events s
    LEFT JOIN ca_event_customers c
           ON c.customer_id = s.customer_id AND s.event_ts >= c.valid_from AND s.event_ts < c.valid_to
    LEFT JOIN dim_product p ON p.product_id = s.product_id;
    SELECT count(*) INTO batch FROM ca_event_rows;
    detail := check_queue('customer_analytics.fact_event', batch);
    CREATE TEMP TABLE ca_event_changes (new jsonb, old jsonb) ON COMMIT DROP;

    IF on_cluster THEN
        -- where each event of the batch is now, if anywhere
        CREATE TEMP TABLE ca_event_placed ON COMMIT DROP AS
        WITH r AS MATERIALIZED (
            SELECT r.event_id FROM ca_event_rows r
        )
        SELECT f.event_id, f.session_id, f.stage_id
        FROM fact_event f WHERE f.event_id IN (SELECT r.event_id FROM r);
        -- an older version than the row under another session: nothing to write
        DELETE FROM ca_event_rows r
        USING ca_event_placed p
        WHERE p.event_id = r.event_id AND p.session_id <> r.session_id AND r.stage_id <= p.stage_id;
        -- a newer one: the old row goes (from its old session's shard) ...
        CREATE TEMP TABLE ca_event_moved (event_id text, old jsonb) ON COMMIT DROP;
        WITH m AS MATERIALIZED (
            SELECT p.session_id, p.event_id
            FROM ca_event_placed p JOIN ca_event_rows r USING (event_id)
            WHERE p.session_id <> r.session_id
        ), gone AS (
            DELETE FROM fact_event f
            USING m
            WHERE f.session_id = m.session_id AND f.event_id = m.event_id
            RETURNING f.*
        )
        INSERT INTO ca_event_moved SELECT g.event_id, to_jsonb(g) FROM gone g;
        -- ... and its new version is inserted on the new one
        WITH m AS MATERIALIZED (
            SELECT r.*, m.old
            FROM ca_event_rows r JOIN ca_event_moved m USING (event_id)
        ), ins AS (
            INSERT INTO fact_event AS f
                (event_id, event_ts, date_key, customer_key, customer_id, customer_stitched, session_id,
                 event_type, product_key, order_id, channel, device, stage_id, load_id)
            SELECT m.event_id, m.event_ts, m.date_key, m.customer_key, m.customer_id, false, m.session_id,
                   m.event_type, m.product_key, m.order_id, m.channel, m.device, m.stage_id, m.load_id
            FROM m
            RETURNING f.*
        )
        INSERT INTO ca_event_changes
        SELECT to_jsonb(i), m.old FROM ins i JOIN m USING (event_id);
        GET DIAGNOSTICS moved = ROW_COUNT;
        DELETE FROM ca_event_rows r USING ca_event_moved m WHERE m.event_id = r.event_id;
        DROP TABLE ca_event_placed, ca_event_moved;
    END IF;

    -- into an empty table (a first load) without ON CONFLICT, as the
    -- order lines (load_fact_order_line); on Citus the key holds the
    -- session
    EXECUTE format($sql$
    WITH written AS (
        INSERT INTO fact_event AS f
            (event_id, event_ts, date_key, customer_key, customer_id, customer_stitched, session_id,
             event_type, product_key, order_id, channel, device, stage_id, load_id)
        SELECT r.event_id, r.event_ts, r.date_key, r.customer_key, r.customer_id, false, r.session_id,
               r.event_type, r.product_key, r.order_id, r.channel, r.device, r.stage_id, r.load_id
        FROM ca_event_rows r
        %s
        RETURNING f.event_id, f.event_ts, f.customer_id, f.session_id
    ), queued AS (
        INSERT INTO clickstream_change (visitor, since)
        SELECT visitor(w.customer_id, w.session_id), min(w.event_ts) FROM written w GROUP BY 1
    ), checked AS (
        INSERT INTO check_change (rel, op, key)
        SELECT 'customer_analytics.fact_event'::regclass, 'n', jsonb_build_object('event_id', w.event_id)
        FROM written w WHERE $1
    )
    SELECT count(*) FROM written
    $sql$, CASE WHEN on_cluster THEN 'ON CONFLICT (session_id, event_id) DO NOTHING'
                WHEN has_rows('customer_analytics.fact_event') THEN 'ON CONFLICT (event_id) DO NOTHING' END)
    INTO added USING detail;

    -- events already in the facts: a later staged version that differs wins
    IF added + moved < batch THEN
        -- (in CTEs, for Citus, as the order lines' update; there, an event
        -- that changed session was moved above, and Citus refuses a SET of
        -- the distribution column even to its own value)
        EXECUTE format($sql$
        WITH r AS MATERIALIZED (
            SELECT * FROM ca_event_rows
        ), was AS MATERIALIZED (
            SELECT f.* FROM fact_event f WHERE f.event_id IN (SELECT r.event_id FROM r)
        ), upd AS (
            UPDATE fact_event f
            SET event_ts = r.event_ts, date_key = r.date_key,
                customer_key = r.customer_key, customer_id = r.customer_id,
                customer_stitched = false, %s
                event_type = r.event_type, product_key = r.product_key,
                order_id = r.order_id, channel = r.channel,
                device = r.device, stage_id = r.stage_id, load_id = r.load_id
            FROM r
            WHERE f.event_id = r.event_id %s
              AND r.stage_id > f.stage_id
              AND (f.event_ts, f.customer_key, f.customer_id, f.customer_stitched, f.session_id,
                   f.event_type, f.product_key, f.order_id, f.channel, f.device)
                  IS DISTINCT FROM
                  (r.event_ts, r.customer_key, r.customer_id, false,
                   r.session_id, r.event_type, r.product_key,
                   r.order_id, r.channel, r.device)
            RETURNING f.*
        )
        INSERT INTO ca_event_changes
        SELECT to_jsonb(u), to_jsonb(w) FROM upd u JOIN was w USING (event_id)
        $sql$, CASE WHEN NOT on_cluster THEN 'session_id = r.session_id,' END,
               CASE WHEN on_cluster THEN 'AND f.session_id = r.session_id' END);
    END IF;
    changed := note_event_updates(detail);
    DROP TABLE ca_event_rows;
    RETURN added + changed;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.load_fact_event() IS
    'Internal to transform_events(): the batch''s events into fact_event (upsert on event_id, the latest staged version wins; anonymous stays NULL, an unknown customer is -1; on Citus an event that changed session is moved to its new session''s shard); returns the rows written';


CREATE OR REPLACE FUNCTION customer_analytics.transform_events(full_refresh boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
-- the batch statements are bound by writes (heap, index entries, WAL), which
-- JIT does not speed up; compiling one cost up to 0.4 s on a 55k-line batch
SET jit = off
AS $$
DECLARE
    saved       event_transform_state;
    w           record;
    own_xid     xid8 := pg_current_xact_id_if_assigned();
    sysid       bigint;
    tz          text := business_timezone();
    cutoff      timestamptz;
    mark        timestamptz;
    modify_mode text;
    first       record;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key('transform_events()'));
    modify_mode := cluster_writes_begin();

    SELECT system_identifier INTO sysid FROM pg_control_system();
    SELECT * INTO saved FROM event_transform_state;
    SELECT * INTO w FROM staged_window(saved.snapshot, saved.system_identifier, sysid, full_refresh);
    IF w.prev IS NOT NULL THEN
        cutoff := saved.watermark - event_lateness();   -- NULL: no limit, or nothing processed yet
    END IF;
    PERFORM stage_event_batch(w.snap, w.prev, w.lo, w.hi, own_xid);

    RETURN QUERY SELECT 'fact_event_too_late',
                        CASE WHEN cutoff IS NULL THEN 0 ELSE hold_back_late_events(cutoff, saved.own_xid) END;
    ANALYZE ca_batch_events (event_id, session_id, customer_id, product_id, event_ts);
    PERFORM ensure_dim_date(min((event_ts AT TIME ZONE tz)::date), max((event_ts AT TIME ZONE tz)::date))
    FROM ca_batch_events;
    -- the versions of the batch's customers, which either loader keys its
    -- events to
    CREATE TEMP TABLE ca_event_customers ON COMMIT DROP AS
    SELECT * FROM customer_versions(ARRAY(SELECT DISTINCT e.customer_id FROM ca_batch_events e
                                          WHERE e.customer_id IS NOT NULL));
    ANALYZE ca_event_customers (customer_id, valid_from, valid_to);

    -- (on Citus the general path, whose statements are written to run
    -- there)
    IF NOT has_rows('customer_analytics.fact_event') AND NOT citus_managed('customer_analytics.fact_event') THEN
        SELECT * INTO first FROM load_first_events();
        RETURN QUERY SELECT 'fact_event', first.written;
        RETURN QUERY SELECT 'fact_event_stitched', first.stitched;
    ELSE
        RETURN QUERY SELECT 'fact_event', load_fact_event();
        RETURN QUERY SELECT 'fact_event_stitched', stitch_sessions();
    END IF;
    RETURN QUERY SELECT 'fact_event_late_customers', repair_event_customer_keys();

    IF w.prev IS NULL THEN      -- a full pass: everything staged counts
        SELECT max(b.event_ts) INTO mark FROM ca_batch_events b;
    ELSE
        SELECT GREATEST(saved.watermark, max(b.event_ts)) INTO mark FROM ca_batch_events b;
    END IF;
    IF mark > now() THEN
        mark := now();
    END IF;
    INSERT INTO event_transform_state (singleton, snapshot, own_xid, system_identifier, watermark, last_run_at)
    VALUES (true, w.snap, own_xid, sysid, mark, now())
    ON CONFLICT (singleton) DO UPDATE
        SET snapshot = excluded.snapshot,
            own_xid = excluded.own_xid,
            system_identifier = excluded.system_identifier,
            watermark = excluded.watermark,
            last_run_at = excluded.last_run_at;

    DROP TABLE ca_batch_events, ca_event_customers;
    PERFORM cluster_writes_end(modify_mode);
END
$$;
COMMENT ON FUNCTION customer_analytics.transform_events(boolean) IS
    'The clickstream part of transform(), on its own snapshot: newly staged events into fact_event (upsert on event_id, the latest staged version wins), anonymous events stitched to the next identified event of their session, events of late-arriving customers re-pointed. Events older than the watermark minus customer_analytics.event_lateness are left staged, counted and alerted (a full refresh loads them). Returns the rows written per step';


CREATE OR REPLACE FUNCTION customer_analytics_internal.check_queue(rel regclass, batch bigint)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    first_load boolean;
BEGIN
    IF EXISTS (SELECT FROM customer_analytics_internal.check_change c
               WHERE c.rel = check_queue.rel AND c.op = 'T') THEN
        RETURN false;
    END IF;
    -- a batch of a million rows, or a table's first load (the whole table
    -- is the batch: reading it costs less than queuing every row)
    first_load := NOT customer_analytics_internal.has_rows(rel);
    IF batch > 1000000 OR first_load THEN
        DELETE FROM customer_analytics_internal.check_change c WHERE c.rel = check_queue.rel;
        INSERT INTO customer_analytics_internal.check_change (rel, op) VALUES (check_queue.rel, 'T');
        RETURN false;
    END IF;
    RETURN true;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.check_queue(regclass, bigint) IS
    'Internal: whether a writer of the extension queues the rows of a batch it writes into a table in check_change row by row (false: the table is due for a whole check, queued here for a batch of more than a million rows or a table''s first load)';


CREATE OR REPLACE FUNCTION customer_analytics.refresh_customer_rfm(full_refresh boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    ids text[];
    everyone boolean;
    as_of timestamptz := customer_analytics.reference_time();
    map text := COALESCE(NULLIF(current_setting('customer_analytics.rfm_segment_map', true), ''), 'default');
    redo bigint;
    rounds integer := 0;
    later boolean;
    changed bigint;
BEGIN
    -- one maintainer at a time; readers never wait
    PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('refresh_customer_rfm()'));
    IF (SELECT count(*) FROM customer_analytics.rfm_segment_cells(map)) <> 125 THEN
        RAISE EXCEPTION 'RFM segment map "%" does not name all 125 cells', map
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('See SELECT * FROM customer_analytics.rfm_check_segment_map(%L);', map);
    END IF;
    LOOP
        rounds := rounds + 1;
        -- take the noted customers (those noted by transactions still running stay for next time)
        WITH taken AS (DELETE FROM customer_analytics_internal.rfm_dirty_customer RETURNING customer_id)
        SELECT array_agg(customer_id) FILTER (WHERE customer_id IS NOT NULL), bool_or(customer_id IS NULL)
        INTO ids, everyone FROM taken;
        -- (the subqueries select a column: Citus plans no EXISTS without)
        IF full_refresh OR everyone
           OR (NOT EXISTS (SELECT 1 FROM customer_analytics.rfm_rollup_customer)
               AND customer_analytics_internal.has_rows('customer_analytics.fact_order_line')) THEN
            DELETE FROM customer_analytics.rfm_rollup_customer;
            ids := NULL;
            everyone := true;
            full_refresh := false;
        ELSIF ids IS NOT NULL THEN
            DELETE FROM customer_analytics.rfm_rollup_customer WHERE customer_id IN (SELECT unnest(ids));
        END IF;
        -- The queued lines these statements see are in the facts they
        -- read: they are consumed here, not added again below.
        IF everyone THEN
            WITH consumed AS (
                DELETE FROM customer_analytics_internal.rfm_new_line
            )
            INSERT INTO customer_analytics.rfm_rollup_customer (customer_id, customer_key, last_order, frequency, monetary)
            SELECT r.customer_id, r.customer_key, r.last_order, r.frequency, r.monetary
            FROM customer_analytics_internal.rfm_rollup_rows('infinity') r;
        ELSIF ids IS NOT NULL THEN
            -- a few customers: their lines through the indexes (the
            -- query of rfm_orders(ids, 'infinity') written out: Citus
            -- inlines no SQL function over a distributed table, and runs
            -- none with parameters; on one node the plan is the same)
            WITH consumed AS (
                DELETE FROM customer_analytics_internal.rfm_new_line q
                WHERE q.customer_id IN (SELECT unnest(ids))
            )
            INSERT INTO customer_analytics.rfm_rollup_customer (customer_id, customer_key, last_order, frequency, monetary)
            SELECT o.customer_id, cur.customer_key, (o.s).last_order, (o.s).frequency, (o.s).monetary
            FROM (SELECT x.customer_id, customer_analytics.rfm_agg(x.ts, x.amount) AS s
                  FROM (SELECT c.customer_id, max(fl.order_ts) AS ts, sum(fl.revenue) AS amount
                        FROM customer_analytics.fact_order_line fl
                        JOIN customer_analytics.dim_customer c ON c.customer_key = fl.customer_key
                        WHERE fl.status = 'completed' AND c.customer_key <> -1
                          AND (fl.quantity > 0 OR fl.revenue <> 0)
                          AND c.customer_id IN (SELECT unnest(ids))
                        GROUP BY c.customer_id, fl.order_id,
                                 CASE WHEN fl.revenue < 0 THEN fl.line_number END) x
                  GROUP BY x.customer_id) o
            LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = o.customer_id AND cur.is_current
                                                         AND cur.customer_key <> -1;
        END IF;

        -- new orders are added to their customers' rows; an order that had
        -- lines before (its line count in the facts is larger) is not new:
        -- its customers are recomputed in the next round
        WITH taken AS (
            DELETE FROM customer_analytics_internal.rfm_new_line RETURNING *
        ), queued AS (
            SELECT t.order_id, count(*) AS n FROM taken t GROUP BY t.order_id
        ), orders AS (
            -- the facts' lines counted in a join, not a subquery per order:
            -- Citus plans no correlated subquery next to a CTE
            SELECT q.order_id, q.n = COALESCE(f.n, 0) AS whole
            FROM queued q
            LEFT JOIN (SELECT f.order_id, count(*) AS n FROM customer_analytics.fact_order_line f
                       WHERE f.order_id IN (SELECT order_id FROM queued)
                       GROUP BY f.order_id) f USING (order_id)
        ), noted AS (
            INSERT INTO customer_analytics_internal.rfm_dirty_customer
            SELECT DISTINCT t.customer_id FROM taken t JOIN orders o USING (order_id) WHERE NOT o.whole
            ON CONFLICT DO NOTHING
            RETURNING 1
        ), per_order AS (            -- grouped as above
            SELECT t.customer_id, max(t.order_ts) AS ts, sum(t.revenue) AS amount
            FROM taken t JOIN orders o USING (order_id)
            WHERE o.whole AND t.purchase
            GROUP BY t.customer_id, t.order_id, CASE WHEN t.revenue < 0 THEN t.line_number END
        ), added AS (
            INSERT INTO customer_analytics.rfm_rollup_customer AS u (customer_id, customer_key, last_order, frequency, monetary)
            SELECT p.customer_id, cur.customer_key, (p.s).last_order, (p.s).frequency, (p.s).monetary
            FROM (SELECT customer_id, customer_analytics.rfm_agg(ts, amount) AS s FROM per_order GROUP BY customer_id) p
            LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = p.customer_id AND cur.is_current
                                                         AND cur.customer_key <> -1
            ON CONFLICT (customer_id) DO UPDATE
                SET last_order = greatest(u.last_order, excluded.last_order),
                    frequency = u.frequency + excluded.frequency,
                    monetary = u.monetary + excluded.monetary
            RETURNING 1
        )
        SELECT count(*) FROM noted INTO redo;   -- (added runs all the same)
        EXIT WHEN redo = 0 OR rounds >= 10;
    END LOOP;

    -- lines later than as_of (an as_of in the past) are not in rfm(as_of):
    -- then the scores come from the facts
    -- (the last purchase as of then from the same C scan of the inputs)
    later := EXISTS (SELECT 1 FROM customer_analytics.fact_order_line WHERE order_ts > as_of);
    WITH scored AS (
        SELECT s.*, p.last_order AS last_purchase
        FROM customer_analytics.rfm(as_of) s
        JOIN customer_analytics_internal.rfm_rollup_rows(as_of) p ON p.customer_id = s.customer_id
        WHERE later
        UNION ALL
        SELECT s.*, u.last_order
        FROM customer_analytics.rfm_from_rollup(as_of) s
        JOIN customer_analytics.rfm_rollup_customer u ON u.customer_id = s.customer_id
        WHERE NOT later
    ), diff AS MATERIALIZED (      -- one pass over both: what to write
        SELECT s.*, t.customer_id AS old_customer_id, t.segment AS old_segment, t.monetary AS old_monetary,
               t.frequency AS old_frequency, t.last_purchase AS old_last_purchase
        FROM scored s FULL JOIN customer_analytics.customer_rfm_score t ON t.customer_id = s.customer_id
        WHERE s.customer_id IS NULL OR t.customer_id IS NULL
           OR (t.customer_key, t.last_purchase, t.frequency, t.monetary, t.rfm_cell, t.segment)
              IS DISTINCT FROM (s.customer_key, s.last_purchase, s.frequency, s.monetary, s.rfm_cell, s.segment)
    ), updated AS (
        UPDATE customer_analytics.customer_rfm_score t
        SET customer_key = d.customer_key, last_purchase = d.last_purchase, frequency = d.frequency,
            monetary = d.monetary, r = d.r, f = d.f, m = d.m, rfm_cell = d.rfm_cell, segment = d.segment
        FROM diff d
        WHERE t.customer_id = d.customer_id AND d.old_customer_id IS NOT NULL
        RETURNING t.segment, t.monetary, t.frequency, t.last_purchase,
                  d.old_segment, d.old_monetary, d.old_frequency, d.old_last_purchase
    ), inserted AS (
        INSERT INTO customer_analytics.customer_rfm_score
            (customer_id, customer_key, last_purchase, frequency, monetary, r, f, m, rfm_cell, segment)
        SELECT d.customer_id, d.customer_key, d.last_purchase, d.frequency, d.monetary, d.r, d.f, d.m, d.rfm_cell, d.segment
        FROM diff d WHERE d.old_customer_id IS NULL
        RETURNING segment, monetary, frequency, last_purchase
    ), deleted AS (
        DELETE FROM customer_analytics.customer_rfm_score t
        USING diff d
        WHERE t.customer_id = d.old_customer_id AND d.customer_id IS NULL
        RETURNING t.segment, t.monetary, t.frequency, t.last_purchase
    ), stat AS (            -- segment_summary's sums: the rows written in, the rows replaced out
        INSERT INTO customer_analytics_internal.rfm_segment_stat AS g
        SELECT c.segment, sum(c.n)::bigint, sum(c.n * c.monetary), sum(c.n * c.frequency)::bigint,
               sum(c.n * EXTRACT(epoch FROM c.last_purchase))
        FROM (SELECT 1, u.segment, u.monetary, u.frequency, u.last_purchase FROM updated u
              UNION ALL
              SELECT -1, u.old_segment, u.old_monetary, u.old_frequency, u.old_last_purchase FROM updated u
              UNION ALL
              SELECT 1, i.segment, i.monetary, i.frequency, i.last_purchase FROM inserted i
              UNION ALL
              SELECT -1, x.segment, x.monetary, x.frequency, x.last_purchase FROM deleted x)
             c (n, segment, monetary, frequency, last_purchase)
        GROUP BY c.segment
        ORDER BY c.segment
        ON CONFLICT (segment) DO UPDATE
            SET customers = g.customers + excluded.customers,
                monetary = g.monetary + excluded.monetary,
                frequency = g.frequency + excluded.frequency,
                purchase_epochs = g.purchase_epochs + excluded.purchase_epochs
    )
    SELECT (SELECT count(*) FROM updated) + (SELECT count(*) FROM inserted) + (SELECT count(*) FROM deleted)
    INTO changed;
    DELETE FROM customer_analytics_internal.rfm_segment_stat WHERE customers = 0;
    INSERT INTO customer_analytics.customer_rfm_refresh (id, as_of, refreshed_at)
    VALUES (true, as_of, clock_timestamp())
    ON CONFLICT (id) DO UPDATE SET as_of = EXCLUDED.as_of, refreshed_at = EXCLUDED.refreshed_at;
    RETURN changed;
END
$$;
COMMENT ON FUNCTION customer_analytics.refresh_customer_rfm(boolean) IS
    'Brings customer_rfm up to date as of reference_time(): adds new orders to their customers'' RFM inputs, recomputes the inputs of customers whose lines or versions changed otherwise (everyone with full_refresh, after a TRUNCATE, or when the rollup is empty), rescores every customer and writes the rows that changed; returns their number. The pipeline calls it after transform()';


CREATE OR REPLACE FUNCTION customer_analytics.refresh_sales_rollup(full_refresh boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    days date[];
    keys integer[];
BEGIN
    -- one maintainer at a time; readers of the rollups never wait
    PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('refresh_sales_rollup()'));
    -- take the noted days (days noted by transactions still running stay for next time)
    WITH taken AS (DELETE FROM customer_analytics_internal.sales_dirty_day RETURNING day)
    SELECT array_agg(day) INTO days FROM taken;
    IF full_refresh OR '-infinity' = ANY (days)
       -- (SELECT 1: Citus cannot plan an EXISTS without columns)
       OR (NOT EXISTS (SELECT 1 FROM customer_analytics.sales_rollup_day)
           AND customer_analytics_internal.has_rows('customer_analytics.fact_order_line')) THEN
        DELETE FROM customer_analytics.sales_rollup_day;
        DELETE FROM customer_analytics.sales_rollup_category;
        keys := NULL;                   -- every day
    ELSIF days IS NULL THEN
        RETURN 0;
    ELSE
        keys := ARRAY(SELECT customer_analytics.date_key(d) FROM unnest(days) d);
        DELETE FROM customer_analytics.sales_rollup_day WHERE day = ANY (days);
        DELETE FROM customer_analytics.sales_rollup_category WHERE day = ANY (days);
    END IF;

    INSERT INTO customer_analytics.sales_rollup_day (day, revenue, orders, customers)
    -- credit notes (negative quantity) net against revenue but are no
    -- orders, and their customers did not buy that day
    SELECT d.date, sum(f.revenue), count(DISTINCT f.order_id) FILTER (WHERE f.quantity > 0),
           count(DISTINCT c.customer_id) FILTER (WHERE f.customer_key <> -1 AND f.quantity > 0)
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
    JOIN customer_analytics.dim_customer c ON c.customer_key = f.customer_key
    WHERE f.status = 'completed' AND (keys IS NULL OR f.date_key = ANY (keys))
    GROUP BY d.date;

    INSERT INTO customer_analytics.sales_rollup_category (day, category, revenue, orders, units)
    SELECT d.date, p.category, sum(f.revenue), count(DISTINCT f.order_id) FILTER (WHERE f.quantity > 0), sum(f.quantity)
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
    JOIN customer_analytics.dim_product p ON p.product_key = f.product_key
    WHERE f.status = 'completed' AND (keys IS NULL OR f.date_key = ANY (keys))
    GROUP BY d.date, p.category;

    RETURN CASE WHEN keys IS NULL THEN (SELECT count(*) FROM customer_analytics.sales_rollup_day)
                ELSE cardinality(keys) END;
END
$$;
COMMENT ON FUNCTION customer_analytics.refresh_sales_rollup(boolean) IS
    'Recomputes the sales rollups for the days whose order lines changed since the last call (all days with full_refresh, after a TRUNCATE, or when the rollups are empty); returns the number of days recomputed. The pipeline calls it before refreshing daily_sales and product_category_sales';

