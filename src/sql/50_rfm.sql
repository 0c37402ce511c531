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

CREATE FUNCTION customer_analytics_internal.money_units(amount numeric, public_api boolean)
    RETURNS bigint
    AS 'MODULE_PATHNAME', 'ca_money_units' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics_internal.money_units(numeric, boolean) IS
    'Internal, for tests: an amount in the units of 0.0001 that rfm sums, read from numeric''s stored digits (public_api false, where 128-bit integers exist) or through numeric''s public functions; an error for a NaN, an infinity, more than 4 decimals or too large a value';

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
    'The time recency, CLV and the last complete day are measured from: customer_analytics.as_of if set (''now'' is the wall clock), else the end of the data (midnight after the day of the last completed order line, business time zone), never later than now';

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

CREATE FUNCTION customer_analytics_internal.rfm_segment_rule_guard()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
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
COMMENT ON FUNCTION customer_analytics_internal.rfm_segment_rule_guard() IS
    'Keeps the built-in segment map read-only and every map complete and unambiguous';

CREATE TRIGGER rfm_segment_rule_readonly_default
    BEFORE INSERT OR UPDATE OR DELETE ON customer_analytics.rfm_segment_rule
    FOR EACH ROW EXECUTE FUNCTION customer_analytics_internal.rfm_segment_rule_guard();
CREATE CONSTRAINT TRIGGER rfm_segment_rule_complete
    AFTER INSERT OR UPDATE OR DELETE ON customer_analytics.rfm_segment_rule
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION customer_analytics_internal.rfm_segment_rule_guard();

CREATE FUNCTION customer_analytics.rfm(
    as_of           timestamptz DEFAULT customer_analytics.reference_time(),
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

/*
 * customer_rfm, kept incrementally.  Scoring needs every customer (the
 * quintile breaks move with each purchase), but a customer's recency,
 * frequency and monetary inputs only change with their order lines or
 * versions.  refresh_customer_rfm() keeps those inputs per customer in
 * rfm_rollup_customer: a new order (all of its lines new) is added to its
 * customer's row from rfm_new_line; any other change (an updated or deleted
 * line, a new version of the customer, a line added to an older order)
 * notes the customer in rfm_dirty_customer, and their row is recomputed
 * from their lines.  Then every customer is scored from the rollup and only
 * the rows whose scores changed are written: readers never wait, and there
 * is no REFRESH ... CONCURRENTLY diff of the whole view.
 */
CREATE TABLE customer_analytics.rfm_rollup_customer (
    customer_id  text PRIMARY KEY,
    customer_key bigint,
    last_order   timestamptz,
    frequency    bigint NOT NULL,
    monetary     numeric NOT NULL
);
COMMENT ON TABLE customer_analytics.rfm_rollup_customer IS
    'Per customer with a completed line: the current version''s key, last purchase, purchases and monetary value (rfm_agg over one row per order, returns apart), kept incrementally by refresh_customer_rfm(); derived data, rebuilt with refresh_customer_rfm(true)';

CREATE TABLE customer_analytics_internal.rfm_dirty_customer (
    customer_id text UNIQUE NULLS NOT DISTINCT
);
COMMENT ON TABLE customer_analytics_internal.rfm_dirty_customer IS
    'Customers whose order lines or versions changed since the last refresh_customer_rfm() (NULL: everyone, after a TRUNCATE)';

CREATE TABLE customer_analytics_internal.rfm_new_line (
    customer_id text NOT NULL,
    order_id    text NOT NULL,
    line_number integer NOT NULL,
    order_ts    timestamptz NOT NULL,
    revenue     numeric NOT NULL,
    purchase    boolean NOT NULL
);
COMMENT ON TABLE customer_analytics_internal.rfm_new_line IS
    'Order lines inserted since the last refresh_customer_rfm() (purchase: a completed line of a known customer, not a credit line worth nothing); an order whose lines are all here is added to its customer''s rollup without reading their other lines';

/*
 * Recency is not stored: it moves every day for everybody, and storing it
 * would rewrite every row each day.  The last purchase is, and the view
 * customer_rfm computes recency against the refresh's as_of; a row is
 * rewritten only when its scores, cell, segment or inputs change.
 */
CREATE TABLE customer_analytics.customer_rfm_score (
    customer_id  text PRIMARY KEY,
    customer_key bigint,
    frequency    bigint NOT NULL,
    monetary     numeric NOT NULL,
    r            integer NOT NULL,
    f            integer NOT NULL,
    m            integer NOT NULL,
    rfm_cell     text NOT NULL,
    segment      text NOT NULL,
    last_purchase timestamptz NOT NULL
);
CREATE INDEX customer_rfm_score_segment_idx ON customer_analytics.customer_rfm_score (segment);
-- top_customers reads the first rows of this order, not all of them
CREATE INDEX customer_rfm_score_monetary_idx ON customer_analytics.customer_rfm_score (monetary DESC, customer_id);
COMMENT ON TABLE customer_analytics.customer_rfm_score IS
    'The scores behind customer_rfm, written by refresh_customer_rfm() (only the rows that changed); recency is computed by the view from last_purchase, so that time passing rewrites nothing';
COMMENT ON COLUMN customer_analytics.customer_rfm_score.last_purchase IS
    'Time of the customer''s last purchase (returns do not move it) up to the as_of of the refresh; customer_rfm''s recency_days is counted from it';

CREATE TABLE customer_analytics.customer_rfm_refresh (
    id           boolean PRIMARY KEY DEFAULT true CHECK (id),
    as_of        timestamptz NOT NULL,
    refreshed_at timestamptz NOT NULL
);
COMMENT ON TABLE customer_analytics.customer_rfm_refresh IS
    'One row: the reference time of the scores in customer_rfm_score and when refresh_customer_rfm() last wrote them';
-- what analysts read is dumped like a materialized view's contents; the
-- rollup is rebuilt by the first refresh after a restore
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.customer_rfm_score', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.customer_rfm_refresh', '');

