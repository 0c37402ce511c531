/*
 * RFM scoring (src/rfm.c): aggregates, tie-aware quintiles, named segments,
 * rfm(), and the views built on it.
 */

/* rfm_agg's state: (frequency, monetary in units of 0.0001, first order,
   last order, returns), fixed size so that it is a concrete type */
CREATE TYPE customer_analytics.rfm_state;
CREATE FUNCTION customer_analytics.rfm_state_in(cstring) RETURNS customer_analytics.rfm_state
    AS 'MODULE_PATHNAME', 'ca_rfm_state_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION customer_analytics.rfm_state_out(customer_analytics.rfm_state) RETURNS cstring
    AS 'MODULE_PATHNAME', 'ca_rfm_state_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE TYPE customer_analytics.rfm_state (
    INPUT = customer_analytics.rfm_state_in,
    OUTPUT = customer_analytics.rfm_state_out,
    INTERNALLENGTH = 40,
    ALIGNMENT = double,
    STORAGE = plain
);
COMMENT ON TYPE customer_analytics.rfm_state IS
    'State of rfm_agg(): purchases, monetary sum in units of 0.0001, first and last purchase (microseconds), returns';

CREATE TYPE customer_analytics.rfm_summary AS (
    first_order timestamptz,
    last_order  timestamptz,
    frequency   bigint,
    monetary    numeric,
    returns     bigint
);
COMMENT ON TYPE customer_analytics.rfm_summary IS
    'What rfm_agg() returns for a customer: first and last purchase, number of purchases, monetary value (net of returns), number of returns';

CREATE FUNCTION customer_analytics.rfm_agg_sfunc(customer_analytics.rfm_state, timestamptz, numeric)
    RETURNS customer_analytics.rfm_state
    AS 'MODULE_PATHNAME', 'ca_rfm_agg_sfunc' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION customer_analytics.rfm_agg_combine(customer_analytics.rfm_state, customer_analytics.rfm_state)
    RETURNS customer_analytics.rfm_state
    AS 'MODULE_PATHNAME', 'ca_rfm_agg_combine' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION customer_analytics.rfm_agg_final(customer_analytics.rfm_state)
    RETURNS customer_analytics.rfm_summary
    AS 'MODULE_PATHNAME', 'ca_rfm_agg_final' LANGUAGE C IMMUTABLE PARALLEL SAFE;

CREATE AGGREGATE customer_analytics.rfm_agg(order_ts timestamptz, amount numeric) (
    SFUNC = customer_analytics.rfm_agg_sfunc,
    STYPE = customer_analytics.rfm_state,
    FINALFUNC = customer_analytics.rfm_agg_final,
    COMBINEFUNC = customer_analytics.rfm_agg_combine,
    PARALLEL = SAFE
);
COMMENT ON AGGREGATE customer_analytics.rfm_agg(timestamptz, numeric) IS
    'Recency, frequency and monetary inputs of one customer, over one row per order: first and last purchase, purchases, monetary (exact, net of returns), returns. A row with a NULL timestamp is ignored; a NULL amount is a purchase worth 0; a negative amount is a return: it reduces monetary but is not a purchase and moves neither first nor last. Parallel safe; its state type is concrete (Citus can push it down)';

CREATE FUNCTION customer_analytics.rfm_state_summary(customer_analytics.rfm_state)
    RETURNS customer_analytics.rfm_summary
    AS 'MODULE_PATHNAME', 'ca_rfm_agg_final' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.rfm_state_summary(customer_analytics.rfm_state) IS
    'The rfm_summary of an rfm_state value';

