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

$_->stop for reverse @nodes;
done_testing();