CREATE FUNCTION customer_analytics_internal.note_dirty_customers()
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
        INSERT INTO customer_analytics_internal.rfm_dirty_customer VALUES (NULL) ON CONFLICT DO NOTHING;
    ELSIF TG_TABLE_NAME = 'dim_customer' THEN
        -- a new, changed or removed version moves the customer's current key
        -- or which lines are theirs
        IF TG_OP = 'INSERT' THEN
            INSERT INTO customer_analytics_internal.rfm_dirty_customer
            SELECT DISTINCT customer_id FROM new_rows ON CONFLICT DO NOTHING;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO customer_analytics_internal.rfm_dirty_customer
            SELECT DISTINCT customer_id FROM old_rows ON CONFLICT DO NOTHING;
        ELSE
            INSERT INTO customer_analytics_internal.rfm_dirty_customer
            SELECT customer_id FROM old_rows UNION SELECT customer_id FROM new_rows ON CONFLICT DO NOTHING;
        END IF;
    ELSIF TG_OP = 'INSERT' THEN
        -- new lines are usually new orders: queued, added without a recompute
        INSERT INTO customer_analytics_internal.rfm_new_line (customer_id, order_id, line_number, order_ts, revenue, purchase)
        SELECT c.customer_id, r.order_id, r.line_number, r.order_ts, r.revenue,
               r.status = 'completed' AND r.customer_key <> -1 AND (r.quantity > 0 OR r.revenue <> 0)
        FROM new_rows r JOIN customer_analytics.dim_customer c USING (customer_key);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO customer_analytics_internal.rfm_dirty_customer
        SELECT DISTINCT c.customer_id
        FROM (SELECT DISTINCT customer_key FROM old_rows) r
        JOIN customer_analytics.dim_customer c USING (customer_key)
        ON CONFLICT DO NOTHING;
    ELSE
        INSERT INTO customer_analytics_internal.rfm_dirty_customer
        SELECT DISTINCT c.customer_id
        FROM (SELECT customer_key FROM old_rows UNION SELECT customer_key FROM new_rows) r
        JOIN customer_analytics.dim_customer c USING (customer_key)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.note_dirty_customers() IS
    'Statement trigger: queues new order lines in rfm_new_line, and notes in rfm_dirty_customer the customers whose order lines or versions changed otherwise';

