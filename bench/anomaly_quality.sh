#!/usr/bin/env bash
# How well detect_anomalies() finds the anomalies the generator plants
# (sample_anomaly): the anomalies view (count method) beside the previous
# default (seasonal, sqrt scale), on three seeds and three shop sizes, per
# kind of anomaly; then how many days each flags on two real exports.  Not
# a timing: recall and precision, written to bench/results/anomaly_quality.md.
#
# Recall: planted anomalies flagged on their own series and day.
# Precision: flagged points that a planted anomaly really moves: the
# category it was planted in, the shop total on any planted day (a flash
# sale or a stock-out changes the shop's orders too), and every category on
# a shop-wide drop.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ensure_root "$@"
SEEDS=${SEEDS:-"42 7 99"}            # reported; the defaults were chosen on seeds 1 2 3
SIZES=${SIZES:-"5000 10000 50000"}
DATA=${CA_SHARED_DATA:-$REPO/../shared/data}

install_packages
build_and_install || die "build failed"
bench_start
trap bench_stop EXIT

db_psql() {
    local db=$1
    shift
    as_pg_user psql -X -q -v ON_ERROR_STOP=1 -h "$BENCH_OUT" -p "$BENCH_PORT" -U postgres -d "$db" "$@"
}

# The methods compared, each over the series of the query %s (series, ts, orders)
# (label, method, window_size, seasons, false alarms per series and year,
# same-day FDR, min_relative_change, scale)
METHODS="('count (the view''s: false alarms 0.5 per series and year, same-day FDR 0.05, changes to x0.5 or x2)', 'count', 112, 8, 0.5, 0.05, 0.5, 'linear'),
         ('count, false alarms 0.3, same-day FDR 0.05, changes to x0.5 or x2', 'count', 112, 8, 0.3, 0.05, 0.5, 'linear'),
         ('count, false alarms 1, same-day FDR 0.05, changes to x0.5 or x2', 'count', 112, 8, 1.0, 0.05, 0.5, 'linear'),
         ('count, false alarms 0.5, same-day rule off, changes to x0.5 or x2', 'count', 112, 8, 0.5, 0.0, 0.5, 'linear'),
         ('count, false alarms 0.5, same-day FDR 0.05, every change', 'count', 112, 8, 0.5, 0.05, 0.0, 'linear'),
         ('count, false alarms 0.3, same-day rule off, every change (the settings of the count method first merged)', 'count', 112, 8, 0.3, 0.0, 0.0, 'linear'),
         ('seasonal, sqrt, window 56, changes >= 50% (the default before the count method)', 'seasonal', 56, 4, 0.3, 0.0, 0.5, 'sqrt')"
flag_sql() {   # $1: query of the series; $2: table to fill (label, series, day)
    cat <<SQL
CREATE TEMP TABLE $2 AS
SELECT c.label, a.series, (a.ts AT TIME ZONE 'UTC')::date AS day
FROM (VALUES $METHODS) c(label, m, w, seasons, far, fdr, mr, sc),
     LATERAL (SELECT set_config('customer_analytics.anomaly_false_alarms_per_year', c.far::text, true)
                     || set_config('customer_analytics.anomaly_same_day_fdr', c.fdr::text, true) AS far) s,
     -- (0 * length(s.far): the settings are made before the call)
     LATERAL customer_analytics.detect_anomalies(\$q\$$1\$q\$, method => c.m, window_size => c.w, seasons => c.seasons,
                                                 min_relative_change => c.mr + 0 * length(s.far), scale => c.sc) a
WHERE a.is_anomaly;
SQL
}

bench_psql -q -c "CREATE TABLE bench.quality (customers int, seed int, label text, kind text, planted int, found int, flagged int, true_flags int)"
bench_psql -q -c "CREATE TABLE bench.calibration (customers int, seed int, points int, sq_ratio float8,
                                                  below_1e3 int, below_1e4 int, sale_days_ratio float8, other_days_ratio float8, false_flags text)"
for size in $SIZES; do
    for seed in $SEEDS; do
        db=q_${size}_${seed}
        log "shop of $size customers, seed $seed"
        bench_psql -q -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
        db_psql "$db" -c "CREATE EXTENSION customer_analytics" \
            -c "SELECT count(*) FROM customer_analytics.generate_sample_data(customers => $size, days => 365, seed => $seed, events => false)" \
            -c "SELECT count(*) FROM customer_analytics.transform()" \
            -c "SELECT customer_analytics.refresh_sales_views()" >/dev/null
        db_psql "$db" -At -F '|' <<SQL | while IFS='|' read -r label kind planted found flagged tf; do
