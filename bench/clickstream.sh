#!/usr/bin/env bash
# Clickstream: (1) sessionizing 10,000,000 events with session_number()
# against the usual SQL (lag() + a running sum() over a window), on the
# same table, sorted by a sort and read in order from an index; (2) the
# sustained insert rate of 8 concurrent writers calling track_event(),
# against plain INSERTs into an unindexed table, with pgbench.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ensure_root "$@"
RUNS=${RUNS:-3}
EVENTS=${EVENTS:-10000000}
VISITORS=${VISITORS:-250000}
SECONDS_PER_TEST=${SECONDS_PER_TEST:-10}
CLIENTS=${CLIENTS:-8}

install_packages
build_and_install || die "build failed"
bench_start
trap bench_stop EXIT

log "generating $EVENTS events of $VISITORS visitors"
bench_psql -q <<SQL
CREATE EXTENSION customer_analytics;
SELECT setseed(0.1) \gset
-- each visitor: visits at random over 60 days, a few events a visit, a
-- minute or so apart (so that there are sessions to find)
CREATE TABLE bench.ev AS
SELECT v AS visitor,
       '2025-01-01'::timestamptz + (hashint4(v * 7919 + e / 5) & 1048575) * interval '5 seconds'
           + (e % 5) * (30 + (hashint4(v + e) & 255)) * interval '1 second' AS ts
FROM generate_series(0, $EVENTS - 1) g,
     LATERAL (SELECT g % $VISITORS AS v, g / $VISITORS AS e) x;
CREATE INDEX ev_visitor_ts ON bench.ev (visitor, ts);
CLUSTER bench.ev USING ev_visitor_ts;
VACUUM ANALYZE bench.ev;
SQL

C_SQL="SELECT count(*), sum(sn) FROM (SELECT customer_analytics.session_number(ts) OVER (PARTITION BY visitor ORDER BY ts) AS sn FROM bench.ev) s"
LAG_SQL="SELECT count(*), sum(sn) FROM (
    SELECT 1 + sum(brk) OVER (PARTITION BY visitor ORDER BY ts) AS sn
    FROM (SELECT visitor, ts,
                 CASE WHEN ts - lag(ts) OVER (PARTITION BY visitor ORDER BY ts) > interval '30 minutes'
                      THEN 1 ELSE 0 END AS brk
          FROM bench.ev) x) s"
LAG_ROWS_SQL="SELECT count(*), sum(sn) FROM (
    SELECT 1 + sum(brk) OVER (PARTITION BY visitor ORDER BY ts ROWS UNBOUNDED PRECEDING) AS sn
    FROM (SELECT visitor, ts,
                 CASE WHEN ts - lag(ts) OVER (PARTITION BY visitor ORDER BY ts) > interval '30 minutes'
                      THEN 1 ELSE 0 END AS brk
          FROM bench.ev) x) s"

# the two must agree before they are timed
same=$(bench_value "SELECT NOT EXISTS (($C_SQL) EXCEPT ($LAG_SQL))")
[ "$same" = t ] || die "session_number() and lag()+sum() disagree"
sessions=$(bench_value "SELECT sum(n) FROM (SELECT max(sn) AS n FROM (SELECT visitor, customer_analytics.session_number(ts) OVER (PARTITION BY visitor ORDER BY ts) AS sn FROM bench.ev) s GROUP BY visitor) t")

# one server-side timing; bench.time() returns the median of all the runs
# of that label so far.  $2 = settings for the session.
time_sql() {
    local label=$1 settings=$2 sql=$3
    bench_value "$settings SELECT bench.time('$label', \$q\$$sql\$q\$, 1)" | tail -n 1
}
IDX="SET enable_sort = off; SET max_parallel_workers_per_gather = 0;"
SORT="SET enable_indexscan = off; SET enable_bitmapscan = off; SET enable_indexonlyscan = off; SET max_parallel_workers_per_gather = 0;"
# rounds of every variant in turn, so that a busy moment of the machine
# does not fall on one variant only
for r in $(seq "$RUNS"); do
    log "sessionizing, round $r of $RUNS"
    c_idx=$(time_sql c_idx "$IDX" "$C_SQL")
    lag_idx=$(time_sql lag_idx "$IDX" "$LAG_SQL")
    lagrows_idx=$(time_sql lagrows_idx "$IDX" "$LAG_ROWS_SQL")
    c_sort=$(time_sql c_sort "$SORT" "$C_SQL")
    lag_sort=$(time_sql lag_sort "$SORT" "$LAG_SQL")
    lagrows_sort=$(time_sql lagrows_sort "$SORT" "$LAG_ROWS_SQL")
done
plan_idx=$(bench_value "$IDX EXPLAIN (COSTS OFF) $C_SQL" | grep -c "Index Only Scan\|Index Scan" || true)
[ "$plan_idx" -ge 1 ] || die "the index-order variant did not use the index"

log "writers: $CLIENTS clients, ${SECONDS_PER_TEST}s each"
bench_psql -q <<'SQL'
-- the baseline: the same columns, no index, no default, no check
CREATE TABLE bench.plain_events (
    event_id text, event_ts timestamptz, customer_id text, session_id text, event_type text,
    product_id text, order_id text, channel text, device text);