/* quintile_breaks' state: every value seen (exact quantiles need them all) */
CREATE TYPE customer_analytics.quantile_state;
CREATE FUNCTION customer_analytics.quantile_state_in(cstring) RETURNS customer_analytics.quantile_state
    AS 'MODULE_PATHNAME', 'ca_quantile_state_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION customer_analytics.quantile_state_out(customer_analytics.quantile_state) RETURNS cstring
    AS 'MODULE_PATHNAME', 'ca_quantile_state_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE TYPE customer_analytics.quantile_state (
    INPUT = customer_analytics.quantile_state_in,
    OUTPUT = customer_analytics.quantile_state_out,
    INTERNALLENGTH = VARIABLE,
    ALIGNMENT = double,
    STORAGE = plain
);
COMMENT ON TYPE customer_analytics.quantile_state IS
    'State of quintile_breaks(): the values seen';

CREATE FUNCTION customer_analytics.quintile_breaks_sfunc(customer_analytics.quantile_state, float8)
    RETURNS customer_analytics.quantile_state
    AS 'MODULE_PATHNAME', 'ca_quintile_breaks_sfunc' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION customer_analytics.quintile_breaks_combine(customer_analytics.quantile_state, customer_analytics.quantile_state)
    RETURNS customer_analytics.quantile_state
    AS 'MODULE_PATHNAME', 'ca_quintile_breaks_combine' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION customer_analytics.quintile_breaks_final(customer_analytics.quantile_state)
    RETURNS float8[]
    AS 'MODULE_PATHNAME', 'ca_quintile_breaks_final' LANGUAGE C IMMUTABLE PARALLEL SAFE;

CREATE AGGREGATE customer_analytics.quintile_breaks(float8) (
    SFUNC = customer_analytics.quintile_breaks_sfunc,
    STYPE = customer_analytics.quantile_state,
    FINALFUNC = customer_analytics.quintile_breaks_final,
    FINALFUNC_MODIFY = SHAREABLE,
    COMBINEFUNC = customer_analytics.quintile_breaks_combine,
    PARALLEL = SAFE
);
COMMENT ON AGGREGATE customer_analytics.quintile_breaks(float8) IS
    'The four quintile cut points of a column, exactly percentile_disc(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY value), as one parallel-safe aggregate; NULLs are skipped';

CREATE FUNCTION customer_analytics.quintile_score(value float8, breaks float8[], descending boolean DEFAULT false)
    RETURNS integer
    AS 'MODULE_PATHNAME', 'ca_quintile_score' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.quintile_score(float8, float8[], boolean) IS
    'Score 1..5 of a value against quintile_breaks(): 1 up to the first break, 5 above the last (reversed with descending, as for recency). Equal values always get the same score, unlike ntile(5)';

CREATE FUNCTION customer_analytics.reference_time()
    RETURNS timestamptz
    AS 'MODULE_PATHNAME', 'ca_reference_time' LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.reference_time() IS
    'The time recency is measured from in the RFM views: customer_analytics.as_of if set, else now()';

CREATE FUNCTION customer_analytics.top_customers_limit()
    RETURNS integer
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT (CASE WHEN pg_catalog.current_setting('customer_analytics.top_customers', true) OPERATOR(pg_catalog.<>) ''
                       THEN pg_catalog.current_setting('customer_analytics.top_customers', true)
                       ELSE '100' END)::integer $$;
COMMENT ON FUNCTION customer_analytics.top_customers_limit() IS
    'How many customers top_customers keeps (setting customer_analytics.top_customers, default 100)';

/*
 * Segment maps.  A map names each of the 125 RFM cells once.  The built-in
 * map 'default' is read-only; users add their own under another name and
 * choose it with customer_analytics.rfm_segment_map.  (Keeping users' maps
 * apart keeps pg_dump simple: only they are dumped, never clashing with
 * the built-in rows CREATE EXTENSION makes.)
 */
