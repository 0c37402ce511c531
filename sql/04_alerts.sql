-- Alerts: recorded once per condition, acknowledged by a user.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql

SELECT raise_alert('anomaly', 'Clothing', '{"day": "2025-02-12", "z": -4.2}', 'anomaly:Clothing:2025-02-12', 'warn') AS first;
-- the same condition again: nothing new
SELECT raise_alert('anomaly', 'Clothing', '{"day": "2025-02-12", "z": -4.3}', 'anomaly:Clothing:2025-02-12') AS again;
-- without a key, kind + subject + details identify the condition
SELECT raise_alert('quality_check', 'fact_order_line.customer_key not_null', '{"failing_rows": 3}', NULL, 'error') IS NOT NULL AS raised;
SELECT raise_alert('quality_check', 'fact_order_line.customer_key not_null', '{"failing_rows": 3}', NULL, 'error') IS NULL AS deduplicated;
SELECT raise_alert('quality_check', 'fact_order_line.customer_key not_null', '{"failing_rows": 4}', NULL, 'error') IS NOT NULL AS new_condition;
SELECT alert_id, kind, subject, severity, details, acknowledged FROM alert ORDER BY alert_id;

SELECT acknowledge_alert(1) AS acked, acknowledge_alert(1) AS acked_twice, acknowledge_alert(999) AS no_such_alert;
SELECT alert_id, acknowledged, acknowledged_by = current_user AS by_me FROM alert ORDER BY alert_id;

\set VERBOSITY terse
SELECT raise_alert(NULL, 'x');
SELECT raise_alert('anomaly', 'x', '{}', 'k', 'critical');
\set VERBOSITY default

-- a huge details object is still recorded whole; only the NOTIFY drops it
SELECT raise_alert('anomaly', 'big', jsonb_build_object('text', repeat('x', 10000))) IS NOT NULL AS raised_big;
SELECT length(details->>'text') FROM alert WHERE subject = 'big';

TRUNCATE alert;
