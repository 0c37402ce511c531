-- Incremental maintenance of the sales views and of customer_rfm: after
-- random appends, re-staged (changed) order lines, late data for old days,
-- a product changing category, customers' new versions and deleted lines,
-- what is built from the incrementally kept rollups equals a computation
-- from the facts (rfm(as_of) for customer_rfm), and segment_summary and
-- top_customers (segment_summary from per-segment sums kept as scores are
-- written) equal a computation over customer_rfm.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
-- recency from after every order line: customer_rfm is scored from its rollup
SET customer_analytics.as_of = '2030-01-01 00:00+00';

CALL pg_temp.reset_warehouse();
SELECT count(*) > 0 AS generated FROM generate_sample_data(customers => 300, days => 90, seed => 11, events => false);
SELECT count(*) > 0 AS transformed FROM transform();
SELECT refresh_sales_rollup() > 0 AS first_build;

-- the same figures straight from the facts (the views' definitions before
-- the rollups); a credit note (negative quantity) is no order, and its
-- customer did not buy
CREATE TEMP VIEW expected_day AS
SELECT d.date AS day, sum(f.revenue) AS revenue, count(DISTINCT f.order_id) FILTER (WHERE f.quantity > 0) AS orders,
       count(DISTINCT c.customer_id) FILTER (WHERE f.customer_key <> -1 AND f.quantity > 0) AS customers
FROM fact_order_line f JOIN dim_date d USING (date_key) JOIN dim_customer c USING (customer_key)
WHERE f.status = 'completed' GROUP BY 1;
CREATE TEMP VIEW expected_category AS
SELECT d.date AS day, p.category, sum(f.revenue) AS revenue, count(DISTINCT f.order_id) FILTER (WHERE f.quantity > 0) AS orders,
       sum(f.quantity) AS units
FROM fact_order_line f JOIN dim_date d USING (date_key) JOIN dim_product p USING (product_key)
WHERE f.status = 'completed' GROUP BY 1, 2;

-- segment_summary and top_customers from scratch, over customer_rfm
-- (avg_recency_days: the average of exact day counts from last_purchase)
CREATE TEMP VIEW expected_segment_summary AS
SELECT c.segment, count(*) AS customers, sum(c.monetary) AS revenue,
       round(sum(c.monetary) / NULLIF(sum(sum(c.monetary)) OVER (), 0), 4) AS revenue_share,
       round(sum(c.monetary) / NULLIF(sum(c.frequency), 0), 2) AS avg_order_value,
       round(avg(c.frequency), 2) AS avg_orders,
       round(sum(EXTRACT(epoch FROM c.as_of - s.last_purchase)) / (count(*) * 86400), 1) AS avg_recency_days
FROM customer_rfm c JOIN customer_rfm_score s USING (customer_id)
GROUP BY c.segment;
CREATE TEMP VIEW expected_top_customers AS
SELECT t.rank, t.customer_id, t.customer_key, d.name, d.email, d.city, d.country,
       t.monetary, t.frequency, t.recency_days, t.rfm_cell, t.segment
FROM (SELECT c.*, row_number() OVER (ORDER BY c.monetary DESC, c.customer_id) AS rank FROM customer_rfm c) t
LEFT JOIN dim_customer d ON d.customer_key = t.customer_key
WHERE t.rank <= top_customers_limit();

-- (refreshes the views on customer_rfm first, as the pipeline would)
CREATE FUNCTION pg_temp.differences() RETURNS TABLE (what text, n bigint) LANGUAGE plpgsql AS $$
BEGIN
    REFRESH MATERIALIZED VIEW CONCURRENTLY customer_analytics.segment_summary;
    REFRESH MATERIALIZED VIEW CONCURRENTLY customer_analytics.top_customers;
    RETURN QUERY
    SELECT 'segment_summary', count(*) FROM ((TABLE expected_segment_summary EXCEPT ALL TABLE segment_summary)
                                             UNION ALL (TABLE segment_summary EXCEPT ALL TABLE expected_segment_summary)) x
    UNION ALL
    SELECT 'top_customers', count(*) FROM ((TABLE expected_top_customers EXCEPT ALL TABLE top_customers)
                                           UNION ALL (TABLE top_customers EXCEPT ALL TABLE expected_top_customers)) x
    UNION ALL
    SELECT 'rollup day', count(*) FROM ((TABLE expected_day EXCEPT TABLE sales_rollup_day)
                                        UNION ALL (TABLE sales_rollup_day EXCEPT TABLE expected_day)) x
    UNION ALL
    SELECT 'rollup category', count(*) FROM ((TABLE expected_category EXCEPT TABLE sales_rollup_category)
                                             UNION ALL (TABLE sales_rollup_category EXCEPT TABLE expected_category)) x
    UNION ALL
    SELECT 'daily_sales', count(*) FROM (
        (SELECT day, revenue, orders, customers FROM daily_sales WHERE orders > 0 EXCEPT TABLE expected_day)
        UNION ALL (TABLE expected_day EXCEPT SELECT day, revenue, orders, customers FROM daily_sales)) x
    UNION ALL
    SELECT 'product_category_sales', count(*) FROM (
        (SELECT period_start, category, revenue, orders, units FROM product_category_sales
         WHERE grain = 'day' AND orders > 0 EXCEPT TABLE expected_category)
        UNION ALL (TABLE expected_category EXCEPT SELECT period_start, category, revenue, orders, units
                   FROM product_category_sales WHERE grain = 'day')) x
    UNION ALL
    SELECT 'customer_rfm', count(*) FROM (
        (SELECT customer_key, customer_id, recency_days, frequency, monetary, r, f, m, rfm_cell, segment
         FROM customer_rfm EXCEPT ALL SELECT * FROM rfm(reference_time()))
        UNION ALL (SELECT * FROM rfm(reference_time()) EXCEPT ALL
                   SELECT customer_key, customer_id, recency_days, frequency, monetary, r, f, m, rfm_cell, segment
                   FROM customer_rfm)) x;
