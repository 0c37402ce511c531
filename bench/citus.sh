#!/usr/bin/env bash
# The same generated shop on a Citus cluster (a coordinator and two workers
# on localhost, distribute()d) and on a single node (plain PostgreSQL, same
# build and settings), measured in the same run, each line's baseline the
# single node:
#
#   ingest:    ingest_csv() of the same CSV of order lines: on the cluster
#              into a local landing table then INSERT ... SELECT into the
#              distributed staging (the documented path: ingest_csv refuses
#              Citus tables), on the single node into its staging; rows/s
#   rfm:       rfm() on a view over the facts; rfm_agg per customer with
#              Citus's aggregate push-down (partial states on the workers)
#              and with the rows pulled to the coordinator first (a
#              materialized CTE), and the rows and bytes each ships to the
#              coordinator (EXPLAIN ANALYZE)
#   anomalies: detect_anomalies() over a daily query on the facts;
#              stats_agg per product pushed down and pulled, and
#              median_mad_agg per product (it cannot be pushed down), with
#              the rows and bytes shipped
#   pipeline:  CALL run_pipeline() after a day appended to the staging,
#              each step's median time and status; then the pipeline's
#              steps one by one after another appended day, so that the
#              steps that work on the cluster are timed even where the run
#              itself stops at a failing step (reported "fails: <error>")
#
# On this machine the workers share the coordinator's cores: the ratios say
# what the cluster's plans cost here (distribution, shipping, combining),
# not what more machines would gain.  Each answer is also compared with the
# single node's ("same answer").
#
# Environment: SCALE (customers, default 20000; BIG=1: 200000), DAYS (365),
# SHARDS (distribute()'s shard count, 4), RUNS (medians of, 5), PIPE_RUNS
# (appended days per pipeline part, 3), BENCH_PORT (the coordinator; the
# workers and the single node take the next three ports), BENCH_OUT.
# Citus is built from the vendored release when missing (scripts/citus.sh).
set -euo pipefail
BENCH_SHARED_BUFFERS=${BENCH_SHARED_BUFFERS:-256MB}
. "$(dirname "$0")/lib.sh"
ensure_root "$@"
RUNS=${RUNS:-5}
PIPE_RUNS=${PIPE_RUNS:-3}
BIG=${BIG:-0}
if [ "$BIG" = 1 ]; then SCALE=${SCALE:-200000}; else SCALE=${SCALE:-20000}; fi
DAYS=${DAYS:-365}
SHARDS=${SHARDS:-4}
SEED=17

install_packages
build_and_install || die "build failed"
PG_CONFIG=$PG_CONFIG "$REPO/scripts/citus.sh" || die "Citus is not available for $PG_CONFIG (see above): no cluster to measure"

NODES=(coordinator worker1 worker2 single)
node_port() {
    case $1 in
        coordinator) echo "$BENCH_PORT" ;;
        worker1) echo $((BENCH_PORT + 1)) ;;
        worker2) echo $((BENCH_PORT + 2)) ;;
        single) echo $((BENCH_PORT + 3)) ;;
    esac
}

node_stop() {
    as_pg_user "$PG_BINDIR/pg_ctl" -D "$BENCH_OUT/$1" -m fast stop >/dev/null 2>&1 || true
}
stop_all() {
    local n
    for n in "${NODES[@]}"; do node_stop "$n"; done
}

# Every node with the same settings; Citus connects to the nodes (and the
# coordinator to itself) over TCP.  The single node is plain PostgreSQL:
# Citus is not even loaded there.
node_start() {
    local name=$1 data=$BENCH_OUT/$1 preload='citus,pg_cron'
    [ "$name" = single ] && preload=pg_cron
    node_stop "$name"
    rm -rf "$data"
    as_pg_user "$PG_BINDIR/initdb" -D "$data" -A trust -U postgres -E UTF8 --locale=C.UTF-8 >/dev/null
    cat >>"$data/postgresql.conf" <<CONF
port = $(node_port "$name")
listen_addresses = '127.0.0.1'
unix_socket_directories = '$BENCH_OUT'
shared_preload_libraries = '$preload'
cron.database_name = 'bench'
shared_buffers = '$BENCH_SHARED_BUFFERS'
work_mem = '64MB'
maintenance_work_mem = '256MB'
max_wal_size = '8GB'
checkpoint_timeout = '30min'
max_parallel_workers_per_gather = 2
max_prepared_transactions = 20
max_worker_processes = 32
jit = off
CONF
    [ "$name" = single ] || echo "citus.node_conninfo = 'sslmode=disable'" >>"$data/postgresql.conf"
    echo "host all all 127.0.0.1/32 trust" >>"$data/pg_hba.conf"
    as_pg_user "$PG_BINDIR/pg_ctl" -D "$data" -l "$BENCH_OUT/$name.log" -w start >/dev/null
}

