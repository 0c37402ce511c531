-- Sample-data generator: determinism, file mode = table mode, planted
-- defects and anomalies, argument checks, realism.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql

-- checksum of the data columns of every staging table (bookkeeping excluded)
CREATE TEMP VIEW staged_checksums AS
SELECT 'stg_customers' AS tbl, count(*) AS rows,
       md5(string_agg(concat_ws('|', customer_id, name, email, city, state, country, signup_date, updated_at),
                      E'\n' ORDER BY customer_id, updated_at)) AS checksum
FROM stg_customers
UNION ALL
SELECT 'stg_products', count(*),
       md5(string_agg(concat_ws('|', product_id, name, category, subcategory, unit_cost, list_price, updated_at),
                      E'\n' ORDER BY product_id, updated_at))
FROM stg_products
UNION ALL
SELECT 'stg_orders', count(*),
       md5(string_agg(concat_ws('|', order_id, line_number, customer_id, product_id, order_ts, quantity,
                                unit_price, discount, status, channel),
                      E'\n' ORDER BY order_id, line_number))
FROM stg_orders
UNION ALL
SELECT 'stg_events', count(*),
       md5(string_agg(concat_ws('|', event_id, event_ts, customer_id, session_id, event_type, product_id,
                                order_id, channel, device),
                      E'\n' ORDER BY event_id))
FROM stg_events;

CREATE FUNCTION pg_temp.clear_staging() RETURNS void LANGUAGE sql AS $$
    TRUNCATE customer_analytics.stg_customers, customer_analytics.stg_products,
             customer_analytics.stg_orders, customer_analytics.stg_events;
$$;

-- 1. table mode, twice: identical data
SELECT * FROM generate_sample_data(customers => 300, days => 60, seed => 42) ORDER BY target;
CREATE TEMP TABLE run1 AS SELECT * FROM staged_checksums;
SELECT pg_temp.clear_staging();
SELECT * FROM generate_sample_data(customers => 300, days => 60, seed => 42) ORDER BY target;
CREATE TEMP TABLE run2 AS SELECT * FROM staged_checksums;
SELECT r1.tbl, r1.rows, r1.checksum = r2.checksum AS same_data
FROM run1 r1 JOIN run2 r2 USING (tbl) ORDER BY r1.tbl;
-- pinned: a change to the generator's output shows up here
SELECT tbl, rows, checksum FROM run1 ORDER BY tbl;

-- every staged row of one table carries that table's load id
SELECT count(DISTINCT load_id) AS load_ids, bool_and(load_id IS NOT NULL) AS all_set FROM stg_orders;

-- another seed, other data
SELECT pg_temp.clear_staging();
SELECT count(*) FROM generate_sample_data(customers => 300, days => 60, seed => 43);
SELECT s.tbl, s.checksum <> r1.checksum AS differs
FROM staged_checksums s JOIN run1 r1 USING (tbl) ORDER BY s.tbl;

-- 2. file mode without defects holds exactly the rows of table mode
SELECT pg_temp.clear_staging();
SELECT current_setting('data_directory') || '/ca_regress_sample' AS sample_dir \gset
SELECT target, rows, planted_defects, files
FROM generate_sample_data(customers => 300, days => 60, seed => 42, directory => :'sample_dir', defects => false)
ORDER BY target;
-- the layout the README describes: <directory>/<name>/<name>_YYYY-MM.csv
SELECT t AS folder, string_agg(f, ' ' ORDER BY f) AS files
FROM unnest(ARRAY['customers', 'products', 'orders', 'events']) t,
     pg_ls_dir(:'sample_dir' || '/' || t) f
GROUP BY t ORDER BY t;
DO $$
DECLARE
    dir text := current_setting('data_directory') || '/ca_regress_sample';
    t text;
    f text;
BEGIN
    FOREACH t IN ARRAY ARRAY['customers', 'products', 'orders', 'events'] LOOP
        FOR f IN SELECT pg_ls_dir(dir || '/' || t) ORDER BY 1 LOOP
            EXECUTE format('COPY customer_analytics.stg_%s (%s) FROM %L WITH (FORMAT csv, HEADER true)',
                           t, split_part(pg_read_file(dir || '/' || t || '/' || f), E'\n', 1),
                           dir || '/' || t || '/' || f);
        END LOOP;
    END LOOP;
END
$$;
SELECT s.tbl, s.rows, s.checksum = r1.checksum AS same_as_table_mode
FROM staged_checksums s JOIN run1 r1 USING (tbl) ORDER BY s.tbl;

-- 3. file mode with defects: each planted row is where sample_defect says
SELECT target, rows, planted_defects, files
FROM generate_sample_data(customers => 300, days => 60, seed => 42, directory => :'sample_dir')
ORDER BY target;
SELECT regexp_replace(file, '^.*/', '') AS file, line_number, target, kind,
       split_part(pg_read_file(file), E'\n', line_number::int) AS planted_line
FROM sample_defect ORDER BY target, file, line_number;
-- the lines of all files: header + good rows + defects, nothing else
SELECT t AS tbl,
       sum(array_length(string_to_array(rtrim(pg_read_file(:'sample_dir' || '/' || t || '/' || f), E'\n'), E'\n'), 1)) AS lines,
       count(*) AS files
