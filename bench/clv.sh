#!/usr/bin/env bash
# The CLV fit (bgnbd_fit + gamma_gamma_fit) at 10k, 100k and 1M customers,
# on the generator's shop and on the pipeline benchmark's shop: the
# quasi-Newton fit (the default) against version 0.1's Nelder-Mead over the
# grouped customers ("before") and Nelder-Mead over every customer ("naive",
# what lifetimes does), same run, same data; time and log-likelihood.
# Then a REFRESH of clv_model on the pipeline benchmark's star schema
# (100,000 customers, 1,000,000 lines), before and after.
#
#   generator's shop: generate_sample_data(10,000 customers, a year),
#       transformed; its clv_summary, and that summary repeated 10 and 100
#       times with T lengthened by 0..9 and 0..49 days (the same kind of
#       histories, more distinct ones)
#   pipeline shop: the order stream of bench/pipeline.sh (orders spread
#       uniformly over 700 days, customers by hash: nobody drops out, a
#       degenerate case for BG/NBD) summarised in SQL the way clv_summary
#       does, for 10k, 100k and 1M customers
#
# The searches are slow: each runs once, with a time limit (SLOW_LIMIT
# seconds, default 600); naive is not run at 1M customers.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ensure_root "$@"
RUNS=${RUNS:-3}
SLOW_LIMIT=${SLOW_LIMIT:-600}

install_packages
build_and_install || die "build failed"
bench_start
trap bench_stop EXIT

log "generator's shop: 10,000 customers"
bench_psql -q <<'SQL'
SET client_min_messages = warning;
CREATE EXTENSION customer_analytics;
SELECT count(*) FROM customer_analytics.generate_sample_data(customers => 10000, days => 365, seed => 7, events => false);
SELECT count(*) FROM customer_analytics.transform();
CREATE TABLE bench.gen_10k AS SELECT x, t_x, "T", m_x FROM customer_analytics.clv_summary('2026-01-01');
CREATE TABLE bench.gen_100k AS SELECT x, t_x, "T" + k AS "T", m_x FROM bench.gen_10k, generate_series(0, 9) k;
CREATE TABLE bench.gen_1m AS SELECT x, t_x, "T" + k % 50 AS "T", m_x FROM bench.gen_10k, generate_series(0, 99) k;
CREATE TABLE bench.clv_fit (shop text, customers bigint, method text, run int, ms float8,
                            bg customer_analytics.bgnbd_model, gg customer_analytics.gamma_gamma_model);
SQL

log "pipeline shop summaries: 10k, 100k, 1M customers"
for n in 10000 100000 1000000; do
    name=pipe_$((n / 1000))k; [ "$n" = 1000000 ] && name=pipe_1m
    bench_psql -q <<SQL
CREATE TABLE bench.$name AS
WITH orders AS (
    SELECT 1 + (hashint8(o) & 2147483647) % $n AS c,
           (timestamptz '2024-01-01 00:00+00' + ((o::float8 / ($n * 4)) * 700 * 86400) * interval '1 second')::date AS day,
           (SELECT sum((1 + l % 3) * ((o * 37 + l * 11) % 20000) / 100.0) FROM generate_series(1, 1 + o % 4) l) AS revenue
    FROM generate_series(1, $n * 4) o
    WHERE o % 33 <> 0
), days AS (
    SELECT c, day, sum(revenue) AS revenue FROM orders GROUP BY c, day
)
SELECT (count(*) - 1)::float8 AS x, (max(day) - min(day))::float8 AS t_x,
       (date '2025-12-01' - min(day))::float8 AS "T",
       ((sum(revenue) - (min(ARRAY[day - date '2000-01-01', revenue]))[2]) / NULLIF(count(*) - 1, 0))::float8 AS m_x
FROM days GROUP BY c;
SQL
done

