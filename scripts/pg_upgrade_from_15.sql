-- Run in every database of a PostgreSQL 15.20 (or later 15) cluster, as a
-- superuser, right before pg_upgrade to 18; nothing else needs it.
--
-- 15.20 records a version in each column's attoptions ("pg_attver=N", a
-- back-branch security fix).  18's pg_dump, which pg_upgrade runs, copies
-- it into ALTER TABLE ... ALTER COLUMN ... SET (pg_attver=N), which 18
-- refuses ('unrecognized parameter "pg_attver"'), so pg_upgrade stops for
-- any database with a table.  15 keeps the option through ALTER TABLE ...
-- RESET, hence the catalog update.  Without it a column is as in a cluster
-- made before 15.20, which 15.20 reads as well; the stored rows are not
-- touched.
UPDATE pg_catalog.pg_attribute a
SET attoptions = (SELECT pg_catalog.array_agg(o ORDER BY n) FILTER (WHERE o NOT LIKE 'pg_attver=%')
                  FROM pg_catalog.unnest(a.attoptions) WITH ORDINALITY u(o, n))
WHERE a.attrelid >= 16384
  AND EXISTS (SELECT FROM pg_catalog.unnest(a.attoptions) o WHERE o LIKE 'pg_attver=%');
