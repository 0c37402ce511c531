#!/usr/bin/env bash
# The first builds of the derived tables against the plain SQL computing
# the same rows, same run, on a generated shop:
#
#   sales rollup: refresh_sales_rollup(full_refresh => true) against the
#       two GROUP BY queries written into copies of sales_rollup_day and
#       sales_rollup_category;
#   sessions: refresh_sessions(full_rebuild => true) against lag() and a
#       running sum() numbering each visitor's sessions, then GROUP BY,
#       written into a copy of sessions;
#   RFM rollup: refresh_customer_rfm() from an empty rollup (the first
#       build: scores empty too; after a restore: scores kept) against
#       rfm() scanning the same lines; the SQL the rebuild replaced
#       (rfm_agg over rfm_orders) is timed beside them.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ensure_root "$@"
RUNS=${RUNS:-11}
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
VACUUM ANALYZE;
CREATE TABLE bench.rollup_day (LIKE customer_analytics.sales_rollup_day INCLUDING ALL);
CREATE TABLE bench.rollup_category (LIKE customer_analytics.sales_rollup_category INCLUDING ALL);
CREATE TABLE bench.sessions (LIKE customer_analytics.sessions INCLUDING ALL);
CREATE TABLE bench.rfm_rollup (LIKE customer_analytics.rfm_rollup_customer INCLUDING ALL);
-- consumes what the triggers queued during the load, so that every timed
-- run below rebuilds the same way
SELECT customer_analytics.refresh_customer_rfm() > 0;
SQL
lines=$(bench_value "SELECT count(*) FROM customer_analytics.fact_order_line")
events=$(bench_value "SELECT count(*) FROM customer_analytics.fact_event")

PLAIN_ROLLUP="INSERT INTO bench.rollup_day (day, revenue, orders, customers)
    SELECT d.date, sum(f.revenue), count(DISTINCT f.order_id), count(DISTINCT c.customer_id) FILTER (WHERE f.customer_key <> -1)
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
    JOIN customer_analytics.dim_customer c ON c.customer_key = f.customer_key
    WHERE f.status = 'completed' GROUP BY d.date;
INSERT INTO bench.rollup_category (day, category, revenue, orders, units)
    SELECT d.date, p.category, sum(f.revenue), count(DISTINCT f.order_id), sum(f.quantity)
    FROM customer_analytics.fact_order_line f
    JOIN customer_analytics.dim_date d ON d.date_key = f.date_key
    JOIN customer_analytics.dim_product p ON p.product_key = f.product_key
    WHERE f.status = 'completed' GROUP BY d.date, p.category"
PLAIN_SESSIONS="INSERT INTO bench.sessions (visitor, session_start, session_end, date_key, customer_id, customer_key,
                      events, pages, product_views, add_to_carts, checkouts, purchases, channel, device)
    SELECT e.visitor, min(e.event_ts), max(e.event_ts),
           customer_analytics.date_key((min(e.event_ts) AT TIME ZONE 'UTC')::date),
           (array_agg(e.customer_id ORDER BY e.event_ts DESC, e.event_id DESC) FILTER (WHERE e.customer_id IS NOT NULL))[1],
           (array_agg(e.customer_key ORDER BY e.event_ts DESC, e.event_id DESC) FILTER (WHERE e.customer_key IS NOT NULL))[1],
           count(*),
           count(*) FILTER (WHERE e.event_type IN ('page_view', 'product_view')),
           count(*) FILTER (WHERE e.event_type = 'product_view'),
           count(*) FILTER (WHERE e.event_type = 'add_to_cart'),
           count(*) FILTER (WHERE e.event_type = 'checkout'),
           count(*) FILTER (WHERE e.event_type = 'purchase'),
           (array_agg(e.channel ORDER BY e.event_ts, e.event_id))[1],
           (array_agg(e.device ORDER BY e.event_ts, e.event_id))[1]
    FROM (SELECT b.*, sum(b.brk) OVER (PARTITION BY b.visitor ORDER BY b.event_ts, b.event_id) AS sn
          FROM (SELECT customer_analytics.visitor(f.customer_id, f.session_id) AS visitor, f.*,
                       CASE WHEN f.event_ts - lag(f.event_ts) OVER w > interval '30 minutes' THEN 1 ELSE 0 END AS brk
                FROM customer_analytics.fact_event f
                WINDOW w AS (PARTITION BY customer_analytics.visitor(f.customer_id, f.session_id) ORDER BY f.event_ts, f.event_id)) b) e
    GROUP BY e.visitor, e.sn"

