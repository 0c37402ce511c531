# pg_upgrade from the oldest supported major to the newest (15 to 18 on
# the test machine): a cluster with the extension, pg_cron, a loaded sample
# shop, a user's check and task, a user's materialized view and a pg_cron
# schedule comes out of pg_upgrade with every user-data table unchanged
# (checksums, our fixed-size types included), ALTER EXTENSION ... UPDATE
# has nothing to do, the pipeline runs, and pg_cron runs the schedule.
#
# It needs both installations, with customer_analytics and pg_cron in
# each: scripts/test.sh passes their bindirs in CA_UPGRADE_OLD_BINDIR and
# CA_UPGRADE_NEW_BINDIR when it has set up two majors; otherwise it skips.
use strict;
use warnings;
use File::Basename qw(dirname);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::RealBin/lib";
use CustomerAnalytics qw(new_node cron_conf checksums);

my ($old_bindir, $new_bindir) = @ENV{qw(CA_UPGRADE_OLD_BINDIR CA_UPGRADE_NEW_BINDIR)};
plan skip_all => 'needs two installations (CA_UPGRADE_OLD_BINDIR, CA_UPGRADE_NEW_BINDIR: '
  . 'scripts/test.sh sets them when it runs on both 15 and 18)'
  unless $old_bindir && $new_bindir && -x "$old_bindir/pg_upgrade" && -x "$new_bindir/pg_upgrade";

# pg_cron serves the warehouse database itself, as in most installations.
my $old = new_node('old', install_path => dirname($old_bindir), cron_database => 'warehouse');
my $new = PostgreSQL::Test::Cluster->new('new', install_path => dirname($new_bindir));
$old->safe_psql('warehouse', q{
    CREATE EXTENSION customer_analytics;
    SELECT count(*) FROM customer_analytics.generate_sample_data(customers => 400, days => 60, seed => 5);
    SELECT count(*) FROM customer_analytics.transform();
    SELECT count(*) FROM customer_analytics.refresh_clickstream();
    SELECT count(*) FROM customer_analytics.ingest_csv_text('customer_analytics.stg_orders',
        E'order_id,line_number,customer_id,product_id,order_ts,quantity,unit_price\n'
        'PU-1,1,C0000001,P00001,2025-01-10 10:00+00,1,5.00\nPU-2,1,C0000001,P00001,not a time,1,5.00\n');
    INSERT INTO customer_analytics.pipeline_task (task, command, depends_on)
    VALUES ('count lines', 'SELECT count(*) FROM customer_analytics.fact_order_line', '{transform}');
    INSERT INTO customer_analytics.quality_check (name, kind, target, column_name, params)
    VALUES ('known channels', 'accepted_values', 'customer_analytics.fact_order_line', 'channel',
            '{"values": ["web", "mobile_app", "marketplace"]}');
    -- a user's rollup of our fixed-size types (the states of rfm_agg and
    -- stats_agg) and a stored model: their bytes cross pg_upgrade as they
    -- are, to be read by the other major's build of the same C structs
    CREATE AGGREGATE public.rfm_partial(timestamptz, numeric) (
        SFUNC = customer_analytics.rfm_agg_sfunc, STYPE = customer_analytics.rfm_state,
        COMBINEFUNC = customer_analytics.rfm_agg_combine, PARALLEL = SAFE);
    CREATE TABLE public.customer_states AS
    SELECT f.customer_key, public.rfm_partial(d.date::timestamptz, f.revenue) AS rfm,
           customer_analytics.stats_agg(f.revenue::float8) AS stats
    FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_date d USING (date_key)
    GROUP BY f.customer_key;
    CREATE TABLE public.models AS
    SELECT customer_analytics.holt_winters(d::date, 100 + 10 * extract(dow FROM d)::float8 + extract(day FROM d)::float8, 7) AS model
    FROM generate_series('2025-01-01'::date, '2025-03-31', '1 day') d;
    CREATE MATERIALIZED VIEW public.category_revenue AS
    SELECT p.category, sum(f.revenue) AS revenue, count(*) AS lines
    FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_product p USING (product_key)
    GROUP BY 1;
    CALL customer_analytics.run_pipeline();
});
is($old->safe_psql('warehouse', q{SELECT status FROM customer_analytics.pipeline_run ORDER BY run_id DESC LIMIT 1}),
    'succeeded', 'old cluster: the pipeline ran');
cmp_ok($old->safe_psql('warehouse', q{SELECT customer_analytics.schedule_pipeline('* * * * *')}), '>', 0,
    'old cluster: the pipeline is scheduled with pg_cron, every minute');

