# On a real Citus cluster (a coordinator and two workers on localhost):
# nothing is reported loaded that is not there.  Our C paths that write or
# read a table through the table AM (ingest's COPY machinery, the
# generator, rfm()'s scan) would otherwise fill or read the coordinator's
# empty shell table instead of the shards.
#
# - ingest_csv / ingest_csv_text / ingest_directory into a distributed or
#   reference table refuse clearly (feature_not_supported, naming the table,
#   a hint); nothing is recorded as loaded; the hinted way round loads all.
# - generate_sample_data into distributed staging tables loads through
#   Citus exactly the rows it reports, the same rows as on a single node.
# - rfm() on a distributed table gives the single node's answer.
# - quintile_breaks, rfm_agg and stats_agg are split between the workers
#   and the coordinator (worker_partial_agg / coord_combine_agg in EXPLAIN),
#   with the single node's results.
# - distribute() converts a loaded and transformed sample shop to the
#   cluster layout (refused on a worker; a second call changes nothing);
#   then every table holds the single node's rows, value for value, the
#   facts' foreign keys hold, and the queries, views and refreshes that
#   work on a cluster give the single node's answers (what does not work
#   yet is noted in the test's output and listed in docs/scaling.md).
# - on that layout, rfm() of the star schema, refresh_customer_rfm()
#   (rebuilt, incremental, as of a past time) with customer_rfm, the
#   rollup, top_customers and segment_summary, and the CLV models give the
#   single node's answers; the aggregates Citus cannot split run on the
#   coordinator (EXPLAIN) with the single node's results.
# - the staging mark: rows staged through the coordinator carry its
#   transaction id and transform() takes them all; an INSERT ... SELECT
#   from a Citus table that Citus runs through the workers (which would
#   stamp the rows with their own ids: reproduced with the old default,
#   the rows lost; the same through Citus's connections to a coordinator
#   that holds shards) is refused, and so is staging on a worker.
#
# The single node is a second database on the coordinator where the citus
# extension is not created: plain PostgreSQL, same build.
#
# Skipped, with a line saying so, when Citus is not installed in this
# PostgreSQL (scripts/citus.sh builds it from the vendored release).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::RealBin/lib";
use CustomerAnalytics qw(cron_conf);

my $sharedir = `pg_config --sharedir`;
chomp $sharedir;
if (!-f "$sharedir/extension/citus.control")
{
	plan skip_all => "Citus is not installed in $sharedir (scripts/citus.sh builds Citus 13.2 for PostgreSQL 15 to 17)";
}

my @nodes;
for my $name (qw(coordinator worker1 worker2))
{
	# Citus connects to the nodes (and to itself) over TCP; pg_cron is
	# preloaded but created in no database, as before
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf',
		cron_conf('postgres', preload => 'citus,pg_cron', background_workers => 0) . qq{
listen_addresses = '127.0.0.1'
max_prepared_transactions = 20
max_worker_processes = 32
citus.node_conninfo = 'sslmode=disable'
fsync = off
});
	$node->append_conf('pg_hba.conf', "host all all 127.0.0.1/32 trust\n");
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION citus');
	push @nodes, $node;
}
my ($coord, @workers) = @nodes;
$coord->safe_psql('postgres', sprintf(q{SELECT citus_set_coordinator_host('127.0.0.1', %d)}, $coord->port));
for my $w (@workers)
{
	$coord->safe_psql('postgres', sprintf(q{SELECT citus_add_node('127.0.0.1', %d)}, $w->port));
}
is($coord->safe_psql('postgres', q{SELECT count(*) FROM citus_get_active_worker_nodes()}), '2',
	'a coordinator and two workers');

# Citus propagates CREATE EXTENSION to the workers (which must have it to
# run our functions and aggregates on the shards)
$coord->safe_psql('postgres', 'CREATE EXTENSION customer_analytics CASCADE');
for my $w (@workers)
{
	is($w->safe_psql('postgres', q{SELECT count(*) FROM pg_extension WHERE extname = 'customer_analytics'}),
		'1', 'the extension exists on worker ' . $w->name);
}
# the single node
$coord->safe_psql('postgres', 'CREATE DATABASE single');
$coord->safe_psql('single', 'CREATE EXTENSION customer_analytics');

# ---------------------------------------------------------------------
# ingestion into Citus tables: refused, nothing recorded as loaded
# ---------------------------------------------------------------------
my $dir = $coord->basedir . '/landing';
mkdir $dir or die "mkdir $dir: $!";
my @lines = map { sprintf('c%03d,2025-%02d-%02d 10:00:00+00,%d.%02d,o%04d', $_ % 37, 1 + $_ % 12, 1 + $_ % 28, 5 + $_ % 90, $_ % 100, $_) } 1 .. 400;
for my $part (0, 1)
{
	open my $fh, '>', "$dir/orders_$part.csv" or die $!;
	print $fh "customer,ordered_at,total,order_no\n";
	print $fh "$_\n" for @lines[ $part * 200 .. $part * 200 + 199 ];
	close $fh;
}
my $orders_ddl = q{CREATE TABLE public.orders (customer text NOT NULL, ordered_at timestamptz NOT NULL, total numeric(12,2) NOT NULL, order_no text NOT NULL)};
$coord->safe_psql('postgres', qq{
	$orders_ddl;
	SELECT create_distributed_table('public.orders', 'customer');
	CREATE TABLE public.codes (code text NOT NULL, label text);
	SELECT create_reference_table('public.codes');
});
$coord->safe_psql('single', $orders_ddl);

for my $case (
	[ 'ingest_csv', qq{SELECT * FROM customer_analytics.ingest_csv('public.orders', '$dir/orders_0.csv')} ],
	[ 'ingest_csv_text', q{SELECT * FROM customer_analytics.ingest_csv_text('public.orders', E'customer,ordered_at,total,order_no\nc1,2025-01-01,1,o1\n')} ],
	[ 'ingest_directory', qq{SELECT * FROM customer_analytics.ingest_directory('public.orders', '$dir')} ],
	[ 'ingest_csv_text (reference table)', q{SELECT * FROM customer_analytics.ingest_csv_text('public.codes', E'code,label\na,b\n')} ])
{
	my ($what, $sql) = @$case;
	my ($rc, $out, $err) = $coord->psql('postgres', "\\set VERBOSITY verbose\n$sql");
	isnt($rc, 0, "$what into a Citus table is refused");
	like($err, qr/0A000/, "$what: SQLSTATE feature_not_supported");
	like($err, qr/cannot ingest into public\.(orders|codes): it is managed by Citus/, "$what: the message names the table");
	like($err, qr/HINT:.*INSERT INTO public\.(orders|codes) SELECT/, "$what: the hint gives the way round");
}
like(($coord->psql('postgres', q{SELECT * FROM customer_analytics.ingest_csv_text('public.codes', E'code,label\na,b\n')}))[2],
	qr/Citus reference table/, 'a reference table is called one');
is($coord->safe_psql('postgres', q{SELECT count(*) FROM public.orders}), '0', 'no row reached the distributed table');
# (Citus plans even SELECT ... FROM ONLY on the shards: the shell's own
# size tells whether anything was written into it)
is($coord->safe_psql('postgres', q{SELECT pg_relation_size('public.orders')}), '0', 'nor its shell on the coordinator');
is($coord->safe_psql('postgres', q{SELECT count(*) FROM customer_analytics.ingest_load WHERE status = 'loaded'}), '0',
	'no load is recorded as loaded');

# the hinted way round: ingest into a local table, INSERT ... SELECT
$coord->safe_psql('postgres', q{CREATE TABLE public.orders_landing (LIKE public.orders)});
is($coord->safe_psql('postgres', qq{SELECT sum(rows_loaded) FROM customer_analytics.ingest_directory('public.orders_landing', '$dir')}),
	'400', 'ingest_directory into a local table loads the 400 rows');
$coord->safe_psql('postgres', q{INSERT INTO public.orders SELECT * FROM public.orders_landing});
is($coord->safe_psql('postgres', q{SELECT count(*) FROM public.orders}), '400', 'and INSERT ... SELECT puts them in the shards');
is($coord->safe_psql('single', qq{SELECT sum(rows_loaded) FROM customer_analytics.ingest_directory('public.orders', '$dir')}),
	'400', 'the single node loads the same files');
cmp_ok($workers[0]->safe_psql('postgres', q{SELECT count(*) FROM public.orders}), '==', 400,
	'the rows are visible from a worker too');

# ---------------------------------------------------------------------
# rfm() on a distributed table: the single node's answer
# ---------------------------------------------------------------------
my $rfm = q{SELECT md5(string_agg(format('%s %s %s %s %s', customer_id, recency_days, frequency, monetary, rfm_cell), ',' ORDER BY customer_id))
	FROM customer_analytics.rfm('2026-01-01', 'public.orders', customer_column => 'customer', ts_column => 'ordered_at',
	                            amount_column => 'total', order_column => 'order_no')};
my $rfm_single = $coord->safe_psql('single', $rfm);
is($coord->safe_psql('postgres', $rfm), $rfm_single, 'rfm() on a distributed table equals the single node');
is($coord->safe_psql('postgres', q{SELECT count(*) FROM customer_analytics.rfm('2026-01-01', 'public.orders', customer_column => 'customer', ts_column => 'ordered_at', amount_column => 'total')}),
	'37', 'every customer is scored');

# ---------------------------------------------------------------------
# aggregates: pushed down to the workers, same results
# ---------------------------------------------------------------------
for my $case (
	[ 'quintile_breaks', q{SELECT customer_analytics.quintile_breaks(total::float8) FROM public.orders} ],
	[ 'rfm_agg',         q{SELECT customer_analytics.rfm_agg(ordered_at, total)::text FROM public.orders} ],
	[ 'quintile_breaks per day', q{SELECT string_agg(b::text, ';' ORDER BY d) FROM (SELECT ordered_at::date AS d, customer_analytics.quintile_breaks(total::float8) AS b FROM public.orders GROUP BY 1) s} ])
{
	my ($what, $sql) = @$case;
	my $plan = $coord->safe_psql('postgres', "EXPLAIN (VERBOSE, COSTS OFF) $sql");
	like($plan, qr/worker_partial_agg/, "$what: partial aggregation on the workers");
	like($plan, qr/coord_combine_agg/, "$what: combined on the coordinator");
	my $single = $coord->safe_psql('single', $sql);
	isnt($single, '', "$what: the single node has a result");
	is($coord->safe_psql('postgres', $sql), $single, "$what: the cluster's result equals the single node's");
}
# stats_agg sums in float8: the shards' partial sums, added up, may differ
# from one running sum in the last digits; the count is exact
# (its text form is "(count,mean,sum of squared deviations)")
my $stats = q{SELECT trim(BOTH '()' FROM customer_analytics.stats_agg(total::float8)::text) FROM public.orders};
my $plan = $coord->safe_psql('postgres', "EXPLAIN (VERBOSE, COSTS OFF) $stats");
like($plan, qr/worker_partial_agg/, 'stats_agg: partial aggregation on the workers');
like($plan, qr/coord_combine_agg/, 'stats_agg: combined on the coordinator');
my @c = split /,/, $coord->safe_psql('postgres', $stats);
my @s = split /,/, $coord->safe_psql('single', $stats);
is($c[0], $s[0], 'stats_agg: the same count');
ok(abs($c[$_] - $s[$_]) <= 1e-12 * abs($s[$_]), "stats_agg: field $_ equal to 12 significant digits ($c[$_] vs $s[$_])") for 1 .. 2;

# ---------------------------------------------------------------------
# generate_sample_data into distributed staging tables: through Citus,
# exactly the rows reported, the single node's rows
# ---------------------------------------------------------------------
$coord->safe_psql('postgres', q{
	SELECT create_distributed_table('customer_analytics.stg_customers', 'customer_id');
	SELECT create_reference_table('customer_analytics.stg_products');
	SELECT create_distributed_table('customer_analytics.stg_orders', 'order_id');
	SELECT create_distributed_table('customer_analytics.stg_events', 'session_id');
});
my $gen = q{SELECT string_agg(target || '=' || rows, ' ' ORDER BY target)
	FROM customer_analytics.generate_sample_data(customers => 60, days => 30, seed => 17, products => 20, defects => false)};
my $reported = $coord->safe_psql('postgres', $gen);
my $reported_single = $coord->safe_psql('single', $gen);
is($reported, $reported_single, 'the generator reports the same rows as on the single node');
my $counted = q{SELECT string_agg(t || '=' || n, ' ' ORDER BY t) FROM (
	SELECT 'stg_customers' AS t, count(*) AS n FROM customer_analytics.stg_customers
	UNION ALL SELECT 'stg_events', count(*) FROM customer_analytics.stg_events
	UNION ALL SELECT 'stg_orders', count(*) FROM customer_analytics.stg_orders
	UNION ALL SELECT 'stg_products', count(*) FROM customer_analytics.stg_products) c};
my $counted_cluster = $coord->safe_psql('postgres', $counted);
note "reported: $reported; counted: $counted_cluster";
like($reported, qr/stg_orders=[1-9]/, 'the generator made order lines');
is($counted_cluster, $coord->safe_psql('single', $counted), 'the cluster holds the rows the single node holds');
for my $t (qw(stg_customers stg_products stg_orders stg_events))
{
	my ($n) = $reported =~ /\b$t=(\d+)/;
	my ($m) = $counted_cluster =~ /\b$t=(\d+)/;
	is($m, $n, "$t: the rows reported are the rows counted through the coordinator");
	is($coord->safe_psql('postgres', "SELECT pg_relation_size('customer_analytics.$t')"), '0', "$t: nothing in the coordinator's shell");
}
my $content = q{SELECT md5(string_agg(format('%s|%s|%s|%s|%s|%s|%s', order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price), ',' ORDER BY order_id, line_number))
	FROM customer_analytics.stg_orders};
is($coord->safe_psql('postgres', $content), $coord->safe_psql('single', $content), 'the order lines are the same, value for value');

# ---------------------------------------------------------------------
# distribute(): the sample shop, loaded and transformed as on a single
# node, converted to the cluster layout; then every table and what works
# on it answers as the single node does (docs/scaling.md lists what does
# not work on a cluster yet; those are only noted here)
# ---------------------------------------------------------------------
# a database of its own, so that the tables distributed by hand above do
# not stand in the way (Citus keeps its metadata per database)
for my $node (@nodes)
{
	$node->safe_psql('postgres', 'CREATE DATABASE shop');
	$node->safe_psql('shop', 'CREATE EXTENSION citus');
}
$coord->safe_psql('shop', sprintf(q{SELECT citus_set_coordinator_host('127.0.0.1', %d)}, $coord->port));
$coord->safe_psql('shop', sprintf(q{SELECT citus_add_node('127.0.0.1', %d)}, $_->port)) for @workers;
$coord->safe_psql('shop', 'CREATE EXTENSION customer_analytics');
$coord->safe_psql('postgres', 'CREATE DATABASE shop_single');
$coord->safe_psql('shop_single', 'CREATE EXTENSION customer_analytics');

