-- docs/erd.dot is generated from the catalog (scripts/erd.sh runs
-- docs/erd.sql): the committed file must be what docs/erd.sql gives on the
-- extension as installed now.  On a failure the lines that differ are
-- listed; run ./scripts/erd.sh and commit docs/erd.dot and its renderings.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
\set erd_sql :abs_srcdir '/docs/erd.sql'
\set erd_dot :abs_srcdir '/docs/erd.dot'
-- the statement of docs/erd.sql, run as it is (without its final semicolon)
CREATE FUNCTION pg_temp.run_text_query(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE r text;
BEGIN
    EXECUTE regexp_replace(q, ';\s*$', '') INTO r;
    RETURN r;
END $$;
CREATE TEMP TABLE erd AS
SELECT pg_temp.run_text_query(pg_read_file(:'erd_sql')) AS generated,
       rtrim(pg_read_file(:'erd_dot'), E'\n') AS committed;
-- sanity: the generator sees the star schema and its foreign keys
SELECT generated LIKE '%"fact_order_line":"customer_key" -> "dim_customer":"customer_key"%' AS has_fk_edge,
       generated LIKE '%subgraph "cluster_staging"%' AS has_staging,
       (SELECT count(*) FROM regexp_matches(generated, '\[label=<<table', 'g'))
         = (SELECT count(*) FROM pg_class WHERE relnamespace = 'customer_analytics'::regnamespace
                                             AND relkind IN ('r', 'p')) AS one_node_per_table,
       (SELECT count(*) FROM regexp_matches(generated, '"[a-z_]+":"[a-z_]+" -> "', 'g'))
         = (SELECT count(*) FROM pg_constraint WHERE contype = 'f'
                AND connamespace = 'customer_analytics'::regnamespace) AS one_edge_per_fk
FROM erd;
-- the committed file is up to date
SELECT generated = committed AS erd_dot_is_current FROM erd;
SELECT 'generated, not in docs/erd.dot' AS difference, line FROM erd, regexp_split_to_table(generated, E'\n') line
EXCEPT ALL
SELECT 'generated, not in docs/erd.dot', line FROM erd, regexp_split_to_table(committed, E'\n') line
UNION ALL
(SELECT 'in docs/erd.dot, not generated', line FROM erd, regexp_split_to_table(committed, E'\n') line
 EXCEPT ALL
 SELECT 'in docs/erd.dot, not generated', line FROM erd, regexp_split_to_table(generated, E'\n') line)
ORDER BY 1, 2;
