-- Clickstream incremental = full recomputation: a generated shop's events
-- arrive in random batches, late (up to two days) and some twice or
-- corrected, with refresh_clickstream() after each batch; the result must
-- equal a computation from scratch, and the sessions an independent
-- lag() + sum() sessionization.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql

CALL pg_temp.reset_warehouse(also => '{event_transform_state, clickstream_state}');

SELECT count(*) FROM generate_sample_data(customers => 1500, days => 21, seed => 5);
CREATE TEMP TABLE pool AS
SELECT event_id, event_ts, customer_id, session_id, event_type, product_id, order_id, channel, device
FROM stg_events;
TRUNCATE stg_events;
SELECT step, rows_affected > 0 AS wrote FROM transform() WHERE step IN ('dim_customer', 'fact_order_line', 'fact_event');

-- arrival: most events within ten minutes, one in ten up to two days late;
-- 3% are delivered again a day or two later: 1% as they were, 1% with a
-- corrected channel, 1% with a corrected time (25 minutes later, which
-- can join or split sessions where they were and where they go)
SELECT setseed(0.25);
CREATE TEMP TABLE arrivals AS
SELECT p.*, p.event_ts + CASE WHEN random() < 0.1 THEN random() * interval '2 days'
                              ELSE random() * interval '10 minutes' END AS arrives
FROM pool p;
INSERT INTO arrivals
SELECT event_id, CASE WHEN r >= 0.01 AND r < 0.02 THEN event_ts + interval '25 minutes' ELSE event_ts END,
       customer_id, session_id, event_type, product_id, order_id,
       CASE WHEN r < 0.01 THEN 'corrected' ELSE channel END, device,
       event_ts + interval '1 day' + random() * interval '1 day'
FROM (SELECT p.*, random() AS r FROM pool p) x
WHERE r < 0.03;
CREATE TEMP TABLE batches AS
SELECT a.*, ntile(15) OVER (ORDER BY arrives, event_id, channel) AS batch FROM arrivals a;
SELECT count(*) AS deliveries, count(DISTINCT event_id) AS events,
       count(*) FILTER (WHERE arrives - event_ts > interval '1 hour') AS late FROM batches;

CREATE TEMP TABLE steps (batch int, step text, rows_affected bigint);
DO $$
BEGIN
    FOR k IN 1 .. 15 LOOP
        INSERT INTO customer_analytics.stg_events
            (event_id, event_ts, customer_id, session_id, event_type, product_id, order_id, channel, device)
        SELECT event_id, event_ts, customer_id, session_id, event_type, product_id, order_id, channel, device
        FROM batches WHERE batch = k ORDER BY arrives;
        IF k % 2 = 1 THEN
            COMMIT;     -- odd batches: the refresh runs in a transaction of its own
        END IF;
        INSERT INTO steps SELECT k, r.* FROM customer_analytics.refresh_clickstream() r;
        COMMIT;
    END LOOP;
END
$$;
SELECT step, sum(rows_affected) > 0 AS wrote, sum(rows_affected) FILTER (WHERE step = 'fact_event_too_late') AS too_late
FROM steps GROUP BY step ORDER BY step;

-- (an identical re-delivery is not rewritten, so stage_id may name the
-- first delivery rather than the last: compared without it)
CREATE TEMP VIEW event_content AS
SELECT event_id, event_ts, date_key, customer_key, customer_id, customer_stitched, session_id,
       event_type, product_key, order_id, channel, device
FROM fact_event;
CREATE TEMP TABLE incremental AS
SELECT (SELECT md5(string_agg(f::text, ',' ORDER BY event_id)) FROM event_content f) AS events,
       (SELECT md5(string_agg(s::text, ',' ORDER BY visitor, session_start)) FROM sessions s) AS sessions,
       (SELECT count(*) FROM sessions) AS n_sessions,
       (SELECT count(*) FROM fact_event) AS n_events;