CREATE TEMP TABLE truth AS
SELECT series, day FROM customer_analytics.sample_anomaly
UNION SELECT 'total', day FROM customer_analytics.sample_anomaly
UNION SELECT c.category, s.day FROM customer_analytics.sample_anomaly s
      CROSS JOIN (SELECT DISTINCT category FROM customer_analytics.product_category_sales) c
      WHERE s.series = 'total';
CREATE TEMP TABLE planted AS
SELECT series, day, CASE WHEN kind = 'spike' THEN 'spike' WHEN series = 'total' THEN 'shop-wide drop' ELSE 'category drop' END AS kind
FROM customer_analytics.sample_anomaly;
$(flag_sql "SELECT series, ts, orders FROM customer_analytics.order_count_series" flagged)
INSERT INTO flagged SELECT 'view anomalies', series, day FROM customer_analytics.anomalies;
SELECT l.label, k.kind, (SELECT count(*) FROM planted p WHERE p.kind = k.kind),
       (SELECT count(*) FROM planted p JOIN flagged f USING (series, day) WHERE f.label = l.label AND p.kind = k.kind),
       (SELECT count(*) FROM flagged f WHERE f.label = l.label),
       (SELECT count(*) FROM flagged f JOIN truth USING (series, day) WHERE f.label = l.label)
FROM (SELECT DISTINCT label FROM flagged) l, (VALUES ('spike'), ('category drop'), ('shop-wide drop')) k(kind);
SQL
            bench_psql -q -c "INSERT INTO bench.quality VALUES ($size, $seed, '${label//\'/\'\'}', '$kind', $planted, $found, $flagged, $tf)"
        done
        # Is the view's model right where nothing was planted?  Over the
        # points no planted anomaly moves (after the first 28 days): the
        # squared residual over the expected count (the model's own is 1 +
        # the baseline's relative variance x expected: ~1/56 + 1/16 + the
        # growth's share at any size), how many tail probabilities fall below 1e-3 and 1e-4
        # (a calibrated model: the points x 1e-3, x 1e-4); the other
        # categories on a flash-sale day against the expected (the
        # generator's orders have lines in several categories, so a sale
        # lifts them all a little, and that is in no ground truth); and the
        # view's false flags, each with its count, expected count and p.
        db_psql "$db" -At <<SQL | bench_psql -q
CREATE TEMP TABLE truth AS
SELECT series, day FROM customer_analytics.sample_anomaly
UNION SELECT 'total', day FROM customer_analytics.sample_anomaly
UNION SELECT c.category, s.day FROM customer_analytics.sample_anomaly s
      CROSS JOIN (SELECT DISTINCT category FROM customer_analytics.product_category_sales) c
      WHERE s.series = 'total';
CREATE TEMP TABLE scored AS
SELECT a.series, (a.ts AT TIME ZONE 'UTC')::date AS day, a.value, a.expected, a.p_value, a.is_anomaly,
       t.day IS NOT NULL AS moved,
       EXISTS (SELECT FROM customer_analytics.sample_anomaly s
               WHERE s.kind = 'spike' AND s.series <> a.series AND a.series <> 'total'
                 AND s.day = (a.ts AT TIME ZONE 'UTC')::date) AS other_sale
FROM customer_analytics.detect_anomalies('customer_analytics.order_count_series'::regclass, 'series', 'ts', 'orders',
        method => 'count', window_size => 112, seasons => 8, min_relative_change => 0.5) a
LEFT JOIN truth t ON t.series = a.series AND t.day = (a.ts AT TIME ZONE 'UTC')::date
WHERE a.ts >= (SELECT min(ts) FROM customer_analytics.order_count_series) + interval '28 days';
SELECT format('INSERT INTO bench.calibration VALUES ($size, $seed, %s, %s, %s, %s, %s, %s, %L);',
              count(*) FILTER (WHERE NOT moved AND p_value IS NOT NULL),
              avg((value - expected) ^ 2 / expected) FILTER (WHERE NOT moved AND p_value IS NOT NULL),
              count(*) FILTER (WHERE NOT moved AND p_value < 1e-3),
              count(*) FILTER (WHERE NOT moved AND p_value < 1e-4),
              sum(value) FILTER (WHERE NOT moved AND other_sale) / sum(expected) FILTER (WHERE NOT moved AND other_sale),
              sum(value) FILTER (WHERE NOT moved AND NOT other_sale AND series <> 'total')
                / sum(expected) FILTER (WHERE NOT moved AND NOT other_sale AND series <> 'total'),
              COALESCE(string_agg(format('%s %s: %s for %s, p %s%s', series, day, value, round(expected::numeric, 1),
                                         trim(to_char(p_value, '9.9EEEE')), CASE WHEN other_sale THEN ', a flash sale in another category' ELSE '' END),
                                  '; ' ORDER BY day, series) FILTER (WHERE is_anomaly AND NOT moved), ''))