# the same shop in both, loaded and transformed before the conversion
my $load = q{SELECT count(*) FROM customer_analytics.generate_sample_data(customers => 300, days => 90, seed => 17, start_date => '2025-01-01');
	SELECT string_agg(step || '=' || rows_affected, ' ' ORDER BY step) FROM customer_analytics.transform()};
my $steps = $coord->safe_psql('shop', $load);
is($steps, $coord->safe_psql('shop_single', $load), 'the shop is loaded and transformed alike before the conversion');
like($steps, qr/fact_order_line=[1-9]/, 'with order lines');

# refused on a worker
my ($rc, $out, $err) = $workers[0]->psql('shop', "\\set VERBOSITY verbose\nSELECT * FROM customer_analytics.distribute()");
isnt($rc, 0, 'distribute() on a worker is refused');
like($err, qr/55000.*must run on the Citus coordinator/s, 'distribute() on a worker: object_not_in_prerequisite_state, it says where to run it');

# refused with a bad shard count, and where tables of the layout were
# converted by hand (the staging tables of the database above)
($rc, $out, $err) = $coord->psql('shop', "\\set VERBOSITY verbose\nSELECT * FROM customer_analytics.distribute(shard_count => 0)");
like($err, qr/22023.*the shard count must be at least 1/s, 'distribute(shard_count => 0) is refused: invalid_parameter_value');
($rc, $out, $err) = $coord->psql('postgres', "\\set VERBOSITY verbose\nSELECT * FROM customer_analytics.distribute()");
like($err, qr/55000.*converted by hand: customer_analytics\.stg_products, customer_analytics\.stg_orders, customer_analytics\.stg_events, customer_analytics\.stg_customers/s,
	'distribute() over tables converted by hand is refused, naming them');
like($err, qr/HINT:.*undistribute_table/, 'with the way back');
is($coord->safe_psql('shop', q{SELECT count(*) FROM pg_dist_partition}), '0', 'the refusals converted nothing');

my $layout = q{SELECT string_agg(format('%s %s %s %s', table_name, citus_kind, distribution_column, shards), '; ')
	FROM customer_analytics.distribute(shard_count => 4)};
my $expected_layout = join('; ', map { "customer_analytics.$_" }
	'dim_date reference  1', 'dim_product reference  1', 'dim_customer reference  1',
	'stg_products reference  1', 'fact_order_line distributed customer_ref 4', 'stg_orders distributed order_id 4',
	'_internal.unknown_member_line distributed customer_ref 4', 'fact_event distributed session_id 4',
	'stg_events distributed session_id 4', 'stg_customers distributed customer_id 4');
$expected_layout =~ s/customer_analytics\._internal/customer_analytics_internal/;
my $t0 = time;
is($coord->safe_psql('shop', $layout), $expected_layout, 'distribute() converts the loaded schema and returns the layout');
note sprintf('distribute() took %d s', time - $t0);
($rc, $out, $err) = $coord->psql('shop', $layout);
is($rc, 0, 'a second distribute() succeeds');
is($out, $expected_layout, 'and returns the same layout');
like($err, qr/the star schema is distributed already/, 'saying that it is distributed already');
is($coord->safe_psql('shop', q{SELECT count(*) FROM pg_dist_partition}), '10', 'ten Citus tables');
is($coord->safe_psql('shop', q{SELECT count(*) FROM pg_dist_partition p
	WHERE pg_relation_size(p.logicalrelid) > 0}), '0', "no rows left in the coordinator's shells");
is($coord->safe_psql('shop', q{SELECT shard_count, cardinality(dropped_triggers) > 0 FROM customer_analytics_internal.cluster_layout}),
	'4|t', 'the change-queue triggers it dropped are recorded');
is($coord->safe_psql('shop', q{SELECT count(*) FROM pg_trigger t JOIN pg_dist_partition p ON p.logicalrelid = t.tgrelid WHERE NOT t.tgisinternal}),
	'0', 'no trigger is left on a Citus table');
for my $w (@workers)
{
	is($w->safe_psql('shop', q{SELECT count(*) FROM pg_trigger t
		WHERE t.tgrelid = 'customer_analytics.fact_order_line'::regclass AND NOT t.tgisinternal}),
		'0', 'nor on the worker ' . $w->name . "'s copy");
}
is($workers[1]->safe_psql('shop', q{SELECT count(*) FROM customer_analytics.fact_order_line}),
	$coord->safe_psql('shop_single', q{SELECT count(*) FROM customer_analytics.fact_order_line}),
	'a worker sees every order line');
# the facts' foreign keys to the dimensions are back, and enforced
($rc, $out, $err) = $coord->psql('shop', q{INSERT INTO customer_analytics.fact_order_line
	(order_id, line_number, customer_key, product_key, date_key, order_ts, quantity, unit_price, status, stage_id, customer_ref)
	VALUES ('no-such-product', 1, -1, 987654321, 20250101, '2025-01-01', 1, 1, 'completed', 1, '#guest:no-such-product')});
like($err, qr/violates foreign key constraint "fact_order_line_product_key_fkey(_\d+)?"/, "the facts' foreign keys hold on the cluster");