CREATE TRIGGER fact_order_line_dirty_customers_ins AFTER INSERT ON customer_analytics.fact_order_line
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_customers();
CREATE TRIGGER fact_order_line_dirty_customers_upd AFTER UPDATE ON customer_analytics.fact_order_line
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_customers();
CREATE TRIGGER fact_order_line_dirty_customers_del AFTER DELETE ON customer_analytics.fact_order_line
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_customers();
CREATE TRIGGER fact_order_line_dirty_customers_trunc AFTER TRUNCATE ON customer_analytics.fact_order_line
    FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_customers();
CREATE TRIGGER dim_customer_dirty_customers_ins AFTER INSERT ON customer_analytics.dim_customer
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_customers();
CREATE TRIGGER dim_customer_dirty_customers_upd AFTER UPDATE ON customer_analytics.dim_customer
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_customers();
CREATE TRIGGER dim_customer_dirty_customers_del AFTER DELETE ON customer_analytics.dim_customer
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_customers();
CREATE TRIGGER dim_customer_dirty_customers_trunc AFTER TRUNCATE ON customer_analytics.dim_customer
    FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.note_dirty_customers();

/*
 * What rfm() returns on the star schema, scored from rfm_rollup_customer
 * instead of the facts (src/rfm.c): the same breaks and scores.  Valid
 * while no order line is later than as_of (the rollup holds them all).
 */
CREATE FUNCTION customer_analytics.rfm_from_rollup(as_of timestamptz)
RETURNS TABLE (customer_key bigint, customer_id text, recency_days integer, frequency bigint,
               monetary numeric, r integer, f integer, m integer, rfm_cell text, segment text)
AS 'MODULE_PATHNAME', 'ca_rfm_from_rollup'
LANGUAGE C STABLE STRICT PARALLEL RESTRICTED
ROWS 10000;
COMMENT ON FUNCTION customer_analytics.rfm_from_rollup(timestamptz) IS
    'rfm(as_of) of the star schema computed from rfm_rollup_customer (the same rows, much faster); what refresh_customer_rfm() writes while no order line is later than as_of';

/*
 * rfm()'s inputs on the star schema, one row per purchase or return:
 * completed lines of known customers up to a time; the lines of an order are
 * one purchase (at its latest line), a return (negative revenue) stands
 * alone: grouped by order and, for a return, by its line.  A credit line
 * worth nothing (negative quantity at price 0) is neither.  NULL ids: every
 * customer.  Inlined into the caller.  refresh_customer_rfm() has the same
 * query written out (Citus does not inline it over a distributed table).
 */
CREATE FUNCTION customer_analytics_internal.rfm_orders(customer_ids text[], up_to timestamptz)
RETURNS TABLE (customer_id text, ts timestamptz, amount numeric)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT c.customer_id, pg_catalog.max(fl.order_ts), pg_catalog.sum(fl.revenue)
    FROM customer_analytics.fact_order_line fl
    JOIN customer_analytics.dim_customer c ON c.customer_key OPERATOR(pg_catalog.=) fl.customer_key
    WHERE fl.status OPERATOR(pg_catalog.=) 'completed' AND c.customer_key OPERATOR(pg_catalog.<>) -1
      AND (fl.quantity OPERATOR(pg_catalog.>) 0 OR fl.revenue OPERATOR(pg_catalog.<>) 0)
      AND fl.order_ts OPERATOR(pg_catalog.<=) up_to
      AND (customer_ids IS NULL OR c.customer_id IN (SELECT pg_catalog.unnest(customer_ids)))
    GROUP BY c.customer_id, fl.order_id,
             CASE WHEN fl.revenue OPERATOR(pg_catalog.<) 0 THEN fl.line_number END
