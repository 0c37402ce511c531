-- distribute() on a single node (no Citus here; t/017_citus.pl runs it on
-- a cluster): refused with a reason and the way to a cluster, nothing
-- changed.  And the layout it would apply holds on the single-node schema:
-- what Citus demands of it is checked here, so that a key change that
-- breaks the layout fails on every machine, not only where Citus is.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
\set VERBOSITY default
SELECT * FROM customer_analytics.distribute();
SELECT * FROM customer_analytics.distribute(shard_count => 8);
SELECT count(*) AS layout_recorded FROM customer_analytics_internal.cluster_layout;

-- the layout: every table once, the reference tables first
SELECT ordinal, table_name, citus_kind, distribution_column, cluster_key
FROM customer_analytics_internal.cluster_layout_plan() ORDER BY ordinal;

-- a distribution column, and every column of a key the cluster swaps in,
-- exists and is never NULL
SELECT p.table_name, k.col, a.attnotnull AS not_null
FROM customer_analytics_internal.cluster_layout_plan() p
CROSS JOIN LATERAL (SELECT p.distribution_column UNION SELECT unnest(p.cluster_key)) k (col)
LEFT JOIN pg_attribute a ON a.attrelid = p.table_name AND a.attname = k.col AND NOT a.attisdropped
WHERE k.col IS NOT NULL
ORDER BY p.ordinal, k.col;
-- every primary key or unique index of a distributed table includes the
-- distribution column (Citus refuses others), once distribute() has put
-- the cluster's key in place of the primary key where the plan says so
SELECT p.table_name, i.indexrelid::regclass AS "unique index without the distribution column"
FROM customer_analytics_internal.cluster_layout_plan() p
JOIN pg_index i ON i.indrelid = p.table_name AND i.indisunique
WHERE p.citus_kind = 'distributed'
  AND NOT (i.indisprimary AND p.distribution_column = ANY (p.cluster_key))
  AND NOT EXISTS (SELECT FROM pg_attribute a
                  WHERE a.attrelid = p.table_name AND a.attname = p.distribution_column
                    AND a.attnum = ANY (i.indkey))
ORDER BY 1, 2;
-- a key the cluster swaps in contains the single-node primary key's
-- columns (it is no weaker than that key on a cluster where a line cannot
-- be on two shards: transform() moves it)
SELECT p.table_name, array_agg(a.attname ORDER BY a.attname) AS "primary key columns missing from cluster_key"
FROM customer_analytics_internal.cluster_layout_plan() p
JOIN pg_index i ON i.indrelid = p.table_name AND i.indisprimary
JOIN pg_attribute a ON a.attrelid = p.table_name AND a.attnum = ANY (i.indkey)
WHERE p.cluster_key IS NOT NULL AND a.attname <> ALL (p.cluster_key)
GROUP BY p.table_name
ORDER BY 1;
-- the events' distribution column: never empty in staging either (no
-- event falls into one shard of '' sessions), and in fact_event's
-- session index, which the stitching and the sessions read
SELECT pg_get_constraintdef(c.oid) AS stg_events_session_check
FROM pg_constraint c
WHERE c.conrelid = 'customer_analytics.stg_events'::regclass AND c.contype = 'c'
  AND pg_get_constraintdef(c.oid) LIKE '%session_id%';
SELECT pg_get_indexdef(i.indexrelid) AS fact_event_session_index
FROM pg_index i
WHERE i.indrelid = 'customer_analytics.fact_event'::regclass
  AND i.indkey[0] = (SELECT a.attnum FROM pg_attribute a
                     WHERE a.attrelid = 'customer_analytics.fact_event'::regclass AND a.attname = 'session_id');
-- no table left local references one of the layout (Citus would then
-- convert the whole foreign-key graph, views and all), and a distributed
-- table references reference tables only
SELECT c.conrelid::regclass AS referencing, c.confrelid::regclass AS referenced
FROM pg_constraint c
JOIN customer_analytics_internal.cluster_layout_plan() target ON target.table_name = c.confrelid
LEFT JOIN customer_analytics_internal.cluster_layout_plan() source ON source.table_name = c.conrelid
WHERE c.contype = 'f' AND (source.table_name IS NULL OR target.citus_kind <> 'reference')
ORDER BY 1, 2;
