#!/usr/bin/env bash
# ingest_csv() against plain COPY: the same 1,000,000 order lines, the same
# staging table with the same indexes, on one throwaway cluster.  Also: a
# file with 1% bad rows (which COPY cannot load at all), rows per second,
# and the backend's peak private memory at two file sizes.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ensure_root "$@"
RUNS=${RUNS:-5}
ROWS=${ROWS:-1000000}

install_packages
build_and_install || die "build failed"
bench_start
trap bench_stop EXIT

DATA=$BENCH_OUT/data
rm -rf "$DATA"
mkdir -p "$DATA"
chown "$PG_OS_USER" "$DATA"
log "generating order lines"
bench_psql -q -c "CREATE EXTENSION customer_analytics" \
    -c "SELECT count(*) FROM customer_analytics.generate_sample_data(customers => 120000, days => 600, seed => 1,
            directory => '$DATA/gen', events => false, defects => false)" >/dev/null
# one file of exactly $ROWS lines, a 10% slice of it, and a copy with every
# 100th line broken (text in the quantity column)
{ head -n 1 "$DATA"/gen/orders/orders_2025-01.csv
  for f in "$DATA"/gen/orders/*.csv; do tail -n +2 "$f"; done | awk -v n="$ROWS" 'NR <= n'; } >"$DATA/orders.csv"
awk -v n=$((ROWS / 10 + 1)) 'NR <= n' "$DATA/orders.csv" >"$DATA/orders_small.csv"
awk -F, -v OFS=, 'NR > 1 && NR % 100 == 0 { $6 = "x" } { print }' "$DATA/orders.csv" >"$DATA/orders_bad.csv"
chown "$PG_OS_USER" "$DATA"/*.csv
LINES=$(($(wc -l <"$DATA/orders.csv") - 1))
[ "$LINES" -eq "$ROWS" ] || die "generated only $LINES lines"

COLS="order_id,line_number,customer_id,product_id,order_ts,quantity,unit_price,discount,status,channel"
RESET="TRUNCATE customer_analytics.stg_orders, customer_analytics.ingest_load, customer_analytics.ingest_reject; CHECKPOINT"

# median of $RUNS timings (ms) of one statement, each in its own transaction
time_ms() {
    local sql=$1 t=()
    for _ in $(seq "$RUNS"); do
        bench_psql -q -c "$RESET" >/dev/null
        t+=("$(bench_psql -At -c '\timing on' -c "$sql" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p')")
    done
    printf '%s\n' "${t[@]}" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

log "timing ($RUNS runs each)"
copy_ms=$(time_ms "COPY customer_analytics.stg_orders ($COLS) FROM '$DATA/orders.csv' WITH (FORMAT csv, HEADER)")
ingest_ms=$(time_ms "SELECT rows_loaded FROM customer_analytics.ingest_csv('customer_analytics.stg_orders', '$DATA/orders.csv', force => true)")
bad_ms=$(time_ms "SELECT rows_loaded FROM customer_analytics.ingest_csv('customer_analytics.stg_orders', '$DATA/orders_bad.csv', force => true)")
bench_psql -q -c "$RESET" >/dev/null
bad_result=$(bench_psql -At -c "SELECT rows_read || ' read, ' || rows_loaded || ' loaded, ' || rows_rejected || ' rejected'
    FROM customer_analytics.ingest_csv('customer_analytics.stg_orders', '$DATA/orders_bad.csv', force => true)")

# peak private (anonymous) memory of the backend during a load, sampled
peak_kb() {
    local file=$1 pid peak=0 v
    bench_psql -q -c "$RESET" >/dev/null
    PGAPPNAME=ingest_mem bench_psql -q -c "SELECT pg_sleep(0.3); SELECT count(*) FROM customer_analytics.ingest_csv('customer_analytics.stg_orders', '$file', force => true)" >/dev/null &
    local client=$!
    sleep 0.1
    pid=$(bench_value "SELECT pid FROM pg_stat_activity WHERE application_name = 'ingest_mem'")
    while kill -0 "$client" 2>/dev/null; do
        v=$(awk '/^RssAnon:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
        [ -n "$v" ] && [ "$v" -gt "$peak" ] && peak=$v
        sleep 0.02
    done
    wait "$client"
    echo "$peak"
}
log "memory"
mem_small=$(peak_kb "$DATA/orders_small.csv")
mem_large=$(peak_kb "$DATA/orders.csv")
size_mb=$(du -m "$DATA/orders.csv" | cut -f1)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
rate() { awk -v n="$1" -v ms="$2" 'BEGIN { printf "%.0f", n / (ms / 1000) }'; }

bench_record ingest <<MD
# ingest_csv() against COPY

$ROWS order lines ($size_mb MB of CSV) into \`customer_analytics.stg_orders\` (its
\`staged_xid\` index and column defaults included), the same file, the same
table, median of $RUNS runs each, every run in its own transaction after
TRUNCATE and CHECKPOINT.

| load | median | rows/s | ratio to COPY |
|---|---:|---:|---:|
| \`COPY ... FROM ... (FORMAT csv, HEADER)\` | $copy_ms ms | $(rate "$ROWS" "$copy_ms") | 1.00 |
| \`ingest_csv()\`, validation on, no rejects | $ingest_ms ms | $(rate "$ROWS" "$ingest_ms") | $(ratio "$ingest_ms" "$copy_ms") |
| \`ingest_csv()\`, 1% bad rows ($bad_result) | $bad_ms ms | $(rate "$ROWS" "$bad_ms") | $(ratio "$bad_ms" "$copy_ms") |

COPY cannot load the file with bad rows at all (it stops at the first), so
that line is compared with COPY of the clean file.

Peak private memory (RssAnon) of the loading backend, sampled every 20 ms:
$mem_small kB for $((ROWS / 10)) rows, $mem_large kB for $ROWS rows: it does not grow with the
file (rows are written in batches of 1,000; rejects are written as they
come).

Reproduce: \`./bench/ingest.sh\` (as root; RUNS and ROWS override the defaults).
MD
