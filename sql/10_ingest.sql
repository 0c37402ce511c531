-- ingest_csv: header mapping, column_map, rejects with line and reason,
-- accounting, imputation, exactly-once, directories, limits, dry runs,
-- keys, client text, privileges.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
SELECT current_setting('data_directory') || '/ca_ingest_test.csv' AS work \gset


CREATE TABLE public.people (
    id          integer PRIMARY KEY,
    name        varchar(40) NOT NULL,
    amount      numeric CHECK (amount >= 0),
    signup_date date,
    note        text DEFAULT 'from csv',
    load_id     bigint
);

-- a header in another order, with a byte-order-free mix of quoting, a
-- field holding the delimiter, doubled quotes, an embedded newline and
-- UTF-8 beyond Latin-1; "Unused" is not a column of the table
SELECT pg_temp.masked_error(format('SELECT * FROM customer_analytics.ingest_csv(''public.people'', %L, '
                          'column_map => ''{"Signup Date": "signup_date"}'')',
                          :'data' || '/people_reordered.csv'));
SELECT status, rows_read, rows_loaded, rows_rejected
FROM ingest_csv('public.people', :'data' || '/people_reordered.csv',
                column_map => '{"Signup Date": "signup_date"}', ignore_extra_columns => true);
SELECT id, name, amount, signup_date, note, load_id = (SELECT max(load_id) FROM ingest_load) AS this_load
FROM public.people ORDER BY id;

-- every kind of bad row: each rejected with its line, column, SQLSTATE and
-- raw line; the good rows around them load
CREATE TABLE public.things (id integer PRIMARY KEY, name varchar(10) NOT NULL, amount numeric CHECK (amount >= 0));
SELECT status, rows_read, rows_loaded, rows_rejected, rows_read = rows_loaded + rows_rejected AS accounted
FROM ingest_csv('public.things', :'data' || '/row_errors.csv');
SELECT line_number, byte_offset, column_name, sqlstate, message, raw_line
FROM ingest_reject WHERE file LIKE '%/row_errors.csv' ORDER BY line_number;
SELECT * FROM public.things ORDER BY id;

-- a dry run checks everything and writes no row
TRUNCATE public.things;
SELECT status, rows_read, rows_loaded, rows_rejected
FROM ingest_csv('public.things', :'data' || '/row_errors.csv', validate => true);
SELECT count(*) AS rows_written FROM public.things;
SELECT count(*) AS rejects_recorded FROM ingest_reject
WHERE load_id = (SELECT max(load_id) FROM ingest_load);

-- abort mode: the first bad row refuses the whole file
SELECT pg_temp.masked_error(format('SELECT * FROM customer_analytics.ingest_csv(''public.things'', %L, force => true, on_error => ''abort'')',
                          :'data' || '/row_errors.csv'));
SELECT count(*) AS rows_written FROM public.things;
-- reject limits
SELECT pg_temp.masked_error(format('SELECT * FROM customer_analytics.ingest_csv(''public.things'', %L, force => true, max_rejects => 3)',
                          :'data' || '/row_errors.csv'));
SELECT pg_temp.masked_error(format('SELECT * FROM customer_analytics.ingest_csv(''public.things'', %L, force => true, max_reject_ratio => 0.5)',
                          :'data' || '/row_errors.csv'));
SELECT count(*) AS rows_written FROM public.things;
SELECT status, rows_loaded FROM ingest_csv('public.things', :'data' || '/row_errors.csv',
                                          max_rejects => 6, max_reject_ratio => 0.8, force => true);

