-- cron_next_run() accepts what pg_cron accepts, asked of pg_cron itself for
-- each schedule of a table (cron.schedule in a subtransaction rolled back),
-- and schedule_pipeline() leaves the verdict to pg_cron.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql

CREATE FUNCTION pg_temp.pg_cron_accepts(s text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        PERFORM cron.schedule('grammar probe', s, 'SELECT 1');
        RAISE EXCEPTION USING ERRCODE = 'P0099';    -- undo the job
    EXCEPTION
        WHEN SQLSTATE 'P0099' THEN RETURN true;
        WHEN invalid_parameter_value THEN RETURN false;
    END;
END $$;
CREATE FUNCTION pg_temp.we_accept(s text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM customer_analytics.cron_next_run(s, '2026-01-30 10:07:30+00');
    RETURN true;
EXCEPTION WHEN invalid_parameter_value THEN
    RETURN false;
END $$;

-- the same verdict on every pg_cron version: names, steps, shorthands,
-- comment lines, and the leniencies of pg_cron's scanner (what follows a
-- list or the fifth field is ignored; atoi() of a long number)
SELECT CASE WHEN length(s) > 40 THEN length(s) || ' characters' ELSE s END AS schedule,
       pg_temp.pg_cron_accepts(s) AS pg_cron, pg_temp.we_accept(s) AS ours
FROM unnest(ARRAY[
    '0 9 * * mon', '0 9 * * MON', '0 9 * * monday', '0 9 * * mon-fri', '0 9 * * sun,sat',
    '0 9 * jan *', '0 9 * JAN-mar *', '* * * dec-jan *', '0 9 * * 7', '0 9 * * 8', '* * * * 7-0',
    '* * * * Sun,7', '* * 1 jan mon', 'mon * * * *', '* * * * mon/2', '*/mon * * * *', '* * * 1-12/feb *',
    '5/15 * * * *', '*/15 * * * *', '0-59/15 * * * *', '*/59 * * * *', '*/0 * * * *', '*/ * * * *',
    '5-*/2 * * * *', '-5 * * * *', '05 * * * *', '1-2,3-4/2 * * * *', '1,2,,3 * * * *', '1, * * * *',
    '5-3 * * * *', '70-3 * * * *', '5-64/30 * * * *', '* * 0 * *', '* * 32 * *', '* * * 0 *', '* * * 13 *',
    '* * * * * extra', '*5 * * * *', '5; * * * *', '*/5/3 * * * *', '1-2-3 * * * *',
    '4294967301 * * * *', '9999999999 * * * *',
    '  0 9 * * *', E'*\t*\t*\t*\t*', E'* * * * *\n', E'\n\n* * * * *', E'# a comment\n* * * * *',
    '# only a comment', '', ' ', '* * *', '* * * *', '* * * * 1-',
    '@reboot', '@restart', '@reboot now', '@hourly', '@daily', '@midnight', '@weekly', '@monthly',
    '@yearly', '@annually', '@daily foo', '@Daily', '@every', '@', '@ daily',
    '$ * * * *', '* * $5 * *', '* * * * $', '60 seconds', '0 seconds', '30 minutes',
    repeat(' ', 990) || '* * * * *', repeat(' ', 991) || '* * * * *'
]) WITH ORDINALITY AS t(s, n)
ORDER BY n;

-- where pg_cron versions differ, we accept what any of them accepts (the
-- job may run on either); pg_cron here agrees with its own version's column
WITH versions(schedule, in_1_4, in_1_6) AS (VALUES
    ('*/60 * * * *', true, false), ('* */24 * * *', true, false), ('0-3/70 * * * *', true, false),
    ('* * * jan-dec/13 *', true, false), ('* * * * */8', true, false),
    ('0 0 $ * *', false, true), ('0 0 $ * mon', false, true),
    ('30 seconds', false, true), ('1 second', false, true), ('59 SECONDS', false, true)),
here AS (
    SELECT extversion LIKE '1.4%' OR extversion < '1.4' AS old FROM pg_extension WHERE extname = 'pg_cron')
SELECT schedule, pg_temp.we_accept(schedule) AS ours,
       pg_temp.pg_cron_accepts(schedule) = CASE WHEN here.old THEN in_1_4 ELSE in_1_6 END AS pg_cron_as_documented
FROM versions, here
ORDER BY schedule;

-- what the accepted forms mean, as pg_cron evaluates them: with both day
-- fields restricted either may match, unless one begins with *; a reversed
-- range is taken as pg_cron's bit strings take it (sat-sun: never)
SELECT s AS schedule, cron_next_run(s, '2026-01-30 10:07:30+00') AS next
FROM unnest(ARRAY[
    '0 9 * * mon', '0 9 * * sat-sun', '0 0 1 feb *', '0 9 * * 7', '0 0 */2 * mon', '0 0 1,15 * mon',
    '0 0 $ * *', '0 0 $ * mon', '30 seconds', '@reboot', '* * * * * extra', '*/60 * * * *',
    '50-3 * * * *', '58-3 5 * * *', '0 0 30-2 * *', '0 0 1 11-2 *', '0 0 * * sat-mon']) WITH ORDINALITY AS t(s, n)
ORDER BY n;

-- a refusal names the field and says why
SELECT cron_next_run('5/15 * * * *');
SELECT cron_next_run('0 9 * * monday');
SELECT cron_next_run('0 9 * * 8');
SELECT cron_next_run('* * *');
SELECT cron_next_run('@often');

-- schedule_pipeline(): pg_cron judges; when it refuses, the error says why
SELECT schedule_pipeline('0 9 * * mon') > 0 AS scheduled;
SELECT jobname, schedule FROM cron.job ORDER BY jobid;
SELECT schedule_pipeline('5/15 * * * *');
-- a schedule of a newer pg_cron: accepted or not as pg_cron here decides
CREATE FUNCTION pg_temp.schedule_or_why(s text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM customer_analytics.schedule_pipeline(s);
    RETURN 'scheduled';
EXCEPTION WHEN invalid_parameter_value THEN
    RETURN SQLERRM;
END $$;
SELECT pg_temp.schedule_or_why('0 0 $ * *') = CASE WHEN pg_temp.pg_cron_accepts('0 0 $ * *') THEN 'scheduled'
                                                  ELSE 'invalid schedule: 0 0 $ * *' END AS pg_cron_decides;
SELECT unschedule_pipeline();
SELECT count(*) AS cron_jobs FROM cron.job;
