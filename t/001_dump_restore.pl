# pg_dump / pg_restore of a database with loaded data keeps every row of
# every user-data table, and the restored database keeps working.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('dump');
$node->init;
$node->start;

$node->safe_psql('postgres', 'CREATE DATABASE warehouse');
$node->safe_psql('warehouse', q{
    CREATE EXTENSION customer_analytics;
    SELECT count(*) FROM customer_analytics.generate_sample_data(customers => 400, days => 60, seed => 5);
    SELECT count(*) FROM customer_analytics.transform();
    SELECT count(*) FROM customer_analytics.refresh_clickstream();
    -- a row staged after the last transform must survive too, and be
    -- transformed after the restore
    INSERT INTO customer_analytics.stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price)
    VALUES ('AFTER-DUMP', 1, 'C0000001', 'P00001', '2025-03-01 10:00+00', 2, 9.99);
});

# row count and checksum of every table pg_dump is told to keep
sub checksums
{
	my ($db) = @_;
	my @tables = split /\n/, $node->safe_psql($db, q{
		SELECT c.relname FROM pg_extension e, unnest(e.extconfig) AS cfg(oid)
		JOIN pg_class c ON c.oid = cfg.oid AND c.relkind = 'r'
		WHERE e.extname = 'customer_analytics' ORDER BY 1});
	my $out = '';
	foreach my $t (@tables)
	{
		$out .= "$t " . $node->safe_psql($db,
			"SELECT count(*) || ' ' || md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) "
			  . "FROM customer_analytics.$t t") . "\n";
	}
	return $out;
}
my $before = checksums('warehouse');
like($before, qr/fact_order_line [1-9]\d* /, 'source has order lines');
like($before, qr/stg_events [1-9]\d* /, 'source has staged events');

my $dump = $node->basedir . '/warehouse.dump';
$node->command_ok([ 'pg_dump', '-Fc', '-d', $node->connstr('warehouse'), '-f', $dump ],
    'pg_dump of the warehouse');

$node->safe_psql('postgres', 'CREATE DATABASE restored');
$node->command_ok([ 'pg_restore', '--exit-on-error', '-d', $node->connstr('restored'), $dump ],
    'pg_restore into a fresh database');

my $after = checksums('restored');
is($after, $before, 'every user-data table has the same rows after restore');

# the sessions are derived, not dumped: the first refresh rebuilds them
my $sessions_sql = q{SELECT count(*) || ' ' || md5(string_agg(s::text, ',' ORDER BY session_key))
                     FROM customer_analytics.sessions s};
my $sessions_before = $node->safe_psql('warehouse', $sessions_sql);
like($sessions_before, qr/^[1-9]\d* /, 'source has sessions');
$node->safe_psql('restored', 'SELECT count(*) FROM customer_analytics.refresh_clickstream()');
is($node->safe_psql('restored', $sessions_sql), $sessions_before,
    'the first refresh after the restore rebuilds the same sessions');

# the sequences continue after the restored data
my $seq = $node->safe_psql('restored', q{
    SELECT (SELECT last_value FROM customer_analytics.stage_id_seq)
           >= (SELECT max(stage_id) FROM customer_analytics.stg_events)});
is($seq, 't', 'stage_id sequence position is restored');

# the restored database works: transform picks up the row staged after the
# last run, and a new load gets fresh keys
my $rows = $node->safe_psql('restored', q{
    SELECT rows_affected FROM customer_analytics.transform() WHERE step = 'fact_order_line'});
cmp_ok($rows, '>=', 1, 'transform in the restored database processes the pending row');
is($node->safe_psql('restored',
    q{SELECT count(*) FROM customer_analytics.fact_order_line WHERE order_id = 'AFTER-DUMP'}),
    '1', 'row staged before the dump reaches the facts after the restore');
is($node->safe_psql('restored', q{
    SELECT count(*) FROM customer_analytics.generate_sample_data(customers => 10, days => 5, seed => 9);
    SELECT count(*) FROM customer_analytics.transform();
    SELECT count(*) - count(DISTINCT customer_key) FROM customer_analytics.dim_customer}),
    "4\n9\n0", 'new loads after the restore get fresh surrogate keys');

$node->stop;
done_testing();
