# Without pg_cron: CREATE EXTENSION works, the pipeline runs (its purge
# step does not need pg_cron), and only the scheduling functions fail, with
# a hint naming what to add to postgresql.conf.  Also pg_cron preloaded for
# another database where its extension was never created: the pipeline
# still succeeds (the purge warns) and scheduling fails with the statement
# to run by hand.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::RealBin/lib";
use CustomerAnalytics qw(new_node cron_conf);

my $node = new_node('no_cron');
$node->safe_psql('postgres', 'CREATE DATABASE warehouse');
$node->safe_psql('warehouse', q{
    CREATE EXTENSION customer_analytics;
    SELECT count(*) FROM customer_analytics.generate_sample_data(customers => 100, days => 30, seed => 3);
    CALL customer_analytics.run_pipeline();
});
is($node->safe_psql('warehouse', q{SELECT customer_analytics.pg_cron_location()}), 'not loaded',
    'pg_cron is not loaded');
is($node->safe_psql('warehouse', q{
    SELECT r.status || ' ' || (SELECT count(*) FROM customer_analytics.pipeline_step s
                              WHERE s.run_id = r.run_id AND s.status NOT IN ('succeeded', 'skipped'))
    FROM customer_analytics.pipeline_run r ORDER BY r.run_id DESC LIMIT 1}),
    'succeeded 0', 'the pipeline runs without pg_cron');
is($node->safe_psql('warehouse', q{SELECT scope, last_status, schedule IS NULL FROM customer_analytics.pipeline_status WHERE scope = 'all'}),
    'all|succeeded|t', 'pipeline_status works, with no schedule');

my ($rc, $out, $err) = $node->psql('warehouse',
    q{\set VERBOSITY verbose
      SELECT customer_analytics.schedule_pipeline()});
isnt($rc, 0, 'schedule_pipeline fails without pg_cron');
like($err, qr/pg_cron is not loaded in this server/, 'the error says pg_cron is not loaded');
like($err, qr/55000/, 'SQLSTATE object_not_in_prerequisite_state');
like($err, qr/shared_preload_libraries = 'pg_cron'.*cron\.database_name/s,
    'the hint names the postgresql.conf lines');

# pg_cron preloaded, serving database "postgres" where its extension was never created
$node->append_conf('postgresql.conf', cron_conf('postgres', background_workers => 0));
$node->restart;
is($node->safe_psql('warehouse', q{SELECT customer_analytics.pg_cron_location()}), 'database postgres',
    'pg_cron serves another database');
($rc, $out, $err) = $node->psql('warehouse', q{CALL customer_analytics.run_pipeline()});
is($rc, 0, 'the pipeline runs');
like($err, qr/pg_cron's run details were not purged/, 'its purge step warns about pg_cron');
is($node->safe_psql('warehouse', q{SELECT status FROM customer_analytics.pipeline_run ORDER BY run_id DESC LIMIT 1}),
    'succeeded', 'and the run succeeds');
($rc, $out, $err) = $node->psql('warehouse', q{SELECT customer_analytics.schedule_pipeline('0 3 * * *')});
isnt($rc, 0, 'scheduling fails while pg_cron has no extension in its database');
like($err, qr/cron\.schedule_in_database/, 'the error names the statement pg_cron needs');

$node->stop;
done_testing();
