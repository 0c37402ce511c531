/*
 * Sales rollups and the sales views (daily_sales, product_category_sales,
 * order_count_series), kept incrementally for the anomalies, forecasts
 * and reports that read them.
 */

/*
 * Incremental maintenance.  Aggregating the whole fact table for every
 * refresh costs time proportional to history; a day's figures only change
 * when its order lines do.  Triggers on fact_order_line (and on a product's
 * category) note the days touched in sales_dirty_day; refresh_sales_rollup()
 * recomputes just those days into two small rollup tables, and the views
 * below are rebuilt from the rollups (a row per day and category), not from
 * the facts.
 */
CREATE TABLE customer_analytics.sales_rollup_day (
    day       date PRIMARY KEY,
    revenue   numeric NOT NULL,
    orders    bigint NOT NULL,
    customers bigint NOT NULL
);
COMMENT ON TABLE customer_analytics.sales_rollup_day IS
    'Completed sales per day with at least one completed line (revenue, distinct orders, distinct known customers), kept incrementally by refresh_sales_rollup(); derived data, rebuilt with refresh_sales_rollup(true)';

CREATE TABLE customer_analytics.sales_rollup_category (
    day      date NOT NULL,
    category text NOT NULL,
    revenue  numeric NOT NULL,
    orders   bigint NOT NULL,
    units    bigint NOT NULL,
    PRIMARY KEY (day, category)
);
COMMENT ON TABLE customer_analytics.sales_rollup_category IS
    'Completed sales per day and product category (revenue, orders with a line in the category, units), kept incrementally by refresh_sales_rollup()';

CREATE TABLE customer_analytics_internal.sales_dirty_day (
    day date PRIMARY KEY
);
COMMENT ON TABLE customer_analytics_internal.sales_dirty_day IS
    'Days whose order lines changed since the last refresh_sales_rollup() (-infinity: everything, after a TRUNCATE)';

CREATE FUNCTION customer_analytics_internal.note_dirty_sales_days()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- one of the extension's writers queues its own changes
    IF customer_analytics_internal.own_writer() THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO customer_analytics_internal.sales_dirty_day VALUES ('-infinity') ON CONFLICT DO NOTHING;
    ELSIF TG_TABLE_NAME = 'dim_product' THEN
        -- a product moved to another category: every day it sold on
        INSERT INTO customer_analytics_internal.sales_dirty_day
        SELECT DISTINCT d.date
        FROM old_rows o JOIN new_rows n USING (product_key)
        JOIN customer_analytics.fact_order_line f ON f.product_key = n.product_key
        JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
        WHERE o.category IS DISTINCT FROM n.category
        ON CONFLICT DO NOTHING;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO customer_analytics_internal.sales_dirty_day
        SELECT DISTINCT d.date FROM new_rows r JOIN customer_analytics.dim_date d USING (date_key)
        ON CONFLICT DO NOTHING;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO customer_analytics_internal.sales_dirty_day
        SELECT DISTINCT d.date FROM old_rows r JOIN customer_analytics.dim_date d USING (date_key)
        ON CONFLICT DO NOTHING;
    ELSE
        INSERT INTO customer_analytics_internal.sales_dirty_day
        SELECT DISTINCT d.date
        FROM (SELECT date_key FROM old_rows UNION SELECT date_key FROM new_rows) r
        JOIN customer_analytics.dim_date d USING (date_key)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.note_dirty_sales_days() IS
    'Statement trigger: notes in sales_dirty_day the days whose sales changed';

CREATE TRIGGER fact_order_line_dirty_days_ins AFTER INSERT ON customer_analytics.fact_order_line
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_sales_days();
CREATE TRIGGER fact_order_line_dirty_days_upd AFTER UPDATE ON customer_analytics.fact_order_line
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_sales_days();
CREATE TRIGGER fact_order_line_dirty_days_del AFTER DELETE ON customer_analytics.fact_order_line
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_sales_days();
CREATE TRIGGER fact_order_line_dirty_days_trunc AFTER TRUNCATE ON customer_analytics.fact_order_line
    FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_sales_days();
CREATE TRIGGER dim_product_dirty_days AFTER UPDATE ON customer_analytics.dim_product
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_sales_days();

CREATE FUNCTION customer_analytics.refresh_sales_rollup(full_refresh boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    days date[];
    keys integer[];
BEGIN
    -- one maintainer at a time; readers of the rollups never wait
    PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('refresh_sales_rollup()'));
    -- take the noted days (days noted by transactions still running stay for next time)
    WITH taken AS (DELETE FROM customer_analytics_internal.sales_dirty_day RETURNING day)
    SELECT array_agg(day) INTO days FROM taken;
    IF full_refresh OR '-infinity' = ANY (days)
       -- (SELECT 1: Citus cannot plan an EXISTS without columns)
       OR (NOT EXISTS (SELECT 1 FROM customer_analytics.sales_rollup_day)
           AND customer_analytics_internal.has_rows('customer_analytics.fact_order_line')) THEN
        DELETE FROM customer_analytics.sales_rollup_day;
        DELETE FROM customer_analytics.sales_rollup_category;
        keys := NULL;                   -- every day
    ELSIF days IS NULL THEN
        RETURN 0;
    ELSE
        keys := ARRAY(SELECT customer_analytics.date_key(d) FROM unnest(days) d);
        DELETE FROM customer_analytics.sales_rollup_day WHERE day = ANY (days);
        DELETE FROM customer_analytics.sales_rollup_category WHERE day = ANY (days);
    END IF;

    INSERT INTO customer_analytics.sales_rollup_day (day, revenue, orders, customers)
    -- credit notes (negative quantity) net against revenue but are no
    -- orders, and their customers did not buy that day
    SELECT d.date, sum(f.revenue), count(DISTINCT f.order_id) FILTER (WHERE f.quantity > 0),
           count(DISTINCT c.customer_id) FILTER (WHERE f.customer_key <> -1 AND f.quantity > 0)
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
    JOIN customer_analytics.dim_customer c ON c.customer_key = f.customer_key
    WHERE f.status = 'completed' AND (keys IS NULL OR f.date_key = ANY (keys))
    GROUP BY d.date;

    INSERT INTO customer_analytics.sales_rollup_category (day, category, revenue, orders, units)
    SELECT d.date, p.category, sum(f.revenue), count(DISTINCT f.order_id) FILTER (WHERE f.quantity > 0), sum(f.quantity)
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
    JOIN customer_analytics.dim_product p ON p.product_key = f.product_key
    WHERE f.status = 'completed' AND (keys IS NULL OR f.date_key = ANY (keys))
    GROUP BY d.date, p.category;

    RETURN CASE WHEN keys IS NULL THEN (SELECT count(*) FROM customer_analytics.sales_rollup_day)
                ELSE cardinality(keys) END;
