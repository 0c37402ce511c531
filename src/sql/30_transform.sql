/*
 * transform(): staging -> star schema.
 *
 * Incremental by transaction, exactly once.  Each run remembers its
 * snapshot; the next run processes the staged rows of the transactions
 * visible in its own snapshot but not in the previous one, that is, those
 * that committed in between (the PgQ technique).  A load still running is
 * invisible to both and is picked up by the run after it commits, however
 * long it takes, and nobody else's rows wait for it.  Rows staged by the
 * calling transaction itself are included too (and seen again, harmlessly,
 * by the next run).
 *
 * Idempotent.  Dimensions and facts are keyed on natural keys and an
 * unchanged row is not rewritten.  Which version of a product, order line
 * or event wins is decided by arrival (stage_id): the latest staged version,
 * and a row staged earlier never overwrites one staged later.  (A source's
 * updated_at cannot be compared with the load time of a row that has none;
 * re-delivery of an old file is what ingestion's exactly-once rule stops.)
 * Customer versions (SCD2) are ordered by the source's updated_at, falling
 * back to the load time, since that time is what a version means.  So
 * processing a staged row twice changes nothing.  That is what makes the
 * full pass safe: transform(full => true), or automatically after a restore
 * into another cluster, where the saved horizon means nothing.
 */

CREATE FUNCTION customer_analytics.business_timezone()
RETURNS text
AS 'MODULE_PATHNAME', 'ca_business_timezone_name'
LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.business_timezone() IS
    'The time zone that assigns timestamps to calendar days (setting customer_analytics.timezone, default UTC)';

CREATE FUNCTION customer_analytics.date_key(day date)
RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT (((pg_catalog.date_part('year', day) OPERATOR(pg_catalog.*) 10000)
             OPERATOR(pg_catalog.+) (pg_catalog.date_part('month', day) OPERATOR(pg_catalog.*) 100))
            OPERATOR(pg_catalog.+) pg_catalog.date_part('day', day))::integer
$$;
COMMENT ON FUNCTION customer_analytics.date_key(date) IS
    'dim_date key of a day: YYYYMMDD as an integer';

CREATE FUNCTION customer_analytics.ensure_dim_date(from_day date, to_day date)
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
COMMENT ON FUNCTION customer_analytics.ensure_dim_date(date, date) IS
    'Extend dim_date so that it covers the given days, keeping it contiguous; returns the number of days added';

/*
 * Was a row staged by a transaction that committed after snapshot prev
 * (NULL: ever) and before snapshot cur, or by the caller itself?  lo and hi
 * bound the transaction ids for the index on staged_xid.  Inlined.
 */
CREATE FUNCTION customer_analytics_internal.newly_staged(xid xid8, lo xid8, hi xid8,
                                                         cur pg_snapshot, prev pg_snapshot, own xid8)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT (xid OPERATOR(pg_catalog.>=) lo AND xid OPERATOR(pg_catalog.<) hi
            AND pg_catalog.pg_visible_in_snapshot(xid, cur)
            AND (prev IS NULL OR NOT pg_catalog.pg_visible_in_snapshot(xid, prev)))
           OR xid OPERATOR(pg_catalog.=) own
$$;
COMMENT ON FUNCTION customer_analytics_internal.newly_staged(xid8, xid8, xid8, pg_snapshot, pg_snapshot, xid8) IS
    'Internal to transform(): whether a staged row belongs to the current run';

/*
 * The window of staged transactions a run takes, for transform() and
 * transform_events() alike: those not yet visible to the last run's
 * snapshot, or everything on a full refresh, on the first run, in another
 * cluster than the last run's (restored, system identifier changed) or
 * when the saved snapshot is ahead of this one.
 */
