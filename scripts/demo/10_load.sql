-- Demo step: generate the sample shop and transform it into the star schema.
-- psql variables: customers, days
\timing on
\echo '== generating the sample shop'
SELECT * FROM customer_analytics.generate_sample_data(customers => :customers, days => :days, seed => 42)
ORDER BY target;
\echo '== transforming staging into the star schema'
SELECT * FROM customer_analytics.transform();
\timing off
