/*
 * customer_analytics install script, assembled by the Makefile from the
 * pieces in src/sql/ (in file-name order).  Do not edit the generated
 * customer_analytics--<version>.sql; edit the piece.
 */

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION customer_analytics" to load this file. \quit

COMMENT ON SCHEMA customer_analytics IS
    'customer_analytics: staging, star schema, analytics functions and pipeline of the customer_analytics extension';

/*
 * What the extension keeps for itself (change queues, run states, the
 * steps and helpers of its functions) lives apart, so that the schema
 * customer_analytics holds exactly what README.md documents.  Nothing here
 * is an interface: it may change in any version.
 */
CREATE SCHEMA customer_analytics_internal;
COMMENT ON SCHEMA customer_analytics_internal IS
    'customer_analytics: internal queues, states and helper functions of the customer_analytics extension (not an interface)';

/*
 * Every staged row belongs to a load.  ingest_csv() takes a load id per
 * file; the sample-data generator takes one per table it fills.
 */
CREATE SEQUENCE customer_analytics.load_id_seq;
COMMENT ON SEQUENCE customer_analytics.load_id_seq IS
    'Load identifiers shared by ingestion and the sample-data generator';
