/*
 * Privileges: ready-made grants for the two usual kinds of user.
 *
 * An analyst reads the star schema, the views and the pipeline's records;
 * a loader puts data in (ingest_csv_text, ingest_csv with a server-file
 * privilege granted apart, track_event, INSERT/COPY into staging) and sees
 * the rejects of its own loads.  Rejected raw lines are raw, possibly
 * personal data: beyond one's own, they are readable only by the roles
 * listed in reject_reader (grant_analyst(..., raw_rejects => true)).
 *
 * These functions only GRANT: whoever calls them needs the grant option on
 * what they hand out (the extension's owner, a superuser).  Not SECURITY
 * DEFINER.
 */

CREATE TABLE customer_analytics.reject_reader (
    role regrole PRIMARY KEY
);
COMMENT ON TABLE customer_analytics.reject_reader IS
    'Roles (and their members) that may read every rejected line in ingest_reject, not only those of their own loads; filled by grant_analyst(role, raw_rejects => true)';
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.reject_reader', '');
-- the policy below reads it as the querying user
GRANT SELECT ON customer_analytics.reject_reader TO PUBLIC;

CREATE POLICY ingest_reject_reader ON customer_analytics.ingest_reject FOR SELECT
    USING (EXISTS (SELECT FROM customer_analytics.reject_reader r
                   WHERE pg_catalog.pg_has_role(CURRENT_USER, r.role::oid, 'MEMBER')));

CREATE FUNCTION customer_analytics.grant_analyst(grantee regrole, raw_rejects boolean DEFAULT false)
RETURNS SETOF text
LANGUAGE plpgsql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel regclass;
    stmt text;
BEGIN
    stmt := format('GRANT USAGE ON SCHEMA customer_analytics TO %s', grantee);
    EXECUTE stmt;
    RETURN NEXT stmt;
    -- the functions find their internal helpers there (nothing in it is granted)
    stmt := format('GRANT USAGE ON SCHEMA customer_analytics_internal TO %s', grantee);
    EXECUTE stmt;
    RETURN NEXT stmt;
    -- every table and view but the staging tables and the raw rejects
    FOR rel IN SELECT c.oid FROM pg_class c
               WHERE c.relnamespace = 'customer_analytics'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
                 AND c.relname NOT LIKE 'stg\_%' AND c.relname <> 'ingest_reject'
               ORDER BY c.relname LOOP
        stmt := format('GRANT SELECT ON %s TO %s', rel, grantee);
        EXECUTE stmt;
        RETURN NEXT stmt;
    END LOOP;
    IF raw_rejects THEN
        stmt := format('GRANT SELECT ON customer_analytics.ingest_reject TO %s', grantee);
        EXECUTE stmt;
        RETURN NEXT stmt;
        INSERT INTO customer_analytics.reject_reader VALUES (grantee) ON CONFLICT DO NOTHING;
        RETURN NEXT format('INSERT INTO customer_analytics.reject_reader VALUES (%L)', grantee);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION customer_analytics.grant_analyst(regrole, boolean) FROM PUBLIC;
COMMENT ON FUNCTION customer_analytics.grant_analyst(regrole, boolean) IS
    'Lets a role read the star schema, every view and the pipeline''s and ingestion''s records (not the staging tables); with raw_rejects, every rejected raw line too (else none). Returns the statements it ran';

CREATE FUNCTION customer_analytics.grant_loader(grantee regrole)
RETURNS SETOF text
LANGUAGE plpgsql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    obj text;
    stmt text;
BEGIN
    stmt := format('GRANT USAGE ON SCHEMA customer_analytics TO %s', grantee);
    EXECUTE stmt;
    RETURN NEXT stmt;
    -- the functions find their internal helpers there (nothing in it is granted)
    stmt := format('GRANT USAGE ON SCHEMA customer_analytics_internal TO %s', grantee);
    EXECUTE stmt;
    RETURN NEXT stmt;
    FOR stmt IN
        -- the staging tables, and the sequences their defaults draw from
        SELECT format('GRANT SELECT, INSERT ON %s TO %s', c.oid::regclass, grantee)
        FROM pg_class c
        WHERE c.relnamespace = 'customer_analytics'::regnamespace AND c.relkind = 'r' AND c.relname LIKE 'stg\_%'
        UNION ALL
        -- a load's own record and rejects (row-level security: its own only)
        SELECT format('GRANT SELECT, INSERT ON %s TO %s', t::regclass, grantee)
        FROM unnest(ARRAY['customer_analytics.ingest_load', 'customer_analytics.ingest_reject']) t
        UNION ALL
        SELECT format('GRANT SELECT ON %s TO %s', t::regclass, grantee)
        FROM unnest(ARRAY['customer_analytics.imputation_rule', 'customer_analytics.ingest_summary']) t
        UNION ALL
        SELECT DISTINCT format('GRANT USAGE ON SEQUENCE %s TO %s', d.refobjid::regclass, grantee)
        FROM pg_attrdef a
        JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = a.oid
                        AND d.refclassid = 'pg_class'::regclass
        JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
        WHERE a.adrelid IN (SELECT c.oid FROM pg_class c
                            WHERE c.relnamespace = 'customer_analytics'::regnamespace
                              AND (c.relname LIKE 'stg\_%' OR c.relname IN ('ingest_load', 'ingest_reject')))
        ORDER BY 1
    LOOP
        EXECUTE stmt;
        RETURN NEXT stmt;
    END LOOP;
    -- ingest_csv/ingest_csv_text draw load ids outside the defaults
    stmt := format('GRANT USAGE ON SEQUENCE customer_analytics.load_id_seq TO %s', grantee);
    EXECUTE stmt;
    RETURN NEXT stmt;
END
$$;
REVOKE ALL ON FUNCTION customer_analytics.grant_loader(regrole) FROM PUBLIC;
COMMENT ON FUNCTION customer_analytics.grant_loader(regrole) IS
    'Lets a role load data: INSERT into the staging tables (ingest_csv_text, track_event, COPY), its own ingest_load records and rejects. Reading server files with ingest_csv needs pg_read_server_files besides (granted apart, on purpose). Returns the statements it ran';

CREATE FUNCTION customer_analytics.revoke_access(grantee regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    stmt text;
BEGIN
    DELETE FROM customer_analytics.reject_reader r WHERE r.role = grantee;
    FOR stmt IN
        SELECT format('REVOKE ALL ON %s FROM %s', c.oid::regclass, grantee)
        FROM pg_class c
        WHERE c.relnamespace = 'customer_analytics'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
          AND c.relname <> 'reject_reader'
        ORDER BY c.relname
    LOOP
        EXECUTE stmt;
    END LOOP;
    EXECUTE format('REVOKE USAGE ON SCHEMA customer_analytics, customer_analytics_internal FROM %s', grantee);
END
$$;
REVOKE ALL ON FUNCTION customer_analytics.revoke_access(regrole) FROM PUBLIC;
COMMENT ON FUNCTION customer_analytics.revoke_access(regrole) IS
    'Takes back what grant_analyst() and grant_loader() gave a role (every privilege on the extension''s tables, views and sequences, and the schemas)';
