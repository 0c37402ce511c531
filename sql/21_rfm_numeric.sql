-- rfm reads numeric amounts from their stored digits (where int128 exists)
-- and otherwise through numeric's public functions: both give the same
-- units, or the same error, on every form of numeric (short and long
-- headers, NaN and the infinities, scale 0 and high scales, huge and tiny
-- weights, values stored packed, compressed and out of line).
\getenv abs_srcdir PG_ABS_SRCDIR
\i :abs_srcdir/sql/include/preamble.sql

CREATE FUNCTION pg_temp.units(amount numeric, public_api boolean) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    RETURN customer_analytics_internal.money_units(amount, public_api)::text;
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ' ' || SQLERRM;
END $$;

CREATE TABLE public.amounts (n integer PRIMARY KEY, form text NOT NULL, amount numeric NOT NULL);
INSERT INTO public.amounts VALUES
    (1, 'zero, short', 0),
    (2, 'negative zero at scale 4, short', -0.0000),
    (3, 'scale 0, short', 42),
    (4, 'scale 0, negative, short', -7),
    (5, 'four decimals, short', 12.3456),
    (6, 'four decimals, negative, short', -0.0001),
    (7, 'five decimals, short', 1.00001),
    (8, 'trailing zeros beyond four decimals, short', 1.50000000),
    (9, 'one digit of weight -2, short', 0.00000001),
    (10, 'largest, short', 922337203685477.5807),
    (11, 'largest negative, short', -922337203685477.5807),
    (12, 'one unit too large, short', 922337203685477.5808),
    (13, 'one unit too large, negative, short', -922337203685477.5808),
    (14, 'just below 10^20, short', 99999999999999999999.9999),
    (15, 'just below 10^20 with a fifth decimal, short', 99999999999999999999.99999),
    (16, '10^20, short', 1e20),
    (17, '10^20 with a fifth decimal, short', 100000000000000000000.00001),
    (18, 'scale 64 (long header)', round(12.5, 64)),
    (19, 'scale 64, negative (long header)', round(-3.1234, 64)),
    (20, 'scale 64 with a digit beyond four decimals (long header)', round(0.12345, 64)),
    (21, 'weight 64: 10^256 (long header)', 1e256),
    (22, 'weight -65: 10^-260 (long header)', 1e-260),
    (23, 'scale 1000, value 1 (long header)', round(1::numeric, 1000)),
    (24, 'weight about 33000: 10^131071 (long header)', ('1' || repeat('0', 131071))::numeric),
    (25, 'NaN', 'NaN'),
    (26, 'Infinity', 'Infinity'),
    (27, '-Infinity', '-Infinity'),
    (28, '9000 decimals, stored compressed', ('0.' || repeat('3', 9000))::numeric),
    (29, '3000 digits of integer part', repeat('9', 3000)::numeric),
    (30, 'integer part and scale 16383', round(5::numeric, 16383)),
    (31, '16000 decimals, stored out of line', (SELECT ('1.' || string_agg((abs(hashint4(i)) % 10)::text, ''))::numeric
                                                FROM generate_series(1, 16000) i));
SELECT n, pg_column_compression(amount) IS NOT NULL AS compressed, pg_column_size(amount) < 2000 AS stored_small
FROM public.amounts WHERE n IN (28, 30, 31) ORDER BY n;

-- values read from the table come packed (one-byte varlena headers) or
-- compressed; each is converted both ways
SELECT n, form, left(pg_temp.units(amount, false), 70) AS stored_digits,
       pg_temp.units(amount, true) IS NOT DISTINCT FROM pg_temp.units(amount, false) AS public_api_agrees
FROM public.amounts ORDER BY n;

-- and each as the result of an expression: an in-memory datum, not packed
SELECT count(*) AS values_checked,
       count(*) FILTER (WHERE pg_temp.units(a.amount + 0, true) IS DISTINCT FROM pg_temp.units(a.amount + 0, false)) AS disagreements
FROM public.amounts a;

-- rfm_agg sums the accepted ones exactly
SELECT (customer_analytics.rfm_agg(now(), amount)).monetary = sum(amount) AS exact_sum
FROM public.amounts WHERE n IN (1, 2, 3, 4, 5, 6, 8, 18, 19, 23, 30);
DROP TABLE public.amounts;