SQL
cat >"$BENCH_OUT/track.sql" <<'SQL'
\set s random(1, 100000)
SELECT customer_analytics.track_event('product_view', 's' || :s, product_id => 'P' || (:s % 200), channel => 'web', device => 'desktop');
SQL
cat >"$BENCH_OUT/stg_insert.sql" <<'SQL'
\set s random(1, 100000)
INSERT INTO customer_analytics.stg_events (event_id, event_ts, session_id, event_type, product_id, channel, device)
VALUES (gen_random_uuid()::text, clock_timestamp(), 's' || :s, 'product_view', 'P' || (:s % 200), 'web', 'desktop');
SQL
cat >"$BENCH_OUT/plain_insert.sql" <<'SQL'
\set s random(1, 100000)
INSERT INTO bench.plain_events (event_id, event_ts, session_id, event_type, product_id, channel, device)
VALUES (gen_random_uuid()::text, clock_timestamp(), 's' || :s, 'product_view', 'P' || (:s % 200), 'web', 'desktop');
SQL
chown "$PG_OS_USER" "$BENCH_OUT"/*.sql

# events/s (pgbench tps excluding connection time), one event per transaction
pgbench_tps() {
    local script=$1 opts=$2
    bench_psql -q -c "TRUNCATE customer_analytics.stg_events, bench.plain_events" -c "CHECKPOINT" >/dev/null
    as_pg_user env PGOPTIONS="$opts" "$PG_BINDIR/pgbench" -n -h "$BENCH_OUT" -p "$BENCH_PORT" -U postgres \
        -c "$CLIENTS" -j 2 -T "$SECONDS_PER_TEST" -f "$BENCH_OUT/$script" bench 2>/dev/null |
        sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p'
}
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
declare -A tps
for r in $(seq "$RUNS"); do
    log "writers, round $r of $RUNS"
    for s in plain track stg; do
        script=$s.sql
        [ "$s" = plain ] && script=plain_insert.sql
        [ "$s" = stg ] && script=stg_insert.sql
        tps[$s.sync]+="$(pgbench_tps "$script" "") "
        tps[$s.async]+="$(pgbench_tps "$script" "-c synchronous_commit=off") "
    done
done
med() { printf '%s\n' ${tps[$1]} | median; }
track_sync=$(med track.sync); stg_sync=$(med stg.sync); plain_sync=$(med plain.sync)
track_async=$(med track.async); stg_async=$(med stg.async); plain_async=$(med plain.async)
# every call of the last track_event run is a row
bench_psql -q -c "TRUNCATE customer_analytics.stg_events" >/dev/null
as_pg_user "$PG_BINDIR/pgbench" -n -h "$BENCH_OUT" -p "$BENCH_PORT" -U postgres -c "$CLIENTS" -j 2 -t 500 \
    -f "$BENCH_OUT/track.sql" bench >/dev/null 2>&1
tracked=$(bench_value "SELECT count(*) FROM customer_analytics.stg_events")
[ "$tracked" -eq $((CLIENTS * 500)) ] || die "track_event lost rows: $tracked of $((CLIENTS * 500))"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
int() { awk -v a="$1" 'BEGIN { printf "%.0f", a }'; }

bench_record clickstream <<MD
# Clickstream: sessionization and event capture

## Sessionizing $EVENTS events

$EVENTS events of $VISITORS visitors ($sessions sessions at a 30-minute gap),
one table \`bench.ev (visitor int, ts timestamptz)\` with an index on
\`(visitor, ts)\` (clustered). Each query numbers every event's session and
sums the numbers (so nothing is sent to the client); both give the same
result (checked). Median of $RUNS runs, server-side, no parallel workers;
the runs go in rounds (every variant once per round) because the machine
is shared.

| query | input in index order | input sorted |
|---|---:|---:|
| \`session_number(ts) OVER (PARTITION BY visitor ORDER BY ts)\` | $c_idx ms | $c_sort ms |
| \`lag()\` + \`sum() OVER (PARTITION BY visitor ORDER BY ts)\` (the usual SQL, default RANGE frame) | $lag_idx ms | $lag_sort ms |
| \`lag()\` + \`sum() OVER (... ROWS UNBOUNDED PRECEDING)\` | $lagrows_idx ms | $lagrows_sort ms |
| **speed-up of session_number() over the usual SQL** | **$(ratio "$lag_idx" "$c_idx")x** | **$(ratio "$lag_sort" "$c_sort")x** |
| speed-up over the ROWS variant | $(ratio "$lagrows_idx" "$c_idx")x | $(ratio "$lagrows_sort" "$c_sort")x |

"Input sorted": index scans disabled, so both pay for the same sort of
$EVENTS rows (work_mem 64MB, it spills), which the function cannot make
cheaper. "Index order": the rows come in (visitor, ts) order, as
\`refresh_sessions()\` reads one visitor's events.

## Sustained insert rate, $CLIENTS concurrent writers

pgbench, $CLIENTS clients, one event per transaction (a random session id
each), on the same cluster; median of $RUNS runs of ${SECONDS_PER_TEST} s per cell,
in rounds.

| writer | events/s, synchronous_commit on | ratio | events/s, synchronous_commit off | ratio |
|---|---:|---:|---:|---:|
| plain INSERT into an unindexed table (baseline) | $(int "$plain_sync") | 1.00 | $(int "$plain_async") | 1.00 |
| \`track_event(...)\` | $(int "$track_sync") | $(ratio "$track_sync" "$plain_sync") | $(int "$track_async") | $(ratio "$track_async" "$plain_async") |
| plain INSERT into \`stg_events\` (the documented bulk path) | $(int "$stg_sync") | $(ratio "$stg_sync" "$plain_sync") | $(int "$stg_async") | $(ratio "$stg_async" "$plain_async") |

With durable commits the WAL flush per transaction dominates both; with
\`synchronous_commit = off\` the difference is the cost of the function
call, the argument checks, the UUID, the defaults (sequence, xid) and the
\`staged_xid\` index. After a run of $CLIENTS x 500 calls, stg_events held
$tracked rows: none lost.

Reproduce: \`./bench/clickstream.sh\` (as root; RUNS, EVENTS, VISITORS, CLIENTS and SECONDS_PER_TEST override the defaults).
MD
