#!/usr/bin/env bash
# Two parts (PART=load, PART=sizes, default both; a part not run keeps its
# section of bench/results/pipeline.md):
#
# load: run_pipeline() after 1% new order lines against a full refresh of
# the same views, on a 1,000,000-line fact table, in the same run.
#
#   incremental: stage 1% new lines, CALL run_pipeline() (transform of the
#                new lines, checks, the sales rollup for the days touched,
#                every view refreshed in dependency order, alerts, purge)
#   baseline:    the same views recomputed from the facts: the sales
#                rollups rebuilt for every day, customer_rfm's scores
#                rewritten from rfm() (what REFRESH of a materialized view
#                customer_rfm costs), then every view refreshed
#
# sizes: the same fixed append (one day of a shop: APPEND_LINES order lines,
#        APPEND_EVENTS events, existing customers) on generated histories
#        of 1x, 3x and 10x BASE_CUSTOMERS customers over a year, ending the
#        day before; CALL run_pipeline() after each append, each step's
#        median time at each size, and the ratio of each size to 1x.  The
#        baseline is the same run on the 1x history.
set -euo pipefail
BENCH_SHARED_BUFFERS=${BENCH_SHARED_BUFFERS:-4GB}
PART=${PART:-all}
. "$(dirname "$0")/lib.sh"
ensure_root "$@"
RUNS=${RUNS:-5}
LINES=${LINES:-1000000}
CUSTOMERS=${CUSTOMERS:-100000}
APPEND=$((LINES / 100))

install_packages
build_and_install || die "build failed"
bench_start
trap bench_stop EXIT

if [ "$PART" != sizes ]; then
log "loading $LINES order lines of $CUSTOMERS customers over two years"
bench_psql -q <<SQL
SET client_min_messages = warning;
CREATE EXTENSION customer_analytics;
SELECT customer_analytics.ensure_dim_date('2024-01-01', '2025-12-31');
INSERT INTO customer_analytics.dim_product (product_key, product_id, category)
SELECT g, 'P' || g, 'cat' || g % 12 FROM generate_series(1, 1000) g;
INSERT INTO customer_analytics.dim_customer (customer_key, customer_id, valid_from)
SELECT g, 'C' || g, timestamptz '2023-01-01' FROM generate_series(1, $CUSTOMERS) g;
SELECT setval('customer_analytics.customer_key_seq', $CUSTOMERS + 1);
SELECT setval('customer_analytics.product_key_seq', 1001);
INSERT INTO customer_analytics.fact_order_line
    (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity, unit_price, discount, status, channel, stage_id,
     customer_ref)
SELECT 'O' || o, l, c, 1 + (o * 7 + l) % 1000, to_char(ts, 'YYYYMMDD')::int, ts, 1 + l % 3,
       ((o * 37 + l * 11) % 20000) / 100.0, 0, CASE WHEN o % 33 = 0 THEN 'cancelled' ELSE 'completed' END, 'web', o, 'C' || c
FROM (SELECT o, 1 + (hashint8(o) & 2147483647) % $CUSTOMERS AS c,
             timestamptz '2024-01-01 00:00+00' + ((o::float8 / ($LINES * 2 / 5)) * 700 * 86400) * interval '1 second' AS ts,
             1 + (o % 4) AS nlines
      FROM generate_series(1, $LINES * 2 / 5) o) orders,
     LATERAL generate_series(1, nlines) l;
VACUUM ANALYZE;
-- the first run builds everything
SET customer_analytics.as_of = '2025-12-01';
CALL customer_analytics.run_pipeline();
SQL
bench_value "SELECT status FROM customer_analytics.pipeline_run ORDER BY run_id DESC LIMIT 1" | grep -qx succeeded \
    || die "the first pipeline run failed"

# 1% new lines on the last days (new orders, in the staging table) ...
APPEND_SQL="INSERT INTO customer_analytics.stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel)
SELECT 'N' || txid_current() || '-' || g, 1, 'C' || (1 + g * 13 % $CUSTOMERS), 'P' || (1 + g % 1000),
       timestamptz '2025-11-30 00:00+00' + (g % 1440) * interval '1 minute', 1 + g % 3, 19.99, 0, 'completed', 'app'
FROM generate_series(1, $APPEND) g"