-- stitching: no anonymous event is followed by an identified one in its session
SELECT count(*) AS unstitched
FROM fact_event a
WHERE a.customer_id IS NULL
  AND EXISTS (SELECT 1 FROM fact_event b WHERE b.session_id = a.session_id AND b.customer_id IS NOT NULL
                AND (b.event_ts, b.event_id) > (a.event_ts, a.event_id));
SELECT count(*) FILTER (WHERE f.customer_stitched) > 0 AS some_stitched,
       count(*) FILTER (WHERE f.channel = 'corrected') AS corrected,
       count(*) FILTER (WHERE f.event_ts <> p.event_ts) AS retimed
FROM fact_event f JOIN pool p USING (event_id);

-- the sessions equal an independent sessionization (lag + running sum)
CREATE TEMP VIEW lag_sessions AS
SELECT visitor, min(event_ts) AS session_start, max(event_ts) AS session_end, count(*) AS events,
       count(*) FILTER (WHERE event_type = 'purchase') AS purchases
FROM (SELECT visitor, event_ts, event_type,
             sum(brk) OVER (PARTITION BY visitor ORDER BY event_ts, event_id) AS sn
      FROM (SELECT visitor(customer_id, session_id) AS visitor, event_ts, event_id, event_type,
                   CASE WHEN event_ts - lag(event_ts) OVER (PARTITION BY visitor(customer_id, session_id)
                                                           ORDER BY event_ts, event_id) <= interval '30 minutes'
                        THEN 0 ELSE 1 END AS brk
            FROM fact_event) x) y
GROUP BY visitor, sn;
SELECT (SELECT count(*) FROM (SELECT visitor, session_start, session_end, events, purchases FROM sessions
                              EXCEPT SELECT * FROM lag_sessions) d) AS only_incremental,
       (SELECT count(*) FROM (SELECT * FROM lag_sessions
                              EXCEPT SELECT visitor, session_start, session_end, events, purchases FROM sessions) d) AS only_lag,
       (SELECT count(*) FROM lag_sessions) = (SELECT n_sessions FROM incremental) AS same_count;

-- from scratch: no facts, no state, one full pass over everything staged
TRUNCATE fact_event;
DELETE FROM customer_analytics_internal.event_transform_state;
DELETE FROM customer_analytics_internal.clickstream_state;
SELECT step, rows_affected > 0 AS wrote FROM refresh_clickstream() ORDER BY step;
SELECT i.n_events, i.n_sessions,
       i.events = (SELECT md5(string_agg(f::text, ',' ORDER BY event_id)) FROM event_content f) AS events_same,
       i.sessions = (SELECT md5(string_agg(s::text, ',' ORDER BY visitor, session_start)) FROM sessions s) AS sessions_same
FROM incremental i;
-- every delivered event is in, once
SELECT (SELECT count(DISTINCT event_id) FROM pool) = (SELECT count(*) FROM fact_event) AS all_events;

-- and a nothing-new refresh writes nothing
SELECT step, rows_affected FROM refresh_clickstream() ORDER BY step;