RFM_SQL="INSERT INTO bench.rfm_rollup (customer_id, customer_key, last_order, frequency, monetary)
    SELECT o.customer_id, cur.customer_key, (o.s).last_order, (o.s).frequency, (o.s).monetary
    FROM (SELECT x.customer_id, customer_analytics.rfm_agg(x.ts, x.amount) AS s
          FROM customer_analytics_internal.rfm_orders(NULL, 'infinity') x GROUP BY x.customer_id) o
    LEFT JOIN customer_analytics.dim_customer cur ON cur.customer_id = o.customer_id AND cur.is_current
                                                 AND cur.customer_key <> -1"

# Every timed statement runs once per round, after an untimed warm-up
# round, RUNS rounds in all, the rounds alternately in the listed order and
# in reverse (so that no statement always follows the same one, and a slow
# spell of the shared machine hits all of them alike); each is reported as
# its median.  Each setup leaves what its statement starts from, whatever
# ran before it.
LABELS=(rollup_plain rollup_first sessions_plain sessions_first rfm_scan rfm_first rfm_restored rfm_rescore rfm_rows rfm_sql)
declare -A SETUP SQL
SETUP[rollup_plain]="TRUNCATE bench.rollup_day, bench.rollup_category"; SQL[rollup_plain]=$PLAIN_ROLLUP
SETUP[rollup_first]="SELECT 1"; SQL[rollup_first]="SELECT customer_analytics.refresh_sales_rollup(full_refresh => true)"
SETUP[sessions_plain]="TRUNCATE bench.sessions"; SQL[sessions_plain]=$PLAIN_SESSIONS
SETUP[sessions_first]="SELECT 1"; SQL[sessions_first]="SELECT count(*) FROM customer_analytics.refresh_sessions(full_rebuild => true)"
SETUP[rfm_scan]="SELECT 1"; SQL[rfm_scan]="SELECT count(*) FROM customer_analytics.rfm()"
SETUP[rfm_first]="TRUNCATE customer_analytics.rfm_rollup_customer, customer_analytics.customer_rfm_score"
SQL[rfm_first]="SELECT customer_analytics.refresh_customer_rfm()"
SETUP[rfm_restored]="TRUNCATE customer_analytics.rfm_rollup_customer"; SQL[rfm_restored]="SELECT customer_analytics.refresh_customer_rfm()"
# (the rescoring needs a built rollup and scores: a refresh makes sure)
SETUP[rfm_rescore]="SELECT customer_analytics.refresh_customer_rfm()"; SQL[rfm_rescore]="SELECT customer_analytics.refresh_customer_rfm()"
SETUP[rfm_rows]="TRUNCATE bench.rfm_rollup"
SQL[rfm_rows]="INSERT INTO bench.rfm_rollup SELECT * FROM customer_analytics_internal.rfm_rollup_rows('infinity')"
SETUP[rfm_sql]="TRUNCATE bench.rfm_rollup"; SQL[rfm_sql]=$RFM_SQL

# time_once label round: one timed run, recorded as run -round (round 0:
# the warm-up, dropped)
time_once() {
    bench_value "SELECT bench.time('$1', \$q\$${SQL[$1]}\$q\$, 1, \$q\$${SETUP[$1]}\$q\$)" >/dev/null
    bench_value "UPDATE bench.timing SET run = -$2 WHERE label = '$1' AND run = 1" >/dev/null
}
log "timing: a warm-up round, then $RUNS rounds"
for round in $(seq 0 "$RUNS"); do
    if [ $((round % 2)) = 1 ]; then order=("${LABELS[@]}"); else order=($(printf '%s\n' "${LABELS[@]}" | tac)); fi
    for label in "${order[@]}"; do time_once "$label" "$round"; done
