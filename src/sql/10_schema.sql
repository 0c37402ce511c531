/*
 * Star schema: staging tables fed by ingestion, dimensions, facts.
 *
 * Staging tables are typed, so a value that does not fit its column is
 * rejected at ingestion time with its line, not discovered later in a
 * transform.  Every staging row carries:
 *   load_id     the load that brought it (ingest_load / generator);
 *   loaded_at   when it was staged;
 *   stage_id    arrival order, the tie-breaker between two versions of the
 *               same natural key staged by one transaction;
 *   staged_xid  the staging transaction.  transform() processes the rows of
 *               transactions that committed between its previous snapshot
 *               and its current one, so a load that commits late is never
 *               skipped (a timestamp or serial watermark would skip it).
 *               Its default is staging_xid(): pg_current_xact_id(), but
 *               refused where Citus would evaluate it on a worker or in a
 *               connection of its own, whose transaction ids transform()
 *               does not know (citus_guard.c).
 */

CREATE FUNCTION customer_analytics_internal.staging_xid()
    RETURNS xid8
    AS 'MODULE_PATHNAME', 'ca_staging_xid' LANGUAGE C STABLE PARALLEL UNSAFE;
COMMENT ON FUNCTION customer_analytics_internal.staging_xid() IS
    'Internal: the default of the staging tables'' staged_xid, the current top-level transaction id as pg_current_xact_id() gives it; refused (SQLSTATE 55000) where it is evaluated on a Citus worker or in a connection Citus opened for another session, whose transaction ids transform() does not know: a statement run on a worker, or an INSERT ... SELECT from a Citus table that Citus pulls to the coordinator or repartitions (stage such rows through a local or temporary table)';

CREATE SEQUENCE customer_analytics.stage_id_seq CACHE 1000;
COMMENT ON SEQUENCE customer_analytics.stage_id_seq IS
    'Arrival order of staged rows (see the stage_id columns)';

CREATE TABLE customer_analytics.stg_customers (
    customer_id text NOT NULL CHECK (customer_id <> ''),
    name        text,
    email       text,
    city        text,
    state       text,
    country     text,
    signup_date date,
    updated_at  timestamptz,
    load_id     bigint,
    loaded_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    stage_id    bigint NOT NULL DEFAULT pg_catalog.nextval('customer_analytics.stage_id_seq'),
    staged_xid  xid8 NOT NULL DEFAULT customer_analytics_internal.staging_xid()
);
CREATE INDEX stg_customers_staged_xid_idx ON customer_analytics.stg_customers (staged_xid);
COMMENT ON TABLE customer_analytics.stg_customers IS
    'Staging: customer export rows as loaded (one row per customer version); transform() turns them into dim_customer (SCD type 2)';
COMMENT ON COLUMN customer_analytics.stg_customers.updated_at IS
    'When this version of the customer became true in the source; NULL means loaded_at';

CREATE TABLE customer_analytics.stg_products (
    product_id  text NOT NULL CHECK (product_id <> ''),
    name        text,
    category    text,
    subcategory text,
    unit_cost   numeric(12,2) CHECK (unit_cost >= 0),
    list_price  numeric(12,2) CHECK (list_price >= 0),
    updated_at  timestamptz,
    load_id     bigint,
    loaded_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    stage_id    bigint NOT NULL DEFAULT pg_catalog.nextval('customer_analytics.stage_id_seq'),
    staged_xid  xid8 NOT NULL DEFAULT customer_analytics_internal.staging_xid()
);
CREATE INDEX stg_products_staged_xid_idx ON customer_analytics.stg_products (staged_xid);
COMMENT ON TABLE customer_analytics.stg_products IS
    'Staging: product catalogue rows as loaded; transform() upserts them into dim_product (SCD type 1)';

