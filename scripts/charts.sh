#!/usr/bin/env bash
# Charts of the demo's own output, drawn with gnuplot (package gnuplot-nox)
# from a database where the demo has run (scripts/demo.sh calls this at its
# end; docs/screenshots/ holds one set):
#
#   daily_revenue.png    daily revenue, the anomalies flagged on the shop
#                        total, and the 28-day forecast with its 95% band;
#                        the day in progress (day_in_progress()) is not
#                        drawn as a day: a hollow marker, "so far"
#   rfm_segments.png     revenue and customers per RFM segment
#   funnel.png           the clickstream funnel, overall and per channel
#   pipeline_runs.png    pipeline_run, the steps of the pg_cron run and
#                        pg_cron's cron.job_run_details, as psql shows them
#
# The database is the one the usual PG* variables (PGHOST, PGPORT, PGUSER,
# PGDATABASE) name.  The data behind each chart is kept in <dir>/data/.
#
#   ./scripts/charts.sh [output directory, default ./charts]
set -euo pipefail

OUT=${1:-charts}
mkdir -p "$OUT/data"
OUT=$(cd "$OUT" && pwd)
DATA=$OUT/data
command -v gnuplot >/dev/null || { echo "charts.sh: gnuplot is not installed (apt-get install gnuplot-nox)" >&2; exit 1; }

PSQL=(psql -X -q -v ON_ERROR_STOP=1)
tsv() {   # tsv <file> <query>: unaligned, tab-separated, no header
    "${PSQL[@]}" -At -F $'\t' -c "$2" >"$DATA/$1"
}
FONT="DejaVu Sans,10"

# --- daily revenue, anomalies, forecast ------------------------------------
# The day in progress (today on a live shop, or an export cut during its
# last day) is not a whole day: a line through it would show a collapse
# every morning.  It is left out of the line and marked apart, with the
# time of its last order.  sql/63_calendar.sql runs these two queries.
tsv daily.tsv "
    SELECT s.day, s.revenue FROM customer_analytics.daily_sales s
    WHERE s.day IS DISTINCT FROM customer_analytics.day_in_progress() ORDER BY s.day"
tsv partial.tsv "
    SELECT s.day, s.revenue,
           (SELECT to_char(max(f.order_ts) AT TIME ZONE customer_analytics.business_timezone(), 'HH24:MI')
            FROM customer_analytics.fact_order_line f WHERE f.status = 'completed')
    FROM customer_analytics.daily_sales s WHERE s.day = customer_analytics.day_in_progress()"
tsv anomalies.tsv "
    SELECT a.day, s.revenue, a.direction, a.orders, round(a.expected::numeric, 1)
    FROM customer_analytics.anomalies a JOIN customer_analytics.daily_sales s USING (day)
    WHERE a.series = 'total' ORDER BY a.day"
tsv category_anomalies.tsv "
    SELECT a.day, count(*), string_agg(a.series || ' ' || a.direction, ', ' ORDER BY a.series)
    FROM customer_analytics.anomalies a WHERE a.series <> 'total' GROUP BY a.day ORDER BY a.day"
tsv forecast.tsv "
    SELECT day, revenue, revenue_lo, revenue_hi FROM customer_analytics.sales_forecast
    WHERE scope = 'total' ORDER BY day"
# gnuplot stops on a data file without points: the marker only when there
# is a day in progress
PARTIAL_PLOT=
if [ -s "$DATA/partial.tsv" ]; then
    IFS=$'\t' read -r pday _ ptime <"$DATA/partial.tsv"
    PARTIAL_PLOT=", \"$DATA/partial.tsv\" using 1:2 with points pt 6 ps 2.2 lw 2 lc rgb \"#555555\" title \"$pday so far (to $ptime): the day in progress, not a whole day\""
fi

