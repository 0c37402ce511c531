-- Returns booked as credit notes: a line of negative quantity, status
-- completed, on its own document.  It nets against revenue everywhere and
-- against monetary, is no purchase or order, and moves neither first nor
-- last purchase; a zero quantity is refused at ingestion with its line.
-- A hand-made shop whose every figure is worked out in the comments.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
BEGIN;
CALL pg_temp.reset_warehouse(also => '{ingest_load, ingest_reject}');
SELECT refresh_customer_rfm(full_refresh => true) >= 0 AS rfm_cleared;
INSERT INTO stg_customers (customer_id, name, updated_at)
SELECT c, 'Customer ' || c, '2025-01-01' FROM unnest('{A,B,C,D,E}'::text[]) c;
INSERT INTO stg_products (product_id, name, category, updated_at)
VALUES ('MUG', 'Mug', 'Kitchen', '2025-01-01'), ('TEA', 'Tea', 'Food', '2025-01-01');

-- A: 1001 (30.00 + 5.00) on 1 March, 1002 (20.00) on 5 March, a credit
--    note for one mug (-12.50) on 9 March, a credit line at price 0 on 10 March
-- B: 2001 (12.50) on 2 March, returned whole on 3 March
-- C: only a credit note (-15.00) on 4 March, for a purchase before the data
-- D: a line of quantity 0: refused with its line (10 of the file)
-- E: 6001 (10.00) on 1 March, 6002 (5.00) on 2 March returned the same day
SELECT rows_read, rows_loaded, rows_rejected
FROM ingest_csv_text('customer_analytics.stg_orders', $csv$order_id,line_number,customer_id,product_id,order_ts,quantity,unit_price
1001,1,A,MUG,2025-03-01 10:00+00,2,15.00
1001,2,A,TEA,2025-03-01 10:00+00,1,5.00
1002,1,A,TEA,2025-03-05 09:00+00,4,5.00
C1001,1,A,MUG,2025-03-09 16:00+00,-1,12.50
C1002,1,A,TEA,2025-03-10 12:00+00,-1,0
2001,1,B,MUG,2025-03-02 11:00+00,1,12.50
C2001,1,B,MUG,2025-03-03 12:00+00,-1,12.50
C3001,1,C,TEA,2025-03-04 12:00+00,-3,5.00
5001,1,D,MUG,2025-03-06 12:00+00,0,12.50
6001,1,E,TEA,2025-03-01 12:00+00,2,5.00
6002,1,E,TEA,2025-03-02 12:00+00,1,5.00
C6002,1,E,TEA,2025-03-02 18:00+00,-1,5.00
$csv$, source_name => 'credit_notes.csv');
SELECT file, line_number, raw_line, message FROM ingest_reject ORDER BY reject_id;
SELECT count(*) > 0 AS transformed FROM transform();
SELECT order_id, quantity, unit_price, revenue FROM fact_order_line WHERE quantity < 0 ORDER BY order_id;

-- end of the data: midnight after 10 March (the price-0 credit line is a
-- completed line too)
SELECT reference_time();

-- A: 2 purchases, 55.00 - 12.50 = 42.50, last purchase 5 March (5 days
-- before the 11th: 5.6 whole days = 5); B: 1 purchase, 0.00; C absent (no
-- purchase); E: 2 purchases, 10.00 + 5.00 - 5.00 = 10.00
SELECT customer_id, recency_days, frequency, monetary FROM rfm() ORDER BY customer_id;
-- customer_rfm from its rollup, incrementally: the same
CREATE FUNCTION pg_temp.rfm_differences() RETURNS bigint LANGUAGE sql AS $$
    SELECT count(*) FROM (
        (SELECT customer_key, customer_id, recency_days, frequency, monetary, r, f, m, rfm_cell, segment
         FROM customer_analytics.customer_rfm EXCEPT ALL SELECT * FROM customer_analytics.rfm())
        UNION ALL (SELECT * FROM customer_analytics.rfm() EXCEPT ALL
                   SELECT customer_key, customer_id, recency_days, frequency, monetary, r, f, m, rfm_cell, segment
                   FROM customer_analytics.customer_rfm)) x
$$;
SELECT refresh_customer_rfm() > 0 AS scored;
SELECT pg_temp.rfm_differences() AS differences;
-- a later credit note for A, queued and added: still rfm()
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price)
VALUES ('C1003', 1, 'A', 'TEA', '2025-03-10 13:00+00', -2, 5.00);
SELECT count(*) > 0 AS transformed FROM transform();
SELECT count(*) AS lines_queued FROM customer_analytics_internal.rfm_new_line;
SELECT refresh_customer_rfm() > 0 AS rescored;
SELECT customer_id, frequency, monetary FROM customer_rfm WHERE customer_id = 'A';
SELECT pg_temp.rfm_differences() AS differences;
-- and the full recompute from the facts agrees
SELECT refresh_customer_rfm(full_refresh => true) AS rows_rewritten;
-- the full rebuild reads the facts in C (rfm_rollup_rows): the same rows as
-- rfm_agg over rfm_orders in SQL, C's frequency 0 and no last order included
CREATE FUNCTION pg_temp.rollup_rows_sql(up_to timestamptz)
RETURNS TABLE (customer_id text, customer_key bigint, last_order timestamptz, frequency bigint, monetary numeric)
LANGUAGE sql AS $$
    SELECT o.customer_id, cur.customer_key, (o.s).last_order, (o.s).frequency, (o.s).monetary
    FROM (SELECT x.customer_id, customer_analytics.rfm_agg(x.ts, x.amount) AS s
          FROM customer_analytics_internal.rfm_orders(NULL, up_to) x GROUP BY x.customer_id) o
    LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = o.customer_id AND cur.is_current
                                                 AND cur.customer_key <> -1
