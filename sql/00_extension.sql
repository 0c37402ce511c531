-- Extension lifecycle: CREATE without pg_cron, DROP leaves nothing, re-create
-- with pg_cron installed.  The settings only: this test makes the extension.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/settings.sql

-- pg_cron is preloaded in this instance but not installed in the database:
-- customer_analytics must not need it.
SELECT count(*) AS pg_cron_installed FROM pg_extension WHERE extname = 'pg_cron';
CREATE EXTENSION customer_analytics;
SELECT extname, extversion, extrelocatable, n.nspname AS schema
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE extname = 'customer_analytics';

-- every object the extension created is a member of it
SELECT count(*) > 20 AS has_members
FROM pg_depend WHERE refobjid = (SELECT oid FROM pg_extension WHERE extname = 'customer_analytics')
  AND deptype = 'e';

-- with data in its tables, DROP EXTENSION still removes every object it made
SELECT * FROM customer_analytics.generate_sample_data(customers => 50, days => 10, seed => 1)
ORDER BY target;
DROP EXTENSION customer_analytics;
SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = n.oid) AS relations,
       (SELECT count(*) FROM pg_proc WHERE pronamespace = n.oid) AS functions,
       (SELECT count(*) FROM pg_type WHERE typnamespace = n.oid) AS types
FROM pg_namespace n WHERE nspname = 'customer_analytics';
-- CREATE EXTENSION makes the control file's schema, which is not a member
-- of the extension (PostgreSQL refuses that): only the empty schema is left.
DROP SCHEMA customer_analytics;

-- with pg_cron installed too, and re-created from scratch
CREATE EXTENSION pg_cron;
CREATE EXTENSION customer_analytics;
SELECT count(*) AS leftover_rows FROM customer_analytics.stg_orders;
SELECT extname FROM pg_extension WHERE extname IN ('pg_cron', 'customer_analytics') ORDER BY 1;

-- installing into another schema is refused: the extension is not relocatable
DROP EXTENSION customer_analytics;
DROP SCHEMA customer_analytics;
CREATE SCHEMA elsewhere;
\set VERBOSITY terse
CREATE EXTENSION customer_analytics SCHEMA elsewhere;
\set VERBOSITY default
DROP SCHEMA elsewhere;
CREATE EXTENSION customer_analytics;
