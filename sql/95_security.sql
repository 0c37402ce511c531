-- Privileges and search_path safety: every SQL function is protected; an
-- unprivileged role cannot read server files, cannot read others' rejected
-- lines unless granted, cannot hijack the extension's functions with
-- look-alike objects in public; grant_analyst() and grant_loader() give
-- what they say and no more.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/settings.sql
CREATE DATABASE regress_security;
\c regress_security
-- the settings only: the default search_path is what the hijack tries
\i :abs_srcdir/sql/include/settings.sql
CREATE EXTENSION customer_analytics;
CREATE TABLE public.people (id integer PRIMARY KEY, name varchar(40) NOT NULL, amount numeric, signup_date date);

-- The audit: every function and procedure written in SQL or PL/pgSQL sets
-- search_path = pg_catalog, pg_temp (customer_analytics may come second),
-- except the ones that must stay inlinable or are procedures that commit:
-- those are qualified throughout (the hijack below calls them).
SELECT p.oid::regprocedure AS without_set_clause, l.lanname
FROM pg_proc p
JOIN pg_language l ON l.oid = p.prolang
JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'customer_analytics'
WHERE l.lanname IN ('sql', 'plpgsql')
  AND NOT EXISTS (SELECT FROM unnest(p.proconfig) c
                  WHERE c IN ('search_path=pg_catalog, pg_temp', 'search_path=pg_catalog, customer_analytics, pg_temp',
                              'search_path=pg_catalog, customer_analytics, customer_analytics_internal, pg_temp'))
ORDER BY 1::text;
-- no other setting of search_path anywhere
SELECT count(*) AS other_search_paths
FROM pg_proc p, unnest(p.proconfig) c
WHERE p.pronamespace IN ('customer_analytics'::regnamespace, 'customer_analytics_internal'::regnamespace)
  AND c LIKE 'search_path=%'
  AND c NOT IN ('search_path=pg_catalog, pg_temp', 'search_path=pg_catalog, customer_analytics, pg_temp',
                'search_path=pg_catalog, customer_analytics, customer_analytics_internal, pg_temp');
-- no SECURITY DEFINER function
SELECT count(*) AS security_definer FROM pg_proc
WHERE pronamespace IN ('customer_analytics'::regnamespace, 'customer_analytics_internal'::regnamespace) AND prosecdef;

-- A little shop, transformed, for the roles to read.
SELECT count(*) FROM customer_analytics.generate_sample_data(customers => 60, days => 20, seed => 3);
SELECT count(*) FROM customer_analytics.transform();

CREATE ROLE regress_loader1;
CREATE ROLE regress_loader2;
CREATE ROLE regress_analyst;
CREATE ROLE regress_auditor;
CREATE ROLE regress_intruder;
SELECT customer_analytics.grant_loader('regress_loader1');
SELECT count(*) AS loader2_grants FROM customer_analytics.grant_loader('regress_loader2');
SELECT count(*) AS analyst_grants FROM customer_analytics.grant_analyst('regress_analyst');
SELECT s AS auditor_extra_grants FROM customer_analytics.grant_analyst('regress_auditor', raw_rejects => true) s
WHERE s LIKE '%ingest_reject%' OR s LIKE '%reject_reader%';
-- only the owner may hand out these grants
SET ROLE regress_loader1;
SELECT customer_analytics.grant_analyst('regress_loader1', true);
RESET ROLE;