# fit shop table method runs: one INSERT into bench.clv_fit per run
fit() {
    local shop=$1 table=$2 method=$3 runs=$4 limit=${5:-0}
    for run in $(seq "$runs"); do
        bench_psql -q -c "SET customer_analytics.clv_fit_method = $method" -c "SET statement_timeout = '${limit}s'" -c "
            DO \$\$
            DECLARE t0 timestamptz := clock_timestamp(); r record;
            BEGIN
                SELECT customer_analytics.bgnbd_fit(x, t_x, \"T\") AS b, customer_analytics.gamma_gamma_fit(x, m_x) AS g INTO r
                FROM bench.$table;
                INSERT INTO bench.clv_fit SELECT '$shop', (SELECT count(*) FROM bench.$table), '$method', $run,
                       extract(epoch FROM clock_timestamp() - t0) * 1000, r.b, r.g;
            END \$\$" >/dev/null 2>&1 \
            || bench_psql -q -c "INSERT INTO bench.clv_fit VALUES ('$shop', (SELECT count(*) FROM bench.$table), '$method', $run, NULL, NULL, NULL)"
    done
}

for shop in gen pipe; do
    for size in 10k 100k 1m; do
        log "fitting ${shop}_$size"
        fit "$shop" "${shop}_$size" quasi_newton "$RUNS"
        fit "$shop" "${shop}_$size" nelder_mead 1 "$SLOW_LIMIT"
        [ "$size" != 1m ] && fit "$shop" "${shop}_$size" nelder_mead_ungrouped 1 "$SLOW_LIMIT"
    done
done

# The whole refresh of clv_model (what run_pipeline's clv step runs: the
# summary of every customer's history from the order lines, the two fits,
# writing the row) on each shop's star schema, against the same refresh
# over version 0.2's SQL clv_summary (kept here as bench.clv_summary_sql).
log "clv_model refresh on the star schemas"
# version 0.2's SQL, as the tests keep it to compare with
sed 's/pg_temp\.clv_summary_sql/bench.clv_summary_sql/g' "$REPO/sql/include/clv_summary_sql.sql" | bench_psql -q
bench_psql -q <<'SQL'
SET client_min_messages = warning;
CREATE MATERIALIZED VIEW bench.clv_model_sql AS
SELECT customer_analytics.bgnbd_fit(s.x, s.t_x, s."T") AS bgnbd,
       customer_analytics.gamma_gamma_fit(s.x, s.m_x) AS gamma_gamma,
       customer_analytics.reference_time() AS as_of
FROM bench.clv_summary_sql(customer_analytics.reference_time()) s
WITH NO DATA;
CREATE TABLE bench.clv_refresh (shop text, customers bigint, lines bigint, summarised bigint, histories bigint,
                                summary_ms float8, summary_sql_ms float8, refresh_ms float8, refresh_sql_ms float8,
                                same_rows boolean, status text, loglik float8, loglik_sql float8);
SQL
CLEAR_STAR="TRUNCATE customer_analytics.stg_customers, customer_analytics.stg_products, customer_analytics.stg_orders,
         customer_analytics.fact_order_line, customer_analytics_internal.transform_state;
DELETE FROM customer_analytics.dim_customer WHERE customer_key <> -1;
DELETE FROM customer_analytics.dim_product WHERE product_key <> -1"
# the generator's shop: n customers over a year, transformed
load_gen() {
    bench_psql -q -c "SET client_min_messages = warning" -c "$CLEAR_STAR" \
        -c "SELECT count(*) FROM customer_analytics.generate_sample_data(customers => $1, days => 365, seed => 7, events => false)" \
        -c "SELECT count(*) FROM customer_analytics.transform()" -c "VACUUM ANALYZE" >/dev/null
}
# the pipeline benchmark's shop: n customers, 4n orders of 1-4 lines
# spread uniformly over 700 days, each to a customer chosen by hash
load_pipe() {
    local n=$1
    bench_psql -q -c "SET client_min_messages = warning" -c "$CLEAR_STAR" -c "VACUUM ANALYZE" >/dev/null
    bench_psql -q <<SQL
SET client_min_messages = warning;
SELECT customer_analytics.ensure_dim_date('2024-01-01', '2025-12-31');
INSERT INTO customer_analytics.dim_product (product_key, product_id, category)
SELECT g, 'BP' || g, 'cat' || g % 12 FROM generate_series(1, 1000) g;
INSERT INTO customer_analytics.dim_customer (customer_key, customer_id, valid_from)
SELECT g, 'BC' || g, timestamptz '2023-01-01' FROM generate_series(1, $n) g;
INSERT INTO customer_analytics.fact_order_line
    (order_id, line_number, customer_key, product_key, date_key, order_ts, quantity, unit_price, discount, status, channel, stage_id,
     customer_ref)
SELECT 'O' || o, l, c, 1 + (o * 7 + l) % 1000, to_char(ts, 'YYYYMMDD')::int, ts, 1 + l % 3,
       ((o * 37 + l * 11) % 20000) / 100.0, 0, CASE WHEN o % 33 = 0 THEN 'cancelled' ELSE 'completed' END, 'web', o, 'BC' || c
FROM (SELECT o, 1 + (hashint8(o) & 2147483647) % $n AS c,
             timestamptz '2024-01-01 00:00+00' + ((o::float8 / ($n * 4)) * 700 * 86400) * interval '1 second' AS ts,
             1 + (o % 4) AS nlines
      FROM generate_series(1, $n * 4) o) orders,
     LATERAL generate_series(1, nlines) l;
VACUUM ANALYZE;
SQL
}
# refresh_timing shop n as_of: RUNS rounds, each timing the four once in
# turn (interleaved, so that a disturbance hits all of them alike); medians
refresh_timing() {
    local shop=$1 n=$2 as_of=$3 label=$1_$2
    bench_psql -q -c "SET customer_analytics.as_of = '$as_of'" -c "REFRESH MATERIALIZED VIEW customer_analytics.clv_model" \
        -c "REFRESH MATERIALIZED VIEW bench.clv_model_sql" >/dev/null   # warm both
    for run in $(seq "$RUNS"); do
        bench_psql -q -At -c "SET customer_analytics.as_of = '$as_of'" \
            -c "SELECT bench.time('${label}_summary', \$q\$SELECT count(*) FROM customer_analytics.clv_summary('$as_of')\$q\$, 1)" \
            -c "SELECT bench.time('${label}_summary_sql', \$q\$SELECT count(*) FROM bench.clv_summary_sql('$as_of')\$q\$, 1)" \
            -c "SELECT bench.time('${label}_refresh', 'REFRESH MATERIALIZED VIEW customer_analytics.clv_model', 1)" \
            -c "SELECT bench.time('${label}_refresh_sql', 'REFRESH MATERIALIZED VIEW bench.clv_model_sql', 1)" >/dev/null
    done
    bench_psql -q -c "SET customer_analytics.as_of = '$as_of'" -c "
        INSERT INTO bench.clv_refresh
        SELECT '$shop', $n, (SELECT count(*) FROM customer_analytics.fact_order_line),
               (SELECT count(*) FROM customer_analytics.clv_summary('$as_of')),
               (SELECT count(DISTINCT (x, t_x, \"T\")) FROM customer_analytics.clv_summary('$as_of')),
               (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) FROM bench.timing WHERE label = '${label}_summary'),
               (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) FROM bench.timing WHERE label = '${label}_summary_sql'),
               (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) FROM bench.timing WHERE label = '${label}_refresh'),
               (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) FROM bench.timing WHERE label = '${label}_refresh_sql'),
               (SELECT count(*) FROM (SELECT * FROM customer_analytics.clv_summary('$as_of')
                                      EXCEPT ALL SELECT * FROM bench.clv_summary_sql('$as_of')) a)
               + (SELECT count(*) FROM (SELECT * FROM bench.clv_summary_sql('$as_of')
                                        EXCEPT ALL SELECT * FROM customer_analytics.clv_summary('$as_of')) b) = 0,
               (SELECT customer_analytics.bgnbd_fit_status(bgnbd) FROM customer_analytics.clv_model),
               (SELECT (bgnbd).loglik FROM customer_analytics.clv_model),
               (SELECT (bgnbd).loglik FROM bench.clv_model_sql)"
}
for n in ${REFRESH_SIZES:-10000 100000}; do
    log "generator's shop, $n customers: refresh"
    load_gen "$n"
    refresh_timing gen "$n" 2026-01-01
    log "pipeline shop, $n customers: refresh"
    load_pipe "$n"
    refresh_timing pipe "$n" 2025-12-01