$$;
COMMENT ON FUNCTION customer_analytics_internal.rfm_orders(text[], timestamptz) IS
    'Internal: rfm()''s inputs on the star schema, one row per purchase (an order) or return (a credit line) of the given customers (NULL: all) up to a time';

/*
 * The same inputs as rfm_agg over rfm_orders(NULL, up_to), per customer,
 * from rfm()'s C scan of the facts: the full rebuild of the rollup at the
 * speed of rfm() rather than of a sort of every line by order.
 */
CREATE FUNCTION customer_analytics_internal.rfm_rollup_rows(up_to timestamptz)
RETURNS TABLE (customer_id text, customer_key bigint, last_order timestamptz, frequency bigint, monetary numeric)
AS 'MODULE_PATHNAME', 'ca_rfm_rollup_rows'
LANGUAGE C STABLE STRICT PARALLEL RESTRICTED
ROWS 10000;
COMMENT ON FUNCTION customer_analytics_internal.rfm_rollup_rows(timestamptz) IS
    'Internal: rfm_rollup_customer''s rows for every customer with a counted line up to a time (the current version''s key, last purchase, purchases, monetary value), from one C scan of the facts as rfm() reads them';

CREATE FUNCTION customer_analytics.refresh_customer_rfm(full_refresh boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET customer_analytics_internal.own_writer = on
AS $$
DECLARE
    ids text[];
    everyone boolean;
    as_of timestamptz := customer_analytics.reference_time();
    map text := COALESCE(NULLIF(current_setting('customer_analytics.rfm_segment_map', true), ''), 'default');
    redo bigint;
    rounds integer := 0;
    later boolean;
    changed bigint;
BEGIN
    -- one maintainer at a time; readers never wait
    PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('refresh_customer_rfm()'));
    IF (SELECT count(*) FROM customer_analytics.rfm_segment_cells(map)) <> 125 THEN
        RAISE EXCEPTION 'RFM segment map "%" does not name all 125 cells', map
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('See SELECT * FROM customer_analytics.rfm_check_segment_map(%L);', map);
    END IF;
    LOOP
        rounds := rounds + 1;
        -- take the noted customers (those noted by transactions still running stay for next time)
        WITH taken AS (DELETE FROM customer_analytics_internal.rfm_dirty_customer RETURNING customer_id)
        SELECT array_agg(customer_id) FILTER (WHERE customer_id IS NOT NULL), bool_or(customer_id IS NULL)
        INTO ids, everyone FROM taken;
        -- (the subqueries select a column: Citus plans no EXISTS without)
        IF full_refresh OR everyone
           OR (NOT EXISTS (SELECT 1 FROM customer_analytics.rfm_rollup_customer)
               AND customer_analytics_internal.has_rows('customer_analytics.fact_order_line')) THEN
            DELETE FROM customer_analytics.rfm_rollup_customer;
            ids := NULL;
            everyone := true;
            full_refresh := false;
        ELSIF ids IS NOT NULL THEN
            DELETE FROM customer_analytics.rfm_rollup_customer WHERE customer_id IN (SELECT unnest(ids));
        END IF;
        -- The queued lines these statements see are in the facts they
        -- read: they are consumed here, not added again below.
        IF everyone THEN
            WITH consumed AS (
                DELETE FROM customer_analytics_internal.rfm_new_line
            )
            INSERT INTO customer_analytics.rfm_rollup_customer (customer_id, customer_key, last_order, frequency, monetary)
            SELECT r.customer_id, r.customer_key, r.last_order, r.frequency, r.monetary
            FROM customer_analytics_internal.rfm_rollup_rows('infinity') r;
        ELSIF ids IS NOT NULL THEN
            -- a few customers: their lines through the indexes (the
            -- query of rfm_orders(ids, 'infinity') written out: Citus
            -- inlines no SQL function over a distributed table, and runs
            -- none with parameters; on one node the plan is the same)
            WITH consumed AS (
                DELETE FROM customer_analytics_internal.rfm_new_line q
                WHERE q.customer_id IN (SELECT unnest(ids))
            )
            INSERT INTO customer_analytics.rfm_rollup_customer (customer_id, customer_key, last_order, frequency, monetary)
            SELECT o.customer_id, cur.customer_key, (o.s).last_order, (o.s).frequency, (o.s).monetary
            FROM (SELECT x.customer_id, customer_analytics.rfm_agg(x.ts, x.amount) AS s
                  FROM (SELECT c.customer_id, max(fl.order_ts) AS ts, sum(fl.revenue) AS amount
                        FROM customer_analytics.fact_order_line fl
                        JOIN customer_analytics.dim_customer c ON c.customer_key = fl.customer_key
                        WHERE fl.status = 'completed' AND c.customer_key <> -1
                          AND (fl.quantity > 0 OR fl.revenue <> 0)
                          AND c.customer_id IN (SELECT unnest(ids))
                        GROUP BY c.customer_id, fl.order_id,
                                 CASE WHEN fl.revenue < 0 THEN fl.line_number END) x
                  GROUP BY x.customer_id) o
            LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = o.customer_id AND cur.is_current
                                                         AND cur.customer_key <> -1;
        END IF;

        -- new orders are added to their customers' rows; an order that had
        -- lines before (its line count in the facts is larger) is not new:
        -- its customers are recomputed in the next round
        WITH taken AS (
            DELETE FROM customer_analytics_internal.rfm_new_line RETURNING *
        ), queued AS (
            SELECT t.order_id, count(*) AS n FROM taken t GROUP BY t.order_id
        ), orders AS (
            -- the facts' lines counted in a join, not a subquery per order:
            -- Citus plans no correlated subquery next to a CTE
            SELECT q.order_id, q.n = COALESCE(f.n, 0) AS whole
            FROM queued q
            LEFT JOIN (SELECT f.order_id, count(*) AS n FROM customer_analytics.fact_order_line f
                       WHERE f.order_id IN (SELECT order_id FROM queued)
                       GROUP BY f.order_id) f USING (order_id)
        ), noted AS (
            INSERT INTO customer_analytics_internal.rfm_dirty_customer
            SELECT DISTINCT t.customer_id FROM taken t JOIN orders o USING (order_id) WHERE NOT o.whole
            ON CONFLICT DO NOTHING
            RETURNING 1
        ), per_order AS (            -- grouped as above
            SELECT t.customer_id, max(t.order_ts) AS ts, sum(t.revenue) AS amount
            FROM taken t JOIN orders o USING (order_id)
            WHERE o.whole AND t.purchase
            GROUP BY t.customer_id, t.order_id, CASE WHEN t.revenue < 0 THEN t.line_number END
        ), added AS (
            INSERT INTO customer_analytics.rfm_rollup_customer AS u (customer_id, customer_key, last_order, frequency, monetary)
            SELECT p.customer_id, cur.customer_key, (p.s).last_order, (p.s).frequency, (p.s).monetary
            FROM (SELECT customer_id, customer_analytics.rfm_agg(ts, amount) AS s FROM per_order GROUP BY customer_id) p
            LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = p.customer_id AND cur.is_current
                                                         AND cur.customer_key <> -1
            ON CONFLICT (customer_id) DO UPDATE
                SET last_order = greatest(u.last_order, excluded.last_order),
                    frequency = u.frequency + excluded.frequency,
                    monetary = u.monetary + excluded.monetary
            RETURNING 1
        )
        SELECT count(*) FROM noted INTO redo;   -- (added runs all the same)
        EXIT WHEN redo = 0 OR rounds >= 10;
    END LOOP;

    -- lines later than as_of (an as_of in the past) are not in rfm(as_of):
    -- then the scores come from the facts
    -- (the last purchase as of then from the same C scan of the inputs)
    later := EXISTS (SELECT 1 FROM customer_analytics.fact_order_line WHERE order_ts > as_of);
    WITH scored AS (
        SELECT s.*, p.last_order AS last_purchase
        FROM customer_analytics.rfm(as_of) s
        JOIN customer_analytics_internal.rfm_rollup_rows(as_of) p ON p.customer_id = s.customer_id
        WHERE later
        UNION ALL
        SELECT s.*, u.last_order
        FROM customer_analytics.rfm_from_rollup(as_of) s
        JOIN customer_analytics.rfm_rollup_customer u ON u.customer_id = s.customer_id
        WHERE NOT later
    ), diff AS MATERIALIZED (      -- one pass over both: what to write
        SELECT s.*, t.customer_id AS old_customer_id, t.segment AS old_segment, t.monetary AS old_monetary,
               t.frequency AS old_frequency, t.last_purchase AS old_last_purchase
        FROM scored s FULL JOIN customer_analytics.customer_rfm_score t ON t.customer_id = s.customer_id
        WHERE s.customer_id IS NULL OR t.customer_id IS NULL
           OR (t.customer_key, t.last_purchase, t.frequency, t.monetary, t.rfm_cell, t.segment)
              IS DISTINCT FROM (s.customer_key, s.last_purchase, s.frequency, s.monetary, s.rfm_cell, s.segment)
    ), updated AS (
        UPDATE customer_analytics.customer_rfm_score t
        SET customer_key = d.customer_key, last_purchase = d.last_purchase, frequency = d.frequency,
            monetary = d.monetary, r = d.r, f = d.f, m = d.m, rfm_cell = d.rfm_cell, segment = d.segment
        FROM diff d
        WHERE t.customer_id = d.customer_id AND d.old_customer_id IS NOT NULL
        RETURNING t.segment, t.monetary, t.frequency, t.last_purchase,
                  d.old_segment, d.old_monetary, d.old_frequency, d.old_last_purchase
    ), inserted AS (
        INSERT INTO customer_analytics.customer_rfm_score
            (customer_id, customer_key, last_purchase, frequency, monetary, r, f, m, rfm_cell, segment)
        SELECT d.customer_id, d.customer_key, d.last_purchase, d.frequency, d.monetary, d.r, d.f, d.m, d.rfm_cell, d.segment
        FROM diff d WHERE d.old_customer_id IS NULL
        RETURNING segment, monetary, frequency, last_purchase
    ), deleted AS (
        DELETE FROM customer_analytics.customer_rfm_score t
        USING diff d
        WHERE t.customer_id = d.old_customer_id AND d.customer_id IS NULL
        RETURNING t.segment, t.monetary, t.frequency, t.last_purchase
    ), stat AS (            -- segment_summary's sums: the rows written in, the rows replaced out
        INSERT INTO customer_analytics_internal.rfm_segment_stat AS g
        SELECT c.segment, sum(c.n)::bigint, sum(c.n * c.monetary), sum(c.n * c.frequency)::bigint,
               sum(c.n * EXTRACT(epoch FROM c.last_purchase))
        FROM (SELECT 1, u.segment, u.monetary, u.frequency, u.last_purchase FROM updated u
              UNION ALL
              SELECT -1, u.old_segment, u.old_monetary, u.old_frequency, u.old_last_purchase FROM updated u
              UNION ALL
              SELECT 1, i.segment, i.monetary, i.frequency, i.last_purchase FROM inserted i
              UNION ALL
              SELECT -1, x.segment, x.monetary, x.frequency, x.last_purchase FROM deleted x)
             c (n, segment, monetary, frequency, last_purchase)
        GROUP BY c.segment
        ORDER BY c.segment
        ON CONFLICT (segment) DO UPDATE
            SET customers = g.customers + excluded.customers,
                monetary = g.monetary + excluded.monetary,
                frequency = g.frequency + excluded.frequency,
                purchase_epochs = g.purchase_epochs + excluded.purchase_epochs
    )
    SELECT (SELECT count(*) FROM updated) + (SELECT count(*) FROM inserted) + (SELECT count(*) FROM deleted)
    INTO changed;
    DELETE FROM customer_analytics_internal.rfm_segment_stat WHERE customers = 0;
    INSERT INTO customer_analytics.customer_rfm_refresh (id, as_of, refreshed_at)
    VALUES (true, as_of, clock_timestamp())
    ON CONFLICT (id) DO UPDATE SET as_of = EXCLUDED.as_of, refreshed_at = EXCLUDED.refreshed_at;
    RETURN changed;