END $$;
-- one pipeline step's worth: the rollup, then the views
CREATE FUNCTION pg_temp.refresh() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    days bigint := customer_analytics.refresh_sales_rollup();
BEGIN
    PERFORM customer_analytics.refresh_customer_rfm();
    REFRESH MATERIALIZED VIEW customer_analytics.daily_sales;
    REFRESH MATERIALIZED VIEW customer_analytics.product_category_sales;
    RETURN days;
END $$;
SELECT pg_temp.refresh() AS days_recomputed;
SELECT * FROM pg_temp.differences();

-- 1. appends: new orders on the last days and on days after them
SELECT setseed(0.11);
SELECT max(order_ts) AS last_ts FROM fact_order_line \gset
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel)
SELECT 'NEW-' || g, 1, (SELECT customer_id FROM stg_customers ORDER BY customer_id OFFSET (g * 7) % 250 LIMIT 1),
       (SELECT product_id FROM stg_products ORDER BY product_id OFFSET (g * 3) % 100 LIMIT 1),
       :'last_ts'::timestamptz - interval '2 days' + (random() * 5) * interval '1 day',
       1 + (random() * 3)::int, round((5 + random() * 100)::numeric, 2), 0, 'completed', 'web'
FROM generate_series(1, 60) g;
-- and a return (a completed line with negative revenue)
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel)
SELECT 'RET-1', 1, (SELECT customer_id FROM stg_customers ORDER BY customer_id LIMIT 1),
       (SELECT product_id FROM stg_products ORDER BY product_id LIMIT 1), :'last_ts', 1, 10, 25, 'completed', 'web';
-- and credit notes: returns booked as their own orders, negative quantities
-- (two lines each; CN-5 at price 0, worth nothing)
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel)
SELECT 'CN-' || g, l, (SELECT customer_id FROM stg_customers ORDER BY customer_id OFFSET (g * 13) % 250 LIMIT 1),
       (SELECT product_id FROM stg_products ORDER BY product_id OFFSET (g + l) % 100 LIMIT 1),
       :'last_ts'::timestamptz - (g % 4) * interval '1 day', -l, CASE WHEN g = 5 THEN 0 ELSE 7.50 END, 0, 'completed', 'web'
FROM generate_series(1, 8) g, generate_series(1, 2) l;
SELECT count(*) > 0 AS transformed FROM transform();
-- new orders are queued, not recomputed
SELECT count(*) AS customers_noted, (SELECT count(*) FROM customer_analytics_internal.rfm_new_line) AS lines_queued FROM customer_analytics_internal.rfm_dirty_customer;
SELECT pg_temp.refresh() BETWEEN 1 AND 7 AS only_recent_days;
SELECT min(revenue) < 0 AS has_a_return FROM fact_order_line WHERE status = 'completed';
SELECT count(*) AS credit_lines, sum(revenue) AS credited FROM fact_order_line WHERE quantity < 0;
SELECT * FROM pg_temp.differences();

-- 1b. a line added to an order loaded before: the order is not new (one
-- purchase, not two), its customer is recomputed
SELECT frequency AS frequency_before FROM customer_rfm
WHERE customer_id = (SELECT customer_id FROM stg_orders WHERE order_id = 'NEW-1') \gset
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel)
SELECT order_id, 2, customer_id, product_id, order_ts + interval '1 minute', 1, 5, 0, 'completed', channel
FROM stg_orders WHERE order_id = 'NEW-1';
SELECT count(*) > 0 AS transformed FROM transform();
SELECT pg_temp.refresh() >= 0 AS refreshed;
SELECT frequency = :frequency_before AS same_purchases FROM customer_rfm
WHERE customer_id = (SELECT customer_id FROM stg_orders WHERE order_id = 'NEW-1' LIMIT 1);
SELECT * FROM pg_temp.differences() WHERE what IN ('customer_rfm', 'segment_summary', 'top_customers');