gnuplot <<GP
set terminal pngcairo size 1200,520 font "$FONT" noenhanced
set output "$OUT/daily_revenue.png"
set datafile separator "\t"
set title "Daily revenue (completed order lines), anomalies flagged on the shop total, and the 28-day forecast"
set xdata time; set timefmt "%Y-%m-%d"; set format x "%b %Y"
set ylabel "revenue"; set format y "%.0f"
set grid ytics lc rgb "#dddddd"
set key below horizontal maxcols 3
set yrange [0:*]
set style fill transparent solid 0.25 noborder
plot "$DATA/forecast.tsv" using 1:3:4 with filledcurves lc rgb "#4a90d9" title "forecast 95% interval", \
     "$DATA/daily.tsv" using 1:2 with lines lw 1 lc rgb "#555555" title "daily revenue", \
     "$DATA/forecast.tsv" using 1:2 with lines lw 2 lc rgb "#1f5fa8" title "forecast (Holt-Winters)", \
     "$DATA/anomalies.tsv" using 1:(strcol(3) eq "spike" ? \$2 : 1/0) with points pt 9 ps 1.8 lc rgb "#d62728" title "anomaly: spike (orders)", \
     "$DATA/anomalies.tsv" using 1:(strcol(3) eq "drop" ? \$2 : 1/0) with points pt 11 ps 1.8 lc rgb "#ff7f0e" title "anomaly: drop (orders)", \
     "$DATA/category_anomalies.tsv" using 1:(\$2 * 1000) with impulses lw 3 lc rgb "#9467bd" title "anomalies in categories that day (height: 1000 per category)"$PARTIAL_PLOT
GP

# --- RFM segments -----------------------------------------------------------
tsv segments.tsv "
    SELECT segment, revenue, customers FROM customer_analytics.segment_summary ORDER BY revenue DESC, segment"
gnuplot <<GP
set terminal pngcairo size 1200,520 font "$FONT" noenhanced
set output "$OUT/rfm_segments.png"
set datafile separator "\t"
set title "RFM segments (customer_rfm as of the demo's last day): revenue and customers"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set xtics rotate by -30 nomirror
set ytics nomirror; set y2tics
set ylabel "revenue"; set y2label "customers"
set format y "%.0f"
set yrange [0:*]; set y2range [0:*]
set grid ytics lc rgb "#dddddd"
set key top right
plot "$DATA/segments.tsv" using 2:xtic(1) title "revenue" lc rgb "#2ca02c" axes x1y1, \
     "" using 3 title "customers (right axis)" lc rgb "#1f77b4" axes x1y2
GP

# --- clickstream funnel ------------------------------------------------------
tsv funnel.tsv "
    SELECT step, n, round(100.0 * n / first_value(n) OVER (ORDER BY ord), 1)
    FROM (SELECT sum(sessions) AS s0, sum(product_view_sessions) AS s1, sum(add_to_cart_sessions) AS s2,
                 sum(checkout_sessions) AS s3, sum(purchase_sessions) AS s4
          FROM customer_analytics.funnel_daily) f,
         LATERAL (VALUES (0, 'sessions', s0), (1, 'product view', s1), (2, 'add to cart', s2),
                         (3, 'checkout', s3), (4, 'purchase', s4)) v(ord, step, n)
    ORDER BY ord"
tsv funnel_channel.tsv "
    SELECT channel,
           round(100.0 * sum(product_view_sessions) / sum(sessions), 1),
           round(100.0 * sum(add_to_cart_sessions) / sum(sessions), 1),
           round(100.0 * sum(checkout_sessions) / sum(sessions), 1),
           round(100.0 * sum(purchase_sessions) / sum(sessions), 1)
    FROM customer_analytics.funnel_daily GROUP BY channel ORDER BY sum(sessions) DESC, channel"
