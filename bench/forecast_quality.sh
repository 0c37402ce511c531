#!/usr/bin/env bash
# Forecast quality, not speed: the 28-day Holt-Winters forecast against the
# seasonal-naive forecast (same weekday of the last week), by mean absolute
# percentage error over a 28-day holdout (and, on Online Retail, by WAPE:
# the absolute errors of all 28 days over the actual total, with and
# without the shop's calendar, and against statsmodels' ETS(A,Ad,A) where
# python3-statsmodels is installed).  On the generator's shop (three
# seeds, 10,000 customers, a year) through sales_forecast_backtest(), and
# on the public data sets in ../shared/data where present (UCI Online
# Retail 2010-2011, the Olist 2017 subset), read in place with COPY.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ensure_root "$@"
SEEDS=${SEEDS:-"1 2 3"}
SHARED=${CA_SHARED_DATA:-$REPO/../shared/data}

install_packages
build_and_install || die "build failed"
bench_start
trap bench_stop EXIT

bench_psql -q -c "CREATE EXTENSION customer_analytics"
# a daily series backtested the way sales_forecast_backtest() does it
bench_psql -q <<'SQL'
CREATE TABLE bench.series (source text, day date, revenue float8, PRIMARY KEY (source, day));
-- closed: the shop's closed days, left out of the fit (NULL) and forecast
-- as 0, as sales_forecast does with closed_days()
CREATE FUNCTION bench.backtest(src text, last_day date, holdout int DEFAULT 28, closed date[] DEFAULT '{}')
RETURNS TABLE (mape_hw float8, mape_naive float8, days int, wape_hw float8, wape_naive float8, seasonality text)
LANGUAGE sql AS $$
    WITH s AS (
        SELECT g.day::date AS day, COALESCE(x.revenue, 0) AS revenue
        FROM generate_series((SELECT min(day) FROM bench.series WHERE source = src), last_day, interval '1 day') g(day)
        LEFT JOIN bench.series x ON x.source = src AND x.day = g.day::date
    ),
    m AS (SELECT customer_analytics.holt_winters(day, CASE WHEN day = ANY (closed) THEN NULL ELSE revenue END) AS m
          FROM s WHERE day <= last_day - holdout),
    sc AS (
        SELECT a.revenue AS actual, CASE WHEN f.ts = ANY (closed) THEN 0 ELSE f.yhat END AS yhat, n.revenue AS naive,
               (m.m).seasonality
        FROM m CROSS JOIN LATERAL customer_analytics.forecast(m.m, holdout) f
        JOIN s a ON a.day = f.ts
        JOIN s n ON n.day = (m.m).last_ts - 6 + ((f.ts - (m.m).last_ts - 1) % 7)
    )
    SELECT 100 * avg(abs(actual - yhat) / actual) FILTER (WHERE actual > 0),
           100 * avg(abs(actual - naive) / actual) FILTER (WHERE actual > 0),
           (count(*) FILTER (WHERE actual > 0))::int,
           100 * sum(abs(actual - yhat)) / sum(actual),
           100 * sum(abs(actual - naive)) / sum(actual), min(seasonality)
    FROM sc
$$;
SQL
# the calendar of the Online Retail shop (its recipe's); its Saturdays are
# found from the data below, as idle_weekdays() does
bench_psql -q -f "$REPO/docs/recipes/online_retail_calendar.sql" \
    -c "CREATE TABLE bench.uk_closed AS SELECT day, name FROM customer_analytics.closed_day" \
    -c "TRUNCATE customer_analytics.closed_day"

