/*
 * Ingestion (src/ingest.c): CSV files and client text into any table,
 * through PostgreSQL's COPY parser, with rejected rows kept, missing values
 * imputed, and each file content loaded once per target.
 */

CREATE SEQUENCE customer_analytics.reject_id_seq;

CREATE TABLE customer_analytics.ingest_load (
    load_id       bigint PRIMARY KEY,
    target        text NOT NULL,
    file          text NOT NULL,
    file_size     bigint,
    file_mtime    timestamptz,
    checksum      text,
    status        text NOT NULL CHECK (status IN ('loaded', 'validated', 'skipped', 'failed')),
    forced        boolean NOT NULL DEFAULT false,
    duplicate_of  bigint,
    rows_read     bigint NOT NULL DEFAULT 0,
    rows_loaded   bigint NOT NULL DEFAULT 0,
    rows_rejected bigint NOT NULL DEFAULT 0,
    rows_imputed  bigint NOT NULL DEFAULT 0,
    blank_lines   bigint NOT NULL DEFAULT 0,
    imputed       jsonb NOT NULL DEFAULT '{}',
    options       jsonb NOT NULL DEFAULT '{}',
    message       text,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL,
    loaded_by     text NOT NULL DEFAULT current_user,
    CHECK (rows_read = rows_loaded + rows_rejected OR status IN ('validated', 'skipped', 'failed'))
);
-- exactly once: one (non-forced) load of a content per target
CREATE UNIQUE INDEX ingest_load_once_idx ON customer_analytics.ingest_load (target, checksum)
    WHERE status = 'loaded' AND NOT forced;
CREATE INDEX ingest_load_file_idx ON customer_analytics.ingest_load (target, file);
COMMENT ON TABLE customer_analytics.ingest_load IS
    'One row per file (or client text) given to ingestion: where from, its size, mtime and SHA-256, the outcome (loaded, validated = dry run, skipped = content already loaded, failed) and the row counts; rows_read = rows_loaded + rows_rejected for every load';
COMMENT ON COLUMN customer_analytics.ingest_load.imputed IS 'Number of imputed fields per column';
COMMENT ON COLUMN customer_analytics.ingest_load.blank_lines IS 'Empty lines, which hold no row and are not counted in rows_read';

CREATE TABLE customer_analytics.ingest_reject (
    reject_id      bigint PRIMARY KEY DEFAULT pg_catalog.nextval('customer_analytics.reject_id_seq'),
    load_id        bigint NOT NULL,
    target         text NOT NULL,
    file           text NOT NULL,
    line_number    bigint NOT NULL,
    byte_offset    bigint,
    raw_line       text,
    raw_truncated  boolean NOT NULL DEFAULT false,
    column_name    text,
    sqlstate       text NOT NULL,
    message        text NOT NULL,
    detail         text,
    rejected_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    loaded_by      text NOT NULL DEFAULT current_user
);
CREATE INDEX ingest_reject_load_idx ON customer_analytics.ingest_reject (load_id, line_number);
COMMENT ON TABLE customer_analytics.ingest_reject IS
    'Rows ingestion could not load: the load, the file, the line where the row starts and its byte offset, the raw line as it was in the file, the column, SQLSTATE and message. Invalid bytes in raw_line are written as \\xNN; lines longer than 64 kB are truncated (raw_truncated)';

/*
 * Rejected lines are raw user data, possibly personal: a user sees the
 * rejects of the loads they ran; reading everyone's needs ownership or a
 * grant of the ingest_reject_reader role-like BYPASSRLS privilege.
 */
ALTER TABLE customer_analytics.ingest_reject ENABLE ROW LEVEL SECURITY;
CREATE POLICY ingest_reject_own ON customer_analytics.ingest_reject
    USING (loaded_by = current_user);

CREATE TABLE customer_analytics.imputation_rule (
    target      regclass NOT NULL,
    column_name name NOT NULL,
    rule        text NOT NULL CHECK (rule IN ('constant', 'default', 'unknown', 'previous')),
    value       text,
    PRIMARY KEY (target, column_name),
    CHECK ((rule = 'constant') = (value IS NOT NULL))
);
COMMENT ON TABLE customer_analytics.imputation_rule IS
    'How ingestion fills a missing (NULL or absent) value of a column: constant (value), default (the column DEFAULT), unknown (-1 for numbers, ''#unknown'' for text: the unknown member of the dimensions), previous (the last value loaded in that column in the same load)';