# on NODE [psql args]: psql on NODE's bench database, stopping on errors
on() {
    local name=$1
    shift
    as_pg_user psql -X -v ON_ERROR_STOP=1 -h "$BENCH_OUT" -p "$(node_port "$name")" -U postgres -d bench "$@"
}
value() { on "$1" -q -At -c "SET client_min_messages = warning" -c "$2"; }

mkdir -p "$BENCH_OUT"
chown "$PG_OS_USER" "$BENCH_OUT"
trap stop_all EXIT
log "starting a coordinator, two workers and a single node (ports $BENCH_PORT-$((BENCH_PORT + 3)))"
for n in "${NODES[@]}"; do node_start "$n"; done
for n in "${NODES[@]}"; do
    as_pg_user psql -X -q -h "$BENCH_OUT" -p "$(node_port "$n")" -U postgres -d postgres -c "CREATE DATABASE bench"
    [ "$n" = single ] || on "$n" -q -c "CREATE EXTENSION citus"
done
on coordinator -q -c "SELECT citus_set_coordinator_host('127.0.0.1', $(node_port coordinator))" \
    -c "SELECT citus_add_node('127.0.0.1', $(node_port worker1))" \
    -c "SELECT citus_add_node('127.0.0.1', $(node_port worker2))" >/dev/null
[ "$(value coordinator "SELECT count(*) FROM citus_get_active_worker_nodes()")" = 2 ] || die "the cluster has not two workers"
for n in coordinator single; do
    on "$n" -q -f "$BENCH_DIR/lib.sql"
    on "$n" -q -c "SET client_min_messages = warning" -c "CREATE EXTENSION customer_analytics CASCADE"
done

# ---------------------------------------------------------------------------
# the same shop on both, loaded, transformed and built by a first pipeline
# run on the single-node layout; then the cluster's is distribute()d
# ---------------------------------------------------------------------------
START=$(value single "SELECT current_date - $DAYS - 1")
# (run_pipeline() commits: a statement of its own)
load_shop() {
    on "$1" -q -At -c "SET client_min_messages = warning" \
        -c "SELECT string_agg(target || '=' || rows, ' ' ORDER BY target)
            FROM customer_analytics.generate_sample_data(customers => $SCALE, days => $DAYS, seed => $SEED,
                                                         start_date => '$START', defects => false)" \
        -c "SELECT sum(rows_affected) FROM customer_analytics.transform()" \
        -c "CALL customer_analytics.run_pipeline()" \
        -c "SELECT status FROM customer_analytics.pipeline_run ORDER BY run_id DESC LIMIT 1"
}
log "loading $SCALE customers over $DAYS days on both (seed $SEED)"
load_shop coordinator >"$BENCH_OUT/load_cluster.txt" &
load_pid=$!
load_shop single >"$BENCH_OUT/load_single.txt" || { wait "$load_pid" || true; die "loading the single node's shop failed"; }
wait "$load_pid" || die "loading the cluster's shop failed"
cmp -s "$BENCH_OUT/load_cluster.txt" "$BENCH_OUT/load_single.txt" || die "the two shops were loaded differently"
[ "$(tail -1 "$BENCH_OUT/load_single.txt")" = succeeded ] || die "the first pipeline run failed"
generated=$(head -1 "$BENCH_OUT/load_single.txt")

log "distribute(shard_count => $SHARDS)"
distribute_s=$(on coordinator -At -c "SET client_min_messages = warning" -c '\timing on' \
    -c "SELECT count(*) FROM customer_analytics.distribute(shard_count => $SHARDS)" \
    | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | awk '{ printf "%.1f", $1 / 1000 }')
for n in coordinator single; do on "$n" -q -c "VACUUM ANALYZE"; done
lines=$(value single "SELECT count(*) FROM customer_analytics.fact_order_line")
[ "$(value coordinator "SELECT count(*) FROM customer_analytics.fact_order_line")" = "$lines" ] \
    || die "the cluster does not hold the single node's order lines"
