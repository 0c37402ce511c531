/*
 * Clickstream (src/clickstream.c): event capture, sessionization, the funnel.
 *
 *   track_event()          one event from an application into stg_events
 *   session_number()       the sessionizing window function (C)
 *   sessions               one row per visit, kept up to date incrementally
 *                          by refresh_clickstream() from a queue of the
 *                          fact_event changes (a statement trigger)
 *   funnel_daily, product_interest, purchase_order   views
 *
 * refresh_clickstream() is what a per-minute schedule calls: the events
 * part of transform() and the sessions, nothing of the batch tables.
 */

CREATE FUNCTION customer_analytics.session_gap()
    RETURNS interval
    AS 'MODULE_PATHNAME', 'ca_session_gap' LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.session_gap() IS
    'The effective customer_analytics.session_gap: inactivity after which the next event starts a new session (default 30 minutes)';

CREATE FUNCTION customer_analytics.event_lateness()
    RETURNS interval
    AS 'MODULE_PATHNAME', 'ca_event_lateness' LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.event_lateness() IS
    'The effective customer_analytics.event_lateness: how far behind the event-time watermark an event is still processed incrementally (default 3 days); NULL means no limit';

CREATE FUNCTION customer_analytics.session_number(ts timestamptz, gap interval DEFAULT '30 minutes')
    RETURNS bigint
    AS 'MODULE_PATHNAME', 'ca_session_number' LANGUAGE C IMMUTABLE WINDOW PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics.session_number(timestamptz, interval) IS
    'Window function: session number of each event of a visitor, used as session_number(ts, gap) OVER (PARTITION BY visitor ORDER BY ts). 1 for the first event; an event more than gap after the previous one starts the next session (a pause exactly equal to gap does not). The gap is read from the first row of each partition (pass a constant). A NULL ts gives NULL and leaves the count alone, a NULL gap NULL for the partition; rows out of time order are an error; gap must be positive, without months (days are 24 hours)';

/* ---------------------------------------------------------------------
 * Capture
 * --------------------------------------------------------------------- */

CREATE FUNCTION customer_analytics_internal.on_citus_worker()
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'ca_on_citus_worker' LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION customer_analytics_internal.on_citus_worker() IS
    'Internal: whether this node is a Citus worker (its group in pg_dist_local_group is not 0), where track_event() is refused; false without Citus, at the cost of one syscache lookup';

/*
 * Plain PL/pgSQL over a plain INSERT: stg_events has no unique constraint
 * and its stage_id sequence is cached per backend, so concurrent writers
 * never wait for each other; a retried event (same event_id) is harmless,
 * transform keeps its latest staged version.  Fully schema-qualified
 * (operators and type names too) rather than SET search_path, which would
 * cost a GUC save/restore per event.  On a Citus cluster it runs on the
 * coordinator, which routes the row to its shard; on a worker it is refused
 * (on_citus_worker(): without Citus, one syscache lookup per event).
 */
