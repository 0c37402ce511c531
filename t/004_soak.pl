# Soak: pgbench clients read the views and write clickstream events for
# CA_SOAK_SECONDS (default 60) while pg_cron runs the whole pipeline every
# minute in the same database (cron.database_name = the test database,
# background workers).
#
# Load: 4 clients, each transaction either a reader (the RFM, sales,
# anomaly, forecast and funnel views, the pipeline status) or a writer (one
# customer_analytics.track_event()), at most 200 transactions a second.
#
# Verified: pgbench ends without an error or a failed transaction; every
# event a writer inserted is in stg_events exactly once (count = writer
# transactions) and, after a final transform, in fact_event; pg_cron ran
# the pipeline during the soak and at least one of its runs succeeded, none
# failed.  Latencies (average, p50, p95, p99, max per script) and the
# pipeline runs are printed with note().
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::RealBin/lib";
use CustomerAnalytics qw(new_node);

my $seconds = $ENV{CA_SOAK_SECONDS} || 60;
my $clients = 4;

# pg_cron serves the warehouse
my $node = new_node('soak', cron_database => 'warehouse');

$node->safe_psql('warehouse', q{
    CREATE EXTENSION customer_analytics;
    SELECT count(*) FROM customer_analytics.generate_sample_data(customers => 500, days => 90, seed => 3);
    CALL customer_analytics.run_pipeline();
});
is($node->safe_psql('warehouse', 'SELECT string_agg(status, \',\') FROM customer_analytics.pipeline_run'),
	'succeeded', 'a first run fills the views');

my $dir = $node->basedir;
my $reader = "$dir/reader.sql";
my $writer = "$dir/writer.sql";
PostgreSQL::Test::Utils::append_to_file($reader, q{
\set c random(1, 500)
SELECT count(*), sum(revenue) FROM customer_analytics.daily_sales;
SELECT * FROM customer_analytics.top_customers ORDER BY rank LIMIT 10;
SELECT segment, customers, revenue FROM customer_analytics.segment_summary ORDER BY segment;
SELECT * FROM customer_analytics.customer_rfm WHERE customer_id = 'C' || lpad(:c::text, 7, '0');
SELECT * FROM customer_analytics.product_category_sales WHERE grain = 'month' ORDER BY period_start DESC, category LIMIT 8;
SELECT * FROM customer_analytics.anomalies ORDER BY day DESC LIMIT 5;
SELECT * FROM customer_analytics.sales_forecast LIMIT 7;
SELECT * FROM customer_analytics.funnel_daily ORDER BY 1 DESC LIMIT 7;
SELECT scope, last_status FROM customer_analytics.pipeline_status;
});
PostgreSQL::Test::Utils::append_to_file($writer, q{
\set p random(1, 200)
\set t random(1, 5)
SELECT customer_analytics.track_event((ARRAY['page_view', 'product_view', 'add_to_cart', 'checkout', 'purchase'])[:t],
                                      'soak-' || :client_id || '-' || :p, NULL, 'P' || lpad(:p::text, 5, '0'));
});

is($node->safe_psql('warehouse', q{SELECT customer_analytics.schedule_pipeline('* * * * *') > 0}), 't',
	'the pipeline is scheduled every minute');
my $soak_start = $node->safe_psql('warehouse', 'SELECT now()');

my ($out, $err) = ('', '');
my $ok = IPC::Run::run(
	[ $node->installed_command('pgbench'), '-n', '-c', $clients, '-j', 2, '-T', $seconds, '-R', 200,
	  '-r', '-l', "--log-prefix=$dir/pgbench_log",
	  '-f', "$reader\@1", '-f', "$writer\@1", $node->connstr('warehouse') ],
	'>', \$out, '2>', \$err);
note "pgbench output:\n$out";
ok($ok, 'pgbench ran to the end') or diag $err;
unlike($err, qr/error|abort/i, 'pgbench reported no error');
like($out, qr/number of failed transactions: 0 /, 'no failed transaction') if $out =~ /failed transactions/;