# every table and materialized view holds what the single node holds
# (but the layout's bookkeeping, and the two queues in which distribute()
# asked for a full refresh, checked just below)
my $counts = q{SELECT string_agg(format('%s=%s', c.oid::regclass,
		(xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %s', c.oid::regclass), false, true, '')))[1]), ' '
		ORDER BY c.oid::regclass::text)
	FROM pg_class c JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
	WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'customer_analytics')
	  AND c.relkind IN ('r', 'm')
	  AND c.oid NOT IN ('customer_analytics_internal.cluster_layout'::regclass,
	                    'customer_analytics_internal.rfm_dirty_customer'::regclass,
	                    'customer_analytics_internal.sales_dirty_day'::regclass)};
my $counts_cluster = $coord->safe_psql('shop', $counts);
is($counts_cluster, $coord->safe_psql('shop_single', $counts), 'every table: the same row count as on the single node');
like($counts_cluster, qr/fact_event=[1-9]/, 'events included');
is($coord->safe_psql('shop', q{SELECT (SELECT count(*) FROM customer_analytics_internal.rfm_dirty_customer WHERE customer_id IS NULL),
	(SELECT count(*) FROM customer_analytics_internal.sales_dirty_day WHERE day = '-infinity')}),
	'1|1', 'the RFM and sales queues ask for a full refresh');
# and, value for value, every table of the layout (the staging times and
# transactions are the load's own)
for my $t (split /\n/, $coord->safe_psql('shop', q{SELECT table_name FROM customer_analytics_internal.cluster_layout_plan() ORDER BY ordinal}))
{
	my $sum = qq{SELECT md5(string_agg(r, ',' ORDER BY r)) FROM (
		SELECT (to_jsonb(t) - 'loaded_at' - 'staged_xid')::text AS r FROM $t t) s};
	is($coord->safe_psql('shop', $sum), $coord->safe_psql('shop_single', $sum), "$t: the same rows");
}

# queries over the layout: the single node's answers
my $completed_line = q{CREATE VIEW public.completed_line AS
	SELECT c.customer_id, f.order_id, f.order_ts, f.revenue
	FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_customer c USING (customer_key)
	WHERE f.status = 'completed' AND f.customer_key <> -1};
$coord->safe_psql($_, $completed_line) for qw(shop shop_single);
for my $case (
	[ 'revenue and orders per customer (facts joined to a reference table)',
	  q{SELECT md5(string_agg(format('%s %s %s', customer_id, revenue, orders), ',' ORDER BY customer_id)) FROM (
	    SELECT c.customer_id, sum(f.revenue) AS revenue, count(DISTINCT f.order_id) AS orders
	    FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_customer c USING (customer_key)
	    WHERE f.status = 'completed' GROUP BY 1) s} ],
	[ 'rfm() of the customers, through a view over the facts',
	  q{SELECT md5(string_agg(format('%s %s %s %s %s', customer_id, recency_days, frequency, monetary, rfm_cell), ',' ORDER BY customer_id))
	    FROM customer_analytics.rfm('2025-04-01', 'public.completed_line', customer_column => 'customer_id',
	                                ts_column => 'order_ts', amount_column => 'revenue', order_column => 'order_id')} ],
	[ 'rfm_agg over the facts',
	  q{SELECT customer_analytics.rfm_agg(order_ts, revenue)::text FROM customer_analytics.fact_order_line WHERE status = 'completed'} ],
	[ 'product_interest', q{SELECT md5(string_agg(p::text, ',' ORDER BY p::text)) FROM customer_analytics.product_interest p} ],
	[ 'purchase_order', q{SELECT md5(string_agg(p::text, ',' ORDER BY p::text)) FROM customer_analytics.purchase_order p} ])
{
	my ($what, $sql) = @$case;
	my $single = $coord->safe_psql('shop_single', $sql);
	isnt($single, '', "$what: the single node has a result");
	is($coord->safe_psql('shop', $sql), $single, "$what: the same answer on the cluster");
}

# the sales rollup (a full rebuild on the cluster: distribute() queued
# every day, as the dropped triggers would have), then its views
my $rollup = q{SELECT customer_analytics.refresh_sales_rollup();
	REFRESH MATERIALIZED VIEW customer_analytics.daily_sales;
	REFRESH MATERIALIZED VIEW customer_analytics.product_category_sales;
	SELECT md5(string_agg(d::text, ',' ORDER BY d::text)) FROM customer_analytics.daily_sales d;
	SELECT md5(string_agg(p::text, ',' ORDER BY p::text)) FROM customer_analytics.product_category_sales p};
my $rollup_single = $coord->safe_psql('shop_single', $rollup);
is($coord->safe_psql('shop', $rollup), $rollup_single, 'refresh_sales_rollup(), daily_sales and product_category_sales: the same on the cluster');

# sessions (written on the coordinator from the distributed events) and
# the funnel over them; anomaly detection over a query on the facts
my $sessions = q{SELECT count(*) FROM customer_analytics.refresh_sessions(true);
	SELECT md5(string_agg(s::text, ',' ORDER BY s::text)) FROM customer_analytics.sessions s;
	SELECT md5(string_agg(f::text, ',' ORDER BY f::text)) FROM customer_analytics.funnel_daily f};
my $sessions_single = $coord->safe_psql('shop_single', $sessions);
like($sessions_single, qr/^[1-9]/, 'the single node has sessions');
is($coord->safe_psql('shop', $sessions), $sessions_single, 'refresh_sessions(), sessions and funnel_daily: the same on the cluster');
my $anomalies = q{SELECT md5(string_agg(a::text, ',' ORDER BY a::text)) FROM customer_analytics.detect_anomalies(
	$$SELECT 'revenue', order_ts::date::timestamptz, sum(revenue)::float8 FROM customer_analytics.fact_order_line
	  WHERE status = 'completed' GROUP BY 2$$, window_size => 14, min_history => 14) a};
my $anomalies_single = $coord->safe_psql('shop_single', $anomalies);
isnt($anomalies_single, '', 'the single node scores the days');
is($coord->safe_psql('shop', $anomalies), $anomalies_single, 'detect_anomalies() over a query on the facts: the same on the cluster');

# issue 17 sales views, anomalies, forecasts, checks, track_event, alerts
# (each compared with shop_single by checksums)

# the sales views and the anomalies over them (refresh_sales_rollup()
# now finds the rollups filled: its EXISTS over the facts is planned)
my $sales_views = q{SELECT customer_analytics.refresh_sales_views();
	SELECT md5(string_agg(s::text, ',' ORDER BY s::text)) FROM customer_analytics.order_count_series s;
	SELECT count(*) || ' ' || md5(string_agg(a::text, ',' ORDER BY a::text)) FROM customer_analytics.anomalies a};
my $sales_views_single = $coord->safe_psql('shop_single', $sales_views);
like($sales_views_single, qr/\n[1-9]\d* [0-9a-f]{32}$/, 'the single node finds anomalies');
is($coord->safe_psql('shop', $sales_views), $sales_views_single,
	'refresh_sales_views(), order_count_series and the anomalies view: the same on the cluster');

# the day in progress: the last day's lines moved to just after its
# midnight (constants: Citus refuses a stable expression over a column in
# an UPDATE), so that it is cut short against its weekday's usual hours
my $last_day = $coord->safe_psql('shop_single', q{SELECT max(order_ts)::date FROM customer_analytics.fact_order_line WHERE status = 'completed'});
my $in_progress = qq{BEGIN;
	UPDATE customer_analytics.fact_order_line SET order_ts = '$last_day 00:01+00' WHERE order_ts >= '$last_day';
	SELECT customer_analytics.day_in_progress(), customer_analytics.sales_training_end();
	SELECT md5(string_agg(s::text, ',' ORDER BY s::text)) FROM customer_analytics.order_count_series s;
	ROLLBACK};
my $in_progress_single = $coord->safe_psql('shop_single', $in_progress);
like($in_progress_single, qr/^\Q$last_day\E\|/, 'the single node sees the last day in progress');
is($coord->safe_psql('shop', $in_progress), $in_progress_single,
	'day_in_progress(), sales_training_end() and order_count_series without it: the same on the cluster');
is($coord->safe_psql('shop', q{SELECT customer_analytics.day_in_progress()}), '', 'and no day in progress once the day is whole');

# the day in progress scored as it goes, at a time every 31 hours
my $intraday = q{SELECT count(*) FILTER (WHERE i.orders_so_far > 0) || ' ' || md5(string_agg(i::text, ';' ORDER BY at))
	FROM generate_series(timestamptz '2025-01-01 09:00+00', '2025-03-31 21:00+00', interval '31 hours') at,
	     customer_analytics.intraday_orders(at) i};
my $intraday_single = $coord->safe_psql('shop_single', $intraday);
like($intraday_single, qr/^[1-9]/, 'the single node counts orders during the day');
is($coord->safe_psql('shop', $intraday), $intraday_single, 'intraday_orders(): the same on the cluster');

# the forecasts and their backtest
my $forecasts = q{SELECT customer_analytics.refresh_forecasts();
	SELECT count(*) || ' ' || md5(string_agg(f::text, ',' ORDER BY f::text)) FROM customer_analytics.sales_forecast f;
	SELECT md5(string_agg(a::text, ',' ORDER BY a::text)) FROM customer_analytics.sales_forecast_accuracy a;
	SELECT md5(string_agg(b::text, ',' ORDER BY b::text)) FROM customer_analytics.sales_forecast_backtest(holdout => 14) b};
my $forecasts_single = $coord->safe_psql('shop_single', $forecasts);
like($forecasts_single, qr/^0\n[1-9]\d* /, 'the single node forecasts');
is($coord->safe_psql('shop', $forecasts), $forecasts_single,
	'refresh_forecasts(), sales_forecast, sales_forecast_accuracy and sales_forecast_backtest(): the same on the cluster');

# every built-in check, over whole tables and over what changed (which
# the cluster reads whole where the queue triggers were dropped: the
# "incremental" column is not compared); then with lines outside their
# customer version, the failing rows themselves (run_checks() keeps a
# sample of 5 of them, in no set order)
my $checks = q{SELECT string_agg(format('%s %s %s', check_name, passed, failing_rows), ', ' ORDER BY check_name)
	FROM customer_analytics.run_checks(full => true);
	SELECT string_agg(format('%s %s %s', check_name, passed, failing_rows), ', ' ORDER BY check_name)
	FROM customer_analytics.run_checks()};
my $checks_single = $coord->safe_psql('shop_single', $checks);
like($checks_single, qr/order line has its customer version t 0/, 'the single node runs the customer-version check');
is($coord->safe_psql('shop', $checks), $checks_single, 'run_checks(), whole and incremental: the same on the cluster');
is($coord->safe_psql('shop', q{SELECT count(*) FROM customer_analytics.quality_check WHERE builtin}), '7', 'seven built-in checks');
my $version_sql = $coord->safe_psql('shop_single', q{SELECT customer_analytics.quality_check_sql(c)
	FROM customer_analytics.quality_check c WHERE c.name = 'order line has its customer version'});
my $version_check = qq{BEGIN;
	UPDATE customer_analytics.fact_order_line SET order_ts = '2020-01-01 00:00+00'
	WHERE customer_key = ANY (ARRAY(SELECT v.customer_key FROM customer_analytics.dim_customer v
	                                WHERE EXISTS (SELECT 1 FROM customer_analytics.dim_customer w
	                                              WHERE w.customer_id = v.customer_id AND w.valid_from < v.valid_from)));
	SELECT string_agg(format('%s %s %s', check_name, passed, failing_rows), ', ' ORDER BY check_name)
	FROM customer_analytics.run_checks(full => true);
	SELECT md5(string_agg(x::text, ',' ORDER BY x::text)) FROM ($version_sql) x;
	ROLLBACK};
my $version_single = $coord->safe_psql('shop_single', $version_check);
like($version_single, qr/order line has its customer version f [1-9]/, 'the single node finds lines outside their customer version');
is($coord->safe_psql('shop', $version_check), $version_single,
	'the customer-version check finds the same lines on the cluster');

# alerts: raised once per condition, on the coordinator's alert table
my $alerts = q{SELECT customer_analytics.alert_new_anomalies();
	SELECT customer_analytics.alert_new_anomalies();
	SELECT count(*) FROM customer_analytics.alert_forecast_misses();
	SELECT customer_analytics.alert_intraday('2025-03-31 12:00+00');
	SELECT customer_analytics.raise_alert('cluster test', 'shop', '{"n": 1}') IS NOT NULL;
	SELECT customer_analytics.raise_alert('cluster test', 'shop', '{"n": 1}') IS NULL;
	SELECT md5(string_agg(format('%s %s %s %s %s', kind, subject, severity, details, dedup_key), ',' ORDER BY dedup_key))
	FROM customer_analytics.alert WHERE kind IN ('anomaly', 'cluster test', 'forecast_miss', 'intraday_drop')};
my $alerts_single = $coord->safe_psql('shop_single', $alerts);
like($alerts_single, qr/^[1-9]\d*\n0\n0\n0\nt\nt\n/, 'the single node raises each anomaly once, and an alert once');
is($coord->safe_psql('shop', $alerts), $alerts_single, 'alert_new_anomalies(), the forecast and intraday alerts, raise_alert(): the same on the cluster');
# the failed checks' alerts (their keys hold the time of the run)
my $check_alerts = q{SELECT string_agg(subject || '=' || n, ', ' ORDER BY subject)
	FROM (SELECT subject, count(*) AS n FROM customer_analytics.alert WHERE kind = 'quality_check' GROUP BY 1) s};
my $check_alerts_single = $coord->safe_psql('shop_single', $check_alerts);
like($check_alerts_single, qr/orders are fresh=[1-9]/, 'the single node alerts the failed checks');
is($coord->safe_psql('shop', $check_alerts), $check_alerts_single, "run_checks()' alerts: the same on the cluster");
is($coord->safe_psql('shop', q{SELECT count(*) FROM pg_dist_partition WHERE logicalrelid = 'customer_analytics.alert'::regclass}),
	'0', 'the alerts are a local table of the coordinator');

# track_event(): refused on a worker (its events would miss the
# coordinator's pipeline), routed to the shards through the coordinator
my $cluster_session_staged = q{SELECT count(*) FROM customer_analytics.stg_events WHERE session_id = 'cluster-session'};
for my $w (@workers)
{
	($rc, $out, $err) = $w->psql('shop', "\\set VERBOSITY verbose\nSELECT customer_analytics.track_event('page_view', 'cluster-session', event_id => 'cluster-worker')");
	isnt($rc, 0, 'track_event() on the worker ' . $w->name . ' is refused');
	like($err, qr/55000: track_event\(\) must run on the Citus coordinator, and this node is a worker/,
		'track_event() on a worker: object_not_in_prerequisite_state, saying why');
	like($err, qr/HINT:\s+Connect to the coordinator/, 'track_event() on a worker: the hint says to connect to the coordinator');
}
my $track = q{SELECT string_agg(customer_analytics.track_event(t, 'cluster-session', product_id => 'P0001', event_ts => '2025-03-31 12:00+00'::timestamptz + n * interval '1 minute',
	                                                         event_id => 'cluster-' || n), ',' ORDER BY n)
	FROM (VALUES (1, 'page_view'), (2, 'product_view'), (3, 'add_to_cart'), (4, 'checkout'), (5, 'purchase')) e(n, t)};
is($coord->safe_psql('shop', $track), $coord->safe_psql('shop_single', $track), 'track_event() through the coordinator returns the ids the single node returns');
is($coord->safe_psql('shop', $cluster_session_staged), '5', 'the five events are staged, none from the workers (counted through the coordinator)');
is($coord->safe_psql('shop', q{SELECT pg_relation_size('customer_analytics.stg_events')}), '0', "none in the coordinator's shell: they are in the shards");
is($coord->safe_psql('shop', q{SELECT count(*) FROM run_command_on_shards('customer_analytics.stg_events',
	$$SELECT count(*) FROM %s WHERE session_id = 'cluster-session'$$) WHERE result::bigint > 0}), '1', 'all in the one shard of their session');
my $events = q{SELECT md5(string_agg(format('%s %s %s %s %s', event_id, event_ts, session_id, event_type, product_id), ',' ORDER BY event_id))
	FROM customer_analytics.stg_events WHERE session_id = 'cluster-session'};
is($coord->safe_psql('shop', $events), $coord->safe_psql('shop_single', $events), 'the staged events are the single node\'s');

# ---------------------------------------------------------------------
# issue 17 RFM and CLV on the cluster: rfm() of the star schema,
# refresh_customer_rfm() (full and incremental) and what it feeds, the
# CLV models; the aggregates that do not push down
# ---------------------------------------------------------------------
# a checksum of rfm()'s columns (customer_rfm has them too) over a source
sub rfm_sum
{
	my ($source) = @_;
	return qq{SELECT md5(string_agg(format('%s %s %s %s %s %s %s', x.customer_key, x.customer_id, x.recency_days, x.frequency,
		x.monetary, x.rfm_cell, x.segment), ',' ORDER BY x.customer_id)) || ' ' || count(*) FROM $source x};
}
my $rfm_star = q{SELECT md5(string_agg(format('%s %s %s %s %s %s %s', x.customer_key, x.customer_id, x.recency_days, x.frequency,
		x.monetary, x.rfm_cell, x.segment), ',' ORDER BY x.customer_id)) || ' ' || count(*)
	FROM customer_analytics.rfm('2025-04-01') x;
	SELECT md5(string_agg(x::text, ',' ORDER BY x.customer_id)) || ' ' || count(*) FROM customer_analytics.rfm('2025-02-15') x};
my $rfm_star_single = $coord->safe_psql('shop_single', $rfm_star);
like($rfm_star_single, qr/ [1-9]\d*\n.* [1-9]/, 'the single node scores customers from the star schema');
is($coord->safe_psql('shop', $rfm_star), $rfm_star_single,
	'rfm() on the distributed star schema (now and an as_of in the past): the same rows as the single node');

# customer_rfm and what reads it: distribute() queued a full rebuild, as
# transform()'s first load did on the single node
my $rfm_views = join(";\n", q{REFRESH MATERIALIZED VIEW customer_analytics.top_customers},
	q{REFRESH MATERIALIZED VIEW customer_analytics.segment_summary},
	rfm_sum('customer_analytics.customer_rfm'),
	q{SELECT md5(string_agg(x::text, ',' ORDER BY x.customer_id)) FROM customer_analytics.rfm_rollup_customer x},
	q{SELECT md5(string_agg(x::text, ',' ORDER BY x.rank)) || ' ' || count(*) FROM customer_analytics.top_customers x},
	q{SELECT md5(string_agg(x::text, ',' ORDER BY x.segment)) || ' ' || count(*) FROM customer_analytics.segment_summary x});
my $rfm_refresh = "SELECT customer_analytics.refresh_customer_rfm();\n$rfm_views";
my $rfm_refresh_single = $coord->safe_psql('shop_single', $rfm_refresh);
like($rfm_refresh_single, qr/^[1-9]/, 'the single node scores its customers');
is($coord->safe_psql('shop', $rfm_refresh), $rfm_refresh_single,
	'refresh_customer_rfm() (the full rebuild), customer_rfm, the RFM rollup, top_customers, segment_summary: the same on the cluster');
is($coord->safe_psql('shop', rfm_sum(q{customer_analytics.rfm('2025-04-01')})),
	$coord->safe_psql('shop', rfm_sum('customer_analytics.customer_rfm')),
	'customer_rfm on the cluster is rfm(as_of) of the cluster');

# lines written by hand through the coordinator (rolled back after): an
# order over two days under two versions of one customer with a credit
# line, a credit note of its own, one worth nothing, a line added to an
# order already counted.  The single node's triggers queue them; the
# cluster has none (distribute() dropped them), so they are queued there
# as transform()'s writer queues its lines: the incremental refresh, then
# the full one, each with the single node's answers
my $hand = q{BEGIN;
INSERT INTO customer_analytics.fact_order_line
	(order_id, line_number, customer_key, product_key, date_key, order_ts, quantity, unit_price, status, stage_id, customer_ref)
SELECT v.order_id, v.line_number, CASE v.version WHEN 'old' THEN c.old_key ELSE c.new_key END, p.product_key,
       v.date_key, v.order_ts::timestamptz, v.quantity, v.unit_price, 'completed', 0, c.customer_id
FROM (SELECT customer_id, min(customer_key) AS old_key, max(customer_key) AS new_key FROM customer_analytics.dim_customer
      WHERE customer_key <> -1 GROUP BY customer_id HAVING count(*) > 1 ORDER BY customer_id LIMIT 1) c,
     (SELECT min(product_key) AS product_key FROM customer_analytics.dim_product WHERE product_key <> -1) p,
     (VALUES ('HAND-1', 1, 'old', 20250320, '2025-03-20 10:00+00', 2, 10.50),
             ('HAND-1', 2, 'new', 20250321, '2025-03-21 09:00+00', 1, 99.00),
             ('HAND-1', 3, 'new', 20250321, '2025-03-21 09:00+00', -1, 10.50),
             ('HAND-2', 1, 'new', 20250322, '2025-03-22 12:00+00', -1, 20.00),
             ('HAND-3', 1, 'old', 20250322, '2025-03-22 12:00+00', -3, 0))
     v (order_id, line_number, version, date_key, order_ts, quantity, unit_price);
INSERT INTO customer_analytics.fact_order_line
	(order_id, line_number, customer_key, product_key, date_key, order_ts, quantity, unit_price, status, stage_id, customer_ref)
SELECT order_id, line_number + 100, customer_key, product_key, date_key, order_ts, 3, 7.25, 'completed', 0, customer_ref
FROM customer_analytics.fact_order_line WHERE status = 'completed' AND customer_key <> -1 ORDER BY order_id, line_number LIMIT 1;
%s
SELECT count(*) FROM customer_analytics_internal.rfm_new_line;
SELECT customer_analytics.refresh_customer_rfm();
%s;
SELECT customer_analytics.refresh_customer_rfm(true);
%s;
ROLLBACK};
my $queue = q{INSERT INTO customer_analytics_internal.rfm_new_line (customer_id, order_id, line_number, order_ts, revenue, purchase)
SELECT c.customer_id, w.order_id, w.line_number, w.order_ts, w.revenue,
       w.status = 'completed' AND w.customer_key <> -1 AND (w.quantity > 0 OR w.revenue <> 0)
FROM customer_analytics.fact_order_line w JOIN customer_analytics.dim_customer c USING (customer_key)
WHERE w.stage_id = 0;};
my $after = join(";\n", $rfm_views, rfm_sum(q{customer_analytics.rfm(customer_analytics.reference_time())}));
my $hand_single = $coord->safe_psql('shop_single', sprintf($hand, '', $after, $after));
like($hand_single, qr/^6\n[1-9]/, 'the single node queues the 6 lines and rescores customers');
is($coord->safe_psql('shop', sprintf($hand, $queue, $after, $after)), $hand_single,
	'lines added by hand: the incremental refresh_customer_rfm(), then the full one, give the single node\'s customer_rfm, rollup, top_customers, segment_summary and rfm()');

# scores as of a time in the past (lines later than it in the facts):
# refresh_customer_rfm() scores from rfm() and the rebuild's rows as of then
my $past = qq{BEGIN;
SET LOCAL customer_analytics.as_of = '2025-03-01';
SELECT customer_analytics.refresh_customer_rfm();
$rfm_views;
ROLLBACK};
my $past_single = $coord->safe_psql('shop_single', $past);
like($past_single, qr/^[1-9]/, 'the single node rescores as of a time in the past');
is($coord->safe_psql('shop', $past), $past_single, 'refresh_customer_rfm() as of a time in the past: the same on the cluster');

# CLV: the summary read from the shards, the models fitted on it
my $clv = q{REFRESH MATERIALIZED VIEW customer_analytics.clv_model;
	REFRESH MATERIALIZED VIEW customer_analytics.customer_clv;
	SELECT md5(string_agg(x::text, ',' ORDER BY x.customer_id)) || ' ' || count(*)
	FROM customer_analytics.clv_summary(customer_analytics.reference_time()) x;
	SELECT customer_analytics.bgnbd_fit_status(bgnbd), (bgnbd).customers, md5(m::text) FROM customer_analytics.clv_model m;
	SELECT md5(string_agg(x::text, ',' ORDER BY x.customer_id)) || ' ' || count(*) FROM customer_analytics.customer_clv x};
my $clv_single = $coord->safe_psql('shop_single', $clv);
like($clv_single, qr/\nfitted\|[1-9]/, 'the single node fits the CLV models');
is($coord->safe_psql('shop', $clv), $clv_single, 'clv_summary(), clv_model and customer_clv: the same on the cluster');

# the aggregates Citus cannot split (an internal state, or no combine
# step): the workers send the rows, the coordinator aggregates them, with
# the single node's results; grouped by the distribution column they run
# whole on the workers.  (The fits sum in float8 in the order of their
# rows, which the shards change: they are given an order here, as
# clv_model's are by clv_summary)
for my $case (
	[ 'median_mad_agg', q{SELECT customer_analytics.median_mad_agg(revenue::float8)::text FROM customer_analytics.fact_order_line} ],
	[ 'holt_winters', q{SELECT customer_analytics.holt_winters(d, v)::text FROM (SELECT order_ts::date AS d, sum(revenue)::float8 AS v
	                    FROM customer_analytics.fact_order_line WHERE status = 'completed' GROUP BY 1) s} ],
	[ 'bgnbd_fit', q{SELECT customer_analytics.bgnbd_fit(quantity, line_number, 30 ORDER BY order_id, line_number)::text FROM customer_analytics.fact_order_line WHERE quantity > 0} ],
	[ 'gamma_gamma_fit', q{SELECT customer_analytics.gamma_gamma_fit(quantity, revenue::float8 ORDER BY order_id, line_number)::text FROM customer_analytics.fact_order_line} ])
{
	my ($what, $sql) = @$case;
	my $plan = $coord->safe_psql('shop', "EXPLAIN (VERBOSE, COSTS OFF) $sql");
	unlike($plan, qr/worker_partial_agg/, "$what: not split between the workers and the coordinator");
	like($plan, qr/Output: \(?customer_analytics\.$what\((remote_scan|intermediate_result)\./, "$what: aggregated on the coordinator over the rows of the workers");
	my $single = $coord->safe_psql('shop_single', $sql);
	isnt($single, '', "$what: the single node has a result");
	is($coord->safe_psql('shop', $sql), $single, "$what: the same result on the cluster");
}
like($coord->safe_psql('shop', q{EXPLAIN (VERBOSE, COSTS OFF) SELECT customer_ref, customer_analytics.median_mad_agg(revenue::float8)
	FROM customer_analytics.fact_order_line GROUP BY 1}), qr/Query: SELECT customer_ref, customer_analytics\.median_mad_agg\(/,
	'median_mad_agg grouped by the distribution column: whole on the workers');

# ---------------------------------------------------------------------
# issue 17 pipeline steps on the cluster: every step of pipeline_plan()
# but those of transform() and the sessions, run by the pipeline's own
# commands after an incremental change: lines of two new days (the first
# netted below its forecast's lower bound by a credit note), a line of a
# day already rolled up, and a line cancelled, written through the
# coordinator and queued as transform()'s writers queue them (the same
# statements on both: with own_writer on, the single node's triggers
# stand aside); then each step's result and what it wrote
# ---------------------------------------------------------------------
my ($cancel_order, $cancel_line) = split /\|/, $coord->safe_psql('shop_single',
	q{SELECT order_id, line_number FROM customer_analytics.fact_order_line
	  WHERE status = 'completed' AND customer_key <> -1 AND order_ts < '2025-03-01' ORDER BY order_id, line_number OFFSET 10 LIMIT 1});
my $pipeline_steps = qq{BEGIN;
SELECT customer_analytics.ensure_dim_date('2025-04-01', '2025-04-02') IS NOT NULL;
SET LOCAL customer_analytics_internal.own_writer = on;
INSERT INTO customer_analytics.fact_order_line
	(order_id, line_number, customer_key, product_key, date_key, order_ts, quantity, unit_price, status, stage_id, customer_ref)
SELECT v.order_id, v.line_number, c.customer_key, p.product_key, v.date_key, v.order_ts::timestamptz, v.quantity, v.unit_price, 'completed', 0, c.customer_id
FROM (SELECT customer_key, customer_id, row_number() OVER (ORDER BY customer_key) AS n FROM customer_analytics.dim_customer
      WHERE customer_key <> -1 ORDER BY customer_key LIMIT 3) c,
     (SELECT min(product_key) AS product_key FROM customer_analytics.dim_product WHERE product_key <> -1) p,
     (VALUES ('STEP-1', 1, 1, 20250401, '2025-04-01 10:00+00', 1, 5.00),
             ('STEP-1', 2, 1, 20250401, '2025-04-01 10:00+00', 2, 2.50),
             ('STEP-2', 1, 2, 20250401, '2025-04-01 16:00+00', -20, 50.00),
             ('STEP-4', 1, 1, 20250402, '2025-04-02 09:30+00', 1, 4.00),
             ('STEP-3', 1, 3, 20250315, '2025-03-15 14:00+00', 4, 50.00))
     v (order_id, line_number, n, date_key, order_ts, quantity, unit_price)
WHERE c.n = v.n;
INSERT INTO customer_analytics_internal.rfm_new_line (customer_id, order_id, line_number, order_ts, revenue, purchase)
SELECT c.customer_id, w.order_id, w.line_number, w.order_ts, w.revenue,
       w.status = 'completed' AND w.customer_key <> -1 AND (w.quantity > 0 OR w.revenue <> 0)
FROM customer_analytics.fact_order_line w JOIN customer_analytics.dim_customer c USING (customer_key)
WHERE w.order_id LIKE 'STEP-%';
INSERT INTO customer_analytics_internal.sales_dirty_day
SELECT DISTINCT d.date FROM (SELECT DISTINCT w.date_key FROM customer_analytics.fact_order_line w WHERE w.order_id LIKE 'STEP-%') k
JOIN customer_analytics.dim_date d USING (date_key)
ON CONFLICT DO NOTHING;
INSERT INTO customer_analytics_internal.check_change (rel, op, key)
SELECT 'customer_analytics.fact_order_line'::regclass, 'n', jsonb_build_object('order_id', w.order_id, 'line_number', w.line_number)
FROM customer_analytics.fact_order_line w WHERE w.order_id LIKE 'STEP-%';
CREATE TEMP TABLE ca_line_changes (new jsonb, old jsonb) ON COMMIT DROP;
INSERT INTO ca_line_changes
SELECT to_jsonb(f) || '{"status": "cancelled"}', to_jsonb(f) FROM customer_analytics.fact_order_line f
WHERE f.order_id = '$cancel_order' AND f.line_number = $cancel_line;
UPDATE customer_analytics.fact_order_line SET status = 'cancelled' WHERE order_id = '$cancel_order' AND line_number = $cancel_line;
SELECT customer_analytics_internal.note_order_line_updates(true);
RESET customer_analytics_internal.own_writer;
CREATE FUNCTION pg_temp.pipeline_steps() RETURNS TABLE (step_no integer, outcome text) LANGUAGE plpgsql AS \$f\$
DECLARE
    s record;
    r text;
BEGIN
    FOR s IN SELECT p.step_no, p.step, p.command FROM customer_analytics.pipeline_plan() p
             WHERE p.step NOT IN ('ingest', 'transform', 'sessions') ORDER BY p.step_no LOOP
        r := 'done';
        IF s.command LIKE 'SELECT %' THEN
            EXECUTE s.command INTO r USING NULL::bigint;
        ELSE
            EXECUTE s.command;
        END IF;
        step_no := s.step_no;
        outcome := s.step || '=' || r;
        RETURN NEXT;
    END LOOP;
END
\$f\$;
SELECT string_agg(outcome, ', ' ORDER BY step_no) FROM pg_temp.pipeline_steps();
SELECT customer_analytics.alert_intraday('2025-04-02 15:00+00');
SELECT md5(string_agg(x::text, ',' ORDER BY x.day)) || ' ' || count(*) FROM customer_analytics.sales_rollup_day x;
SELECT md5(string_agg(x::text, ',' ORDER BY x.day, x.category)) || ' ' || count(*) FROM customer_analytics.sales_rollup_category x;
SELECT md5(string_agg(x::text, ',' ORDER BY x::text)) || ' ' || count(*) FROM customer_analytics.daily_sales x;
SELECT md5(string_agg(x::text, ',' ORDER BY x::text)) || ' ' || count(*) FROM customer_analytics.product_category_sales x;
SELECT md5(string_agg(x::text, ',' ORDER BY x::text)) || ' ' || count(*) FROM customer_analytics.sales_forecast x;
SELECT md5(string_agg(x::text, ',' ORDER BY x::text)) || ' ' || count(*) FROM customer_analytics.sales_forecast_accuracy x;
SELECT md5(string_agg(x::text, ',' ORDER BY x::text)) || ' ' || count(*) FROM customer_analytics.anomalies x;
@{[ rfm_sum('customer_analytics.customer_rfm') ]};
SELECT md5(string_agg(x::text, ',' ORDER BY x.rank)) || ' ' || count(*) FROM customer_analytics.top_customers x;
SELECT md5(string_agg(x::text, ',' ORDER BY x.segment)) || ' ' || count(*) FROM customer_analytics.segment_summary x;
SELECT md5(m::text) FROM customer_analytics.clv_model m;
SELECT md5(string_agg(x::text, ',' ORDER BY x.customer_id)) || ' ' || count(*) FROM customer_analytics.customer_clv x;
SELECT string_agg(format('%s %s %s %s %s', kind, subject, severity, details, dedup_key), E'\\n' ORDER BY dedup_key)
FROM customer_analytics.alert WHERE raised_at >= now() AND kind <> 'quality_check';
SELECT string_agg(format('%s %s %s', check_name, passed, failing_rows), ', ' ORDER BY check_name)
FROM customer_analytics.quality_result WHERE checked_at >= now();
ROLLBACK};
my $pipeline_steps_single = $coord->safe_psql('shop_single', $pipeline_steps);
note "the pipeline's steps on the single node:\n$pipeline_steps_single";
like($pipeline_steps_single, qr/sales rollup=4, forecast misses=[1-9]\d*, customer rfm=[1-9]/,
	'the single node rolls up the four changed days, misses the forecast on the new days, rescores customers');
like($pipeline_steps_single, qr/\nforecast_miss \(all\) warn .*"day": "2025-04-01"/, 'and raises its alert');
my $pipeline_steps_cluster = $coord->safe_psql('shop', $pipeline_steps);
is($pipeline_steps_cluster, $pipeline_steps_single,
	'every step of the pipeline but transform and sessions, after lines added and cancelled: the single node\'s results, rollups, views and alerts on the cluster');

# issue 17 transform on the cluster: a later day staged on both (a new
# day of the generator: new customer versions (SCD2) and products, order
# lines, events; then lines re-staged, changed or not, a credit note, a
# line and a visit of a customer and a product that have not arrived),
# transform() on both, every fact and dimension table and the change
# queues compared; then the customer and the product arrive (the repair
# of late-arriving dimensions), an event is re-staged changed,
# transform_events() and refresh_clickstream() (the sessions' queue);
# then run_pipeline() and schedule_pipeline() on the coordinator.
# Rows are staged through the coordinator's own statements (VALUES, a
# local table, the generator, track_event()): docs/scaling.md says why.
my $dims_facts = q{SELECT string_agg(format('%s=%s', t, n), ' ' ORDER BY t) FROM (
	SELECT 'dim_customer' AS t, count(*) AS n FROM customer_analytics.dim_customer
	UNION ALL SELECT 'dim_date', count(*) FROM customer_analytics.dim_date
	UNION ALL SELECT 'dim_product', count(*) FROM customer_analytics.dim_product
	UNION ALL SELECT 'fact_event', count(*) FROM customer_analytics.fact_event
	UNION ALL SELECT 'fact_order_line', count(*) FROM customer_analytics.fact_order_line
	UNION ALL SELECT 'unknown_member_line', count(*) FROM customer_analytics_internal.unknown_member_line) c};
my $sum_of = sub {
	my ($t) = @_;
	return qq{SELECT count(*) || ' ' || coalesce(md5(string_agg(r, ',' ORDER BY r)), '-') FROM (
		SELECT (to_jsonb(t) - 'loaded_at' - 'staged_xid')::text AS r FROM $t t) s};
};
my @compared = qw(customer_analytics.dim_customer customer_analytics.dim_product customer_analytics.dim_date
	customer_analytics.fact_order_line customer_analytics.fact_event customer_analytics_internal.unknown_member_line
	customer_analytics_internal.rfm_new_line customer_analytics_internal.rfm_dirty_customer
	customer_analytics_internal.sales_dirty_day customer_analytics_internal.check_change
	customer_analytics_internal.clickstream_change);
my $compare_tables = sub {
	my ($when, @tables) = @_;
	for my $t (@tables)
	{
		is($coord->safe_psql('shop', $sum_of->($t)), $coord->safe_psql('shop_single', $sum_of->($t)),
			"$when: $t holds the single node's rows");
	}
};
my $step_counts = sub {
	my ($db, $sql) = @_;
	my %n = map { split /=/ } split / /, $coord->safe_psql($db, $sql);
	return \%n;
};
my $run_both = sub {
	my ($what, $sql) = @_;
	my $single = $coord->safe_psql('shop_single', $sql);
	my $before = $step_counts->('shop', $dims_facts);
	my ($rc, $out, $err) = $coord->psql('shop', $sql);
	is($rc, 0, "$what runs on the cluster") or diag $err;
	is($out, $single, "$what: the same rows written, step by step, as on the single node");
	my $after = $step_counts->('shop', $dims_facts);
	is($coord->safe_psql('shop', $dims_facts), $coord->safe_psql('shop_single', $dims_facts),
		"$what: the same row counts as on the single node");
	return ($out, $before, $after);
};

# the RFM rollup refreshed on both (so that transform() queues its new
# lines in rfm_new_line rather than one mark that every customer is due)
$coord->safe_psql($_, q{SELECT customer_analytics.refresh_customer_rfm()}) for qw(shop shop_single);
$compare_tables->('the RFM queues before', 'customer_analytics_internal.rfm_dirty_customer',
	'customer_analytics_internal.rfm_new_line', 'customer_analytics.rfm_rollup_customer');

# a later day: the generator reports the rows the cluster then holds
my $new_day = q{SELECT string_agg(target || '=' || rows, ' ' ORDER BY target)
	FROM customer_analytics.generate_sample_data(customers => 300, days => 2, seed => 18, start_date => '2025-04-01', defects => false)};
my $staged = q{SELECT string_agg(format('%s=%s', t, n), ' ' ORDER BY t) FROM (
	SELECT 'stg_customers' AS t, count(*) AS n FROM customer_analytics.stg_customers
	UNION ALL SELECT 'stg_events', count(*) FROM customer_analytics.stg_events
	UNION ALL SELECT 'stg_orders', count(*) FROM customer_analytics.stg_orders
	UNION ALL SELECT 'stg_products', count(*) FROM customer_analytics.stg_products) c};
my $staged_before = $step_counts->('shop', $staged);
my $new_reported = $coord->safe_psql('shop', $new_day);
is($new_reported, $coord->safe_psql('shop_single', $new_day), 'a later day: the generator reports the same rows on both');
my $staged_after = $step_counts->('shop', $staged);
for my $t (sort keys %$staged_after)
{
	my ($n) = $new_reported =~ /\b$t=(\d+)/;
	is($staged_after->{$t} - $staged_before->{$t}, $n, "a later day, $t: the rows reported are the rows added, counted through the coordinator");
}
is($coord->safe_psql('shop', $staged), $coord->safe_psql('shop_single', $staged), 'a later day: the same staged rows as on the single node');

my $transform = q{SELECT string_agg(step || '=' || rows_affected, ' ' ORDER BY step) FROM customer_analytics.transform()};
my ($steps_day, $before);
($steps_day, $before, $after) = $run_both->('transform() of a later day', $transform);
like($steps_day, qr/dim_customer=[1-9].*fact_event=[1-9].*fact_order_line=[1-9]/, 'with new customer versions, events and order lines');
is($coord->safe_psql('shop', q{SELECT count(*) > 0 FROM customer_analytics_internal.rfm_new_line})
   . $coord->safe_psql('shop', q{SELECT count(*) > 0 AND count(*) = count(customer_id) FROM customer_analytics_internal.rfm_dirty_customer}),
	'tt', 'the new lines and the customers with new versions queued for the RFM refresh');
my %day = map { split /=/ } split / /, $steps_day;
is($after->{dim_customer} - $before->{dim_customer}, $day{dim_customer}, 'the customer versions reported are the versions added');
is($after->{dim_date} - $before->{dim_date}, $day{dim_date}, 'the days reported are the days added');
is($after->{fact_order_line} - $before->{fact_order_line}, $day{fact_order_line}, 'the order lines reported are the lines added');
is($after->{fact_event} - $before->{fact_event}, $day{fact_event}, 'the events reported are the events added');
is($coord->safe_psql('shop', q{SELECT count(*) FROM (SELECT customer_id FROM customer_analytics.dim_customer
	WHERE customer_key <> -1 GROUP BY 1 HAVING count(*) > 1) s}) > 0 ? 1 : 0, 1, 'customers with several versions (SCD2)');
$compare_tables->('after a later day', @compared);

# re-staged lines (three changed, two not), a credit note, a line and a
# visit of a customer and a product not there yet
my $restage = q{CREATE TEMP TABLE restage AS
	SELECT f.order_id, f.line_number, c.customer_id, p.product_id, f.order_ts,
	       f.quantity + CASE WHEN n <= 3 THEN 1 ELSE 0 END AS quantity, f.unit_price, f.discount, f.status, f.channel, f.updated_at
	FROM (SELECT f.*, row_number() OVER (ORDER BY f.order_id, f.line_number) AS n
	      FROM customer_analytics.fact_order_line f WHERE f.order_ts >= '2025-04-01') f
	JOIN customer_analytics.dim_customer c USING (customer_key) JOIN customer_analytics.dim_product p USING (product_key)
	WHERE n <= 5;
	INSERT INTO restage (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel)
	SELECT 'CN-' || r.order_id, 1, r.customer_id, r.product_id, '2025-04-02 18:00+00', -1, r.unit_price, 0, 'completed', r.channel
	FROM restage r ORDER BY r.order_id, r.line_number LIMIT 1;
	INSERT INTO restage (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status)
	VALUES ('LATE-1', 1, 'late-customer', 'late-product', '2025-04-02 12:00+00', 2, 9.50, 0, 'completed');
	INSERT INTO customer_analytics.stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price,
	                                           discount, status, channel, updated_at)
	SELECT * FROM restage ORDER BY order_id, line_number;
	SELECT customer_analytics.track_event('page_view', 'late-session', event_ts => '2025-04-02 11:50+00', event_id => 'late-e1');
	SELECT customer_analytics.track_event('product_view', 'late-session', product_id => 'late-product', event_ts => '2025-04-02 11:52+00', event_id => 'late-e2');
	SELECT customer_analytics.track_event('add_to_cart', 'late-session', customer_id => 'late-customer', product_id => 'late-product',
	                                      event_ts => '2025-04-02 11:55+00', event_id => 'late-e3')};
$coord->safe_psql($_, $restage) for qw(shop shop_single);
is($coord->safe_psql('shop', $staged), $coord->safe_psql('shop_single', $staged), 're-staged: the same staged rows as on the single node');
my ($steps_re) = $run_both->('transform() of re-staged lines, a credit note and a late customer', $transform);
like($steps_re, qr/fact_event=3 fact_event_late_customers=0 fact_event_stitched=2 .*fact_order_line=5 /,
	'three lines changed, the credit note and the late line written; two unchanged lines not; the anonymous events stitched');
is($coord->safe_psql('shop', q{SELECT count(*) FROM customer_analytics_internal.unknown_member_line WHERE order_id = 'LATE-1'}),
	'1', 'the line of the customer not there yet waits for it');
is($coord->safe_psql('shop', q{SELECT revenue FROM customer_analytics.fact_order_line WHERE order_id LIKE 'CN-%'}),
	$coord->safe_psql('shop_single', q{SELECT revenue FROM customer_analytics.fact_order_line WHERE order_id LIKE 'CN-%'}),
	'the credit note nets as on the single node');
$compare_tables->('after re-staged lines', @compared);
my $again = $coord->safe_psql('shop', $transform);
unlike($again, qr/=[1-9]/, 'exactly once: a second transform() writes nothing');
($again) = $run_both->('transform(full_refresh => true)',
	q{SELECT string_agg(step || '=' || rows_affected, ' ' ORDER BY step) FROM customer_analytics.transform(full_refresh => true)});
unlike($again, qr/=[1-9]/, 'a full pass over everything staged changes nothing either');

# the customer and the product arrive; an event re-staged with a change
my $arrive = q{INSERT INTO customer_analytics.stg_customers (customer_id, name, email, city, country, signup_date, updated_at)
	VALUES ('late-customer', 'Late Customer', 'late@example.com', 'Lyon', 'FR', '2025-03-01', '2025-03-01');
	INSERT INTO customer_analytics.stg_products (product_id, name, category, unit_cost, list_price, updated_at)
	VALUES ('late-product', 'Late Product', 'Garden', 4.00, 9.50, '2025-03-01');
	SELECT customer_analytics.track_event('checkout', 'late-session', customer_id => 'late-customer',
	                                      event_ts => '2025-04-02 11:58+00', event_id => 'late-e4', device => 'mobile')};
$coord->safe_psql($_, $arrive) for qw(shop shop_single);
my ($steps_late) = $run_both->('transform() after the late customer and product', $transform);
like($steps_late, qr/fact_event_late_customers=3 .*late_dimension_fixes=1$/, 'the late line and the late events re-keyed');
is($coord->safe_psql('shop', q{SELECT count(*) FROM customer_analytics_internal.unknown_member_line}), '0', 'nothing waits any more');
$compare_tables->('after the repair', @compared);

my $restage_event = q{SELECT customer_analytics.track_event('checkout', 'late-session', customer_id => 'late-customer',
	event_ts => '2025-04-02 11:58+00', event_id => 'late-e4', device => 'desktop');
	SELECT customer_analytics.track_event('page_view', 'late-session', event_ts => '2025-04-02 12:10+00', event_id => 'late-e5');
	SELECT customer_analytics.track_event('page_view', 'anon-2', event_ts => '2025-04-02 12:11+00', event_id => 'anon-e1')};
$coord->safe_psql($_, $restage_event) for qw(shop shop_single);
my ($steps_ev) = $run_both->('transform_events() of re-staged and new events',
	q{SELECT string_agg(step || '=' || rows_affected, ' ' ORDER BY step) FROM customer_analytics.transform_events()});
like($steps_ev, qr/^fact_event=3 /, 'one event changed, two new');
$compare_tables->('after transform_events()', @compared);
my $clickstream = q{SELECT string_agg(step || '=' || rows_affected, ' ' ORDER BY step) FROM customer_analytics.refresh_clickstream()};
my ($steps_click) = $run_both->('refresh_clickstream() (the sessions of the visitors queued)', $clickstream);
like($steps_click, qr/sessions_removed=\d+ sessions_written=[1-9]/, 'sessions written');
$compare_tables->('after refresh_clickstream()', @compared, 'customer_analytics.sessions');
# an event that extends the late customer's session (within the gap)
$coord->safe_psql($_, q{SELECT customer_analytics.track_event('product_view', 'sess-x', customer_id => 'late-customer',
	event_ts => '2025-04-02 12:20+00', event_id => 'late-e6')}) for qw(shop shop_single);
($steps_click) = $run_both->('refresh_clickstream() of an event extending a session', $clickstream);
like($steps_click, qr/^fact_event=1 .*sessions_removed=1 sessions_written=1$/, 'the session of the late customer rebuilt');
$compare_tables->('after the session extended', 'customer_analytics_internal.clickstream_change', 'customer_analytics.sessions');
is($coord->safe_psql('shop', $sessions), $coord->safe_psql('shop_single', $sessions), 'sessions and funnel_daily: the same on the cluster');

# run_pipeline() on the coordinator and on the single node after the
# later day: every step as on the single node (none failed), and what the
# run leaves (the RFM scores, the sales views and anomalies, forecasts,
# sessions and funnel, CLV, checks) is the single node's
my $pipeline_status = q{SELECT string_agg(step || '=' || status, '; ' ORDER BY step_no) FROM customer_analytics.pipeline_step
	WHERE run_id = (SELECT max(run_id) FROM customer_analytics.pipeline_run)};
$coord->safe_psql($_, q{CALL customer_analytics.run_pipeline()}) for qw(shop_single shop);
my $status_single = $coord->safe_psql('shop_single', $pipeline_status);
like($status_single, qr/transform=succeeded/, 'run_pipeline() on the single node');
unlike($status_single, qr/=failed/, 'no step failed on the single node');
is($coord->safe_psql('shop', $pipeline_status), $status_single, 'run_pipeline() on the cluster: every step as on the single node')
	or diag $coord->safe_psql('shop', q{SELECT string_agg(step || ' ' || status || COALESCE(': ' || error, ''), '; ' ORDER BY step_no)
		FROM customer_analytics.pipeline_step WHERE run_id = (SELECT max(run_id) FROM customer_analytics.pipeline_run) AND status <> 'succeeded'});
is($coord->safe_psql('shop', q{SELECT count(*) FROM customer_analytics.pipeline_run WHERE finished_at IS NULL}), '0', 'the run is recorded as finished');
for my $v (qw(customer_rfm top_customers segment_summary daily_sales product_category_sales anomalies
	sales_forecast sessions funnel_daily clv_model customer_clv quality_result))
{
	my $sql = qq{SELECT count(*) || ' ' || coalesce(md5(string_agg(x::text, ',' ORDER BY x::text)), '-') FROM customer_analytics.$v x};
	$sql = q{SELECT count(*) || ' ' || coalesce(md5(string_agg(format('%s %s %s', check_name, passed, failing_rows), ',' ORDER BY check_name)), '-')
		FROM customer_analytics.quality_result x WHERE run_id = (SELECT max(run_id) FROM customer_analytics.quality_result)} if $v eq 'quality_result';
	my $single = $coord->safe_psql('shop_single', $sql);
	isnt($single, '', "after run_pipeline(), $v: the single node has it");
	is($coord->safe_psql('shop', $sql), $single, "after run_pipeline(), $v: the same on the cluster");
}
# pg_cron runs in the database postgres here (cron.database_name): the
# job is created there, for the shop, through the coordinator
$coord->safe_psql('postgres', 'CREATE EXTENSION IF NOT EXISTS pg_cron');
like($coord->safe_psql('shop', q{SELECT customer_analytics.schedule_pipeline('*/5 * * * *')}), qr/^\d+$/, 'schedule_pipeline() on the coordinator');
is($coord->safe_psql('shop', q{SELECT jobname || ' ' || database || ' ' || command FROM customer_analytics.pipeline_jobs()}),
	q{customer_analytics shop all shop CALL customer_analytics.run_pipeline('all')}, 'the job runs the pipeline in the shop');
is($coord->safe_psql('shop', q{SELECT customer_analytics.unschedule_pipeline()}), 't', 'and is unscheduled');

# ---------------------------------------------------------------------
# issue 17 layout by customer: fact_order_line and its repair queue
# distributed by customer_ref (the line's customer whatever its version,
# '#guest:' || order_id for a guest), co-located, keyed on (order_id,
# line_number, customer_ref); a line staged again under another customer
# moves shard (deleted and inserted in transform()'s transaction); per
# customer work grouped by customer_ref runs whole on the workers
# ---------------------------------------------------------------------
is($coord->safe_psql('shop', q{SELECT string_agg(format('%s %s', p.logicalrelid, column_to_column_name(p.logicalrelid, p.partkey)), '; '
		ORDER BY p.logicalrelid::text)
	FROM pg_dist_partition p
	WHERE p.logicalrelid IN ('customer_analytics.fact_order_line'::regclass, 'customer_analytics_internal.unknown_member_line'::regclass)}),
	'customer_analytics.fact_order_line customer_ref; customer_analytics_internal.unknown_member_line customer_ref',
	'layout by customer: the order facts and their repair queue distributed by customer_ref');
is($coord->safe_psql('shop', q{SELECT count(DISTINCT colocationid) FROM pg_dist_partition
	WHERE logicalrelid IN ('customer_analytics.fact_order_line'::regclass, 'customer_analytics_internal.unknown_member_line'::regclass,
	                       'customer_analytics.stg_orders'::regclass)}),
	'1', 'layout by customer: co-located (with the staged lines, which stay by order_id)');
my $keys = q{SELECT string_agg(format('%s %s', conrelid::regclass, pg_get_constraintdef(oid)), '; ' ORDER BY conrelid::regclass::text)
	FROM pg_constraint WHERE contype = 'p'
	  AND conrelid IN ('customer_analytics.fact_order_line'::regclass, 'customer_analytics_internal.unknown_member_line'::regclass)};
my $cluster_keys = 'customer_analytics.fact_order_line PRIMARY KEY (order_id, line_number, customer_ref); '
	. 'customer_analytics_internal.unknown_member_line PRIMARY KEY (order_id, line_number, customer_ref)';
is($coord->safe_psql('shop', $keys), $cluster_keys, 'layout by customer: the primary keys swapped for the cluster\'s');
is($workers[0]->safe_psql('shop', $keys), $cluster_keys, 'on a worker\'s copy too');
like($coord->safe_psql('shop_single', $keys), qr/fact_order_line PRIMARY KEY \(order_id, line_number\);/,
	'the single node keeps its keys');
# every line's customer_ref follows the rule, on both (and the facts are
# compared value for value, customer_ref included, by $compare_tables)
my $ref_rule = q{SELECT count(*) FILTER (WHERE f.customer_ref = CASE WHEN f.customer_key <> -1 THEN c.customer_id
	                                                               ELSE COALESCE(q.customer_id, '#guest:' || f.order_id) END)
	       || '/' || count(*) || ' guests ' || count(*) FILTER (WHERE f.customer_ref LIKE '#guest:%')
	FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_customer c USING (customer_key)
	LEFT JOIN customer_analytics_internal.unknown_member_line q USING (customer_ref, order_id, line_number)};
my $ref_single = $coord->safe_psql('shop_single', $ref_rule);
like($ref_single, qr{^(\d+)/\1 guests [1-9]}, 'every line has its customer_ref, guests theirs (single node)');
is($coord->safe_psql('shop', $ref_rule), $ref_single, 'and the same on the cluster');
$compare_tables->('layout by customer', 'customer_analytics.fact_order_line', 'customer_analytics_internal.unknown_member_line');

# lines staged again under another customer: a known customer's line to
# another customer, a guest's line to a customer, a customer's line to a
# guest; a line of a customer not there yet, then staged under a known
# one (its queue row moves too)
my @move = split /\n/, $coord->safe_psql('shop_single', q{
	SELECT format('%s|%s', f.order_id, f.line_number) FROM customer_analytics.fact_order_line f
	WHERE f.customer_key <> -1 AND f.status = 'completed' ORDER BY f.order_id, f.line_number LIMIT 2});
my ($guest_line) = $coord->safe_psql('shop_single', q{
	SELECT format('%s|%s', order_id, line_number) FROM customer_analytics.fact_order_line
	WHERE customer_ref LIKE '#guest:%' ORDER BY order_id, line_number LIMIT 1});
my ($other_customer) = $coord->safe_psql('shop_single', q{
	SELECT customer_id FROM customer_analytics.dim_customer WHERE customer_key <> -1 ORDER BY customer_id DESC LIMIT 1});
my $stage_as = sub {
	my ($line, $customer) = @_;
	my ($o, $l) = split /\|/, $line;
	my $c = defined $customer ? "'$customer'" : 'NULL';
	# (through a temporary table: staged by INSERT ... SELECT from a Citus
	# table, the rows would get the workers' transaction ids, which
	# transform() may skip: docs/scaling.md)
	return qq{CREATE TEMP TABLE IF NOT EXISTS moving (LIKE customer_analytics.stg_orders);
	TRUNCATE moving;
	INSERT INTO moving (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel,
	                    updated_at, stage_id, loaded_at, staged_xid)
	SELECT f.order_id, f.line_number, $c, p.product_id, f.order_ts, f.quantity, f.unit_price, f.discount, f.status, f.channel,
	       f.updated_at, 0, now(), '0'
	FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_product p USING (product_key)
	WHERE f.order_id = '$o' AND f.line_number = $l;
	INSERT INTO customer_analytics.stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity,
	                                           unit_price, discount, status, channel, updated_at)
	SELECT order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, channel, updated_at
	FROM moving;};
};
my $moves = join("\n", $stage_as->($move[0], $other_customer), $stage_as->($guest_line, $other_customer),
	$stage_as->($move[1], undef),
	q{INSERT INTO customer_analytics.stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price)
	  VALUES ('MOVE-Q', 1, 'not-yet-a-customer', 'late-product', '2025-04-02 13:00+00', 1, 5.00);});
$coord->safe_psql($_, $moves) for qw(shop shop_single);
my ($steps_move) = $run_both->('transform() of lines staged under another customer', $transform);
like($steps_move, qr/fact_order_line=4 /, 'three lines moved, one new');
my $move_refs = qq{SELECT string_agg(format('%s|%s %s', order_id, line_number, customer_ref), ',' ORDER BY order_id, line_number)
	FROM customer_analytics.fact_order_line
	WHERE (order_id, line_number::text) IN (('@{[ join("'), ('", map { s/\|/', '/r } @move, $guest_line) ]}'))};
my $move_refs_single = $coord->safe_psql('shop_single', $move_refs);
my %moved_to = map { split / / } split /,/, $move_refs_single;
is(join(', ', map { $moved_to{$_} // 'none' } @move, $guest_line),
	join(', ', $other_customer, '#guest:' . (split /\|/, $move[1])[0], $other_customer),
	'the moved lines carry their new customer (single node)');
is($coord->safe_psql('shop', $move_refs), $move_refs_single, 'and on the cluster');
my $unique_lines = q{SELECT count(*) || ' ' || count(DISTINCT (order_id, line_number)) FROM customer_analytics.fact_order_line};
my ($n_moved_lines, $n_distinct) = split / /, $coord->safe_psql('shop', $unique_lines);
is($n_moved_lines, $n_distinct, '(order_id, line_number) is unique across the shards after the moves');
is($coord->safe_psql('shop', q{SELECT count(*) || ' ' || count(DISTINCT (order_id, line_number)) FROM customer_analytics_internal.unknown_member_line}),
	$coord->safe_psql('shop_single', q{SELECT count(*) || ' ' || count(DISTINCT (order_id, line_number)) FROM customer_analytics_internal.unknown_member_line}),
	'the repair queue: one row per line, as on the single node');
is($coord->safe_psql('shop', q{SELECT customer_ref FROM customer_analytics_internal.unknown_member_line WHERE order_id = 'MOVE-Q'}),
	'not-yet-a-customer', 'a line waiting for its customer is queued under it');
$compare_tables->('after the moves', @compared);
# the line waiting for its customer staged under a known one: the queue
# row leaves its shard
$coord->safe_psql($_, qq{INSERT INTO customer_analytics.stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price)
	VALUES ('MOVE-Q', 1, '$other_customer', 'late-product', '2025-04-02 13:00+00', 1, 5.00)}) for qw(shop shop_single);
($steps_move) = $run_both->('transform() of a waiting line staged under a known customer', $transform);
like($steps_move, qr/fact_order_line=1 /, 'the waiting line moved');
is($coord->safe_psql('shop', q{SELECT count(*) FROM customer_analytics_internal.unknown_member_line WHERE order_id = 'MOVE-Q'}),
	'0', 'and left the queue');
($n_moved_lines, $n_distinct) = split / /, $coord->safe_psql('shop', $unique_lines);
is($n_moved_lines, $n_distinct, '(order_id, line_number) still unique');
$compare_tables->('after the waiting line moved', @compared);
($again) = $run_both->('transform(full_refresh => true) after the moves',
	q{SELECT string_agg(step || '=' || rows_affected, ' ' ORDER BY step) FROM customer_analytics.transform(full_refresh => true)});
unlike($again, qr/fact_order_line=[1-9]/, 'a full pass moves nothing back');
# what reads the moved lines: RFM, sales, CLV
my $after_moves = join(";\n", q{SELECT customer_analytics.refresh_customer_rfm()}, $rfm_views,
	rfm_sum(q{customer_analytics.rfm(customer_analytics.reference_time())}),
	q{SELECT customer_analytics.refresh_sales_rollup()}, q{REFRESH MATERIALIZED VIEW customer_analytics.daily_sales},
	q{SELECT md5(string_agg(x::text, ',' ORDER BY x.day)) FROM customer_analytics.daily_sales x});
my $after_moves_single = $coord->safe_psql('shop_single', $after_moves);
is($coord->safe_psql('shop', $after_moves), $after_moves_single,
	'after the moves: refresh_customer_rfm() (incremental), customer_rfm, rfm(), the sales rollup: the same on the cluster');
is($coord->safe_psql('shop', $clv), $coord->safe_psql('shop_single', $clv), 'after the moves: clv_summary(), clv_model and customer_clv: the same');

# what the layout buys: a GROUP BY customer_ref runs whole on each worker
# (the aggregate in the workers' query, none on the coordinator), where a
# GROUP BY of another column is combined on the coordinator.  rfm()'s
# query of the star schema and clv_summary()'s are of the first kind
my $pushed = q{EXPLAIN (VERBOSE, COSTS OFF)
	SELECT min(f.customer_key), count(DISTINCT f.order_id) FILTER (WHERE f.revenue >= 0), sum(f.revenue),
	       min(f.order_ts) FILTER (WHERE f.revenue >= 0), max(f.order_ts) FILTER (WHERE f.revenue >= 0),
	       count(DISTINCT f.order_id) FILTER (WHERE f.revenue < 0)
	FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_customer c ON c.customer_key = f.customer_key
	WHERE f.status = 'completed' AND f.customer_key <> -1 AND f.order_ts <= '2025-04-03'
	  AND NOT (f.quantity < 0 AND (f.revenue IS NULL OR f.revenue = 0))
	GROUP BY f.customer_ref, c.customer_id};
my $pushed_plan = $coord->safe_psql('shop', $pushed);
like($pushed_plan, qr/^Custom Scan \(Citus Adaptive\)/, "rfm()'s query by customer: nothing above the workers' results on the coordinator");
like($pushed_plan, qr/Query: SELECT .*count\(DISTINCT f\.order_id\).*GROUP BY f\.customer_ref, c\.customer_id/,
	'the workers group by customer_ref, count(DISTINCT) and all');
unlike($pushed_plan, qr/worker_partial_agg|coord_combine_agg/, 'no partial aggregate to combine');
like($coord->safe_psql('shop', q{EXPLAIN (VERBOSE, COSTS OFF) SELECT customer_ref, customer_key, date_key, sum(revenue),
	bool_or(quantity > 0) FROM customer_analytics.fact_order_line WHERE status = 'completed' AND customer_key <> -1
	GROUP BY customer_ref, customer_key, date_key}), qr/^Custom Scan \(Citus Adaptive\)/, "clv_summary()'s query: the same");
like($coord->safe_psql('shop', q{EXPLAIN (VERBOSE, COSTS OFF) SELECT customer_key, order_id, sum(revenue)
	FROM customer_analytics.fact_order_line GROUP BY customer_key, order_id}), qr/^(Hash|Group)Aggregate/,
	'by contrast, a GROUP BY without customer_ref is combined on the coordinator');
my $shipped = q{SELECT (SELECT count(*) FROM (SELECT 1 FROM customer_analytics.fact_order_line f
	                                       WHERE f.status = 'completed' AND f.customer_key <> -1
	                                       GROUP BY f.customer_ref) s),
	       (SELECT count(*) FROM (SELECT 1 FROM customer_analytics.fact_order_line f
	                              WHERE f.status = 'completed' AND f.customer_key <> -1
	                              GROUP BY f.customer_key, f.order_id, f.revenue < 0) s),
	       (SELECT count(*) FROM customer_analytics.fact_order_line f WHERE f.status = 'completed' AND f.customer_key <> -1)};
note 'rows rfm() receives from the workers (per customer / per version and order before / lines): '
	. join(' / ', split /\|/, $coord->safe_psql('shop', $shipped));
# issue 17 layout by session: the events and their staging distributed
# by session_id, co-located with the other distributed tables, the key
# of fact_event (event_id, session_id) on the cluster; every event the
# single node's, each session whole on one shard; an event re-staged
# under another session moved (event_id stays unique), counts after
# every load; the stitching and the anonymous visitors' sessions run
# whole on the shards (the statements Citus sends them)
# ---------------------------------------------------------------------
is($coord->safe_psql('shop', q{SELECT string_agg(format('%s %s %s', p.logicalrelid, column_to_column_name(p.logicalrelid, p.partkey),
		p.colocationid = (SELECT o.colocationid FROM pg_dist_partition o WHERE o.logicalrelid = 'customer_analytics.fact_order_line'::regclass)), '; '
		ORDER BY p.logicalrelid::text)
	FROM pg_dist_partition p WHERE p.logicalrelid IN ('customer_analytics.fact_event'::regclass, 'customer_analytics.stg_events'::regclass)}),
	'customer_analytics.fact_event session_id t; customer_analytics.stg_events session_id t',
	'layout by session: fact_event and stg_events distributed by session_id, co-located with the order facts');
my $event_key = q{SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c
	WHERE c.conrelid = 'customer_analytics.fact_event'::regclass AND c.contype IN ('p', 'u')};
is($coord->safe_psql('shop', $event_key), 'PRIMARY KEY (event_id, session_id)', "layout by session: fact_event's key holds the session on the cluster, after the event");
is($coord->safe_psql('shop_single', $event_key), 'PRIMARY KEY (event_id)', 'and stays event_id alone on the single node');
my $event_id_index = q{SELECT count(*) FROM pg_index i WHERE i.indrelid = 'customer_analytics.fact_event'::regclass
	AND NOT i.indisunique AND i.indnatts = 1 AND pg_get_indexdef(i.indexrelid) LIKE '%(event_id)'};
is($coord->safe_psql('shop', $event_id_index) . $coord->safe_psql('shop_single', $event_id_index), '00',
	'layout by session: no index on event_id alone on either (the key\'s index, event_id first, finds an event that changed session)');
for my $w (@workers)
{
	is($w->safe_psql('shop', $event_key), 'PRIMARY KEY (event_id, session_id)', 'layout by session: the key swapped on the copy of worker ' . $w->name);
}
is($coord->safe_psql('shop', q{SELECT count(*) FROM run_command_on_shards('customer_analytics.fact_event',
	$$SELECT 1 FROM pg_constraint WHERE conrelid = '%s'::regclass AND contype = 'p' AND pg_get_constraintdef(oid) = 'PRIMARY KEY (event_id, session_id)'$$)
	WHERE result = '1'}), '4', 'layout by session: and on every shard');
# the sessions counted shard by shard add up to the sessions: none is
# split over two shards
for my $t (qw(fact_event stg_events))
{
	is($coord->safe_psql('shop', qq{SELECT (SELECT sum(result::bigint) FROM run_command_on_shards('customer_analytics.$t', 'SELECT count(DISTINCT session_id) FROM %s'))
		- (SELECT count(DISTINCT session_id) FROM customer_analytics.$t)}), '0', "layout by session: every session of $t whole on one shard");
}
my $event_rows = sub {
	my ($t) = @_;
	return qq{SELECT count(*) || ' ' || md5(string_agg(r, ',' ORDER BY r)) FROM (
		SELECT (to_jsonb(t) - 'loaded_at' - 'staged_xid')::text AS r FROM customer_analytics.$t t) s};
};
for my $t (qw(fact_event stg_events))
{
	is($coord->safe_psql('shop', $event_rows->($t)), $coord->safe_psql('shop_single', $event_rows->($t)),
		"layout by session: every row of $t, value for value, the single node's");
}

# an anonymous event re-staged under another session (a newer version:
# moved), one re-staged under another session with an older staged
# version than the fact's (left where it is, as the single node's upsert
# leaves it), and the new session's identified event after the moved one
# (stitched on its new shard)
my $moved_shard = q{SELECT string_agg(s.shardid::text, ',' ORDER BY s.shardid) FROM run_command_on_shards('customer_analytics.fact_event',
	$$SELECT count(*) FROM %s WHERE event_id = 'late-e5'$$) s WHERE s.result::bigint > 0};
my $shard_of = sub {
	return $coord->safe_psql('shop', qq{SELECT get_shard_id_for_distribution_column('customer_analytics.fact_event', '$_[0]')});
};
is($coord->safe_psql('shop', $moved_shard), $shard_of->('late-session'), 'layout by session: the event to move is on the shard of its session');
my $move = q{SELECT customer_analytics.track_event('page_view', 'moved-session', event_ts => '2025-04-02 12:10+00', event_id => 'late-e5', channel => 'email');
	INSERT INTO customer_analytics.stg_events (event_id, event_ts, session_id, event_type, stage_id)
	VALUES ('anon-e1', '2025-04-02 12:11+00', 'stale-session', 'page_view', 1);
	SELECT customer_analytics.track_event('add_to_cart', 'moved-session', customer_id => 'late-customer', product_id => 'late-product',
	                                      event_ts => '2025-04-02 12:14+00', event_id => 'moved-e2')};
$coord->safe_psql($_, $move) for qw(shop shop_single);
my ($steps_event_move, $before_move, $after_move) = $run_both->('layout by session: transform_events() of an event moved to another session',
	q{SELECT string_agg(step || '=' || rows_affected, ' ' ORDER BY step) FROM customer_analytics.transform_events()});
like($steps_event_move, qr/^fact_event=2 fact_event_late_customers=0 fact_event_stitched=1 /,
	'layout by session: the moved event and the new one written, the moved one stitched; the older version nowhere');
is($after_move->{fact_event} - $before_move->{fact_event}, 1, 'layout by session: one event more (the moved one is not twice)');
is($coord->safe_psql('shop', q{SELECT count(*) - count(DISTINCT event_id) FROM customer_analytics.fact_event}), '0',
	'layout by session: event_id still unique after the move');
is($coord->safe_psql('shop', $moved_shard), $shard_of->('moved-session'), 'layout by session: the moved event is on the shard of its new session only');
my $two = q{SELECT string_agg(format('%s %s %s %s', event_id, session_id, coalesce(customer_id, '-'), customer_stitched), '; ' ORDER BY event_id)
	FROM customer_analytics.fact_event WHERE event_id IN ('late-e5', 'anon-e1', 'moved-e2')};
is($coord->safe_psql('shop', $two), $coord->safe_psql('shop_single', $two), 'layout by session: the moved, stale and new events as on the single node');
like($coord->safe_psql('shop', $two), qr/^anon-e1 anon-2 - f; late-e5 moved-session late-customer t; moved-e2 moved-session late-customer f$/,
	'layout by session: moved and stitched in its new session; the older version changed nothing');
$compare_tables->('layout by session: after the move', 'customer_analytics.fact_event', 'customer_analytics_internal.clickstream_change',
	'customer_analytics_internal.check_change');

# the sessions of both visitors (the old session's and the new one's)
# rebuilt from their queue, then from scratch; the funnel over them.  The
# stitching and the anonymous visitors' sessions are sent to the shards
# whole: the windows partitioned by session_id and the GROUP BY by it run
# there (what Citus issues to them), nothing of them on the coordinator
$coord->safe_psql($_, q{SELECT customer_analytics.track_event('page_view', 'anon-3', event_ts => '2025-04-02 12:30+00', event_id => 'anon-e3');
	SELECT customer_analytics.track_event('page_view', 'stitch-session', event_ts => '2025-04-02 12:31+00', event_id => 'stitch-e1');
	SELECT customer_analytics.track_event('checkout', 'stitch-session', customer_id => 'late-customer', event_ts => '2025-04-02 12:33+00', event_id => 'stitch-e2')})
	for qw(shop shop_single);
my $click_single = $coord->safe_psql('shop_single', $clickstream);
($rc, $out, $err) = $coord->psql('shop', q{SET citus.log_remote_commands = on;
	SET citus.grep_remote_commands = '%OVER (PARTITION BY%';
	} . $clickstream);
is($out, $click_single, 'layout by session: refresh_clickstream() writes what the single node writes');
like($out, qr/fact_event=3 .*fact_event_stitched=1 .*sessions_written=[1-9]/, 'with new events, one stitched, sessions written');
# (its sessions go as an array literal: Citus sends it only to the shard
# of the one session stitched here, the whole statement with its RETURNING)
my %stitch_shards = map { $_ => 1 } $err =~ /issuing (?:WITH upd AS \()?UPDATE customer_analytics\.fact_event_(\d+) f SET customer_key = l\.new_key.*?OVER \(PARTITION BY e\.session_id/g;
is(scalar(keys %stitch_shards), 1, 'layout by session: the stitching (its windows by session and its UPDATE) is sent whole to the shard of its session, and to no other')
	or diag $err;
my %session_shards_sent = map { $_ => 1 } $err =~ /session_number\(f\.event_ts, [^)]*\) OVER \(PARTITION BY f\.session_id [^)]*\) AS sn FROM \(?customer_analytics\.fact_event_(\d+) f .*?GROUP BY/g;
cmp_ok(scalar(keys %session_shards_sent), '>=', 2, "layout by session: the anonymous visitors' sessions (cut and grouped by session) are sent whole to the shards")
	or diag $err;
$compare_tables->('layout by session: after refresh_clickstream()', 'customer_analytics.fact_event', 'customer_analytics.sessions');
is($coord->safe_psql('shop', $sessions), $coord->safe_psql('shop_single', $sessions), 'layout by session: sessions and funnel_daily rebuilt from scratch: the same on the cluster');
# a GROUP BY session over the events: whole on the workers, no
# aggregation left to the coordinator
my $session_plan = $coord->safe_psql('shop', q{EXPLAIN (COSTS OFF) SELECT session_id, count(*) FROM customer_analytics.fact_event GROUP BY session_id});
like($session_plan, qr/^Custom Scan \(Citus Adaptive\)/, 'layout by session: a GROUP BY session_id has no aggregate above the Citus scan') or diag $session_plan;
like($session_plan, qr/Task.*Aggregate.*Group Key: session_id/s, 'it is grouped on the workers');
# issue 17 staging mark: staged_xid, by which transform() takes the rows
# of the transactions committed since its last run, must be the
# coordinator's transaction id.  An INSERT ... SELECT from a Citus table
# that Citus pulls to the coordinator or repartitions has its defaults
# evaluated on the workers: with pg_current_xact_id() as the default the
# rows got the workers' ids and transform() missed them, silently (shown
# first, the old default put back for it); staging_xid() refuses there,
# and every way of staging through the coordinator marks the rows with
# its id and transform() takes them all.  The same where the coordinator
# holds the shards and Citus runs the tasks over connections to itself.
# Databases of their own: the rows lost on purpose stay out of the shop
# compared above.
# ---------------------------------------------------------------------
for my $node (@nodes)
{
	$node->safe_psql('postgres', 'CREATE DATABASE stage_mark');
	$node->safe_psql('stage_mark', 'CREATE EXTENSION citus');
}
$coord->safe_psql('stage_mark', sprintf(q{SELECT citus_set_coordinator_host('127.0.0.1', %d)}, $coord->port));
$coord->safe_psql('stage_mark', sprintf(q{SELECT citus_add_node('127.0.0.1', %d)}, $_->port)) for @workers;
$coord->safe_psql('stage_mark', q{CREATE EXTENSION customer_analytics;
	SELECT count(*) FROM customer_analytics.generate_sample_data(customers => 60, days => 20, seed => 23, start_date => '2025-01-01', defects => false);
	SELECT count(*) FROM customer_analytics.transform();
	SELECT count(*) FROM customer_analytics.distribute(shard_count => 4)});
# the coordinator's transaction ids well ahead of the workers', so that
# rows marked with a worker's id fall below the next run's window
# (deterministically: checked below, not assumed)
$coord->safe_psql('stage_mark', q{DO $$ BEGIN FOR i IN 1..3000 LOOP PERFORM pg_catalog.pg_current_xact_id(); COMMIT; END LOOP; END $$});
$coord->safe_psql('stage_mark', q{SELECT count(*) FROM customer_analytics.transform()});
my $xid_default = q{SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
	WHERE d.adrelid = 'customer_analytics.stg_orders'::regclass AND a.attname = 'staged_xid'};
is($coord->safe_psql('stage_mark', $xid_default), 'customer_analytics_internal.staging_xid()', "stg_orders.staged_xid's default is staging_xid()");
is($workers[0]->safe_psql('stage_mark', $xid_default), 'customer_analytics_internal.staging_xid()', "and on a worker's copy of the table");

# lines re-staged changed (another quantity), from the distributed
# staging table itself; the lines whose facts then hold the new quantity
my $restage_from_citus = q{INSERT INTO customer_analytics.stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity,
	                                           unit_price, discount, status, channel, updated_at)
	SELECT order_id, line_number, customer_id, product_id, order_ts, quantity + sign(quantity)::int,
	       unit_price, discount, status, channel, updated_at
	FROM customer_analytics.stg_orders WHERE order_ts < '2025-01-08'};
my $restaged_lines = q{SELECT count(DISTINCT (order_id, line_number)) FROM customer_analytics.stg_orders WHERE order_ts < '2025-01-08'};
my $lines_updated = sub {
	my ($mark) = @_;
	# (the staged lines by order_id, the facts by customer: the staged
	# ones read into an intermediate result first)
	return $coord->safe_psql('stage_mark', qq{WITH s AS MATERIALIZED (
		SELECT order_id, line_number, quantity FROM customer_analytics.stg_orders WHERE stage_id > $mark)
		SELECT count(*) FROM customer_analytics.fact_order_line f JOIN s USING (order_id, line_number)
		WHERE f.quantity = s.quantity});
};
my $n_lines = $coord->safe_psql('stage_mark', $restaged_lines);
cmp_ok($n_lines, '>', 0, 'staging mark: order lines to re-stage');
my $stage_mark_sql = q{SELECT max(stage_id) FROM customer_analytics.stg_orders};
my $transform_sm = q{SELECT string_agg(step || '=' || rows_affected, ' ' ORDER BY step) FROM customer_analytics.transform()};

# before: the old default, pg_current_xact_id()
$coord->safe_psql('stage_mark', q{ALTER TABLE customer_analytics.stg_orders ALTER COLUMN staged_xid SET DEFAULT pg_catalog.pg_current_xact_id()});
my $mark = $coord->safe_psql('stage_mark', $stage_mark_sql);
# (the coordinator's id taken apart: in a query over a distributed table,
# pg_current_xact_id() would be the workers')
my $mine = qq{SELECT count(*) || ' ' || count(*) FILTER (WHERE staged_xid = :'me'::xid8) FROM customer_analytics.stg_orders WHERE stage_id > };
my $marked = $coord->safe_psql('stage_mark', qq{BEGIN; SELECT pg_current_xact_id() AS me \\gset
	$restage_from_citus;
	$mine $mark; COMMIT});
is($marked, "$n_lines 0", "before, pg_current_xact_id() as the default: an INSERT ... SELECT from the distributed staging table stages $n_lines lines, none with the coordinator's transaction id");
is($coord->safe_psql('stage_mark', qq{SELECT count(*) FROM customer_analytics.stg_orders
	WHERE stage_id > $mark AND staged_xid >= pg_snapshot_xmin((SELECT snapshot FROM customer_analytics_internal.transform_state))}),
	'0', "before: the workers' transaction ids, all below the window of the next transform() run");
my $steps_lost = $coord->safe_psql('stage_mark', $transform_sm);
like($steps_lost, qr/fact_order_line=0 /, 'before: transform() writes none of those lines');
is($lines_updated->($mark), '0', 'before: no fact holds a re-staged quantity: the lines are lost, silently');
$coord->safe_psql('stage_mark', qq{DELETE FROM customer_analytics.stg_orders WHERE stage_id > $mark;
	ALTER TABLE customer_analytics.stg_orders ALTER COLUMN staged_xid SET DEFAULT customer_analytics_internal.staging_xid()});

# after: the same statement is refused, and one that Citus repartitions
# (stage_id given, the rows moved to other shards); nothing staged
$mark = $coord->safe_psql('stage_mark', $stage_mark_sql);
my $restage_repartitioned = q{INSERT INTO customer_analytics.stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity,
	                                           unit_price, discount, status, stage_id)
	SELECT order_id || '-r', line_number, customer_id, product_id, order_ts, quantity, unit_price, discount, status, stage_id
	FROM customer_analytics.stg_orders WHERE order_ts < '2025-01-08'};
for my $case ([ 'pull to coordinator', $restage_from_citus ], [ 'repartition', $restage_repartitioned ])
{
	my ($method, $sql) = @$case;
	like($coord->safe_psql('stage_mark', "EXPLAIN (COSTS OFF) $sql"), qr{INSERT/SELECT method: \Q$method\E},
		"after: Citus runs this INSERT ... SELECT by $method");
	($rc, $out, $err) = $coord->psql('stage_mark', "\\set VERBOSITY verbose\n$sql");
	isnt($rc, 0, "after: the INSERT ... SELECT from a Citus table that the workers would mark ($method) is refused");
	like($err, qr/55000.*marked with the Citus coordinator's transaction id, and this node is a worker/s,
		"after ($method): object_not_in_prerequisite_state, saying why");
	like($err, qr/HINT:.*CREATE TEMP TABLE/, "after ($method): the hint gives the way round");
}
is($coord->safe_psql('stage_mark', qq{SELECT count(*) FROM customer_analytics.stg_orders WHERE stage_id > $mark OR order_id LIKE '%-r'}), '0',
	'after: nothing staged');
# the hinted way round: the same rows through a temporary table
$marked = $coord->safe_psql('stage_mark', qq{BEGIN; SELECT pg_current_xact_id() AS me \\gset
	CREATE TEMP TABLE restage_sm ON COMMIT DROP AS
	SELECT order_id, line_number, customer_id, product_id, order_ts, quantity + sign(quantity)::int AS quantity,
	       unit_price, discount, status, channel, updated_at
	FROM customer_analytics.stg_orders WHERE order_ts < '2025-01-08';
	INSERT INTO customer_analytics.stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity,
	                                           unit_price, discount, status, channel, updated_at)
	SELECT * FROM restage_sm;
	$mine $mark; COMMIT});
