-- Documentation coverage: every user-facing object of the extension (the
-- functions, procedures, aggregates, tables, views and materialized views
-- that belong to it through pg_depend, deptype 'e') has a COMMENT ON and is
-- named in README.md, and every setting customer_analytics.* is in the
-- README's settings table.  Both lists must be empty.
--
-- Internal by rule (documented with the aggregate or type they serve, or
-- with the table whose trigger they are), so not listed in the README:
-- the support functions of the extension's aggregates (state, final,
-- combine, serialize, moving-aggregate functions), the I/O functions of its
-- types, and trigger functions.  Nothing else is exempt.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
-- names read as the catalog prints them, schema-qualified
RESET search_path;
\set readme :abs_srcdir '/README.md'
CREATE TEMP TABLE readme AS SELECT pg_read_file(:'readme') AS text;
CREATE TEMP VIEW ext_object AS
WITH member AS (
    SELECT d.classid, d.objid
    FROM pg_depend d
    WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
      AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'customer_analytics')
)
SELECT CASE p.prokind WHEN 'a' THEN 'aggregate' WHEN 'p' THEN 'procedure'
                      WHEN 'w' THEN 'window function' ELSE 'function' END AS kind,
       p.oid::regprocedure::text AS object, p.proname::text AS name,
       obj_description(p.oid, 'pg_proc') AS comment
FROM member m JOIN pg_proc p ON m.classid = 'pg_proc'::regclass AND p.oid = m.objid
WHERE p.prorettype <> 'trigger'::regtype
  AND NOT EXISTS (SELECT FROM pg_aggregate a
                  WHERE p.oid IN (a.aggtransfn, a.aggfinalfn, a.aggcombinefn, a.aggserialfn,
                                  a.aggdeserialfn, a.aggmtransfn, a.aggminvtransfn, a.aggmfinalfn))
  AND NOT EXISTS (SELECT FROM pg_type t
                  WHERE p.oid IN (t.typinput, t.typoutput, t.typreceive, t.typsend))
UNION ALL
SELECT CASE c.relkind WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' ELSE 'table' END,
       c.oid::regclass::text, c.relname::text, obj_description(c.oid, 'pg_class')
FROM member m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
WHERE c.relkind IN ('r', 'p', 'v', 'm');

-- the rule leaves the user-facing objects in (a few known ones, as a check
-- of the query itself), and the exempt support functions out
SELECT count(*) > 100 AS many_objects,
       bool_or(object = 'customer_analytics.rfm_agg(timestamp with time zone,numeric)') AS has_rfm_agg,
       bool_or(object = 'customer_analytics.fact_order_line') AS has_fact_order_line,
       bool_or(name = 'run_pipeline' AND kind = 'procedure') AS has_run_pipeline,
       bool_or(name = 'session_number' AND kind = 'window function') AS has_session_number,
       NOT bool_or(name IN ('stats_sfunc', 'rfm_state_in', 'note_dirty_sales_days')) AS exempt_left_out
FROM ext_object;

-- every object has a COMMENT ON
SELECT kind, object AS "lacks a COMMENT" FROM ext_object
WHERE comment IS NULL OR btrim(comment) = ''
ORDER BY 1, 2;

-- every object of the schema customer_analytics is named in README.md
-- (customer_analytics_internal is not an interface: a COMMENT suffices), in code style: `name(` for a
-- function, `name` followed by a backquote, space, comma or parenthesis for
-- a relation, optionally schema-qualified
SELECT DISTINCT kind, name AS "not in README.md" FROM ext_object, readme
WHERE object NOT LIKE 'customer\_analytics\_internal.%'
  AND readme.text !~ ('`(customer_analytics\.)?' || name
                      || CASE WHEN kind IN ('table', 'view', 'materialized view') THEN '[`( ,]' ELSE '\(' END)
ORDER BY 1, 2;

-- every setting is a row of the README's settings table
LOAD 'customer_analytics';
SELECT count(*) >= 12 AS settings_found FROM pg_settings WHERE name LIKE 'customer\_analytics.%';
SELECT name AS "setting not in README.md" FROM pg_settings, readme
WHERE name LIKE 'customer\_analytics.%'
  AND strpos(readme.text, '| `' || name || '` |') = 0
ORDER BY 1;
