/*
 * The star schema on a Citus cluster (docs/scaling.md has the reasons).
 *
 * The facts are distributed by a never-NULL identity of what their
 * per-entity work groups by, co-located with each other and with their
 * staging: the order lines and their repair queue by customer_ref (a
 * customer's lines on one shard, whatever its versions; one customer per
 * order for guests), keyed there on (order_id, line_number,
 * customer_ref); the events and their staging by session_id, so that a
 * session's events (its stitching, its share of the sessions rebuild)
 * stay on one shard, fact_event keyed there on (event_id, session_id).
 * The primary keys are swapped during the conversion (the single node
 * keeps its own), and transform() / transform_events() move a line that
 * changes customer or an event that changes session (deleted on its old
 * shard, inserted on the new).  The staged lines stay by order_id
 * (customer_id is NULL for a guest, and Citus takes no generated column as
 * distribution column); the customers' staging by customer_id (never NULL
 * there); the dimensions, which every fact joins on a surrogate key, are
 * reference tables; bookkeeping, queues, rollups, settings and logs stay
 * local on the coordinator.
 *
 * Citus refuses to convert a table with triggers, and a table that a local
 * table references would drag the whole foreign-key graph (and the views
 * over it, extension members it may not drop) into a conversion to
 * Citus-local tables.  So the conversion drops the change-queue triggers
 * (the incremental refreshes then need full refreshes on a cluster, which
 * customer_analytics_internal.cluster_layout records) and takes the facts'
 * foreign keys off during the conversion, putting them back once both
 * sides are Citus tables.  Citus does not propagate DDL on extension
 * members to the workers' copies (it leaves them to the extension), so the
 * same drops run there too.
 */

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
 * co-location group of the others).  cluster_key: the primary key the
 * table gets on the cluster, for a table distributed by a column that is
 * not in its single-node key (NULL: the key stays).  The order facts are
 * distributed by their customer, and on the cluster keyed on (order_id,
 * line_number, customer_ref): the order and line first, so that the
 * look-ups of transform() by order and line (the lines already there, the
 * lines that change customer) use the key's index.  Likewise the events,
 * distributed by session and keyed on (event_id, session_id): the look-up
 * of the batch's events by event_id (those that changed session) uses the
 * key's index, and no other index is needed for it.
 */
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
        (8, 'customer_analytics.fact_event', 'distributed', 'session_id',
         '{event_id,session_id}'),
        (9, 'customer_analytics.stg_events', 'distributed', 'session_id', NULL),
        (10, 'customer_analytics.stg_customers', 'distributed', 'customer_id', NULL)
    ) AS p (ordinal, table_name, citus_kind, distribution_column, cluster_key)
$$;
COMMENT ON FUNCTION customer_analytics_internal.cluster_layout_plan() IS
    'Internal to distribute(): the tables it converts, in order: reference tables first, then the distributed ones with their distribution column (co-located with the first) and, where the single-node primary key lacks that column, the primary key they get on the cluster (cluster_key)';

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
REVOKE ALL ON FUNCTION customer_analytics.distribute(integer) FROM PUBLIC;
