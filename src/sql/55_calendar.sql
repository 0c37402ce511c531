/*
 * The shop's business calendar: the days it does not trade.  A closed day
 * is no observation: anomaly detection neither scores it nor lets it into
 * a baseline (a bank holiday is not a collapse of demand, nor the Monday
 * after it a surge), the forecast is fitted on open days only and predicts
 * 0 on closed ones, and a forecast miss is never raised for one.
 *
 * Closed days come from closed_day (dates, such as holidays or a Christmas
 * closure, and recurring weekdays), entered by the user, and from the
 * sales history: a weekday on which the shop never sold in at least four
 * weeks of history is closed (idle_weekdays()).
 */
CREATE TABLE customer_analytics.closed_day (
    day     date UNIQUE,
    weekday smallint UNIQUE CHECK (weekday BETWEEN 1 AND 7),
    name    text NOT NULL CHECK (name <> ''),
    CHECK ((day IS NULL) <> (weekday IS NULL))
);
COMMENT ON TABLE customer_analytics.closed_day IS
    'The shop''s closed days: a date (a holiday, a closure) or a recurring ISO weekday (1 = Monday .. 7 = Sunday), each with a name; one row per date or weekday (a duplicate is refused). Closed days are not scored by the anomaly views, are in none of their baselines, are forecast as 0 and never alerted as forecast misses. Weekdays without any sale are closed without a row here (idle_weekdays())';
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.closed_day', '');

CREATE FUNCTION customer_analytics.idle_weekdays()
RETURNS SETOF smallint
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- from the daily rollup (a row per day with lines), not the order lines
    RETURN QUERY
    WITH trading AS (
        SELECT r.day FROM customer_analytics.sales_rollup_day r WHERE r.orders > 0
    )
    SELECT w::smallint
    FROM generate_series(1, 7) w
    WHERE (SELECT max(t.day) - min(t.day) FROM trading t) >= 27
      AND NOT EXISTS (SELECT FROM trading t WHERE extract(isodow FROM t.day) = w)
    ORDER BY 1;
END
$$;
COMMENT ON FUNCTION customer_analytics.idle_weekdays() IS
    'ISO weekdays (1 = Monday .. 7 = Sunday) on which the shop never took an order in a sales history of at least four weeks (sales_rollup_day): closed without being entered in closed_day';

CREATE FUNCTION customer_analytics.closed_days(first_day date, last_day date)
RETURNS TABLE (day date, name text)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH idle AS MATERIALIZED (
        SELECT w FROM customer_analytics.idle_weekdays() w
    )
    SELECT g.day,
           COALESCE(d.name, w.name, 'never trades on ' || trim(to_char(g.day, 'Day')))
    FROM (SELECT x::date AS day FROM generate_series(first_day, last_day, interval '1 day') x) g
    LEFT JOIN customer_analytics.closed_day d ON d.day = g.day
    LEFT JOIN customer_analytics.closed_day w ON w.weekday = extract(isodow FROM g.day)
    WHERE d.day IS NOT NULL OR w.weekday IS NOT NULL
       OR extract(isodow FROM g.day) IN (SELECT i.w FROM idle i)
$$;
COMMENT ON FUNCTION customer_analytics.closed_days(date, date) IS
    'The closed days from first_day to last_day with their names: the dates and weekdays of closed_day and the weekdays on which the shop never trades (idle_weekdays())';

/*
 * The day in progress.  The last day of the data is not a whole day while
 * it is today (a live shop's morning), nor when it stops well before the
 * hour its weekday usually does (an export cut at noon): scored as a whole
 * day it would be a "drop" every morning.  Usual: the earliest last order
 * of the same weekday over the 8 weeks before, less an hour of slack.
 */
CREATE FUNCTION customer_analytics.day_in_progress()
RETURNS date
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tz text := customer_analytics.business_timezone();
    last_ts timestamptz;
    last_day date;
    usual interval;
    latest interval;
BEGIN
    -- through the order_ts index: the newest lines, then one day at a time
    SELECT max(f.order_ts) INTO last_ts FROM customer_analytics.fact_order_line f WHERE f.status = 'completed';
    IF last_ts IS NULL THEN
        RETURN NULL;
    END IF;
    last_day := (last_ts AT TIME ZONE tz)::date;
    IF last_day >= (now() AT TIME ZONE tz)::date THEN
        RETURN last_day;
    END IF;
    -- one query per week rather than a lateral join over generate_series,
    -- which Citus cannot push down: each is one day's range of the
    -- order_ts index, on a single node as on every shard
    FOR k IN 1 .. 8 LOOP
        SELECT max(f.order_ts AT TIME ZONE tz) - (last_day - 7 * k)::timestamp INTO latest
        FROM customer_analytics.fact_order_line f
        WHERE f.status = 'completed'
          AND f.order_ts >= (last_day - 7 * k)::timestamp AT TIME ZONE tz
          AND f.order_ts < (last_day - 7 * k + 1)::timestamp AT TIME ZONE tz;
        usual := LEAST(usual, latest);  -- LEAST ignores NULLs: a week without lines
    END LOOP;
    IF (last_ts AT TIME ZONE tz) - last_day::timestamp < usual - interval '1 hour' THEN
        RETURN last_day;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION customer_analytics.day_in_progress() IS
    'The last day with completed order lines when it is not a whole day yet: it is today (business time zone), or its last line came more than an hour earlier than on any of the same weekdays of the 8 weeks before (an export cut during the day); else NULL. The anomaly series and the forecasts leave it out';

