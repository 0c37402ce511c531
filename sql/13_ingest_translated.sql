-- How a bad file is recovered from does not depend on the language of the
-- server's messages: under German lc_messages an unterminated quote is
-- still recognised as one (it used to be found by its English message).
-- Needs the OS locale de_DE.UTF-8 (scripts/common.sh generates it) and
-- PostgreSQL's German message catalog; without them the test says it was
-- skipped (expected/13_ingest_translated_1.out).
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql

CREATE FUNCTION pg_temp.speak_german() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        PERFORM set_config('lc_messages', 'de_DE.UTF-8', false);
    EXCEPTION WHEN invalid_parameter_value THEN
        RETURN false;           -- no such locale
    END;
    BEGIN
        PERFORM 1 / 0;
    EXCEPTION WHEN division_by_zero THEN
        RETURN SQLERRM <> 'division by zero';  -- no German catalog: English
    END;
END $$;
SELECT pg_temp.speak_german() AS translated \gset
\if :translated
CREATE TABLE public.h13 (id integer PRIMARY KEY, name varchar(20) NOT NULL, amount numeric);
SELECT r.status, r.rows_read, r.rows_loaded, r.rows_rejected
FROM ingest_csv('public.h13', :'data' || '/unterminated_quote.csv', force => true) r;
SELECT id, name FROM public.h13 ORDER BY id;
-- COPY's own message is German; the SQLSTATE, the raw text and our detail
-- are what the English run gives (11_ingest_hostile)
SELECT line_number, byte_offset, sqlstate, message <> 'unterminated CSV quoted field' AS message_translated,
       raw_line, detail
FROM ingest_reject WHERE file LIKE '%/unterminated_quote.csv' ORDER BY reject_id DESC LIMIT 1;
DROP TABLE public.h13;
\else
\echo 'skipped: no de_DE.UTF-8 locale or no German messages for PostgreSQL'
\endif
RESET lc_messages;