events=$(value single "SELECT count(*) FROM customer_analytics.fact_event")
customers=$(value single "SELECT count(DISTINCT customer_id) FROM customer_analytics.dim_customer WHERE customer_key > 0")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "n/a"; else printf "%.2f", a / b }'; }
fmt_ms() { awk -v a="$1" 'BEGIN { printf "%.1f ms", a }'; }

# bench_time NODE LABEL SQL [SETUP]: median ms over RUNS (bench.time)
bench_time() {
    local setup=${4:-}
    value "$1" "SELECT round(bench.time('$2', \$bench\$$3\$bench\$, $RUNS,
        $([ -n "$setup" ] && echo "\$bench\$$setup\$bench\$" || echo NULL))::numeric, 1)"
}
# same NODE-SQL: the md5 of the rows, to compare the answers
# same SQL: does the cluster answer as the single node does?  "yes": the
# same rows, byte for byte; "yes, to 1e-9": the same but for floating-point
# numbers within 1e-9 of each other, relatively (the shards' partial sums
# of stats_agg, added up, may differ in the last digits from one running
# sum, and so may a sum over rows that arrive in another order)
same() {
    local n
    for n in coordinator single; do
        value "$n" "SELECT r::text FROM ($1) r ORDER BY 1" >"$BENCH_OUT/answer_$n.txt"
    done
    if cmp -s "$BENCH_OUT/answer_coordinator.txt" "$BENCH_OUT/answer_single.txt"; then
        echo yes
        return
    fi
    python3 - "$BENCH_OUT/answer_coordinator.txt" "$BENCH_OUT/answer_single.txt" <<'PY'
import re, sys, math
num = re.compile(r'-?\d+(?:\.\d+)?(?:e[-+]?\d+)?')
a, b = (open(f).read().splitlines() for f in sys.argv[1:3])
def close(x, y):
    xs, ys = num.split(x), num.split(y)
    xn, yn = num.findall(x), num.findall(y)
    return xs == ys and len(xn) == len(yn) and all(
        u == v or math.isclose(float(u), float(v), rel_tol=1e-9, abs_tol=1e-9) for u, v in zip(xn, yn))
print('yes, to 1e-9' if len(a) == len(b) and a and all(close(x, y) for x, y in zip(a, b)) else '**no**')
PY
}

# shipped SQL: "rows | bytes" that the coordinator receives from the
# workers to run SQL: Citus's plan (EXPLAIN VERBOSE, every task shown), each
# task that reads shards on a worker re-run there, its rows counted and
# their size in text form (Citus's own counter, EXPLAIN ANALYZE's "Tuple
# data received from nodes", fails on pushed-down partial aggregates in
# Citus 13.2: "column field_1 has pseudo-type cstring"; and it counts the
# binary form where the types have one).  The coordinator's own tasks
# (reading intermediate results, reference tables) are not shipped.
shipped() {
    local port query rows=0 bytes=0 r
    on coordinator -q -At -c "SET citus.explain_all_tasks = on" -c "EXPLAIN (VERBOSE, COSTS OFF) $1" >"$BENCH_OUT/explain.txt"
    awk '/^ *Query: / { sub(/^ *Query: /, ""); q = $0; next }
         /^ *Node: host=/ { match($0, /port=[0-9]+/); print substr($0, RSTART + 5, RLENGTH - 5) "\t" q }' \
        "$BENCH_OUT/explain.txt" >"$BENCH_OUT/tasks.tsv"
    while IFS=$'\t' read -r port query; do
        [ "$port" = "$BENCH_PORT" ] && continue
        as_pg_user psql -X -q -At -F '' -v ON_ERROR_STOP=1 -h "$BENCH_OUT" -p "$port" -U postgres -d bench \
            -c "$query" >"$BENCH_OUT/task.out" </dev/null
        r=$(wc -l <"$BENCH_OUT/task.out")
        rows=$((rows + r))
        bytes=$((bytes + $(wc -c <"$BENCH_OUT/task.out") - r))
    done <"$BENCH_OUT/tasks.tsv"
    echo "$rows | $bytes"
}

# ---------------------------------------------------------------------------
# ingest: the same CSV of order lines through the coordinator and into the
# single node; order ids prefixed 'I-' so that they are deleted between runs
# ---------------------------------------------------------------------------
CSV=$BENCH_OUT/orders.csv
STG_COLS="order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel"
on single -q -c "COPY (SELECT 'I-' || order_id AS order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel
                      FROM customer_analytics.stg_orders ORDER BY stage_id) TO '$CSV' WITH (FORMAT csv, HEADER)"
