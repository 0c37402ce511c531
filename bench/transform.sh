#!/usr/bin/env bash
# transform() against a plain INSERT ... SELECT of the same staged rows,
# with the same dimension lookups, into a copy of the fact table with its
# indexes (and no triggers), without and with the three foreign keys the
# order lines used to have; same run.
#
#   UCI Online Retail (from ../shared/data when present) through the
#   raw-table recipe: ingest_csv into a raw table, INSERT ... SELECT into
#   stg_customers, stg_products and stg_orders.  transform() (its events
#   part has nothing to do) against the plain INSERT ... SELECT into a copy
#   of fact_order_line.
#
#   A generated shop: generate_sample_data(SHOP_CUSTOMERS customers,
#   SHOP_DAYS days) staged; the order lines as above, and
#   transform_events() against the plain INSERT ... SELECT into a copy of
#   fact_event.
#
#   A large generated shop (BIG=0 skips it), one run of each at that size:
#   about 1M order lines from generate_sample_data(BIG_LINES_CUSTOMERS
#   customers, events => false), then about 5M events from a second shop
#   (BIG_EVENTS_CUSTOMERS customers; its lines transformed first, untimed).
#   The generator gives about 5.6 lines and 68 events per customer-year, so
#   one shop with both would hold 12M events or 400k lines.
#
# Every timed transform starts from an empty star schema (the staged rows
# stay; the dimensions are rebuilt by each run); each baseline from an
# empty copy, after the dimensions are built.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ensure_root "$@"
RUNS=${RUNS:-5}
SHOP_CUSTOMERS=${SHOP_CUSTOMERS:-10000}
SHOP_DAYS=${SHOP_DAYS:-365}
BIG=${BIG:-1}
BIG_LINES_CUSTOMERS=${BIG_LINES_CUSTOMERS:-180000}
BIG_EVENTS_CUSTOMERS=${BIG_EVENTS_CUSTOMERS:-73500}
SHARED=${CA_SHARED_DATA:-$REPO/../shared/data}
OR_CSV=$SHARED/online_retail/online_retail_2010_2011.csv

install_packages
build_and_install || die "build failed"
bench_start
trap bench_stop EXIT
bench_psql -q -c "SET client_min_messages = warning" -c "CREATE EXTENSION customer_analytics"

# empty star schema and change queues; the staged rows stay
CLEAR_ORDERS="TRUNCATE customer_analytics.fact_order_line, customer_analytics_internal.transform_state,
    customer_analytics_internal.rfm_new_line, customer_analytics_internal.rfm_dirty_customer, customer_analytics_internal.sales_dirty_day;
DELETE FROM customer_analytics.dim_customer WHERE customer_key <> -1;
DELETE FROM customer_analytics.dim_product WHERE product_key <> -1;
TRUNCATE customer_analytics_internal.rfm_dirty_customer"
# (truncating fact_event empties the clickstream's change queue too)
CLEAR_EVENTS="TRUNCATE customer_analytics.fact_event, customer_analytics_internal.event_transform_state"
TRANSFORM="SELECT count(*) FROM customer_analytics.transform()"
TRANSFORM_EVENTS="SELECT count(*) FROM customer_analytics.transform_events()"

# the plain loads: same lookups as transform() (a customer's first version
# is open to -infinity, unknown ids and products map to -1)
LOOKUP_CUSTOMERS="(SELECT d.customer_id, d.customer_key,
           CASE WHEN row_number() OVER (PARTITION BY d.customer_id ORDER BY d.valid_from) = 1
                THEN '-infinity'::timestamptz ELSE d.valid_from END AS valid_from, d.valid_to
    FROM customer_analytics.dim_customer d WHERE d.customer_key <> -1)"
