-- The entity-relationship diagram of customer_analytics, as Graphviz dot,
-- read from the catalog of a database where the extension is installed:
-- every table of the schema with its columns, types, primary key (PK) and
-- foreign keys (FK, one edge per foreign key), grouped by role; views and
-- materialized views as name-only boxes with dashed edges to what they read.
--
--   psql -XAtq -f docs/erd.sql > docs/erd.dot     (scripts/erd.sh does this and renders it)
--
-- One statement, no psql meta-commands: sql/90_erd.sql runs this file's text
-- and fails when the committed docs/erd.dot differs from what it gives.
-- Everything is ordered, so the output is byte-for-byte stable.
WITH ext AS (
    SELECT 'customer_analytics'::regnamespace AS nsp
),
-- the role of a relation, by its name; a new table lands in "other"
rel AS (
    SELECT c.oid, c.relname, c.relkind,
           CASE
               WHEN c.relkind IN ('v', 'm') THEN 'views'
               WHEN c.relname LIKE 'stg\_%' THEN 'staging'
               WHEN c.relname LIKE 'ingest\_%' OR c.relname IN ('imputation_rule', 'landing') THEN 'ingestion'
               WHEN c.relname LIKE 'dim\_%' THEN 'dimensions'
               WHEN c.relname LIKE 'fact\_%' OR c.relname = 'sessions' THEN 'facts'
               WHEN c.relname LIKE 'pipeline\_%' OR c.relname LIKE 'quality\_%' OR c.relname = 'alert'
                    OR c.relname LIKE '%\_state' OR c.relname LIKE 'sales\_%' OR c.relname LIKE 'clickstream\_%'
                   THEN 'pipeline'
               WHEN c.relname LIKE 'sample\_%' OR c.relname LIKE 'rfm\_%' THEN 'reference'
               ELSE 'other'
           END AS grp
    FROM pg_class c, ext
    WHERE c.relnamespace = ext.nsp AND c.relkind IN ('r', 'p', 'v', 'm')
      AND NOT c.relispartition
),
grp(grp, ord, label, color) AS (
    VALUES ('ingestion', 1, 'ingestion', '#fff4e0'),
           ('staging', 2, 'staging', '#fdebd3'),
           ('dimensions', 3, 'dimensions (star schema)', '#e3f2e1'),
           ('facts', 4, 'facts (star schema)', '#d4ecd0'),
           ('pipeline', 5, 'pipeline, checks, rollups, alerts', '#e4ecf7'),
           ('reference', 6, 'reference data', '#f2f2f2'),
           ('views', 7, 'views and materialized views', '#f5e6f5'),
           ('other', 8, 'other', '#ffffff')
),
pk AS (
    SELECT con.conrelid, unnest(con.conkey) AS attnum
    FROM pg_constraint con JOIN rel ON rel.oid = con.conrelid
    WHERE con.contype = 'p'
),
fk AS (
    SELECT con.conname, con.conrelid, con.confrelid, con.conkey[1] AS attnum, con.confkey[1] AS refattnum
    FROM pg_constraint con
    JOIN rel r1 ON r1.oid = con.conrelid
    JOIN rel r2 ON r2.oid = con.confrelid
    WHERE con.contype = 'f'
),
fkcol AS (
    SELECT DISTINCT con.conrelid, unnest(con.conkey) AS attnum
    FROM pg_constraint con JOIN rel ON rel.oid = con.conrelid
    WHERE con.contype = 'f'
),
col AS (
    SELECT a.attrelid, a.attnum,
           format('<tr><td port="%s" align="left">%s</td><td align="left">%s</td><td>%s</td></tr>',
                  a.attname,
                  CASE WHEN pk.attnum IS NOT NULL THEN '<u>' || a.attname || '</u>' ELSE a.attname::text END,
                  replace(replace(replace(format_type(a.atttypid, a.atttypmod), '&', '&amp;'), '<', '&lt;'), '>', '&gt;')
                      || CASE WHEN a.attnotnull THEN '' ELSE ' ?' END,
                  concat_ws(' ', CASE WHEN pk.attnum IS NOT NULL THEN 'PK' END,
                                 CASE WHEN fkcol.attnum IS NOT NULL THEN 'FK' END)) AS line
    FROM pg_attribute a
    JOIN rel ON rel.oid = a.attrelid AND rel.relkind IN ('r', 'p')
    LEFT JOIN pk ON pk.conrelid = a.attrelid AND pk.attnum = a.attnum
    LEFT JOIN fkcol ON fkcol.conrelid = a.attrelid AND fkcol.attnum = a.attnum
    WHERE a.attnum > 0 AND NOT a.attisdropped
),
node AS (
    SELECT rel.grp, rel.relname,
           CASE WHEN rel.relkind IN ('r', 'p') THEN
               format(E'    "%s" [label=<<table border="0" cellborder="1" cellspacing="0" cellpadding="2">'
                      '<tr><td colspan="3" bgcolor="#5b6f8c"><font color="white"><b>%s</b></font></td></tr>%s</table>>];',
                      rel.relname, rel.relname,
                      (SELECT string_agg(col.line, '' ORDER BY col.attnum) FROM col WHERE col.attrelid = rel.oid))
           ELSE
               format(E'    "%s" [shape=box, style="rounded,filled", fillcolor="white", label="%s\\n(%s)"];',
                      rel.relname, rel.relname,
                      CASE rel.relkind WHEN 'm' THEN 'materialized view' ELSE 'view' END)
           END AS line
    FROM rel
),
cluster AS (
    SELECT grp.ord,
           format(E'  subgraph "cluster_%s" {\n    label="%s"; style=filled; fillcolor="%s"; color="#999999";\n%s\n  }',
                  grp.grp, grp.label, grp.color,
                  string_agg(node.line, E'\n' ORDER BY node.relname)) AS text
    FROM node JOIN grp USING (grp)
    GROUP BY grp.grp, grp.ord, grp.label, grp.color
),
fk_edge AS (
    SELECT format('  "%s":"%s" -> "%s":"%s" [tooltip="%s"];',
                  c1.relname, a1.attname, c2.relname, a2.attname, fk.conname) AS line
    FROM fk
    JOIN pg_class c1 ON c1.oid = fk.conrelid
    JOIN pg_class c2 ON c2.oid = fk.confrelid
    JOIN pg_attribute a1 ON a1.attrelid = fk.conrelid AND a1.attnum = fk.attnum
    JOIN pg_attribute a2 ON a2.attrelid = fk.confrelid AND a2.attnum = fk.refattnum
),
-- what each view reads directly (its rewrite rule's dependencies)
view_edge AS (
    SELECT DISTINCT format('  "%s" -> "%s" [style=dashed, color="#9a6fa0", arrowhead=open];',
                           v.relname, t.relname) AS line
    FROM rel v
    JOIN pg_rewrite r ON r.ev_class = v.oid
    JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                    AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> v.oid
    JOIN rel t ON t.oid = d.refobjid
    WHERE v.relkind IN ('v', 'm')
)
SELECT concat_ws(E'\n',
    '// generated by scripts/erd.sh from the catalog (docs/erd.sql); do not edit',
    'digraph customer_analytics {',
    '  graph [rankdir=LR, fontname="Helvetica", fontsize=12, nodesep=0.25, ranksep=1.2, newrank=true,',
    '         label="customer_analytics: tables (PK underlined, ? = nullable), foreign keys, and what the views read", labelloc=t];',
    '  node [shape=plaintext, fontname="Helvetica", fontsize=9];',
    '  edge [color="#4a5a70", arrowhead=normal, arrowsize=0.6];',
    (SELECT string_agg(text, E'\n' ORDER BY ord) FROM cluster),
    (SELECT string_agg(line, E'\n' ORDER BY line) FROM fk_edge),
    (SELECT string_agg(line, E'\n' ORDER BY line) FROM view_edge),
    '}') AS dot;