END
$$;
COMMENT ON FUNCTION customer_analytics.refresh_customer_rfm(boolean) IS
    'Brings customer_rfm up to date as of reference_time(): adds new orders to their customers'' RFM inputs, recomputes the inputs of customers whose lines or versions changed otherwise (everyone with full_refresh, after a TRUNCATE, or when the rollup is empty), rescores every customer and writes the rows that changed; returns their number. The pipeline calls it after transform()';

-- recency as rfm() counts it: whole days from the last purchase to as_of
CREATE VIEW customer_analytics.customer_rfm AS
SELECT s.customer_id, s.customer_key,
       trunc(EXTRACT(epoch FROM a.as_of - s.last_purchase) / 86400)::integer AS recency_days,
       s.frequency, s.monetary, s.r, s.f, s.m, s.rfm_cell, s.segment, a.as_of
FROM customer_analytics.customer_rfm_score s
CROSS JOIN customer_analytics.customer_rfm_refresh a;
COMMENT ON VIEW customer_analytics.customer_rfm IS
    'RFM scores and segment of every customer, as of reference_time() at the last refresh_customer_rfm() (setting customer_analytics.as_of, else the time of the refresh); the same rows as rfm(as_of)';

/*
 * segment_summary's sums per segment, kept by a statement trigger on
 * customer_rfm_score from the rows each statement writes: the summary then
 * costs the number of segments, not of customers.  Derived from
 * customer_rfm_score, so not dumped: restoring the scores' rows fires the
 * trigger and fills it again.
 */