END
$$;
COMMENT ON FUNCTION customer_analytics.refresh_sales_rollup(boolean) IS
    'Recomputes the sales rollups for the days whose order lines changed since the last call (all days with full_refresh, after a TRUNCATE, or when the rollups are empty); returns the number of days recomputed. The pipeline calls it before refreshing daily_sales and product_category_sales';

CREATE MATERIALIZED VIEW customer_analytics.daily_sales AS
WITH days AS (
    SELECT g::date AS day
    FROM (SELECT min(day) AS first_day, max(day) AS last_day FROM customer_analytics.sales_rollup_day) r,
         pg_catalog.generate_series(r.first_day, r.last_day, interval '1 day') g
)
SELECT days.day,
       COALESCE(p.revenue, 0) AS revenue,
       COALESCE(p.orders, 0) AS orders,
       COALESCE(p.customers, 0) AS customers,
       round(p.revenue / NULLIF(p.orders, 0), 2) AS avg_order_value
FROM days LEFT JOIN customer_analytics.sales_rollup_day p USING (day);
CREATE UNIQUE INDEX daily_sales_day_idx ON customer_analytics.daily_sales (day);
COMMENT ON MATERIALIZED VIEW customer_analytics.daily_sales IS
    'Completed sales per day, every day from the first to the last sale (0 on a day without): revenue net of credit notes, orders (a credit note is none), distinct known customers who bought (guests not counted), average order value. Built from sales_rollup_day: run refresh_sales_rollup() first (the pipeline does)';

CREATE MATERIALIZED VIEW customer_analytics.product_category_sales AS
WITH cells AS (
    SELECT c.category, g::date AS day
    FROM (SELECT min(day) AS first_day, max(day) AS last_day FROM customer_analytics.sales_rollup_day) r,
         pg_catalog.generate_series(r.first_day, r.last_day, interval '1 day') g,
         (SELECT DISTINCT category FROM customer_analytics.sales_rollup_category) c
)
SELECT 'day'::text AS grain, cells.day AS period_start, cells.category,
       COALESCE(r.revenue, 0) AS revenue, COALESCE(r.orders, 0) AS orders, COALESCE(r.units, 0) AS units
FROM cells LEFT JOIN customer_analytics.sales_rollup_category r USING (category, day)
UNION ALL
SELECT 'month', pg_catalog.date_trunc('month', r.day)::date, r.category,
       sum(r.revenue), sum(r.orders), sum(r.units)
FROM customer_analytics.sales_rollup_category r
GROUP BY 2, 3;
CREATE UNIQUE INDEX product_category_sales_key_idx
    ON customer_analytics.product_category_sales (grain, category, period_start);
COMMENT ON MATERIALIZED VIEW customer_analytics.product_category_sales IS
    'Completed sales per product category and period, at two grains in one view: grain ''day'' (every day from the first to the last sale, 0 on a day without) and grain ''month'' (period_start = first day of the month, the sum of its days: an order counts on each day it has lines in the category): revenue net of credit notes, orders with a line in the category (a credit note is none), units net of returned ones. Built from sales_rollup_category';

-- closed days and the day in progress are left out: not scored, and in no
-- baseline
CREATE VIEW customer_analytics.order_count_series AS
WITH closed AS MATERIALIZED (
    SELECT c.day FROM customer_analytics.closed_days((SELECT min(r.day) FROM customer_analytics.sales_rollup_day r),
                                                     (SELECT max(r.day) FROM customer_analytics.sales_rollup_day r)) c
    UNION ALL
    SELECT p.day FROM customer_analytics.day_in_progress() p(day) WHERE p.day IS NOT NULL
)
SELECT category AS series, period_start::timestamp AT TIME ZONE 'UTC' AS ts, orders
FROM customer_analytics.product_category_sales
WHERE grain = 'day' AND period_start NOT IN (SELECT day FROM closed)
UNION ALL
SELECT 'total', day::timestamp AT TIME ZONE 'UTC', orders
FROM customer_analytics.daily_sales
WHERE day NOT IN (SELECT day FROM closed);
COMMENT ON VIEW customer_analytics.order_count_series IS
    'Daily order counts per product category and for the whole shop (series ''total''), closed days (closed_days()) and the day in progress (day_in_progress()) left out: what the anomalies view scores';