csv_rows=$(($(wc -l <"$CSV") - 1))
on coordinator -q -c "CREATE TABLE public.orders_landing (LIKE customer_analytics.stg_orders INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
log "ingest: $csv_rows rows ($RUNS runs each)"
INGEST="SELECT rows_loaded FROM customer_analytics.ingest_csv('%s', '$CSV', force => true)"
# shellcheck disable=SC2059
ingest_cluster_ms=$(bench_time coordinator ingest_cluster \
    "$(printf "$INGEST" public.orders_landing); INSERT INTO customer_analytics.stg_orders ($STG_COLS) SELECT $STG_COLS FROM public.orders_landing" \
    "TRUNCATE public.orders_landing; DELETE FROM customer_analytics.stg_orders WHERE order_id LIKE 'I-%'")
# shellcheck disable=SC2059
ingest_landing_ms=$(bench_time coordinator ingest_landing "$(printf "$INGEST" public.orders_landing)" "TRUNCATE public.orders_landing")
# shellcheck disable=SC2059
ingest_single_ms=$(bench_time single ingest_single "$(printf "$INGEST" customer_analytics.stg_orders)" \
    "DELETE FROM customer_analytics.stg_orders WHERE order_id LIKE 'I-%'")
staged_cluster=$(value coordinator "SELECT count(*) FROM customer_analytics.stg_orders WHERE order_id LIKE 'I-%'")
staged_single=$(value single "SELECT count(*) FROM customer_analytics.stg_orders WHERE order_id LIKE 'I-%'")
on coordinator -q -c "DELETE FROM customer_analytics.stg_orders WHERE order_id LIKE 'I-%'; DROP TABLE public.orders_landing"
on single -q -c "DELETE FROM customer_analytics.stg_orders WHERE order_id LIKE 'I-%'"
rate() { awk -v n="$csv_rows" -v ms="$1" 'BEGIN { printf "%.0f", n / (ms / 1000) }'; }

# ---------------------------------------------------------------------------
# rfm and anomalies
# ---------------------------------------------------------------------------
COMPLETED_LINE="CREATE VIEW public.completed_line AS
    SELECT c.customer_id, f.order_id, f.order_ts, f.revenue
    FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_customer c USING (customer_key)
    WHERE f.status = 'completed' AND f.customer_key <> -1"
on coordinator -q -c "$COMPLETED_LINE"
on single -q -c "$COMPLETED_LINE"
AS_OF=$(value single "SELECT current_date")

# rfm() of the star schema reads the facts through one query on a cluster
# (src/rfm.c): per customer, which the layout by customer_ref runs whole on
# the workers; and, for comparison, the query it ran while the facts were
# distributed by order_id (per customer version and order, the versions
# collapsed on the coordinator), which on the layout by customer Citus
# splits between the workers and the coordinator
RFM_WHERE="WHERE f.status = 'completed' AND f.customer_key <> -1 AND f.order_ts <= '$AS_OF'
      AND NOT (f.quantity < 0 AND (f.revenue IS NULL OR f.revenue = 0))"
RFM_BY_CUSTOMER="SELECT min(f.customer_key), count(DISTINCT f.order_id) FILTER (WHERE f.revenue >= 0), sum(f.revenue),
       min(f.order_ts) FILTER (WHERE f.revenue >= 0), max(f.order_ts) FILTER (WHERE f.revenue >= 0),
       count(DISTINCT f.order_id) FILTER (WHERE f.revenue < 0)
    FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_customer c ON c.customer_key = f.customer_key
    $RFM_WHERE GROUP BY f.customer_ref, c.customer_id"
RFM_BY_ORDER="SELECT f.customer_key, f.order_id, min(f.order_ts), max(f.order_ts), sum(f.revenue)
    FROM customer_analytics.fact_order_line f $RFM_WHERE GROUP BY f.customer_key, f.order_id, f.revenue < 0"