CREATE TABLE customer_analytics_internal.rfm_segment_stat (
    segment         text PRIMARY KEY,
    customers       bigint NOT NULL,
    monetary        numeric NOT NULL,
    frequency       bigint NOT NULL,
    -- recency is counted from last_purchase at as_of: a sum of epochs
    -- gives the average age at any as_of without visiting a customer
    purchase_epochs numeric NOT NULL
);
COMMENT ON TABLE customer_analytics_internal.rfm_segment_stat IS
    'Per segment of customer_rfm_score: customers, sums of monetary, frequency and last_purchase (epoch seconds); kept by a trigger on customer_rfm_score, read by segment_summary. Derived: not dumped, refilled when the scores are restored';

CREATE FUNCTION customer_analytics_internal.maintain_rfm_segment_stat()
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
        DELETE FROM customer_analytics_internal.rfm_segment_stat;
        RETURN NULL;
    END IF;
    -- the transition tables that exist depend on the operation
    EXECUTE format($q$
        INSERT INTO customer_analytics_internal.rfm_segment_stat AS s
        SELECT segment, sum(n)::bigint, sum(n * monetary), sum(n * frequency)::bigint,
               sum(n * EXTRACT(epoch FROM last_purchase))
        FROM (%s) c (n, segment, monetary, frequency, last_purchase)
        GROUP BY segment
        ORDER BY segment    -- two writers lock the segments in the same order
        ON CONFLICT (segment) DO UPDATE
            SET customers = s.customers + excluded.customers,
                monetary = s.monetary + excluded.monetary,
                frequency = s.frequency + excluded.frequency,
                purchase_epochs = s.purchase_epochs + excluded.purchase_epochs$q$,
        CASE TG_OP
            WHEN 'INSERT' THEN 'SELECT 1, segment, monetary, frequency, last_purchase FROM new_rows'
            WHEN 'DELETE' THEN 'SELECT -1, segment, monetary, frequency, last_purchase FROM old_rows'
            ELSE 'SELECT 1, segment, monetary, frequency, last_purchase FROM new_rows
                  UNION ALL SELECT -1, segment, monetary, frequency, last_purchase FROM old_rows'
        END);
    DELETE FROM customer_analytics_internal.rfm_segment_stat WHERE customers = 0;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.maintain_rfm_segment_stat() IS
    'Statement trigger on customer_rfm_score: adds the rows a statement wrote to rfm_segment_stat and takes away the rows it replaced or deleted';

