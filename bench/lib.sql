-- Server-side timing for benchmarks (installed in the bench database only).
CREATE SCHEMA bench;

CREATE TABLE bench.timing (
    label   text NOT NULL,
    run     integer NOT NULL,
    ms      float8 NOT NULL
);

/*
 * Run setup (untimed) then sql, runs times; record each run and return the
 * median in milliseconds.  Timing is taken around EXECUTE, on the server,
 * so client round trips and result transfer do not count.
 */
CREATE FUNCTION bench.time(label text, sql text, runs integer DEFAULT 5, setup text DEFAULT NULL)
RETURNS float8
LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz;
    elapsed float8;
BEGIN
    FOR i IN 1 .. runs LOOP
        IF setup IS NOT NULL THEN
            EXECUTE setup;
        END IF;
        t0 := clock_timestamp();
        EXECUTE sql;
        elapsed := extract(epoch FROM clock_timestamp() - t0) * 1000;
        INSERT INTO bench.timing VALUES (label, i, elapsed);
    END LOOP;
    RETURN (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) FROM bench.timing t WHERE t.label = time.label);
END
$$;