plain_orders() {
    echo "INSERT INTO bench.$1 (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity,
         unit_price, discount, status, channel, updated_at, stage_id, load_id, customer_ref)
    SELECT s.order_id, s.line_number, COALESCE(c.customer_key, -1), COALESCE(p.product_key, -1),
           customer_analytics.date_key((s.order_ts AT TIME ZONE 'UTC')::date),
           s.order_ts, s.quantity, s.unit_price, s.discount, s.status, s.channel, s.updated_at, s.stage_id, s.load_id,
           COALESCE(s.customer_id, '#guest:' || s.order_id)
    FROM customer_analytics.stg_orders s
    LEFT JOIN $LOOKUP_CUSTOMERS c
           ON c.customer_id = s.customer_id AND s.order_ts >= c.valid_from AND s.order_ts < c.valid_to
    LEFT JOIN customer_analytics.dim_product p ON p.product_id = s.product_id"
}
PLAIN_EVENTS="INSERT INTO bench.event_copy (event_id, event_ts, date_key, customer_key, customer_id, customer_stitched,
         session_id, event_type, product_key, order_id, channel, device, stage_id, load_id)
    SELECT s.event_id, s.event_ts, customer_analytics.date_key((s.event_ts AT TIME ZONE 'UTC')::date),
           CASE WHEN s.customer_id IS NULL THEN NULL ELSE COALESCE(c.customer_key, -1) END,
           s.customer_id, false, s.session_id, s.event_type,
           CASE WHEN s.product_id IS NULL THEN NULL ELSE COALESCE(p.product_key, -1) END,
           s.order_id, s.channel, s.device, s.stage_id, s.load_id
    FROM customer_analytics.stg_events s
    LEFT JOIN $LOOKUP_CUSTOMERS c
           ON c.customer_id = s.customer_id AND s.event_ts >= c.valid_from AND s.event_ts < c.valid_to
    LEFT JOIN customer_analytics.dim_product p ON p.product_id = s.product_id"

make_copies() {
    bench_psql -q <<'SQL'
SET client_min_messages = warning;
DROP TABLE IF EXISTS bench.order_copy, bench.order_copy_fk, bench.event_copy;
CREATE TABLE bench.order_copy (LIKE customer_analytics.fact_order_line INCLUDING ALL);
CREATE TABLE bench.order_copy_fk (LIKE customer_analytics.fact_order_line INCLUDING ALL);
ALTER TABLE bench.order_copy_fk
    ADD FOREIGN KEY (customer_key) REFERENCES customer_analytics.dim_customer,
    ADD FOREIGN KEY (product_key) REFERENCES customer_analytics.dim_product,
    ADD FOREIGN KEY (date_key) REFERENCES customer_analytics.dim_date;
CREATE TABLE bench.event_copy (LIKE customer_analytics.fact_event INCLUDING ALL);
-- the plain load by the bulk-load technique transform()'s first load uses,
-- through the same two functions: the copy's secondary indexes dropped,
-- the rows in, the indexes built (the batch size given is any large one)
CREATE OR REPLACE FUNCTION bench.load_then_index(t regclass, load text) RETURNS void
LANGUAGE plpgsql AS $f$
DECLARE
    defs text[] := customer_analytics_internal.defer_fact_indexes(t, 1000000);
BEGIN
    EXECUTE load;
    PERFORM customer_analytics_internal.restore_fact_indexes(defs);
END
$f$;
SQL
}
# plain_after label table sql [runs]: the plain load, its table's secondary
# indexes built after the rows
plain_after() {
    plain_sql "$1" "TRUNCATE bench.$2" "SELECT bench.load_then_index('bench.$2', \$i\$$3\$i\$)" "${4:-$RUNS}"
}

# plain_sql label setup sql [runs]: a baseline, timed as time_sql does,
# with JIT off as transform() runs its statements (JIT compiles each
# statement and speeds up none of these writes: off is the faster baseline)
plain_sql() {
    PGOPTIONS="${PGOPTIONS:-} -c jit=off" time_sql "$@"
}
# time_sql label setup sql [runs]: median ms of $RUNS (or runs) runs
time_sql() {
    bench_value "SELECT round(bench.time('$1', \$q\$$3\$q\$, ${4:-$RUNS}, \$q\$$2\$q\$)::numeric, 1)"
}
# fastest label: the fastest of its runs (the machine is shared: the
# fastest rounds are the least disturbed)
fastest() {
    bench_value "SELECT round(min(ms)::numeric, 1) FROM bench.timing WHERE label = '$1'"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
per_s() { awk -v n="$1" -v ms="$2" 'BEGIN { printf "%.0f", n / ms * 1000 }'; }

or_table="Online Retail: not run (no $OR_CSV)"
if [ -f "$OR_CSV" ]; then
    log "Online Retail through the raw-table recipe"
    bench_psql -q <<SQL
SET client_min_messages = warning;
CREATE TABLE bench.online_retail (
    invoice_no text NOT NULL, stock_code text NOT NULL, description text,
    quantity integer NOT NULL, invoice_date timestamp NOT NULL, unit_price numeric NOT NULL,
    customer_id integer, country text NOT NULL);
SELECT status, rows_loaded FROM customer_analytics.ingest_csv('bench.online_retail', '$OR_CSV',
    column_map => '{"InvoiceNo": "invoice_no", "StockCode": "stock_code", "InvoiceDate": "invoice_date",
                    "UnitPrice": "unit_price", "CustomerID": "customer_id"}');
INSERT INTO customer_analytics.stg_customers (customer_id, country)
SELECT DISTINCT ON (customer_id) customer_id::text, country FROM bench.online_retail
WHERE customer_id IS NOT NULL ORDER BY customer_id, invoice_date;
INSERT INTO customer_analytics.stg_products (product_id, name)
SELECT DISTINCT ON (stock_code) stock_code, description FROM bench.online_retail ORDER BY stock_code, invoice_date DESC;
-- a cancellation ('C' invoice, negative quantity) is a returned line
INSERT INTO customer_analytics.stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, status)
SELECT invoice_no, row_number() OVER (PARTITION BY invoice_no ORDER BY stock_code, quantity, unit_price),
       customer_id::text, stock_code, invoice_date AT TIME ZONE 'UTC', abs(quantity), round(unit_price, 2),
       CASE WHEN invoice_no LIKE 'C%' OR quantity < 0 THEN 'returned' ELSE 'completed' END