is($marked, "$n_lines $n_lines", "after, through a temporary table: $n_lines lines staged, all with the coordinator's transaction id");
like($coord->safe_psql('stage_mark', $transform_sm), qr/fact_order_line=$n_lines /, "after: transform() writes all $n_lines lines");
is($lines_updated->($mark), $n_lines, 'after: every fact holds its re-staged quantity');

# every other way of staging through the coordinator: VALUES, COPY, a
# local table filled by ingest, a materialized CTE, a reference table,
# the generator, track_event(); each transaction's rows carry its id,
# and transform() takes them all
# (the rows a transaction staged: stage_id drawn by this session from the
# coordinator's sequence after the mark)
my $stage_id_mark = q{SELECT nextval('customer_analytics.stage_id_seq') AS mark \gset};
my $own_rows = q{SELECT 'staged: ' || coalesce(string_agg(format('%s=%s/%s', t, n, mine), ' ' ORDER BY t), 'none') FROM (
	SELECT 'stg_customers' AS t, count(*) AS n, count(*) FILTER (WHERE staged_xid = :'me'::xid8) AS mine
	  FROM customer_analytics.stg_customers WHERE stage_id > :mark
	UNION ALL SELECT 'stg_events', count(*), count(*) FILTER (WHERE staged_xid = :'me'::xid8)
	  FROM customer_analytics.stg_events WHERE stage_id > :mark
	UNION ALL SELECT 'stg_orders', count(*), count(*) FILTER (WHERE staged_xid = :'me'::xid8)
	  FROM customer_analytics.stg_orders WHERE stage_id > :mark
	UNION ALL SELECT 'stg_products', count(*), count(*) FILTER (WHERE staged_xid = :'me'::xid8)
	  FROM customer_analytics.stg_products WHERE stage_id > :mark) c WHERE n > 0};