# label | SQL: each timed on both; Citus's plan for the cluster
QUERIES=(
    "rfm() on a view over the facts|SELECT * FROM customer_analytics.rfm('$AS_OF', 'public.completed_line', customer_column => 'customer_id', ts_column => 'order_ts', amount_column => 'revenue', order_column => 'order_id') @@ SELECT customer_id, order_id, order_ts, revenue FROM public.completed_line"
    "rfm_agg per customer, pushed down|SELECT customer_id, customer_analytics.rfm_agg(order_ts, revenue)::text FROM public.completed_line GROUP BY customer_id"
    "rfm_agg per customer, rows pulled to the coordinator|WITH l AS MATERIALIZED (SELECT customer_id, order_ts, revenue FROM public.completed_line) SELECT customer_id, customer_analytics.rfm_agg(order_ts, revenue)::text FROM l GROUP BY customer_id"
    "detect_anomalies() over daily revenue|SELECT * FROM customer_analytics.detect_anomalies(\$q\$SELECT 'revenue', order_ts::date::timestamptz, sum(revenue)::float8 FROM customer_analytics.fact_order_line WHERE status = 'completed' GROUP BY 2\$q\$, window_size => 28, min_history => 28) @@ SELECT 'revenue', order_ts::date::timestamptz, sum(revenue)::float8 FROM customer_analytics.fact_order_line WHERE status = 'completed' GROUP BY 2"
    "stats_agg per product, pushed down|SELECT product_key, customer_analytics.stats_agg(revenue::float8)::text FROM customer_analytics.fact_order_line WHERE status = 'completed' GROUP BY product_key"
    "stats_agg per product, rows pulled to the coordinator|WITH l AS MATERIALIZED (SELECT product_key, revenue FROM customer_analytics.fact_order_line WHERE status = 'completed') SELECT product_key, customer_analytics.stats_agg(revenue::float8)::text FROM l GROUP BY product_key"
    "median_mad_agg per product (not pushed down)|SELECT product_key, customer_analytics.median_mad_agg(revenue::float8)::text FROM customer_analytics.fact_order_line WHERE status = 'completed' GROUP BY product_key"
    "rfm() of the star schema: its inputs per customer, grouped by customer_ref whole on the workers|SELECT * FROM customer_analytics.rfm('$AS_OF') @@ $RFM_BY_CUSTOMER"
    "rfm()'s inputs per customer version and order (what it read with the facts by order_id), on the layout by customer|$RFM_BY_ORDER"
)
log "rfm and anomalies ($RUNS runs each)"
: >"$BENCH_OUT/queries.md"
n=0
declare -a q_ratio q_rows
for q in "${QUERIES[@]}"; do
    n=$((n + 1))
    label=${q%%|*}
    sql=${q#*|}
    ship=$sql
    case $sql in *' @@ '*) ship=${sql#* @@ }; sql=${sql%% @@ *} ;; esac
    c=$(bench_time coordinator "q$n" "$sql")
    s=$(bench_time single "q$n" "$sql")
    q_ratio[n]=$(ratio "$c" "$s")
    q_rows[n]=$(shipped "$ship")
    printf '| %s | %s | %s | %s | %s | %s |\n' "$label" "$(fmt_ms "$s")" "$(fmt_ms "$c")" "${q_ratio[n]}" \
        "${q_rows[n]}" "$(same "$sql")" >>"$BENCH_OUT/queries.md"
    cp "$BENCH_OUT/explain.txt" "$BENCH_OUT/explain_q$n.txt"
done

# ---------------------------------------------------------------------------
# the pipeline after a day appended: the run, then its steps one by one
# ---------------------------------------------------------------------------
# one day of the shop (today), the same on both (bench_day_append_sql)
DAY_LINES=$((SCALE / 20))
DAY_EVENTS=$((DAY_LINES * 10))

log "pipeline: a run with nothing new on both, then $PIPE_RUNS appended days, each followed by run_pipeline()"
for n in coordinator single; do
    on "$n" -q -c "SET client_min_messages = warning" -c "CALL customer_analytics.run_pipeline()"
done
first_cluster=$(value coordinator "SELECT max(run_id) + 1 FROM customer_analytics.pipeline_run")
first_single=$(value single "SELECT max(run_id) + 1 FROM customer_analytics.pipeline_run")
for r in $(seq "$PIPE_RUNS"); do
    for n in coordinator single; do
        on "$n" -q -c "SET client_min_messages = warning" -c "$(bench_day_append_sql "$r" "$DAY_LINES" "$DAY_EVENTS")"
        on "$n" -q -c "SET client_min_messages = warning" -c "CALL customer_analytics.run_pipeline()"
    done
done
# node first_run: "step \t step_no \t median ms \t statuses \t first error"
pipeline_steps() {
    value "$1" "
        SELECT s.step, min(s.step_no),
               round(percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM s.finished_at - s.started_at) * 1000)::numeric, 1),
               string_agg(DISTINCT s.status, ','),
               COALESCE(min(regexp_replace(s.error, E'\\\\s+', ' ', 'g')), '')
        FROM customer_analytics.pipeline_step s WHERE s.run_id >= $2 GROUP BY s.step
        UNION ALL
        SELECT '~whole run', 1000000,
               round(percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM r.finished_at - r.started_at) * 1000)::numeric, 1),
               string_agg(DISTINCT r.status, ','), ''
        FROM customer_analytics.pipeline_run r WHERE r.run_id >= $2" | tr '|' '\t'
}
pipeline_steps coordinator "$first_cluster" >"$BENCH_OUT/run_cluster.tsv"
pipeline_steps single "$first_single" >"$BENCH_OUT/run_single.tsv"