-- encodings and odd files
CREATE TABLE public.words (id integer, name text, amount numeric);
SELECT regexp_replace(file, '.*/', '') AS file, status, rows_read, rows_loaded, rows_rejected
FROM ingest_csv('public.words', :'data' || '/latin1.csv', encoding => 'LATIN1');
SELECT regexp_replace(file, '.*/', '') AS file, status, rows_read, rows_loaded, rows_rejected
FROM ingest_csv('public.words', :'data' || '/empty.csv');
SELECT regexp_replace(file, '.*/', '') AS file, status, rows_read, rows_loaded, rows_rejected
FROM ingest_csv('public.words', :'data' || '/header_only.csv');
SELECT regexp_replace(file, '.*/', '') AS file, status, rows_read, rows_loaded, rows_rejected
FROM ingest_csv('public.words', :'data' || '/blank_lines.csv');
SELECT blank_lines FROM ingest_load WHERE file LIKE '%/blank_lines.csv';
SELECT * FROM public.words ORDER BY id, name;
-- no header: fields are the columns in order
TRUNCATE public.words;
SELECT rows_loaded FROM ingest_csv_text('public.words', E'1,one,1.5\n2,two,2.5\n', header => false);
SELECT * FROM public.words ORDER BY id;
-- other delimiter, quote and null marker
SELECT rows_loaded FROM ingest_csv_text('public.words', E'id;name;amount\n3;''semi;colon'';NA\n',
                                        delimiter => ';', quote => '''', null_string => 'NA');
SELECT * FROM public.words WHERE id = 3;

-- imputation rules: constant, column default, unknown member, previous value
CREATE TABLE public.lines (
    order_id   text NOT NULL,
    product_id text NOT NULL,
    channel    text NOT NULL DEFAULT 'web',
    quantity   integer NOT NULL,
    region     text,
    store      integer
);
INSERT INTO imputation_rule (target, column_name, rule, value) VALUES
    ('public.lines', 'product_id', 'unknown', NULL),
    ('public.lines', 'channel', 'default', NULL),
    ('public.lines', 'quantity', 'constant', '1'),
    ('public.lines', 'region', 'previous', NULL),
    ('public.lines', 'store', 'unknown', NULL);
SELECT status, rows_read, rows_loaded, rows_rejected, rows_imputed
FROM ingest_csv_text('public.lines', E'order_id,product_id,channel,quantity,region,store\n'
                                     'O1,P1,app,2,north,7\n'
                                     'O2,,,,,\n'
                                     'O3,P3,web,3,,\n'
                                     ',P4,web,1,south,1\n');
SELECT * FROM public.lines ORDER BY order_id;
SELECT imputed FROM ingest_load WHERE load_id = (SELECT max(load_id) FROM ingest_load);
-- a row given the previous value keeps it while the next row, still in
-- the same batch, brings a new one of the same size
TRUNCATE public.lines;
SELECT status, rows_loaded, rows_imputed
FROM ingest_csv_text('public.lines', E'order_id,product_id,channel,quantity,region,store\n'
                                     'P1,P1,app,2,north,7\nP2,P2,web,1,,7\nP3,P3,web,1,south,7\nP4,P4,web,1,,7\n');
SELECT order_id, region FROM public.lines ORDER BY order_id;
-- a required column the file lacks, with no rule: refused before reading
SELECT * FROM customer_analytics.ingest_csv_text('public.things', E'id,amount\n1,2\n');
\echo :LAST_ERROR_SQLSTATE
-- rules that cannot apply are refused, naming the column
INSERT INTO imputation_rule (target, column_name, rule, value) VALUES ('public.things', 'nope', 'constant', 'x');
SELECT * FROM customer_analytics.ingest_csv_text('public.things', E'id,name,amount\n1,a,2\n');
\echo :LAST_ERROR_SQLSTATE
DELETE FROM imputation_rule WHERE target = 'public.things'::regclass;

-- exactly once: the same file again is skipped, the same content under
-- another name too, a changed file loads, force reloads on purpose
CREATE TABLE public.events_in (event_id text PRIMARY KEY, kind text);
COPY (SELECT 'e' || i AS event_id, 'view' AS kind FROM generate_series(1, 5) i)
    TO :'work' WITH (FORMAT csv, HEADER);
SELECT status, rows_loaded FROM ingest_csv('public.events_in', :'work');
SELECT status, rows_loaded FROM ingest_csv('public.events_in', :'work');
SELECT status, rows_loaded FROM ingest_csv_text('public.events_in', pg_read_file(:'work'), source_name => 'same bytes');
SELECT status, rows_loaded, rows_rejected FROM ingest_csv('public.events_in', :'work', force => true);
COPY (SELECT 'e' || i AS event_id, 'click' AS kind FROM generate_series(5, 7) i)
    TO :'work' WITH (FORMAT csv, HEADER);
SELECT status, rows_loaded, rows_rejected FROM ingest_csv('public.events_in', :'work');
SELECT status, duplicate_of IS NOT NULL AS has_original, forced, rows_read, rows_loaded, rows_rejected, message
FROM ingest_load WHERE target = 'public.events_in' ORDER BY load_id;
-- the key violation is a reject with its line, found by bisecting the batch
SELECT line_number, sqlstate, message, raw_line FROM ingest_reject
WHERE target = 'public.events_in' ORDER BY reject_id;
SELECT * FROM public.events_in ORDER BY event_id;

-- foreign keys: orphans become rejects
CREATE TABLE public.parent (id integer PRIMARY KEY);
INSERT INTO public.parent VALUES (1), (2);
CREATE TABLE public.child (id integer PRIMARY KEY, parent_id integer REFERENCES public.parent);
SELECT rows_read, rows_loaded, rows_rejected
FROM ingest_csv_text('public.child', E'id,parent_id\n1,1\n2,9\n3,2\n4,8\n5,1\n');
SELECT line_number, sqlstate, message FROM ingest_reject WHERE target = 'public.child' ORDER BY line_number;
SELECT * FROM public.child ORDER BY id;
-- abort mode on key violations, found when the rows are written (a
-- duplicate key, then an orphan): the file is refused whole, naming the
-- first of them (this used to crash the backend)
SELECT * FROM customer_analytics.ingest_csv_text('public.child', E'id,parent_id\n6,1\n1,2\n7,9\n', on_error => 'abort');
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS rows_written FROM public.child WHERE id >= 6;

-- a landing directory: files in name order, only new ones, a bad file
-- recorded as failed while the others load
SELECT current_setting('data_directory') || '/ca_landing' AS landing \gset
\set extra_file :landing '/orders/orders_2025-02-extra.csv'
\set bad_file :landing '/orders/orders_2025-02-zz.csv'
CREATE TEMP TABLE generated AS
SELECT * FROM generate_sample_data(customers => 80, days => 40, seed => 21, directory => :'landing');
SELECT regexp_replace(file, '.*/', '') AS file, status, rows_read, rows_loaded, rows_rejected
FROM ingest_directory('stg_orders', :'landing' || '/orders') ORDER BY file;
SELECT count(*) AS new_files FROM ingest_directory('stg_orders', :'landing' || '/orders');
COPY (SELECT 'O-new' AS order_id, 1 AS line_number, 'C0000001' AS customer_id, 'P00001' AS product_id,
             '2025-02-10 10:00+00' AS order_ts, 1 AS quantity, 9.99 AS unit_price)
    TO :'extra_file' WITH (FORMAT csv, HEADER);
COPY (VALUES ('order_id,line_number'), ('O-late,1')) TO :'bad_file';
SET client_min_messages = error;
SELECT regexp_replace(file, '.*/', '') AS file, status, rows_loaded
FROM ingest_directory('stg_orders', :'landing' || '/orders') ORDER BY file;
SET client_min_messages = warning;
SELECT regexp_replace(file, '.*/', '') AS file, status, regexp_replace(message, '"/[^"]*/', '"') AS message
FROM ingest_load WHERE status = 'failed' ORDER BY load_id;
-- every planted defect is rejected at the line the generator recorded
SELECT d.kind, d.line_number, r.line_number = d.line_number AS same_line, r.sqlstate
FROM sample_defect d
LEFT JOIN ingest_reject r ON r.file = d.file AND r.line_number = d.line_number
WHERE d.target = 'stg_orders' ORDER BY d.file, d.line_number;
-- and every good row is staged, once
SELECT (SELECT rows FROM generated WHERE target = 'stg_orders') + 1 AS generated_plus_extra,
       (SELECT count(*) FROM stg_orders) AS staged,
       (SELECT count(DISTINCT (order_id, line_number)) FROM stg_orders) AS distinct_lines;

-- progress and summary: loads are listed with their reasons
SELECT target, status, rows_read, rows_loaded, rows_rejected, reject_reasons
FROM ingest_summary WHERE target = 'public.things' ORDER BY load_id;

-- privileges, as COPY: reading server files needs pg_read_server_files,
-- inserting needs INSERT; row-level security and user triggers are refused
CREATE ROLE ca_ingest_user;
GRANT USAGE ON SCHEMA customer_analytics TO ca_ingest_user;
GRANT SELECT, INSERT ON customer_analytics.ingest_load, customer_analytics.ingest_reject TO ca_ingest_user;
GRANT USAGE ON SEQUENCE customer_analytics.load_id_seq, customer_analytics.reject_id_seq TO ca_ingest_user;
GRANT SELECT ON customer_analytics.imputation_rule TO ca_ingest_user;
SET ROLE ca_ingest_user;
SELECT pg_temp.masked_error(format('SELECT * FROM customer_analytics.ingest_csv(''public.words'', %L)', :'data' || '/latin1.csv'));
SELECT * FROM customer_analytics.ingest_csv_text('public.words', E'id\n1\n');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
GRANT INSERT ON public.words TO ca_ingest_user;
SET ROLE ca_ingest_user;
SELECT status, rows_loaded, rows_rejected
FROM customer_analytics.ingest_csv_text('public.words', E'id,name\n9,from a client\nten,bad\n');
-- that user sees only the rejects of their own loads
SELECT count(*) AS rejects_visible, min(raw_line) FROM customer_analytics.ingest_reject;
-- row-level security on the target is refused, as COPY refuses it
RESET ROLE;
ALTER TABLE public.words ENABLE ROW LEVEL SECURITY;
SET ROLE ca_ingest_user;
SELECT * FROM customer_analytics.ingest_csv_text('public.words', E'id\n1\n');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
ALTER TABLE public.words DISABLE ROW LEVEL SECURITY;
SELECT * FROM customer_analytics.ingest_csv('public.words', 'relative/path.csv');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM customer_analytics.ingest_csv('public.words', '/nonexistent/file.csv');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM customer_analytics.ingest_csv('public.words', :'data' || '/latin1.csv', on_error => 'skip');
\echo :LAST_ERROR_SQLSTATE
CREATE FUNCTION public.noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER words_noop BEFORE INSERT ON public.words FOR EACH ROW EXECUTE FUNCTION public.noop();
SELECT * FROM customer_analytics.ingest_csv_text('public.words', E'id\n1\n');
\echo :LAST_ERROR_SQLSTATE
DROP TRIGGER words_noop ON public.words;
SELECT * FROM customer_analytics.ingest_csv_text('public.words', E'id,what,Why\n1,x,y\n');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM customer_analytics.ingest_csv_text('public.words', E'id,ID\n1,2\n');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM customer_analytics.ingest_csv_text('public.words', E'id,\n1,2\n');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM customer_analytics.ingest_csv_text('public.people', E'id,name\n1,a\n', column_map => '["id"]');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM customer_analytics.ingest_csv_text('customer_analytics.ingest_summary', E'a\n1\n');
\echo :LAST_ERROR_SQLSTATE
SET customer_analytics.ingest_allowed_directories = '/srv/landing';
SELECT pg_temp.masked_error(format('SELECT * FROM customer_analytics.ingest_csv(''public.words'', %L)', :'data' || '/latin1.csv'));
SELECT * FROM customer_analytics.ingest_csv('public.words', '/srv/landing/../../etc/passwd');
\echo :LAST_ERROR_SQLSTATE
RESET customer_analytics.ingest_allowed_directories;

DROP OWNED BY ca_ingest_user;
DROP ROLE ca_ingest_user;
DROP TABLE public.people, public.things, public.words, public.lines, public.events_in,
           public.child, public.parent;
DROP FUNCTION public.noop();
TRUNCATE ingest_load, ingest_reject, imputation_rule, stg_customers, stg_products, stg_orders, stg_events,
         sample_anomaly, sample_defect;
