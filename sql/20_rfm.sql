-- RFM: rfm_agg, quintile_breaks/quintile_score, segment maps, rfm() on the
-- star schema and on a user's table, the views, parallel plans.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql

------------------------------------------------------------------------
-- rfm_agg: hand-computed cases
------------------------------------------------------------------------
CREATE TEMP TABLE orders (customer text, ts timestamptz, amount numeric);
INSERT INTO orders VALUES
  -- two purchases and a return: the return nets monetary, not frequency
  ('a', '2025-01-01 10:00', 100.00), ('a', '2025-01-05 10:00', 50.25), ('a', '2025-01-09 10:00', -20.00),
  -- a single purchase
  ('b', '2025-01-03 00:00', 10),
  -- NULL amount: a purchase worth 0; NULL timestamp: not an order at all
  ('c', '2025-01-02 00:00', NULL), ('c', NULL, 999),
  -- only a return: no purchase, negative monetary
  ('d', '2025-01-04 00:00', -5.5),
  -- exact money beyond float precision
  ('e', '2025-01-01', 0.0001), ('e', '2025-01-02', 12345678901234.5678);
SELECT customer, (s).first_order, (s).last_order, (s).frequency, (s).monetary, (s).returns
FROM (SELECT customer, rfm_agg(ts, amount) AS s FROM orders GROUP BY customer) x
ORDER BY customer;
-- no rows: NULL, like sum()
SELECT rfm_agg(ts, amount) IS NULL AS empty_is_null FROM orders WHERE false;
-- the state is a concrete type (Citus pushes such aggregates down)
SELECT t.typname, t.typlen, a.aggcombinefn <> 0 AS has_combine, p.proparallel
FROM pg_aggregate a JOIN pg_proc p ON p.oid = a.aggfnoid JOIN pg_type t ON t.oid = a.aggtranstype
WHERE a.aggfnoid = 'customer_analytics.rfm_agg(timestamptz, numeric)'::regprocedure;
-- amounts with more than four decimals are refused, not rounded
SELECT rfm_agg(now(), 0.00001);
SELECT rfm_agg(now(), 'NaN'::numeric);

------------------------------------------------------------------------
-- quintile_breaks = percentile_disc(0.2, 0.4, 0.6, 0.8)
------------------------------------------------------------------------
SELECT setseed(0.42);
CREATE TEMP TABLE rnd AS
SELECT g % 7 AS grp, CASE WHEN g % 3 = 0 THEN round(random() * 20)   -- many ties
                          WHEN g % 11 = 0 THEN NULL
                          ELSE random() * 1000 END AS x
FROM generate_series(1, 20000) g;
SELECT grp, quintile_breaks(x) = percentile_disc(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY x) AS equal
FROM rnd GROUP BY grp ORDER BY grp;
-- small and degenerate inputs
SELECT n, (SELECT quintile_breaks(v) FROM generate_series(1, n) v) AS ours,
          (SELECT percentile_disc(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY v) FROM generate_series(1, n) v) AS percentile_disc
FROM unnest(ARRAY[1, 2, 3, 4, 5, 6, 7, 10]) n ORDER BY n;
SELECT quintile_breaks(x) FROM (VALUES (NULL::float8)) v(x);
SELECT quintile_breaks(7) FROM generate_series(1, 9);

------------------------------------------------------------------------
-- quintile_score: equal values always share a score; NTILE splits ties
------------------------------------------------------------------------
-- ten customers, six of them with exactly two orders
CREATE TEMP TABLE freq (customer text, orders int);
INSERT INTO freq VALUES ('k1', 1), ('k2', 1), ('k3', 2), ('k4', 2), ('k5', 2), ('k6', 2),
                        ('k7', 2), ('k8', 2), ('k9', 5), ('k10', 9);
SELECT customer, orders,
       ntile(5) OVER (ORDER BY orders) AS ntile,
       quintile_score(orders, (SELECT quintile_breaks(orders) FROM freq)) AS quintile_score
FROM freq ORDER BY orders, customer;
-- the ties NTILE split: the same value, different scores
SELECT count(DISTINCT nt) AS ntile_scores_for_2_orders, count(DISTINCT qs) AS our_scores_for_2_orders
FROM (SELECT orders, ntile(5) OVER (ORDER BY orders, customer) AS nt,
             quintile_score(orders, (SELECT quintile_breaks(orders) FROM freq)) AS qs FROM freq) s