SELECT pg_catalog.pg_extension_config_dump('customer_analytics.ingest_load', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.ingest_reject', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.imputation_rule', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.reject_id_seq', '');

CREATE FUNCTION customer_analytics.ingest_csv(
    target               regclass,
    path                 text,
    header               boolean DEFAULT true,
    delimiter            text    DEFAULT ',',
    quote                text    DEFAULT '"',
    escape               text    DEFAULT NULL,
    null_string          text    DEFAULT '',
    encoding             text    DEFAULT 'UTF8',
    column_map           jsonb   DEFAULT NULL,
    ignore_extra_columns boolean DEFAULT false,
    on_error             text    DEFAULT 'reject',
    max_rejects          bigint  DEFAULT NULL,
    max_reject_ratio     float8  DEFAULT NULL,
    force                boolean DEFAULT false,
    validate             boolean DEFAULT false)
RETURNS TABLE (load_id bigint, file text, status text, rows_read bigint, rows_loaded bigint,
               rows_rejected bigint, rows_imputed bigint, seconds float8)
AS 'MODULE_PATHNAME', 'ca_ingest_csv'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION customer_analytics.ingest_csv(regclass, text, boolean, text, text, text, text, text, jsonb, boolean, text, bigint, float8, boolean, boolean) IS
    'Load a server-side CSV file into a table through COPY''s parser: columns matched by header name (any order, case-insensitive, after column_map), bad rows kept in ingest_reject with line, column and reason while the good rows load (on_error => ''abort'' to refuse the file instead), missing values imputed by imputation_rule, a content already loaded into the target skipped unless force, validate => true for a dry run. Needs superuser or pg_read_server_files';

CREATE FUNCTION customer_analytics.ingest_csv_text(
    target               regclass,
    data                 text,
    header               boolean DEFAULT true,
    delimiter            text    DEFAULT ',',
    quote                text    DEFAULT '"',
    escape               text    DEFAULT NULL,
    null_string          text    DEFAULT '',
    column_map           jsonb   DEFAULT NULL,
    ignore_extra_columns boolean DEFAULT false,
    on_error             text    DEFAULT 'reject',
    max_rejects          bigint  DEFAULT NULL,
    max_reject_ratio     float8  DEFAULT NULL,
    force                boolean DEFAULT false,
    validate             boolean DEFAULT false,
    source_name          text    DEFAULT 'client data')
RETURNS TABLE (load_id bigint, file text, status text, rows_read bigint, rows_loaded bigint,
               rows_rejected bigint, rows_imputed bigint, seconds float8)
AS 'MODULE_PATHNAME', 'ca_ingest_csv_text'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION customer_analytics.ingest_csv_text(regclass, text, boolean, text, text, text, text, jsonb, boolean, text, bigint, float8, boolean, boolean, text) IS
    'ingest_csv() for CSV text sent by the client (psql, BI tools, drivers): same mapping, rejects, imputation and exactly-once semantics; source_name is what ingest_load and ingest_reject record as the file';

CREATE FUNCTION customer_analytics.ingest_directory(
    target               regclass,
    directory            text,
    pattern              text    DEFAULT '*.csv',
    header               boolean DEFAULT true,
    delimiter            text    DEFAULT ',',
    quote                text    DEFAULT '"',
    escape               text    DEFAULT NULL,
    null_string          text    DEFAULT '',
    encoding             text    DEFAULT 'UTF8',
    column_map           jsonb   DEFAULT NULL,
    ignore_extra_columns boolean DEFAULT false,
    on_error             text    DEFAULT 'reject',
    max_rejects          bigint  DEFAULT NULL,
    max_reject_ratio     float8  DEFAULT NULL)
RETURNS TABLE (load_id bigint, file text, status text, rows_read bigint, rows_loaded bigint,
               rows_rejected bigint, rows_imputed bigint, seconds float8)
AS 'MODULE_PATHNAME', 'ca_ingest_directory'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION customer_analytics.ingest_directory(regclass, text, text, boolean, text, text, text, text, text, jsonb, boolean, text, bigint, float8) IS
    'Load every new file of a landing directory whose name matches pattern (shell glob), in name order, each like ingest_csv(): a file already loaded (same name, size and modification time, or same content) is passed over; a file that fails is recorded as failed and the others still load. Made for a pg_cron job every minute';

CREATE VIEW customer_analytics.ingest_summary AS
SELECT l.load_id, l.target, l.file, l.status, l.rows_read, l.rows_loaded, l.rows_rejected,
       l.rows_imputed, l.finished_at, l.finished_at - l.started_at AS duration,
       (SELECT string_agg(DISTINCT r.message, '; ') FROM customer_analytics.ingest_reject r
        WHERE r.load_id = l.load_id) AS reject_reasons
FROM customer_analytics.ingest_load l;
COMMENT ON VIEW customer_analytics.ingest_summary IS
    'Loads with their counts and the distinct reasons their rows were rejected';
