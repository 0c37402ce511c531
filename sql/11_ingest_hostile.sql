-- Input that breaks CSV files the way real exports do: each such file
-- loads its good rows, says exactly what it could not load, and accounts
-- for every row.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql

CREATE TABLE public.h (id integer PRIMARY KEY, name varchar(20) NOT NULL, amount numeric);

CREATE FUNCTION pg_temp.load(file text, encoding text DEFAULT 'UTF8')
RETURNS TABLE (file text, status text, rows_read bigint, rows_loaded bigint, rows_rejected bigint,
               accounted boolean)
LANGUAGE sql AS $$
    SELECT regexp_replace(r.file, '.*/', ''), r.status, r.rows_read, r.rows_loaded, r.rows_rejected,
           r.rows_read = r.rows_loaded + r.rows_rejected
    FROM customer_analytics.ingest_csv('public.h', current_setting('ca.data') || '/' || file,
                                       encoding => encoding, force => true) r
$$;
SELECT set_config('ca.data', :'data', false) IS NOT NULL AS ok;

-- an unterminated quote swallows the rest of the file: one reject says so
TRUNCATE public.h;
SELECT * FROM pg_temp.load('unterminated_quote.csv');
SELECT id, name FROM public.h ORDER BY id;
-- invalid UTF-8 and a NUL byte: the lines are rejected (bytes shown as
-- \xNN) and the file goes on at the next line
TRUNCATE public.h;
SELECT * FROM pg_temp.load('invalid_encoding.csv');
SELECT id, name FROM public.h ORDER BY id;
-- "\." alone on a line would end COPY's input and drop the rest
TRUNCATE public.h;
SELECT * FROM pg_temp.load('end_marker.csv');
SELECT id, name FROM public.h ORDER BY id;
-- a line ending unlike the others
TRUNCATE public.h;
SELECT * FROM pg_temp.load('mixed_eol.csv');
SELECT id, name FROM public.h ORDER BY id;
-- old Mac line endings throughout are fine
TRUNCATE public.h;
SELECT * FROM pg_temp.load('cr_only.csv');
SELECT id, name FROM public.h ORDER BY id;
-- a 200 kB line: rejected (too long for the column), its raw text kept
-- truncated to 64 kB
SELECT current_setting('data_directory') || '/ca_long_line.csv' AS long_file \gset
COPY (SELECT 'id' AS a, 'name' AS b, 'amount' AS c
      UNION ALL SELECT '1', 'ok', '1'
      UNION ALL SELECT '2', repeat('y', 200000), '2'
      UNION ALL SELECT '3', 'ok', '3') TO :'long_file' WITH (FORMAT csv);
TRUNCATE public.h;
SELECT r.status, r.rows_read, r.rows_loaded, r.rows_rejected
FROM ingest_csv('public.h', :'long_file', header => true) r;

SELECT regexp_replace(file, '.*/', '') AS file, line_number, byte_offset, sqlstate, message,
       left(raw_line, 40) AS raw_start, length(raw_line) AS raw_length, raw_truncated, detail
FROM ingest_reject WHERE file NOT LIKE '%/end_marker.csv' ORDER BY reject_id;
-- the "\." line: PostgreSQL 15 to 17 end CSV data there (the load goes on
-- after it), 18 reads it as a row of one field; rejected either way
SELECT regexp_replace(file, '.*/', '') AS file, line_number, byte_offset, sqlstate, raw_line,
       message = CASE WHEN current_setting('server_version_num')::int >= 180000 THEN 'row has 1 field, expected 3'
                      ELSE 'end-of-data marker \. in the file' END AS message_of_this_major
FROM ingest_reject WHERE file LIKE '%/end_marker.csv' ORDER BY reject_id;

-- the byte offsets point at the rejected lines
SELECT regexp_replace(r.file, '.*/', '') AS file, r.line_number,
       substring(pg_read_binary_file(r.file) FROM r.byte_offset::int + 1
                 FOR least(octet_length(r.raw_line), 40)) =
       substring(convert_to(r.raw_line, 'UTF8') FROM 1 FOR 40) AS offset_points_at_line
FROM ingest_reject r
WHERE r.file NOT LIKE '%invalid_encoding.csv' ORDER BY r.reject_id;

DROP TABLE public.h;
TRUNCATE ingest_load, ingest_reject;
