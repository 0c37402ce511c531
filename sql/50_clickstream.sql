-- Clickstream: session_number() on hand-made sequences, the settings,
-- track_event(), stitching, late events, sessions and the funnel views on a
-- hand-checked event set.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql

-- session_number(): a pause exactly equal to the gap continues the session,
-- one microsecond more starts the next; rows arrive out of order (the
-- window sorts them); a lone event is a session of its own
CREATE TEMP TABLE seq (visitor text, ts timestamptz, expected bigint);
INSERT INTO seq VALUES
  ('a', '2025-03-01 10:30:00', 1),            -- exactly 30 min after 10:00
  ('b', '2025-03-01 09:00:00', 1),            -- one-event visitor
  ('a', '2025-03-01 11:00:00.000001', 2),     -- 30 min + 1 us after 10:30
  ('a', '2025-03-01 10:00:00', 1),
  ('c', '2025-03-01 08:00:00', 1),
  ('a', '2025-03-02 11:00:00', 3),            -- a one-event session between two others
  ('c', '2025-03-01 08:00:00', 1),            -- same instant twice
  ('a', '2025-03-03 00:00:00', 4),
  ('a', '2025-03-03 00:29:59', 4),
  ('c', '2025-03-01 10:00:00', 2);
SELECT visitor, ts, session_number(ts) OVER w AS session, expected,
       session_number(ts, '1 hour') OVER w AS session_1h,
       session_number(ts, '1 day') OVER w AS session_1d
FROM seq
WINDOW w AS (PARTITION BY visitor ORDER BY ts)
ORDER BY visitor, ts;

-- NULL times get NULL and do not disturb the count; a NULL gap gives NULL
SELECT ts, session_number(ts) OVER (ORDER BY ts) AS session,
       session_number(ts, NULL) OVER (ORDER BY ts) AS null_gap
FROM (VALUES ('2025-03-01 10:00'::timestamptz), (NULL), ('2025-03-01 10:45'), ('2025-03-01 11:00')) v(ts)
ORDER BY ts;

-- misuse is an error naming the problem
SELECT session_number(ts, '0 minutes') OVER (ORDER BY ts) FROM seq;
SELECT session_number(ts, '-5 minutes') OVER (ORDER BY ts) FROM seq;
SELECT session_number(ts, '1 month') OVER (ORDER BY ts) FROM seq;
SELECT session_number(ts) OVER (ORDER BY ts DESC) FROM seq WHERE visitor = 'a';

-- against the usual SQL (lag + running sum) on 20,000 random events
SELECT setseed(0.5);
CREATE TEMP TABLE rnd AS
SELECT (random() * 200)::int AS visitor,
       '2025-01-01'::timestamptz + (random() * 3000000)::int * interval '1 second'
         + (CASE WHEN random() < 0.05 THEN 0 ELSE random() END) * interval '1 ms' AS ts
FROM generate_series(1, 20000);
-- exact multiples of the gap occur too
INSERT INTO rnd SELECT 7, '2025-01-01'::timestamptz + g * interval '30 minutes' FROM generate_series(1, 50) g;
SELECT count(*) AS events,
       count(*) FILTER (WHERE c.sn IS DISTINCT FROM s.sn) AS mismatches,
       count(DISTINCT (c.visitor, c.sn)) AS sessions
FROM (SELECT visitor, ts, session_number(ts, '20 minutes') OVER (PARTITION BY visitor ORDER BY ts) AS sn,
             row_number() OVER (PARTITION BY visitor ORDER BY ts) AS rn
      FROM rnd) c
JOIN (SELECT visitor, ts, rn, 1 + sum(brk) OVER (PARTITION BY visitor ORDER BY rn) AS sn
      FROM (SELECT visitor, ts, row_number() OVER (PARTITION BY visitor ORDER BY ts) AS rn,
                   CASE WHEN ts - lag(ts) OVER (PARTITION BY visitor ORDER BY ts) > interval '20 minutes'
                        THEN 1 ELSE 0 END AS brk
            FROM rnd) x) s
  ON s.visitor = c.visitor AND s.rn = c.rn;