CREATE TABLE customer_analytics.rfm_segment_rule (
    map_name text NOT NULL DEFAULT 'custom',
    segment  text NOT NULL,
    r_min    integer NOT NULL DEFAULT 1,
    r_max    integer NOT NULL DEFAULT 5,
    f_min    integer NOT NULL DEFAULT 1,
    f_max    integer NOT NULL DEFAULT 5,
    m_min    integer NOT NULL DEFAULT 1,
    m_max    integer NOT NULL DEFAULT 5,
    fm_min   numeric NOT NULL DEFAULT 1,
    fm_max   numeric NOT NULL DEFAULT 5,
    CHECK (r_min BETWEEN 1 AND 5 AND r_max BETWEEN r_min AND 5),
    CHECK (f_min BETWEEN 1 AND 5 AND f_max BETWEEN f_min AND 5),
    CHECK (m_min BETWEEN 1 AND 5 AND m_max BETWEEN m_min AND 5),
    CHECK (fm_min BETWEEN 1 AND 5 AND fm_max BETWEEN fm_min AND 5)
);
CREATE INDEX rfm_segment_rule_map_idx ON customer_analytics.rfm_segment_rule (map_name);
COMMENT ON TABLE customer_analytics.rfm_segment_rule IS
    'Segment maps: a rule names the cells whose scores fall in its ranges of R, F, M and (F+M)/2. Every map must name each of the 125 cells exactly once (checked at commit). The built-in map ''default'' is read-only';