WHERE orders = 2;
-- boundaries: a value equal to a break scores in the lower band; descending reverses
SELECT v, quintile_score(v, ARRAY[10, 20, 30, 40]) AS asc_score,
       quintile_score(v, ARRAY[10, 20, 30, 40], true) AS desc_score
FROM unnest(ARRAY[-1, 10, 10.5, 20, 39.9, 40, 41]::float8[]) v ORDER BY v;
-- all equal: everyone scores 1 (nobody is above anybody)
SELECT DISTINCT quintile_score(7, (SELECT quintile_breaks(7) FROM generate_series(1, 9))) FROM generate_series(1, 9);
SELECT quintile_score(1, ARRAY[1, 2, 3]);
SELECT quintile_score(1, ARRAY[4, 3, 2, 1]);
SELECT quintile_score(1, ARRAY[1, NULL, 3, 4]);
SELECT quintile_score(1, ARRAY[1, 2, 3, 4], NULL) IS NULL AS strict;

------------------------------------------------------------------------
-- segment maps
------------------------------------------------------------------------
-- the default map names every one of the 125 cells exactly once ...
SELECT count(*) AS cells, count(*) FILTER (WHERE rules = 1) AS named_once FROM rfm_map_coverage('default');
SELECT * FROM rfm_check_segment_map('default');
-- ... and agrees with the documented R x F rules in every cell
SELECT count(*) AS disagreements
FROM rfm_segment_cells('default') c
WHERE c.segment IS DISTINCT FROM
      CASE WHEN c.r <= 2 AND c.f <= 2 THEN 'Hibernating'
           WHEN c.r <= 2 AND c.f <= 4 THEN 'At Risk'
           WHEN c.r <= 2 THEN 'Can''t Lose Them'
           WHEN c.r = 3 AND c.f <= 2 THEN 'About to Sleep'
           WHEN c.r = 3 AND c.f = 3 THEN 'Need Attention'
           WHEN c.r <= 4 AND c.f >= 4 THEN 'Loyal Customers'
           WHEN c.r = 4 AND c.f = 1 THEN 'Promising'
           WHEN c.r = 5 AND c.f = 1 THEN 'New Customers'
           WHEN c.f <= 3 THEN 'Potential Loyalists'
           ELSE 'Champions' END
   OR c.segment IS DISTINCT FROM rfm_segment(c.r, c.f, c.m);
SELECT r, string_agg(f || ':' || segment, ', ' ORDER BY f) AS segment_by_f
FROM rfm_segment_cells('default') WHERE m = 1 GROUP BY r ORDER BY r;
-- the built-in map is read-only
UPDATE rfm_segment_rule SET segment = 'Whales' WHERE map_name = 'default' AND segment = 'Champions';
-- a user map with a gap and an overlap is refused at commit, naming the cells
BEGIN;
INSERT INTO rfm_segment_rule (map_name, segment, r_min, r_max, f_min, f_max) VALUES
  ('mine', 'Old', 1, 2, 1, 5), ('mine', 'Recent', 3, 5, 1, 5), ('mine', 'Shadowed', 2, 2, 5, 5);
COMMIT;
BEGIN;
INSERT INTO rfm_segment_rule (map_name, segment, r_min, r_max) VALUES ('mine', 'Old', 1, 2), ('mine', 'Recent', 4, 5);
COMMIT;
-- R's rfm package ships a map where At Risk shadows Can't Lose Them: ours says so
BEGIN;
INSERT INTO rfm_segment_rule (map_name, segment, r_min, r_max, f_min, f_max, m_min, m_max) VALUES
  ('r-rfm', 'At Risk', 1, 2, 2, 5, 2, 5), ('r-rfm', 'Can''t Lose Them', 1, 1, 4, 5, 4, 5),
  ('r-rfm', 'Everyone else', 1, 5, 1, 1, 1, 5), ('r-rfm', 'Everyone else', 3, 5, 2, 5, 1, 5),
  ('r-rfm', 'Everyone else', 1, 2, 2, 5, 1, 1);
COMMIT;
-- a valid map on R and (F+M)/2, chosen with the setting
BEGIN;
INSERT INTO rfm_segment_rule (map_name, segment, r_min, r_max, fm_min, fm_max) VALUES
  ('value', 'Lapsed', 1, 2, 1, 5), ('value', 'Active low value', 3, 5, 1, 2.5), ('value', 'Active high value', 3, 5, 3, 5);
