
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
-- the sales rollups (60_zscore.sql) and the RFM scores (50_rfm.sql) before
-- the views that read them, then the anomaly alerts once their view is fresh
INSERT INTO customer_analytics.pipeline_task (task, command, depends_on, feeds, reads, ordinal, builtin) VALUES
    ('sales rollup', 'SELECT customer_analytics.refresh_sales_rollup()', '{transform}',
     '{customer_analytics.sales_rollup_day,customer_analytics.sales_rollup_category}',
     '{customer_analytics.fact_order_line,customer_analytics.dim_product,customer_analytics.dim_customer}', 40, true),
    ('customer rfm', 'SELECT customer_analytics.refresh_customer_rfm()', '{transform}',
     '{customer_analytics.customer_rfm_score,customer_analytics.customer_rfm_refresh}',
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
 * Data-quality checks (dbt tests)
 * --------------------------------------------------------------------- */

CREATE TABLE customer_analytics.quality_check (
    name        text PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('not_null', 'unique', 'relationship', 'accepted_values',
                                              'freshness', 'row_count_change', 'custom')),
    target      text NOT NULL,
    column_name text,
    params      jsonb NOT NULL DEFAULT '{}',
    severity    text NOT NULL DEFAULT 'error' CHECK (severity IN ('warn', 'error')),
    enabled     boolean NOT NULL DEFAULT true,
    builtin     boolean NOT NULL DEFAULT false,
    CHECK (kind IN ('custom', 'row_count_change') OR column_name IS NOT NULL)
);
COMMENT ON TABLE customer_analytics.quality_check IS
    'Data-quality checks (dbt tests): not_null, unique (column_name may list several), relationship (params: to, field), accepted_values (params: values), freshness (params: max_age), row_count_change (params: days, threshold), custom (params: sql returning the failing rows; incremental_sql, optional: the failing rows among what changed, reading changed_rows()). An error-severity failure stops the refresh of the views built on its target';

-- Built-in checks test what the schema's constraints cannot: keys,
-- domains and one current version per customer are already enforced.
-- They read indexes where they can: the lines of a customer's later
-- versions through their keys (OFFSET 0 keeps that a nested loop), negative
-- revenue through a partial index of those lines alone.
INSERT INTO customer_analytics.quality_check (name, kind, target, column_name, params, severity, builtin) VALUES
    ('event customer exists', 'relationship', 'customer_analytics.fact_event', 'customer_key',
     '{"to": "customer_analytics.dim_customer", "field": "customer_key"}', 'error', true),
    ('event product exists', 'relationship', 'customer_analytics.fact_event', 'product_key',
     '{"to": "customer_analytics.dim_product", "field": "product_key"}', 'error', true),
    ('order line has its customer version', 'custom', 'customer_analytics.fact_order_line', NULL,
     '{"sql": "SELECT f.order_id, f.line_number, f.order_ts, c.valid_from, c.valid_to FROM customer_analytics.dim_customer c CROSS JOIN LATERAL (SELECT l.order_id, l.line_number, l.order_ts FROM customer_analytics.fact_order_line l WHERE l.customer_key = c.customer_key AND NOT (l.order_ts >= c.valid_from AND l.order_ts < c.valid_to) OFFSET 0) f WHERE c.customer_key <> -1 AND EXISTS (SELECT FROM customer_analytics.dim_customer v WHERE v.customer_id = c.customer_id AND v.valid_from < c.valid_from)", "incremental_sql": "SELECT l.order_id, l.line_number, l.order_ts, c.valid_from, c.valid_to FROM customer_analytics.changed_rows(NULL::customer_analytics.fact_order_line) l JOIN customer_analytics.dim_customer c ON c.customer_key = l.customer_key WHERE c.customer_key <> -1 AND NOT (l.order_ts >= c.valid_from AND l.order_ts < c.valid_to) AND EXISTS (SELECT FROM customer_analytics.dim_customer v WHERE v.customer_id = c.customer_id AND v.valid_from < c.valid_from) UNION SELECT f.order_id, f.line_number, f.order_ts, c.valid_from, c.valid_to FROM customer_analytics.dim_customer c CROSS JOIN LATERAL (SELECT l.order_id, l.line_number, l.order_ts FROM customer_analytics.fact_order_line l WHERE l.customer_key = c.customer_key AND NOT (l.order_ts >= c.valid_from AND l.order_ts < c.valid_to) OFFSET 0) f WHERE c.customer_key <> -1 AND c.customer_id IN (SELECT customer_id FROM customer_analytics.changed_rows(NULL::customer_analytics.dim_customer)) AND EXISTS (SELECT FROM customer_analytics.dim_customer v WHERE v.customer_id = c.customer_id AND v.valid_from < c.valid_from)"}',
     'warn', true),
    ('no negative revenue', 'custom', 'customer_analytics.fact_order_line', NULL,
     '{"sql": "SELECT order_id, line_number, quantity, unit_price, discount, revenue FROM customer_analytics.fact_order_line WHERE revenue < 0 AND quantity > 0", "incremental_sql": "SELECT order_id, line_number, quantity, unit_price, discount, revenue FROM customer_analytics.changed_rows(NULL::customer_analytics.fact_order_line) WHERE revenue < 0 AND quantity > 0"}',
     'warn', true),
    ('orders are fresh', 'freshness', 'customer_analytics.fact_order_line', 'order_ts', '{"max_age": "2 days"}', 'warn', true),
    ('events are fresh', 'freshness', 'customer_analytics.fact_event', 'event_ts', '{"max_age": "1 day"}', 'warn', true),
    ('order volume is usual', 'row_count_change', 'customer_analytics.fact_order_line', 'order_ts',
     '{"days": 28, "threshold": 4}', 'warn', true);
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.quality_check', 'WHERE NOT builtin');

