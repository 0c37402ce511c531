#!/usr/bin/env bash
# Which named query uses each index of fact_order_line and fact_event: on a
# generated shop, each operation below runs after its setup, and the index
# scans it made (pg_stat_user_indexes, flushed before and after) are
# recorded.  An index no operation scans is a candidate to drop; the
# foreign keys' checks (a dimension row deleted) count as operations.
# Not a timing: it writes bench/results/fact_indexes.md.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ensure_root "$@"
SHOP_CUSTOMERS=${SHOP_CUSTOMERS:-10000}
SHOP_DAYS=${SHOP_DAYS:-365}

install_packages
build_and_install || die "build failed"
bench_start
trap bench_stop EXIT

log "generated shop: $SHOP_CUSTOMERS customers, $SHOP_DAYS days"
bench_psql -q <<SQL
SET client_min_messages = warning;
CREATE EXTENSION customer_analytics;
SELECT count(*) FROM customer_analytics.generate_sample_data(customers => $SHOP_CUSTOMERS, days => $SHOP_DAYS, seed => 42,
                                                             start_date => '2025-01-01');
SELECT count(*) FROM customer_analytics.transform();
SELECT customer_analytics.refresh_customer_rfm();
SELECT customer_analytics.refresh_sales_rollup();
SELECT count(*) FROM customer_analytics.refresh_sessions();
SELECT count(*) FROM customer_analytics.run_checks();
VACUUM ANALYZE;
CREATE TABLE bench.index_use (step int, operation text, index_name text, scans bigint);
CREATE TABLE bench.scans_before AS
    SELECT indexrelname::text AS index_name, idx_scan FROM pg_stat_user_indexes WHERE false;
SQL

# step N "operation" "setup SQL" "operation SQL"
step() {
    bench_psql -q -c "$3" >/dev/null
    bench_psql -q -c "SELECT pg_stat_force_next_flush()" >/dev/null
    bench_psql -q -c "TRUNCATE bench.scans_before;
        INSERT INTO bench.scans_before SELECT indexrelname, idx_scan FROM pg_stat_user_indexes
        WHERE relname IN ('fact_order_line', 'fact_event')" >/dev/null
    bench_psql -q -c "$4" >/dev/null
    bench_psql -q -c "SELECT pg_stat_force_next_flush()" >/dev/null
    bench_psql -q -c "INSERT INTO bench.index_use
        SELECT $1, \$o\$$2\$o\$, s.indexrelname, s.idx_scan - b.idx_scan
        FROM pg_stat_user_indexes s JOIN bench.scans_before b ON b.index_name = s.indexrelname
        WHERE s.relname IN ('fact_order_line', 'fact_event')" >/dev/null
}

NEW_DAY="INSERT INTO customer_analytics.stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price)
    SELECT 'N' || f.order_id, f.line_number, c.customer_id, p.product_id, f.order_ts + interval '1 day', f.quantity, f.unit_price
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_customer c USING (customer_key) JOIN customer_analytics.dim_product p USING (product_key)
    WHERE f.customer_key <> -1 ORDER BY f.order_ts DESC, f.order_id, f.line_number LIMIT 300;
INSERT INTO customer_analytics.stg_events (event_id, event_ts, customer_id, session_id, event_type, channel, device)
    SELECT 'N' || e.event_id, e.event_ts + interval '1 day', e.customer_id, 'N' || e.session_id, e.event_type, e.channel, e.device
    FROM customer_analytics.fact_event e ORDER BY e.event_ts DESC, e.event_id LIMIT 3000"
NOOP="SELECT 1"

log "operations"
step 1 "transform(): a new day (300 lines, 3,000 events)" "$NEW_DAY" "SELECT count(*) FROM customer_analytics.transform()"
step 2 "refresh_customer_rfm() after new orders" "$NOOP" "SELECT customer_analytics.refresh_customer_rfm()"
step 3 "refresh_sales_rollup() after new orders" "$NOOP" "SELECT customer_analytics.refresh_sales_rollup()"
step 4 "refresh_sessions() after new events" "$NOOP" "SELECT count(*) FROM customer_analytics.refresh_sessions()"
step 5 "run_checks() after new lines" "$NOOP" "SELECT count(*) FROM customer_analytics.run_checks()"
step 6 "refresh_customer_rfm() after 50 customers' lines changed" \
    "UPDATE customer_analytics.fact_order_line SET discount = discount WHERE customer_key IN
        (SELECT customer_key FROM customer_analytics.dim_customer WHERE customer_key <> -1 ORDER BY customer_key LIMIT 50)" \
    "SELECT customer_analytics.refresh_customer_rfm()"