-- settings are checked when set
SET customer_analytics.session_gap = 'soon';
SET customer_analytics.session_gap = '1 month';
SET customer_analytics.session_gap = '0';
SET customer_analytics.event_lateness = '-1 day';
SET customer_analytics.session_gap = '45 min';
SET customer_analytics.event_lateness = '';
SELECT session_gap(), event_lateness();
RESET customer_analytics.session_gap;
RESET customer_analytics.event_lateness;
SELECT session_gap(), event_lateness();

-- track_event(): one row in stg_events per call; bad arguments are named
SELECT track_event('page_view', 'sx', event_id => 'tx1', event_ts => '2025-03-01 09:00+00', channel => 'web');
SELECT length(track_event('product_view', 'sx', product_id => 'P1')) AS generated_uuid_length;
SELECT event_id = 'tx1' AS given_id, event_type, session_id, channel,
       CASE WHEN event_id = 'tx1' THEN event_ts::text
            ELSE (event_ts BETWEEN now() - interval '10 minutes' AND now())::text END AS event_ts
FROM stg_events ORDER BY stage_id;
SELECT track_event('scroll', 'sx');
SELECT track_event(NULL, 'sx');
SELECT track_event('page_view', '');
SELECT track_event('page_view', 'sx', event_id => '');
TRUNCATE stg_events;

/*
 * A hand-checked day, 2025-03-01, delivered in two batches with a refresh
 * after each.  s1: anonymous browsing (email, desktop), then the visitor
 * logs in as C1 at the cart and buys O1.  s2: anonymous (direct): 11:00,
 * 11:20, 11:50 (exactly 30 min later), 12:21 (31 min later: a new
 * session); 11:50 arrives late, in batch 2.  s3: C2 (direct) gets to the
 * checkout, no purchase.  s4: C1 again at 18:00 (email): a product view
 * and a purchase of O2 without cart or checkout.  s5: C3, not yet a known
 * customer (social), buys O9, which never reaches fact_order_line.
 */
INSERT INTO stg_customers (customer_id, name, updated_at) VALUES
  ('C1', 'Ada', '2025-01-01'), ('C2', 'Alan', '2025-01-01');
INSERT INTO stg_products (product_id, name, category) VALUES
  ('P1', 'Engine', 'Electronics'), ('P2', 'Notebook', 'Books');
INSERT INTO stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price) VALUES
  ('O1', 1, 'C1', 'P1', '2025-03-01 10:15+00', 1, 250),
  ('O2', 1, 'C1', 'P2', '2025-03-01 18:05+00', 2, 5);
SELECT step, rows_affected FROM transform() WHERE step IN ('dim_customer', 'fact_order_line');

-- batch 1, then the clickstream's own refresh
INSERT INTO stg_events (event_id, event_ts, customer_id, session_id, event_type, product_id, order_id, channel, device) VALUES
  ('e01', '2025-03-01 10:00+00', NULL, 's1', 'page_view', NULL, NULL, 'email', 'desktop'),
  ('e02', '2025-03-01 10:05+00', NULL, 's1', 'product_view', 'P1', NULL, 'email', 'desktop'),
  ('e06', '2025-03-01 11:00+00', NULL, 's2', 'page_view', NULL, NULL, 'direct', 'mobile'),
  ('e07', '2025-03-01 11:20+00', NULL, 's2', 'product_view', 'P2', NULL, 'direct', 'mobile'),
  ('e09', '2025-03-01 12:21+00', NULL, 's2', 'page_view', NULL, NULL, 'direct', 'mobile'),
  ('e10', '2025-03-01 13:00+00', 'C2', 's3', 'product_view', 'P1', NULL, 'direct', 'desktop'),
  ('e11', '2025-03-01 13:01+00', 'C2', 's3', 'add_to_cart', 'P1', NULL, 'direct', 'desktop'),
  ('e12', '2025-03-01 13:05+00', 'C2', 's3', 'checkout', NULL, NULL, 'direct', 'desktop');
SELECT * FROM refresh_clickstream();
SELECT session_key, session_end, duration, events, pages, channel, device FROM sessions ORDER BY session_key;