# time one statement $RUNS times after an untimed setup; median in ms
time_ms() {
    local setup=$1 sql=$2 t=()
    for _ in $(seq "$RUNS"); do
        bench_psql -q -c "SET client_min_messages = warning" -c "$setup" >/dev/null
        t+=("$(bench_psql -At -c "SET customer_analytics.as_of = '2025-12-01'" -c "SET client_min_messages = warning" \
                -c '\timing on' -c "$sql" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1)")
    done
    printf '%s\n' "${t[@]}" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

FULL_SQL="DO \$\$
DECLARE v record;
BEGIN
    PERFORM customer_analytics.refresh_sales_rollup(full_refresh => true);
    TRUNCATE customer_analytics.customer_rfm_score;
    INSERT INTO customer_analytics.customer_rfm_score
        (customer_id, customer_key, last_purchase, frequency, monetary, r, f, m, rfm_cell, segment)
    SELECT customer_id, customer_key, customer_analytics.reference_time() - recency_days * interval '86400 seconds',
           frequency, monetary, r, f, m, rfm_cell, segment
    FROM customer_analytics.rfm(customer_analytics.reference_time());
    FOR v IN SELECT matview FROM customer_analytics.refresh_plan()
             WHERE customer_analytics.qualified_name(matview) NOT IN (SELECT matview FROM customer_analytics.refresh_policy)
             ORDER BY level, matview::text LOOP
        EXECUTE format('REFRESH MATERIALIZED VIEW %s', v.matview);
    END LOOP;
END \$\$"

log "timing ($RUNS runs each)"
incremental_ms=$(time_ms "$APPEND_SQL" "CALL customer_analytics.run_pipeline()")
full_ms=$(time_ms "$APPEND_SQL; SELECT sum(rows_affected) FROM customer_analytics.transform()" "$FULL_SQL")
# the model views the pipeline refits at most daily (refresh_policy), timed once each
models=$(bench_value "SELECT matview FROM customer_analytics.refresh_policy ORDER BY 1" | while read -r mv; do
    ms=$(bench_psql -At -c "SET customer_analytics.as_of = '2025-12-01'" -c '\timing on' \
             -c "REFRESH MATERIALIZED VIEW $mv" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1)
    echo "| \`$mv\` | $ms ms |"
done)
# the incrementally maintained part alone: the sales rollups and the views on them
SALES_VIEWS="REFRESH MATERIALIZED VIEW CONCURRENTLY customer_analytics.daily_sales;
REFRESH MATERIALIZED VIEW CONCURRENTLY customer_analytics.product_category_sales;
REFRESH MATERIALIZED VIEW CONCURRENTLY customer_analytics.anomalies"
TRANSFORM="SELECT sum(rows_affected) FROM customer_analytics.transform()"
sales_incremental_ms=$(time_ms "$APPEND_SQL; $TRANSFORM" "SELECT customer_analytics.refresh_sales_rollup(); $SALES_VIEWS")
sales_full_ms=$(time_ms "$APPEND_SQL; $TRANSFORM" "SELECT customer_analytics.refresh_sales_rollup(full_refresh => true); $SALES_VIEWS")
# the RFM scores alone: refresh_customer_rfm() after the same 1%, against
# rewriting every score from rfm() (the queue is drained before each append)
RFM_FULL="TRUNCATE customer_analytics.customer_rfm_score;
INSERT INTO customer_analytics.customer_rfm_score
    (customer_id, customer_key, last_purchase, frequency, monetary, r, f, m, rfm_cell, segment)
SELECT customer_id, customer_key, customer_analytics.reference_time() - recency_days * interval '86400 seconds',
       frequency, monetary, r, f, m, rfm_cell, segment
FROM customer_analytics.rfm(customer_analytics.reference_time())"
AS_OF="SET customer_analytics.as_of = '2025-12-01'"
rfm_incremental_ms=$(time_ms "$AS_OF; SELECT customer_analytics.refresh_customer_rfm(); $APPEND_SQL; $TRANSFORM" \
    "SELECT customer_analytics.refresh_customer_rfm()")
rfm_written=$(bench_value "$AS_OF; $APPEND_SQL; $TRANSFORM; SELECT customer_analytics.refresh_customer_rfm()" | tail -1)
rfm_full_ms=$(time_ms "$APPEND_SQL; $TRANSFORM" "$RFM_FULL")
status=$(bench_value "SELECT string_agg(DISTINCT status, ',') FROM customer_analytics.pipeline_run WHERE run_id > 1")
steps=$(bench_psql -At -F ' | ' -c "
    SELECT step, round(percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at) * 1000)::numeric, 1)
    FROM customer_analytics.pipeline_step WHERE run_id > 1 GROUP BY step, step_no ORDER BY step_no" | sed 's/^/| /; s/$/ ms |/')