$$;
SELECT customer_id, customer_key IS NOT NULL AS current_key, last_order, frequency, monetary
FROM customer_analytics_internal.rfm_rollup_rows('infinity') ORDER BY customer_id;
CREATE FUNCTION pg_temp.rollup_rows_differences(up_to timestamptz) RETURNS bigint LANGUAGE sql AS $$
    SELECT count(*) FROM (
        (SELECT * FROM customer_analytics_internal.rfm_rollup_rows(up_to) EXCEPT ALL SELECT * FROM pg_temp.rollup_rows_sql(up_to))
        UNION ALL (SELECT * FROM pg_temp.rollup_rows_sql(up_to) EXCEPT ALL SELECT * FROM customer_analytics_internal.rfm_rollup_rows(up_to))) d
$$;
SELECT u AS up_to, pg_temp.rollup_rows_differences(u) AS differences
FROM unnest('{infinity, 2025-03-02 12:00+00, 2025-03-09 16:00+00}'::timestamptz[]) u ORDER BY u;

-- daily sales net the credit notes; a credit note is no order, and its
-- customer did not buy that day
SELECT refresh_sales_rollup(full_refresh => true) > 0 AS rolled_up;
REFRESH MATERIALIZED VIEW daily_sales;
REFRESH MATERIALIZED VIEW product_category_sales;
SELECT day, revenue, orders, customers, avg_order_value FROM daily_sales ORDER BY day;
SELECT period_start, category, revenue, orders, units FROM product_category_sales
WHERE grain = 'month' ORDER BY category;
-- the total of the forecasts' series is the net total too
SELECT sum(revenue) AS series_total FROM sales_series('2025-03-01', '2025-03-10') WHERE scope = 'total';

-- CLV: a day of credit notes alone is no purchase day; it nets against the
-- purchase day before it.  A: 1 March (35.00), 5 March (20.00 - 12.50 -
-- 10.00 = -2.50, the credits of 9 and 10 March): m_x NULL, nothing to
-- scale.  B: one purchase day netting to 0.  E: 1 March, 2 March netting to
-- 0 (m_x NULL).  C: no purchase day, absent.
SELECT customer_id, first_purchase, x, t_x, m_x, purchase_days, revenue
FROM clv_summary(reference_time()) ORDER BY customer_id;
-- clv_summary reads the lines in C: the same rows as its SQL formula,
-- before the credit notes, between them and after
\i :abs_srcdir/sql/include/clv_summary_sql.sql
SELECT a AS as_of, pg_temp.clv_summary_differences(a) AS differences
FROM unnest('{2025-03-01 11:00+00, 2025-03-02 12:00+00, 2025-03-04 00:00+00, 2025-03-09 16:00+00, 2025-03-11 00:00+00}'::timestamptz[]) a
ORDER BY a;
-- under row-level security the lines are read through SQL, so the policy
-- holds: an analyst who may not see A's lines gets B and E only
CREATE ROLE ca_clv_analyst;
GRANT USAGE ON SCHEMA customer_analytics, customer_analytics_internal TO ca_clv_analyst;
GRANT SELECT ON ALL TABLES IN SCHEMA customer_analytics TO ca_clv_analyst;
ALTER TABLE fact_order_line ENABLE ROW LEVEL SECURITY;
CREATE POLICY not_a ON fact_order_line FOR SELECT TO ca_clv_analyst
    USING (customer_key NOT IN (SELECT customer_key FROM dim_customer WHERE customer_id = 'A'));
SET ROLE ca_clv_analyst;
SELECT customer_id, x, m_x, revenue FROM clv_summary(reference_time()) ORDER BY customer_id;
SELECT pg_temp.clv_summary_differences(reference_time()) AS differences;
RESET ROLE;
ALTER TABLE fact_order_line DISABLE ROW LEVEL SECURITY;
SELECT gamma_gamma_expected_value(ROW(10, 3, 20, 0, 10)::gamma_gamma_model, 1, NULL) IS NULL AS no_spend_to_scale;

-- the quality check flags a sale with negative revenue, not a credit note
SELECT check_name, passed, failing_rows FROM run_checks(only_target => 'customer_analytics.fact_order_line')
WHERE check_name = 'no negative revenue';
ROLLBACK;