$coord->safe_psql('stage_mark', q{CREATE TABLE public.orders_landing (order_id text, line_number int, customer_id text, product_id text,
	order_ts timestamptz, quantity int, unit_price numeric(12,2))});
my $csv = join('', map { sprintf("ING-%d,1,,%s,2025-01-%02d 10:00+00,%d,%d.50\n", $_, 'P0001', 10 + $_ % 9, 1 + $_ % 3, 2 + $_ % 5) } 1 .. 25);
for my $case (
	[ 'INSERT ... VALUES', q{INSERT INTO customer_analytics.stg_orders (order_id, line_number, product_id, order_ts, quantity, unit_price)
		VALUES ('VAL-1', 1, 'P0001', '2025-01-12 09:00+00', 2, 3.00), ('VAL-2', 1, 'P0002', '2025-01-12 09:05+00', 1, 4.00);},
		'stg_orders=2/2' ],
	[ 'COPY', qq{COPY customer_analytics.stg_orders (order_id, line_number, product_id, order_ts, quantity, unit_price) FROM STDIN WITH (FORMAT csv);
COPY-1,1,P0001,2025-01-13 09:00+00,1,2.00
COPY-2,1,P0002,2025-01-13 09:05+00,3,5.00
COPY-3,1,P0003,2025-01-13 09:10+00,2,1.00
\\.
},
		'stg_orders=3/3' ],
	[ 'ingest into a local table, then INSERT ... SELECT', qq{SELECT rows_loaded FROM customer_analytics.ingest_csv_text('public.orders_landing',
		E'order_id,line_number,customer_id,product_id,order_ts,quantity,unit_price\\n$csv');
		INSERT INTO customer_analytics.stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price)
		SELECT * FROM public.orders_landing;},
		'stg_orders=25/25' ],
	# (Citus brings a materialized CTE's rows to the coordinator first)
	[ 'INSERT ... SELECT from a materialized CTE over a Citus table', q{WITH s AS MATERIALIZED (
		SELECT 'CTE-' || order_id AS order_id, line_number, product_id, order_ts, quantity, unit_price
		FROM customer_analytics.stg_orders WHERE order_id LIKE 'VAL-%')
		INSERT INTO customer_analytics.stg_orders (order_id, line_number, product_id, order_ts, quantity, unit_price) SELECT * FROM s;},
		'stg_orders=2/2' ],
	# (the coordinator holds copies of the reference tables: Citus reads
	# them in this session, by local execution)
	[ 'INSERT ... SELECT from a reference table', q{INSERT INTO customer_analytics.stg_orders (order_id, line_number, product_id, order_ts, quantity, unit_price)
		SELECT 'REF-' || product_id, 1, product_id, '2025-01-15 10:00+00', 1, 5.00 FROM customer_analytics.dim_product
		WHERE product_key > 0 ORDER BY product_id LIMIT 5;},
		'stg_orders=5/5' ],
	[ 'generate_sample_data()', q{SELECT count(*) FROM customer_analytics.generate_sample_data(customers => 60, days => 3, seed => 24,
		start_date => '2025-01-21', defects => false);}, qr/^stg_customers=(\d+)\/\1 stg_events=(\d+)\/\2 stg_orders=(\d+)\/\3 stg_products=(\d+)\/\4$/ ],
	[ 'track_event()', q{SELECT customer_analytics.track_event('page_view', 'sm-session', event_ts => '2025-01-24 10:00+00', event_id => 'sm-e1');
		SELECT customer_analytics.track_event('product_view', 'sm-session', product_id => 'P0001', event_ts => '2025-01-24 10:01+00', event_id => 'sm-e2');},
		'stg_events=2/2' ])
{
	my ($what, $sql, $expect) = @$case;
	my ($own) = $coord->safe_psql('stage_mark', "BEGIN;\nSELECT pg_current_xact_id() AS me \\gset\n$stage_id_mark\n$sql\n$own_rows;\nCOMMIT")
		=~ /^staged: (.*)$/m;
	if (ref $expect) { like($own, $expect, "$what: every row staged with the coordinator's transaction id ($own)") }
	else { is($own, $expect, "$what: every row staged with the coordinator's transaction id") }
}
my $steps_all = $coord->safe_psql('stage_mark', $transform_sm);
is($coord->safe_psql('stage_mark', q{SELECT count(*) FROM customer_analytics.fact_order_line
	WHERE order_id LIKE 'VAL-%' OR order_id LIKE 'COPY-%' OR order_id LIKE 'ING-%' OR order_id LIKE 'CTE-%' OR order_id LIKE 'REF-%'}), '37',
	'transform() writes the 37 lines staged with VALUES, COPY, from the local table, the CTE and the reference table');