CREATE FUNCTION customer_analytics.track_event(
    event_type  text,
    session_id  text,
    customer_id text DEFAULT NULL,
    product_id  text DEFAULT NULL,
    order_id    text DEFAULT NULL,
    channel     text DEFAULT NULL,
    device      text DEFAULT NULL,
    event_ts    timestamptz DEFAULT NULL,
    event_id    text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    id pg_catalog.text := COALESCE(event_id, pg_catalog.gen_random_uuid()::pg_catalog.text);
BEGIN
    IF event_type IS NULL
       OR NOT event_type OPERATOR(pg_catalog.=) ANY ('{page_view,product_view,add_to_cart,checkout,purchase}'::pg_catalog.text[]) THEN
        RAISE EXCEPTION 'invalid event_type: %', COALESCE(pg_catalog.quote_literal(event_type), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'Argument event_type of track_event().',
                  HINT = 'Use page_view, product_view, add_to_cart, checkout or purchase.';
    END IF;
    IF session_id IS NULL OR session_id OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION 'track_event() needs a session_id'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = pg_catalog.format('Argument session_id was %s for a %s event.',
                                             COALESCE(pg_catalog.quote_literal(session_id), 'NULL'), event_type),
                  HINT = 'Pass the visitor''s session or cookie id.';
    END IF;
    IF id OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION 'track_event() got an empty event_id'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass NULL to have one generated.';
    END IF;
    -- after the checks of the arguments: a bad call is told what is wrong with it first
    IF customer_analytics_internal.on_citus_worker() THEN
        RAISE EXCEPTION 'track_event() must run on the Citus coordinator, and this node is a worker'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'Before distribute(), an event tracked here would stay in this worker''s own copy of stg_events, which nothing reads; the pipeline that moves events on, the sessions and the change queues are the coordinator''s.',
                  HINT = 'Connect to the coordinator and call customer_analytics.track_event() there.';
    END IF;
    INSERT INTO customer_analytics.stg_events
        (event_id, event_ts, customer_id, session_id, event_type, product_id, order_id, channel, device)
    VALUES (id, COALESCE(event_ts, pg_catalog.clock_timestamp()), customer_id, session_id, event_type,
            product_id, order_id, channel, device);
    RETURN id;
END
$$;
COMMENT ON FUNCTION customer_analytics.track_event(text, text, text, text, text, text, text, timestamptz, text) IS
    'Record one clickstream event from an application into stg_events; returns its event_id (a new UUID when none is given). event_ts defaults to the current time. Safe with many concurrent writers (no unique index, no lock); a plain INSERT or COPY into stg_events is the equivalent bulk path. transform() or refresh_clickstream() moves it on. On a Citus cluster, call it on the coordinator: on a worker it is refused (SQLSTATE 55000)';

/* ---------------------------------------------------------------------
 * Sessions
 * --------------------------------------------------------------------- */

/*
 * The visitor whose events are sessionized together: an identified
 * customer (directly or stitched; also an id not yet in dim_customer)
 * across devices and source sessions, else the source session.
 */
CREATE FUNCTION customer_analytics.visitor(customer_id text, session_id text)
    RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT CASE WHEN customer_id IS NOT NULL THEN 'c:' OPERATOR(pg_catalog.||) customer_id
                      ELSE 's:' OPERATOR(pg_catalog.||) session_id END $$;
COMMENT ON FUNCTION customer_analytics.visitor(text, text) IS
    'Who a clickstream event belongs to for sessionization: ''c:<customer_id>'' for an identified (or stitched) customer, else ''s:<session_id>''';

CREATE TABLE customer_analytics.sessions (
    visitor         text NOT NULL,
    session_start   timestamptz NOT NULL,
    session_key     text GENERATED ALWAYS AS
                    (visitor || '@' || ((extract(epoch FROM session_start - '1970-01-01 00:00:00+00'::timestamptz) * 1000000)::bigint)::text) STORED,
    session_end     timestamptz NOT NULL,
    duration        interval GENERATED ALWAYS AS (session_end - session_start) STORED,
    date_key        integer NOT NULL,
    customer_id     text,
    customer_key    bigint,
    events          integer NOT NULL,
    pages           integer NOT NULL,
    product_views   integer NOT NULL,
    add_to_carts    integer NOT NULL,
    checkouts       integer NOT NULL,
    purchases       integer NOT NULL,
    converted       boolean GENERATED ALWAYS AS (purchases > 0) STORED,
    channel         text,
    device          text,
    PRIMARY KEY (visitor, session_start),
    CHECK (session_end >= session_start)
);
CREATE INDEX sessions_date_idx ON customer_analytics.sessions (date_key);
COMMENT ON TABLE customer_analytics.sessions IS
    'One row per visit: a visitor''s events with no pause longer than customer_analytics.session_gap. Derived from fact_event and kept up to date by refresh_clickstream() (incrementally; a full rebuild when the gap setting changes)';
COMMENT ON COLUMN customer_analytics.sessions.session_key IS 'visitor@start (microseconds since 1970): stable, the same whether computed incrementally or from scratch';
COMMENT ON COLUMN customer_analytics.sessions.pages IS 'Pages seen: page_view and product_view events';
COMMENT ON COLUMN customer_analytics.sessions.customer_key IS 'Customer version of the session''s last identified event; NULL for an anonymous visit';
COMMENT ON COLUMN customer_analytics.sessions.channel IS 'Channel of the first event (where the visit came from)';
COMMENT ON COLUMN customer_analytics.sessions.device IS 'Device of the first event';
COMMENT ON COLUMN customer_analytics.sessions.date_key IS 'Day of the session start in customer_analytics.timezone';

/* fact_event rows changed since the last refresh, per (visitor, earliest time) */
CREATE TABLE customer_analytics_internal.clickstream_change (
    visitor     text NOT NULL,
    since       timestamptz NOT NULL
);
COMMENT ON TABLE customer_analytics_internal.clickstream_change IS
    'Internal: visitors whose events changed since the last refresh_clickstream(), from when (filled by a trigger on fact_event)';

CREATE TABLE customer_analytics_internal.clickstream_state (
    singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    session_gap       interval NOT NULL,
    timezone          text NOT NULL,
    last_run_at       timestamptz
);
COMMENT ON TABLE customer_analytics_internal.clickstream_state IS
    'Internal: the settings the sessions table was built with; a different gap or time zone makes refresh_clickstream() rebuild it';

-- the events of one visitor, from a time (incremental refresh): by key,
-- not by customer_id, as a text index costs the full load twice as much
CREATE INDEX fact_event_customer_ts_idx ON customer_analytics.fact_event (customer_key, event_ts)
    WHERE customer_key IS NOT NULL;
-- ids not (yet) in dim_customer: few, found by id
CREATE INDEX fact_event_unknown_customer_idx ON customer_analytics.fact_event (customer_id)
    WHERE customer_key = -1;

CREATE FUNCTION customer_analytics_internal.fact_event_changed()
    RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
BEGIN
    -- one of the extension's writers queues its own changes
    IF customer_analytics_internal.own_writer() THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        -- no facts, no sessions; and the next event run is a full pass, so
        -- that the old watermark does not turn everything staged into late
        TRUNCATE clickstream_change, sessions;
        DELETE FROM event_transform_state;
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO clickstream_change (visitor, since)
        SELECT visitor(o.customer_id, o.session_id), min(o.event_ts) FROM old_rows o GROUP BY 1;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        INSERT INTO clickstream_change (visitor, since)
        SELECT visitor(n.customer_id, n.session_id), min(n.event_ts) FROM new_rows n GROUP BY 1;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.fact_event_changed() IS
    'Internal: queues the visitors of changed fact_event rows for refresh_clickstream()';

CREATE TRIGGER fact_event_changed_ins AFTER INSERT ON customer_analytics.fact_event
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.fact_event_changed();
CREATE TRIGGER fact_event_changed_upd AFTER UPDATE ON customer_analytics.fact_event
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.fact_event_changed();
CREATE TRIGGER fact_event_changed_del AFTER DELETE ON customer_analytics.fact_event
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.fact_event_changed();
CREATE TRIGGER fact_event_changed_trunc AFTER TRUNCATE ON customer_analytics.fact_event
    FOR EACH STATEMENT EXECUTE FUNCTION customer_analytics_internal.fact_event_changed();

/*
 * refresh_sessions()'s events of the changed identified visitors
 * (ca_changed) on Citus, into ca_session_events: the same rows as its
 * lookups one visitor at a time, which Citus cannot send to the shards of
 * fact_event (a lateral subquery with OFFSET).  The visitors are
 * materialised and joined instead: Citus sends them to every shard, and
 * each shard's rows of those visitors come back.  (An identified
 * visitor's sessions span source sessions, so shards: they are cut on the
 * coordinator; the anonymous visitors' are cut on the shards, by
 * anonymous_sessions_on_cluster().)
 */
CREATE FUNCTION customer_analytics_internal.changed_session_events_on_cluster()
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
BEGIN
    CREATE TEMP TABLE ca_session_events ON COMMIT DROP AS
    WITH c AS MATERIALIZED (
        SELECT c.visitor, c.since, substr(c.visitor, 3) AS id, c.visitor LIKE 'c:%' AS is_customer
        FROM ca_changed c
        WHERE c.visitor LIKE 'c:%'
    ), k AS MATERIALIZED (
        SELECT c.visitor, c.since, d.customer_key
        FROM c JOIN dim_customer d ON d.customer_id = c.id AND d.customer_key <> -1
        WHERE c.is_customer
    )
    SELECT k.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
           f.event_type, f.channel, f.device
    FROM k JOIN fact_event f ON f.customer_key = k.customer_key AND f.event_ts >= k.since
    UNION ALL
    SELECT c.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
           f.event_type, f.channel, f.device
    FROM c JOIN fact_event f ON f.customer_key = -1 AND f.customer_id = c.id AND f.event_ts >= c.since
    WHERE c.is_customer;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.changed_session_events_on_cluster() IS
    'Internal to refresh_sessions() on Citus: the events of the identified visitors queued as changed (ca_changed) into ca_session_events, by a join Citus sends to the shards instead of one lookup per visitor';

/*
 * On Citus (events distributed by session_id) the sessions of anonymous
 * visitors, whose visitor is their source session, are cut and summed on
 * the shards, each in one piece: the window and the GROUP BY are by the
 * distribution column, and only one row per session comes back.  The
 * statement is refresh_sessions()'s with the customer columns NULL (an
 * anonymous event has neither), over every anonymous event, or (changed
 * true) over those of the anonymous visitors in ca_changed from their
 * time.  The gap and time zone go in as literals: Citus sends the
 * statement to the shards as text.  Returns the sessions written.
 */
CREATE FUNCTION customer_analytics_internal.anonymous_sessions_on_cluster(gap interval, tz text, changed boolean)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE format($sql$
    INSERT INTO sessions (visitor, session_start, session_end, date_key, customer_id, customer_key,
                          events, pages, product_views, add_to_carts, checkouts, purchases,
                          channel, device)
    SELECT 's:' || e.session_id, min(e.event_ts), max(e.event_ts),
           date_key((min(e.event_ts) AT TIME ZONE %L)::date), NULL, NULL,
           count(*),
           count(*) FILTER (WHERE e.event_type IN ('page_view', 'product_view')),
           count(*) FILTER (WHERE e.event_type = 'product_view'),
           count(*) FILTER (WHERE e.event_type = 'add_to_cart'),
           count(*) FILTER (WHERE e.event_type = 'checkout'),
           count(*) FILTER (WHERE e.event_type = 'purchase'),
           (array_agg(e.channel ORDER BY e.event_ts, e.event_id))[1],
           (array_agg(e.device ORDER BY e.event_ts, e.event_id))[1]
    FROM (SELECT f.session_id, f.event_id, f.event_ts, f.event_type, f.channel, f.device,
                 session_number(f.event_ts, %L::interval)
                     OVER (PARTITION BY f.session_id ORDER BY f.event_ts, f.event_id) AS sn
          FROM fact_event f
          %s
          WHERE f.customer_id IS NULL) e
    GROUP BY e.session_id, e.sn
    $sql$, tz, gap,
    CASE WHEN changed THEN
        $j$JOIN (SELECT substr(c.visitor, 3) AS session_id, c.since FROM ca_changed c
                 WHERE c.visitor LIKE 's:%') c ON c.session_id = f.session_id AND f.event_ts >= c.since$j$
    END);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION customer_analytics_internal.anonymous_sessions_on_cluster(interval, text, boolean) IS
    'Internal to refresh_sessions() on Citus: the sessions of anonymous visitors (all, or those queued in ca_changed) cut and summed on the shards of fact_event, which is distributed by session_id; returns the sessions written';

/*
 * Rebuild the sessions of the visitors queued in clickstream_change (all of
 * them with full_rebuild).  For a visitor whose events changed from time t
 * on, the sessions that end before t - gap cannot change (the pause to any
 * event at or after t is longer than the gap); the others are deleted and
 * rebuilt from the start of the first of them.  So the result is exactly
 * what a rebuild from scratch gives.
 */
CREATE FUNCTION customer_analytics.refresh_sessions(full_rebuild boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    gap     interval := session_gap();
    tz      text := business_timezone();
    st      clickstream_state;
    n       bigint;
    -- on Citus the anonymous visitors' sessions are written on the shards
    on_cluster boolean := citus_managed('customer_analytics.fact_event');
    anonymous bigint := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(customer_analytics_internal.lock_key('transform_events()'));
    SELECT * INTO st FROM clickstream_state;
    IF st IS NULL OR st.session_gap <> gap OR st.timezone <> tz THEN
        full_rebuild := true;
    END IF;

    IF full_rebuild THEN
        TRUNCATE clickstream_change;
        DELETE FROM sessions;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF on_cluster THEN
            anonymous := anonymous_sessions_on_cluster(gap, tz, false);
            CREATE TEMP TABLE ca_session_events ON COMMIT DROP AS
            SELECT visitor(f.customer_id, f.session_id) AS visitor, f.event_id, f.event_ts,
                   f.customer_id, f.customer_key, f.event_type, f.channel, f.device
            FROM fact_event f
            WHERE f.customer_id IS NOT NULL;
        ELSE
        CREATE TEMP TABLE ca_session_events ON COMMIT DROP AS
        SELECT visitor(f.customer_id, f.session_id) AS visitor, f.event_id, f.event_ts,
               f.customer_id, f.customer_key, f.event_type, f.channel, f.device
        FROM fact_event f;
        END IF;
    ELSE
        CREATE TEMP TABLE ca_changed ON COMMIT DROP AS
        WITH taken AS (DELETE FROM clickstream_change RETURNING visitor, since)
        SELECT visitor, min(since) AS since FROM taken GROUP BY visitor;
        ANALYZE ca_changed;

        WITH gone AS (
            DELETE FROM sessions s
            WHERE (s.visitor, s.session_start) IN
                  (SELECT x.visitor, x.session_start
                   FROM ca_changed c
                   CROSS JOIN LATERAL (SELECT o.visitor, o.session_start FROM sessions o
                                       WHERE o.visitor = c.visitor AND o.session_end >= c.since - gap
                                       OFFSET 0) x)
            RETURNING s.visitor, s.session_start
        ), firsts AS (
            SELECT visitor, min(session_start) AS first_start, count(*) AS removed
            FROM gone GROUP BY visitor
        ), moved AS (
            UPDATE ca_changed c SET since = LEAST(c.since, f.first_start)
            FROM firsts f WHERE f.visitor = c.visitor
        )
        SELECT COALESCE(sum(removed), 0) INTO n FROM firsts;

        IF on_cluster THEN
            anonymous := anonymous_sessions_on_cluster(gap, tz, true);
            PERFORM changed_session_events_on_cluster();
        ELSE
        /*
         * Each changed visitor's events since its time, looked up through
         * the indexes one visitor at a time (OFFSET 0 keeps each lookup a
         * parameterised scan): a join the planner may hash would read the
         * whole dimension and the visitors' whole histories, a cost that
         * grows with the shop instead of with what changed.
         */
        CREATE TEMP TABLE ca_session_events ON COMMIT DROP AS
        SELECT c.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
               f.event_type, f.channel, f.device
        FROM ca_changed c
        CROSS JOIN LATERAL (SELECT d.customer_key FROM dim_customer d
                            WHERE d.customer_id = substr(c.visitor, 3) AND d.customer_key <> -1
                            OFFSET 0) d
        CROSS JOIN LATERAL (SELECT * FROM fact_event f
                            WHERE f.customer_key = d.customer_key AND f.event_ts >= c.since
                            OFFSET 0) f
        WHERE c.visitor LIKE 'c:%'
        UNION ALL
        SELECT c.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
               f.event_type, f.channel, f.device
        FROM ca_changed c
        CROSS JOIN LATERAL (SELECT * FROM fact_event f
                            WHERE f.customer_key = -1 AND f.customer_id = substr(c.visitor, 3)
                              AND f.event_ts >= c.since
                            OFFSET 0) f
        WHERE c.visitor LIKE 'c:%'
        UNION ALL
        SELECT c.visitor, f.event_id, f.event_ts, f.customer_id, f.customer_key,
               f.event_type, f.channel, f.device
        FROM ca_changed c
        CROSS JOIN LATERAL (SELECT * FROM fact_event f
                            WHERE f.session_id = substr(c.visitor, 3) AND f.event_ts >= c.since
                              AND f.customer_id IS NULL
                            OFFSET 0) f
        WHERE c.visitor LIKE 's:%';
        END IF;
        DROP TABLE ca_changed;
    END IF;
    RETURN QUERY VALUES ('sessions_removed', n);
    ANALYZE ca_session_events;

    INSERT INTO sessions (visitor, session_start, session_end, date_key, customer_id, customer_key,
                          events, pages, product_views, add_to_carts, checkouts, purchases,
                          channel, device)
    SELECT e.visitor, min(e.event_ts), max(e.event_ts),
           date_key((min(e.event_ts) AT TIME ZONE tz)::date),
           (array_agg(e.customer_id ORDER BY e.event_ts DESC, e.event_id DESC)
                FILTER (WHERE e.customer_id IS NOT NULL))[1],
           (array_agg(e.customer_key ORDER BY e.event_ts DESC, e.event_id DESC)
                FILTER (WHERE e.customer_key IS NOT NULL))[1],
           count(*),
           count(*) FILTER (WHERE e.event_type IN ('page_view', 'product_view')),
           count(*) FILTER (WHERE e.event_type = 'product_view'),
           count(*) FILTER (WHERE e.event_type = 'add_to_cart'),
           count(*) FILTER (WHERE e.event_type = 'checkout'),
           count(*) FILTER (WHERE e.event_type = 'purchase'),
           (array_agg(e.channel ORDER BY e.event_ts, e.event_id))[1],
           (array_agg(e.device ORDER BY e.event_ts, e.event_id))[1]
    FROM (SELECT x.*,
                 session_number(x.event_ts, gap) OVER (PARTITION BY x.visitor ORDER BY x.event_ts, x.event_id) AS sn
          FROM ca_session_events x) e
    GROUP BY e.visitor, e.sn;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN QUERY VALUES ('sessions_written', n + anonymous);
    DROP TABLE ca_session_events;

    INSERT INTO clickstream_state (singleton, session_gap, timezone, last_run_at)
    VALUES (true, gap, tz, now())
    ON CONFLICT (singleton) DO UPDATE
        SET session_gap = excluded.session_gap, timezone = excluded.timezone,
            last_run_at = excluded.last_run_at;
END
$$;
COMMENT ON FUNCTION customer_analytics.refresh_sessions(boolean) IS
    'Bring the sessions table up to date with fact_event: rebuild the sessions of the visitors whose events changed since the last call (all of them with full_rebuild, or when the session gap or time zone setting changed). Returns the sessions removed and written';

CREATE FUNCTION customer_analytics.refresh_clickstream(full_refresh boolean DEFAULT false)
RETURNS TABLE (step text, rows_affected bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
BEGIN
    RETURN QUERY SELECT * FROM transform_events(full_refresh);
    RETURN QUERY SELECT * FROM refresh_sessions(full_refresh);
END
$$;
COMMENT ON FUNCTION customer_analytics.refresh_clickstream(boolean) IS
    'The clickstream''s own schedule (e.g. every minute): transform_events() then refresh_sessions(), without touching the batch tables. The views funnel_daily, product_interest and purchase_order read the result directly. Returns the rows written per step';

/* ---------------------------------------------------------------------
 * Views
 * --------------------------------------------------------------------- */

CREATE VIEW customer_analytics.funnel_daily AS
SELECT d.date,
       COALESCE(s.channel, 'unknown') AS channel,
       count(*) AS sessions,
       count(*) FILTER (WHERE s.product_views > 0) AS product_view_sessions,
       count(*) FILTER (WHERE s.product_views > 0 AND s.add_to_carts > 0) AS add_to_cart_sessions,
       count(*) FILTER (WHERE s.product_views > 0 AND s.add_to_carts > 0 AND s.checkouts > 0) AS checkout_sessions,
       count(*) FILTER (WHERE s.product_views > 0 AND s.add_to_carts > 0 AND s.checkouts > 0
                          AND s.purchases > 0) AS purchase_sessions,
       round(count(*) FILTER (WHERE s.product_views > 0)::numeric / count(*), 4) AS view_rate,
       round(count(*) FILTER (WHERE s.product_views > 0 AND s.add_to_carts > 0)::numeric
             / NULLIF(count(*) FILTER (WHERE s.product_views > 0), 0), 4) AS cart_rate,
       round(count(*) FILTER (WHERE s.product_views > 0 AND s.add_to_carts > 0 AND s.checkouts > 0)::numeric
             / NULLIF(count(*) FILTER (WHERE s.product_views > 0 AND s.add_to_carts > 0), 0), 4) AS checkout_rate,
       round(count(*) FILTER (WHERE s.product_views > 0 AND s.add_to_carts > 0 AND s.checkouts > 0
                                AND s.purchases > 0)::numeric
             / NULLIF(count(*) FILTER (WHERE s.product_views > 0 AND s.add_to_carts > 0
                                         AND s.checkouts > 0), 0), 4) AS purchase_rate,
       round(count(*) FILTER (WHERE s.converted)::numeric / count(*), 4) AS conversion_rate
FROM customer_analytics.sessions s
JOIN customer_analytics.dim_date d ON d.date_key = s.date_key
GROUP BY d.date, COALESCE(s.channel, 'unknown');
COMMENT ON VIEW customer_analytics.funnel_daily IS
    'Conversion funnel per day (of the session start) and channel (of the first event): sessions, then sessions that reached each step having passed the previous ones (product view, add to cart, checkout, purchase: a closed funnel), the step-to-step rates (view_rate = product_view_sessions / sessions, cart_rate, checkout_rate, purchase_rate; NULL when the previous step is 0) and conversion_rate (sessions with any purchase / sessions)';

CREATE VIEW customer_analytics.purchase_order AS
SELECT e.event_id, e.event_ts, e.session_id, e.customer_id, e.order_id,
       o.order_id IS NOT NULL AS order_found,
       o.order_ts, o.lines, o.quantity, o.revenue, o.status,
       o.customer_key AS order_customer_key
FROM customer_analytics.fact_event e
LEFT JOIN (
    SELECT f.order_id, min(f.order_ts) AS order_ts, count(*) AS lines, sum(f.quantity) AS quantity,
           sum(f.revenue) FILTER (WHERE f.status = 'completed') AS revenue,
           CASE WHEN count(DISTINCT f.status) = 1 THEN min(f.status) ELSE 'mixed' END AS status,
           min(f.customer_key) AS customer_key
    FROM customer_analytics.fact_order_line f
    GROUP BY f.order_id
) o ON o.order_id = e.order_id
WHERE e.event_type = 'purchase';
COMMENT ON VIEW customer_analytics.purchase_order IS
    'Each purchase event with the order it reports in fact_order_line (matched on order_id): order time, lines, units, completed revenue, status (mixed when lines differ); order_found false while the order has not been loaded (or never will be)';

CREATE VIEW customer_analytics.product_interest AS
WITH views AS (
    SELECT e.product_key, count(*) AS views,
           count(DISTINCT e.session_id) FILTER (WHERE e.event_type = 'product_view') AS viewing_sessions,
           count(*) FILTER (WHERE e.event_type = 'add_to_cart') AS add_to_carts
    FROM customer_analytics.fact_event e
    WHERE e.event_type IN ('product_view', 'add_to_cart') AND e.product_key IS NOT NULL
    GROUP BY e.product_key
), bought AS (
    SELECT f.product_key, count(DISTINCT f.order_id) AS orders, sum(f.quantity) AS units
    FROM customer_analytics.fact_order_line f
    WHERE f.status = 'completed'
      AND f.order_id IN (SELECT p.order_id FROM customer_analytics.fact_event p
                         WHERE p.event_type = 'purchase' AND p.order_id IS NOT NULL)
    GROUP BY f.product_key
)
SELECT p.product_key, p.product_id, p.name, p.category,
       COALESCE(v.views, 0) - COALESCE(v.add_to_carts, 0) AS views,
       COALESCE(v.viewing_sessions, 0) AS viewing_sessions,
       COALESCE(v.add_to_carts, 0) AS add_to_carts,
       COALESCE(b.orders, 0) AS purchases,
       COALESCE(b.units, 0) AS units,
       round(COALESCE(b.orders, 0)::numeric / NULLIF(COALESCE(v.views, 0) - COALESCE(v.add_to_carts, 0), 0), 4)
           AS view_to_buy_rate
FROM customer_analytics.dim_product p
LEFT JOIN views v ON v.product_key = p.product_key
LEFT JOIN bought b ON b.product_key = p.product_key
WHERE v.product_key IS NOT NULL OR b.product_key IS NOT NULL;
COMMENT ON VIEW customer_analytics.product_interest IS
    'Per product: product_view events (views), source sessions with a view, add_to_cart events, completed orders containing it that a purchase event reported (purchases: via purchase_order''s order_id link) and their units, and view_to_buy_rate = purchases / views';

-- In the pipeline: the nightly run keeps the sessions current after its
-- transform; the scope 'clickstream' is the per-minute run
-- (schedule_pipeline('* * * * *', 'clickstream')), events only.
INSERT INTO customer_analytics.pipeline_task (task, scope, command, depends_on, ordinal, builtin) VALUES
    ('sessions', 'all', 'SELECT sum(rows_affected)::bigint FROM customer_analytics.refresh_sessions()', '{transform}', 45, true),
    ('clickstream', 'clickstream', 'SELECT sum(rows_affected)::bigint FROM customer_analytics.refresh_clickstream()', '{}', 10, true);