-- events deleted from the facts (say, a visitor's erasure request) leave
-- the sessions right after the next refresh
DELETE FROM fact_event WHERE hashtext(event_id) % 50 = 0;
SELECT step, rows_affected > 0 AS wrote FROM refresh_clickstream() WHERE step LIKE 'sessions%' ORDER BY step;
SELECT (SELECT count(*) FROM (SELECT visitor, session_start, session_end, events, purchases FROM sessions
                              EXCEPT SELECT * FROM lag_sessions) d) AS only_incremental,
       (SELECT count(*) FROM (SELECT * FROM lag_sessions
                              EXCEPT SELECT visitor, session_start, session_end, events, purchases FROM sessions) d) AS only_lag;

-- bigger gaps: with 6 hours, and then 2 days, a late event joins sessions
-- hours or days away (and can bridge two of them into one); the deleted
-- events come back in 6 late batches, retimed by up to the gap, with a
-- refresh after each; the sessions equal the independent sessionization
-- with the same gap (the setting's change rebuilds them once)
CREATE TEMP VIEW lag_sessions_gap AS
SELECT visitor, min(event_ts) AS session_start, max(event_ts) AS session_end, count(*) AS events,
       count(*) FILTER (WHERE event_type = 'purchase') AS purchases
FROM (SELECT visitor, event_ts, event_type,
             sum(brk) OVER (PARTITION BY visitor ORDER BY event_ts, event_id) AS sn
      FROM (SELECT visitor(customer_id, session_id) AS visitor, event_ts, event_id, event_type,
                   CASE WHEN event_ts - lag(event_ts) OVER (PARTITION BY visitor(customer_id, session_id)
                                                           ORDER BY event_ts, event_id) <= session_gap()
                        THEN 0 ELSE 1 END AS brk
            FROM fact_event) x) y
GROUP BY visitor, sn;
CREATE TEMP TABLE gone AS
SELECT p.*, ntile(6) OVER (ORDER BY hashtext(p.event_id || 'b'), p.event_id) AS batch
FROM pool p WHERE NOT EXISTS (SELECT FROM fact_event f WHERE f.event_id = p.event_id);
CREATE PROCEDURE pg_temp.redeliver(shift interval) LANGUAGE plpgsql AS $$
BEGIN
    FOR k IN 1 .. 3 LOOP
        -- stage_id grows with each delivery: the retimed version wins
        INSERT INTO customer_analytics.stg_events
            (event_id, event_ts, customer_id, session_id, event_type, product_id, order_id, channel, device)
        SELECT event_id, event_ts + shift * (abs(hashtext(event_id)) % 100) / 100.0, customer_id, session_id,
               event_type, product_id, order_id, channel, device
        FROM gone WHERE batch IN (2 * k - 1, 2 * k);
        COMMIT;
        PERFORM customer_analytics.refresh_clickstream();
        COMMIT;
    END LOOP;
END
$$;
SET customer_analytics.session_gap = '6 hours';
SET customer_analytics.event_lateness = '30 days';
SELECT count(*) > 0 AS rebuilt FROM refresh_clickstream() WHERE step = 'sessions_written' AND rows_affected > 0;
CALL pg_temp.redeliver(interval '6 hours');
SELECT (SELECT count(*) FROM (SELECT visitor, session_start, session_end, events, purchases FROM sessions
                              EXCEPT SELECT * FROM lag_sessions_gap) d) AS only_incremental,
       (SELECT count(*) FROM (SELECT * FROM lag_sessions_gap
                              EXCEPT SELECT visitor, session_start, session_end, events, purchases FROM sessions) d) AS only_lag,
       (SELECT count(*) FROM sessions) < (SELECT count(*) FROM lag_sessions) AS fewer_sessions_than_30_minutes,
       (SELECT count(*) FROM fact_event) = (SELECT count(DISTINCT event_id) FROM pool) AS all_back;
DELETE FROM fact_event WHERE hashtext(event_id) % 50 = 0;
SET customer_analytics.session_gap = '2 days';
CALL pg_temp.redeliver(interval '2 days');
SELECT (SELECT count(*) FROM (SELECT visitor, session_start, session_end, events, purchases FROM sessions
                              EXCEPT SELECT * FROM lag_sessions_gap) d) AS only_incremental,
       (SELECT count(*) FROM (SELECT * FROM lag_sessions_gap
                              EXCEPT SELECT visitor, session_start, session_end, events, purchases FROM sessions) d) AS only_lag,
       (SELECT count(*) FROM fact_event) = (SELECT count(DISTINCT event_id) FROM pool) AS all_back;
RESET customer_analytics.session_gap;
RESET customer_analytics.event_lateness;