/*
 * Scoring the day in progress as it goes: the orders placed so far today,
 * and in the last hour, against the same hours of the same weekday over
 * the 8 weeks before (their median: one week's flash sale or outage does
 * not move it).  An outage shows as an hour without the orders that hour
 * usually brings, long before the day could be judged whole.  A Poisson
 * lower tail below 0.001 flags it; an hour usually holding fewer than 3
 * orders is too quiet to tell.
 */
CREATE FUNCTION customer_analytics.intraday_orders(at timestamptz DEFAULT now())
RETURNS TABLE (day date, hour_end time, orders_so_far bigint, expected_so_far float8,
               orders_last_hour bigint, expected_last_hour float8, p_value float8, outage boolean)
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tz text := customer_analytics.business_timezone();
    local_at timestamp := at AT TIME ZONE tz;
    today date := (at AT TIME ZONE tz)::date;
    since_midnight interval := (at AT TIME ZONE tz) - (at AT TIME ZONE tz)::date;
    p_day float8;
    p_hour float8;
    closed date[];
    d date;
    n_so_far bigint;
    n_last_hour bigint;
    past_so_far bigint[] := '{}';     -- the same weekday of the weeks before, open days
    past_last_hour bigint[] := '{}';
BEGIN
    IF today IN (SELECT c.day FROM customer_analytics.closed_days(today, today) c) THEN
        RETURN;
    END IF;
    closed := ARRAY(SELECT c.day FROM customer_analytics.closed_days(today - 56, today - 7) c);
    -- one query per day rather than subqueries correlated with a series of
    -- days, which Citus cannot push down: each reads one day's range of the
    -- order_ts index, on a single node as on every shard
    FOR k IN 0 .. 8 LOOP
        d := today - 7 * k;
        CONTINUE WHEN k > 0 AND d = ANY (closed);
        SELECT count(DISTINCT f.order_id),
               count(DISTINCT f.order_id) FILTER (
                   WHERE f.order_ts >= (d + since_midnight - interval '1 hour') AT TIME ZONE tz)
        INTO n_so_far, n_last_hour
        FROM customer_analytics.fact_order_line f
        WHERE f.status = 'completed' AND f.quantity > 0
          AND f.order_ts >= d::timestamp AT TIME ZONE tz
          AND f.order_ts < (d + since_midnight) AT TIME ZONE tz;
        IF k = 0 THEN
            orders_so_far := n_so_far;
            orders_last_hour := n_last_hour;
        ELSE
            past_so_far := past_so_far || n_so_far;
            past_last_hour := past_last_hour || n_last_hour;
        END IF;
    END LOOP;
    day := today;
    hour_end := local_at::time;
    SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY v) INTO expected_so_far FROM unnest(past_so_far) v;
    SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY v) INTO expected_last_hour FROM unnest(past_last_hour) v;
    IF expected_so_far IS NULL THEN
        RETURN;                 -- no history for this weekday yet
    END IF;
    p_day := customer_analytics.poisson_lower_tail(orders_so_far, expected_so_far);
    p_hour := CASE WHEN expected_last_hour >= 3
                   THEN customer_analytics.poisson_lower_tail(orders_last_hour, expected_last_hour) ELSE 1 END;
    p_value := LEAST(p_day, p_hour);
    outage := p_value < 0.001 AND GREATEST(expected_so_far, expected_last_hour) >= 3;
    RETURN NEXT;
END
$$;
COMMENT ON FUNCTION customer_analytics.intraday_orders(timestamptz) IS
    'The day in progress scored as it goes, at a time (default now): orders so far that day and in the hour before, against the median of the same hours of the same weekday over the 8 weeks before (closed days left out); p_value = the smaller Poisson lower tail of the two, outage when it is below 0.001. No row on a closed day or without history';

CREATE FUNCTION customer_analytics.poisson_lower_tail(k bigint, lambda float8)
RETURNS float8
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    -- P(X <= k) for X ~ Poisson(lambda), summed in logs (no overflow)
    SELECT CASE WHEN lambda <= 0 THEN 1.0
                WHEN k >= lambda THEN 1.0   -- not a shortfall: no need to sum
                ELSE LEAST(1.0, (SELECT sum(exp(-lambda + i * ln(lambda)
                                               - COALESCE((SELECT sum(ln(j)) FROM generate_series(1, i) j), 0)))
                                 FROM generate_series(0, k) i)) END
$$;
COMMENT ON FUNCTION customer_analytics.poisson_lower_tail(bigint, float8) IS
    'P(X <= k) for X Poisson with mean lambda (1 when k >= lambda: no shortfall); what intraday_orders() scores a count with';

CREATE FUNCTION customer_analytics.alert_intraday(at timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    i record;
BEGIN
    SELECT * INTO i FROM customer_analytics.intraday_orders(at);
    IF i IS NULL OR NOT i.outage THEN
        RETURN 0;
    END IF;
    -- one alert per day: the first run that sees the outage raises it
    RETURN (customer_analytics.raise_alert(
        'intraday_drop', 'total',
        jsonb_build_object('day', i.day, 'at', i.hour_end, 'orders_so_far', i.orders_so_far,
                           'expected_so_far', round(i.expected_so_far::numeric, 1),
                           'orders_last_hour', i.orders_last_hour,
                           'expected_last_hour', round(i.expected_last_hour::numeric, 1),
                           'p_value', i.p_value),
        'intraday_drop:' || i.day, 'warn') IS NOT NULL)::integer;
END
$$;
COMMENT ON FUNCTION customer_analytics.alert_intraday(timestamptz) IS
    'Raise an intraday_drop alert (once a day) when intraday_orders(at) finds an outage in the day in progress; returns the number raised (0 or 1). The pipeline calls it after transform()';