# the steps one by one, each in its own transaction, as the pipeline runs
# them (its run id for the steps that take one), failures recorded.  The
# module is loaded first: the purge step reads a setting that only exists
# once it is (run_pipeline() has always loaded it by then)
: >"$BENCH_OUT/steps_cluster.tsv"
: >"$BENCH_OUT/steps_single.tsv"
value single "SELECT step_no, step, command FROM customer_analytics.pipeline_plan() ORDER BY step_no" | tr '|' '\t' >"$BENCH_OUT/plan.tsv"
log "pipeline: its $(wc -l <"$BENCH_OUT/plan.tsv") steps one by one after $PIPE_RUNS more appended days"
for r in $(seq "$PIPE_RUNS"); do
    for n in coordinator single; do
        on "$n" -q -c "SET client_min_messages = warning" -c "$(bench_day_append_sql "s$r" "$DAY_LINES" "$DAY_EVENTS")"
        run_id=$(value "$n" "SELECT max(run_id) FROM customer_analytics.pipeline_run")
        while IFS=$'\t' read -r no step command; do
            out=$(on "$n" -q -At -c "SET client_min_messages = warning" -c "LOAD '\$libdir/customer_analytics'" -c '\timing on' \
                -c "DO \$do\$ BEGIN EXECUTE \$c\$$command\$c\$ USING $run_id::bigint; END \$do\$" 2>&1) && rc=0 || rc=$?
            if [ "$rc" -eq 0 ]; then
                printf '%s\t%s\t%s\t\n' "$no" "$step" "$(printf '%s\n' "$out" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1)"
            else
                printf '%s\t%s\t\t%s\n' "$no" "$step" "$(printf '%s\n' "$out" | sed -n 's/^.*ERROR: *//p' | head -1 | tr '|\t' '/ ')"
            fi
        done <"$BENCH_OUT/plan.tsv" >>"$BENCH_OUT/steps_$([ $n = single ] && echo single || echo cluster).tsv"
    done
done

# one table per part: a row per step, the single node's median, the
# cluster's (or its failure), the ratio
python3 - "$BENCH_OUT" >"$BENCH_OUT/pipeline.md" <<'PY'
import sys, statistics, collections
out = sys.argv[1]
def median(v):
    return statistics.median(v) if v else None
def runs(name):
    d = {}
    for l in open(f'{out}/run_{name}.tsv'):
        step, no, ms, status, err = (l.rstrip('\n').split('\t') + [''] * 5)[:5]
        d[step] = (int(no), float(ms) if ms else None, status, err)
    return d
def short(err):
    # the first sentence of an error: its message, without Citus's hint
    return err.split(' (')[0][:200]
def cell(ms, status='succeeded', err=''):
    if err and 'succeeded' not in status:
        return f'{status}: {short(err)}'
    s = f'{ms:.1f} ms' if ms is not None else ''
    return s if status in ('succeeded', '') else f'{s} ({status})'
def ratio(c, s):
    return f'{c / s:.2f}' if c is not None and s else 'n/a'
c, s = runs('cluster'), runs('single')
print('| step | single node | cluster | cluster / single |')
print('|---|---:|---:|---:|')
for step in sorted(set(c) | set(s), key=lambda k: (s.get(k) or c.get(k))[0]):
    sn, sms, sst, serr = s.get(step, (0, None, 'absent', ''))
    cn, cms, cst, cerr = c.get(step, (0, None, 'absent', ''))
    name = '**whole run**' if step == '~whole run' else f'`{step}`'
    ok = 'succeeded' in cst and 'succeeded' in sst
    print(f'| {name} | {cell(sms, sst, serr)} | {cell(cms, cst, cerr)} | {ratio(cms, sms) if ok else "n/a"} |')
print()
print('STEPS')
print()
def steps(name):
    ms, err, order = collections.defaultdict(list), {}, {}
    for l in open(f'{out}/steps_{name}.tsv'):
        no, step, t, e = (l.rstrip('\n').split('\t') + [''] * 4)[:4]
        order[step] = int(no)
        if e:
            err[step] = e
        elif t:
            ms[step].append(float(t))
    return ms, err, order