FROM scored;
SQL
        bench_psql -q -c "DROP DATABASE $db"
    done
done

# Real data: UCI Online Retail loaded by its recipe (docs/recipes/), the
# anomalies view before and after its calendar is entered (the UK bank
# holidays of 2010-2011, Easter Sunday, the Christmas closure; Saturdays are
# recognised from the data).  No planted truth here: what counts is that
# no closed day is flagged.
SHARED=${CA_SHARED_DATA:-$REPO/../shared/data}
if [ -f "$SHARED/online_retail/online_retail_2010_2011.csv" ]; then
    log "UCI Online Retail"
    bench_psql -q -c "DROP DATABASE IF EXISTS retail" -c "CREATE DATABASE retail"
    db_psql retail -c "CREATE EXTENSION customer_analytics" -v retail_csv="$SHARED/online_retail/online_retail_2010_2011.csv" \
        -f "$REPO/docs/recipes/online_retail.sql" >/dev/null
    REAL_ROWS=$(db_psql retail -At -v calendar="$REPO/docs/recipes/online_retail_calendar.sql" <<'SQL'
CREATE TEMP TABLE result (label text, total_flags bigint, closed_total bigint, all_flags bigint, closed_all bigint, open_total text);
SELECT customer_analytics.refresh_sales_views(false);
CREATE TEMP TABLE flagged_before AS SELECT * FROM customer_analytics.anomalies;
\i :calendar
INSERT INTO result
SELECT 'without the calendar', count(*) FILTER (WHERE a.series = 'total'),
       count(*) FILTER (WHERE a.series = 'total' AND c.day IS NOT NULL),
       count(*), count(*) FILTER (WHERE c.day IS NOT NULL),
       string_agg(format('%s %s (%s for %s)', a.day, to_char(a.day, 'Dy'), a.orders, a.expected), ', ' ORDER BY a.day)
           FILTER (WHERE a.series = 'total' AND c.day IS NULL)
FROM flagged_before a LEFT JOIN customer_analytics.closed_days('2010-12-01', '2011-12-31') c USING (day);
SELECT customer_analytics.refresh_sales_views(false);
INSERT INTO result
SELECT 'with the calendar', count(*) FILTER (WHERE a.series = 'total'),
       count(*) FILTER (WHERE a.series = 'total' AND c.day IS NOT NULL),
       count(*), count(*) FILTER (WHERE c.day IS NOT NULL),
       string_agg(format('%s %s (%s for %s)', a.day, to_char(a.day, 'Dy'), a.orders, a.expected), ', ' ORDER BY a.day)
           FILTER (WHERE a.series = 'total' AND c.day IS NULL)
FROM customer_analytics.anomalies a LEFT JOIN customer_analytics.closed_days('2010-12-01', '2011-12-31') c USING (day);
SELECT string_agg(format('| UCI Online Retail 2010-2011, %s | %s | %s | %s | %s | %s |',
                         label, total_flags, closed_total, all_flags, closed_all, open_total), E'\n' ORDER BY label DESC)
FROM result;
SQL
)
    REAL_ROWS=$(printf '%s\n' "$REAL_ROWS" | grep '^|')
    bench_psql -q -c "DROP DATABASE retail"
fi