done
refresh_table=$(bench_psql -At -F ' | ' -c "
    SELECT CASE shop WHEN 'gen' THEN 'generator' ELSE 'pipeline' END, to_char(customers, 'FM9,999,999'),
           to_char(lines, 'FM9,999,999'), to_char(summarised, 'FM9,999,999'), to_char(histories, 'FM9,999,999'),
           round(summary_ms::numeric, 1) || ' ms', round(summary_sql_ms::numeric, 1) || ' ms',
           '**' || round(refresh_ms::numeric, 1) || ' ms**', round(refresh_sql_ms::numeric, 1) || ' ms',
           round((refresh_ms / refresh_sql_ms)::numeric, 3), same_rows, status,
           to_char(abs(loglik - loglik_sql) / abs(loglik_sql), '9.9EEEE')
    FROM bench.clv_refresh ORDER BY shop, customers" | sed 's/^/| /; s/$/ |/')

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || a + 0 == 0) print "-"; else printf "%.3f", b / a }'; }

table=$(bench_psql -At -F ' | ' -c "
    WITH m AS (
        SELECT shop, customers, method, percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS ms,
               (array_agg(bg ORDER BY run))[1] AS bg, (array_agg(gg ORDER BY run))[1] AS gg
        FROM bench.clv_fit GROUP BY shop, customers, method
    )
    SELECT CASE m.shop WHEN 'gen' THEN 'generator' ELSE 'pipeline' END, to_char(m.customers, 'FM9,999,999'),
           m.method || CASE m.method WHEN 'quasi_newton' THEN ' (after)' WHEN 'nelder_mead' THEN ' (before)' ELSE ' (naive)' END,
           COALESCE(round(m.ms::numeric, 1)::text || ' ms', '> $SLOW_LIMIT s (stopped)'),
           COALESCE(round((m.ms / q.ms)::numeric, 2)::text, '-'),
           COALESCE(round(((m.bg).loglik)::numeric, 3)::text, 'NULL'),
           COALESCE(to_char(abs((m.bg).loglik - (q.bg).loglik) / abs((q.bg).loglik), '9.9EEEE'), '-'),
           COALESCE(round(((m.gg).loglik)::numeric, 3)::text, 'NULL'),
           COALESCE(to_char(abs((m.gg).loglik - (q.gg).loglik) / abs((q.gg).loglik), '9.9EEEE'), '-'),
           CASE WHEN m.ms IS NULL THEN '-' ELSE customer_analytics.bgnbd_fit_status(m.bg) END
    FROM m JOIN m q ON q.shop = m.shop AND q.customers = m.customers AND q.method = 'quasi_newton'
    ORDER BY m.shop, m.customers, m.method DESC" | sed 's/^/| /; s/$/ |/')
distinct=$(bench_psql -At -F ' | ' -c "
    SELECT t, to_char(n, 'FM9,999,999'), to_char(d, 'FM9,999,999') FROM (
        SELECT 'gen_10k' AS t, count(*) AS n, count(DISTINCT (x, t_x, \"T\")) AS d FROM bench.gen_10k UNION ALL
        SELECT 'gen_100k', count(*), count(DISTINCT (x, t_x, \"T\")) FROM bench.gen_100k UNION ALL
        SELECT 'gen_1m', count(*), count(DISTINCT (x, t_x, \"T\")) FROM bench.gen_1m UNION ALL
        SELECT 'pipe_10k', count(*), count(DISTINCT (x, t_x, \"T\")) FROM bench.pipe_10k UNION ALL
        SELECT 'pipe_100k', count(*), count(DISTINCT (x, t_x, \"T\")) FROM bench.pipe_100k UNION ALL
        SELECT 'pipe_1m', count(*), count(DISTINCT (x, t_x, \"T\")) FROM bench.pipe_1m) s" | sed 's/^/| /; s/$/ |/')

bench_record clv <<MD
# The CLV fit: quasi-Newton on grouped customers against Nelder-Mead

\`bgnbd_fit\` and \`gamma_gamma_fit\` together over one summary table
(\`SELECT bgnbd_fit(x, t_x, "T"), gamma_gamma_fit(x, m_x) FROM ...\`), by
\`customer_analytics.clv_fit_method\`: \`quasi_newton\` (the default: bounded
BFGS with analytic gradients over the grouped customers), \`nelder_mead\`
(version 0.1's restarted Nelder-Mead over the grouped customers: "before")
and \`nelder_mead_ungrouped\` (the same over every customer: the naive fit).
Same run, same data; quasi-Newton median of $RUNS runs, the searches once
each, stopped after $SLOW_LIMIT s; the naive fit is not run at 1M.
"ratio" is time / the quasi-Newton time; "rel. diff" the log-likelihood's
relative difference from the quasi-Newton fit's.

| shop | customers | method | time | ratio | BG/NBD log-likelihood | rel. diff | Gamma-Gamma log-likelihood | rel. diff | bgnbd_fit_status |
|---|---:|---|---:|---:|---:|---:|---:|---:|---|
$table

Customers and distinct (x, t_x, T) histories:

| table | customers | distinct histories |
|---|---:|---:|
$distinct

The generator's shop: \`generate_sample_data(10000 customers, 365 days,
seed 7)\` transformed, its \`clv_summary\` as of 2026-01-01, repeated 10 and
100 times with T lengthened by 0..9 and 0..49 days. The pipeline shop: the
order stream of \`bench/pipeline.sh\` (orders uniformly over 700 days, each
to a customer chosen by hash), summarised by purchase day as
\`clv_summary\` does: a Poisson stream in which nobody drops out, where the
likelihood keeps rising as the dropout probability goes to 0.

The whole refresh of \`clv_model\` (\`REFRESH MATERIALIZED VIEW\`, what
\`run_pipeline()\`'s clv step runs: \`clv_summary\` over every order line,
both fits, the row written) on each shop's star schema, against the same
refresh over version 0.2's SQL \`clv_summary\` ("before"; the same fits).
The generator's shop is \`generate_sample_data(n customers, 365 days, seed
7)\` transformed, as of 2026-01-01; the pipeline shop is \`bench/pipeline.sh\`'s
star schema (n customers, 4n orders of 1-4 lines over 700 days), as of
2025-12-01. Median of $RUNS rounds, the four timed in turn in each round.
"same rows": the C summary's rows equal the SQL's; "rel. diff": the BG/NBD
log-likelihood of the two refreshes.

| shop | customers | order lines | customers summarised | distinct histories | \`clv_summary\` | SQL \`clv_summary\` (before) | refresh | refresh before | ratio | same rows | bgnbd_fit_status | rel. diff |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|
$refresh_table
MD
