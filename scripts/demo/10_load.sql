-- Demo step: the sample shop arrives as CSV exports in a landing directory;
-- ingestion loads them (keeping the malformed rows aside), then the
-- transform builds the star schema.
-- psql variables: customers, days, out (a directory the server can write)
\set landing :out '/landing'
\timing on
\echo '== writing the sample shop as monthly CSV exports into' :landing
SELECT target, rows, planted_defects, files
FROM customer_analytics.generate_sample_data(customers => :customers, days => :days, seed => 42,
                                            start_date => current_date - :days,
                                            directory => :'landing')
ORDER BY target;

\echo '== ingesting every landing directory (dimensions first)'
SET client_min_messages = warning;
SELECT target, count(*) AS files, sum(rows_read) AS rows_read, sum(rows_loaded) AS rows_loaded,
       sum(rows_rejected) AS rows_rejected, round(sum(seconds)::numeric, 2) AS seconds
FROM (SELECT 'stg_customers' AS target, * FROM customer_analytics.ingest_directory('customer_analytics.stg_customers', :'landing' || '/customers')
      UNION ALL
      SELECT 'stg_products', * FROM customer_analytics.ingest_directory('customer_analytics.stg_products', :'landing' || '/products')
      UNION ALL
      SELECT 'stg_orders', * FROM customer_analytics.ingest_directory('customer_analytics.stg_orders', :'landing' || '/orders')
      UNION ALL
      SELECT 'stg_events', * FROM customer_analytics.ingest_directory('customer_analytics.stg_events', :'landing' || '/events')) loads
GROUP BY target ORDER BY min(load_id);
RESET client_min_messages;

\echo '== rows that could not be loaded, with where and why'
SELECT regexp_replace(file, '^.*/', '') AS file, line_number AS line, column_name AS "column",
       sqlstate, message, left(raw_line, 60) AS raw_line
FROM customer_analytics.ingest_reject ORDER BY file, line_number;

\echo '== transforming staging into the star schema'
SELECT * FROM customer_analytics.transform();
\timing off
