#!/usr/bin/env bash
# The staging mark's default, staging_xid(), against the one it replaced,
# pg_current_xact_id(), on a single node: two copies of stg_orders that
# differ only in staged_xid's default, the same rows into each, the runs
# alternated, on one throwaway cluster.
#   - bulk: INSERT ... SELECT of ROWS order lines from a plain table (the
#     default evaluated per row; its Citus check once per transaction);
#   - one row per transaction, TXNS of them (the check made at each),
#     synchronous_commit off so that the flush does not hide the call;
#   - the call alone, CALLS times in one SELECT.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ensure_root "$@"
RUNS=${RUNS:-11}
ROWS=${ROWS:-1000000}
TXNS=${TXNS:-20000}
CALLS=${CALLS:-5000000}

install_packages
build_and_install || die "build failed"
bench_start
trap bench_stop EXIT

log "$ROWS source rows"
bench_psql -q <<SQL
SET client_min_messages = warning;
CREATE EXTENSION customer_analytics;
CREATE TABLE bench.src AS
SELECT 'O' || g AS order_id, 1 + g % 4 AS line_number, 'C' || g % 50000 AS customer_id, 'P' || g % 500 AS product_id,
       timestamptz '2025-01-01' + g * interval '7 seconds' AS order_ts, 1 + g % 3 AS quantity, 9.99 AS unit_price
FROM generate_series(1, $ROWS) g;
-- the same table twice (checks, defaults, the staged_xid index), but the default
CREATE TABLE bench.stg_new (LIKE customer_analytics.stg_orders INCLUDING ALL);
CREATE TABLE bench.stg_old (LIKE customer_analytics.stg_orders INCLUDING ALL);
ALTER TABLE bench.stg_old ALTER COLUMN staged_xid SET DEFAULT pg_catalog.pg_current_xact_id();
VACUUM ANALYZE bench.src;
SQL
[ "$(bench_value "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
    WHERE d.adrelid = 'bench.stg_new'::regclass AND a.attname = 'staged_xid'")" = "customer_analytics_internal.staging_xid()" ] \
    || die "bench.stg_new does not have the extension's default"

COLS="order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price"
log "bulk: $RUNS runs each, alternated"
for i in $(seq "$RUNS"); do
    for t in old new; do
        bench_psql -q -c "TRUNCATE bench.stg_$t" -c "CHECKPOINT" >/dev/null
        bench_value "SELECT bench.time('bulk_$t', 'INSERT INTO bench.stg_$t ($COLS) SELECT $COLS FROM bench.src', 1)" >/dev/null
    done
done
bench_psql -q -c "TRUNCATE bench.stg_old, bench.stg_new" >/dev/null

# one row per transaction: a DO block that commits after each row, timed
# by psql (one round trip per block)
one_row_ms() {
    local t=$1
    bench_psql -At -c '\timing on' -c "SET synchronous_commit = off" -c "DO \$\$ BEGIN
        FOR i IN 1 .. $TXNS LOOP
            INSERT INTO bench.stg_$t ($COLS) VALUES ('T' || i, 1, 'C1', 'P1', '2025-01-01', 1, 9.99);
            COMMIT;
        END LOOP;
    END \$\$" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1
}
log "one row per transaction: $RUNS runs each of $TXNS, alternated"
for i in $(seq "$RUNS"); do
    for t in old new; do
        bench_psql -q -c "TRUNCATE bench.stg_$t" -c "CHECKPOINT" >/dev/null
        bench_psql -q -c "INSERT INTO bench.timing VALUES ('txn_$t', $i, $(one_row_ms "$t"))" >/dev/null
    done
done

# the call alone, CALLS times in one statement
log "the call alone: $RUNS runs each of $CALLS calls, alternated"
for i in $(seq "$RUNS"); do
    bench_value "SELECT bench.time('call_old', 'SELECT count(pg_catalog.pg_current_xact_id()) FROM generate_series(1, $CALLS)', 1)" >/dev/null
    bench_value "SELECT bench.time('call_new', 'SELECT count(customer_analytics_internal.staging_xid()) FROM generate_series(1, $CALLS)', 1)" >/dev/null
done

# every row marked as before: the run's own transaction id
bench_psql -q -c "TRUNCATE bench.stg_new" >/dev/null
same=$(bench_psql -qAt -c "BEGIN" -c "INSERT INTO bench.stg_new ($COLS) SELECT $COLS FROM bench.src LIMIT 1000" \
    -c "SELECT count(*) FILTER (WHERE staged_xid = pg_current_xact_id()) || '/' || count(*) FROM bench.stg_new" -c "ROLLBACK")

median() { bench_value "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1) FROM bench.timing WHERE label = '$1'"; }
spread() { bench_value "SELECT round(min(ms)::numeric, 1) || '-' || round(max(ms)::numeric, 1) FROM bench.timing WHERE label = '$1'"; }
ratio() { bench_value "SELECT round(($(median "$1") / $(median "$2"))::numeric, 3)"; }

bench_record staging_mark <<EOF
# The staging mark's default: staging_xid() against pg_current_xact_id()

Two copies of \`stg_orders\` (\`LIKE ... INCLUDING ALL\`: the same checks,
defaults and \`staged_xid\` index) that differ only in \`staged_xid\`'s
default: \`customer_analytics_internal.staging_xid()\` (the extension's,
which also refuses on a Citus worker or in a connection Citus opened,
checked once per transaction) and
\`pg_current_xact_id()\` (the baseline, the default it replaced).  The same
rows into each, the runs alternated, $RUNS of each; medians.  Rows marked
with the transaction's own id by the new default: $same.

| workload | baseline \`pg_current_xact_id()\` (ms, median; range) | \`staging_xid()\` (ms, median; range) | ratio |
|---|---|---|---|
| \`INSERT ... SELECT\` of $ROWS lines from a plain table | $(median bulk_old) ($(spread bulk_old)) | $(median bulk_new) ($(spread bulk_new)) | $(ratio bulk_new bulk_old)x |
| $TXNS one-row transactions (\`synchronous_commit = off\`) | $(median txn_old) ($(spread txn_old)) | $(median txn_new) ($(spread txn_new)) | $(ratio txn_new txn_old)x |
| the call alone, $CALLS times in one \`SELECT\` | $(median call_old) ($(spread call_old)) | $(median call_new) ($(spread call_new)) | $(ratio call_new call_old)x |

On a shared machine (load average $(cut -d' ' -f1-3 /proc/loadavg) at the end of
the run) the runs of one workload spread more than the two defaults differ:
read a ratio near 1 as no measurable difference.
EOF