FROM unnest(ARRAY['customers', 'products', 'orders', 'events']) AS t,
     LATERAL pg_ls_dir(:'sample_dir' || '/' || t) AS f
GROUP BY t ORDER BY t;

-- 4. ground truth of planted anomalies
SELECT seed, series, day, kind, round(factor::numeric, 3) AS factor FROM sample_anomaly ORDER BY day;

-- 5. arguments and privileges
\set VERBOSITY terse
SELECT * FROM generate_sample_data(customers => 0);
SELECT * FROM generate_sample_data(days => 0);
SELECT * FROM generate_sample_data(products => 3);
SELECT * FROM generate_sample_data(seed => NULL);
SELECT * FROM generate_sample_data(start_date => 'infinity');
SELECT * FROM generate_sample_data(directory => 'relative/path');
CREATE ROLE ca_generator_user;
GRANT USAGE ON SCHEMA customer_analytics TO ca_generator_user;
SET ROLE ca_generator_user;
SELECT * FROM customer_analytics.generate_sample_data(customers => 10, days => 5, directory => '/tmp/x');
SELECT * FROM customer_analytics.generate_sample_data(customers => 10, days => 5);
RESET ROLE;
\set VERBOSITY default
DROP OWNED BY ca_generator_user;
DROP ROLE ca_generator_user;

-- 6. realism, on a shop of realistic size (8000 customers, five months)
SELECT pg_temp.clear_staging();
SELECT count(*) FROM generate_sample_data(customers => 8000, days => 150, seed => 7);
CREATE TEMP TABLE lines AS
SELECT o.*, p.category, (o.order_ts AT TIME ZONE 'UTC')::date AS day,
       o.quantity * o.unit_price - o.discount AS revenue
FROM stg_orders o JOIN stg_products p USING (product_id);

WITH per AS (SELECT customer_id, count(DISTINCT order_id) AS orders
             FROM lines WHERE customer_id IS NOT NULL GROUP BY 1)
SELECT mode() WITHIN GROUP (ORDER BY orders) = 1 AS most_buyers_buy_once,
       max(orders) >= 10 AS some_buy_often
FROM per;

WITH per AS (SELECT customer_id, sum(revenue) AS r FROM lines
             WHERE customer_id IS NOT NULL AND status = 'completed' GROUP BY 1),
     ranked AS (SELECT r, percent_rank() OVER (ORDER BY r DESC) AS pr FROM per)
SELECT sum(r) FILTER (WHERE pr < 0.1) / sum(r) > 0.35 AS top_decile_over_35pct FROM ranked;

WITH daily AS (SELECT day, count(DISTINCT order_id) AS orders FROM lines GROUP BY day)
SELECT avg(orders) FILTER (WHERE extract(isodow FROM day) = 7)
         > 1.1 * avg(orders) FILTER (WHERE extract(isodow FROM day) = 5) AS sundays_beat_fridays,
       avg(orders) FILTER (WHERE day >= '2025-04-01')
         > avg(orders) FILTER (WHERE day < '2025-03-01') AS upward_trend
FROM daily;

SELECT status, round(100.0 * count(DISTINCT order_id) / sum(count(DISTINCT order_id)) OVER (), 0) AS pct_orders
FROM lines GROUP BY status ORDER BY status;

SELECT category, avg(unit_price) > 100 AS pricey, avg(unit_price) < 15 AS cheap
FROM lines GROUP BY category ORDER BY category;

-- planted anomalies stand out against the category's usual day
WITH daily AS (SELECT category, day, count(*) AS lines FROM lines GROUP BY 1, 2),
     usual AS (SELECT category, percentile_cont(0.5) WITHIN GROUP (ORDER BY lines) AS median
               FROM daily GROUP BY 1)
SELECT a.series, a.day, a.kind,
       CASE WHEN a.kind = 'spike' THEN coalesce(d.lines, 0) > 1.8 * u.median
            ELSE coalesce(d.lines, 0) < 0.5 * u.median END AS stands_out
FROM sample_anomaly a
JOIN usual u ON u.category = a.series
LEFT JOIN daily d ON d.category = a.series AND d.day = a.day
ORDER BY a.day;
WITH daily AS (SELECT day, count(DISTINCT order_id) AS orders FROM lines GROUP BY 1)
SELECT a.day, d.orders < 0.6 * (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY orders) FROM daily) AS outage_visible
FROM sample_anomaly a JOIN daily d USING (day) WHERE a.series = 'total' ORDER BY a.day;

-- clickstream: anonymous visitors, funnel drop-off, purchases tied to orders
SELECT round(100.0 * count(DISTINCT session_id) FILTER (WHERE customer_id IS NULL)
             / count(DISTINCT session_id), -1) AS pct_sessions_with_anonymous_events
FROM stg_events;
SELECT event_type, count(DISTINCT session_id) AS sessions
FROM stg_events GROUP BY event_type ORDER BY sessions DESC;
SELECT count(*) AS purchases,
       count(*) FILTER (WHERE order_id IN (SELECT order_id FROM stg_orders)) AS tied_to_an_order
FROM stg_events WHERE event_type = 'purchase';

SELECT pg_temp.clear_staging();
TRUNCATE sample_anomaly, sample_defect;