done
bench_value "DELETE FROM bench.timing WHERE run = 0" >/dev/null
median() {
    bench_value "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1) FROM bench.timing WHERE label = '$1'"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
for label in "${LABELS[@]}"; do declare "$label=$(median "$label")"; done
# the rebuild against rfm() round by round: how steady the ratio is
round_ratios() {
    bench_value "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY r)::numeric, 2) || ' | ' || round(min(r)::numeric, 2)
                        || ' | ' || round(max(r)::numeric, 2)
                 FROM (SELECT a.ms / b.ms AS r FROM bench.timing a JOIN bench.timing b USING (run)
                       WHERE a.label = '$1' AND b.label = 'rfm_scan') x"
}
# same rows
same_rollup=$(bench_value "SELECT (SELECT count(*) FROM (TABLE bench.rollup_day EXCEPT TABLE customer_analytics.sales_rollup_day) a)
                                + (SELECT count(*) FROM (TABLE customer_analytics.sales_rollup_day EXCEPT TABLE bench.rollup_day) b)
                                + (SELECT count(*) FROM (TABLE bench.rollup_category EXCEPT TABLE customer_analytics.sales_rollup_category) c)
                                + (SELECT count(*) FROM (TABLE customer_analytics.sales_rollup_category EXCEPT TABLE bench.rollup_category) d) = 0")
same_sessions=$(bench_value "SELECT (SELECT count(*) FROM (TABLE bench.sessions EXCEPT TABLE customer_analytics.sessions) a)
                                  + (SELECT count(*) FROM (TABLE customer_analytics.sessions EXCEPT TABLE bench.sessions) b) = 0")
same_rfm=$(bench_value "SELECT (SELECT count(*) FROM (TABLE bench.rfm_rollup EXCEPT ALL TABLE customer_analytics.rfm_rollup_customer) a)
                             + (SELECT count(*) FROM (TABLE customer_analytics.rfm_rollup_customer EXCEPT ALL TABLE bench.rfm_rollup) b)
                             + (SELECT count(*) FROM ((SELECT customer_key, customer_id, recency_days, frequency, monetary, r, f, m, rfm_cell, segment
                                                       FROM customer_analytics.customer_rfm EXCEPT ALL SELECT * FROM customer_analytics.rfm())
                                                      UNION ALL (SELECT * FROM customer_analytics.rfm() EXCEPT ALL
                                                                 SELECT customer_key, customer_id, recency_days, frequency, monetary, r, f, m, rfm_cell, segment
                                                                 FROM customer_analytics.customer_rfm)) c) = 0")
nrfm=$(bench_value "SELECT count(*) FROM customer_analytics.rfm_rollup_customer")
nsessions=$(bench_value "SELECT count(*) FROM customer_analytics.sessions")

bench_record first_builds <<MD
# First builds against the plain SQL computing the same rows

Generated shop (\`generate_sample_data\`, $SHOP_CUSTOMERS customers,
$SHOP_DAYS days, transformed: $lines order lines, $events events). Median of
$RUNS runs each, same run, shared_buffers = $BENCH_SHARED_BUFFERS: after an
untimed warm-up round, every statement once per round, the rounds
alternately in order and in reverse.

| | median | ratio | same rows |
|---|---:|---:|---|
| plain: the two \`GROUP BY\` queries into copies of \`sales_rollup_day\` and \`sales_rollup_category\` | $rollup_plain ms | 1.00 | |
| \`refresh_sales_rollup(full_refresh => true)\` | $rollup_first ms | $(ratio "$rollup_first" "$rollup_plain") | $same_rollup |
| plain: \`lag()\` and a running \`sum()\` number each visitor's sessions, \`GROUP BY\` into a copy of \`sessions\` ($nsessions sessions) | $sessions_plain ms | 1.00 | |
| \`refresh_sessions(full_rebuild => true)\` | $sessions_first ms | $(ratio "$sessions_first" "$sessions_plain") | $same_sessions |
| \`rfm()\`: its C scan of the order lines, scored ($nrfm customers) | $rfm_scan ms | 1.00 | |
| \`refresh_customer_rfm()\`, first build: rollup and scores empty | $rfm_first ms | $(ratio "$rfm_first" "$rfm_scan") | $same_rfm |
| \`refresh_customer_rfm()\`, rollup empty, scores kept (after a restore) | $rfm_restored ms | $(ratio "$rfm_restored" "$rfm_scan") | $same_rfm |
| \`refresh_customer_rfm()\` with nothing changed: the rescoring every refresh does | $rfm_rescore ms | $(ratio "$rfm_rescore" "$rfm_scan") | |
| the rebuild alone: the rollup's rows in C (\`rfm_rollup_rows\`) into a copy of \`rfm_rollup_customer\` | $rfm_rows ms | $(ratio "$rfm_rows" "$rfm_scan") | |
| before: the rollup's rows in SQL (\`rfm_agg\` over \`rfm_orders\`) into a copy of \`rfm_rollup_customer\` | $rfm_sql ms | $(ratio "$rfm_sql" "$rfm_scan") | $same_rfm |

The rebuild against \`rfm()\` round by round (each round's ratio, over
the $RUNS rounds):

| | median | lowest | highest |
|---|---:|---:|---:|
| the rebuild alone / \`rfm()\` | $(round_ratios rfm_rows) |
| refresh from an empty rollup, scores kept / \`rfm()\` | $(round_ratios rfm_restored) |
| first build / \`rfm()\` | $(round_ratios rfm_first) |

Same rows, RFM: the SQL rows equal the rollup the refresh rebuilt in C,
and \`customer_rfm\` equals \`rfm()\`.  A refresh from an empty rollup is
the rebuild plus the rescoring that every refresh does (and, on a first
build, writing every customer's scores, which \`rfm()\` does not).
MD
