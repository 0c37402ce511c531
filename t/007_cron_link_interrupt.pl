# The loopback connection to pg_cron's database can be interrupted.  A
# server that accepts the connection and never answers (a TCP listener
# started here, which never calls accept()) and a remote statement that
# does not end are ended by statement_timeout and by pg_cancel_backend();
# the error names the statement in its context, and the session goes on.
# With libpq's blocking calls both waits were beyond reach of either.
use strict;
use warnings;
use IO::Socket::INET;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::RealBin/lib";
use CustomerAnalytics qw(new_node);

my $node = new_node('cron_link', cron_database => 'postgres', background_workers => 0);
$node->safe_psql('postgres', 'CREATE DATABASE warehouse');
$node->safe_psql('warehouse', 'CREATE EXTENSION customer_analytics');

# the kernel completes the TCP handshake for the listen queue; libpq then
# waits for an answer to its startup packet that never comes
my $silent = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 8, Proto => 'tcp')
  or die "could not listen on 127.0.0.1: $!";
my $port = $silent->sockport;
my $silent_conninfo = "host=127.0.0.1 port=$port dbname=postgres sslmode=disable";

# 1. statement_timeout ends a connection attempt that hangs
my $timed_out = 0;
my ($rc, $out, $err) = $node->psql('warehouse', qq{
    SET customer_analytics.cron_conninfo = '$silent_conninfo';
    SET statement_timeout = '1s';
    SELECT customer_analytics.schedule_pipeline('* * * * *');},
    timeout => 120, timed_out => \$timed_out);
ok(!$timed_out, 'a scheduling call whose connection hangs returns');
like($err, qr/canceling statement due to statement timeout/, 'ended by statement_timeout');
like($err, qr/statement in pg_cron's database "postgres": SELECT cron\.schedule_in_database\('customer_analytics warehouse all'/,
    'the context names the statement');

# 2. pg_cancel_backend() ends it too, and the session is usable afterwards
my $bg = $node->background_psql('warehouse', on_error_stop => 0);
$bg->query_until(qr/started/, qq{
    SET customer_analytics.cron_conninfo = '$silent_conninfo';
    \\echo started
    SELECT * FROM customer_analytics.pipeline_jobs();
});
ok($node->poll_query_until('warehouse', q{
    SELECT count(*) = 1 FROM pg_stat_activity
    WHERE query LIKE '%pipeline_jobs()%' AND wait_event_type = 'Extension' AND pid <> pg_backend_pid()}),
    'the call waits on its latch and socket');
$node->safe_psql('warehouse', q{
    SELECT pg_cancel_backend(pid) FROM pg_stat_activity
    WHERE query LIKE '%pipeline_jobs()%' AND wait_event_type = 'Extension' AND pid <> pg_backend_pid()});
is($bg->query('SELECT 42'), '42', 'the cancelled session goes on');
like($bg->{stderr}, qr/canceling statement due to user request/, 'ended by a cancel');

# 3. a remote statement that does not end: the wait for its result is
# interruptible as well (through the usual loopback: Unix socket, database
# postgres)
$bg->query_until(qr/started/, q{
    RESET customer_analytics.cron_conninfo;
    SET statement_timeout = '1s';
    \echo started
    SELECT count(*) FROM customer_analytics.cron_remote_query('SELECT pg_sleep(3600)');
});
is($bg->query('RESET statement_timeout; SELECT 43'), '43', 'the session goes on after the remote statement');
like($bg->{stderr}, qr/canceling statement due to statement timeout/, 'a hanging remote statement is ended');
like($bg->{stderr}, qr/statement in pg_cron's database "postgres": SELECT pg_sleep\(3600\)/,
    'its context names the remote statement');
$bg->quit;

# the remote backend sleeps on until it next reads its closed socket
$node->safe_psql('postgres', q{
    SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'customer_analytics'});

# remote errors: the remote text in the detail, SQLSTATE kept, statement in the context
($rc, $out, $err) = $node->psql('warehouse', q{
    \set VERBOSITY verbose
    SELECT * FROM customer_analytics.cron_remote_query('SELECT 1/0')});
like($err, qr/ERROR:  22012: could not run a statement in pg_cron's database "postgres"/, 'remote SQLSTATE, our message');
like($err, qr/DETAIL:  division by zero/, 'the remote message in the detail');
like($err, qr/CONTEXT:  statement in pg_cron's database "postgres": SELECT 1\/0/, 'the statement in the context');

close($silent);
$node->stop;
done_testing();