cm, ce, order = steps('cluster')
sm, se, _ = steps('single')
print('| step | single node | cluster | cluster / single |')
print('|---|---:|---:|---:|')
for step in sorted(order, key=order.get):
    sv, cv = median(sm[step]), median(cm[step])
    sc = f'fails: {short(se[step])}' if step in se else f'{sv:.1f} ms'
    cc = f'fails: {short(ce[step])}' if step in ce else f'{cv:.1f} ms'
    print(f'| `{step}` | {sc} | {cc} | {ratio(cv, sv) if step not in ce and step not in se else "n/a"} |')
both = [st for st in order if st not in ce and st not in se]
fails = [st for st in order if st in ce and st not in se]
bs, bc = sum(median(sm[st]) for st in both), sum(median(cm[st]) for st in both)
print(f'| **the {len(both)} steps that run on both** | {bs:.1f} ms | {bc:.1f} ms | {ratio(bc, bs)} |')
w = c.get('~whole run')
first_fail = next((k for k in sorted(c, key=lambda k: c[k][0]) if c[k][2] == 'failed'), None)
with open(f'{out}/pipeline_summary.txt', 'w') as f:
    if w and w[2] == 'succeeded':
        f.write(f'{ratio(w[1], s["~whole run"][1])}x the time\n')
    else:
        f.write(f'fails (first failed step: `{first_fail}`: {short(c[first_fail][3]) if first_fail else "?"})\n')
    f.write(f'{ratio(bc, bs)}x the time ({len(both)} of {len(order)} steps run on both)\n')
print(f'| the {len(fails)} steps that fail on the cluster, single node | {sum(median(sm[st]) for st in fails):.1f} ms | | |')
PY