# Every table and materialized view of the schema and the user's, by row
# count and checksum of their text form (which our types' output functions
# produce from their stored bytes), and pg_cron's jobs.
my @rels = split /\n/, $old->safe_psql('warehouse', q{
    SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname IN ('customer_analytics', 'public') AND c.relkind IN ('r', 'm')
    UNION ALL SELECT 'cron.job'
    ORDER BY 1});
sub warehouse_checksums
{
	my ($node) = @_;
	return checksums($node, 'warehouse', \@rels,
		rows => { 'cron.job' => 'row(t.jobid, t.schedule, t.command, t.database, t.jobname)::text' });
}

# The columns of our own base types in stored relations: the test must
# cover them (their layout is the point of the checksums above).
my $own_type_columns = $old->safe_psql('warehouse', q{
    SELECT string_agg(DISTINCT format_type(a.atttypid, a.atttypmod), ' ' ORDER BY format_type(a.atttypid, a.atttypmod))
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_type t ON t.oid = a.atttypid
    WHERE c.relkind IN ('r', 'm') AND a.attnum > 0 AND NOT a.attisdropped
      AND t.typtype = 'b' AND t.typnamespace = 'customer_analytics'::regnamespace});
like($own_type_columns, qr/rfm_state.*stats/, "stored relations hold our fixed-size types ($own_type_columns)");

# pg_cron would start the scheduled run at the next minute; the checksums
# are taken, and pg_upgrade run, without it preloaded so that nothing moves
# in between (the job stays in cron.job).
$old->adjust_conf('postgresql.conf', 'shared_preload_libraries', "''");
$old->restart;
my $before = warehouse_checksums($old);
like($before, qr/^customer_analytics\.fact_order_line [1-9]\d* /m, 'old cluster has order lines');
like($before, qr/^public\.customer_states [1-9]\d* /m, "old cluster has the user's table of rfm_state and stats");
like($before, qr/^cron\.job 1 /m, 'old cluster has the schedule');
# what the functions make of the stored states and the model
my $states_sql = q{
    SELECT md5(string_agg(concat_ws(' ', customer_key, customer_analytics.rfm_state_summary(rfm),
                                    customer_analytics.stats_count(stats), customer_analytics.stats_mean(stats),
                                    customer_analytics.stats_stddev(stats)), ',' ORDER BY customer_key))
    || ' ' || (SELECT md5(string_agg(f::text, ',' ORDER BY f.ts)) FROM public.models m,
               customer_analytics.forecast(m.model, 14) f)
    FROM public.customer_states};
my $states_before = $old->safe_psql('warehouse', $states_sql);
my $ext_before = $old->safe_psql('warehouse', q{SELECT extversion FROM pg_extension WHERE extname = 'customer_analytics'});

# Debian's 15.20 (a back-branch security fix) records a version in every
# column's attoptions as "pg_attver=..."; 18's pg_dump, which pg_upgrade
# runs, copies it into ALTER TABLE ... SET (pg_attver=...), which 18
# refuses ("unrecognized parameter"): pg_upgrade fails for any database
# with a table.  15 ignores RESET of it, so the step the README gives
# removes it from the catalog, which leaves the columns as those of a
# cluster made before 15.20 (versionless, which 15.20 reads as well).
like($old->safe_psql('warehouse', q{
    SELECT string_agg(DISTINCT split_part(o, '=', 1), ',') FROM pg_attribute a, unnest(a.attoptions) o
    WHERE a.attrelid = 'customer_analytics.fact_order_line'::regclass}), qr/^(pg_attver)?$/,
    'the old cluster has no attoptions but perhaps pg_attver');
my $strip_attver = PostgreSQL::Test::Utils::slurp_file("$FindBin::RealBin/../scripts/pg_upgrade_from_15.sql");
foreach my $db (split /\n/, $old->safe_psql('postgres', 'SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1'))
{
	$old->safe_psql($db, $strip_attver);
}
is($old->safe_psql('warehouse', q{SELECT count(*) FROM pg_attribute a, unnest(a.attoptions) o WHERE o LIKE 'pg_attver=%' AND a.attrelid >= 16384}),
    '0', 'the old cluster has no pg_attver left on its own relations');
$old->stop;

# The new cluster: no data checksums (initdb of 18 enables them by default,
# 15's did not, and pg_upgrade requires the same), pg_cron preloaded.
$new->init(extra => [ '--no-data-checksums', '--encoding=' . 'UTF8', '--locale=C' ]);
$new->append_conf('postgresql.conf', cron_conf('warehouse'));

