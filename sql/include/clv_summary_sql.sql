\set ca_echo_outer :ECHO
\set ECHO none
-- clv_summary() as version 0.2 wrote it in SQL, for the tests that compare
-- the C scan with it (the same rows at every as_of)
CREATE FUNCTION pg_temp.clv_summary_sql(as_of timestamptz)
RETURNS TABLE (customer_id text, first_purchase date, x float8, t_x float8, "T" float8, m_x float8,
               purchase_days bigint, revenue numeric)
LANGUAGE sql STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH days AS (
        SELECT c.customer_id, d.date AS day, sum(f.revenue) AS revenue, bool_or(f.quantity > 0) AS purchase
        FROM customer_analytics.fact_order_line f
        JOIN customer_analytics.dim_customer c ON c.customer_key = f.customer_key
        JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
        WHERE f.status = 'completed' AND f.customer_key <> -1 AND f.order_ts < as_of
        GROUP BY c.customer_id, d.date
    ),
    -- a day of credit notes alone is no purchase: it nets against the
    -- purchase day before it (the first one, when it comes earlier)
    numbered AS (
        SELECT days.*, GREATEST(count(*) FILTER (WHERE days.purchase)
                                    OVER (PARTITION BY days.customer_id ORDER BY days.day), 1) AS purchase_no
        FROM days
    ),
    purchases AS (
        SELECT n.customer_id, min(n.day) FILTER (WHERE n.purchase) AS day, sum(n.revenue) AS revenue
        FROM numbered n
        GROUP BY n.customer_id, n.purchase_no
        HAVING bool_or(n.purchase)
    ),
    ranked AS (
        SELECT p.*, min(p.day) OVER (PARTITION BY p.customer_id) AS first_day
        FROM purchases p
    )
    SELECT r.customer_id, r.first_day,
           (count(*) - 1)::float8,
           (max(r.day) - r.first_day)::float8,
           GREATEST((as_of AT TIME ZONE customer_analytics.business_timezone())::date - r.first_day, 0)::float8,
           NULLIF(GREATEST(avg(r.revenue) FILTER (WHERE r.day > r.first_day), 0), 0)::float8,
           count(*), sum(r.revenue)
    FROM ranked r
    GROUP BY r.customer_id, r.first_day
$$;
-- rows of one that the other lacks; revenue compared as text, so that its
-- scale must agree too
CREATE FUNCTION pg_temp.clv_summary_differences(as_of timestamptz) RETURNS bigint
LANGUAGE sql AS $$
    WITH c AS (SELECT customer_id, first_purchase, x, t_x, "T", m_x, purchase_days, revenue::text
               FROM customer_analytics.clv_summary(as_of)),
         q AS (SELECT customer_id, first_purchase, x, t_x, "T", m_x, purchase_days, revenue::text
               FROM pg_temp.clv_summary_sql(as_of))
    SELECT count(*) FROM ((TABLE c EXCEPT ALL TABLE q) UNION ALL (TABLE q EXCEPT ALL TABLE c)) d
$$;
\set ECHO :ca_echo_outer
