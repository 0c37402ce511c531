# What the TAP tests (t/*.pl) share: a node set up the way the extension
# is deployed (pg_cron preloaded and created in the database it serves),
# and the one checksum of a relation's rows by which tests compare a
# database before and after a dump, an update, a crash or pg_upgrade.
#
#   use FindBin;
#   use lib "$FindBin::RealBin/lib";
#   use CustomerAnalytics qw(new_node cron_conf relation_checksum checksums);
package CustomerAnalytics;

use strict;
use warnings;
use Exporter 'import';
use PostgreSQL::Test::Cluster;

our @EXPORT_OK = qw(new_node cron_conf relation_checksum checksums);

# cron_conf(DATABASE, %options): the postgresql.conf lines that preload
# pg_cron for DATABASE.  Options:
#   background_workers => 0   jobs over libpq connections (pg_cron's
#                             default) instead of background workers
#   preload => 'citus,pg_cron'  another shared_preload_libraries
sub cron_conf
{
	my ($database, %opt) = @_;
	my $preload = $opt{preload} // 'pg_cron';
	my $conf = "shared_preload_libraries = '$preload'\ncron.database_name = '$database'\n";
	# a job in a background worker needs no connection back to the server;
	# each takes a worker slot
	$conf .= "cron.use_background_workers = on\nmax_worker_processes = 20\n"
	  if $opt{background_workers} // 1;
	return $conf;
}

# new_node(NAME, %options): a node, initialised and started.  Options:
#   cron_database => DB   pg_cron preloaded and serving DB, its extension
#                         created there (DB is created first: pg_cron's
#                         launcher needs it when the server starts)
#   background_workers, preload   as for cron_conf
#   conf => TEXT          more postgresql.conf lines
#   install_path => DIR   another installation (pg_upgrade)
#   init => [ARGS]        more initdb arguments
sub new_node
{
	my ($name, %opt) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name,
		$opt{install_path} ? (install_path => $opt{install_path}) : ());
	$node->init($opt{init} ? (extra => $opt{init}) : ());
	$node->append_conf('postgresql.conf', $opt{conf}) if defined $opt{conf};
	my $cron_db = $opt{cron_database};
	if (!defined $cron_db)
	{
		$node->start;
		return $node;
	}
	if ($cron_db ne 'postgres')
	{
		$node->start;
		$node->safe_psql('postgres', qq{CREATE DATABASE "$cron_db"});
		$node->stop;
	}
	$node->append_conf('postgresql.conf',
		cron_conf($cron_db, map { exists $opt{$_} ? ($_ => $opt{$_}) : () } qw(background_workers preload)));
	$node->start;
	$node->safe_psql($cron_db, 'CREATE EXTENSION pg_cron');
	return $node;
}

# relation_checksum(NODE, DB, RELATION, %options): "ROWS MD5" of the
# relation's rows in their text form (which for our types is what their
# output functions make of the stored bytes), in a fixed order.  Options:
#   rows => EXPR    the text of a row (default t::text; t is the relation)
#   where => COND   only these rows
sub relation_checksum
{
	my ($node, $db, $relation, %opt) = @_;
	my $rows = $opt{rows} // 't::text';
	my $where = defined $opt{where} ? " WHERE $opt{where}" : '';
	return $node->safe_psql($db,
		"SELECT count(*) || ' ' || md5(coalesce(string_agg($rows, ',' ORDER BY $rows), '')) "
		  . "FROM $relation t$where");
}

# checksums(NODE, DB, [RELATIONS], %options): one line "RELATION ROWS MD5"
# per relation, in the order given.  A name without a schema is one of
# customer_analytics or customer_analytics_internal.  Options:
#   rows => {RELATION => EXPR}, where => {RELATION => COND}  per relation,
#   as for relation_checksum
sub checksums
{
	my ($node, $db, $relations, %opt) = @_;
	my $out = '';
	foreach my $t (@$relations)
	{
		# a name without a schema is the extension's, documented or internal
		my $qualified = $t =~ /\./ ? $t : $node->safe_psql($db,
			"SELECT coalesce(to_regclass('customer_analytics.$t'), to_regclass('customer_analytics_internal.$t'))");
		$out .= "$t "
		  . relation_checksum($node, $db, $qualified,
			rows => $opt{rows}{$t},
			where => $opt{where}{$t})
		  . "\n";
	}
	return $out;
}

1;