my $work = PostgreSQL::Test::Utils::tempdir;
my @cmd = ("$new_bindir/pg_upgrade", '--no-sync', '--copy',
	'-d', $old->data_dir, '-D', $new->data_dir, '-b', $old_bindir, '-B', $new_bindir,
	'-s', $work, '-p', $old->port, '-P', $new->port);
{
	# pg_upgrade writes its reports under the new data directory; from 15
	# on, but an older pg_upgrade writes to the current one
	chdir $work or die "chdir $work: $!";
	my ($stdout, $stderr);
	my $ok = IPC::Run::run(\@cmd, '>', \$stdout, '2>', \$stderr);
	ok($ok, 'pg_upgrade from ' . `$old_bindir/postgres --version` =~ s/\s+$//r
		  . ' to ' . `$new_bindir/postgres --version` =~ s/\s+$//r)
	  or diag("stdout:\n$stdout\nstderr:\n$stderr\n"
		  . join('', map { "--- $_\n" . PostgreSQL::Test::Utils::slurp_file($_) }
			  glob($new->data_dir . '/pg_upgrade_output.d/*/log/*.log')));
}
$new->start;

is(warehouse_checksums($new), $before, 'every table and materialized view has the same rows after pg_upgrade (our types read back the same)');
is($new->safe_psql('warehouse', q{SELECT extversion FROM pg_extension WHERE extname = 'customer_analytics'}),
    $ext_before, 'the extension keeps its version');

# ALTER EXTENSION ... UPDATE has nothing to do (same version); pg_cron's is
# brought to the new build's version, as its upgrade notes ask.
my ($rc, $stdout, $stderr) = $new->psql('warehouse', 'ALTER EXTENSION customer_analytics UPDATE');
is($rc, 0, 'ALTER EXTENSION customer_analytics UPDATE succeeds');
like($stderr, qr/version "\Q$ext_before\E" of extension "customer_analytics" is already installed/, 'and has nothing to do (same version)');
$new->safe_psql('warehouse', 'ALTER EXTENSION pg_cron UPDATE');

# The upgraded database keeps working: a load, the pipeline over it.
# (the pre-upgrade schedule may start a run at the same minute: ours is then
# skipped, one run per scope, and is called again)
$new->safe_psql('warehouse', q{
    SELECT count(*) FROM customer_analytics.generate_sample_data(customers => 400, days => 65, seed => 5);
});
my ($run_status, $our_run);
for my $attempt (1 .. 10)
{
	($run_status, $our_run) = split /\|/, $new->safe_psql('warehouse', q{
    CALL customer_analytics.run_pipeline();
    SELECT r.status || ' ' || (SELECT count(*) FROM customer_analytics.pipeline_step s
                              WHERE s.run_id = r.run_id AND s.status NOT IN ('succeeded', 'skipped')),
           r.run_id
    FROM customer_analytics.pipeline_run r WHERE r.backend_pid = pg_backend_pid()
    ORDER BY r.run_id DESC LIMIT 1});
	last unless $run_status =~ /^skipped /;
	sleep 2;
}
is($run_status, 'succeeded 0', 'run_pipeline() succeeds after pg_upgrade, every step');
# (a scheduled run may have run it too)
is($new->safe_psql('warehouse', qq{
    SELECT bool_or(r.started_at < pg_postmaster_start_time()) AND bool_or(r.run_id = $our_run)
    FROM customer_analytics.pipeline_step s JOIN customer_analytics.pipeline_run r USING (run_id)
    WHERE s.step = 'count lines' AND s.status = 'succeeded'}), 't',
    "the user's task ran before and after");
is($new->safe_psql('warehouse', q{
    SELECT (SELECT count(*) FROM customer_analytics.fact_order_line)
         = (SELECT count(*) FROM (SELECT DISTINCT order_id, line_number FROM customer_analytics.stg_orders
                                  WHERE order_ts IS NOT NULL) s)}),
    't', 'every staged order line (before and after the upgrade) is in the facts once');
is($new->safe_psql('warehouse', $states_sql), $states_before,
    'the functions of the new build read the stored rfm_state, stats and hw_model values as the old one did');

# The schedule made before the upgrade still runs: pg_cron starts it at
# the next minute.
my $started = $new->safe_psql('warehouse', 'SELECT max(run_id) FROM customer_analytics.pipeline_run');
my $cron_run = '';
foreach my $i (1 .. 150)
{
	$cron_run = $new->safe_psql('warehouse', qq{
		SELECT status || ' ' || triggered_by FROM customer_analytics.pipeline_run
		WHERE run_id > $started AND status <> 'running' ORDER BY run_id LIMIT 1});
	last if $cron_run ne '';
	sleep 1;
}
is($cron_run, 'succeeded pg_cron', "pg_cron runs the pre-upgrade schedule, and the run succeeds");
is($new->safe_psql('warehouse', q{
    SELECT count(*) > 0 FROM cron.job_run_details WHERE status = 'succeeded'}), 't',
    'pg_cron records the run');
ok($new->safe_psql('warehouse', q{SELECT customer_analytics.unschedule_pipeline()}) eq 't', 'unscheduled');

$new->stop;
done_testing();
