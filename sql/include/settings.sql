\set ca_echo :ECHO
\set ECHO none
-- The session every test starts from, also after \c into a database of
-- its own: quiet notices, UTC, ISO dates, and the test's paths as psql
-- variables.  pg_regress no longer rewrites input/ and output/ *.source
-- files (PostgreSQL 15 dropped that); it exports PG_ABS_SRCDIR instead,
-- which 15 to 18 all set.  Not echoed: the expected files show only the
-- two lines before this comment, so that a change here is not a change
-- of every expected file.
SET client_min_messages = warning;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
-- the checkout (README.md, docs/) and its fixtures
\getenv abs_srcdir PG_ABS_SRCDIR
\set data :abs_srcdir '/sql/data'
-- the real public data sets, outside the repository; absent: tests skip
\getenv shared CA_SHARED_DATA
\if :{?shared}
\else
\set shared '/nonexistent'
\endif
\set ECHO :ca_echo
