-- quantile_state's text form round-trips exactly: Citus ships the partial
-- states of quintile_breaks between nodes as text (worker_partial_agg /
-- coord_combine_agg), so breaks combined from states that went through
-- text must equal the breaks computed directly, bit for bit.
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql
-- the text form must not depend on it: states are written in full anyway
SET extra_float_digits = -15;
-- the two halves of quintile_breaks as they run on a worker and on the
-- coordinator: a partial state per group, then the states combined
CREATE AGGREGATE pg_temp.partial_state(float8) (
    SFUNC = customer_analytics.quintile_breaks_sfunc,
    STYPE = customer_analytics.quantile_state
);
CREATE AGGREGATE pg_temp.combined_breaks(customer_analytics.quantile_state) (
    SFUNC = customer_analytics.quintile_breaks_combine,
    STYPE = customer_analytics.quantile_state,
    FINALFUNC = customer_analytics.quintile_breaks_final
);
-- values whose shortest decimal form needs 17 digits, subnormals, huge
-- values, the infinities and -0
CREATE TEMP TABLE qv AS
SELECT g AS i,
       CASE g % 6 WHEN 0 THEN 0.1::float8 * g WHEN 1 THEN 1.0::float8 / g
                  WHEN 2 THEN -pi() * g WHEN 3 THEN 4.9e-324::float8 * g
                  WHEN 4 THEN 1.7976931348623157e308::float8 / g
                  ELSE sqrt(g::float8) END AS x
FROM generate_series(1, 3000) g;
INSERT INTO qv VALUES (3001, 'Infinity'), (3002, '-Infinity'), (3003, '-0'), (3004, NULL);
-- the states as a worker ships them: as text (the type itself is not
-- toastable, so a state of thousands of values cannot be stored in a row)
CREATE TEMP TABLE parts AS
SELECT i % 4 AS grp, pg_temp.partial_state(x)::text AS shipped FROM qv GROUP BY 1;
-- every state reads back to the same text and holds the same values, bit
-- for bit (float8send)
SELECT grp,
       shipped::customer_analytics.quantile_state::text = shipped AS text_round_trips,
       (SELECT array_agg(float8send(v) ORDER BY float8send(v))
          FROM unnest(string_to_array(trim(BOTH '{}' FROM shipped), ',')::float8[]) v)
       = (SELECT array_agg(float8send(x) ORDER BY float8send(x))
            FROM qv WHERE i % 4 = grp AND x IS NOT NULL) AS same_bits
FROM parts ORDER BY grp;
-- the breaks combined from the states read back from text are those over
-- all the values, and those of percentile_disc
WITH combined AS (SELECT pg_temp.combined_breaks(shipped::customer_analytics.quantile_state) AS b FROM parts),
     direct AS (SELECT quintile_breaks(x) AS b,
                       percentile_disc(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY x) AS pd FROM qv)
SELECT (SELECT array_agg(float8send(v) ORDER BY n) FROM unnest(combined.b) WITH ORDINALITY u(v, n))
       = (SELECT array_agg(float8send(v) ORDER BY n) FROM unnest(direct.b) WITH ORDINALITY u(v, n)) AS combined_equals_direct,
       direct.b = direct.pd AS direct_equals_percentile_disc,
       cardinality(combined.b) AS breaks
FROM combined, direct;
-- small states, written out
SELECT pg_temp.partial_state(x)::text FROM (VALUES (1.5::float8), (NULL), ('-0'), (1e300), (4.9e-324), (0.1 + 0.2::float8), ('NaN'), ('-Infinity')) v(x);
SELECT '{}'::customer_analytics.quantile_state::text AS empty,
       ' { 1 , 2.5,3 } '::customer_analytics.quantile_state::text AS spaced,
       pg_temp.combined_breaks(s) AS breaks
FROM (VALUES ('{5,1,4,2,3}'::customer_analytics.quantile_state), ('{}'), ('{10,9,8,7,6}')) v(s)
GROUP BY 1, 2;
-- malformed text is refused with the form expected
SELECT 'nope'::customer_analytics.quantile_state;
SELECT '{1,2'::customer_analytics.quantile_state;
SELECT '{1,x}'::customer_analytics.quantile_state;
SELECT '{1} 2'::customer_analytics.quantile_state;
SELECT '{1,,2}'::customer_analytics.quantile_state;