{
echo "# Sales forecast quality: Holt-Winters vs seasonal naive"
echo
echo "28-day holdout at the end of each series; MAPE (%) over the holdout days with sales;"
echo "improvement = 1 - MAPE(Holt-Winters) / MAPE(seasonal naive). Parameters fitted on the"
echo "history before the holdout (one-step squared error, Nelder-Mead); the seasonality additive, or"
echo "multiplicative (factors) for a series positive on every open day when that fits with the"
echo "smaller one-step error; the final seasonal terms shrunk towards each other by empirical Bayes."
echo
echo "| data | series | MAPE Holt-Winters | MAPE seasonal naive | improvement |"
echo "|---|---|---:|---:|---:|"
for seed in $SEEDS; do
    log "generator seed $seed"
    bench_psql -q -c "TRUNCATE customer_analytics.stg_customers, customer_analytics.stg_products,
                          customer_analytics.stg_orders, customer_analytics.stg_events,
                          customer_analytics.fact_order_line, customer_analytics.fact_event,
                          customer_analytics_internal.transform_state, customer_analytics.sample_anomaly" \
        -c "SELECT count(*) FROM customer_analytics.generate_sample_data(customers => 10000, days => 365, seed => $seed, events => false)" \
        -c "SELECT count(*) FROM customer_analytics.transform()" -c "SELECT customer_analytics.refresh_sales_rollup()" -c "ANALYZE" >/dev/null
    bench_psql -At -F ' | ' -c "
        SELECT '| generator seed $seed', CASE WHEN scope = 'total' THEN 'total' ELSE category END,
               round(mape_holt_winters::numeric, 1), round(mape_seasonal_naive::numeric, 1),
               round(100 * improvement::numeric, 1) || '% |'
        FROM customer_analytics.sales_forecast_backtest()
        ORDER BY scope DESC, category"
    bench_psql -At -F ' | ' -c "
        SELECT '| generator seed $seed', 'median of the 8 categories',
               round((percentile_cont(0.5) WITHIN GROUP (ORDER BY mape_holt_winters))::numeric, 1),
               round((percentile_cont(0.5) WITHIN GROUP (ORDER BY mape_seasonal_naive))::numeric, 1),
               round(100 * (percentile_cont(0.5) WITHIN GROUP (ORDER BY improvement))::numeric, 1) || '% |'
        FROM customer_analytics.sales_forecast_backtest() WHERE scope = 'category'"
done

if [ -f "$SHARED/online_retail/online_retail_2010_2011.csv" ]; then
    log "UCI Online Retail"
    bench_psql -q -c "CREATE TABLE bench.online_retail (invoice_no text, stock_code text, description text,
                          quantity integer, invoice_date timestamp, unit_price numeric, customer_id integer, country text)" \
        -c "COPY bench.online_retail FROM '$SHARED/online_retail/online_retail_2010_2011.csv' WITH (FORMAT csv, HEADER)" \
        -c "INSERT INTO bench.series
            SELECT 'online_retail', invoice_date::date, sum(quantity * unit_price)
            FROM bench.online_retail
            WHERE invoice_no NOT LIKE 'C%' AND invoice_no NOT LIKE 'A%' AND quantity > 0 AND unit_price > 0
            GROUP BY 2"
    # 2011-12-09 is a partial day (the export stops at noon): end the day before
    bench_psql -At -F ' | ' -c "
        SELECT '| UCI Online Retail 2010-2011 (holdout to 2011-12-08)', 'total',
               round(mape_hw::numeric, 1), round(mape_naive::numeric, 1),
               round(100 * (1 - mape_hw / mape_naive)::numeric, 1) || '% |'
        FROM bench.backtest('online_retail', '2011-12-08')"
    # WAPE on the issue's holdout, 2011-11-11 .. 2011-12-08 (training to
    # 2011-11-10): Holt-Winters without and with the calendar, the seasonal
    # naive forecast, statsmodels' ETS(A,Ad,A) on the same series
    closed="ARRAY(SELECT day FROM bench.uk_closed
                  UNION SELECT d::date FROM generate_series('2010-12-01'::date, '2011-12-31', interval '1 day') d
                  WHERE extract(isodow FROM d) IN (SELECT w FROM generate_series(1, 7) w
                      WHERE NOT EXISTS (SELECT FROM bench.series x WHERE x.source = 'online_retail'
                                        AND extract(isodow FROM x.day) = w)))"
    WAPE_ROWS=$(bench_psql -At -F ' | ' -c "
        SELECT '| seasonal naive (same weekday of the last training week)', round(wape_naive::numeric, 1),
               round(mape_naive::numeric, 1) || ' |'
        FROM bench.backtest('online_retail', '2011-12-08')
        UNION ALL
        SELECT '| Holt-Winters, every day a trading day (closed days are zeros; ' || seasonality || ')',
               round(wape_hw::numeric, 1), round(mape_hw::numeric, 1) || ' |'
        FROM bench.backtest('online_retail', '2011-12-08')
        UNION ALL
        SELECT '| Holt-Winters with the calendar (fitted on open days, 0 on closed days; ' || seasonality || ')',
               round(wape_hw::numeric, 1), round(mape_hw::numeric, 1) || ' |'
        FROM bench.backtest('online_retail', '2011-12-08', 28, $closed)")
    # the series, its closed days and its orders (invoices) per day for the
    # Python comparisons below
    bench_psql -At -F , -c "
        SELECT g.day::date, COALESCE(x.revenue, 0), (g.day::date = ANY ($closed))::int, COALESCE(o.orders, 0)
        FROM generate_series('2010-12-01'::date, '2011-12-08', interval '1 day') g(day)
        LEFT JOIN bench.series x ON x.source = 'online_retail' AND x.day = g.day::date
        LEFT JOIN (SELECT invoice_date::date AS day, count(DISTINCT invoice_no) AS orders
                   FROM bench.online_retail
                   WHERE invoice_no NOT LIKE 'C%' AND invoice_no NOT LIKE 'A%' AND quantity > 0 AND unit_price > 0
                   GROUP BY 1) o ON o.day = g.day::date
        ORDER BY 1" \
        >"$BENCH_OUT/online_retail_series.csv"
    if /usr/bin/python3 -c 'import statsmodels' 2>/dev/null; then
        ets=$(/usr/bin/python3 - "$BENCH_OUT/online_retail_series.csv" 2011-11-10 2011-12-08 <<'PY'
import csv, sys, warnings
warnings.filterwarnings("ignore")
from statsmodels.tsa.holtwinters import ExponentialSmoothing
path, last_train, last_day = sys.argv[1:4]
rows = [(d, float(v)) for d, v, *_ in csv.reader(open(path))]
train = [v for d, v in rows if d <= last_train]
test = [v for d, v in rows if last_train < d <= last_day]
fit = ExponentialSmoothing(train, trend="add", damped_trend=True, seasonal="add", seasonal_periods=7).fit()
pred = fit.forecast(len(test))
mape = 100 * sum(abs(a - p) / a for a, p in zip(test, pred) if a > 0) / sum(1 for a in test if a > 0)
wape = 100 * sum(abs(a - p) for a, p in zip(test, pred)) / sum(test)
print(f"{wape:.1f} | {mape:.1f}")
PY
)
        WAPE_ROWS="$WAPE_ROWS
| statsmodels ExponentialSmoothing ETS(A,Ad,A), weekly, fitted by statsmodels | $ets |"
    fi
    # principled changes to the method, each measured beside a Python port
    # of forecast.c on the same series (bench/forecast_variants.py)
    if /usr/bin/python3 -c 'import numpy' 2>/dev/null; then
        VARIANT_ROWS=$(/usr/bin/python3 "$BENCH_DIR/forecast_variants.py" \
            "$BENCH_OUT/online_retail_series.csv" 2011-11-10 2011-12-08)
    fi
    # CLV out of sample: BG/NBD fitted on the history before a cut-off day,
    # expected purchase days in the next 90 days against what happened
    bench_psql -q -c "CREATE TABLE bench.retail_days AS
        SELECT customer_id, invoice_date::date AS day, sum(quantity * unit_price)::float8 AS revenue
        FROM bench.online_retail
        WHERE customer_id IS NOT NULL AND invoice_no NOT LIKE 'C%' AND invoice_no NOT LIKE 'A%'
          AND quantity > 0 AND unit_price > 0
        GROUP BY 1, 2"
    bench_psql -q <<'SQL'
CREATE FUNCTION bench.clv_holdout(cutoff date, days int DEFAULT 90)
RETURNS TABLE (customers bigint, predicted float8, actual bigint, r float8, alpha float8, a float8, b float8)
LANGUAGE sql AS $$
    WITH calib AS (
        SELECT customer_id, count(*) - 1 AS x, max(day) - min(day) AS t_x, cutoff - min(day) AS "T"
        FROM bench.retail_days WHERE day < cutoff GROUP BY 1
    ),
    fit AS (SELECT customer_analytics.bgnbd_fit(x, t_x, "T") AS bg FROM calib)
    SELECT count(*), sum(customer_analytics.bgnbd_expected_purchases(f.bg, days, c.x, c.t_x, c."T")),
           (SELECT count(*) FROM bench.retail_days d JOIN calib c2 USING (customer_id)
            WHERE d.day >= cutoff AND d.day < cutoff + days),
           min((f.bg).r), min((f.bg).alpha), min((f.bg).a), min((f.bg).b)
    FROM calib c, fit f
$$;
SQL
    CLV_ROWS=$(bench_psql -At -F ' | ' -c "
        SELECT '| ' || c || ' .. ' || (c + 89), customers, round(predicted), actual,
               round((100 * (predicted / actual - 1))::numeric, 1) || '%',
               'r ' || round(r::numeric, 3) || ', alpha ' || round(alpha::numeric, 1) || ' days, a ' ||
               round(a::numeric, 4) || ', b ' || round(b::numeric) || ' |'
        FROM unnest(ARRAY['2011-06-01', '2011-09-09']::date[]) c, LATERAL bench.clv_holdout(c)")
fi

if [ -f "$SHARED/olist/subset_2017_10k/orders.csv" ]; then
    log "Olist 2017 subset"
    bench_psql -q -c "CREATE TABLE bench.olist_orders (order_id text, customer_id text, status text,
                          purchased_at timestamp, approved_at timestamp, carrier_at timestamp,
                          delivered_at timestamp, estimated date)" \
        -c "CREATE TABLE bench.olist_items (order_id text, line_number int, product_id text, seller_id text,
                          shipping_limit timestamp, price numeric, freight numeric)" \
        -c "COPY bench.olist_orders FROM '$SHARED/olist/subset_2017_10k/orders.csv' WITH (FORMAT csv, HEADER)" \
        -c "COPY bench.olist_items FROM '$SHARED/olist/subset_2017_10k/order_items.csv' WITH (FORMAT csv, HEADER)" \
        -c "INSERT INTO bench.series
            SELECT 'olist', o.purchased_at::date, sum(i.price)
            FROM bench.olist_orders o JOIN bench.olist_items i USING (order_id)
            WHERE o.status NOT IN ('canceled', 'unavailable')
            GROUP BY 2"
    last=$(bench_value "SELECT max(day) FROM bench.series WHERE source = 'olist'")
    bench_psql -At -F ' | ' -c "
        SELECT '| Olist 2017 subset (10k orders, holdout to $last)', 'total',
               round(mape_hw::numeric, 1), round(mape_naive::numeric, 1),
               round(100 * (1 - mape_hw / mape_naive)::numeric, 1) || '% |'
        FROM bench.backtest('olist', '$last')"
    # without Black Friday in the holdout
    bench_psql -At -F ' | ' -c "
        SELECT '| Olist 2017 subset, holdout to 2017-11-17', 'total',
               round(mape_hw::numeric, 1), round(mape_naive::numeric, 1),
               round(100 * (1 - mape_hw / mape_naive)::numeric, 1) || '% |'
        FROM bench.backtest('olist', '2017-11-17')"
fi
if [ -n "${WAPE_ROWS:-}" ]; then
    echo
    echo "## UCI Online Retail: WAPE with the shop's calendar"
    echo
    echo "Training to 2011-11-10, holdout 2011-11-11 .. 2011-12-08 (28 days, 4 of them Saturdays,"
    echo "when the shop never trades). WAPE = sum of the absolute errors over all 28 days / the"
    echo "actual total, in %; MAPE over the 24 days with sales. Series: daily sales (invoices"
    echo "neither C nor A, quantity and price positive). Calendar: the Saturdays (no sale on any,"
    echo "found from the data) and the UK bank holidays of 2010-2011, Easter Sunday and the"
    echo "Christmas closure 2010-12-24 .. 2011-01-03. Open holidays: none (every UK bank holiday of"
    echo "the period was a closed day), so the data holds no holiday effect to fit."
    echo
    echo "| forecast | WAPE | MAPE |"
    echo "|---|---:|---:|"
    echo "$WAPE_ROWS"
fi
if [ -n "${VARIANT_ROWS:-}" ]; then
    echo
    echo "### Changes to the method tried on the same series (bench/forecast_variants.py)"
    echo
    echo "A Python port of forecast.c (first row; it must agree with the extension's row above), then"
    echo "the method before its seasonal terms were shrunk (second row); (a) to (d) change one thing"
    echo "of the latter, (e) and (f) build on the method as it is now (the first row). Whatever a"
    echo "variant chooses (a model, a weight) it chooses on the training"
    echo "days: cross-validation over the last 6 origins a week apart whose 28 days end by 2011-11-10."
    echo "A variant replaces the method only if better on both WAPE and MAPE here and not worse overall"
    echo "on the other lines above (README, Sales forecast): (d), empirical Bayes, did."
    echo
    echo "| variant | WAPE | MAPE |"
    echo "|---|---:|---:|"
    echo "$VARIANT_ROWS"
fi
if [ -n "${CLV_ROWS:-}" ]; then
    echo
    echo "## Customer lifetime value out of sample (UCI Online Retail)"
    echo
    echo "BG/NBD fitted on every customer's purchase days before the cut-off (time unit: days);"
    echo "the sum over those customers of the expected purchase days in the next 90 days against"
    echo "the purchase days they made."
    echo
    echo "| 90 days | customers | predicted | actual | error | fitted |"
    echo "|---|---:|---:|---:|---:|---|"
    echo "$CLV_ROWS"
fi
} | bench_record forecast_quality