# latencies per script from the per-transaction log (microseconds)
my %lat;
foreach my $log (glob "$dir/pgbench_log*")
{
	open my $fh, '<', $log or die "$log: $!";
	while (<$fh>)
	{
		my ($client, $tx, $us, $script) = split;
		push @{ $lat{$script} }, $us;
	}
	close $fh;
}
# The per-transaction log counts every transaction that completed; the
# summary leaves out those that ended after the duration (their events are
# in the table all the same)
my $reads  = scalar @{ $lat{0} // [] };
my $writes = scalar @{ $lat{1} // [] };
my ($summary_writes) = $out =~ /SQL script 2: \S*writer\.sql\n - weight: \d+ [^\n]*\n - (\d+) transactions/;
cmp_ok($writes, '>', 0, "writers inserted events ($writes)");
cmp_ok($reads, '>', 0, "readers read the views ($reads)");
note 'writer transactions: ' . ($summary_writes // '?') . " in pgbench's summary, $writes in its log";
foreach my $script (sort keys %lat)
{
	my @v = sort { $a <=> $b } @{ $lat{$script} };
	my $pct = sub { $v[ int($_[0] * $#v) ] / 1000 };
	my $avg = 0;
	$avg += $_ for @v;
	$avg /= 1000 * @v;
	note sprintf('%s latency (ms): n = %d, avg %.2f, p50 %.2f, p95 %.2f, p99 %.2f, max %.2f',
		$script == 0 ? 'reader' : 'writer', scalar @v, $avg, $pct->(0.5), $pct->(0.95), $pct->(0.99), $v[-1] / 1000);
}

# at least one scheduled run finished (the soak spans a minute boundary,
# but a run may still be going)
ok($node->poll_query_until('warehouse', qq{
	SELECT EXISTS (SELECT FROM customer_analytics.pipeline_run
	               WHERE triggered_by = 'pg_cron' AND started_at >= '$soak_start' AND status <> 'running')}),
	'pg_cron ran the pipeline during the soak');
is($node->safe_psql('warehouse', 'SELECT customer_analytics.unschedule_pipeline()'), 't', 'unscheduled');
ok($node->poll_query_until('warehouse',
	q{SELECT NOT EXISTS (SELECT FROM customer_analytics.pipeline_run WHERE status = 'running')}),
	'no run is left running');
note "pipeline runs:\n" . $node->safe_psql('warehouse', q{
	SELECT string_agg(format('run %s %s by %s at %s, %s s%s', run_id, status, triggered_by, started_at::time(0),
	                         round(extract(epoch FROM finished_at - started_at)::numeric, 2),
	                         COALESCE(': ' || error, '')), E'\n' ORDER BY run_id)
	FROM customer_analytics.pipeline_run});
cmp_ok($node->safe_psql('warehouse', qq{
	SELECT count(*) FROM customer_analytics.pipeline_run
	WHERE triggered_by = 'pg_cron' AND started_at >= '$soak_start' AND status = 'succeeded'}),
	'>=', 1, 'at least one pg_cron run succeeded');
is($node->safe_psql('warehouse', q{SELECT count(*) FROM customer_analytics.pipeline_run WHERE status = 'failed'}),
	'0', 'no pipeline run failed');
note 'rows the pg_cron runs moved into the facts: ' . $node->safe_psql('warehouse', qq{
	SELECT COALESCE(sum(s.rows_affected), 0) FROM customer_analytics.pipeline_step s
	JOIN customer_analytics.pipeline_run r USING (run_id)
	WHERE r.triggered_by = 'pg_cron' AND s.step = 'transform'});

# every event accounted for
is($node->safe_psql('warehouse', q{
	SELECT count(*) || ' ' || count(DISTINCT event_id) FROM customer_analytics.stg_events WHERE session_id LIKE 'soak-%'}),
	"$writes $writes", 'every event a writer inserted is staged exactly once');
$node->safe_psql('warehouse', 'SELECT count(*) FROM customer_analytics.transform()');
is($node->safe_psql('warehouse', q{
	SELECT count(*) || ' ' || count(DISTINCT event_id) FROM customer_analytics.fact_event WHERE session_id LIKE 'soak-%'}),
	"$writes $writes", 'after a final transform every one of them is in fact_event');

my $log = slurp_file($node->logfile);
unlike($log, qr/terminated by signal|PANIC|TRAP:/, 'no backend crashed');

$node->stop;
done_testing();