table() {
    bench_value "
        WITH k AS (SELECT customers, label, kind, sum(planted) AS planted, sum(found) AS found
                   FROM bench.quality GROUP BY 1, 2, 3),
             s AS (SELECT customers, seed, label, sum(planted) AS planted, sum(found) AS found,
                          max(flagged) AS flagged, max(true_flags) AS tf
                   FROM bench.quality GROUP BY 1, 2, 3),
             t AS (SELECT customers, label, sum(planted) AS planted, sum(found) AS found, sum(flagged) AS flagged,
                          sum(tf) AS tf,
                          string_agg(format('%s: %s/%s, %s/%s', seed, found, planted, tf, flagged), '; ' ORDER BY seed) AS per_seed
                   FROM s GROUP BY 1, 2)
        SELECT string_agg(format('| %s | %s | %s%% (%s/%s) | %s%% (%s/%s) | %s | %s | %s | %s |', t.customers, t.label,
                                 round(100.0 * t.found / t.planted, 1), t.found, t.planted,
                                 round(100.0 * t.tf / NULLIF(t.flagged, 0), 1), t.tf, t.flagged,
                                 (SELECT found || '/' || planted FROM k WHERE (k.customers, k.label, k.kind) = (t.customers, t.label, 'spike')),
                                 (SELECT found || '/' || planted FROM k WHERE (k.customers, k.label, k.kind) = (t.customers, t.label, 'category drop')),
                                 (SELECT found || '/' || planted FROM k WHERE (k.customers, k.label, k.kind) = (t.customers, t.label, 'shop-wide drop')),
                                 t.per_seed),
                          E'\n' ORDER BY t.customers, t.label <> 'view anomalies', t.label)
        FROM t"
}

calibration_table() {
    bench_value "
        SELECT string_agg(format('| %s | %s | %s | %s (%s) | %s (%s) | %s | %s |', customers, points, round(sq::numeric, 3),
                                 b3, round(points * 1e-3, 1), b4, round(points * 1e-4, 1),
                                 round(sale::numeric, 3), round(other::numeric, 3)), E'\n' ORDER BY customers)
        FROM (SELECT customers, sum(points) AS points, sum(sq_ratio * points) / sum(points) AS sq,
                     sum(below_1e3) AS b3, sum(below_1e4) AS b4, avg(sale_days_ratio) AS sale, avg(other_days_ratio) AS other
              FROM bench.calibration GROUP BY 1) c"
}

false_flags() {
    bench_value "
        SELECT string_agg(format('| %s | %s | %s |', customers, seed, COALESCE(NULLIF(false_flags, ''), 'none')), E'\n' ORDER BY customers, seed)
        FROM bench.calibration"
}