lines=$(bench_value "SELECT count(*) FROM customer_analytics.fact_order_line")
# the same work as the baseline inside run_pipeline(): every step after the
# transform and the checks (the baseline runs the transform untimed, and
# has no checks)
refresh_part_ms=$(bench_value "
    SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1)
    FROM (SELECT run_id, sum(extract(epoch FROM finished_at - started_at) * 1000) AS ms
          FROM customer_analytics.pipeline_step
          WHERE run_id > 1 AND step NOT IN ('ingest', 'transform', 'checks', 'purge')
          GROUP BY run_id) r")
transform_checks_ms=$(bench_value "
    SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1)
    FROM (SELECT run_id, sum(extract(epoch FROM finished_at - started_at) * 1000) AS ms
          FROM customer_analytics.pipeline_step
          WHERE run_id > 1 AND step IN ('transform', 'checks')
          GROUP BY run_id) r")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

cat >"$BENCH_OUT/part_load.md" <<MD
# run_pipeline() after 1% new order lines, against a full refresh

A star schema of $LINES order lines (100,000 customers, 1,000 products in 12
categories, two years), growing by $APPEND new lines (1%) per run,
on the last day; $lines lines at the end. Median of $RUNS runs each,
shared_buffers = $BENCH_SHARED_BUFFERS.

