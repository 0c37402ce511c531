-- Customer lifetime value: BG/NBD and Gamma-Gamma formulas at the CDNOW
-- parameters (Fader, Hardie and Lee 2005) against the published figure and
-- independent SQL computations, recovery of known parameters from data
-- simulated with them, and customer_clv on the sample shop.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
SET extra_float_digits = 0;

CREATE TEMP TABLE cdnow AS
SELECT ROW(0.243, 4.414, 0.793, 2.426, NULL, NULL)::bgnbd_model AS m;

-- 1. the published example: a customer with 2 repeat purchases, the last at
-- week 30.43, observed for 38.86 weeks, makes 1.226 purchases in the next 39
SELECT round(bgnbd_expected_purchases(m, 39, 2, 30.43, 38.86)::numeric, 3) AS expected_39_weeks FROM cdnow;

-- a few histories (in weeks)
CREATE TEMP TABLE histories (x int, t_x float8, "T" float8);
INSERT INTO histories VALUES (0, 0, 38.86), (0, 0, 30), (1, 1.71, 38.86), (2, 30.43, 38.86),
    (5, 20, 39), (7, 37.5, 38), (10, 35, 35.5), (1, 0.5, 27.0);

-- 2. log-likelihood (equation 6), recomputed in SQL: for whole x the gamma
-- ratios are products, ln G(r+x) - ln G(r) = sum of ln(r+k), k < x
SELECT h.x, h.t_x, h."T",
       abs(bgnbd_loglik(c.m, h.x, h.t_x, h."T") -
           (lr + 0.243 * ln(4.414) + lb - lab
            + ln(exp(-(0.243 + h.x) * ln(4.414 + h."T"))
                 + CASE WHEN h.x > 0 THEN exp(ln(0.793) - ln(2.426 + h.x - 1) - (0.243 + h.x) * ln(4.414 + h.t_x)) ELSE 0 END)
           )) < 1e-9 AS loglik_ok
FROM cdnow c, histories h,
     LATERAL (SELECT COALESCE(sum(ln(0.243 + k)), 0) AS lr FROM generate_series(0, h.x - 1) k) r,
     -- ln B(a, b + x) - ln B(a, b) = [ln G(b+x) - ln G(b)] - [ln G(a+b+x) - ln G(a+b)]
     LATERAL (SELECT COALESCE(sum(ln(2.426 + k)), 0) AS lb FROM generate_series(0, h.x - 1) k) bb,
     LATERAL (SELECT COALESCE(sum(ln(0.793 + 2.426 + k)), 0) AS lab FROM generate_series(0, h.x - 1) k) ab
ORDER BY h.x, h.t_x;

-- 3. P(alive) (equation 11) and the conditional expectation (equation 10)
-- with the hypergeometric series summed here
CREATE FUNCTION pg_temp.hyp2f1(a float8, b float8, c float8, z float8) RETURNS float8
LANGUAGE sql IMMUTABLE AS $$
    SELECT 1 + COALESCE(sum(CASE WHEN lt > -700 THEN exp(lt) ELSE 0 END), 0) FROM (
        SELECT sum(ln((a + j) * (b + j) / ((c + j) * (j + 1)) * z)) OVER (ORDER BY j) AS lt
        FROM generate_series(0, 2000) j WHERE z > 0) s
$$;
SELECT h.x, h.t_x, h."T",
       abs(bgnbd_p_alive(c.m, h.x, h.t_x, h."T") - pa) < 1e-12 AS p_alive_ok,
       abs(bgnbd_expected_purchases(c.m, 39, h.x, h.t_x, h."T") -
           (0.793 + 2.426 + h.x - 1) / (0.793 - 1)
           * (1 - power((4.414 + h."T") / (4.414 + h."T" + 39), 0.243 + h.x)
                  * pg_temp.hyp2f1(0.243 + h.x, 2.426 + h.x, 0.793 + 2.426 + h.x - 1, 39 / (4.414 + h."T" + 39)))
           * pa) < 1e-9 AS expected_ok,
       round(bgnbd_p_alive(c.m, h.x, h.t_x, h."T")::numeric, 4) AS p_alive
FROM cdnow c, histories h,
     LATERAL (SELECT CASE WHEN h.x = 0 THEN 1
                          ELSE 1 / (1 + 0.793 / (2.426 + h.x - 1) * power((4.414 + h."T") / (4.414 + h.t_x), 0.243 + h.x)) END AS pa) p
