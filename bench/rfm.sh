#!/usr/bin/env bash
# rfm() against the idiomatic SQL an analyst writes (collapse lines into
# orders, GROUP BY customer, then ntile(5) three times), on the same star
# schema, in the same run.  Two sizes, to show how the time grows:
# 1,000,000 order lines of 100,000 customers and ten times that.
set -euo pipefail
# both sizes' tables fit in shared buffers (a bulk scan of a table larger
# than a quarter of them would go through a small ring instead)
BENCH_SHARED_BUFFERS=${BENCH_SHARED_BUFFERS:-8GB}
. "$(dirname "$0")/lib.sh"
ensure_root "$@"
RUNS=${RUNS:-5}
LINES=${LINES:-1000000}
CUSTOMERS=${CUSTOMERS:-100000}
SCALE=${SCALE:-10}

install_packages
build_and_install || die "build failed"
bench_start
trap bench_stop EXIT

bench_psql -q -c "CREATE EXTENSION customer_analytics"

# Star-schema rows made directly (the generator and transform are not what
# is measured): every customer has a current version and 10% an older one,
# orders of 1-4 lines over two years, 3% cancelled.
load() {
    local lines=$1 customers=$2
    bench_psql -q <<SQL
SET session_replication_role = replica;   -- skip FK triggers while loading
TRUNCATE customer_analytics.fact_order_line;
DELETE FROM customer_analytics.dim_customer WHERE customer_key > 0;
DELETE FROM customer_analytics.dim_product WHERE product_key > 0;
SELECT customer_analytics.ensure_dim_date('2024-01-01', '2025-12-31');
INSERT INTO customer_analytics.dim_product (product_key, product_id, category)
SELECT g, 'P' || g, 'cat' || g % 20 FROM generate_series(1, 1000) g;
INSERT INTO customer_analytics.dim_customer (customer_key, customer_id, valid_from, valid_to, is_current)
SELECT g, 'C' || g, timestamptz '2024-01-01', timestamptz 'infinity', true FROM generate_series(1, $customers) g
UNION ALL
SELECT $customers + g, 'C' || g, timestamptz '2023-01-01', timestamptz '2024-01-01', false FROM generate_series(1, $customers / 10) g;
INSERT INTO customer_analytics.fact_order_line
    (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity, unit_price, discount, status, channel, stage_id,
     customer_ref)
SELECT 'O' || o, l, c, 1 + (o * 7 + l) % 1000,
       to_char(ts, 'YYYYMMDD')::int, ts, 1 + l % 3, ((o * 37 + l * 11) % 20000) / 100.0, 0,
       CASE WHEN o % 33 = 0 THEN 'cancelled' ELSE 'completed' END, 'web', o, 'C' || CASE WHEN c > $customers THEN c - $customers ELSE c END
FROM (SELECT o, 1 + (hashint8(o) & 2147483647) % ($customers + $customers / 10) AS c,
             timestamptz '2024-01-01 00:00+00' + ((hashint8(o * 3) & 2147483647) % (730 * 86400)) * interval '1 second' AS ts,
             1 + (o % 4) AS nlines
      FROM generate_series(1, $lines * 2 / 5) o) orders,
     LATERAL generate_series(1, nlines) l;
RESET session_replication_role;
VACUUM ANALYZE customer_analytics.fact_order_line;
VACUUM ANALYZE customer_analytics.dim_customer;
SQL
}

RFM_SQL="SELECT count(*) FROM customer_analytics.rfm('2026-01-01')"
NTILE_SQL="SELECT count(*) FROM (
    WITH orders AS (
        SELECT d.customer_id, f.order_id, min(f.order_ts) AS ts, sum(f.revenue) AS amount
        FROM customer_analytics.fact_order_line f
        JOIN customer_analytics.dim_customer d USING (customer_key)
        WHERE f.status = 'completed' AND f.order_ts <= '2026-01-01'
        GROUP BY 1, 2
    ), per_customer AS (
        SELECT customer_id, '2026-01-01'::date - max(ts)::date AS recency_days,
               count(*) AS frequency, sum(amount) AS monetary
        FROM orders GROUP BY 1
    )
    SELECT customer_id, ntile(5) OVER (ORDER BY recency_days DESC) AS r,
           ntile(5) OVER (ORDER BY frequency) AS f,
           ntile(5) OVER (ORDER BY monetary) AS m
    FROM per_customer) s"

measure() {
    local tag=$1
    rfm_ms[$tag]=$(bench_value "SELECT round(bench.time('rfm_$tag', \$q\$$RFM_SQL\$q\$, $RUNS)::numeric, 1)")
    sql_ms[$tag]=$(bench_value "SELECT round(bench.time('sql_$tag', \$q\$$NTILE_SQL\$q\$, $RUNS)::numeric, 1)")
    rows[$tag]=$(bench_value "SELECT count(*) FROM customer_analytics.fact_order_line")
    custs[$tag]=$(bench_value "SELECT count(*) FROM customer_analytics.rfm('2026-01-01')")
}

declare -A rfm_ms sql_ms rows custs
log "loading $LINES lines, $CUSTOMERS customers"
load "$LINES" "$CUSTOMERS"
log "timing ($RUNS runs each)"
measure small
plan=$(bench_psql -At -c "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) $NTILE_SQL" | grep -E 'Gather|Workers|Parallel' | sed 's/^ *//' | sort -u | paste -sd';' - || true)

log "loading $((LINES * SCALE)) lines, $((CUSTOMERS * SCALE)) customers"
load $((LINES * SCALE)) $((CUSTOMERS * SCALE))
log "timing ($RUNS runs each)"
measure large

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

bench_record rfm <<MD
# rfm() against GROUP BY + three ntile(5)

The same star schema (\`fact_order_line\` with order lines of 1-4 per
order, 3% cancelled; \`dim_customer\` with an older SCD2 version for 10% of
customers), the same answer per customer (lines collapsed into orders,
versions into customers, completed lines only), median of $RUNS runs each,
timed on the server, with shared_buffers = $BENCH_SHARED_BUFFERS so that both
sizes are read from memory.

| order lines | customers | \`rfm()\` | idiomatic SQL | speed-up |
|---:|---:|---:|---:|---:|
| ${rows[small]} | ${custs[small]} | ${rfm_ms[small]} ms | ${sql_ms[small]} ms | $(ratio "${sql_ms[small]}" "${rfm_ms[small]}")x |
| ${rows[large]} | ${custs[large]} | ${rfm_ms[large]} ms | ${sql_ms[large]} ms | $(ratio "${sql_ms[large]}" "${rfm_ms[large]}")x |

Growth for ${SCALE}x the rows: \`rfm()\` $(ratio "${rfm_ms[large]}" "${rfm_ms[small]}")x the time,
the idiomatic SQL $(ratio "${sql_ms[large]}" "${sql_ms[small]}")x.

\`rfm()\` is one sequential pass in one backend (a set-returning function is
not parallelised); the idiomatic query's plan at the smaller size used:
${plan:-no parallel workers}. Note that the SQL's ntile() scores split ties
arbitrarily while \`rfm()\` gives equal values equal scores, so the SQL is
doing slightly less.

Reproduce: \`./bench/rfm.sh\` (as root; RUNS, LINES, CUSTOMERS and SCALE override the defaults).
MD