gnuplot <<GP
set terminal pngcairo size 1200,520 font "$FONT" noenhanced
set output "$OUT/funnel.png"
set datafile separator "\t"
set multiplot layout 1,2 title "Clickstream funnel (funnel_daily: closed funnel, sessions reaching each step after the previous ones)"
set style fill solid 0.85 border -1
set boxwidth 0.7
set grid ytics lc rgb "#dddddd"
set yrange [0:*]
set offsets graph 0, graph 0, graph 0.15, graph 0
set format y "%.0f"
set title "all channels: sessions per step"
set xtics nomirror
plot "$DATA/funnel.tsv" using 0:2:xtic(1) with boxes lc rgb "#1f77b4" notitle, \
     "" using 0:2:(sprintf("%d\n(%.1f%%)", \$2, \$3)) with labels offset 0,1.6 notitle
set title "per channel: % of sessions reaching each step"
set style data histograms
set style histogram clustered gap 1
set boxwidth 0.9
set yrange [0:100]
set offsets 0, 0, 0, 0
set ylabel "% of sessions"
set key top right
set xtics rotate by -20
plot "$DATA/funnel_channel.tsv" using 2:xtic(1) title "product view" lc rgb "#aec7e8", \
     "" using 3 title "add to cart" lc rgb "#6baed6", \
     "" using 4 title "checkout" lc rgb "#3182bd", \
     "" using 5 title "purchase" lc rgb "#08519c"
unset multiplot
GP

# --- pipeline runs: a capture of what psql shows ----------------------------
"${PSQL[@]}" -P footer=off >"$DATA/pipeline_runs.txt" <<'SQL'
\echo '=> SELECT run_id, scope, status, triggered_by, started_at, duration FROM customer_analytics.pipeline_run;'
SELECT run_id, scope, status, triggered_by, date_trunc('second', started_at) AS started_at,
       round(extract(epoch FROM finished_at - started_at)::numeric, 2) AS seconds
FROM customer_analytics.pipeline_run ORDER BY run_id;
\echo '=> the steps of the latest run started by pg_cron (pipeline_step)'
SELECT step_no, step, status, attempts, rows_affected,
       round(extract(epoch FROM finished_at - started_at)::numeric, 3) AS seconds
FROM customer_analytics.pipeline_step
WHERE run_id = (SELECT max(run_id) FROM customer_analytics.pipeline_run WHERE triggered_by = 'pg_cron')
ORDER BY step_no;
\echo '=> pg_cron''s record: SELECT * FROM customer_analytics.pipeline_cron_runs(5);  -- cron.job_run_details'
SELECT jobid, runid, status, return_message, date_trunc('second', start_time) AS start_time,
       round(extract(epoch FROM end_time - start_time)::numeric, 2) AS seconds
FROM customer_analytics.pipeline_cron_runs(5);
SQL
text_to_png() {   # text_to_png <text file> <png> <title>: the text in a monospace font
    local lines width
    lines=$(wc -l <"$1")
    width=$(awk '{ if (length($0) > w) w = length($0) } END { print w + 0 }' "$1")
    {
        printf 'set terminal pngcairo size %d,%d font "DejaVu Sans Mono,10" background rgb "#fbfbf8"\n' \
            $((width * 8 + 40)) $((lines * 16 + 60))
        printf 'set output "%s"\n' "$2"
        printf 'unset border; unset tics; unset key\nset lmargin 0; set rmargin 0; set tmargin 0; set bmargin 0\n'
        printf 'set label 1 "%s" at screen 0.5, 1 - 20.0/%d center font "DejaVu Sans,11" noenhanced\n' "$3" $((lines * 16 + 60))
        awk -v h=$((lines * 16 + 60)) '{
                gsub(/\047/, "\047\047");
                printf "set label %d \047%s\047 at screen 20.0/%d, 1 - (%d * 16 + 48)/%d.0 left noenhanced\n",
                       NR + 1, $0, 1, NR, h
            }' "$1" | sed "s|at screen 20.0/1,|at screen 20.0/$((width * 8 + 40)),|"
        printf 'plot [0:1][0:1] NaN\n'
    } | gnuplot
}
text_to_png "$DATA/pipeline_runs.txt" "$OUT/pipeline_runs.png" \
    "After a scheduled run: pipeline_run, pipeline_step and pg_cron's cron.job_run_details"

ls "$OUT"/*.png
