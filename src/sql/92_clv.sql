/*
 * Customer lifetime value (src/clv.c): BG/NBD and Gamma-Gamma fits, the
 * clv_model and customer_clv views.
 */

/* ---------------- Customer lifetime value ---------------- */

CREATE TYPE customer_analytics.bgnbd_model AS (
    r         float8,
    alpha     float8,
    a         float8,
    b         float8,
    loglik    float8,
    customers bigint
);
COMMENT ON TYPE customer_analytics.bgnbd_model IS
    'BG/NBD model: purchase rates Gamma(r, alpha) (alpha in the time unit of the data), dropout probabilities Beta(a, b); the log-likelihood and number of customers of the fit';

CREATE TYPE customer_analytics.gamma_gamma_model AS (
    p         float8,
    q         float8,
    gamma     float8,
    loglik    float8,
    customers bigint
);
COMMENT ON TYPE customer_analytics.gamma_gamma_model IS
    'Gamma-Gamma model of spend per purchase: spend ~ Gamma(p, nu), nu ~ Gamma(q, gamma); the log-likelihood and number of customers of the fit';

CREATE FUNCTION customer_analytics.bgnbd_fit_sfunc(internal, float8, float8, float8)
    RETURNS internal AS 'MODULE_PATHNAME', 'ca_bgnbd_sfunc' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION customer_analytics.bgnbd_fit_final(internal)
    RETURNS customer_analytics.bgnbd_model AS 'MODULE_PATHNAME', 'ca_bgnbd_final' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE AGGREGATE customer_analytics.bgnbd_fit(x float8, t_x float8, "T" float8) (
    SFUNC = customer_analytics.bgnbd_fit_sfunc,
    STYPE = internal,
    FINALFUNC = customer_analytics.bgnbd_fit_final,
    FINALFUNC_MODIFY = READ_WRITE,
    PARALLEL = SAFE
);
COMMENT ON AGGREGATE customer_analytics.bgnbd_fit(float8, float8, float8) IS
    'Maximum-likelihood BG/NBD model over one row per customer: x repeat purchases, the last t_x after the first purchase, observed for T since the first purchase (one time unit throughout). Rows with a NULL are skipped; NULL without rows';

CREATE FUNCTION customer_analytics.gamma_gamma_fit_sfunc(internal, float8, float8)
    RETURNS internal AS 'MODULE_PATHNAME', 'ca_gg_sfunc' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION customer_analytics.gamma_gamma_fit_final(internal)
    RETURNS customer_analytics.gamma_gamma_model AS 'MODULE_PATHNAME', 'ca_gg_final' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE AGGREGATE customer_analytics.gamma_gamma_fit(x float8, m_x float8) (
    SFUNC = customer_analytics.gamma_gamma_fit_sfunc,
    STYPE = internal,
    FINALFUNC = customer_analytics.gamma_gamma_fit_final,
    FINALFUNC_MODIFY = READ_WRITE,
    PARALLEL = SAFE
);
COMMENT ON AGGREGATE customer_analytics.gamma_gamma_fit(float8, float8) IS
    'Maximum-likelihood Gamma-Gamma model over one row per customer: x repeat purchases of mean value m_x. Customers with x < 1 or m_x <= 0 (or a NULL) say nothing about repeat spend and are skipped; NULL without rows';

CREATE FUNCTION customer_analytics.bgnbd_loglik(model customer_analytics.bgnbd_model,
                                                x float8, t_x float8, "T" float8)
    RETURNS float8 AS 'MODULE_PATHNAME', 'ca_bgnbd_loglik' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.bgnbd_loglik(customer_analytics.bgnbd_model, float8, float8, float8) IS
    'Log-likelihood of one customer''s history (x, t_x, T) under a BG/NBD model (Fader, Hardie and Lee 2005, equation 6)';

CREATE FUNCTION customer_analytics.bgnbd_expected_purchases(model customer_analytics.bgnbd_model, t float8)
    RETURNS float8 AS 'MODULE_PATHNAME', 'ca_bgnbd_expected' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.bgnbd_expected_purchases(customer_analytics.bgnbd_model, float8) IS
    'Expected purchases of a new customer in a period of length t (equation 9)';

CREATE FUNCTION customer_analytics.bgnbd_expected_purchases(model customer_analytics.bgnbd_model, t float8,
                                                            x float8, t_x float8, "T" float8)
    RETURNS float8 AS 'MODULE_PATHNAME', 'ca_bgnbd_conditional' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.bgnbd_expected_purchases(customer_analytics.bgnbd_model, float8, float8, float8, float8) IS
    'Expected purchases in the next t of a customer with history (x, t_x, T) (equation 10)';

CREATE FUNCTION customer_analytics.bgnbd_p_alive(model customer_analytics.bgnbd_model,
                                                 x float8, t_x float8, "T" float8)
    RETURNS float8 AS 'MODULE_PATHNAME', 'ca_bgnbd_p_alive' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.bgnbd_p_alive(customer_analytics.bgnbd_model, float8, float8, float8) IS
    'Probability that a customer with history (x, t_x, T) is still active (1 without repeat purchases)';

