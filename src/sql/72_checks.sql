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
-- versions through their keys (an array of them, which Citus also pushes
-- down to the shards, where a lateral join over the versions it cannot),
-- negative revenue through a partial index of those lines alone.
INSERT INTO customer_analytics.quality_check (name, kind, target, column_name, params, severity, builtin) VALUES
    ('event customer exists', 'relationship', 'customer_analytics.fact_event', 'customer_key',
     '{"to": "customer_analytics.dim_customer", "field": "customer_key"}', 'error', true),
    ('event product exists', 'relationship', 'customer_analytics.fact_event', 'product_key',
     '{"to": "customer_analytics.dim_product", "field": "product_key"}', 'error', true),
    ('order line has its customer version', 'custom', 'customer_analytics.fact_order_line', NULL,
     '{"sql": "SELECT l.order_id, l.line_number, l.order_ts, c.valid_from, c.valid_to FROM customer_analytics.fact_order_line l JOIN customer_analytics.dim_customer c ON c.customer_key = l.customer_key WHERE l.customer_key = ANY (ARRAY(SELECT v.customer_key FROM customer_analytics.dim_customer v WHERE v.customer_key <> -1 AND EXISTS (SELECT 1 FROM customer_analytics.dim_customer w WHERE w.customer_id = v.customer_id AND w.valid_from < v.valid_from))) AND NOT (l.order_ts >= c.valid_from AND l.order_ts < c.valid_to)", "incremental_sql": "SELECT l.order_id, l.line_number, l.order_ts, c.valid_from, c.valid_to FROM customer_analytics.changed_rows(NULL::customer_analytics.fact_order_line) l JOIN customer_analytics.dim_customer c ON c.customer_key = l.customer_key WHERE c.customer_key <> -1 AND NOT (l.order_ts >= c.valid_from AND l.order_ts < c.valid_to) AND EXISTS (SELECT 1 FROM customer_analytics.dim_customer v WHERE v.customer_id = c.customer_id AND v.valid_from < c.valid_from) UNION SELECT l.order_id, l.line_number, l.order_ts, c.valid_from, c.valid_to FROM customer_analytics.fact_order_line l JOIN customer_analytics.dim_customer c ON c.customer_key = l.customer_key WHERE l.customer_key = ANY (ARRAY(SELECT v.customer_key FROM customer_analytics.dim_customer v WHERE v.customer_key <> -1 AND v.customer_id IN (SELECT customer_id FROM customer_analytics.changed_rows(NULL::customer_analytics.dim_customer)) AND EXISTS (SELECT 1 FROM customer_analytics.dim_customer w WHERE w.customer_id = v.customer_id AND w.valid_from < v.valid_from))) AND NOT (l.order_ts >= c.valid_from AND l.order_ts < c.valid_to)"}',
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
COMMENT ON FUNCTION customer_analytics_internal.note_check_change() IS
    'Internal: statement trigger queuing in check_change the rows a statement wrote, for the checks over what changed';

/*
 * How a writer of the extension that queues its own changes (see
 * own_writer()) queues a batch of rows it writes into a table, as the
 * statement triggers would (they apply the same rule): true, row by row;
 * false, not at all, because the table is due for a whole check already,
 * or because the batch has more than a million rows or is the table's
 * first load (then the table is queued whole here).
 */
CREATE FUNCTION customer_analytics_internal.check_queue(rel regclass, batch bigint)
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

CREATE FUNCTION customer_analytics.pipeline_checks(run_id bigint)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT count(*) FILTER (WHERE NOT passed) FROM customer_analytics.run_checks(run_id)
$$;
COMMENT ON FUNCTION customer_analytics.pipeline_checks(bigint) IS
    'The pipeline''s checks step: run_checks() for the run; returns the number of failed checks';