is($coord->safe_psql('stage_mark', q{SELECT count(*) FROM customer_analytics.fact_event WHERE event_id IN ('sm-e1', 'sm-e2')}), '2',
	'and the tracked events');
is($coord->safe_psql('stage_mark', q{WITH s AS MATERIALIZED (SELECT order_id, line_number FROM customer_analytics.stg_orders),
	     f AS MATERIALIZED (SELECT order_id, line_number FROM customer_analytics.fact_order_line
	                        UNION SELECT order_id, line_number FROM customer_analytics_internal.unknown_member_line)
	SELECT count(*) FROM s WHERE NOT EXISTS (SELECT 1 FROM f WHERE f.order_id = s.order_id AND f.line_number = s.line_number)}),
	'0', 'every staged order line is in the facts (or waits for its customer): none left behind');
unlike($coord->safe_psql('stage_mark', $transform_sm), qr/=[1-9]/, 'a second transform() finds nothing left');

# an INSERT ... SELECT that Citus pushes down whole (co-located, stage_id
# given: no nextval() left): Citus sends the coordinator's id
$mark = $coord->safe_psql('stage_mark', $stage_mark_sql);
my $restage_pushed = qq{INSERT INTO customer_analytics.stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity,
	                                           unit_price, discount, status, channel, updated_at, stage_id)
	SELECT order_id, line_number, customer_id, product_id, order_ts, quantity + sign(quantity)::int,
	       unit_price, discount, status, channel, updated_at, stage_id + 100000000
	FROM customer_analytics.stg_orders WHERE order_ts < '2025-01-08'
	  AND (order_id, line_number, stage_id) IN (SELECT order_id, line_number, max(stage_id) FROM customer_analytics.stg_orders
	                                             WHERE order_ts < '2025-01-08' GROUP BY 1, 2)};