COMMIT;
SELECT * FROM rfm_check_segment_map('value');
SELECT rfm_segment(4, 2, 2, 'value') AS low, rfm_segment(4, 2, 4, 'value') AS high, rfm_segment(4, 3, 2, 'value') AS fm_2_5;
SET customer_analytics.rfm_segment_map = 'value';
SELECT rfm_segment(1, 5, 5);
RESET customer_analytics.rfm_segment_map;
SELECT rfm_segment(1, 5, 5);

------------------------------------------------------------------------
-- rfm() on a user's table: columns by name, lines collapsed into orders
------------------------------------------------------------------------
CREATE TABLE public.my_sales (cust text, line_ts timestamptz, total numeric, invoice text);
INSERT INTO public.my_sales VALUES
  ('x1', '2025-03-01', 100, 'i1'), ('x1', '2025-03-01', 50, 'i1'),   -- one order of two lines
  ('x1', '2025-03-20', 30, 'i2'),
  ('x2', '2025-02-01', 500, 'i3'),
  ('x3', '2025-03-30', 20, 'i4'), ('x3', '2025-03-31', -20, 'i5'),   -- bought and returned
  ('x4', '2025-01-15', 10, 'i6'), ('x4', '2025-04-15', 99, 'i7');    -- the second after as_of
SELECT customer_id, recency_days, frequency, monetary, r, f, m, rfm_cell, segment
FROM rfm('2025-04-01', 'public.my_sales', customer_column => 'cust', ts_column => 'line_ts',
         amount_column => 'total', order_column => 'invoice')
ORDER BY customer_id;
-- without an order column every row is an order
SELECT customer_id, frequency, monetary
FROM rfm('2025-04-01', 'public.my_sales', customer_column => 'cust', ts_column => 'line_ts', amount_column => 'total')
ORDER BY customer_id;
-- errors name the table and the column
SELECT * FROM rfm('2025-04-01', 'public.my_sales', customer_column => 'customer', ts_column => 'line_ts', amount_column => 'total');
SELECT * FROM rfm('2025-04-01', 'public.my_sales', customer_column => 'cust', ts_column => 'invoice', amount_column => 'total');
SELECT * FROM rfm('2025-04-01', 'public.my_sales');
-- a view works too (read through SPI, so its permissions and RLS apply)
CREATE VIEW public.my_sales_2025 AS SELECT * FROM public.my_sales WHERE line_ts >= '2025-01-01';
SELECT count(*) FROM rfm('2025-04-01', 'public.my_sales_2025', customer_column => 'cust', ts_column => 'line_ts', amount_column => 'total');

------------------------------------------------------------------------
-- rfm() on the star schema equals the idiomatic SQL, customer by customer
------------------------------------------------------------------------
CALL pg_temp.reset_warehouse();
SELECT count(*) > 0 AS generated FROM generate_sample_data(customers => 400, days => 120, seed => 7);
SELECT count(*) > 0 AS transformed FROM transform();
-- a second version of some customers (SCD2): they stay one customer
UPDATE stg_customers SET city = city || ' (moved)', updated_at = updated_at + interval '30 days'
WHERE customer_id IN (SELECT customer_id FROM stg_customers ORDER BY customer_id LIMIT 20);
INSERT INTO stg_customers (customer_id, name, email, city, state, country, signup_date, updated_at)
SELECT customer_id, name, email, city, state, country, signup_date, updated_at FROM stg_customers
WHERE city LIKE '% (moved)';
SELECT count(*) > 0 AS transformed FROM transform();
SELECT count(*) AS customers_with_two_versions FROM (SELECT customer_id FROM dim_customer GROUP BY 1 HAVING count(*) > 1) v;

SELECT max(order_ts) + interval '1 day' AS as_of FROM fact_order_line \gset
CREATE TEMP VIEW idiomatic AS
WITH orders AS (
    SELECT d.customer_id, f.order_id, min(f.order_ts) AS ts, sum(f.revenue) AS amount
    FROM fact_order_line f JOIN dim_customer d USING (customer_key)
    WHERE f.status = 'completed' AND f.customer_key <> -1 AND f.order_ts <= :'as_of'
    GROUP BY 1, 2
), per_customer AS (
    SELECT customer_id,
           floor(extract(epoch FROM (:'as_of'::timestamptz - max(ts) FILTER (WHERE amount >= 0))) / 86400)::int AS recency_days,
           count(*) FILTER (WHERE amount >= 0) AS frequency, sum(amount) AS monetary
    FROM orders GROUP BY 1
), breaks AS (
    SELECT percentile_disc(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY recency_days) AS rb,
           percentile_disc(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY frequency) AS fb,
           percentile_disc(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY monetary) AS mb
    FROM per_customer
)
SELECT p.*,
       5 - (SELECT count(*) FROM unnest(rb) b WHERE p.recency_days > b)::int AS r,
       1 + (SELECT count(*) FROM unnest(fb) b WHERE p.frequency > b)::int AS f,
       1 + (SELECT count(*) FROM unnest(mb) b WHERE p.monetary > b)::int AS m