-- batch 2: the login of s1, the late 11:50 of s2, the rest of the day
INSERT INTO stg_events (event_id, event_ts, customer_id, session_id, event_type, product_id, order_id, channel, device) VALUES
  ('e03', '2025-03-01 10:10+00', 'C1', 's1', 'add_to_cart', 'P1', NULL, 'email', 'desktop'),
  ('e04', '2025-03-01 10:12+00', 'C1', 's1', 'checkout', NULL, NULL, 'email', 'desktop'),
  ('e05', '2025-03-01 10:15+00', 'C1', 's1', 'purchase', NULL, 'O1', 'email', 'desktop'),
  ('e08', '2025-03-01 11:50+00', NULL, 's2', 'product_view', 'P2', NULL, 'direct', 'mobile'),
  ('e13', '2025-03-01 18:00+00', 'C1', 's4', 'product_view', 'P2', NULL, 'email', 'mobile'),
  ('e14', '2025-03-01 18:05+00', 'C1', 's4', 'purchase', NULL, 'O2', 'email', 'mobile'),
  ('e15', '2025-03-01 20:00+00', 'C3', 's5', 'purchase', NULL, 'O9', 'social', 'tablet');
SELECT * FROM refresh_clickstream();
-- e01 and e02 now belong to C1
SELECT event_id, customer_id, customer_stitched, customer_key IS NOT NULL AS has_key
FROM fact_event WHERE session_id = 's1' ORDER BY event_id;
SELECT session_key, session_end, duration, customer_id, events, pages, product_views, add_to_carts,
       checkouts, purchases, converted, channel, device
FROM sessions ORDER BY session_key;
SELECT * FROM funnel_daily ORDER BY date, channel;
SELECT product_id, views, viewing_sessions, add_to_carts, purchases, units, view_to_buy_rate
FROM product_interest ORDER BY product_id;
SELECT event_id, order_id, order_found, lines, quantity, revenue, status FROM purchase_order ORDER BY event_id;

-- C3 arrives with the nightly batch: its event gets the real key
SELECT customer_key FROM fact_event WHERE event_id = 'e15';
INSERT INTO stg_customers (customer_id, name, updated_at) VALUES ('C3', 'Grace', '2025-01-01');
SELECT step, rows_affected FROM transform() WHERE step IN ('dim_customer', 'fact_event_late_customers');
SELECT f.customer_key = d.customer_key AS repointed
FROM fact_event f JOIN dim_customer d ON d.customer_id = 'C3' WHERE f.event_id = 'e15';
SELECT customer_key IS NOT NULL AS session_has_customer FROM sessions WHERE visitor = 'c:C3';
SELECT * FROM refresh_clickstream();
SELECT customer_key = (SELECT customer_key FROM dim_customer WHERE customer_id = 'C3') AS session_repointed
FROM sessions WHERE visitor = 'c:C3';

-- an event far behind the watermark (20:00 on March 1st) is left staged,
-- counted and alerted; a full refresh loads it
INSERT INTO stg_events (event_id, event_ts, session_id, event_type, channel) VALUES
  ('old1', '2025-02-20 09:00+00', 's9', 'page_view', 'direct'),
  ('ok1', '2025-02-27 09:00+00', 's9', 'page_view', 'direct');   -- within 3 days
SELECT * FROM refresh_clickstream();
SELECT event_id FROM fact_event WHERE session_id = 's9' ORDER BY 1;
SELECT kind, subject, details->>'events' AS events, details->>'cutoff' AS cutoff FROM alert WHERE kind = 'late_events';
SELECT step, rows_affected FROM refresh_clickstream(full_refresh => true) WHERE step IN ('fact_event', 'fact_event_too_late');
SELECT event_id FROM fact_event WHERE session_id = 's9' ORDER BY 1;
-- a wider window takes such events incrementally
SET customer_analytics.event_lateness = '30 days';
INSERT INTO stg_events (event_id, event_ts, session_id, event_type) VALUES ('old2', '2025-02-10 09:00+00', 's9', 'page_view');
SELECT step, rows_affected FROM refresh_clickstream() WHERE step IN ('fact_event', 'fact_event_too_late');
RESET customer_analytics.event_lateness;

-- a different gap rebuilds every session: s2 becomes one session with 40 minutes
SET customer_analytics.session_gap = '40 minutes';
SELECT step, rows_affected FROM refresh_clickstream() WHERE step LIKE 'sessions%';
SELECT session_key, events FROM sessions WHERE visitor = 's:s2';
RESET customer_analytics.session_gap;
SELECT step, rows_affected FROM refresh_clickstream() WHERE step LIKE 'sessions%';

-- TRUNCATE of the facts empties the sessions too
TRUNCATE fact_event;
SELECT count(*) FROM sessions;