FROM bench.online_retail WHERE quantity <> 0 AND unit_price >= 0;
VACUUM ANALYZE;
SQL
    or_lines=$(bench_value "SELECT count(*) FROM customer_analytics.stg_orders")
    log "timing transform() on $or_lines lines ($RUNS runs)"
    or_transform=$(time_sql or_transform "$CLEAR_ORDERS" "$TRANSFORM")
    make_copies
    or_plain=$(plain_sql or_plain "TRUNCATE bench.order_copy" "$(plain_orders order_copy)")
    or_plain_fk=$(plain_sql or_plain_fk "TRUNCATE bench.order_copy_fk" "$(plain_orders order_copy_fk)")
    or_plain_after=$(plain_after or_plain_after order_copy "$(plain_orders order_copy)")
    f_plain=$(fastest or_plain); f_plain_fk=$(fastest or_plain_fk); f_transform=$(fastest or_transform)
    or_table="| | median | ratio | lines/s | fastest | ratio |
|---|---:|---:|---:|---:|---:|
| plain \`INSERT ... SELECT\` into a copy of \`fact_order_line\` (its indexes, no foreign keys) | $or_plain ms | 1.00 | $(per_s "$or_lines" "$or_plain") | $f_plain ms | 1.00 |
| the same with the three foreign keys | $or_plain_fk ms | $(ratio "$or_plain_fk" "$or_plain") | $(per_s "$or_lines" "$or_plain_fk") | $f_plain_fk ms | $(ratio "$f_plain_fk" "$f_plain") |
| the same, its secondary indexes built after the rows (as \`transform()\`'s first load) | $or_plain_after ms | $(ratio "$or_plain_after" "$or_plain") | $(per_s "$or_lines" "$or_plain_after") | $(fastest or_plain_after) ms | $(ratio "$(fastest or_plain_after)" "$f_plain") |
| \`transform()\` (dimensions, calendar, order lines, their key checks and change queues) | $or_transform ms | $(ratio "$or_transform" "$or_plain") | $(per_s "$or_lines" "$or_transform") | $f_transform ms | $(ratio "$f_transform" "$f_plain") |"
    bench_psql -q -c "SET client_min_messages = warning" -c "DROP TABLE bench.order_copy, bench.order_copy_fk, bench.event_copy" -c "$CLEAR_ORDERS" \
        -c "TRUNCATE customer_analytics.stg_orders, customer_analytics.stg_customers, customer_analytics.stg_products, bench.online_retail"
fi

log "generated shop: $SHOP_CUSTOMERS customers, $SHOP_DAYS days"
bench_psql -q <<SQL
SET client_min_messages = warning;
SELECT count(*) FROM customer_analytics.generate_sample_data(customers => $SHOP_CUSTOMERS, days => $SHOP_DAYS, seed => 42,
                                                             start_date => '2025-01-01');
VACUUM ANALYZE;
SQL
shop_lines=$(bench_value "SELECT count(*) FROM customer_analytics.stg_orders")
shop_events=$(bench_value "SELECT count(*) FROM customer_analytics.stg_events")
log "timing on $shop_lines lines, $shop_events events ($RUNS runs)"
# a first full run leaves the events done, so that the timed transform()
# runs find no new event
bench_psql -q -c "SET client_min_messages = warning" -c "$TRANSFORM" >/dev/null
shop_transform=$(time_sql shop_transform "$CLEAR_ORDERS" "$TRANSFORM")
make_copies
shop_plain=$(plain_sql shop_plain "TRUNCATE bench.order_copy" "$(plain_orders order_copy)")
shop_plain_fk=$(plain_sql shop_plain_fk "TRUNCATE bench.order_copy_fk" "$(plain_orders order_copy_fk)")
shop_events_t=$(time_sql shop_events "$CLEAR_EVENTS" "$TRANSFORM_EVENTS")
shop_events_plain=$(plain_sql shop_events_plain "TRUNCATE bench.event_copy" "$PLAIN_EVENTS")
shop_events_after=$(plain_after shop_events_after event_copy "$PLAIN_EVENTS")

big_table="Not run (BIG=0)."
if [ "$BIG" = 1 ]; then
    CLEAR_ALL="DROP TABLE IF EXISTS bench.order_copy, bench.order_copy_fk, bench.event_copy;
        $CLEAR_ORDERS; $CLEAR_EVENTS;
        TRUNCATE customer_analytics.stg_orders, customer_analytics.stg_customers, customer_analytics.stg_products,
                 customer_analytics.stg_events"
    log "large shop, order lines: $BIG_LINES_CUSTOMERS customers, $SHOP_DAYS days, no events"
    bench_psql -q -c "SET client_min_messages = warning" -c "$CLEAR_ALL" -c "
        SELECT count(*) FROM customer_analytics.generate_sample_data(customers => $BIG_LINES_CUSTOMERS, days => $SHOP_DAYS,
                                                                     seed => 42, start_date => '2025-01-01', events => false)" \
        -c "VACUUM ANALYZE" >/dev/null
    big_lines=$(bench_value "SELECT count(*) FROM customer_analytics.stg_orders")
    log "timing on $big_lines lines (1 run each)"
    big_transform=$(time_sql big_transform "$CLEAR_ORDERS" "$TRANSFORM" 1)
    make_copies
    big_plain=$(plain_sql big_plain "TRUNCATE bench.order_copy" "$(plain_orders order_copy)" 1)
    big_plain_fk=$(plain_sql big_plain_fk "TRUNCATE bench.order_copy_fk" "$(plain_orders order_copy_fk)" 1)
    big_plain_after=$(plain_after big_plain_after order_copy "$(plain_orders order_copy)" 1)

    log "large shop, events: $BIG_EVENTS_CUSTOMERS customers, $SHOP_DAYS days"
    bench_psql -q -c "SET client_min_messages = warning" -c "$CLEAR_ALL" -c "
        SELECT count(*) FROM customer_analytics.generate_sample_data(customers => $BIG_EVENTS_CUSTOMERS, days => $SHOP_DAYS,
                                                                     seed => 42, start_date => '2025-01-01')" \
        -c "VACUUM ANALYZE" >/dev/null
    big_events=$(bench_value "SELECT count(*) FROM customer_analytics.stg_events")
    big_events_lines=$(bench_value "SELECT count(*) FROM customer_analytics.stg_orders")
    log "timing on $big_events events (1 run each; the lines and the events transformed once first, untimed)"
    bench_psql -q -c "SET client_min_messages = warning" -c "$TRANSFORM" >/dev/null
    big_events_t=$(time_sql big_events "$CLEAR_EVENTS" "$TRANSFORM_EVENTS" 1)
    make_copies
    big_events_plain=$(plain_sql big_events_plain "TRUNCATE bench.event_copy" "$PLAIN_EVENTS" 1)
    big_events_after=$(plain_after big_events_after event_copy "$PLAIN_EVENTS" 1)
    big_table="Order lines: \`generate_sample_data\`, $BIG_LINES_CUSTOMERS customers, $SHOP_DAYS days, no events
($big_lines order lines). Events: a second shop of $BIG_EVENTS_CUSTOMERS customers ($big_events events;
its $big_events_lines lines transformed before, untimed). One run each at this size.

| | time | ratio | rows/s |
|---|---:|---:|---:|
| plain \`INSERT ... SELECT\` into a copy of \`fact_order_line\` (its indexes, no foreign keys) | $big_plain ms | 1.00 | $(per_s "$big_lines" "$big_plain") |
| the same with the three foreign keys | $big_plain_fk ms | $(ratio "$big_plain_fk" "$big_plain") | $(per_s "$big_lines" "$big_plain_fk") |
| the same, its secondary indexes built after the rows | $big_plain_after ms | $(ratio "$big_plain_after" "$big_plain") | $(per_s "$big_lines" "$big_plain_after") |
| \`transform()\` (dimensions, calendar, order lines, their key checks and change queues) | $big_transform ms | $(ratio "$big_transform" "$big_plain") | $(per_s "$big_lines" "$big_transform") |
| plain \`INSERT ... SELECT\` into a copy of \`fact_event\` | $big_events_plain ms | 1.00 | $(per_s "$big_events" "$big_events_plain") |
| the same, its secondary indexes built after the rows | $big_events_after ms | $(ratio "$big_events_after" "$big_events_plain") | $(per_s "$big_events" "$big_events_after") |
| \`transform_events()\` (lookups, identity stitching, late customers) | $big_events_t ms | $(ratio "$big_events_t" "$big_events_plain") | $(per_s "$big_events" "$big_events_t") |"
fi

# what the facts' loads pay for their keys, said from the catalog of this run
fk_of() {
    bench_value "SELECT count(*) FROM pg_constraint WHERE conrelid = 'customer_analytics.$1'::regclass AND contype = 'f'"
}
fk_lines=$(fk_of fact_order_line); fk_events=$(fk_of fact_event)
if [ "$fk_lines" -gt 0 ]; then
    fk_note="\`fact_order_line\` has $fk_lines foreign keys, enforced for every writer;
\`transform()\` (run here by a superuser, READ COMMITTED, no user trigger on the facts)
writes its lines with the per-row checks skipped and checks the batch's keys in one
anti-join, the dimensions locked SHARE (README: *The order lines' foreign keys, checked
per batch*); where that is not sound it pays what the plain load with them pays.
\`fact_event\` has $fk_events."
else
    fk_note="\`fact_order_line\` has no foreign key (\`transform()\` checks its keys itself);
\`fact_event\` has $fk_events."
fi

bench_record transform <<MD
# transform() against a plain INSERT ... SELECT

Each \`transform()\` starts from an empty star schema (dimensions rebuilt
from the staged rows); each baseline loads the same staged rows, with the
same dimension lookups (the customer version in effect at the line's time,
a customer's first version open to -infinity, -1 for unknown ids) into an
empty copy of the fact table with its indexes and no triggers, with JIT
off as \`transform()\` runs (off is the faster baseline). A first load of
10,000 rows or more builds the fact table's secondary indexes after its
rows (as pg_restore does): the rows *its secondary indexes built after
the rows* are the plain load done that way, for comparison. Median of
$RUNS runs each, same run, shared_buffers = $BENCH_SHARED_BUFFERS; "fastest"
is the fastest of the runs (on a shared machine, the least disturbed).

UCI Online Retail 2010-2011 (${or_lines:-0} lines) through the raw-table
recipe: \`ingest_csv\` into a raw table, then \`INSERT ... SELECT\` into
\`stg_customers\`, \`stg_products\` and \`stg_orders\` (a cancellation is a
returned line of positive quantity):

$or_table

Generated shop (\`generate_sample_data\`, $SHOP_CUSTOMERS customers,
$SHOP_DAYS days: $shop_lines order lines, $shop_events events):

| | median | ratio | rows/s | fastest | ratio |
|---|---:|---:|---:|---:|---:|
| plain \`INSERT ... SELECT\` into a copy of \`fact_order_line\` (its indexes, no foreign keys) | $shop_plain ms | 1.00 | $(per_s "$shop_lines" "$shop_plain") | $(fastest shop_plain) ms | 1.00 |
| the same with the three foreign keys | $shop_plain_fk ms | $(ratio "$shop_plain_fk" "$shop_plain") | $(per_s "$shop_lines" "$shop_plain_fk") | $(fastest shop_plain_fk) ms | $(ratio "$(fastest shop_plain_fk)" "$(fastest shop_plain)") |
| \`transform()\` (its events part with nothing new) | $shop_transform ms | $(ratio "$shop_transform" "$shop_plain") | $(per_s "$shop_lines" "$shop_transform") | $(fastest shop_transform) ms | $(ratio "$(fastest shop_transform)" "$(fastest shop_plain)") |
| plain \`INSERT ... SELECT\` into a copy of \`fact_event\` | $shop_events_plain ms | 1.00 | $(per_s "$shop_events" "$shop_events_plain") | $(fastest shop_events_plain) ms | 1.00 |
| the same, its secondary indexes built after the rows | $shop_events_after ms | $(ratio "$shop_events_after" "$shop_events_plain") | $(per_s "$shop_events" "$shop_events_after") | $(fastest shop_events_after) ms | $(ratio "$(fastest shop_events_after)" "$(fastest shop_events_plain)") |
| \`transform_events()\` (lookups, identity stitching, late customers) | $shop_events_t ms | $(ratio "$shop_events_t" "$shop_events_plain") | $(per_s "$shop_events" "$shop_events_t") | $(fastest shop_events) ms | $(ratio "$(fastest shop_events)" "$(fastest shop_events_plain)") |

Large generated shops (about 1M order lines, about 5M events):

$big_table

The code as measured: $fk_note
MD