CREATE TABLE customer_analytics.quality_result (
    result_id    bigserial PRIMARY KEY,
    run_id       bigint REFERENCES customer_analytics.pipeline_run ON DELETE CASCADE,
    check_name   text NOT NULL,
    checked_at   timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    severity     text NOT NULL,
    passed       boolean NOT NULL,
    failing_rows bigint NOT NULL,
    sample       jsonb,
    incremental  boolean
);
CREATE INDEX quality_result_run_idx ON customer_analytics.quality_result (run_id);
CREATE INDEX quality_result_checked_idx ON customer_analytics.quality_result (checked_at);
COMMENT ON TABLE customer_analytics.quality_result IS
    'Every check result: passed or not, number of failing rows and a sample of up to 5 of them';
COMMENT ON COLUMN customer_analytics.quality_result.incremental IS
    'The check ran over the rows changed since the previous pass only (false: over whole tables)';
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.quality_result', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.quality_result_result_id_seq', '');

/* The query returning a check's failing rows */
CREATE FUNCTION customer_analytics.quality_check_sql(c customer_analytics.quality_check)
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
CREATE TABLE customer_analytics_internal.check_change (
    rel     regclass NOT NULL,
    op      "char" NOT NULL CHECK (op IN ('n', 'o', 'T')),
    key     jsonb,
    old_row jsonb
);
CREATE INDEX check_change_rel_idx ON customer_analytics_internal.check_change (rel, op);
COMMENT ON TABLE customer_analytics_internal.check_change IS
    'Rows written since the checks last ran, queued by statement triggers (track_check_changes): op n is a row inserted or updated (key: its primary key), o a row as it was before an update or delete (old_row), T the whole table (truncated, or a statement too big to queue row by row). Consumed by run_checks(); not dumped: the first run after a restore checks everything';

