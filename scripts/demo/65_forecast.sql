-- Demo step: the sales forecast, its backtest against seasonal-naive, and
-- customer lifetime value.
\pset footer off
\timing on
SELECT customer_analytics.refresh_forecasts() AS forecast_miss_alerts;
\timing off
\echo '== the next 7 days of revenue (Holt-Winters, 95% interval)'
SELECT day, round(revenue::numeric, 2) AS revenue, round(revenue_lo::numeric, 2) AS low, round(revenue_hi::numeric, 2) AS high
FROM customer_analytics.sales_forecast WHERE scope = 'total' ORDER BY day LIMIT 7;
\echo '== backtest of the last 28 days: mean absolute percentage error'
SELECT scope, category, round(mape_holt_winters::numeric, 1) AS mape_holt_winters,
       round(mape_seasonal_naive::numeric, 1) AS mape_seasonal_naive,
       round((100 * improvement)::numeric, 1) || '%' AS lower_by
FROM customer_analytics.sales_forecast_accuracy ORDER BY scope DESC, category;
\echo '== the 10 customers worth most over the next 90 days (BG/NBD + Gamma-Gamma)'
SELECT customer_id, round(p_alive::numeric, 3) AS p_alive, round(expected_purchases_90d::numeric, 2) AS purchases_90d,
       round(expected_value_90d::numeric, 2) AS value_90d
FROM customer_analytics.customer_clv ORDER BY expected_value_90d DESC NULLS LAST, customer_id LIMIT 10;