CREATE TABLE customer_analytics.stg_orders (
    order_id    text NOT NULL CHECK (order_id <> ''),
    line_number integer NOT NULL CHECK (line_number > 0),
    customer_id text,
    product_id  text NOT NULL CHECK (product_id <> ''),
    order_ts    timestamptz NOT NULL,
    -- negative: a credit note's line (a return booked as its own line)
    quantity    integer NOT NULL CHECK (quantity <> 0),
    unit_price  numeric(12,2) NOT NULL CHECK (unit_price >= 0),
    discount    numeric(12,2) NOT NULL DEFAULT 0 CHECK (discount >= 0),
    status      text NOT NULL DEFAULT 'completed'
                CHECK (status IN ('completed', 'cancelled', 'returned')),
    channel     text,
    updated_at  timestamptz,
    load_id     bigint,
    loaded_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    stage_id    bigint NOT NULL DEFAULT pg_catalog.nextval('customer_analytics.stage_id_seq'),
    staged_xid  xid8 NOT NULL DEFAULT customer_analytics_internal.staging_xid(),
    -- revenue is quantity * unit_price - discount: on a credit line a
    -- discount would add to the refund instead of reducing it
    CONSTRAINT stg_orders_credit_without_discount CHECK (quantity > 0 OR discount = 0)
);
CREATE INDEX stg_orders_staged_xid_idx ON customer_analytics.stg_orders (staged_xid);
COMMENT ON TABLE customer_analytics.stg_orders IS
    'Staging: order export rows as loaded, one row per order line; customer_id NULL is a guest checkout';

-- session_id never NULL nor '': on a Citus cluster the events and their
-- staging are distributed by it (src/sql/97_distribute.sql)
CREATE TABLE customer_analytics.stg_events (
    event_id    text NOT NULL CHECK (event_id <> ''),
    event_ts    timestamptz NOT NULL,
    customer_id text,
    session_id  text NOT NULL CHECK (session_id <> ''),
    event_type  text NOT NULL
                CHECK (event_type IN ('page_view', 'product_view', 'add_to_cart', 'checkout', 'purchase')),
    product_id  text,
    order_id    text,
    channel     text,
    device      text,
    load_id     bigint,
    loaded_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    stage_id    bigint NOT NULL DEFAULT pg_catalog.nextval('customer_analytics.stage_id_seq'),
    staged_xid  xid8 NOT NULL DEFAULT customer_analytics_internal.staging_xid()
);
CREATE INDEX stg_events_staged_xid_idx ON customer_analytics.stg_events (staged_xid);
COMMENT ON TABLE customer_analytics.stg_events IS
    'Staging: clickstream events (files or direct inserts from applications); customer_id NULL is an anonymous visitor';

/* Dimensions */

CREATE SEQUENCE customer_analytics.customer_key_seq;
CREATE TABLE customer_analytics.dim_customer (
    customer_key bigint PRIMARY KEY
                 DEFAULT pg_catalog.nextval('customer_analytics.customer_key_seq'),
    customer_id  text NOT NULL,
    name         text,
    email        text,
    city         text,
    state        text,
    country      text,
    signup_date  date,
    valid_from   timestamptz NOT NULL,
    valid_to     timestamptz NOT NULL DEFAULT 'infinity',
    is_current   boolean NOT NULL DEFAULT true,
    CHECK (valid_from < valid_to),
    CHECK (is_current = (valid_to = 'infinity'))
);
ALTER SEQUENCE customer_analytics.customer_key_seq OWNED BY customer_analytics.dim_customer.customer_key;
CREATE UNIQUE INDEX dim_customer_version_idx ON customer_analytics.dim_customer (customer_id, valid_from);
CREATE UNIQUE INDEX dim_customer_current_idx ON customer_analytics.dim_customer (customer_id) WHERE is_current;
COMMENT ON TABLE customer_analytics.dim_customer IS
    'Customer dimension, SCD type 2: one row per version of a customer; customer_key -1 is the unknown customer';
COMMENT ON COLUMN customer_analytics.dim_customer.customer_key IS 'Surrogate key of this version';
COMMENT ON COLUMN customer_analytics.dim_customer.customer_id IS 'Natural key from the source system, shared by all versions';
COMMENT ON COLUMN customer_analytics.dim_customer.valid_from IS 'Start of the period this version describes (inclusive)';
COMMENT ON COLUMN customer_analytics.dim_customer.valid_to IS 'End of that period (exclusive); infinity for the current version';

INSERT INTO customer_analytics.dim_customer
    (customer_key, customer_id, name, valid_from, valid_to, is_current)
VALUES (-1, '#unknown', 'Unknown customer', '-infinity', 'infinity', true);

CREATE SEQUENCE customer_analytics.product_key_seq;
CREATE TABLE customer_analytics.dim_product (
    product_key bigint PRIMARY KEY
                DEFAULT pg_catalog.nextval('customer_analytics.product_key_seq'),
    product_id  text NOT NULL UNIQUE,
    name        text,
    category    text NOT NULL DEFAULT 'Unknown',
    subcategory text,
    unit_cost   numeric(12,2),
    list_price  numeric(12,2),
    updated_at  timestamptz,
    stage_id    bigint
);
ALTER SEQUENCE customer_analytics.product_key_seq OWNED BY customer_analytics.dim_product.product_key;
CREATE INDEX dim_product_category_idx ON customer_analytics.dim_product (category);
COMMENT ON TABLE customer_analytics.dim_product IS
    'Product dimension, SCD type 1 (attributes overwritten by the latest staged version); product_key -1 is the unknown product';