FROM per_customer p, breaks;

SELECT count(*) AS customers, count(DISTINCT customer_id) AS distinct_customers FROM rfm(:'as_of');
SELECT count(*) AS mismatches
FROM rfm(:'as_of') o FULL JOIN idiomatic i USING (customer_id)
WHERE (o.recency_days, o.frequency, o.monetary, o.r, o.f, o.m)
      IS DISTINCT FROM (i.recency_days, i.frequency, i.monetary, i.r, i.f, i.m)
   OR o.rfm_cell IS DISTINCT FROM (i.r::text || i.f || i.m)
   OR o.segment IS DISTINCT FROM rfm_segment(i.r, i.f, i.m);
-- every score is used, and the segments come from the default map
SELECT count(DISTINCT r) AS r_scores, count(DISTINCT m) AS m_scores, bool_and(segment IS NOT NULL) AS all_segmented
FROM rfm(:'as_of');
-- rfm_agg gives the same frequency and monetary as rfm()
SELECT count(*) AS mismatches
FROM (SELECT d.customer_id, rfm_agg(o.ts, o.amount) AS s
      FROM (SELECT customer_key, order_id, min(order_ts) AS ts, sum(revenue) AS amount
            FROM fact_order_line WHERE status = 'completed' AND customer_key <> -1 GROUP BY 1, 2) o
      JOIN dim_customer d USING (customer_key)
      GROUP BY d.customer_id) a
JOIN rfm(:'as_of') r USING (customer_id)
WHERE ((a.s).frequency - (a.s).returns, (a.s).monetary) IS DISTINCT FROM (r.frequency, r.monetary);
-- as_of in the past: later orders do not count, customers without orders yet are absent
SELECT (SELECT count(*) FROM rfm(:'as_of'::timestamptz - interval '60 days')) <
       (SELECT count(*) FROM rfm(:'as_of')) AS fewer_customers_earlier,
       (SELECT max(frequency) FROM rfm(:'as_of'::timestamptz - interval '60 days')) <=
       (SELECT max(frequency) FROM rfm(:'as_of')) AS not_more_orders_earlier;

------------------------------------------------------------------------
-- parallel plans give the serial result
------------------------------------------------------------------------
CREATE TABLE public.big_orders AS
SELECT 'c' || (g % 997) AS customer, timestamptz '2025-01-01' + (g % 365) * interval '1 day' AS ts,
       ((g * 7919) % 100000) / 100.0 - CASE WHEN g % 50 = 0 THEN 900 ELSE 0 END AS amount,
       ((g * 31) % 1000) / 7.0 AS x
FROM generate_series(1, 100000) g;
ANALYZE public.big_orders;
CREATE TEMP TABLE serial_result AS
SELECT customer, rfm_agg(ts, amount)::text AS s FROM public.big_orders GROUP BY customer;
SELECT quintile_breaks(x) AS serial_breaks FROM public.big_orders \gset
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
-- force_parallel_mode is named debug_parallel_query from PostgreSQL 16 on
SELECT CASE WHEN current_setting('server_version_num')::int >= 160000 THEN 'debug_parallel_query'
            ELSE 'force_parallel_mode' END AS parallel_guc \gset
SET :parallel_guc = on;
EXPLAIN (COSTS OFF) SELECT customer, rfm_agg(ts, amount) FROM public.big_orders GROUP BY customer;
EXPLAIN (COSTS OFF) SELECT quintile_breaks(x) FROM public.big_orders;
SELECT count(*) AS differences
FROM (SELECT customer, rfm_agg(ts, amount)::text AS s FROM public.big_orders GROUP BY customer) p
FULL JOIN serial_result s USING (customer)
WHERE p.s IS DISTINCT FROM s.s;
SELECT quintile_breaks(x)::text = :'serial_breaks' AS same_breaks FROM public.big_orders;
RESET parallel_setup_cost;
RESET parallel_tuple_cost;
RESET min_parallel_table_scan_size;
RESET max_parallel_workers_per_gather;
RESET :parallel_guc;