-- 2. re-staged lines: some completed lines come again cancelled or with new quantities
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel)
SELECT order_id, line_number, customer_id, product_id, order_ts,
       quantity + sign(quantity)::int, unit_price, discount, CASE WHEN random() < 0.5 THEN 'cancelled' ELSE status END, channel
FROM (SELECT DISTINCT ON (order_id, line_number) * FROM stg_orders ORDER BY order_id, line_number, stage_id DESC) s
WHERE status = 'completed' AND random() < 0.03;
SELECT count(*) > 0 AS transformed FROM transform();
SELECT pg_temp.refresh() > 0 AS recomputed;
SELECT * FROM pg_temp.differences();

-- 3. late-arriving orders for old days
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel)
SELECT 'LATE-' || g, l, (SELECT customer_id FROM stg_customers ORDER BY customer_id OFFSET (g * 11) % 250 LIMIT 1),
       (SELECT product_id FROM stg_products ORDER BY product_id OFFSET (g + l) % 100 LIMIT 1),
       timestamptz '2025-01-03 10:00+00' + (g % 20) * interval '1 day', 2, 9.99, 0, 'completed', 'app'
FROM generate_series(1, 20) g, generate_series(1, 2) l;
SELECT count(*) > 0 AS transformed FROM transform();
SELECT pg_temp.refresh() AS days_recomputed;
SELECT * FROM pg_temp.differences();

-- 4. a product moves to another category (SCD1): all its days change
INSERT INTO stg_products (product_id, name, category, subcategory, unit_cost, list_price, updated_at)
SELECT product_id, name, 'Clearance', subcategory, unit_cost, list_price, now()
FROM dim_product WHERE product_key = (SELECT product_key FROM fact_order_line WHERE status = 'completed'
                                      GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1);
SELECT count(*) > 0 AS transformed FROM transform();
SELECT pg_temp.refresh() > 10 AS many_days;
SELECT count(*) > 0 AS clearance_rows FROM sales_rollup_category WHERE category = 'Clearance';
SELECT * FROM pg_temp.differences();

-- 4b. customers change (new SCD2 versions): their current key moves
INSERT INTO stg_customers (customer_id, name, email, city, state, country, signup_date, updated_at)
SELECT customer_id, name, email, 'Elsewhere', state, country, signup_date, :'last_ts'::timestamptz + interval '1 hour'
FROM dim_customer WHERE is_current AND customer_key <> -1 ORDER BY customer_id LIMIT 5;
SELECT count(*) > 0 AS transformed FROM transform();
SELECT count(*) AS customers_noted FROM customer_analytics_internal.rfm_dirty_customer;
SELECT pg_temp.refresh() >= 0 AS refreshed;
SELECT count(*) AS moved_customers_scored FROM customer_rfm r JOIN dim_customer d USING (customer_key)
WHERE d.city = 'Elsewhere' AND d.is_current;
SELECT * FROM pg_temp.differences();

-- 5. lines deleted from the facts
DELETE FROM fact_order_line WHERE order_id IN (SELECT order_id FROM fact_order_line ORDER BY order_id LIMIT 25);
SELECT pg_temp.refresh() > 0 AS recomputed;
SELECT * FROM pg_temp.differences();

-- nothing changed: nothing recomputed, no score rewritten
SELECT pg_temp.refresh() AS days_recomputed;
SELECT refresh_customer_rfm() AS rfm_rows_written;

-- only time passes (whole days: no rank can change): recency moves in the
-- view, not one score row is rewritten, and customer_rfm is still rfm(as_of)
CREATE TEMP TABLE score_versions AS
SELECT s.customer_id, s.xmin::text AS version, c.recency_days FROM customer_rfm_score s JOIN customer_rfm c USING (customer_id);
CREATE TEMP TABLE segment_summary_before AS SELECT segment, avg_recency_days AS before FROM segment_summary;
SET customer_analytics.as_of = '2030-01-02 00:00+00';
SELECT refresh_customer_rfm() AS rfm_rows_written;
SELECT * FROM pg_temp.differences() WHERE what IN ('customer_rfm', 'segment_summary', 'top_customers');
SET customer_analytics.as_of = '2030-01-09 00:00+00';
SELECT refresh_customer_rfm() AS rfm_rows_written;
SELECT * FROM pg_temp.differences() WHERE what IN ('customer_rfm', 'segment_summary', 'top_customers');
SELECT count(*) AS customers,
       count(*) FILTER (WHERE s.xmin::text <> v.version) AS rows_rewritten,
       count(*) FILTER (WHERE c.recency_days = v.recency_days + 8) AS recency_8_days_more