COMMENT ON COLUMN customer_analytics.dim_product.stage_id IS
    'The staged row this version came from; a row staged earlier never overwrites it';

INSERT INTO customer_analytics.dim_product (product_key, product_id, name, category)
VALUES (-1, '#unknown', 'Unknown product', 'Unknown');

CREATE TABLE customer_analytics.dim_date (
    date_key    integer PRIMARY KEY,
    date        date NOT NULL UNIQUE,
    year        smallint NOT NULL,
    quarter     smallint NOT NULL CHECK (quarter BETWEEN 1 AND 4),
    month       smallint NOT NULL CHECK (month BETWEEN 1 AND 12),
    month_name  text NOT NULL,
    iso_year    smallint NOT NULL,
    iso_week    smallint NOT NULL CHECK (iso_week BETWEEN 1 AND 53),
    day_of_week smallint NOT NULL CHECK (day_of_week BETWEEN 1 AND 7),
    day_name    text NOT NULL,
    is_weekend  boolean NOT NULL,
    CHECK (date_key = (pg_catalog.to_char(date, 'YYYYMMDD'))::integer)
);
COMMENT ON TABLE customer_analytics.dim_date IS
    'Calendar dimension, one row per day (date_key = YYYYMMDD); transform() extends it to cover every fact';
COMMENT ON COLUMN customer_analytics.dim_date.day_of_week IS 'ISO day of week: 1 = Monday .. 7 = Sunday';

/* Facts */

CREATE TABLE customer_analytics.fact_order_line (
    order_id     text NOT NULL,
    line_number  integer NOT NULL,
    customer_key bigint NOT NULL REFERENCES customer_analytics.dim_customer,
    product_key  bigint NOT NULL REFERENCES customer_analytics.dim_product,
    date_key     integer NOT NULL REFERENCES customer_analytics.dim_date,
    order_ts     timestamptz NOT NULL,
    quantity     integer NOT NULL CHECK (quantity <> 0),
    unit_price   numeric(12,2) NOT NULL CHECK (unit_price >= 0),
    discount     numeric(12,2) NOT NULL DEFAULT 0 CHECK (discount >= 0),
    revenue      numeric(14,2) GENERATED ALWAYS AS (quantity * unit_price - discount) STORED,
    status       text NOT NULL CHECK (status IN ('completed', 'cancelled', 'returned')),
    channel      text,
    updated_at   timestamptz,
    stage_id     bigint NOT NULL,
    load_id      bigint,
    customer_ref text NOT NULL,
    PRIMARY KEY (order_id, line_number),
    CONSTRAINT fact_order_line_credit_without_discount CHECK (quantity > 0 OR discount = 0)
);
CREATE INDEX fact_order_line_customer_idx ON customer_analytics.fact_order_line (customer_key);
CREATE INDEX fact_order_line_product_idx ON customer_analytics.fact_order_line (product_key);
CREATE INDEX fact_order_line_date_idx ON customer_analytics.fact_order_line (date_key);
-- freshness and volume checks, and recency as of a date, read the newest lines
CREATE INDEX fact_order_line_ts_idx ON customer_analytics.fact_order_line (order_ts);
-- the few lines with negative revenue (returns, or errors): the quality
-- check reads them without scanning the facts
CREATE INDEX fact_order_line_negative_revenue_idx ON customer_analytics.fact_order_line (revenue) WHERE revenue < 0;
COMMENT ON TABLE customer_analytics.fact_order_line IS
    'Order line facts, one row per (order_id, line_number); customer_key is the customer version in effect at order time';
COMMENT ON COLUMN customer_analytics.fact_order_line.quantity IS
    'Units; negative on a credit note''s line (a return booked as its own line, status completed): its revenue is negative and nets against sales, it is no purchase';
COMMENT ON COLUMN customer_analytics.fact_order_line.revenue IS
    'quantity * unit_price - discount, whatever the status; reports count completed lines only';
COMMENT ON COLUMN customer_analytics.fact_order_line.updated_at IS
    'The source''s updated_at for this version of the line, if it gave one (informational)';
