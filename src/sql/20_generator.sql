/*
 * Deterministic sample data (src/generator.c) and its ground truth.
 */

CREATE TABLE customer_analytics.sample_anomaly (
    seed   integer NOT NULL,
    series text NOT NULL,
    day    date NOT NULL,
    kind   text NOT NULL CHECK (kind IN ('spike', 'drop')),
    factor float8 NOT NULL CHECK (factor >= 0),
    PRIMARY KEY (series, day)
);
COMMENT ON TABLE customer_analytics.sample_anomaly IS
    'Ground truth of the last generate_sample_data() run: planted spikes and drops. series is a product category, or ''total'' for a shop-wide drop that hits every category';

CREATE TABLE customer_analytics.sample_defect (
    file        text NOT NULL,
    line_number bigint NOT NULL,
    target      text NOT NULL,
    kind        text NOT NULL,
    PRIMARY KEY (file, line_number)
);
COMMENT ON TABLE customer_analytics.sample_defect IS
    'Ground truth of the last generate_sample_data() run in file mode: malformed rows planted in the CSV files (file, line, which staging table, what is wrong)';

SELECT pg_catalog.pg_extension_config_dump('customer_analytics.sample_anomaly', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.sample_defect', '');

CREATE FUNCTION customer_analytics.generate_sample_data(
    customers  integer DEFAULT 10000,
    days       integer DEFAULT 365,
    seed       integer DEFAULT 42,
    directory  text    DEFAULT NULL,
    start_date date    DEFAULT '2025-01-01',
    products   integer DEFAULT 200,
    events     boolean DEFAULT true,
    defects    boolean DEFAULT true)
RETURNS TABLE (target text, rows bigint, planted_defects integer, files integer)
AS 'MODULE_PATHNAME', 'ca_generate_sample_data'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION customer_analytics.generate_sample_data(integer, integer, integer, text, date, integer, boolean, boolean) IS
    'Generate a deterministic e-commerce data set (same arguments, same bytes): customers, products, order lines, clickstream events, with planted anomalies recorded in sample_anomaly. Without a directory the rows go straight into the staging tables; with one they are written as monthly CSV files (<directory>/<table>/<table>_YYYY-MM.csv) with malformed rows planted and recorded in sample_defect';
