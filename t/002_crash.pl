# Crashes in the middle of the work: the server is killed while a large
# ingest_csv(), a transform() or a CALL run_pipeline() is running, and
# started again.  Every fault is injected twice, once as SIGKILL of the
# whole server (the postmaster and all its children at once, as the OOM
# killer or a power cut would) and once as pg_ctl stop -m immediate.
#
# Faults injected, and what is verified after the restart:
#  1. SIGKILL of the server during ingest_csv() of a 1,000,000-row file,
#     once pg_stat_progress_copy shows rows written;
#  2. pg_ctl stop -m immediate likewise, during the load of another file:
#     the client saw no result, crash recovery ran, no row of the file is in
#     stg_orders, ingest_load has no 'loaded' row for it, and loading the
#     file again loads every row exactly once (rows_loaded = rows in the
#     file = rows staged, no duplicate (order_id, line_number)).
#  3. SIGKILL of the server during the first transform() of a sample shop:
#     no fact or dimension row was written; a new transform() gives the same
#     dimensions and facts as a clean run in another database.
#  4. pg_ctl stop -m immediate during transform(full_refresh => true) over
#     the result of 3: the star schema is unchanged, and a new full refresh
#     gives the clean run's again.
#  5. SIGKILL of the server during CALL run_pipeline() (in its transform
#     step), and
#  6. pg_ctl stop -m immediate likewise: the run is left 'running', no fact
#     row was written; the next CALL run_pipeline() marks it failed
#     ('interrupted ...'), succeeds itself, and the facts equal the clean
#     run's.
#  7. SIGKILL of the server during CALL run_pipeline() in its ingest step,
#     loading a 1,000,000-row file of a landing directory: no row of it is
#     staged and no load recorded; the next run marks the interrupted one
#     failed, loads the file and stages every row exactly once.
use strict;
use warnings;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::RealBin/lib";
use CustomerAnalytics qw(new_node);

# the default of the test clusters; the faults are process deaths, which
# lose nothing the kernel has been given
my $node = new_node('crash', conf => "log_min_messages = warning\n");

my $customers = 1500;
my $days      = 365;
my $seed      = 11;

foreach my $db (qw(reference loads warehouse pipe1 pipe2 pipe3))
{
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, 'CREATE EXTENSION customer_analytics');
}
foreach my $db (qw(reference warehouse pipe1 pipe2))
{
	$node->safe_psql($db,
		"SELECT count(*) FROM customer_analytics.generate_sample_data(customers => $customers, days => $days, seed => $seed)"
	);
}
$node->safe_psql('reference', 'SELECT count(*) FROM customer_analytics.transform()');

# The star schema by natural keys: surrogate keys, load ids, stage ids and
# load times come from sequences and clocks, which a crash may move on.
my $star_sql = q{
SELECT 'dim_customer ' || count(*) || ' ' || md5(string_agg(x, E'\n' ORDER BY x)) FROM (
  SELECT (to_jsonb(c) - 'customer_key' - 'load_id' - 'stage_id' - 'loaded_at' - 'updated_at')::text AS x
  FROM customer_analytics.dim_customer c) s
UNION ALL
SELECT 'dim_product ' || count(*) || ' ' || md5(string_agg(x, E'\n' ORDER BY x)) FROM (
  SELECT (to_jsonb(p) - 'product_key' - 'load_id' - 'stage_id' - 'loaded_at' - 'updated_at')::text AS x
  FROM customer_analytics.dim_product p) s
UNION ALL
SELECT 'fact_order_line ' || count(*) || ' ' || md5(string_agg(x, E'\n' ORDER BY x)) FROM (
  SELECT (to_jsonb(f) - 'customer_key' - 'product_key' - 'load_id' - 'stage_id' - 'loaded_at' - 'updated_at'
          || jsonb_build_object('customer', c.customer_id, 'customer_from', c.valid_from, 'product', p.product_id))::text AS x
  FROM customer_analytics.fact_order_line f
  JOIN customer_analytics.dim_customer c USING (customer_key)
  JOIN customer_analytics.dim_product p USING (product_key)) s
UNION ALL
SELECT 'fact_event ' || count(*) || ' ' || md5(string_agg(x, E'\n' ORDER BY x)) FROM (
  SELECT (to_jsonb(f) - 'customer_key' - 'product_key' - 'load_id' - 'stage_id' - 'loaded_at' - 'updated_at'
          || jsonb_build_object('customer', c.customer_id, 'customer_from', c.valid_from, 'product', p.product_id))::text AS x
  FROM customer_analytics.fact_event f
  LEFT JOIN customer_analytics.dim_customer c USING (customer_key)
  LEFT JOIN customer_analytics.dim_product p USING (product_key)) s
ORDER BY 1
};
my $reference = $node->safe_psql('reference', $star_sql);
note "the clean run (rows and checksum per table):\n$reference";
like($reference, qr/^fact_event [1-9]\d* .*^fact_order_line [1-9]\d* /ms, 'the clean run has facts');