------------------------------------------------------------------------
-- the views
------------------------------------------------------------------------
SET customer_analytics.as_of = :'as_of';
SET customer_analytics.top_customers = 5;
SELECT refresh_customer_rfm() > 0 AS scored;
REFRESH MATERIALIZED VIEW top_customers;
REFRESH MATERIALIZED VIEW segment_summary;
SELECT count(*) = (SELECT count(*) FROM rfm(:'as_of')) AS all_customers,
       count(*) FILTER (WHERE as_of = :'as_of') = count(*) AS as_of_shown FROM customer_rfm;
-- customer_rfm holds exactly rfm(as_of), from its rollup
SELECT count(*) AS differences FROM (
    (SELECT customer_key, customer_id, recency_days, frequency, monetary, r, f, m, rfm_cell, segment
     FROM customer_rfm EXCEPT ALL SELECT * FROM rfm(:'as_of'))
    UNION ALL (SELECT * FROM rfm(:'as_of') EXCEPT ALL
               SELECT customer_key, customer_id, recency_days, frequency, monetary, r, f, m, rfm_cell, segment
               FROM customer_rfm)) x;
-- a map that does not exist is refused, naming the check to run
SET customer_analytics.rfm_segment_map = 'no such map';
SELECT refresh_customer_rfm();
RESET customer_analytics.rfm_segment_map;
SELECT rank, t.customer_id = r.customer_id AS same_customer, t.monetary = r.monetary AS same_monetary
FROM top_customers t
JOIN (SELECT customer_id, monetary, row_number() OVER (ORDER BY monetary DESC, customer_id) AS rn FROM rfm(:'as_of')) r ON r.rn = t.rank
ORDER BY rank;
SELECT sum(customers) = (SELECT count(*) FROM customer_rfm) AS customers_add_up,
       sum(revenue_share) BETWEEN 0.999 AND 1.001 AS shares_add_up
FROM segment_summary;
-- nothing changed: no score is rewritten; concurrent refresh of the views
-- on customer_rfm works (the unique indexes are there)
SELECT refresh_customer_rfm() AS rows_written;
REFRESH MATERIALIZED VIEW CONCURRENTLY top_customers;
REFRESH MATERIALIZED VIEW CONCURRENTLY segment_summary;
RESET customer_analytics.top_customers;
RESET customer_analytics.as_of;

-- data time: unset, the reference is the end of the data (midnight after
-- the day of the last completed line, business time zone), not the wall
-- clock years later; rfm() and customer_rfm default to it
SELECT reference_time() = ((max(order_ts) AT TIME ZONE business_timezone())::date + 1)::timestamp
                          AT TIME ZONE business_timezone() AS end_of_data,
       reference_time() < now() AS before_now
FROM fact_order_line WHERE status = 'completed';
SELECT count(*) AS differences FROM (
    (SELECT * FROM rfm() EXCEPT ALL SELECT * FROM rfm(reference_time()))
    UNION ALL (SELECT * FROM rfm(reference_time()) EXCEPT ALL SELECT * FROM rfm())) x;
SELECT refresh_customer_rfm() >= 0 AS refreshed;
SELECT DISTINCT as_of = reference_time() AS customer_rfm_at_end_of_data,
       min(recency_days) AS most_recent_days FROM customer_rfm GROUP BY 1;
-- 'now' is the wall clock; a line in the future does not move the end of
-- the data past now
SET customer_analytics.as_of = 'now';
SELECT reference_time() = now() AS wall_clock;
RESET customer_analytics.as_of;
BEGIN;
UPDATE fact_order_line SET order_ts = now() + interval '3 days'
WHERE (order_id, line_number) = (SELECT order_id, line_number FROM fact_order_line
                                 WHERE status = 'completed' ORDER BY order_id, line_number LIMIT 1);
SELECT reference_time() = now() AS never_after_now;
ROLLBACK;
-- a value that is no time is refused when set, naming the setting
SET customer_analytics.as_of = 'last tuesday';
SET customer_analytics.as_of = 'infinity';
SELECT current_setting('customer_analytics.as_of') = '' AS still_unset;
DROP VIEW public.my_sales_2025;
DROP TABLE public.my_sales, public.big_orders;
-- the aggregates' support functions keep their state in the aggregate's
-- memory: called directly they are refused with a SQLSTATE, not an
-- internal error
DO $$
BEGIN
    PERFORM customer_analytics.rfm_agg_sfunc(NULL, '2025-01-01', 1);
EXCEPTION WHEN feature_not_supported THEN
    RAISE WARNING 'rfm_agg_sfunc: % (%)', SQLERRM, SQLSTATE;
END $$;
SELECT customer_analytics.quintile_breaks_sfunc(NULL, 1.0);