CREATE FUNCTION customer_analytics_internal.staged_window(last_snapshot pg_snapshot, last_system bigint,
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
COMMENT ON FUNCTION customer_analytics_internal.staged_window(pg_snapshot, bigint, bigint, boolean) IS
    'Internal to transform() and transform_events(): this run''s snapshot and the window of staged transactions it takes (prev NULL: every staged row)';

/*
 * The advisory lock key of one of the extension's serialised operations (a
 * transform, a refresh, a pipeline scope): the extension's class 7411 in
 * the high half keeps the keys apart from an application's own locks.
 */
CREATE FUNCTION customer_analytics_internal.lock_key(name text)
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT (7411::bigint OPERATOR(pg_catalog.<<) 32)
             OPERATOR(pg_catalog.|) (pg_catalog.hashtext(name)::bigint OPERATOR(pg_catalog.&) 4294967295) $$;
COMMENT ON FUNCTION customer_analytics_internal.lock_key(text) IS
    'Internal: the bigint advisory lock key of a named operation of the extension (''transform()'', ''refresh_customer_rfm()'', a pipeline scope ...)';

/*
 * Change tracking.  The incremental refreshes read queues of what changed
 * (rfm_new_line, rfm_dirty_customer, sales_dirty_day, clickstream_change,
 * check_change) and refresh_customer_rfm() keeps rfm_segment_stat.  The
 * extension's own writers record their changes there themselves, in the
 * statement that makes them, from the rows it returns: that works wherever
 * the rows live (on Citus, statement triggers with transition tables
 * cannot exist on distributed tables, and fire on the shards where they
 * do).  The statement triggers stay, on a single node, to catch changes
 * made by hand (an UPDATE, DELETE or TRUNCATE someone runs on a fact or a
 * dimension); each writer carries SET customer_analytics_internal.own_writer
 * = on, undone when it returns or fails, and while it is on the triggers
 * return at once, so that nothing is queued twice.
 */
CREATE FUNCTION customer_analytics_internal.own_writer()
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT COALESCE(pg_catalog.current_setting('customer_analytics_internal.own_writer', true), '')
             OPERATOR(pg_catalog.=) 'on' $$;
COMMENT ON FUNCTION customer_analytics_internal.own_writer() IS
    'Internal: whether one of the extension''s writers (which queue their own changes) is writing; the change-queue triggers then do nothing';

/*
 * Whether a table is managed by Citus (distributed or reference, after
 * distribute()).  The writers take another path for such a table where
 * Citus cannot run the single node's statement (docs/scaling.md); the
 * catalog is read only when the citus extension exists, and through
 * EXECUTE, so that nothing here depends on Citus being installed.
 */
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

/*
 * Whether a table holds a row: how the writers, the checks and the rollups
 * tell a first load or build.  The LIMIT is for Citus: it runs the
 * subquery of an EXISTS over a distributed table first and whole (every
 * row of every shard shipped to the coordinator: seconds on a loaded
 * shop) unless a LIMIT goes down to the shards with it; a single node
 * drops the LIMIT from an EXISTS and reads one row either way.
 */
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

/*
 * A large first load into an empty fact table builds the table's secondary
 * indexes after its rows are in, as pg_restore does: one sort per index
 * instead of an index entry per row (on a million order lines, the six
 * indexes cost the plain load more than its rows).  Only where that is
 * sound and pays: the table is empty, the batch has 10,000 rows or more,
 * the caller owns the table (DROP INDEX), and it is not a Citus table.
 * Unique and constraint indexes stay: they keep the keys checked during
 * the load.  Returns the definitions of the indexes dropped (NULL: none),
 * for restore_fact_indexes() after the load; both run in the caller's
 * transaction, so an error in between leaves the indexes as they were.
 * The table is locked ACCESS EXCLUSIVE from the drop to the commit: an
 * empty table, read by nobody yet.
 */
CREATE FUNCTION customer_analytics_internal.defer_fact_indexes(fact regclass, batch bigint)
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

/*
 * On Citus, the writers' transactions write the reference tables (the
 * dimensions) after statements over many shards, and Citus allows that
 * only over one connection per node: citus.multi_shard_modify_mode =
 * sequential for the rest of the transform, put back by
 * cluster_writes_end() (an error ends the transaction, and the setting
 * with it).  Returns the setting to put back (NULL: nothing was changed).
 */
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

/*
 * Bulk writes of the order lines without a query per row for the foreign
 * keys.  A foreign key checks each inserted row with a query of its own:
 * for a full load that is most of the cost (a plain INSERT ... SELECT of
 * the Online Retail lines pays 2.75x with the three keys what it pays
 * without).  load_fact_order_line() has just resolved every key of its
 * batch by joining the dimensions, so it checks the whole batch with one
 * anti-join instead, as pg_restore --disable-triggers and logical
 * replication skip the per-row checks: the dimensions are locked SHARE
 * first (no other session can delete or re-key a dimension row until
 * commit, and the keys' own triggers still guard every change after), the
 * lines go in with session_replication_role = replica for that statement,
 * and the batch's keys are checked before anything else runs.  The foreign
 * keys stay declared and enforced for every other writer.
 *
 * Only where that is sound; elsewhere the keys check row by row as always:
 * READ COMMITTED (each statement after the lock sees every change committed
 * before it; a REPEATABLE READ snapshot may predate a delete), a role that
 * may set session_replication_role, no trigger on the table but the keys'
 * and the extension's own (those return at once for our writers anyway;
 * a user's audit trigger must fire), and not a Citus table.
 */
CREATE FUNCTION customer_analytics_internal.fact_bulk_write_ok(fact regclass)
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

/*
 * The customer version in effect at a timestamp, for the given customer
 * ids: a version is in effect over [valid_from, valid_to), and a timestamp
 * older than a customer's first known version belongs to that first
 * version (its range is opened to -infinity here).  An id not in the
 * dimension, or a guest, finds nothing: the caller maps it to the unknown
 * member.  Inlined into the caller's join.
 */
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
COMMENT ON FUNCTION customer_analytics_internal.customer_versions(text[]) IS
    'Internal: the versions of the given customers with the range each is in effect over, the first opened to -infinity (a fact is keyed to the version in effect at its time)';

/*
 * transform()'s steps.  stage_order_batch() sets the batch aside in
 * temporary tables (dropped at commit) that the following steps read; each
 * step returns the rows it wrote.
 */
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

    -- statistics of the columns the batch is joined and filtered on: the
    -- row counts and these are what the plans need, and the others' cost
    -- (text columns above all) was most of a small batch's staging time
    ANALYZE ca_batch_products (product_id), ca_batch_customers (customer_id, version_ts),
            ca_batch_orders (order_id, line_number, customer_id, product_id, order_ts);
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.stage_order_batch(pg_snapshot, pg_snapshot, xid8, xid8, xid8) IS
    'Internal to transform(): the staged products, customers and order lines of this run (latest version per natural key) in temporary tables';

/* products: type 1, the latest staged version overwrites */
CREATE FUNCTION customer_analytics_internal.load_dim_product()
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

/*
 * customers: type 2.  Chain each customer's current version with the
 * staged versions newer than it, keep the versions whose attributes differ
 * from their predecessor, close the current version at the first of them
 * and insert them, each valid until the next.  Staged versions not newer
 * than the current one are history already superseded and are ignored.
 */
CREATE FUNCTION customer_analytics_internal.load_dim_customer()
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

/*
 * The customer an order line belongs to whatever its version, and for a
 * guest checkout (no customer_id) one customer per order: never NULL, and
 * the same for every version of a customer, so that a Citus cluster can
 * keep all of a customer's lines on one shard.
 */
CREATE FUNCTION customer_analytics_internal.order_customer_ref(customer_id text, order_id text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT COALESCE(customer_id, '#guest:' OPERATOR(pg_catalog.||) order_id) $$;
COMMENT ON FUNCTION customer_analytics_internal.order_customer_ref(text, text) IS
    'Internal: fact_order_line.customer_ref of a staged line: its customer_id, or ''#guest:'' || order_id for a guest checkout';

/*
 * Order lines keyed to an unknown member although their source named a
 * customer or product (it had not arrived yet): the only lines a
 * late-arriving dimension can repair.  Kept apart so that the repair reads
 * them, not the whole staging history (guests, also keyed to the unknown
 * member, can never be repaired and are not here).
 */
CREATE TABLE customer_analytics_internal.unknown_member_line (
    order_id    text NOT NULL,
    line_number integer NOT NULL,
    customer_id text,
    product_id  text,
    -- the line's fact_order_line.customer_ref: a Citus cluster keeps the
    -- queue on the shard of the line it waits for
    customer_ref text NOT NULL,
    PRIMARY KEY (order_id, line_number)
);
COMMENT ON TABLE customer_analytics_internal.unknown_member_line IS
    'Internal: order lines keyed to an unknown member whose customer or product id is known (a dimension row that has not arrived yet); transform() repairs them when it adds dimension rows';
SELECT pg_catalog.pg_extension_config_dump('customer_analytics_internal.unknown_member_line', '');

/*
 * What a writer of the extension changed in existing order lines, set
 * aside by its UPDATE ... RETURNING in the temporary table ca_line_changes
 * (each line as it is now and as it was): queued for the RFM rollup (the
 * customers of both versions), the sales rollups (both days) and, detail
 * true, the checks.  Returns the lines changed.
 */
CREATE FUNCTION customer_analytics_internal.note_order_line_updates(detail boolean)
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

/*
 * On a cluster, the batch's lines staged again under another customer
 * (ca_order_lines.moving) change shard: each is deleted where it is and
 * inserted where its new customer_ref puts it, in the caller's
 * transaction, so (order_id, line_number) stays unique across the shards.
 * As for an update, a line staged earlier than the fact's version does not
 * move it.  Each move is recorded in ca_line_changes (the line as it is now
 * and as it was), for note_order_line_updates().
 */
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

/*
 * Order lines, keyed to the customer version in effect at the order.  The
 * batch is resolved once (customer version, product, day) into
 * ca_order_lines: the facts, the queue of lines to repair and the change
 * queues are written from those rows.  New lines (all of them, in an
 * append) are inserted and queued in one statement; lines already there
 * are updated by a second one only when some were, so an append never
 * reads the facts back.
 */
CREATE FUNCTION customer_analytics_internal.load_fact_order_line()
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

/*
 * Late-arriving dimensions: lines that were mapped to an unknown member
 * because their customer or product had not arrived yet get the real key
 * once it has; the queue keeps those still waiting.
 */
CREATE FUNCTION customer_analytics_internal.repair_order_line_keys()
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

CREATE FUNCTION customer_analytics.transform(full_refresh boolean DEFAULT false)
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

/*
 * transform_events()'s steps, on the batch of events stage_event_batch()
 * sets aside in a temporary table.
 */
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
COMMENT ON FUNCTION customer_analytics_internal.stage_event_batch(pg_snapshot, pg_snapshot, xid8, xid8, xid8) IS
    'Internal to transform_events(): the staged events of this run (latest version per event id) in a temporary table';

/* too late for an incremental run: leave them staged, say so */
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
COMMENT ON FUNCTION customer_analytics_internal.hold_back_late_events(timestamptz, xid8) IS
    'Internal to transform_events(): takes the events older than the cutoff out of the batch (they stay staged) and alerts; returns how many';

/*
 * What a writer of the extension changed in existing events, set aside by
 * its UPDATE ... RETURNING in the temporary table ca_event_changes (each
 * event as it is now and as it was): the visitors of both versions queued
 * for refresh_clickstream() from their earliest event changed, and, detail
 * true, the events for the checks.  Returns the events changed.
 */
CREATE FUNCTION customer_analytics_internal.note_event_updates(detail boolean)
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

/*
 * Events, anonymous staying NULL and an unknown id -1.  As for order
 * lines: the batch resolved once (ca_event_rows), new events (all of them,
 * usually) inserted and queued in one statement, events already there
 * updated by a second one only when some were.
 *
 * On Citus the events are distributed by session_id and the key is
 * (event_id, session_id): an event re-staged under another session would
 * not conflict with its old row.  So there, before the insert, an event
 * whose newer version changed session is moved (its old row deleted from
 * its old shard, the new one inserted on the new shard), noted as the
 * single node's UPDATE notes it (both visitors queued, the old row for
 * the checks), and a version older than the row already there under
 * another session is dropped from the batch, as the single node's UPDATE
 * ignores it: event_id stays unique, and the rows and counts are the
 * single node's.
 */
CREATE FUNCTION customer_analytics_internal.load_fact_event()
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

/*
 * Identity stitching, over the whole of every session the batch touched
 * (an identifying event may arrive after the anonymous ones, or before).
 * Walking a session backwards in time, each identified event opens a group;
 * the anonymous events in its group precede it and take its customer.
 */
CREATE FUNCTION customer_analytics_internal.stitch_sessions()
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
COMMENT ON FUNCTION customer_analytics_internal.stitch_sessions() IS
    'Internal to transform_events(): anonymous events of the batch''s sessions take the customer of the next identified event of their session; returns the events changed';

/*
 * A first load (fact_event empty): every session is whole in the batch, so
 * the stitching is computed from the batch before anything is written, and
 * the events go in once, already stitched, instead of being written and
 * then updated (stitch_sessions()).  The rule is stitch_sessions()'s, on
 * the sessions that have both anonymous and identified events: walking a
 * session backwards in time, each identified event opens a group whose
 * anonymous events take its customer, and the version in effect at its
 * time.  Returns the events written and, of them, the events stitched.
 */
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

/* late-arriving customers: -1 becomes the version in effect */
CREATE FUNCTION customer_analytics_internal.repair_event_customer_keys()
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
COMMENT ON FUNCTION customer_analytics_internal.repair_event_customer_keys() IS
    'Internal to transform_events(): events keyed to the unknown customer whose customer has arrived since get the version in effect; returns the events re-keyed';

/*
 * transform_events(): the clickstream part of transform(), callable on its
 * own (refresh_clickstream() runs it every minute, apart from the nightly
 * batch).  It keeps its own snapshot in event_transform_state, so events are
 * exactly-once whichever of the two runs them.
 *
 * - Only events staged since the last run are read; an unchanged event is
 *   not rewritten.
 * - Event time: the watermark is the latest event time processed (never
 *   later than the run itself, so a clock running ahead cannot push it).
 *   An event older than the watermark is late; within the lateness window
 *   (customer_analytics.event_lateness) it is processed like any other,
 *   and the sessions it touches are rebuilt by refresh_clickstream().
 *   Later than that it is left in stg_events, counted (step
 *   fact_event_too_late) and alerted; a full refresh loads it.
 * - Identity stitching: an anonymous event takes the customer of the next
 *   identified event of its session (same session_id, at or after it), so a
 *   visitor who logs in at the cart owns the pages browsed before.
 *   Anonymous events after the last identified event stay anonymous.
 * - Events whose customer id was not yet in dim_customer (key -1) get the
 *   real key once the customer arrives.
 */
CREATE FUNCTION customer_analytics.transform_events(full_refresh boolean DEFAULT false)
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