| | median | ratio |
|---|---:|---:|
| full refresh: sales rollups rebuilt for every day, the same views refreshed (after the same transform) | $full_ms ms | 1.00 |
| \`CALL run_pipeline()\`: transform of the new lines, checks, rollup of the days touched, RFM of the customers touched, every view refreshed, alerts | $incremental_ms ms | $(ratio "$incremental_ms" "$full_ms") |
| the same runs without their transform and checks (the baseline's work done incrementally) | $refresh_part_ms ms | $(ratio "$refresh_part_ms" "$full_ms") |

Transform and checks of a run (not in the baseline): $transform_checks_ms ms.

The incrementally maintained part alone (the sales rollups, then
\`daily_sales\`, \`product_category_sales\` and \`anomalies\` refreshed
concurrently), after the same 1% appended and transformed:

| | median | ratio |
|---|---:|---:|
| rollups rebuilt from every order line | $sales_full_ms ms | 1.00 |
| rollups recomputed for the days touched | $sales_incremental_ms ms | $(ratio "$sales_incremental_ms" "$sales_full_ms") |

The RFM scores alone (\`customer_rfm\`), after the same 1% appended and
transformed (10,000 new orders of 10,000 customers: a tenth of them):

| | median | ratio |
|---|---:|---:|
| every score rewritten from \`rfm()\` | $rfm_full_ms ms | 1.00 |
| \`refresh_customer_rfm()\`: new orders added, every customer rescored from the rollup, changed rows written ($rfm_written) | $rfm_incremental_ms ms | $(ratio "$rfm_incremental_ms" "$rfm_full_ms") |

Pipeline runs: $status. Median time per step of \`run_pipeline()\`:

| step | median |
|---|---:|
$steps

Not in either line: the model views that \`refresh_policy\` refits at most
once a day (the pipeline skips them in between), each refreshed once here:

| view | refresh |
|---|---:|
$models

Reproduce: \`./bench/pipeline.sh\` (as root; RUNS, LINES, CUSTOMERS override the defaults).
MD
fi

# ---------------------------------------------------------------------------
# sizes: the same append on histories of 1x, 3x, 10x
# ---------------------------------------------------------------------------
BASE_CUSTOMERS=${BASE_CUSTOMERS:-3000}
SIZES=${SIZES:-"1 3 10"}
APPEND_LINES=${APPEND_LINES:-200}
APPEND_EVENTS=${APPEND_EVENTS:-2000}
SIZE_RUNS=${SIZE_RUNS:-3}

run_sizes() {
    local m customers
    load_before=$(cut -d' ' -f1 /proc/loadavg)
    : >"$BENCH_OUT/sizes.tsv"
    for m in $SIZES; do
        customers=$((BASE_CUSTOMERS * m))
        log "size ${m}x: $customers customers over a year"
        bench_psql -q <<SQL
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS customer_analytics CASCADE;
CREATE EXTENSION customer_analytics;
SELECT count(*) FROM customer_analytics.generate_sample_data(customers => $customers, days => 365, seed => 7,
    start_date => current_date - 366, defects => false);
SELECT count(*) FROM customer_analytics.transform();
VACUUM ANALYZE;
-- the first run builds everything; the second is a run with nothing new
CALL customer_analytics.run_pipeline();
CALL customer_analytics.run_pipeline();
SQL
        for r in $(seq "$SIZE_RUNS"); do
            bench_psql -q -c "SET client_min_messages = warning" -c "$(bench_day_append_sql "$r" "$APPEND_LINES" "$APPEND_EVENTS")" >/dev/null
            bench_psql -q -c "SET client_min_messages = warning" -c "CALL customer_analytics.run_pipeline()"
        done
        # the timed runs are the last SIZE_RUNS; total = the run's own time
        bench_psql -At -F $'\t' -c "
            WITH runs AS (SELECT run_id FROM customer_analytics.pipeline_run ORDER BY run_id DESC LIMIT $SIZE_RUNS),
            t AS (SELECT s.step, min(s.step_no) AS step_no,
                         percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM s.finished_at - s.started_at) * 1000) AS ms,
                         percentile_cont(0.5) WITHIN GROUP (ORDER BY s.rows_affected) AS n
                  FROM customer_analytics.pipeline_step s JOIN runs USING (run_id) GROUP BY s.step)
            SELECT $m, step_no, step, round(ms::numeric, 1), COALESCE(n::bigint::text, '') FROM t
            UNION ALL
            SELECT $m, 0, 'whole run', round(percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM r.finished_at - r.started_at) * 1000)::numeric, 1),
                   string_agg(DISTINCT r.status, ',')
            FROM customer_analytics.pipeline_run r JOIN runs USING (run_id)
            UNION ALL
            SELECT $m, -1, 'history', (SELECT count(*) FROM customer_analytics.fact_order_line),
                   (SELECT count(*) FROM customer_analytics.fact_event)::text
            UNION ALL
            SELECT $m, -2, 'checks over what changed', count(*) FILTER (WHERE q.incremental), count(*)::text
            FROM customer_analytics.quality_result q JOIN runs USING (run_id)
            UNION ALL
            SELECT $m, 100 + row_number() OVER (ORDER BY check_name), 'check: ' || check_name, round(ms::numeric, 1), ''
            FROM (SELECT q.check_name, percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM q.checked_at - q.prev) * 1000) AS ms
                  FROM (SELECT q.*, COALESCE(lag(q.checked_at) OVER (PARTITION BY q.run_id ORDER BY q.result_id), s.started_at) AS prev
                        FROM customer_analytics.quality_result q JOIN runs USING (run_id)
                        JOIN customer_analytics.pipeline_step s ON s.run_id = q.run_id AND s.step = 'checks') q
                  GROUP BY q.check_name) c
            UNION ALL
            SELECT $m, -3, 'checks over whole tables', 0,
                   COALESCE(string_agg(DISTINCT q.check_name || CASE WHEN q.passed THEN '' ELSE ' (failed)' END, ', '), 'none')
            FROM customer_analytics.quality_result q JOIN runs USING (run_id) WHERE NOT q.incremental" >>"$BENCH_OUT/sizes.tsv"
    done
    # one table: a row per step, a column per size, and each size's ratio to the first
    python3 - "$BENCH_OUT/sizes.tsv" "$SIZES" >"$BENCH_OUT/sizes_table.md" <<'PY'
import sys, collections
rows = [l.rstrip('\n').split('\t') for l in open(sys.argv[1]) if l.strip()]
sizes = sys.argv[2].split()
ms = collections.defaultdict(dict); extra = collections.defaultdict(dict); order = {}
for m, no, step, v, n in rows:
    ms[step][m] = float(v); extra[step][m] = n; order.setdefault(step, int(no))
base = sizes[0]
print('| step | ' + ' | '.join(f'{s}x' for s in sizes) + ' | ' + ' | '.join(f'{s}x / {base}x' for s in sizes[1:]) + ' |')
print('|---|' + '---:|' * (2 * len(sizes) - 1))
def fmt(step):
    cells = [f"{ms[step].get(s, float('nan')):.1f} ms" for s in sizes]
    ratios = []
    for s in sizes[1:]:
        a, b = ms[step].get(s), ms[step].get(base)
        ratios.append(f'{a / b:.2f}' if a is not None and b else 'n/a')
    return f'| {step} | ' + ' | '.join(cells) + ' | ' + ' | '.join(ratios) + ' |'
for step in sorted((s for s in ms if 0 < order[s] < 100), key=lambda s: order[s]):
    print(fmt(step))
print(fmt('whole run').replace('| whole run |', '| **whole run** |'))
print()
print('The checks step, check by check (from quality_result.checked_at):')
print()
print('| check | ' + ' | '.join(f'{s}x' for s in sizes) + ' | ' + ' | '.join(f'{s}x / {base}x' for s in sizes[1:]) + ' |')
print('|---|' + '---:|' * (2 * len(sizes) - 1))
for step in sorted((s for s in ms if order[s] >= 100), key=lambda s: order[s]):
    print(fmt(step).replace('| check: ', '| ', 1))
print()
print('History (order lines / events): ' + ', '.join(f"{s}x {int(ms['history'][s]):,} / {int(extra['history'][s]):,}" for s in sizes) + '.')
print('Checks run over what changed in the timed runs: ' + ', '.join(f"{s}x {int(ms['checks over what changed'][s])} of {extra['checks over what changed'][s]}" for s in sizes) + '.')
print('Checks over whole tables: ' + '; '.join(f"{s}x {extra['checks over whole tables'][s]}" for s in sizes) + '.')
print('Runs: ' + ', '.join(f"{s}x {extra['whole run'][s]}" for s in sizes) + '.')
PY
    local ratio
    ratio=$(awk -F'\t' -v last="${SIZES##* }" -v first="${SIZES%% *}" '$3 == "whole run" { t[$1] = $4 } END { printf "%.2f", t[last] / t[first] }' "$BENCH_OUT/sizes.tsv")
    cat >"$BENCH_OUT/part_sizes.md" <<MD
<!-- part: sizes -->
## The same append on histories of ${SIZES// /x, }x

A generated shop of $BASE_CUSTOMERS customers x 365 days (${SIZES%% *}x), and shops of $(echo "${SIZES#* }" | sed 's/ / and /g') times as
many customers over the same year (\`generate_sample_data(seed => 7)\`,
ending yesterday), each built by a first \`run_pipeline()\`. Then, $SIZE_RUNS times,
the same append: one day of $APPEND_LINES order lines of existing customers and
$APPEND_EVENTS events (today), and \`CALL run_pipeline()\`. Median time of each
step over the $SIZE_RUNS runs, per size; the baseline of each ratio is the
same step on the 1x history, measured in the same run of this script.
shared_buffers = $BENCH_SHARED_BUFFERS. Load average of the (shared) machine
before and after: $load_before / $(cut -d' ' -f1 /proc/loadavg).

**${SIZES##* }x / ${SIZES%% *}x, whole run: $ratio** (target: at most 1.5).

$(cat "$BENCH_OUT/sizes_table.md")

Reproduce: \`PART=sizes ./bench/pipeline.sh\` (as root; BASE_CUSTOMERS, SIZES,
APPEND_LINES, APPEND_EVENTS, SIZE_RUNS override the defaults).
MD
}

if [ "$PART" != load ]; then
    run_sizes
fi

# the part not run keeps its section of the previous results
old=$BENCH_DIR/results/pipeline.md
if [ ! -f "$BENCH_OUT/part_load.md" ] || [ "$PART" = sizes ]; then
    if [ -f "$old" ]; then
        sed -e '1d' -e '/^Machine: /d' -e '/^<!-- part: sizes -->/,$d' "$old" >"$BENCH_OUT/part_load.md"
    else
        : >"$BENCH_OUT/part_load.md"
    fi
fi
if [ "$PART" = load ]; then
    if [ -f "$old" ] && grep -q '^<!-- part: sizes -->' "$old"; then
        sed -n '/^<!-- part: sizes -->/,$p' "$old" | sed '/^Machine: /d' >"$BENCH_OUT/part_sizes.md"
    else
        : >"$BENCH_OUT/part_sizes.md"
    fi
fi
cat "$BENCH_OUT/part_load.md" "$BENCH_OUT/part_sizes.md" | bench_record pipeline