FROM customer_rfm_score s JOIN score_versions v USING (customer_id) JOIN customer_rfm c USING (customer_id);
-- segment_summary's recency moved with the time, not with a rewritten row
SELECT count(*) AS segments, count(*) FILTER (WHERE avg_recency_days = v.before + 8) AS recency_8_days_more
FROM segment_summary s JOIN segment_summary_before v USING (segment);
SET customer_analytics.as_of = '2030-01-01 00:00+00';
SELECT refresh_customer_rfm() AS rfm_rows_written;

-- an as_of before the newest lines: scored from the facts, still rfm(as_of)
SET customer_analytics.as_of = '2025-01-20 00:00+00';
SELECT refresh_customer_rfm() > 0 AS rescored;
SELECT * FROM pg_temp.differences() WHERE what IN ('customer_rfm', 'segment_summary', 'top_customers');
SELECT DISTINCT as_of FROM customer_rfm;
SET customer_analytics.as_of = '2030-01-01 00:00+00';
SELECT refresh_customer_rfm() > 0 AS rescored;
SELECT * FROM pg_temp.differences() WHERE what IN ('customer_rfm', 'segment_summary', 'top_customers');

-- the customer_rfm view keeps rfm()'s columns and types
SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
WHERE a.attrelid = 'customer_rfm'::regclass AND a.attnum > 0 ORDER BY a.attnum;

-- a full rebuild gives the same rollups
CREATE TEMP TABLE incremental_day AS TABLE sales_rollup_day;
CREATE TEMP TABLE incremental_category AS TABLE sales_rollup_category;
CREATE TEMP TABLE incremental_rfm AS TABLE rfm_rollup_customer;
SELECT refresh_sales_rollup(full_refresh => true) > 0 AS rebuilt;
SELECT refresh_customer_rfm(full_refresh => true) AS rfm_rows_written;
SELECT count(*) AS rfm_rollup_differences FROM ((TABLE incremental_rfm EXCEPT TABLE rfm_rollup_customer)
                                                UNION ALL (TABLE rfm_rollup_customer EXCEPT TABLE incremental_rfm)) x;
-- the rebuild's C scan (rfm_rollup_rows) against rfm_agg over rfm_orders in
-- SQL, on a shop with guests, versions and deleted lines
WITH c AS (SELECT * FROM customer_analytics_internal.rfm_rollup_rows('infinity')),
     sql AS (SELECT o.customer_id, cur.customer_key, (o.s).last_order, (o.s).frequency, (o.s).monetary
             FROM (SELECT x.customer_id, rfm_agg(x.ts, x.amount) AS s
                   FROM customer_analytics_internal.rfm_orders(NULL, 'infinity') x GROUP BY x.customer_id) o
             LEFT JOIN dim_customer cur ON cur.customer_id = o.customer_id AND cur.is_current
                                       AND cur.customer_key <> -1)
SELECT (SELECT count(*) FROM c) > 0 AS some_rows,
       (SELECT count(*) FROM ((TABLE c EXCEPT ALL TABLE sql) UNION ALL (TABLE sql EXCEPT ALL TABLE c)) x) AS rollup_rows_differences;
SELECT (SELECT count(*) FROM ((TABLE incremental_day EXCEPT TABLE sales_rollup_day)
                              UNION ALL (TABLE sales_rollup_day EXCEPT TABLE incremental_day)) x) AS day_differences,
       (SELECT count(*) FROM ((TABLE incremental_category EXCEPT TABLE sales_rollup_category)
                              UNION ALL (TABLE sales_rollup_category EXCEPT TABLE incremental_category)) x) AS category_differences;

-- the scores truncated: the per-segment sums go with them, and come back
-- with the rows the next refresh writes
TRUNCATE customer_rfm_score;
SELECT count(*) AS segment_sums FROM customer_analytics_internal.rfm_segment_stat;
SELECT refresh_customer_rfm() > 0 AS rescored;
SELECT * FROM pg_temp.differences() WHERE what IN ('customer_rfm', 'segment_summary', 'top_customers');

-- TRUNCATE empties the rollups at the next refresh
TRUNCATE fact_order_line CASCADE;
SELECT pg_temp.refresh() AS days_after_truncate;
SELECT count(*) AS rollup_days FROM sales_rollup_day;
SELECT count(*) AS rfm_customers FROM customer_rfm;
SELECT * FROM pg_temp.differences();