ORDER BY h.x, h.t_x;
-- unconditional E[X(t)] (equation 9)
SELECT t, abs(bgnbd_expected_purchases(c.m, t) -
              (0.793 + 2.426 - 1) / (0.793 - 1)
              * (1 - power(4.414 / (4.414 + t), 0.243) * pg_temp.hyp2f1(0.243, 2.426, 0.793 + 2.426 - 1, t / (4.414 + t)))) < 1e-9 AS ok,
       round(bgnbd_expected_purchases(c.m, t)::numeric, 4) AS expected
FROM cdnow c, unnest(ARRAY[0, 1, 39, 78]::float8[]) t ORDER BY t;

-- Gamma-Gamma expected spend, by its formula; x = 0 gives the population mean
SELECT round(gamma_gamma_expected_value(ROW(6.25, 3.74, 15.44, NULL, NULL)::gamma_gamma_model, 3, 40)::numeric, 6)
       = round((6.25 * (15.44 + 3 * 40) / (6.25 * 3 + 3.74 - 1))::numeric, 6) AS spend_ok,
       round(gamma_gamma_expected_value(ROW(6.25, 3.74, 15.44, NULL, NULL)::gamma_gamma_model, 0, NULL)::numeric, 4) AS population_mean;

-- 4. recovery: 10,000 customers simulated from the CDNOW parameters (and
-- Gamma-Gamma spend with p = 6.25, q = 3.74, gamma = 15.44)
CREATE FUNCTION pg_temp.rgamma(shape float8, rate float8) RETURNS float8
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    d float8;
    c float8;
    z float8;
    v float8;
    u float8;
BEGIN
    IF shape < 1 THEN   -- boost: G(shape) = G(shape + 1) U^(1/shape)
        RETURN pg_temp.rgamma(shape + 1, rate) * power(random(), 1 / shape);
    END IF;
    d := shape - 1.0 / 3;   -- Marsaglia and Tsang
    c := 1 / sqrt(9 * d);
    LOOP
        z := sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random());
        v := power(1 + c * z, 3);
        CONTINUE WHEN v <= 0;
        u := 1 - random();
        IF ln(u) < 0.5 * z * z + d - d * v + d * ln(v) THEN
            RETURN d * v / rate;
        END IF;
    END LOOP;
END
$$;
CREATE FUNCTION pg_temp.simulate(n int)
RETURNS TABLE (x int, t_x float8, "T" float8, m_x float8)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    lambda float8;
    p float8;
    g1 float8;
    nu float8;
    t float8;
    spend float8;
BEGIN
    FOR i IN 1 .. n LOOP
        lambda := pg_temp.rgamma(0.243, 4.414);
        g1 := pg_temp.rgamma(0.793, 1);
        p := g1 / (g1 + pg_temp.rgamma(2.426, 1));
        "T" := 27 + 12 * random();
        x := 0; t_x := 0; t := 0; spend := 0;
        nu := pg_temp.rgamma(3.74, 15.44);
        LOOP
            t := t - ln(1 - random()) / lambda;
            EXIT WHEN t > "T";
            x := x + 1;
            t_x := t;
            spend := spend + pg_temp.rgamma(6.25, nu);
            EXIT WHEN random() < p;   -- drops out after this purchase
        END LOOP;
        m_x := CASE WHEN x > 0 THEN spend / x END;
        RETURN NEXT;
    END LOOP;
END
$$;
SELECT setseed(0.2005);
CREATE TEMP TABLE simulated AS SELECT * FROM pg_temp.simulate(10000);
SELECT count(*) AS customers, count(*) FILTER (WHERE x = 0) AS no_repeat FROM simulated;
CREATE TEMP TABLE fit AS
SELECT bgnbd_fit(x, t_x, "T") AS bg, gamma_gamma_fit(x, m_x) AS gg FROM simulated;
SELECT (bg).customers, (gg).customers AS gg_customers,
       abs((bg).r / 0.243 - 1) < 0.15 AS r_ok,
       abs((bg).alpha / 4.414 - 1) < 0.15 AS alpha_ok,
       abs((bg).a / 0.793 - 1) < 0.3 AS a_ok,
       abs((bg).b / 2.426 - 1) < 0.3 AS b_ok,
       abs((gg).p / 6.25 - 1) < 0.3 AS p_ok,
       abs((gg).q / 3.74 - 1) < 0.3 AS q_ok,
       abs((gg).gamma / 15.44 - 1) < 0.3 AS gamma_ok
FROM fit;
SELECT round((bg).r::numeric, 3) AS r, round((bg).alpha::numeric, 3) AS alpha, round((bg).a::numeric, 3) AS a,
       round((bg).b::numeric, 3) AS b, round((gg).p::numeric, 2) AS p, round((gg).q::numeric, 2) AS q,
       round((gg).gamma::numeric, 2) AS gamma