COMMENT ON COLUMN customer_analytics.fact_order_line.customer_ref IS
    'The customer the line belongs to, whatever its version: the staged customer_id (dim_customer.customer_id of every version, also while the line waits on the unknown member for a late customer), or ''#guest:'' || order_id for a guest checkout; never NULL. A Citus cluster distributes the facts by it (docs/scaling.md)';
COMMENT ON COLUMN customer_analytics.fact_order_line.stage_id IS
    'The staged row this version came from: the latest staged version of a line wins, and a row staged earlier never overwrites it';

/*
 * No FOREIGN KEY constraints here, on purpose: clickstream is the largest
 * table, and per-row referential checks made its load three times slower
 * (measured: 683k events, 25.5 s with the three constraints, 15.6 s
 * without).  Its keys only ever come from transform()'s dimension lookups
 * (or are NULL for anonymous visitors), and the relationship data-quality
 * checks verify them after every load.
 *
 * On a Citus cluster the key becomes (event_id, session_id), session_id
 * being the distribution column (distribute()); transform_events() keeps
 * event_id unique there by moving an event that changed session.
 */
CREATE TABLE customer_analytics.fact_event (
    event_id     text PRIMARY KEY,
    event_ts     timestamptz NOT NULL,
    date_key     integer NOT NULL,
    customer_key bigint,
    customer_id  text,
    customer_stitched boolean NOT NULL DEFAULT false,
    session_id   text NOT NULL,
    event_type   text NOT NULL
                 CHECK (event_type IN ('page_view', 'product_view', 'add_to_cart', 'checkout', 'purchase')),
    product_key  bigint,
    order_id     text,
    channel      text,
    device       text,
    stage_id     bigint NOT NULL,
    load_id      bigint
);
CREATE INDEX fact_event_session_idx ON customer_analytics.fact_event (session_id, event_ts);
-- events arrive roughly in time order: a BRIN index costs almost nothing to maintain
CREATE INDEX fact_event_date_idx ON customer_analytics.fact_event USING brin (date_key);
COMMENT ON TABLE customer_analytics.fact_event IS
    'Clickstream facts, one row per event; customer_key NULL means an anonymous visitor, -1 an id not in dim_customer. Keys reference dim_date, dim_customer and dim_product (checked by transform and the quality checks, not by constraints)';
COMMENT ON COLUMN customer_analytics.fact_event.customer_id IS
    'The customer''s natural key: as the event gave it, or taken from a later event of the same session (customer_stitched); NULL for an anonymous visitor';
COMMENT ON COLUMN customer_analytics.fact_event.customer_stitched IS
    'The event itself was anonymous; customer_id and customer_key come from the next identified event of its session';

/* transform() bookkeeping */

CREATE TABLE customer_analytics_internal.event_transform_state (
    singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    snapshot          pg_snapshot NOT NULL,
    own_xid           xid8,
    system_identifier bigint NOT NULL,
    watermark         timestamptz,
    last_run_at       timestamptz
);
COMMENT ON TABLE customer_analytics_internal.event_transform_state IS
    'Where the event part of transform() (transform_events) stopped: its own snapshot, so that events can be processed every minute apart from the batch tables, and the event-time watermark (latest event time processed, never later than the run) from which the lateness window is counted; own_xid: the run''s own transaction, whose rows the next run sees again';

CREATE TABLE customer_analytics_internal.transform_state (
    singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    snapshot          pg_snapshot NOT NULL,
    system_identifier bigint NOT NULL,
    last_run_at       timestamptz
);
COMMENT ON TABLE customer_analytics_internal.transform_state IS
    'Where transform() stopped: the staged rows of transactions visible in snapshot are done; a different system_identifier (restored cluster) forces a full pass';

/*
 * pg_dump keeps the data of these tables (and the sequences' positions):
 * everything that a user or a load put there.  The unknown members are
 * created by CREATE EXTENSION itself, so they are filtered out.
 */
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.stg_customers', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.stg_products', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.stg_orders', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.stg_events', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.dim_customer', 'WHERE customer_key <> -1');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.dim_product', 'WHERE product_key <> -1');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.dim_date', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.fact_order_line', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.fact_event', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics_internal.transform_state', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics_internal.event_transform_state', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.load_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.stage_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.customer_key_seq', '');
SELECT pg_catalog.pg_extension_config_dump('customer_analytics.product_key_seq', '');