-- Capture a statement's SQLSTATE.
CREATE FUNCTION public.sqlstate_of(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ' ' || regexp_replace(SQLERRM, '"[^"]*"', '"..."', 'g');
END $$;

-- Server files: a role without pg_read_server_files gets 42501, whether it
-- may load (a loader) or not; it cannot point ingest_directory at the
-- server's directories either.  A superuser reads the same file.
SELECT r AS role, public.sqlstate_of(format($$SET ROLE %s; SELECT * FROM customer_analytics.ingest_csv('customer_analytics.stg_orders', %L)$$,
                                            r, :'data' || '/row_errors.csv')) AS ingest_csv,
       public.sqlstate_of(format($$SET ROLE %s; SELECT * FROM customer_analytics.ingest_csv('customer_analytics.stg_orders', '/etc/passwd', header => false)$$, r)) AS etc_passwd,
       public.sqlstate_of(format($$SET ROLE %s; SELECT * FROM customer_analytics.ingest_directory('customer_analytics.stg_orders', '/etc', '*')$$, r)) AS ingest_directory
FROM unnest(ARRAY['regress_intruder', 'regress_loader1', 'regress_analyst']) r
ORDER BY 1;
RESET ROLE;
SELECT public.sqlstate_of(format($$SELECT * FROM customer_analytics.ingest_csv('public.people', %L, column_map => '{"Signup Date": "signup_date"}', ignore_extra_columns => true, validate => true)$$,
                                 :'data' || '/people_reordered.csv')) AS superuser_reads;

-- Loads from the client by two loaders, each with rejected lines.
SET ROLE regress_loader1;
SELECT status, rows_read, rows_loaded, rows_rejected FROM customer_analytics.ingest_csv_text('customer_analytics.stg_orders',
E'order_id,line_number,customer_id,product_id,order_ts,quantity,unit_price\n'
 'L1-1,1,C0000001,P00001,2025-01-05 10:00+00,1,5.00\n'
 'L1-2,1,C0000001,P00001,secret line of loader1,1,5.00\n');
SELECT customer_analytics.track_event('page_view', 'loader1-session') IS NOT NULL AS tracked;
SET ROLE regress_loader2;
SELECT status, rows_read, rows_loaded, rows_rejected FROM customer_analytics.ingest_csv_text('customer_analytics.stg_orders',
E'order_id,line_number,customer_id,product_id,order_ts,quantity,unit_price\n'
 'L2-1,1,C0000002,P00002,secret line of loader2,1,5.00\n'
 'L2-2,1,C0000002,P00002,another one of loader2,2,5.00\n');
RESET ROLE;

-- Row-level security on ingest_reject: a loader sees its own rejects only;
-- an analyst none (no privilege); a granted reader (the auditor) all.
SELECT r AS role,
       public.sqlstate_of(format('SET ROLE %s; SELECT count(*) FROM customer_analytics.ingest_reject', r)) AS can_select
FROM unnest(ARRAY['regress_loader1', 'regress_loader2', 'regress_analyst', 'regress_auditor', 'regress_intruder']) r
ORDER BY 1;
RESET ROLE;
SET ROLE regress_loader1;
SELECT loaded_by, count(*), bool_and(raw_line LIKE '%loader1%') AS own_lines FROM customer_analytics.ingest_reject GROUP BY 1;
SET ROLE regress_loader2;
SELECT loaded_by, count(*), bool_and(raw_line LIKE '%loader2%') AS own_lines FROM customer_analytics.ingest_reject GROUP BY 1;
-- a loader cannot make its rejects look like another's, nor delete them
SELECT public.sqlstate_of($$INSERT INTO customer_analytics.ingest_reject (load_id, target, file, line_number, sqlstate, message, loaded_by)
                            VALUES (0, 'x', 'x', 1, '22000', 'forged', 'regress_loader1')$$) AS forge;
SELECT public.sqlstate_of($$DELETE FROM customer_analytics.ingest_reject$$) AS delete_rejects;
SET ROLE regress_auditor;
SELECT loaded_by, count(*) FROM customer_analytics.ingest_reject
WHERE loaded_by LIKE 'regress_loader%' GROUP BY 1 ORDER BY 1;
RESET ROLE;
-- the same counts computed by the superuser, who bypasses row-level security
SELECT loaded_by, count(*) FROM customer_analytics.ingest_reject
WHERE loaded_by LIKE 'regress_loader%' GROUP BY 1 ORDER BY 1;

-- What each role may read and write.
SELECT r AS role,
       public.sqlstate_of(format('SET ROLE %s; SELECT count(*) FROM customer_analytics.fact_order_line', r)) AS read_facts,
       public.sqlstate_of(format('SET ROLE %s; SELECT count(*) FROM customer_analytics.customer_rfm', r)) AS read_rfm,
       public.sqlstate_of(format('SET ROLE %s; SELECT count(*) FROM customer_analytics.pipeline_status', r)) AS read_status,
       public.sqlstate_of(format('SET ROLE %s; SELECT count(*) FROM customer_analytics.stg_orders', r)) AS read_staging,
       public.sqlstate_of(format($$SET ROLE %s; INSERT INTO customer_analytics.stg_products (product_id, name) VALUES ('PX', 'x')$$, r)) AS stage_row,
       public.sqlstate_of(format('SET ROLE %s; DELETE FROM customer_analytics.fact_order_line', r)) AS delete_facts,
       public.sqlstate_of(format('SET ROLE %s; SELECT * FROM customer_analytics.transform()', r)) AS transform
FROM unnest(ARRAY['regress_analyst', 'regress_loader1', 'regress_intruder']) r
ORDER BY 1;
RESET ROLE;
-- the analyst reads the same facts as the superuser
SET ROLE regress_analyst;
CREATE TEMP TABLE analyst_view AS
SELECT count(*) AS lines, sum(revenue) AS revenue FROM customer_analytics.fact_order_line;
RESET ROLE;
SELECT a.lines = s.lines AND a.revenue = s.revenue AS analyst_sees_all_facts
FROM analyst_view a, (SELECT count(*) AS lines, sum(revenue) AS revenue FROM customer_analytics.fact_order_line) s;

-- revoke_access() takes it all back
SELECT customer_analytics.revoke_access('regress_auditor');
SELECT customer_analytics.revoke_access('regress_analyst');
SELECT r AS role,
       public.sqlstate_of(format('SET ROLE %s; SELECT count(*) FROM customer_analytics.ingest_reject', r)) AS rejects,
       public.sqlstate_of(format('SET ROLE %s; SELECT count(*) FROM customer_analytics.dim_customer', r)) AS dim
FROM unnest(ARRAY['regress_analyst', 'regress_auditor']) r ORDER BY 1;
RESET ROLE;
SELECT count(*) AS readers_left FROM customer_analytics.reject_reader;

/*
 * The hijack.  An intruder with CREATE on public (the pre-15 default)
 * plants look-alikes of what the extension's code calls: operators on
 * text, oid, bigint, xid8, float8, functions named like pg_catalog's, an
 * aggregate count(), tables named like ours.  Each logs when it runs.
 * Then a superuser whose search_path puts public first runs the
 * extension's entry points.  Nothing of the intruder may run.
 */
GRANT CREATE ON SCHEMA public TO regress_intruder;
SET ROLE regress_intruder;
CREATE TABLE public.hijack_log (what text);
GRANT INSERT, SELECT ON public.hijack_log TO PUBLIC;
CREATE FUNCTION public.trap(what text) RETURNS boolean LANGUAGE sql VOLATILE
AS $$ INSERT INTO public.hijack_log VALUES (what) RETURNING true $$;
-- operators: log, then answer like the real ones so that nothing else changes
CREATE FUNCTION public.ev_texteq(a text, b text) RETURNS boolean LANGUAGE sql VOLATILE
AS $$ SELECT public.trap('text =') AND a OPERATOR(pg_catalog.=) b $$;
CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.ev_texteq);
CREATE FUNCTION public.ev_textne(a text, b text) RETURNS boolean LANGUAGE sql VOLATILE
AS $$ SELECT public.trap('text <>') AND a OPERATOR(pg_catalog.<>) b $$;
CREATE OPERATOR public.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = public.ev_textne);
CREATE FUNCTION public.ev_textcat(a text, b text) RETURNS text LANGUAGE sql VOLATILE
AS $$ SELECT CASE WHEN public.trap('text ||') THEN a OPERATOR(pg_catalog.||) b END $$;
CREATE OPERATOR public.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = public.ev_textcat);
CREATE FUNCTION public.ev_oideq(a oid, b oid) RETURNS boolean LANGUAGE sql VOLATILE
AS $$ SELECT public.trap('oid =') AND a OPERATOR(pg_catalog.=) b $$;
CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = public.ev_oideq);
CREATE FUNCTION public.ev_int8eq(a bigint, b bigint) RETURNS boolean LANGUAGE sql VOLATILE
AS $$ SELECT public.trap('bigint =') AND a OPERATOR(pg_catalog.=) b $$;
CREATE OPERATOR public.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = public.ev_int8eq);
CREATE FUNCTION public.ev_int8ne(a bigint, b bigint) RETURNS boolean LANGUAGE sql VOLATILE
AS $$ SELECT public.trap('bigint <>') AND a OPERATOR(pg_catalog.<>) b $$;
CREATE OPERATOR public.<> (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = public.ev_int8ne);
CREATE FUNCTION public.ev_int8shl(a bigint, b integer) RETURNS bigint LANGUAGE sql VOLATILE
AS $$ SELECT CASE WHEN public.trap('bigint <<') THEN a OPERATOR(pg_catalog.<<) b END $$;
CREATE OPERATOR public.<< (LEFTARG = bigint, RIGHTARG = integer, FUNCTION = public.ev_int8shl);
CREATE FUNCTION public.ev_int4pl(a integer, b integer) RETURNS integer LANGUAGE sql VOLATILE
AS $$ SELECT CASE WHEN public.trap('integer +') THEN a OPERATOR(pg_catalog.+) b END $$;
CREATE OPERATOR public.+ (LEFTARG = integer, RIGHTARG = integer, FUNCTION = public.ev_int4pl);
CREATE FUNCTION public.ev_float8mul(a float8, b float8) RETURNS float8 LANGUAGE sql VOLATILE
AS $$ SELECT CASE WHEN public.trap('float8 *') THEN a OPERATOR(pg_catalog.*) b END $$;
CREATE OPERATOR public.* (LEFTARG = float8, RIGHTARG = float8, FUNCTION = public.ev_float8mul);
CREATE FUNCTION public.ev_xid8ge(a xid8, b xid8) RETURNS boolean LANGUAGE sql VOLATILE
AS $$ SELECT public.trap('xid8 >=') AND a OPERATOR(pg_catalog.>=) b $$;
CREATE OPERATOR public.>= (LEFTARG = xid8, RIGHTARG = xid8, FUNCTION = public.ev_xid8ge);
-- functions named like pg_catalog's, with the exact argument types
CREATE FUNCTION public.lower(text) RETURNS text LANGUAGE sql VOLATILE
AS $$ SELECT CASE WHEN public.trap('lower') THEN pg_catalog.lower($1) END $$;
CREATE FUNCTION public.upper(text) RETURNS text LANGUAGE sql VOLATILE
AS $$ SELECT CASE WHEN public.trap('upper') THEN pg_catalog.upper($1) END $$;
CREATE FUNCTION public.length(text) RETURNS integer LANGUAGE sql VOLATILE
AS $$ SELECT CASE WHEN public.trap('length') THEN pg_catalog.length($1) END $$;
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql VOLATILE
AS $$ SELECT CASE WHEN public.trap('now') THEN pg_catalog.now() END $$;
CREATE FUNCTION public.clock_timestamp() RETURNS timestamptz LANGUAGE sql VOLATILE
AS $$ SELECT CASE WHEN public.trap('clock_timestamp') THEN pg_catalog.clock_timestamp() END $$;
CREATE FUNCTION public.format(text) RETURNS text LANGUAGE sql VOLATILE
AS $$ SELECT CASE WHEN public.trap('format') THEN pg_catalog.format($1) END $$;
CREATE FUNCTION public.current_setting(text, boolean) RETURNS text LANGUAGE sql VOLATILE
AS $$ SELECT CASE WHEN public.trap('current_setting') THEN pg_catalog.current_setting($1, $2) END $$;
CREATE FUNCTION public.ev_count_sfunc(bigint, text) RETURNS bigint LANGUAGE sql VOLATILE
AS $$ SELECT CASE WHEN public.trap('count') THEN $1 OPERATOR(pg_catalog.+) 1 END $$;
CREATE AGGREGATE public.count(text) (SFUNC = public.ev_count_sfunc, STYPE = bigint, INITCOND = '0');
-- tables named like the extension's
CREATE TABLE public.fact_order_line (order_id text, revenue numeric);
CREATE TABLE public.dim_customer (customer_key bigint, customer_id text);
CREATE TABLE public.stg_orders (order_id text);
CREATE TABLE public.pipeline_run (run_id bigint);
GRANT ALL ON public.fact_order_line, public.dim_customer, public.stg_orders, public.pipeline_run TO PUBLIC;
RESET ROLE;

