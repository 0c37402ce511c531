-- Recipe: the UCI Online Retail export (2010-12-01 .. 2011-12-09) into the
-- star schema, as a shop would load its own ERP export.  Run with psql:
--   psql -v retail_csv=/path/to/online_retail_2010_2011.csv -f online_retail.sql
-- (the file must be readable by the server; see ingest_csv).  What the
-- export holds, and what this recipe does with it:
--   - one row per invoice line, no line numbers: numbered in file order;
--   - invoices starting with C are credit notes (negative quantities): they
--     are staged as they are, status completed, and net against sales;
--   - three A invoices are bad-debt write-offs (two at a negative price),
--     accounting entries rather than sales: left out;
--   - negative quantities on ordinary invoices (1,336 rows, price 0, no
--     customer) are stock adjustments: staged as cancelled lines;
--   - CustomerID empty: a guest (customer_id NULL);
--   - no product catalogue: products come from the lines (the most common
--     description), and stock codes such as POST, DOT, C2 (postage), M, D,
--     S, BANK CHARGES, AMAZONFEE, CRUK (adjustments and fees) get
--     categories of their own so that they stay apart from merchandise;
--   - times are UK local time; prices have up to 3 decimals (4 rows),
--     stg_orders keeps cents.
SET customer_analytics.timezone = 'Europe/London';

-- 1. the file as it is, in a table of your own (row_no keeps file order)
CREATE SCHEMA retail;
CREATE TABLE retail.invoice_line (
    row_no       bigserial,
    invoice_no   text NOT NULL,
    stock_code   text NOT NULL,
    description  text,
    quantity     integer NOT NULL,
    invoice_date timestamp NOT NULL,
    unit_price   numeric NOT NULL,
    customer_id  text,
    country      text NOT NULL
);
SELECT status, rows_read, rows_loaded, rows_rejected
FROM customer_analytics.ingest_csv('retail.invoice_line', :'retail_csv',
    column_map => '{"InvoiceNo": "invoice_no", "StockCode": "stock_code", "Description": "description",
                    "Quantity": "quantity", "InvoiceDate": "invoice_date", "UnitPrice": "unit_price",
                    "CustomerID": "customer_id", "Country": "country"}');

-- 2. staging: customers (one version each, their most frequent country,
-- dated from their first invoice), products, order lines
INSERT INTO customer_analytics.stg_customers (customer_id, country, updated_at)
SELECT customer_id, mode() WITHIN GROUP (ORDER BY country),
       min(invoice_date) AT TIME ZONE 'Europe/London'
FROM retail.invoice_line
WHERE customer_id IS NOT NULL
GROUP BY customer_id;

INSERT INTO customer_analytics.stg_products (product_id, name, category)
SELECT stock_code,
       mode() WITHIN GROUP (ORDER BY btrim(description)) FILTER (WHERE btrim(description) <> ''),
       CASE WHEN stock_code IN ('POST', 'DOT', 'C2') THEN 'Postage'
            WHEN stock_code IN ('M', 'D', 'S', 'B', 'BANK CHARGES', 'AMAZONFEE', 'CRUK', 'PADS') THEN 'Adjustments and fees'
            WHEN stock_code LIKE 'gift\_%' THEN 'Gift vouchers'
            ELSE 'Merchandise' END
FROM retail.invoice_line
GROUP BY stock_code;

INSERT INTO customer_analytics.stg_orders
    (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, status)
SELECT invoice_no,
       row_number() OVER (PARTITION BY invoice_no ORDER BY row_no),
       customer_id, stock_code,
       invoice_date AT TIME ZONE 'Europe/London',
       quantity, unit_price,
       CASE WHEN quantity < 0 AND invoice_no NOT LIKE 'C%' THEN 'cancelled' ELSE 'completed' END
FROM retail.invoice_line
WHERE invoice_no NOT LIKE 'A%';

-- 3. the star schema, and the views (CALL customer_analytics.run_pipeline()
-- does this and everything else)
SELECT step, rows_affected FROM customer_analytics.transform()
WHERE step IN ('dim_customer', 'dim_product', 'fact_order_line') ORDER BY step;
SELECT customer_analytics.refresh_sales_rollup() > 0 AS sales_rolled_up;
REFRESH MATERIALIZED VIEW customer_analytics.daily_sales;
REFRESH MATERIALIZED VIEW customer_analytics.product_category_sales;
SELECT customer_analytics.refresh_customer_rfm() > 0 AS customers_scored;
