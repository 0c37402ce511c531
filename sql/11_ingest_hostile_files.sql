-- Hostile files in a landing directory: symbolic links in and out of the
-- allowed directories, a link swapped between two loads, a FIFO, a
-- directory and a device named *.csv, a dangling link.  Ingestion checks
-- the file it actually opened, reads only regular files, and a landing
-- directory loads its good files while each hostile entry is a failed load
-- with its reason.  generate_sample_data() writes through no link and into
-- no FIFO.  (FIFOs with a writer, sockets and cancels are in
-- t/019_hostile_files.pl.)
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql

-- the files are made by the server's user, in a directory of the test
-- instance, with COPY TO PROGRAM (this runs as a superuser)
SELECT current_setting('data_directory') || '/ca_hostile' AS dir \gset
SELECT set_config('ca.dir', :'dir', false) IS NOT NULL AS ok;
CREATE FUNCTION pg_temp.sh(cmd text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('COPY (SELECT 1) TO PROGRAM %L',
                   format('set -e; mkdir -p %s; cd %s; %s', current_setting('ca.dir'), current_setting('ca.dir'), cmd));
END
$$;
CREATE FUNCTION pg_temp.load(file text) RETURNS text LANGUAGE sql AS $$
    SELECT pg_temp.masked_error(format('SELECT * FROM customer_analytics.ingest_csv(%L, %L, force => true)',
                              'public.hf', current_setting('ca.dir') || '/' || file))
$$;

SELECT pg_temp.sh('mkdir landing store elsewhere');
CREATE TABLE public.hf (id integer PRIMARY KEY, name text NOT NULL);
SELECT pg_temp.sh($$printf 'id,name\n1,one\n2,two\n' > landing/good1.csv; printf 'id,name\n3,three\n' > landing/good2.csv; $$ ||
                  $$printf 'id,name\n4,four\n5,five\n' > store/four.csv; printf 'id,name\n6,six\n' > store/six.csv$$);
SELECT pg_temp.sh('cd landing; ln -s ../store/four.csv linked.csv; ln -s /etc/passwd outside.csv; '
                  'ln -s /dev/null null.csv; ln -s missing.csv dangling.csv; mkdir dir.csv; mkfifo fifo.csv; '
                  'ln -s ../store/six.csv swap.csv');
SELECT set_config('customer_analytics.ingest_allowed_directories',
                  :'dir' || '/landing, ' || :'dir' || '/store', false) IS NOT NULL AS confined;

-- a link that stays inside the allowed directories is read
SELECT pg_temp.load('landing/linked.csv');
-- a link leading out is refused, naming the link and where it leads; the
-- target's lines never reach ingest_reject
SELECT pg_temp.load('landing/outside.csv');
SELECT count(*) AS passwd_lines_rejected FROM ingest_reject WHERE raw_line LIKE 'root:%';
-- a link to a device, refused as outside; allowed, refused as a device
SELECT pg_temp.load('landing/null.csv');
SELECT set_config('customer_analytics.ingest_allowed_directories',
                  :'dir' || '/landing, ' || :'dir' || '/store, /dev', false) IS NOT NULL AS dev_allowed;
SELECT pg_temp.load('landing/null.csv');
SELECT set_config('customer_analytics.ingest_allowed_directories',
                  :'dir' || '/landing, ' || :'dir' || '/store', false) IS NOT NULL AS confined;
-- a FIFO without a writer is refused at once (it used to block open()
-- for good), so is a directory named *.csv, and a dangling link
SELECT pg_temp.load('landing/fifo.csv');
SELECT pg_temp.load('landing/dir.csv');
SELECT pg_temp.load('landing/dangling.csv');
-- a link swapped between two loads: the second load checks what it opens
SELECT pg_temp.load('landing/swap.csv');
SELECT pg_temp.sh('ln -sfn /etc/passwd landing/swap.csv');
SELECT pg_temp.load('landing/swap.csv');
-- a landing directory that is itself a link out is refused whole
SELECT pg_temp.sh('ln -s /etc etc_link');
SELECT set_config('customer_analytics.ingest_allowed_directories',
                  :'dir', false) IS NOT NULL AS whole_dir_allowed;
SELECT pg_temp.masked_error(format('SELECT * FROM customer_analytics.ingest_directory(%L, %L)', 'public.hf', :'dir' || '/etc_link'));
SELECT set_config('customer_analytics.ingest_allowed_directories',
                  :'dir' || '/landing, ' || :'dir' || '/store', false) IS NOT NULL AS confined;
SELECT id, name FROM public.hf ORDER BY id;

-- the whole landing directory: the good files and the link inside load,
-- each hostile entry is a failed load with its reason (and a WARNING)
TRUNCATE public.hf;
TRUNCATE ingest_load, ingest_reject;
SET client_min_messages = error;
SELECT regexp_replace(file, '.*/', '') AS file, status, rows_loaded
FROM ingest_directory('public.hf', :'dir' || '/landing') ORDER BY file;
SET client_min_messages = warning;
SELECT regexp_replace(file, '.*/', '') AS file, status, replace(message, current_setting('data_directory'), '@data_directory@') AS message
FROM ingest_load WHERE status = 'failed' ORDER BY file;
SELECT id, name FROM public.hf ORDER BY id;
-- the next run loads nothing again (the hostile entries are reported again)
SET client_min_messages = error;
SELECT status, count(*) FROM ingest_directory('public.hf', :'dir' || '/landing') GROUP BY 1 ORDER BY 1;
SET client_min_messages = warning;
RESET customer_analytics.ingest_allowed_directories;

-- generate_sample_data() writing: a table's directory that is a link, a
-- file that is a link, a file that is a FIFO are all refused, and neither
-- the link's target nor the FIFO is touched
SELECT files FROM generate_sample_data(customers => 20, days => 3, events => false, defects => false,
                                       directory => :'dir' || '/gen') WHERE target = 'stg_customers';
SELECT pg_ls_dir(:'dir' || '/gen/customers') AS first_file ORDER BY 1 LIMIT 1 \gset
SELECT pg_temp.sh('echo precious > elsewhere/victim.txt; mkdir gen2; ln -s ../elsewhere gen2/customers; '
                  'rm gen/customers/' || :'first_file' || '; ln -s ../../elsewhere/victim.txt gen/customers/' || :'first_file');
SELECT pg_temp.masked_error(format('SELECT * FROM customer_analytics.generate_sample_data(customers => 20, days => 3, events => false, directory => %L)',
                          :'dir' || '/gen2'));
SELECT pg_temp.masked_error(format('SELECT * FROM customer_analytics.generate_sample_data(customers => 20, days => 3, events => false, directory => %L)',
                          :'dir' || '/gen'));
SELECT pg_temp.sh('rm gen/customers/' || :'first_file' || '; mkfifo gen/customers/' || :'first_file');
SELECT pg_temp.masked_error(format('SELECT * FROM customer_analytics.generate_sample_data(customers => 20, days => 3, events => false, directory => %L)',
                          :'dir' || '/gen'));
SELECT pg_read_file(:'dir' || '/elsewhere/victim.txt') AS victim,
       (SELECT count(*) FROM pg_ls_dir(:'dir' || '/elsewhere')) AS files_in_elsewhere;
-- still a FIFO (test -p fails otherwise)
SELECT pg_temp.sh('test -p gen/customers/' || :'first_file');

SELECT pg_temp.sh('cd ..; rm -rf ca_hostile');
DROP TABLE public.hf;
TRUNCATE ingest_load, ingest_reject, stg_customers, stg_products, stg_orders, stg_events,
         sample_anomaly, sample_defect;