INSERT INTO customer_analytics.rfm_segment_rule (map_name, segment, r_min, r_max, f_min, f_max) VALUES
    ('default', 'Hibernating',         1, 2, 1, 2),
    ('default', 'At Risk',             1, 2, 3, 4),
    ('default', 'Can''t Lose Them',    1, 2, 5, 5),
    ('default', 'About to Sleep',      3, 3, 1, 2),
    ('default', 'Need Attention',      3, 3, 3, 3),
    ('default', 'Loyal Customers',     3, 4, 4, 5),
    ('default', 'Promising',           4, 4, 1, 1),
    ('default', 'New Customers',       5, 5, 1, 1),
    ('default', 'Potential Loyalists', 4, 5, 2, 3),
    ('default', 'Champions',           5, 5, 4, 5);
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.rfm_segment_rule', 'WHERE map_name <> ''default''');

/* The cells of a map and how many of its rules name each. */
CREATE FUNCTION customer_analytics.rfm_map_coverage(map text)
RETURNS TABLE (r integer, f integer, m integer, rules integer, segments text[])
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT gr.r, gf.f, gm.m, count(s.segment)::integer,
           array_agg(s.segment ORDER BY s.segment) FILTER (WHERE s.segment IS NOT NULL)
    FROM generate_series(1, 5) AS gr(r)
    CROSS JOIN generate_series(1, 5) AS gf(f)
    CROSS JOIN generate_series(1, 5) AS gm(m)
    LEFT JOIN customer_analytics.rfm_segment_rule s
           ON s.map_name = map
          AND gr.r BETWEEN s.r_min AND s.r_max
          AND gf.f BETWEEN s.f_min AND s.f_max
          AND gm.m BETWEEN s.m_min AND s.m_max
          AND (gf.f + gm.m) / 2.0 BETWEEN s.fm_min AND s.fm_max
    GROUP BY gr.r, gf.f, gm.m
$$;
COMMENT ON FUNCTION customer_analytics.rfm_map_coverage(text) IS
    'Every RFM cell of a segment map with the number of rules that name it (must be 1) and their segments';

CREATE FUNCTION customer_analytics.rfm_check_segment_map(map text)
RETURNS TABLE (cell text, problem text)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('%s%s%s', r, f, m),
           CASE WHEN rules = 0 THEN 'no rule names it'
                ELSE format('%s rules name it: %s', rules, array_to_string(segments, ', ')) END
    FROM customer_analytics.rfm_map_coverage(map)
    WHERE rules <> 1
    ORDER BY 1
$$;
COMMENT ON FUNCTION customer_analytics.rfm_check_segment_map(text) IS
    'The cells of a segment map that no rule, or more than one rule, names; none for a valid map';

CREATE FUNCTION customer_analytics.rfm_segment_cells(map text)
RETURNS TABLE (r integer, f integer, m integer, segment text)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT r, f, m, segments[1] FROM customer_analytics.rfm_map_coverage(map) WHERE rules = 1
$$;
COMMENT ON FUNCTION customer_analytics.rfm_segment_cells(text) IS
    'The segment of every cell of a map (the cells a valid map names once)';

CREATE FUNCTION customer_analytics.rfm_segment(r integer, f integer, m integer,
                                               map text DEFAULT NULL)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.segment
    FROM customer_analytics.rfm_segment_rule s
    WHERE s.map_name = COALESCE(map, NULLIF(pg_catalog.current_setting('customer_analytics.rfm_segment_map', true), ''), 'default')
      AND r BETWEEN s.r_min AND s.r_max AND f BETWEEN s.f_min AND s.f_max
      AND m BETWEEN s.m_min AND s.m_max AND (f + m) / 2.0 BETWEEN s.fm_min AND s.fm_max
$$;
COMMENT ON FUNCTION customer_analytics.rfm_segment(integer, integer, integer, text) IS
    'The segment of an RFM cell in a map (default: customer_analytics.rfm_segment_map, or ''default''): by default the widely used R x F map (Champions, Loyal Customers, Potential Loyalists, New Customers, Promising, Need Attention, About to Sleep, At Risk, Can''t Lose Them, Hibernating)';

CREATE FUNCTION customer_analytics.rfm_segment_rule_guard()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, customer_analytics, pg_temp
AS $$
DECLARE
    maps text[];
    map text;
    bad text;
BEGIN
    IF TG_WHEN = 'BEFORE' THEN
        -- the built-in map is read-only (an upgrade script may set
        -- customer_analytics.installing to change it)
        IF (TG_OP <> 'INSERT' AND OLD.map_name = 'default') OR (TG_OP <> 'DELETE' AND NEW.map_name = 'default') THEN
            IF current_setting('customer_analytics.installing', true) = 'on' THEN
                RETURN COALESCE(NEW, OLD);
            END IF;
            RAISE EXCEPTION 'the built-in segment map "default" cannot be changed'
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'Add your rules under another map_name and SET customer_analytics.rfm_segment_map to it.';
        END IF;
        RETURN COALESCE(NEW, OLD);
    END IF;
    -- deferred: check every map this transaction touched, once it is complete
    maps := ARRAY(SELECT DISTINCT x FROM unnest(ARRAY[OLD.map_name, NEW.map_name]) x WHERE x IS NOT NULL);
    FOREACH map IN ARRAY maps LOOP
        IF EXISTS (SELECT FROM rfm_segment_rule WHERE map_name = map) THEN
            SELECT string_agg(cell || ' (' || problem || ')', ', ') INTO bad
            FROM (SELECT * FROM rfm_check_segment_map(map) LIMIT 10) p;
            IF bad IS NOT NULL THEN
                RAISE EXCEPTION 'RFM segment map "%" does not name each of the 125 cells exactly once', map
                    USING ERRCODE = 'check_violation',
                          DETAIL = 'Cells: ' || bad || '.',
                          HINT = format('SELECT * FROM customer_analytics.rfm_check_segment_map(%L) lists them all.', map);
            END IF;
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION customer_analytics.rfm_segment_rule_guard() IS
    'Keeps the built-in segment map read-only and every map complete and unambiguous';

CREATE TRIGGER rfm_segment_rule_readonly_default
    BEFORE INSERT OR UPDATE OR DELETE ON customer_analytics.rfm_segment_rule
    FOR EACH ROW EXECUTE FUNCTION customer_analytics.rfm_segment_rule_guard();
CREATE CONSTRAINT TRIGGER rfm_segment_rule_complete
    AFTER INSERT OR UPDATE OR DELETE ON customer_analytics.rfm_segment_rule
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION customer_analytics.rfm_segment_rule_guard();

CREATE FUNCTION customer_analytics.rfm(
    as_of           timestamptz DEFAULT now(),
    source          regclass    DEFAULT 'customer_analytics.fact_order_line',
    customer_column text        DEFAULT NULL,
    ts_column       text        DEFAULT NULL,
    amount_column   text        DEFAULT NULL,
    order_column    text        DEFAULT NULL)
RETURNS TABLE (customer_key bigint, customer_id text, recency_days integer, frequency bigint,
               monetary numeric, r integer, f integer, m integer, rfm_cell text, segment text)
AS 'MODULE_PATHNAME', 'ca_rfm'
LANGUAGE C STABLE PARALLEL RESTRICTED;
COMMENT ON FUNCTION customer_analytics.rfm(timestamptz, regclass, text, text, text, text) IS
    'RFM of every customer with a purchase up to as_of: recency in days, purchases, monetary value, tie-aware quintile scores r, f, m (5 is best: recent, frequent, big), the cell (''555'') and its segment. On the star schema it collapses order lines into orders and customer versions into customers, counting completed lines of known customers; on any other table or view, name its customer, timestamp and amount columns (and an order column to collapse lines)';

/* Views on the star schema */

CREATE MATERIALIZED VIEW customer_analytics.customer_rfm AS
SELECT r.customer_id, r.customer_key, r.recency_days, r.frequency, r.monetary,
       r.r, r.f, r.m, r.rfm_cell, r.segment, customer_analytics.reference_time() AS as_of
FROM customer_analytics.rfm(customer_analytics.reference_time(),
                            'customer_analytics.fact_order_line'::regclass) r;
CREATE UNIQUE INDEX customer_rfm_customer_idx ON customer_analytics.customer_rfm (customer_id);
CREATE INDEX customer_rfm_segment_idx ON customer_analytics.customer_rfm (segment);
COMMENT ON MATERIALIZED VIEW customer_analytics.customer_rfm IS
    'RFM scores and segment of every customer, as of reference_time() (setting customer_analytics.as_of, else the time of the refresh)';

CREATE MATERIALIZED VIEW customer_analytics.top_customers AS
SELECT t.rank, t.customer_id, t.customer_key, d.name, d.email, d.city, d.country,
       t.monetary, t.frequency, t.recency_days, t.rfm_cell, t.segment
FROM (SELECT c.*, row_number() OVER (ORDER BY c.monetary DESC, c.customer_id) AS rank
      FROM customer_analytics.customer_rfm c) t
LEFT JOIN customer_analytics.dim_customer d ON d.customer_key = t.customer_key
WHERE t.rank <= customer_analytics.top_customers_limit();
CREATE UNIQUE INDEX top_customers_rank_idx ON customer_analytics.top_customers (rank);
COMMENT ON MATERIALIZED VIEW customer_analytics.top_customers IS
    'The customers with the highest monetary value (how many: customer_analytics.top_customers, default 100), with their current details and segment';

CREATE MATERIALIZED VIEW customer_analytics.segment_summary AS
SELECT c.segment,
       count(*) AS customers,
       sum(c.monetary) AS revenue,
       round(sum(c.monetary) / NULLIF(sum(sum(c.monetary)) OVER (), 0), 4) AS revenue_share,
       round(sum(c.monetary) / NULLIF(sum(c.frequency), 0), 2) AS avg_order_value,
       round(avg(c.frequency), 2) AS avg_orders,
       round(avg(c.recency_days), 1) AS avg_recency_days
FROM customer_analytics.customer_rfm c
GROUP BY c.segment;
CREATE UNIQUE INDEX segment_summary_segment_idx ON customer_analytics.segment_summary (segment);
COMMENT ON MATERIALIZED VIEW customer_analytics.segment_summary IS
    'Per RFM segment: customers, revenue and its share of all revenue, average order value, average orders and recency';
