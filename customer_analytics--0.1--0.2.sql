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
