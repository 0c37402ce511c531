\set ca_echo_outer :ECHO
\set ECHO none
-- The start of every test: the common settings (settings.sql), the
-- extension, created when the test runs alone (pg_cron first, where it
-- may live, as 00_extension leaves them), the star schema on the
-- search_path, and two helpers: pg_temp.reset_warehouse() and
-- pg_temp.masked_error().
\ir settings.sql
SELECT current_database() = current_setting('cron.database_name', true) AS ca_cron_here \gset
\if :ca_cron_here
CREATE EXTENSION IF NOT EXISTS pg_cron;
\endif
CREATE EXTENSION IF NOT EXISTS customer_analytics;
SET search_path = customer_analytics, public;

-- Empty the warehouse as a test that builds its own shop needs it: staging,
-- facts, transform bookkeeping and the dimensions (their unknown members
-- stay).  also: more tables emptied in the same TRUNCATE (those a test
-- asserts on, e.g. alert, ingest_load); dates: dim_date too.
CREATE PROCEDURE pg_temp.reset_warehouse(also text[] DEFAULT '{}', dates boolean DEFAULT false)
LANGUAGE plpgsql AS $$
BEGIN
    -- a name without a schema is the extension's, documented or internal
    EXECUTE (SELECT 'TRUNCATE ' || string_agg(CASE WHEN t LIKE '%.%' THEN t
                                                   ELSE COALESCE(to_regclass('customer_analytics.' || t),
                                                                 to_regclass('customer_analytics_internal.' || t))::text END, ', ')
             FROM unnest(ARRAY['stg_customers', 'stg_products', 'stg_orders', 'stg_events', 'fact_order_line',
                               'fact_event', 'transform_state'] || also) t);
    DELETE FROM customer_analytics.dim_customer WHERE customer_key <> -1;
    DELETE FROM customer_analytics.dim_product WHERE product_key <> -1;
    IF dates THEN
        DELETE FROM customer_analytics.dim_date;
    END IF;
END
$$;
-- An error whose message names a path of this run (a fixture under
-- @abs_srcdir@, a file the test made under @data_directory@): what psql
-- would show, as text, with those two paths masked, or 'ok'.  pg_regress
-- cannot mask output any more; errors without such a path are left for
-- psql to show.
SET ca_test.abs_srcdir = :'abs_srcdir';
SELECT set_config('ca_test.data_directory', current_setting('data_directory'), false) AS ca_data_directory \gset
CREATE FUNCTION pg_temp.masked_error(statement text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    st text; msg text; det text; hin text;
BEGIN
    EXECUTE statement;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
                            det = PG_EXCEPTION_DETAIL, hin = PG_EXCEPTION_HINT;
    -- the data directory lies inside the source tree: masked first (read
    -- once by the superuser: a test may be under SET ROLE here)
    RETURN replace(replace(
        concat_ws(E'\n', st || ': ' || msg, 'DETAIL: ' || NULLIF(det, ''), 'HINT: ' || NULLIF(hin, '')),
        current_setting('ca_test.data_directory'), '@data_directory@'),
        current_setting('ca_test.abs_srcdir'), '@abs_srcdir@');
END
$$;
\set ECHO :ca_echo_outer