step 7 "refresh_sales_rollup() after a product changed category" \
    "INSERT INTO customer_analytics.stg_products (product_id, name, category, updated_at)
        SELECT product_id, name, 'Moved', now() FROM customer_analytics.dim_product WHERE product_key <> -1 ORDER BY product_key LIMIT 1;
     SELECT count(*) FROM customer_analytics.transform()" \
    "SELECT customer_analytics.refresh_sales_rollup()"
step 8 "reference_time()" "$NOOP" "SELECT customer_analytics.reference_time()"
step 9 "rfm() as of a month before the end" "$NOOP" "SELECT count(*) FROM customer_analytics.rfm(customer_analytics.reference_time() - interval '30 days')"
step 10 "refresh_customer_rfm() as of a month before the end" "$NOOP" \
    "SET customer_analytics.as_of = '2025-12-01'; SELECT customer_analytics.refresh_customer_rfm()"
step 11 "purchase_order (events to orders)" "$NOOP" "SELECT count(*) FROM customer_analytics.purchase_order"
step 12 "clv_summary()" "$NOOP" "SELECT count(*) FROM customer_analytics.clv_summary(customer_analytics.reference_time())"
step 13 "refresh_forecasts()" "$NOOP" "SELECT customer_analytics.refresh_forecasts()"
step 14 "run_checks(full => true)" "$NOOP" "SELECT count(*) FROM customer_analytics.run_checks(\"full\" => true)"
step 15 "refresh_sales_views() (daily_sales, product_category_sales, anomalies)" "$NOOP" \
    "SELECT customer_analytics.refresh_sales_views(false)"
step 16 "funnel_daily" "$NOOP" "SELECT count(*) FROM customer_analytics.funnel_daily"
# the foreign keys' checks: the key is chosen in the setup, so that only
# the check's own scans count
step 17 "a customer version without lines deleted (foreign key check)" \
    "CREATE TABLE bench.pick AS SELECT min(c.customer_key) AS k FROM customer_analytics.dim_customer c
        WHERE c.customer_key <> -1 AND NOT EXISTS (SELECT FROM customer_analytics.fact_order_line f WHERE f.customer_key = c.customer_key)
          AND NOT EXISTS (SELECT FROM customer_analytics.fact_event e WHERE e.customer_key = c.customer_key)" \
    "DELETE FROM customer_analytics.dim_customer WHERE customer_key = (SELECT k FROM bench.pick)"
step 18 "a product without lines deleted (foreign key check)" \
    "INSERT INTO customer_analytics.dim_product (product_id, name) VALUES ('UNUSED', 'Unused')" \
    "DELETE FROM customer_analytics.dim_product WHERE product_id = 'UNUSED'"
step 19 "a date without lines deleted (foreign key check)" \
    "DROP TABLE bench.pick; CREATE TABLE bench.pick AS SELECT max(d.date_key) AS k FROM customer_analytics.dim_date d
        WHERE NOT EXISTS (SELECT FROM customer_analytics.fact_order_line f WHERE f.date_key = d.date_key)" \
    "DELETE FROM customer_analytics.dim_date WHERE date_key = (SELECT k FROM bench.pick)"

lines=$(bench_value "SELECT count(*) FROM customer_analytics.fact_order_line")
events=$(bench_value "SELECT count(*) FROM customer_analytics.fact_event")
table=$(bench_value "SELECT string_agg(format('| %s | \`%s\` | %s |', i.index_name, i.index_def,
                            COALESCE((SELECT string_agg(format('%s (%s)', u.operation, u.scans), '; ' ORDER BY u.step)
                                      FROM bench.index_use u WHERE u.index_name = i.index_name AND u.scans > 0), '**none**')),
                            E'\n' ORDER BY i.index_name)
                     FROM (SELECT indexrelname::text AS index_name,
                                  regexp_replace(pg_get_indexdef(indexrelid), '^.* USING ', 'USING ') AS index_def
                           FROM pg_stat_user_indexes WHERE relname IN ('fact_order_line', 'fact_event')) i")
bench_record fact_indexes <<MD
# The fact tables' indexes and the operations that scan them

Generated shop (\`generate_sample_data\`, $SHOP_CUSTOMERS customers,
$SHOP_DAYS days, transformed: $lines order lines, $events events, after the
day the first operation adds).  Each operation runs after its setup; the
count is the index scans it made (\`pg_stat_user_indexes\`).  Not a timing.
An index is listed with every operation that scanned it; **none**: no
operation here did.  A count of one to a few can be the planner reading an
index's ends to estimate a range past its statistics, not the query's plan.

| index | definition | operations that scan it (scans) |
|---|---|---|
$table
MD
