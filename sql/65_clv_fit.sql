-- The CLV fits' optimiser: the bounded quasi-Newton method (the default)
-- reaches the likelihood of version 0.1's Nelder-Mead search, grouped and
-- ungrouped, on a generated shop; data without a repeat purchase gives no
-- parameters; data in which nobody drops out ends at the no-dropout limit.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
SET extra_float_digits = 0;

CALL pg_temp.reset_warehouse();
SELECT count(*) > 0 AS generated FROM generate_sample_data(customers => 1500, days => 240, seed => 11, events => false);
SELECT count(*) > 0 AS transformed FROM transform();
CREATE TEMP TABLE summary AS SELECT * FROM clv_summary('2025-09-01');
-- clv_summary gives the rows of its first formulation (a window over the
-- customer's days for the first one, avg() over the others)
CREATE TEMP TABLE summary_ref AS
WITH days AS (
    SELECT c.customer_id, d.date AS day, sum(f.revenue) AS revenue
    FROM fact_order_line f
    JOIN dim_customer c ON c.customer_key = f.customer_key
    JOIN dim_date d ON d.date_key = f.date_key
    WHERE f.status = 'completed' AND f.customer_key <> -1 AND f.order_ts < '2025-09-01'
    GROUP BY c.customer_id, d.date
), ranked AS (
    SELECT days.*, min(day) OVER (PARTITION BY days.customer_id) AS first_day FROM days
)
SELECT r.customer_id, r.first_day, (count(*) - 1)::float8 AS x, (max(r.day) - r.first_day)::float8 AS t_x,
       GREATEST(date '2025-09-01' - r.first_day, 0)::float8 AS "T",
       avg(r.revenue) FILTER (WHERE r.day > r.first_day)::float8 AS m_x, count(*) AS purchase_days, sum(r.revenue) AS revenue
FROM ranked r GROUP BY r.customer_id, r.first_day;
SELECT (SELECT count(*) FROM summary) AS customers,
       (SELECT count(*) FROM (TABLE summary EXCEPT ALL TABLE summary_ref) a) AS only_new,
       (SELECT count(*) FROM (TABLE summary_ref EXCEPT ALL TABLE summary) b) AS only_ref,
       (SELECT count(*) FROM summary WHERE m_x IS NOT NULL) AS with_m_x;

CREATE TEMP TABLE fits (method text, bg bgnbd_model, gg gamma_gamma_model);
INSERT INTO fits SELECT current_setting('customer_analytics.clv_fit_method'), bgnbd_fit(x, t_x, "T"), gamma_gamma_fit(x, m_x) FROM summary;
SET customer_analytics.clv_fit_method = nelder_mead;
INSERT INTO fits SELECT current_setting('customer_analytics.clv_fit_method'), bgnbd_fit(x, t_x, "T"), gamma_gamma_fit(x, m_x) FROM summary;
SET customer_analytics.clv_fit_method = nelder_mead_ungrouped;
INSERT INTO fits SELECT current_setting('customer_analytics.clv_fit_method'), bgnbd_fit(x, t_x, "T"), gamma_gamma_fit(x, m_x) FROM summary;
RESET customer_analytics.clv_fit_method;

-- the same maximum: log-likelihoods to 1e-6 (relative), no worse than the
-- search's, parameters to 1e-3
SELECT f.method, (f.bg).customers, (f.gg).customers AS gg_customers,
       abs((f.bg).loglik - (q.bg).loglik) <= 1e-6 * abs((q.bg).loglik) AS bg_loglik_same,
       (q.bg).loglik >= (f.bg).loglik - 1e-9 * abs((f.bg).loglik) AS bg_not_worse,
       abs((f.gg).loglik - (q.gg).loglik) <= 1e-6 * abs((q.gg).loglik) AS gg_loglik_same,
       (q.gg).loglik >= (f.gg).loglik - 1e-9 * abs((f.gg).loglik) AS gg_not_worse,
       abs(ln((f.bg).r / (q.bg).r)) < 1e-3 AND abs(ln((f.bg).alpha / (q.bg).alpha)) < 1e-3
       AND abs(ln((f.bg).a / (q.bg).a)) < 1e-3 AND abs(ln((f.bg).b / (q.bg).b)) < 1e-3 AS bg_params_same,
       abs(ln((f.gg).p / (q.gg).p)) < 1e-3 AND abs(ln((f.gg).q / (q.gg).q)) < 1e-3
       AND abs(ln((f.gg).gamma / (q.gg).gamma)) < 1e-3 AS gg_params_same
FROM fits f, fits q
WHERE q.method = 'quasi_newton'
ORDER BY f.method;
-- and it is the sum of the customers' log-likelihoods at the parameters returned
SELECT abs((f.bg).loglik - (SELECT sum(bgnbd_loglik(f.bg, s.x, s.t_x, s."T")) FROM summary s)) < 1e-9 * abs((f.bg).loglik) AS loglik_is_sum
FROM fits f WHERE f.method = 'quasi_newton';

-- nobody bought twice: no rates to fit; the customers are still counted
SELECT (m).r IS NULL AS no_r, (m).alpha IS NULL AS no_alpha, (m).a IS NULL AS no_a, (m).b IS NULL AS no_b,
       (m).loglik IS NULL AS no_loglik, (m).customers
FROM (SELECT bgnbd_fit(0, 0, 10 + g % 30) AS m FROM generate_series(1, 500) g) s;

-- nobody drops out: every customer's last purchase is at the end of the
-- observation; the fit goes to the limit a / (a + b) -> 0, where everyone
-- is alive, and its likelihood is at least the search's
CREATE TEMP TABLE loyal AS
SELECT (1 + g % 7)::float8 AS x, (30 + g % 11)::float8 AS t_x, (30 + g % 11)::float8 AS "T"
FROM generate_series(1, 2000) g;
CREATE TEMP TABLE loyal_fit AS SELECT bgnbd_fit(x, t_x, "T") AS m FROM loyal;
SET customer_analytics.clv_fit_method = nelder_mead;
CREATE TEMP TABLE loyal_nm AS SELECT bgnbd_fit(x, t_x, "T") AS m FROM loyal;
RESET customer_analytics.clv_fit_method;
SELECT bgnbd_fit_status(f.m) AS status, (f.m).a / ((f.m).a + (f.m).b) < 1e-4 AS no_dropout,
       (f.m).loglik >= (n.m).loglik - 1e-6 * abs((n.m).loglik) AS not_worse,
       (SELECT min(bgnbd_p_alive(f.m, x, t_x, "T")) FROM loyal) > 0.999 AS all_alive
FROM loyal_fit f, loyal_nm n;

-- bgnbd_fit_status of clv_model: fitted on the shop; with every customer's purchases
-- after the first day taken away, no repeat purchases and no CLV rows;
-- without facts, no customers
SET customer_analytics.as_of = '2025-09-01';
REFRESH MATERIALIZED VIEW clv_model;
REFRESH MATERIALIZED VIEW customer_clv;
SELECT bgnbd_fit_status(bgnbd) AS status, (bgnbd).customers, (SELECT count(*) FROM customer_clv) AS clv_rows FROM clv_model;
DELETE FROM fact_order_line f USING dim_customer c
WHERE c.customer_key = f.customer_key
  AND f.date_key > (SELECT min(g.date_key) FROM fact_order_line g JOIN dim_customer d USING (customer_key)
                    WHERE d.customer_id = c.customer_id AND g.status = 'completed');
REFRESH MATERIALIZED VIEW clv_model;
REFRESH MATERIALIZED VIEW customer_clv;
SELECT bgnbd_fit_status(bgnbd) AS status, (bgnbd).customers, (bgnbd).r, (SELECT count(*) FROM customer_clv) AS clv_rows FROM clv_model;
TRUNCATE fact_order_line;
REFRESH MATERIALIZED VIEW clv_model;
SELECT bgnbd_fit_status(bgnbd) AS status, bgnbd IS NULL AS no_model FROM clv_model;
RESET customer_analytics.as_of;
