/*
 * Alerts: one table and one channel for everything that needs a human
 * (anomalies, failed data-quality checks, forecast misses, failed pipeline
 * runs).  raise_alert() records a condition once (dedup_key) and tells
 * listeners with NOTIFY customer_analytics_alerts; the NOTIFY is delivered
 * only if the raising transaction commits, like the row.
 */

CREATE SEQUENCE customer_analytics.alert_id_seq;

CREATE TABLE customer_analytics.alert (
    alert_id        bigint PRIMARY KEY DEFAULT pg_catalog.nextval('customer_analytics.alert_id_seq'),
    raised_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    kind            text NOT NULL CHECK (kind <> ''),
    subject         text NOT NULL,
    severity        text NOT NULL DEFAULT 'warn' CHECK (severity IN ('info', 'warn', 'error')),
    details         jsonb NOT NULL DEFAULT '{}',
    dedup_key       text NOT NULL UNIQUE,
    acknowledged    boolean NOT NULL DEFAULT false,
    acknowledged_at timestamptz,
    acknowledged_by text,
    CHECK (acknowledged = (acknowledged_at IS NOT NULL))
);
ALTER SEQUENCE customer_analytics.alert_id_seq OWNED BY customer_analytics.alert.alert_id;
CREATE INDEX alert_open_idx ON customer_analytics.alert (raised_at) WHERE NOT acknowledged;
COMMENT ON TABLE customer_analytics.alert IS
    'Alerts raised by the extension (kind: anomaly, quality_check, forecast_miss, pipeline, ...); each condition alerts once (dedup_key). Listen on channel customer_analytics_alerts to be told as they happen';
COMMENT ON COLUMN customer_analytics.alert.subject IS 'What the alert is about: a series, a check, a category';
COMMENT ON COLUMN customer_analytics.alert.dedup_key IS 'Identity of the condition: raising the same key again does nothing';

SELECT pg_catalog.pg_extension_config_dump('customer_analytics.alert', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.alert_id_seq', '');

CREATE FUNCTION customer_analytics.raise_alert(
    kind      text,
    subject   text,
    details   jsonb DEFAULT '{}',
    dedup_key text DEFAULT NULL,
    severity  text DEFAULT 'warn')
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
DECLARE
    new_id  bigint;
    payload jsonb;
BEGIN
    IF kind IS NULL OR subject IS NULL THEN
        RAISE EXCEPTION 'an alert needs a kind and a subject'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF severity IS NOT NULL AND severity NOT IN ('info', 'warn', 'error') THEN
        RAISE EXCEPTION 'invalid alert severity "%"', severity
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use info, warn or error.';
    END IF;
    INSERT INTO alert AS a (kind, subject, severity, details, dedup_key)
    VALUES (kind, subject, COALESCE(severity, 'warn'), COALESCE(details, '{}'),
            COALESCE(dedup_key, kind || ':' || subject || ':' || md5(COALESCE(details, '{}')::text)))
    ON CONFLICT ON CONSTRAINT alert_dedup_key_key DO NOTHING
    RETURNING a.alert_id INTO new_id;
    IF new_id IS NOT NULL THEN
        payload := jsonb_build_object('alert_id', new_id, 'kind', kind, 'subject', subject,
                                      'severity', COALESCE(severity, 'warn'), 'details', details);
        -- NOTIFY payloads must stay under 8000 bytes: drop the details if too big
        IF octet_length(payload::text) > 7900 THEN
            payload := payload - 'details' || jsonb_build_object('details_truncated', true);
        END IF;
        PERFORM pg_notify('customer_analytics_alerts', payload::text);
    END IF;
    RETURN new_id;
END
$$;
COMMENT ON FUNCTION customer_analytics.raise_alert(text, text, jsonb, text, text) IS
    'Record an alert and NOTIFY customer_analytics_alerts with it as JSON; returns its id, or NULL when an alert with the same dedup_key exists (default key: kind, subject and details)';

CREATE FUNCTION customer_analytics.acknowledge_alert(alert_id bigint)
RETURNS boolean
LANGUAGE sql VOLATILE STRICT
SET search_path = pg_catalog, customer_analytics, customer_analytics_internal, pg_temp
AS $$
    WITH acked AS (
        UPDATE customer_analytics.alert a
        SET acknowledged = true, acknowledged_at = now(), acknowledged_by = current_user
        WHERE a.alert_id = acknowledge_alert.alert_id AND NOT a.acknowledged
        RETURNING 1
    )
    SELECT EXISTS (SELECT FROM acked)
$$;
COMMENT ON FUNCTION customer_analytics.acknowledge_alert(bigint) IS
    'Mark an alert as handled (by the current user, now); false if it does not exist or was already acknowledged';