CREATE TABLE customer_analytics_internal.quality_check_progress (
    check_name text PRIMARY KEY REFERENCES customer_analytics.quality_check ON DELETE CASCADE ON UPDATE CASCADE,
    pass_no    bigint NOT NULL,
    definition text NOT NULL,
    passed     boolean NOT NULL,
    full_at    timestamptz NOT NULL,
    state      jsonb
);
COMMENT ON TABLE customer_analytics_internal.quality_check_progress IS
    'Per check: the pass of run_checks() that last ran it, the definition it ran (md5), whether it passed, when it last ran over whole tables, and what an incremental run carries over (freshness: the newest value). Derived: not dumped';

CREATE SEQUENCE customer_analytics_internal.check_pass_seq;
COMMENT ON SEQUENCE customer_analytics_internal.check_pass_seq IS
    'Numbers the passes of run_checks() that consume check_change';

/* The primary key columns of a table, in key order */
CREATE FUNCTION customer_analytics_internal.key_columns(rel regclass)
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
COMMENT ON FUNCTION customer_analytics_internal.key_columns(regclass) IS
    'Internal: the primary key columns of a table (how check_change names a row)';

CREATE FUNCTION customer_analytics_internal.note_check_change()
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
COMMENT ON FUNCTION customer_analytics_internal.note_check_change() IS
    'Internal: statement trigger queuing in check_change the rows a statement wrote, for the checks over what changed';

CREATE FUNCTION customer_analytics.track_check_changes(rel regclass)
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
COMMENT ON FUNCTION customer_analytics.track_check_changes(regclass) IS
    'Queues the changes of a table (with a primary key) for the checks over what changed: statement triggers write check_change. The built-in targets are tracked already; an untracked table''s checks run over all its rows';

SELECT customer_analytics.track_check_changes(t)
FROM unnest(ARRAY['customer_analytics.fact_order_line', 'customer_analytics.fact_event',
                  'customer_analytics.dim_customer', 'customer_analytics.dim_product']::regclass[]) t;
-- a fresh install has nothing to check yet
DELETE FROM customer_analytics_internal.check_change;

CREATE FUNCTION customer_analytics_internal.tracked(rel regclass)
RETURNS boolean
LANGUAGE sql STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = rel AND NOT t.tgisinternal AND t.tgenabled <> 'D'
                     AND t.tgfoid = 'customer_analytics_internal.note_check_change()'::regprocedure AND t.tgtype & 4 <> 0)
$$;
COMMENT ON FUNCTION customer_analytics_internal.tracked(regclass) IS
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
COMMENT ON FUNCTION customer_analytics.quality_check_incremental_sql(customer_analytics.quality_check) IS
    'The SQL that returns the failing rows of a quality check among the rows changed since the previous pass (and the rows a change elsewhere can invalidate); NULL when the check always runs over whole tables';

/* Whether an update or delete since the previous pass may have moved the newest value of a column */
CREATE FUNCTION customer_analytics_internal.newest_moved(rel regclass, col text, newest text)
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
COMMENT ON FUNCTION customer_analytics_internal.newest_moved(regclass, text, text) IS
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
COMMENT ON FUNCTION customer_analytics.run_checks(bigint, text, boolean) IS
    'Runs every enabled quality check (or those of one target, over whole tables): a row per check with passed, the number of failing rows (-1: the check itself failed), a sample of up to 5, and whether it ran over the rows changed since the previous pass only (incremental) or over whole tables (full => true, a check that failed or changed, or whose last full run is older than customer_analytics.full_checks_interval); logs each in quality_result and raises an alert for each failure';

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

CREATE FUNCTION customer_analytics.pipeline_checks(run_id bigint)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT count(*) FILTER (WHERE NOT passed) FROM customer_analytics.run_checks(run_id)
$$;
COMMENT ON FUNCTION customer_analytics.pipeline_checks(bigint) IS
    'The pipeline''s checks step: run_checks() for the run; returns the number of failed checks';

CREATE FUNCTION customer_analytics.pipeline_purge()
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