$plan = $coord->safe_psql('stage_mark', "EXPLAIN (COSTS OFF) $restage_pushed");
ok($plan =~ /Insert on stg_orders_\d+/ && $plan !~ /INSERT\/SELECT method/, 'Citus pushes this INSERT ... SELECT down whole')
	or diag $plan;
$marked = $coord->safe_psql('stage_mark', qq{BEGIN; SELECT pg_current_xact_id() AS me \\gset
	$restage_pushed;
	$mine $mark; COMMIT});
is($marked, "$n_lines $n_lines", "pushed down whole: $n_lines lines, all with the coordinator's transaction id");
like($coord->safe_psql('stage_mark', $transform_sm), qr/fact_order_line=$n_lines /, "and transform() writes all $n_lines lines");
is($lines_updated->($mark), $n_lines, 'every fact holds its re-staged quantity');

# shards on the coordinator itself (a database where it is the only node,
# with shards): Citus may run the tasks of such a statement over
# connections of its own to the coordinator (always, with local execution
# off), whose transactions are not the staging session's: with the old
# default the rows got their ids, silently; the extension's refuses there
# too, and the way round works
$coord->safe_psql('postgres', 'CREATE DATABASE stage_mark_solo');
$coord->safe_psql('stage_mark_solo', sprintf(q{CREATE EXTENSION citus;
	SELECT citus_set_coordinator_host('127.0.0.1', %d);
	SELECT citus_set_node_property('127.0.0.1', %d, 'shouldhaveshards', true);
	CREATE EXTENSION customer_analytics;
	SELECT count(*) FROM customer_analytics.generate_sample_data(customers => 30, days => 10, seed => 25, start_date => '2025-01-01',
	                                                             defects => false, events => false);
	SELECT create_distributed_table('customer_analytics.stg_orders', 'order_id', shard_count => 4)}, $coord->port, $coord->port));