FROM fit;
-- the fit is a maximum: the log-likelihood is the sum of the customers'
-- and nudging any parameter lowers it
SELECT abs((f.bg).loglik - (SELECT sum(bgnbd_loglik(f.bg, s.x, s.t_x, s."T")) FROM simulated s)) < 1e-6 * abs((f.bg).loglik) AS loglik_is_sum,
       bool_and((f.bg).loglik >= (SELECT sum(bgnbd_loglik(ROW((f.bg).r * k1, (f.bg).alpha * k2, (f.bg).a * k3, (f.bg).b * k4, NULL, NULL)::bgnbd_model,
                                                           s.x, s.t_x, s."T")) FROM simulated s)) AS is_maximum
FROM fit f,
     (VALUES (1.02, 1, 1, 1), (0.98, 1, 1, 1), (1, 1.02, 1, 1), (1, 0.98, 1, 1),
             (1, 1, 1.02, 1), (1, 1, 0.98, 1), (1, 1, 1, 1.02), (1, 1, 1, 0.98)) AS k(k1, k2, k3, k4)
GROUP BY f.bg;
-- the model's expected purchases in 39 weeks vs the simulated population's
SELECT round(bgnbd_expected_purchases(bg, 39)::numeric, 3) AS fitted_39, round(bgnbd_expected_purchases(ROW(0.243, 4.414, 0.793, 2.426, NULL, NULL)::bgnbd_model, 39)::numeric, 3) AS true_39
FROM fit;

-- errors name the value
\set VERBOSITY terse
SELECT bgnbd_fit(x, t_x, t_x - 1) FROM (VALUES (1, 5.0)) v(x, t_x);
SELECT bgnbd_p_alive(m, -1, 0, 10) FROM cdnow;
SELECT bgnbd_expected_purchases(m, -5) FROM cdnow;
SELECT bgnbd_p_alive(ROW(0, 1, 1, 1, NULL, NULL)::bgnbd_model, 1, 1, 2);
SELECT gamma_gamma_expected_value(ROW(1, 0.5, 1, NULL, NULL)::gamma_gamma_model, 2, 10);
\set VERBOSITY default
SELECT bgnbd_fit(x, t_x, "T") IS NULL AS no_rows FROM histories WHERE false;

-- 5. customer_clv on the sample shop
-- start from an empty star schema (earlier tests leave theirs)
CALL pg_temp.reset_warehouse();
SELECT count(*) > 0 AS generated FROM generate_sample_data(customers => 2000, days => 180, seed => 7, events => false);
SELECT count(*) > 0 AS transformed FROM transform();
SET customer_analytics.as_of = '2025-06-30';
-- the summary, recomputed: purchases are distinct days with completed lines
SELECT count(*) AS customers,
       bool_and(s.x = o.days - 1 AND s.t_x = o.last_day - o.first_day AND s."T" = '2025-06-30'::date - o.first_day) AS summary_ok
FROM clv_summary('2025-06-30') s
JOIN (SELECT c.customer_id, count(DISTINCT d.date) AS days, min(d.date) AS first_day, max(d.date) AS last_day
      FROM fact_order_line f JOIN dim_customer c USING (customer_key) JOIN dim_date d USING (date_key)
      WHERE f.status = 'completed' AND f.customer_key <> -1
      GROUP BY c.customer_id) o USING (customer_id);
-- the C scan against the summary's SQL formula, with the shop's customer
-- versions and cancelled lines, at three dates
\i :abs_srcdir/sql/include/clv_summary_sql.sql
SELECT a AS as_of, pg_temp.clv_summary_differences(a) AS differences,
       (SELECT count(*) FROM clv_summary(a)) AS customers
FROM unnest('{2025-02-01, 2025-04-15, 2025-06-30}'::timestamptz[]) a ORDER BY a;
REFRESH MATERIALIZED VIEW clv_model;
REFRESH MATERIALIZED VIEW customer_clv;
SELECT (bgnbd).customers, (gamma_gamma).customers > 0 AS gg_fitted, as_of FROM clv_model;
SELECT count(*) AS customers,
       bool_and(p_alive > 0 AND p_alive <= 1) AS p_alive_ok,
       bool_and(expected_purchases_90d >= 0) AS purchases_ok,
       bool_and(abs(expected_value_90d - expected_purchases_90d * expected_purchase_value) < 1e-9) AS value_ok,
       bool_and(p_alive = 1) FILTER (WHERE repeat_purchases = 0) AS one_timers_alive
FROM customer_clv;
-- recent repeat buyers are more likely alive than those long silent
SELECT avg(p_alive) FILTER (WHERE age_days - recency_days < 14) > avg(p_alive) FILTER (WHERE age_days - recency_days > 90) AS recency_matters
FROM customer_clv WHERE repeat_purchases >= 2;
RESET customer_analytics.as_of;