my $facts_sql = q{SELECT (SELECT count(*) FROM customer_analytics.fact_order_line)
                       + (SELECT count(*) FROM customer_analytics.fact_event)
                       + (SELECT count(*) FROM customer_analytics.dim_customer WHERE customer_key > 0)};

# Start a statement in a psql of its own, in the background.
sub start_background
{
	my ($db, $sql) = @_;
	my %session = (out => '', err => '');
	$session{handle} = IPC::Run::start(
		[ $node->installed_command('psql'), '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr($db), '-c', $sql ],
		'>', \$session{out}, '2>', \$session{err});
	return \%session;
}

# The processes of the server: the postmaster and its children.
sub server_processes
{
	open my $fh, '<', $node->data_dir . '/postmaster.pid' or die "no postmaster.pid: $!";
	my $postmaster = <$fh>;
	close $fh;
	chomp $postmaster;
	my @children;
	opendir my $proc, '/proc' or die "no /proc: $!";
	foreach my $pid (grep { /^\d+$/ } readdir $proc)
	{
		open my $st, '<', "/proc/$pid/stat" or next;
		my $line = <$st>;
		close $st;
		push @children, $pid if defined $line && $line =~ /^\d+ \(.*\) \S+ (\d+) / && $1 == $postmaster;
	}
	closedir $proc;
	return ($postmaster, @children);
}

# Inject a fault: 'sigkill' kills the postmaster and every child at once,
# 'immediate' is pg_ctl stop -m immediate.  Then start the server again and
# check that it went through crash recovery.
my $faults = 0;
sub crash_and_restart
{
	my ($how, $session) = @_;
	my $log_offset = -s $node->logfile;
	if ($how eq 'sigkill')
	{
		my ($postmaster, @children) = server_processes();
		$node->kill9;    # the postmaster first, so that it restarts nothing
		kill 'KILL', @children;
		# wait until every one is gone, reaped by init (they are not our
		# children): a new postmaster refuses to start while the old one's
		# PID exists, even as a zombie
		foreach my $pid (@children, $postmaster)
		{
			my $tries = 0;
			while (kill(0, $pid) && $tries++ < 600)
			{
				select(undef, undef, undef, 0.05);
			}
		}
	}
	else
	{
		$node->stop('immediate');
	}
	$faults++;
	eval { $session->{handle}->finish; };
	$node->start;
	my $log = slurp_file($node->logfile, $log_offset);
	like($log, qr/database system was (interrupted|not properly shut down)/,
		"$how: the server went through crash recovery");
	return $session;
}

sub wait_for
{
	my ($db, $sql, $what) = @_;
	ok($node->poll_query_until($db, $sql), $what)
	  or BAIL_OUT("gave up waiting: $what");
}

########################################################################
# 1, 2: a large ingest_csv()
########################################################################
my $rows = 1_000_000;
my $dir  = $node->basedir;
mkdir "$dir/landing" or die "mkdir: $!";
foreach my $file ('orders_a', 'orders_b', 'landing/orders_c')
{
	my $prefix = $file eq 'orders_a' ? 'A' : $file eq 'orders_b' ? 'B' : 'C';
	$node->safe_psql('loads', qq{
		COPY (SELECT '$prefix' || (g / 3) AS order_id, 1 + g % 3 AS line_number,
		             'C' || lpad((g % 3000)::text, 7, '0') AS customer_id, 'P' || lpad((g % 200)::text, 5, '0') AS product_id,
		             timestamptz '2025-01-01 00:00+00' + g * interval '1 second' AS order_ts,
		             1 + g % 5 AS quantity, round((g % 1000) / 7.0, 2) AS unit_price
		      FROM generate_series(0, $rows - 1) g)
		TO '$dir/$file.csv' WITH (FORMAT csv, HEADER)});
}

my %ingest_fault = (orders_a => 'sigkill', orders_b => 'immediate');
foreach my $file ('orders_a', 'orders_b')
{
	my $how  = $ingest_fault{$file};
	my $path = "$dir/$file.csv";
	my $staged_before = $node->safe_psql('loads', 'SELECT count(*) FROM customer_analytics.stg_orders');
	my $load = start_background('loads',
		"SELECT status FROM customer_analytics.ingest_csv('customer_analytics.stg_orders', '$path')");
	wait_for('loads',
		q{SELECT EXISTS (SELECT FROM pg_stat_progress_copy WHERE tuples_processed >= 100000)},
		"$how during ingest_csv: the load is writing rows");
	my $progress = $node->safe_psql('loads', 'SELECT max(tuples_processed) FROM pg_stat_progress_copy');
	crash_and_restart($how, $load);
	note "$file: killed ($how) with $progress of $rows rows processed";
	cmp_ok($progress, '<', $rows, "$how during ingest_csv: killed before the end of the file ($progress rows)");
	unlike($load->{out}, qr/loaded/, "$how during ingest_csv: the client got no result");

	is($node->safe_psql('loads', 'SELECT count(*) FROM customer_analytics.stg_orders'),
		$staged_before, "$how during ingest_csv: no row of the interrupted load is staged");
	is($node->safe_psql('loads', qq{
		SELECT count(*) FROM customer_analytics.ingest_load WHERE file = '$path' AND status = 'loaded'}),
		'0', "$how during ingest_csv: the file is not recorded as loaded");

	my $again = $node->safe_psql('loads', qq{
		SELECT status || ' ' || rows_read || ' ' || rows_loaded || ' ' || rows_rejected
		FROM customer_analytics.ingest_csv('customer_analytics.stg_orders', '$path')});
	is($again, "loaded $rows $rows 0", "$how during ingest_csv: loading the file again loads it");
	my $prefix = $file eq 'orders_a' ? 'A' : 'B';
	is($node->safe_psql('loads', qq{
		SELECT count(*) || ' ' || count(DISTINCT (order_id, line_number))
		FROM customer_analytics.stg_orders WHERE order_id LIKE '$prefix%'}),
		"$rows $rows", "$how during ingest_csv: every row of the file staged exactly once");
	is($node->safe_psql('loads', qq{
		SELECT count(*) FROM customer_analytics.ingest_load WHERE file = '$path' AND status = 'loaded'}),
		'1', "$how during ingest_csv: one load recorded for the file");
}

########################################################################
# 3, 4: transform()
########################################################################
# transform() writes the dimensions, the order lines, then the events (the
# bulk of its time): once it holds its lock on fact_event, it has written
# rows it has not committed
sub wait_writing_events
{
	my ($db, $what) = @_;
	wait_for($db, q{SELECT EXISTS (SELECT FROM pg_locks l JOIN pg_stat_activity a USING (pid)
	                               WHERE l.relation = 'customer_analytics.fact_event'::regclass
	                                 AND l.mode = 'RowExclusiveLock' AND l.granted AND a.state = 'active'
	                                 AND l.pid <> pg_backend_pid())}, $what);
}

# 3. the first transform of the shop
{
	my $t = start_background('warehouse', 'SELECT count(*) FROM customer_analytics.transform()');
	wait_writing_events('warehouse', 'sigkill during transform: it is writing the facts');
	crash_and_restart('sigkill', $t);
	is($t->{out}, '', 'sigkill during transform: the client got no result');
	is($node->safe_psql('warehouse', $facts_sql), '0',
		'sigkill during transform: no dimension or fact row was written');
	$node->safe_psql('warehouse', 'SELECT count(*) FROM customer_analytics.transform()');
	is($node->safe_psql('warehouse', $star_sql), $reference,
		'sigkill during transform: transform again gives the same star schema as a clean run');
}

# 4. a full refresh over the transformed shop
{
	my $t = start_background('warehouse', 'SELECT count(*) FROM customer_analytics.transform(full_refresh => true)');
	wait_writing_events('warehouse', 'immediate stop during transform: it is writing the facts');
	crash_and_restart('immediate', $t);
	is($t->{out}, '', 'immediate stop during transform: the client got no result');
	is($node->safe_psql('warehouse', $star_sql), $reference,
		'immediate stop during transform: the star schema is as before');
	$node->safe_psql('warehouse', 'SELECT count(*) FROM customer_analytics.transform(full_refresh => true)');
	is($node->safe_psql('warehouse', $star_sql), $reference,
		'immediate stop during transform: a new full refresh gives the clean run\'s star schema');
}

########################################################################
# 5, 6: CALL run_pipeline()
########################################################################
my %pipeline_fault = (pipe1 => 'sigkill', pipe2 => 'immediate');
foreach my $db ('pipe1', 'pipe2')
{
	my $how = $pipeline_fault{$db};
	my $p = start_background($db, 'CALL customer_analytics.run_pipeline()');
	wait_writing_events($db, "$how during run_pipeline: the run is in its transform step, writing the facts");
	crash_and_restart($how, $p);
	isnt($p->{err}, '', "$how during run_pipeline: the CALL did not return");
	is($node->safe_psql($db, 'SELECT string_agg(status, \',\') FROM customer_analytics.pipeline_run'),
		'running', "$how during run_pipeline: the interrupted run is left 'running'");
	is($node->safe_psql($db, q{SELECT string_agg(step || ':' || status, ',' ORDER BY step_no) FROM customer_analytics.pipeline_step}),
		'ingest:succeeded', "$how during run_pipeline: only the committed steps are recorded");
	is($node->safe_psql($db, $facts_sql), '0', "$how during run_pipeline: no dimension or fact row was written");

	$node->safe_psql($db, 'CALL customer_analytics.run_pipeline()');
	my $runs = $node->safe_psql($db, q{
		SELECT string_agg(run_id || ' ' || status || ' ' || COALESCE(error, ''), E'\n' ORDER BY run_id)
		FROM customer_analytics.pipeline_run});
	like($runs, qr/^1 failed interrupted[^\n]*\n\d+ succeeded $/,
		"$how during run_pipeline: the next run marks the interrupted one failed and succeeds");
	is($node->safe_psql($db, $star_sql), $reference,
		"$how during run_pipeline: the next run gives the clean run's star schema");
}

########################################################################
# 7: CALL run_pipeline() in its ingest step
########################################################################
{
	my $path = "$dir/landing/orders_c.csv";
	# a pipeline that only loads (the transform of a million order lines
	# is not what is under test here)
	$node->safe_psql('pipe3', qq{
		INSERT INTO customer_analytics.landing (target, directory) VALUES ('customer_analytics.stg_orders', '$dir/landing');
		UPDATE customer_analytics.pipeline_task SET enabled = false WHERE task <> 'ingest'});
	my $p = start_background('pipe3', 'CALL customer_analytics.run_pipeline()');
	wait_for('pipe3', q{SELECT EXISTS (SELECT FROM pg_stat_progress_copy WHERE tuples_processed >= 100000)},
		'sigkill during the pipeline\'s ingest step: the file is loading');
	my $progress = $node->safe_psql('pipe3', 'SELECT max(tuples_processed) FROM pg_stat_progress_copy');
	crash_and_restart('sigkill', $p);
	note "pipeline ingest: killed with $progress of $rows rows processed";
	cmp_ok($progress, '<', $rows, "sigkill during the pipeline's ingest step: killed before the end of the file");
	is($node->safe_psql('pipe3', q{SELECT count(*) FROM customer_analytics.stg_orders}), '0',
		"sigkill during the pipeline's ingest step: no row staged");
	is($node->safe_psql('pipe3', q{SELECT count(*) FROM customer_analytics.ingest_load}), '0',
		"sigkill during the pipeline's ingest step: no load recorded");
	is($node->safe_psql('pipe3', 'SELECT string_agg(status, \',\') FROM customer_analytics.pipeline_run'),
		'running', "sigkill during the pipeline's ingest step: the run is left 'running'");
	$node->safe_psql('pipe3', 'CALL customer_analytics.run_pipeline()');
	like($node->safe_psql('pipe3', q{
		SELECT string_agg(run_id || ' ' || status || ' ' || COALESCE(error, ''), E'\n' ORDER BY run_id)
		FROM customer_analytics.pipeline_run}),
		qr/^1 failed interrupted[^\n]*\n\d+ succeeded $/,
		"sigkill during the pipeline's ingest step: the next run marks the interrupted one failed and succeeds");
	is($node->safe_psql('pipe3', qq{
		SELECT string_agg(status || ' ' || rows_loaded, ',') FROM customer_analytics.ingest_load WHERE file = '$path'}),
		"loaded $rows", "sigkill during the pipeline's ingest step: the next run loads the file once");
	is($node->safe_psql('pipe3', q{
		SELECT count(*) || ' ' || count(DISTINCT (order_id, line_number)) FROM customer_analytics.stg_orders}),
		"$rows $rows", "sigkill during the pipeline's ingest step: every row of the file staged exactly once");
}

# the server is still healthy, and nothing but the injected faults happened
is($node->safe_psql('postgres', 'SELECT 1'), '1', 'the server is up');
my $log = slurp_file($node->logfile);
unlike($log, qr/PANIC|TRAP:|terminated by signal (?!9)/, 'no PANIC, assertion or unexpected signal in the log');
note "faults injected: $faults";
is($faults, 7, 'seven faults injected');

$node->stop;
done_testing();