# ---------------------------------------------------------------------------
load_avg=$(cut -d' ' -f1-3 /proc/loadavg)
{
    cat <<MD
# The shop on a Citus cluster against a single node

A coordinator and two workers on localhost (Citus $(value coordinator "SELECT extversion FROM pg_extension WHERE extname = 'citus'"),
\`distribute(shard_count => $SHARDS)\`) and a single node (plain PostgreSQL,
Citus not loaded), each a server of its own with the same settings
(shared_buffers = $BENCH_SHARED_BUFFERS), all on this machine's $(nproc) cores: the
workers share the coordinator's cores, so the ratios say what the cluster's
plans cost here (distributing, shipping rows, combining), not what more
machines would gain. The same shop on both: \`generate_sample_data(customers
=> $SCALE, days => $DAYS, seed => $SEED, defects => false)\` ($generated),
transformed and built by a first \`run_pipeline()\` on the single-node
layout, then converted by \`distribute()\` on the cluster ($distribute_s s):
$lines order lines, $events events, $customers customers. Medians of $RUNS runs
(\`bench.time()\`, on the server) unless said otherwise; every baseline is
the single node, measured in the same run. Load average of the (shared)
machine at the end: $load_avg.

## Summary (cluster / single node, same run)

| what | cluster / single node |
|---|---|
| ingest rows/s, \`ingest_csv()\` + \`INSERT ... SELECT\` through the coordinator | $(ratio "$ingest_single_ms" "$ingest_cluster_ms")x the rate |
| \`rfm()\` on a view over the facts (every row shipped) | ${q_ratio[1]}x the time |
| \`rfm_agg\` per customer, pushed down / pulled (rows shipped: ${q_rows[2]%% |*} / ${q_rows[3]%% |*}) | ${q_ratio[2]}x / ${q_ratio[3]}x the time |
| \`detect_anomalies()\` over daily revenue | ${q_ratio[4]}x the time |
| \`stats_agg\` per product, pushed down / pulled (rows shipped: ${q_rows[5]%% |*} / ${q_rows[6]%% |*}) | ${q_ratio[5]}x / ${q_ratio[6]}x the time |
| \`median_mad_agg\` per product (always pulled) | ${q_ratio[7]}x the time |
| \`rfm()\` of the star schema (rows shipped: ${q_rows[8]%% |*}, one per customer, grouped whole on the workers by \`customer_ref\`) | ${q_ratio[8]}x the time |
| its inputs per customer version and order, as read with the facts by \`order_id\` (rows shipped: ${q_rows[9]%% |*}) | ${q_ratio[9]}x the time |
| \`CALL run_pipeline()\` after a day appended | $(sed -n 1p "$BENCH_OUT/pipeline_summary.txt") |
| its steps one by one, those that run on both | $(sed -n 2p "$BENCH_OUT/pipeline_summary.txt") |

## Ingest: rows/s through the coordinator and into a single node

The same CSV of $csv_rows order lines (the generated staging, written with
\`COPY TO\`). \`ingest_csv()\` refuses Citus tables, so on the cluster it
loads a local landing table on the coordinator, then \`INSERT ... SELECT\`
routes the rows to the shards of the distributed \`stg_orders\`.

| | median | rows/s | ratio |
|---|---:|---:|---:|
| single node: \`ingest_csv()\` into \`stg_orders\` | $(fmt_ms "$ingest_single_ms") | $(rate "$ingest_single_ms") | 1.00 |
| cluster: \`ingest_csv()\` into the landing table, then \`INSERT ... SELECT\` into the distributed \`stg_orders\` | $(fmt_ms "$ingest_cluster_ms") | $(rate "$ingest_cluster_ms") | $(ratio "$ingest_cluster_ms" "$ingest_single_ms") |
| of which \`ingest_csv()\` into the landing table alone | $(fmt_ms "$ingest_landing_ms") | $(rate "$ingest_landing_ms") | $(ratio "$ingest_landing_ms" "$ingest_single_ms") |

Rows staged by the last run: $staged_cluster on the cluster, $staged_single on the single node.
The \`INSERT ... SELECT\` alone is the difference of the two cluster lines:
Citus reads the landing table on the coordinator and copies the rows to
the shards over the workers' connections.

## rfm() and the anomaly detection, with and without aggregate push-down

"Pushed down": Citus's own plan, partial aggregates on the workers' shards,
combined on the coordinator (\`worker_partial_agg\` / \`coord_combine_agg\`).
"Pulled": the same aggregate over a \`MATERIALIZED\` CTE of its input rows,
which Citus runs first and ships whole to the coordinator.
\`median_mad_agg\` has no combine function, so Citus always pulls its rows.
Rows and bytes shipped: what the coordinator receives from the workers to
answer: every task of Citus's plan that reads shards (\`EXPLAIN VERBOSE\`
with \`citus.explain_all_tasks\`) re-run on its worker, its rows counted and
their size in text form, what Citus's own counter ("Tuple data received
from nodes" in \`EXPLAIN ANALYZE\`) shows with \`citus.enable_binary_protocol
= off\`; that counter cannot be had for pushed-down partial aggregates
(Citus 13.2's \`EXPLAIN ANALYZE\` of them fails: "column field_1 has
pseudo-type cstring"). "Same answer": the cluster's rows are the single node's, byte for byte
("yes"), or but for floating-point numbers within 1e-9 of each other,
relatively ("yes, to 1e-9": \`stats_agg\`'s partial sums, added up, may
differ in the last digits from one running sum, and so may a sum over
rows that arrive in another order). \`rfm()\` on a Citus table or view reads its four columns
through the coordinator (one query, every row shipped) and scores there;
\`detect_anomalies()\` runs its query, here a daily sum that Citus splits
into partial sums per shard: their rows are those of the query it runs.

| query | single node | cluster | cluster / single | rows shipped | bytes shipped | same answer |
|---|---:|---:|---:|---:|---:|---|
$(cat "$BENCH_OUT/queries.md")

## The pipeline after a day appended

A day of $DAY_LINES order lines of existing customers and $DAY_EVENTS events
appended to the staging (today), then \`CALL run_pipeline()\`, $PIPE_RUNS times,
after a run with nothing new. Median time of each step and of the run (from
\`pipeline_step\` and \`pipeline_run\`), the statuses it recorded, and, for a
step that did not succeed, the error it recorded (a step \`blocked\` did not
run because one it depends on failed).

$(sed '/^STEPS$/,$d' "$BENCH_OUT/pipeline.md")

The pipeline's steps one by one (\`pipeline_plan()\`'s commands, each in a
transaction of its own, in the plan's order, whatever the steps before it
did), after each of $PIPE_RUNS more appended days: so that every step that
works on the cluster is timed, and each one that does not says why.

$(sed '1,/^STEPS$/d' "$BENCH_OUT/pipeline.md" | sed '/./,$!d')

Reproduce: \`./bench/citus.sh\` (as root; SCALE, BIG=1 for 200,000 customers,
DAYS, SHARDS, RUNS, PIPE_RUNS, BENCH_PORT override the defaults).
MD
} | bench_record citus
