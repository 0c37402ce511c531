#!/usr/bin/env bash
# The demo's step timings, reproducibly: runs scripts/demo.sh once (its own
# throwaway cluster on DEMO_PORT, its output in DEMO_OUT), timestamping
# every line it prints, then reads
#   - the wall time of each demo step (scripts/demo/NN_*.sql) from the
#     timestamps of the demo's "==> step" lines,
#   - the time of the first transform() (psql's \timing in 10_load),
#   - each step of the demo's run_pipeline() call from pipeline_step,
# writes bench/results/demo_steps.md and stops the demo's cluster.
# One run: the demo is the measurement (a new user's first run), so it is
# reported as measured, with the load of the machine beside it.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ensure_root "$@"
export DEMO_OUT=${DEMO_OUT:-$BENCH_OUT/demo}
export DEMO_PORT=${DEMO_PORT:-54331}
mkdir -p "$BENCH_OUT"
LOG=$BENCH_OUT/demo_steps.log

demo_stop() {
    as_pg_user "$PG_BINDIR/pg_ctl" -D "$DEMO_OUT/pgdata" -m fast stop >/dev/null 2>&1 || true
}
trap demo_stop EXIT

load_before=$(cut -d' ' -f1 /proc/loadavg)
log "running scripts/demo.sh (port $DEMO_PORT, output in $DEMO_OUT; its output in $LOG)"
start=$(date +%s.%N)
# each line prefixed with the seconds since the start
set +e
"$REPO/scripts/demo.sh" 2>&1 | while IFS= read -r line; do
    printf '%.3f %s\n' "$(echo "$(date +%s.%N) - $start" | bc)" "$line"
done >"$LOG"
rc=${PIPESTATUS[0]}
set -e
total=$(echo "$(date +%s.%N) - $start" | bc)
load_after=$(cut -d' ' -f1 /proc/loadavg)
[ "$rc" = 0 ] || { tail -30 "$LOG"; die "the demo failed (exit $rc)"; }

# the demo's parts: from each "==> " line to the next
parts=$(awk '{ last = $1 }
             /^[0-9.]+ ==> / { if (name != "") printf "| %s | %.1f s |\n", name, $1 - t0
                               t = $1; $1 = ""; sub(/^ ==> /, ""); name = $0; t0 = t }
             END { if (name != "") printf "| %s | %.1f s |\n", name, last - t0 }' "$LOG" | grep -v '^| done\.')
first_transform=$(awk '/== transforming staging into the star schema/ { f = 1 } f && / Time: / { print $3; exit }' "$LOG")
lines=$(as_pg_user psql -X -At -h "$DEMO_OUT" -p "$DEMO_PORT" -U postgres -d warehouse \
    -c "SELECT count(*) FROM customer_analytics.fact_order_line")
events=$(as_pg_user psql -X -At -h "$DEMO_OUT" -p "$DEMO_PORT" -U postgres -d warehouse \
    -c "SELECT count(*) FROM customer_analytics.fact_event")
steps=$(as_pg_user psql -X -At -F ' | ' -h "$DEMO_OUT" -p "$DEMO_PORT" -U postgres -d warehouse -c "
    SELECT s.step_no, s.step, s.status, COALESCE(s.rows_affected::text, ''),
           round(extract(epoch FROM s.finished_at - s.started_at)::numeric, 3) || ' s'
    FROM customer_analytics.pipeline_step s
    WHERE s.run_id = (SELECT min(run_id) FROM customer_analytics.pipeline_run
                      WHERE triggered_by IS DISTINCT FROM 'pg_cron')
    ORDER BY s.step_no" | sed 's/^/| /; s/$/ |/')
pipeline_total=$(as_pg_user psql -X -At -h "$DEMO_OUT" -p "$DEMO_PORT" -U postgres -d warehouse -c "
    SELECT round(extract(epoch FROM finished_at - started_at)::numeric, 1) FROM customer_analytics.pipeline_run
    WHERE run_id = (SELECT min(run_id) FROM customer_analytics.pipeline_run WHERE triggered_by IS DISTINCT FROM 'pg_cron')")

bench_record demo_steps <<MD
# The demo's step timings

One run of \`scripts/demo.sh\` ($(printf '%.0f' "$total") s in all, build included; load
average $load_before before, $load_after after, on a machine shared with
other work): the sample shop ($lines order lines, $events events) written
as CSV exports, ingested, transformed, then every capability run, then
\`run_pipeline()\` and pg_cron. Made by \`bench/demo_steps.sh\`.

The first \`transform()\` (10_load, the whole shop from staging):
**$(awk -v ms="$first_transform" 'BEGIN { printf "%.1f s", ms / 1000 }')**.

The demo's parts (from each of its "==>" lines to the next):

| part | time |
|---|---:|
$parts

The demo's \`CALL run_pipeline()\` (70_pipeline; $pipeline_total s in all), from
\`pipeline_step\`:

| # | step | status | rows | time |
|---:|---|---|---:|---:|
$steps
MD