CREATE TRIGGER customer_rfm_score_segment_stat_ins AFTER INSERT ON customer_analytics.customer_rfm_score
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.maintain_rfm_segment_stat();
CREATE TRIGGER customer_rfm_score_segment_stat_upd AFTER UPDATE ON customer_analytics.customer_rfm_score
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.maintain_rfm_segment_stat();
CREATE TRIGGER customer_rfm_score_segment_stat_del AFTER DELETE ON customer_analytics.customer_rfm_score
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.maintain_rfm_segment_stat();
CREATE TRIGGER customer_rfm_score_segment_stat_trunc AFTER TRUNCATE ON customer_analytics.customer_rfm_score
    FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.maintain_rfm_segment_stat();

-- The LIMIT makes the planner read the first rows of
-- customer_rfm_score_monetary_idx, and the OFFSET 0 fence makes it look up
-- their details by key: a hash join would read every customer's version.
CREATE MATERIALIZED VIEW customer_analytics.top_customers AS
SELECT t.rank, t.customer_id, t.customer_key, d.name, d.email, d.city, d.country,
       t.monetary, t.frequency, t.recency_days, t.rfm_cell, t.segment
FROM (SELECT c.*, row_number() OVER (ORDER BY c.monetary DESC, c.customer_id) AS rank
      FROM (SELECT * FROM customer_analytics.customer_rfm
            ORDER BY monetary DESC, customer_id
            LIMIT customer_analytics.top_customers_limit()) c) t