-- The traps are armed: unqualified SQL under this search_path walks into them.
SET search_path = public, pg_catalog;
SELECT 'a'::text = 'a' AS eq, lower('X') AS lower, count('x'::text) AS count;
SELECT what, count(*) FROM public.hijack_log GROUP BY 1 ORDER BY 1;
TRUNCATE public.hijack_log;

-- The victim: a superuser, public first.  Every entry point of the
-- extension, a staged load of each kind, the pipeline and the views.
SELECT count(*) > 0 AS staged FROM customer_analytics.ingest_csv_text('customer_analytics.stg_orders',
E'order_id,line_number,customer_id,product_id,order_ts,quantity,unit_price\n'
 'V-1,1,C0000003,P00003,2025-01-07 10:00+00,1,5.00\nV-2,1,C0000003,P00003,bad,1,5.00\n');
\set people_file :data/people_reordered.csv
SELECT status, rows_read, rows_loaded, rows_rejected FROM customer_analytics.ingest_csv('public.people', :'people_file',
    column_map => '{"Signup Date": "signup_date"}', ignore_extra_columns => true);
SELECT customer_analytics.track_event('product_view', 'victim-session', 'C0000003', 'P00003') IS NOT NULL AS tracked;
SELECT step, rows_affected > 0 AS wrote FROM customer_analytics.transform() ORDER BY step;
SELECT count(*) > 0 AS checks_ran FROM customer_analytics.run_checks();
-- (the victim's own statements qualify what the traps cover)
SELECT count(*) > 0 AS rfm_rows, pg_catalog.count(DISTINCT segment) > 1 AS segments FROM customer_analytics.rfm();
SELECT count(*) = 125 AS cells FROM customer_analytics.rfm_segment_cells('default');
SELECT customer_analytics.rfm_segment(5, 5, 5) IS NOT NULL AS segment;
SELECT customer_analytics.date_key('2025-03-04') AS date_key, customer_analytics.visitor(NULL, 's') AS visitor,
       customer_analytics.pipeline_lock_key('all') OPERATOR(pg_catalog.=) (7411::bigint OPERATOR(pg_catalog.<<) 32 OPERATOR(pg_catalog.|) (pg_catalog.hashtext('all')::bigint OPERATOR(pg_catalog.&) 4294967295)) AS lock_key,
       customer_analytics.top_customers_limit() AS top_limit,
       customer_analytics.qualified_name('customer_analytics.fact_order_line') AS qualified_name,
       customer_analytics.pipeline_job_name() LIKE 'customer_analytics %' AS job_name;
SELECT count(*) > 0 AS plan_steps FROM customer_analytics.pipeline_plan();
SELECT count(*) > 0 AS sessions FROM customer_analytics.refresh_clickstream();
-- (the purge step needs pg_cron's tables, not under test here)
UPDATE customer_analytics.pipeline_task SET enabled = false WHERE task OPERATOR(pg_catalog.=) 'purge';
CALL customer_analytics.run_pipeline();
REFRESH MATERIALIZED VIEW customer_analytics.top_customers;
SELECT status FROM customer_analytics.pipeline_run ORDER BY run_id DESC LIMIT 1;
SELECT count(*) > 0 AS top_customers FROM customer_analytics.top_customers;
RESET search_path;
-- not one trap went off, and no look-alike table received anything
SELECT what, count(*) AS sprung FROM public.hijack_log GROUP BY 1 ORDER BY 1;
SELECT (SELECT count(*) FROM public.fact_order_line) + (SELECT count(*) FROM public.dim_customer)
       + (SELECT count(*) FROM public.stg_orders) + (SELECT count(*) FROM public.pipeline_run) AS look_alike_rows;
-- while the extension's own tables got the victim's rows
SELECT count(*) AS victim_order_in_facts FROM customer_analytics.fact_order_line WHERE order_id = 'V-1';

\c contrib_regression
SET client_min_messages = warning;
DROP DATABASE regress_security;
DROP ROLE regress_loader1, regress_loader2, regress_analyst, regress_auditor, regress_intruder;