# Real exports, read in place: Online Retail (invoices a day, the shop as a
# whole: no categories) and the Olist 2017 sample (orders a day, in total
# and for its 8 biggest categories).  Every day from the first to the last.
real() {
    [ -f "$DATA/online_retail/online_retail_2010_2011.csv" ] && [ -d "$DATA/olist/subset_2017_10k" ] || {
        echo "(skipped: the real data sets are not in $DATA)"
        return
    }
    bench_psql -q -c "DROP DATABASE IF EXISTS q_real" -c "CREATE DATABASE q_real"
    db_psql q_real -c "CREATE EXTENSION customer_analytics" >/dev/null
    db_psql q_real -At -F '|' <<SQL
CREATE TEMP TABLE retail (invoice_no text, stock_code text, description text, quantity integer,
                          invoice_date timestamp, unit_price numeric, customer_id integer, country text);
COPY retail FROM '$DATA/online_retail/online_retail_2010_2011.csv' WITH (FORMAT csv, HEADER);
CREATE TEMP TABLE olist_orders (order_id text, customer_id text, status text, purchased timestamp, a text, b text, c text, d text);
COPY olist_orders FROM '$DATA/olist/subset_2017_10k/orders.csv' WITH (FORMAT csv, HEADER);
CREATE TEMP TABLE olist_items (order_id text, item int, product_id text, seller_id text, s text, price numeric, freight numeric);
COPY olist_items FROM '$DATA/olist/subset_2017_10k/order_items.csv' WITH (FORMAT csv, HEADER);
CREATE TEMP TABLE olist_products (product_id text, category text, a text, b text, c text, d text, e text, f text, g text);
COPY olist_products FROM '$DATA/olist/subset_2017_10k/products.csv' WITH (FORMAT csv, HEADER);
CREATE TEMP TABLE olist_names (category text, english text);
COPY olist_names FROM '$DATA/olist/subset_2017_10k/product_category_name_translation.csv' WITH (FORMAT csv, HEADER);

CREATE TABLE retail_series AS
SELECT 'total'::text AS series, g::timestamp AT TIME ZONE 'UTC' AS ts, count(DISTINCT r.invoice_no) AS orders
FROM generate_series((SELECT min(invoice_date)::date FROM retail), (SELECT max(invoice_date)::date FROM retail), interval '1 day') g
LEFT JOIN retail r ON r.invoice_date::date = g::date AND r.invoice_no NOT LIKE 'C%' AND r.invoice_no NOT LIKE 'A%' AND r.quantity > 0
GROUP BY g;
CREATE TEMP TABLE olist_lines AS
SELECT o.order_id, o.purchased::date AS day, COALESCE(n.english, p.category, 'unknown') AS category
FROM olist_orders o JOIN olist_items i USING (order_id) LEFT JOIN olist_products p USING (product_id)
LEFT JOIN olist_names n ON n.category = p.category
WHERE o.status NOT IN ('canceled', 'unavailable');
CREATE TABLE olist_series AS
WITH days AS (SELECT g::date AS day FROM generate_series((SELECT min(day) FROM olist_lines), (SELECT max(day) FROM olist_lines), interval '1 day') g),
     top AS (SELECT category FROM olist_lines GROUP BY 1 ORDER BY count(DISTINCT order_id) DESC, 1 LIMIT 8)
SELECT s.series, d.day::timestamp AT TIME ZONE 'UTC' AS ts, count(DISTINCT l.order_id) AS orders
FROM days d CROSS JOIN (SELECT category AS series FROM top UNION ALL SELECT 'total') s
LEFT JOIN olist_lines l ON l.day = d.day AND (s.series = 'total' OR l.category = s.series)
GROUP BY 1, 2;
$(flag_sql "SELECT series, ts, orders FROM retail_series" retail_flags)
$(flag_sql "SELECT series, ts, orders FROM olist_series" olist_flags)
SELECT 'Online Retail 2010-12-01 .. 2011-12-09 (' || (SELECT count(*) FROM retail_series) || ' days, '
       || (SELECT round(avg(orders)) FROM retail_series WHERE orders > 0) || ' invoices a trading day), total',
       l.label, count(f.day), COALESCE(string_agg(f.day || ' ' || to_char(f.day, 'Dy'), ', ' ORDER BY f.day), '')
FROM (VALUES $METHODS) l(label) LEFT JOIN retail_flags f USING (label) GROUP BY 1, 2
UNION ALL
SELECT 'Olist 2017 sample (' || (SELECT count(DISTINCT ts) FROM olist_series) || ' days, '
       || (SELECT round(avg(orders)) FROM olist_series WHERE series = 'total') || ' orders a day), total and 8 categories',
       l.label, count(f.day), COALESCE(string_agg(f.series || ' ' || f.day, ', ' ORDER BY f.day, f.series), '')
FROM (VALUES $METHODS) l(label) LEFT JOIN olist_flags f USING (label) GROUP BY 1, 2
ORDER BY 1 DESC, 2;
SQL
    bench_psql -q -c "DROP DATABASE q_real"
}
REAL=$(real | awk -F '|' 'NF >= 4 { printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 } NF < 4 { print }')

bench_record anomaly_quality <<MD
# Anomaly detection quality on the generator's planted anomalies

