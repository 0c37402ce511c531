# Hostile files in a landing directory, where only a live process can
# make them: FIFOs with and without a writer (one fed slowly), a socket, a
# link swapped back and forth while loads run, a file truncated while it
# is read; and loads of a large file ended by statement_timeout,
# pg_cancel_backend and pg_terminate_backend.  ingest_directory over a
# folder holding all of them plus two good files loads the good ones and
# records every hostile entry as failed with its reason.
#
# Every wait is bounded: a psql that does not return within its timeout
# fails the test (before the fix, ingest_csv() on a FIFO without a writer
# blocked in open() for good, deaf to cancel and terminate).
#
# What cannot be made here: a file on a hung network mount.  A read() (or
# open(), or stat()) stuck in the kernel on a hard NFS mount waits in an
# uninterruptible sleep that no signal other than SIGKILL ends, whatever
# the reading code does; see the README's security section.
use strict;
use warnings;
use Fcntl qw(O_RDONLY O_RDWR O_WRONLY O_NONBLOCK);
use IO::Socket::UNIX;
use POSIX qw(mkfifo);
use Socket qw(SOCK_STREAM);
use Time::HiRes qw(time usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::RealBin/lib";
use CustomerAnalytics qw(new_node);

my $node = new_node('hostile_files');
$node->safe_psql('postgres', q{
	CREATE EXTENSION customer_analytics;
	CREATE TABLE public.hf (id integer PRIMARY KEY, name text NOT NULL);
	CREATE TABLE public.big (id integer, name text);
});

# the files, in a directory of the test (the server runs as this user)
# a short base path: a Unix socket's path must fit in 108 bytes, which a
# file below the node's data directory in a scratch copy may not
my $dir     = PostgreSQL::Test::Utils::tempdir_short() . '/files';
my $landing = "$dir/landing";
my $store   = "$dir/store";
mkdir $_ or die "mkdir $_: $!" foreach ($dir, $landing, $store, "$dir/bigdir");

sub write_file
{
	my ($path, $text) = @_;
	open my $fh, '>', $path or die "$path: $!";
	print $fh $text;
	close $fh;
}
write_file("$landing/good1.csv", "id,name\n1,one\n2,two\n");
write_file("$landing/good2.csv", "id,name\n3,three\n");
write_file("$store/four.csv",    "id,name\n4,four\n5,five\n");
$node->safe_psql('postgres', qq{
	COPY (SELECT g AS id, 'name ' || g AS name FROM generate_series(1, 20000000) g)
	TO '$dir/bigdir/big.csv' WITH (FORMAT csv, HEADER)});
my $allowed = "$landing, $store, $dir/bigdir";
my $confine = "SET customer_analytics.ingest_allowed_directories = '$allowed';";

# Run one statement with a bound: returns (SQLSTATE or 'ok', seconds, stderr).
sub run_bounded
{
	my ($sql, $bound) = @_;
	my ($out, $err, $timed_out) = ('', '', 0);
	my $t0 = time;
	$node->psql('postgres', "\\set VERBOSITY verbose\n$sql",
		stdout => \$out, stderr => \$err, timeout => $bound, timed_out => \$timed_out);
	my $secs = time - $t0;
	return ('timed out', $secs, $err) if $timed_out;
	return ($err =~ /ERROR:  ([0-9A-Z]{5}):/ ? $1 : 'ok', $secs, $err . $out);
}

sub ingest
{
	my ($path, $extra) = @_;
	$extra //= '';
	return "$confine $extra SELECT status FROM customer_analytics.ingest_csv('public.hf', '$path', force => true);";
}

########################################################################
# FIFOs, with and without a writer, and a socket: refused at once
########################################################################
mkfifo("$landing/fifo.csv", 0600) or die "mkfifo: $!";
my ($state, $secs, $msg) = run_bounded(ingest("$landing/fifo.csv", "SET statement_timeout = '5s';"), 30);
is($state, '42809', 'a FIFO without a writer is refused (it used to block open() for good)');
like($msg, qr/is a FIFO \(named pipe\), not a regular file/, '... naming the file type');
cmp_ok($secs, '<', 5, sprintf('... at once, before statement_timeout (%.3f s)', $secs));
# a backend stuck in open() (the bug) is released by a writer, so that the
# test can go on and stop the server
if ($state eq 'timed out' && sysopen(my $release, "$landing/fifo.csv", O_WRONLY | O_NONBLOCK))
{
	close $release;
}

# a writer that feeds the FIFO one line every 0.2 s, for at most 30 s
mkfifo("$landing/slow.csv", 0600) or die "mkfifo: $!";
my $writer = fork() // die "fork: $!";
if ($writer == 0)
{
	$SIG{TERM} = $SIG{INT} = 'DEFAULT';    # see the link flipper below
	$SIG{PIPE} = 'IGNORE';
	sysopen(my $w, "$landing/slow.csv", O_RDWR) or POSIX::_exit(1);
	syswrite($w, "id,name\n");
	for my $i (1 .. 150)
	{
		syswrite($w, "$i,slow\n");
		usleep(200_000);
	}
	POSIX::_exit(0);
}
($state, $secs, $msg) = run_bounded(ingest("$landing/slow.csv", "SET statement_timeout = '2s';"), 30);
is($state, '42809', 'a FIFO fed slowly by a writer is refused too');
cmp_ok($secs, '<', 2, sprintf('... at once: statement_timeout did not have to end it (%.3f s)', $secs));

my $socket = IO::Socket::UNIX->new(Type => SOCK_STREAM, Local => "$landing/sock.csv", Listen => 1)
  or die "socket: $!";
($state, $secs, $msg) = run_bounded(ingest("$landing/sock.csv"), 30);
is($state, '42809', 'a socket is refused');
like($msg, qr/is a socket, not a regular file/, '... naming the file type');

########################################################################
# A link swapped back and forth while loads run: each load reads the file
# inside or is refused, never /etc/passwd
########################################################################
symlink("$store/four.csv", "$landing/swap.csv") or die "symlink: $!";
my $flipper = fork() // die "fork: $!";
if ($flipper == 0)
{
	# the test modules' handlers die on TERM, and dying runs their END
	# blocks, which would stop the node from this child: just end
	$SIG{TERM} = $SIG{INT} = 'DEFAULT';
	my $deadline = time + 60;
	my $i = 0;
	while (time < $deadline && getppid() > 1)
	{
		my $target = ($i++ % 2) ? '/etc/passwd' : "$store/four.csv";
		symlink($target, "$landing/swap.tmp") or next;
		rename("$landing/swap.tmp", "$landing/swap.csv");
	}
	POSIX::_exit(0);
}
my ($swap_out, $swap_err, $swap_timed_out) = ('', '', 0);
$node->psql('postgres', qq{
	$confine
	DO \$\$
	DECLARE ok int := 0; refused int := 0; other int := 0;
	BEGIN
	    FOR i IN 1 .. 300 LOOP
	        BEGIN
	            PERFORM customer_analytics.ingest_csv('public.hf', '$landing/swap.csv', force => true);
	            ok := ok + 1;
	        EXCEPTION WHEN insufficient_privilege THEN refused := refused + 1;
	                  WHEN OTHERS THEN other := other + 1;
	        END;
	        TRUNCATE public.hf;
	    END LOOP;
	    RAISE NOTICE 'swap: % loaded, % refused, % other', ok, refused, other;
	END
	\$\$;
	SELECT count(*) FROM customer_analytics.ingest_reject WHERE raw_line LIKE 'root:%'},
	stdout => \$swap_out, stderr => \$swap_err, timeout => 120, timed_out => \$swap_timed_out);
kill 'TERM', $flipper;
waitpid($flipper, 0);
ok(!$swap_timed_out, 'the loads of a link being swapped finished');
my ($swap_ok, $swap_refused, $swap_other) = $swap_err =~ /swap: (\d+) loaded, (\d+) refused, (\d+) other/;
note "link swapped during 300 loads: $swap_ok loaded, $swap_refused refused (42501), $swap_other other errors";
is($swap_ok + $swap_refused + $swap_other, 300, 'every load returned');
is($swap_out, '0', 'no line of /etc/passwd ever reached ingest_reject');
cmp_ok($swap_refused, '>', 0, 'some loads opened the link to /etc/passwd and refused it');
is($node->safe_psql('postgres', q{SELECT count(*) FROM customer_analytics.ingest_load
                                 WHERE status = 'loaded' AND file LIKE '%swap.csv' AND rows_loaded <> 2}),
	'0', 'every load that went through read the two rows of the file inside');
unlink "$landing/swap.csv", "$landing/swap.tmp";
$node->safe_psql('postgres', 'TRUNCATE public.hf, customer_analytics.ingest_load, customer_analytics.ingest_reject');

########################################################################
# Loads of a large file ended by statement_timeout, cancel and terminate:
# within a second, leaving no staged row
########################################################################
my $big = "$dir/bigdir/big.csv";

# A load in a psql of its own; returns the session once the load is
# reading (pg_stat_progress_copy shows rows).
sub start_load
{
	my ($sql) = @_;
	my %s = (out => '', err => '');
	$s{handle} = IPC::Run::start(
		[ $node->installed_command('psql'), '-XAtq', '-v', 'ON_ERROR_STOP=1', '-v', 'VERBOSITY=verbose',
		  '-d', $node->connstr('postgres'), '-c', $sql ],
		'>', \$s{out}, '2>', \$s{err}, IPC::Run::timeout(120));
	return \%s;
}

sub wait_reading
{
	my $pid;
	for (1 .. 600)
	{
		$pid = $node->safe_psql('postgres',
			'SELECT pid FROM pg_stat_progress_copy WHERE tuples_processed > 0 LIMIT 1');
		last if $pid ne '';
		usleep(50_000);
	}
	return $pid;
}

# wait (bounded) for a session's psql to end; returns the seconds waited
sub wait_end
{
	my ($s) = @_;
	my $t0 = time;
	while ($s->{handle}->pumpable && time - $t0 < 60)
	{
		$s->{handle}->pump_nb;
		usleep(10_000);
	}
	my $waited = time - $t0;
	eval { $s->{handle}->finish; };
	return $waited;
}

my $staged = q{SELECT count(*) FROM public.big};

my $load = start_load("SET statement_timeout = '1s'; SELECT status FROM customer_analytics.ingest_csv('public.big', '$big')");
my $t0 = time;
wait_end($load);
my $elapsed = time - $t0;
like($load->{err}, qr/57014/, 'statement_timeout ends a load of a large file');
cmp_ok($elapsed, '<', 2, sprintf('... within a second of the timeout (%.3f s for a 1 s timeout)', $elapsed));
is($node->safe_psql('postgres', $staged), '0', '... and leaves no staged row');

$load = start_load("SELECT status FROM customer_analytics.ingest_csv('public.big', '$big')");
my $pid = wait_reading();
isnt($pid, '', 'a load of the large file is reading');
$node->safe_psql('postgres', "SELECT pg_cancel_backend($pid)");
my $waited = wait_end($load);
like($load->{err}, qr/57014/, 'pg_cancel_backend ends the load');
cmp_ok($waited, '<', 1, sprintf('... within a second (%.3f s)', $waited));
is($node->safe_psql('postgres', $staged), '0', '... and leaves no staged row');

# the pipeline's way in: ingest_directory, terminated
my $start_time = $node->safe_psql('postgres', 'SELECT pg_postmaster_start_time()');
$load = start_load("SELECT status FROM customer_analytics.ingest_directory('public.big', '$dir/bigdir')");
$pid = wait_reading();
isnt($pid, '', 'ingest_directory is reading the large file');
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
$t0 = time;
my $gone = 0;
for (1 .. 600)
{
	$gone = $node->safe_psql('postgres', "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $pid)") eq 't';
	last if $gone;
	usleep(10_000);
}
$waited = time - $t0;
wait_end($load);
ok($gone, 'pg_terminate_backend ends ingest_directory');
cmp_ok($waited, '<', 1, sprintf('... within a second (%.3f s)', $waited));
is($node->safe_psql('postgres', $staged), '0', '... and leaves no staged row');
is($node->safe_psql('postgres', 'SELECT pg_postmaster_start_time()'), $start_time, '... without a server restart');

# a file truncated while it is read: an error, not a wait for bytes that
# will never come
system('cp', $big, "$dir/bigdir/shrinking.csv") == 0 or die "cp: $!";
$load = start_load("SELECT status FROM customer_analytics.ingest_csv('public.big', '$dir/bigdir/shrinking.csv')");
$pid = wait_reading();
truncate("$dir/bigdir/shrinking.csv", 1000) or die "truncate: $!";
wait_end($load);
like($load->{err}, qr/55000: file ".*shrinking\.csv" shrank while it was being read/,
	'a file truncated during the load is an error');
is($node->safe_psql('postgres', $staged), '0', '... and leaves no staged row');
unlink "$dir/bigdir/shrinking.csv";

########################################################################
# ingest_directory over a folder with all of them plus two good files
########################################################################
symlink("$store/four.csv", "$landing/inside.csv") or die;
symlink('/etc/passwd',     "$landing/outside.csv") or die;
symlink('/dev/null',       "$landing/null.csv") or die;
symlink('missing.csv',     "$landing/dangling.csv") or die;
mkdir "$landing/dir.csv" or die;
my ($dir_out, $dir_err, $dir_timed_out) = ('', '', 0);
$node->psql('postgres', qq{
	$confine
	SELECT regexp_replace(file, '.*/', '') || ' ' || status || ' ' || rows_loaded
	FROM customer_analytics.ingest_directory('public.hf', '$landing') ORDER BY file},
	stdout => \$dir_out, stderr => \$dir_err, timeout => 60, timed_out => \$dir_timed_out);
ok(!$dir_timed_out, 'ingest_directory over the hostile folder returns');
is($dir_out, join("\n",
		'dangling.csv failed 0', 'dir.csv failed 0', 'fifo.csv failed 0', 'good1.csv loaded 2',
		'good2.csv loaded 1', 'inside.csv loaded 2', 'null.csv failed 0', 'outside.csv failed 0',
		'slow.csv failed 0', 'sock.csv failed 0'),
	'the good files and the link inside load, every hostile entry failed');
my @warnings = $dir_err =~ /WARNING:  could not load/g;
is(scalar @warnings, 7, 'one WARNING per hostile entry');
my %reason = (
	'dangling.csv' => qr/No such file or directory \[SQLSTATE 58P01\]/,
	'dir.csv'      => qr/is a directory, not a regular file \[SQLSTATE 42809\]/,
	'fifo.csv'     => qr/is a FIFO \(named pipe\), not a regular file \[SQLSTATE 42809\]/,
	'slow.csv'     => qr/is a FIFO \(named pipe\), not a regular file \[SQLSTATE 42809\]/,
	'sock.csv'     => qr/is a socket, not a regular file \[SQLSTATE 42809\]/,
	'null.csv'     => qr/leads to "\/dev\/null", outside the directories ingestion may read \[SQLSTATE 42501\]/,
	'outside.csv'  => qr/leads to "\/etc\/passwd", outside the directories ingestion may read \[SQLSTATE 42501\]/);
foreach my $f (sort keys %reason)
{
	like($node->safe_psql('postgres', qq{SELECT message FROM customer_analytics.ingest_load
	                                    WHERE status = 'failed' AND file = '$landing/$f'}),
		$reason{$f}, "$f: its ingest_load row says why");
}
is($node->safe_psql('postgres', 'SELECT string_agg(id::text, \',\' ORDER BY id) FROM public.hf'), '1,2,3,4,5',
	'the rows of the good files are staged');

kill 'TERM', $writer;
waitpid($writer, 0);
close $socket;

########################################################################
# generate_sample_data() never writes into a FIFO, even one with a reader
########################################################################
my $gen = "$dir/gen";
$node->safe_psql('postgres', qq{SELECT count(*) FROM customer_analytics.generate_sample_data(
	customers => 20, days => 3, events => false, defects => false, directory => '$gen')});
opendir my $dh, "$gen/customers" or die;
my ($first) = sort grep { /\.csv$/ } readdir $dh;
closedir $dh;
unlink "$gen/customers/$first";
mkfifo("$gen/customers/$first", 0600) or die "mkfifo: $!";
sysopen(my $reader, "$gen/customers/$first", O_RDONLY | O_NONBLOCK) or die "open fifo: $!";
($state, $secs, $msg) = run_bounded(qq{SELECT count(*) FROM customer_analytics.generate_sample_data(
	customers => 20, days => 3, events => false, directory => '$gen')}, 30);
is($state, '42809', 'generate_sample_data() refuses a FIFO that has a reader');
my $got = sysread($reader, my $buf, 4096);
ok(!$got, 'nothing was written into it');
close $reader;

$node->stop;
done_testing();