CREATE FUNCTION customer_analytics.gamma_gamma_expected_value(model customer_analytics.gamma_gamma_model,
                                                              x float8, m_x float8)
    RETURNS float8 AS 'MODULE_PATHNAME', 'ca_gg_expected' LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.gamma_gamma_expected_value(customer_analytics.gamma_gamma_model, float8, float8) IS
    'Expected spend per future purchase of a customer with x repeat purchases of mean value m_x: p (gamma + x m_x) / (p x + q - 1); the population mean p gamma / (q - 1) when x = 0 (m_x may then be NULL). NULL for a NULL model or x, and for a NULL m_x with x > 0 (repeat purchases all returned)';

CREATE FUNCTION customer_analytics.bgnbd_fit_status(model customer_analytics.bgnbd_model)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    -- a degenerate history says so here rather than through parameters
    -- at the edge of their range: without repeat purchases bgnbd_fit fits
    -- nothing; without dropout its limit is a / (a + b) -> 0
    SELECT CASE WHEN model IS NULL OR (model).customers IS NULL THEN 'no customers'
                WHEN (model).r IS NULL THEN 'no repeat purchases'
                WHEN (model).a / ((model).a + (model).b) < 1e-4 THEN 'no dropout observed'
                ELSE 'fitted' END
$$;
COMMENT ON FUNCTION customer_analytics.bgnbd_fit_status(customer_analytics.bgnbd_model) IS
    'What a bgnbd_fit result is: fitted; no customers (NULL); no repeat purchases (no parameters: nothing to fit); no dropout observed (a / (a + b) below 1e-4: the fit went to the limit where everyone is alive)';

CREATE FUNCTION customer_analytics.clv_summary(as_of timestamptz)
RETURNS TABLE (customer_id text, first_purchase date, x float8, t_x float8, "T" float8, m_x float8,
               purchase_days bigint, revenue numeric)
AS 'MODULE_PATHNAME', 'ca_clv_summary'
LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
COMMENT ON FUNCTION customer_analytics.clv_summary(timestamptz) IS
    'Each known customer''s purchase history before as_of, in days, as BG/NBD and Gamma-Gamma take it: a purchase is a day with completed order lines other than credit notes'' (negative quantity); a day of credit notes alone nets against the purchase day before it. x = purchase days after the first, t_x = days from the first to the last, T = days from the first to as_of, m_x = mean net revenue of the repeat purchase days (NULL without any, or when they net to nothing), revenue = net revenue';

CREATE MATERIALIZED VIEW customer_analytics.clv_model AS
SELECT customer_analytics.bgnbd_fit(s.x, s.t_x, s."T") AS bgnbd,
       customer_analytics.gamma_gamma_fit(s.x, s.m_x) AS gamma_gamma,
       customer_analytics.reference_time() AS as_of
FROM customer_analytics.clv_summary(customer_analytics.reference_time()) s;
-- one row: a unique index lets the pipeline refresh it CONCURRENTLY, so
-- that readers are never locked out while the models are refitted
CREATE UNIQUE INDEX clv_model_as_of_idx ON customer_analytics.clv_model (as_of);
COMMENT ON MATERIALIZED VIEW customer_analytics.clv_model IS
    'The BG/NBD and Gamma-Gamma models fitted on every customer''s history as of reference_time() (time unit: days). Refresh it before customer_clv';

CREATE MATERIALIZED VIEW customer_analytics.customer_clv AS
SELECT s.customer_id, s.first_purchase, s.x AS repeat_purchases, s.t_x AS recency_days, s."T" AS age_days,
       s.m_x AS avg_repeat_value,
       customer_analytics.bgnbd_p_alive(m.bgnbd, s.x, s.t_x, s."T") AS p_alive,
       customer_analytics.bgnbd_expected_purchases(m.bgnbd, 90, s.x, s.t_x, s."T") AS expected_purchases_90d,
       CASE WHEN (m.gamma_gamma).q > 1
            THEN customer_analytics.gamma_gamma_expected_value(m.gamma_gamma, s.x, s.m_x) END AS expected_purchase_value,
       customer_analytics.bgnbd_expected_purchases(m.bgnbd, 90, s.x, s.t_x, s."T") *
       CASE WHEN (m.gamma_gamma).q > 1
            THEN customer_analytics.gamma_gamma_expected_value(m.gamma_gamma, s.x, s.m_x) END AS expected_value_90d,
       m.as_of
FROM customer_analytics.clv_model m
CROSS JOIN LATERAL customer_analytics.clv_summary(m.as_of) s
WHERE m.bgnbd IS NOT NULL;
CREATE UNIQUE INDEX customer_clv_customer_idx ON customer_analytics.customer_clv (customer_id);
COMMENT ON MATERIALIZED VIEW customer_analytics.customer_clv IS
    'Per customer, from clv_model: probability of being still active, expected purchases (purchase days) and value over the next 90 days (BG/NBD x Gamma-Gamma expected spend per purchase), with the history they rest on';