\`generate_sample_data(customers, days => 365, seed)\` plants 11 anomalies
a year: 6 flash-sale spikes (x3-x4 on a category's share of new orders),
3 stock-outs of one of the two biggest categories (x0-0.05 of its share)
and 2 shop-wide outages (x0.25-0.4); \`transform()\`, then the views.
Every (category, day) and (total, day) point is scored; seeds: $SEEDS. (The
defaults were chosen on seeds 1, 2 and 3, then measured here on other
seeds.)

- **recall**: planted anomalies flagged on their own series and day;
- **precision**: flagged points that a planted anomaly moves (its category,
  the shop total on any planted day, every category on an outage day).

Per kind: found/planted over the three seeds. Per seed: found/planted, true
flags/flags.

| customers | method | recall | precision | spikes | category drops | shop-wide drops | per seed |
|---:|---|---:|---:|---:|---:|---:|---|
$(table)

The view (\`anomalies\`): the count method, \`detect_anomalies(method =>
'count', window_size => 112, seasons => 8, min_relative_change => 0.5)\`:
the expected orders of a day are the level of the 8 previous weeks,
carried forward by the growth fitted over the 112 previous days, times
the weekday's share of those days; the day's count is tested against a
negative binomial with that mean, the baseline's own uncertainty and the
series' overdispersion over the same 112 days when it is significant
(Poisson otherwise), both tails. A point is flagged when its two-sided
tail probability is at most
\`customer_analytics.anomaly_false_alarms_per_year\` (0.5) / 365.25; on a
day with such a flag, the other series that moved the same way are tested
together by Benjamini-Hochberg at
\`customer_analytics.anomaly_same_day_fdr\` (0.05) over the day's
unflagged points (an outage moves every category); and only changes to
half the expected orders or less, or to twice or more, are flagged
(\`min_relative_change\` is a factor either way for counts). Those three
settings were chosen on seeds 1, 2, 3 (the most planted anomalies found
at 10,000 customers with precision >= 90% there and >= 94.1% at 50,000;
a same-day FDR of 0.1 tied on recall there), then measured here. The default before the count method flags a point when the
z and the robust z of its residual (against the median of the same
weekday of the 4 previous weeks, sqrt scale) both pass 3 and it moves by
at least 50%.

What limits a small shop is the size of the planted anomalies, not the
rule: a category's orders include the orders whose other lines fall in
it, so a x3.3 flash sale on a 10-order category gives 18-29 orders, and a
stock-out of Home & Kitchen or Clothing leaves 2-5 orders of 12-16: tail
probabilities of 1e-3 to 1e-1 under the method's own model, where chance
puts ~3,300 points a year. The same-day rule does not find those (they
are alone on their day); it finds the categories of an outage day, which
one by one have tail probabilities of 1e-3 to 0.1.

What a large shop's false flags were: with changes of at least 50% read
linearly (|count - expected| >= 0.5 expected), the view flagged 7 false
points at 50,000 customers on these seeds (92.1% precision), every one a
single category 51-64% above its expected 42-62 orders with p between
9e-5 and 1.3e-3, in windows whose Pearson statistic showed no
overdispersion. The model is calibrated there (next section): such days
are the chance the per-point rule allows, 0.5 a series and year. Read
linearly the rule asks less of a rise than of a fall (x1.5 against x0.5;
log 1.5 = 0.41, log 0.5 = -0.69), and at 60 orders a day chance reaches
90 or more on 3.4e-4 of the days, 30 or fewer on 2.7e-5, 120 or more on
7e-11 (the model's own negative binomial). Read as a factor either way,
the rule asks a rise of what it asks a fall, and they are gone. Planted flash
sales give x2.2 or more at 50,000 customers (54 of them over seeds 1-7,
42, 99); the few below x2 at 10,000 and 5,000 (4 and 6 of 54) had tail
probabilities no rule flags, and no planted anomaly found with the linear
reading is lost on any of those nine seeds.

## Is the model right where nothing was planted?

The view's method (the first row of each size above) over the points that
no planted anomaly moves, after the first 28 days, all three seeds: the
mean squared residual over the expected count (Poisson alone gives 1; the
model adds the baseline's own uncertainty, 1/(orders of the 8-week
level) + 1/(orders of the weekday in the 16-week profile) relative, so
its own ratio is ~1 + 1/56 + 1/16, ~1.1 at every size); how many tail
probabilities fall below 1e-3 and 1e-4 (in parentheses what a
calibrated continuous model gives: the points x 1e-3, x 1e-4; discrete
counts give fewer); and the orders of the other categories on a day with
a flash sale, over their expected orders, beside the same ratio on other
days.

| customers | points | squared residual / expected | p < 1e-3 (nominal) | p < 1e-4 (nominal) | other categories on flash-sale days | on other days |
|---:|---:|---:|---:|---:|---:|---:|
$(calibration_table)

The view's false flags (count for expected, p):

| customers | seed | false flags |
|---:|---:|---|
$(false_flags)

## Real exports: days flagged

| data | method | flagged | which |
|---|---|---:|---|
$REAL

## Real data: closed days

UCI Online Retail loaded by [its recipe](../../docs/recipes.md), the \`anomalies\`
view (default method) before and after the shop's calendar is entered: the
UK bank holidays of 2010-2011, Easter Sunday and the Christmas closure
(Saturdays, when the shop never trades, are recognised from the data by
\`idle_weekdays()\`). No planted truth: a flag on a closed day is a false
alarm by definition.

| data | flags on the shop total | of them closed days | flags (all series) | of them closed days | open days flagged on the total (invoices for expected) |
|---|---:|---:|---:|---:|---|
${REAL_ROWS:-| (the data set is not present on this machine) | | | | | |}

Reproduce: \`./bench/anomaly_quality.sh\` (as root; SEEDS and SIZES override the defaults).
MD