my $solo_lines = $coord->safe_psql('stage_mark_solo', q{SELECT count(*) FROM customer_analytics.stg_orders});
cmp_ok($solo_lines, '>', 0, 'shards on the coordinator: order lines staged');
my $restage_solo = q{INSERT INTO customer_analytics.stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price)
	SELECT order_id || '-r', line_number, customer_id, product_id, order_ts, quantity, unit_price FROM customer_analytics.stg_orders};
my $solo_marked = qq{SET citus.enable_local_execution = off;
	BEGIN; SELECT pg_current_xact_id() AS me \\gset
	$restage_solo;
	SELECT count(*) || ' ' || count(*) FILTER (WHERE staged_xid = :'me'::xid8) FROM customer_analytics.stg_orders WHERE order_id LIKE '%-r';
	ROLLBACK};
$coord->safe_psql('stage_mark_solo', q{ALTER TABLE customer_analytics.stg_orders ALTER COLUMN staged_xid SET DEFAULT pg_catalog.pg_current_xact_id()});
is($coord->safe_psql('stage_mark_solo', $solo_marked), "$solo_lines 0",
	"shards on the coordinator, the old default: the rows re-staged through Citus's own connections, none with the session's transaction id");
$coord->safe_psql('stage_mark_solo', q{ALTER TABLE customer_analytics.stg_orders ALTER COLUMN staged_xid SET DEFAULT customer_analytics_internal.staging_xid()});
($rc, $out, $err) = $coord->psql('stage_mark_solo', "\\set VERBOSITY verbose\nSET citus.enable_local_execution = off;\n$restage_solo");
like($err, qr/55000.*a connection Citus opened to run part of another session's statement/s,
	"shards on the coordinator, the extension's default: refused in Citus's own connection (object_not_in_prerequisite_state)");
like($err, qr/HINT:.*CREATE TEMP TABLE/, 'with the way round');
is($coord->safe_psql('stage_mark_solo', qq{SET citus.enable_local_execution = off;
	BEGIN; SELECT pg_current_xact_id() AS me \\gset
	CREATE TEMP TABLE restage_solo ON COMMIT DROP AS
	SELECT order_id || '-r' AS order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price FROM customer_analytics.stg_orders;
	INSERT INTO customer_analytics.stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price)
	SELECT * FROM restage_solo;
	SELECT count(*) || ' ' || count(*) FILTER (WHERE staged_xid = :'me'::xid8) FROM customer_analytics.stg_orders WHERE order_id LIKE '%-r';
	ROLLBACK}), "$solo_lines $solo_lines", 'and the way round: every row with the session\'s transaction id');

# staging on a worker: refused (its rows would carry the worker's id)
($rc, $out, $err) = $workers[0]->psql('stage_mark', q{\set VERBOSITY verbose
	INSERT INTO customer_analytics.stg_orders (order_id, line_number, product_id, order_ts, quantity, unit_price)
	VALUES ('W-1', 1, 'P0001', '2025-01-12', 1, 1)});
like($err, qr/55000.*this node is a worker/s, 'an INSERT into staging on a worker is refused: object_not_in_prerequisite_state');
is($coord->safe_psql('stage_mark', q{SELECT count(*) FROM customer_analytics.stg_orders WHERE order_id = 'W-1'}), '0', 'nothing staged');

$_->stop for reverse @nodes;
done_testing();