LEFT JOIN LATERAL (SELECT x.name, x.email, x.city, x.country FROM customer_analytics.dim_customer x
                   WHERE x.customer_key = t.customer_key OFFSET 0) d ON true;
CREATE UNIQUE INDEX top_customers_rank_idx ON customer_analytics.top_customers (rank);
COMMENT ON MATERIALIZED VIEW customer_analytics.top_customers IS
    'The customers with the highest monetary value (how many: customer_analytics.top_customers, default 100), with their current details and segment';

-- avg_recency_days: the average of exact (fractional) day counts, which
-- the sums give; customer_rfm's recency_days are whole days
CREATE MATERIALIZED VIEW customer_analytics.segment_summary AS
SELECT g.segment,
       g.customers,
       g.monetary AS revenue,
       round(g.monetary / NULLIF(sum(g.monetary) OVER (), 0), 4) AS revenue_share,
       round(g.monetary / NULLIF(g.frequency, 0), 2) AS avg_order_value,
       round(g.frequency::numeric / g.customers, 2) AS avg_orders,
       round((g.customers * EXTRACT(epoch FROM a.as_of) - g.purchase_epochs) / (g.customers * 86400), 1)
           AS avg_recency_days
FROM customer_analytics_internal.rfm_segment_stat g
CROSS JOIN customer_analytics.customer_rfm_refresh a;
CREATE UNIQUE INDEX segment_summary_segment_idx ON customer_analytics.segment_summary (segment);
COMMENT ON MATERIALIZED VIEW customer_analytics.segment_summary IS
    'Per RFM segment: customers, revenue and its share of all revenue, average order value, average orders and average recency in days (exact, to 0.1 day)';
