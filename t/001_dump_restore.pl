# pg_dump / pg_restore of a database with loaded data keeps every row of
# every user-data table (checksums per table), the users' pipeline tasks,
# checks, views and grants, and the restored database keeps working: its
# derived tables are rebuilt the same, the pipeline runs, and it can be
# scheduled with pg_cron and run by it.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::RealBin/lib";
use CustomerAnalytics qw(new_node checksums);

my $node = new_node('dump', cron_database => 'postgres');

$node->safe_psql('postgres', 'CREATE DATABASE warehouse');
$node->safe_psql('warehouse', q{
    CREATE EXTENSION customer_analytics;
    SELECT count(*) FROM customer_analytics.generate_sample_data(customers => 400, days => 60, seed => 5);
    SELECT count(*) FROM customer_analytics.transform();
    SELECT count(*) FROM customer_analytics.refresh_clickstream();
    -- what users add: a task, a check, a view of their own on the star
    -- schema (the pipeline refreshes it), an analyst role
    INSERT INTO customer_analytics.pipeline_task (task, command, depends_on)
    VALUES ('count lines', 'SELECT count(*) FROM customer_analytics.fact_order_line', '{transform}');
    INSERT INTO customer_analytics.quality_check (name, kind, target, column_name, params)
    VALUES ('known channels', 'accepted_values', 'customer_analytics.fact_order_line', 'channel',
            '{"values": ["web", "mobile_app", "marketplace"]}');
    CREATE MATERIALIZED VIEW public.category_revenue AS
    SELECT p.category, sum(f.revenue) AS revenue, count(*) AS lines
    FROM customer_analytics.fact_order_line f JOIN customer_analytics.dim_product p USING (product_key)
    GROUP BY 1;
    CREATE UNIQUE INDEX ON public.category_revenue (category);
    CREATE ROLE wh_analyst;
    SELECT count(*) FROM customer_analytics.grant_analyst('wh_analyst', raw_rejects => true);
    CALL customer_analytics.run_pipeline();
    -- a row staged after the last transform must survive too, and be
    -- transformed after the restore
    INSERT INTO customer_analytics.stg_orders (order_id, line_number, customer_id, product_id, order_ts, quantity, unit_price)
    VALUES ('AFTER-DUMP', 1, 'C0000001', 'P00001', '2025-03-01 10:00+00', 2, 9.99);
});

# row count and checksum of every table pg_dump is told to keep
sub kept_checksums
{
	my ($db) = @_;
	my @tables = split /\n/, $node->safe_psql($db, q{
		SELECT c.relname FROM pg_extension e, unnest(e.extconfig) AS cfg(oid)
		JOIN pg_class c ON c.oid = cfg.oid AND c.relkind = 'r'
		WHERE e.extname = 'customer_analytics' ORDER BY 1});
	return checksums($node, $db, \@tables);
}
is($node->safe_psql('warehouse', q{SELECT status FROM customer_analytics.pipeline_run ORDER BY run_id DESC LIMIT 1}),
    'succeeded', 'the source ran its pipeline');
my $before = kept_checksums('warehouse');
like($before, qr/fact_order_line [1-9]\d* /, 'source has order lines');
like($before, qr/stg_events [1-9]\d* /, 'source has staged events');
like($before, qr/reject_reader 1 /, 'source has a reader of all rejects');
like($before, qr/pipeline_step [1-9]\d* /, 'source has the steps of its run');

# The tables pg_dump does not keep are derived ones, rebuilt below (and
# cluster_layout, which describes this database's own catalog on a Citus
# cluster: a restored database has the single-node layout).
is($node->safe_psql('warehouse', q{
    SELECT string_agg(c.relname, ' ' ORDER BY c.relname) FROM pg_class c
    WHERE c.relnamespace IN ('customer_analytics'::regnamespace, 'customer_analytics_internal'::regnamespace)
      AND c.relkind = 'r'
      AND c.oid NOT IN (SELECT unnest(extconfig) FROM pg_extension WHERE extname = 'customer_analytics')}),
    'check_change clickstream_change clickstream_state cluster_layout quality_check_progress rfm_dirty_customer rfm_new_line rfm_rollup_customer rfm_segment_stat sales_dirty_day sales_rollup_category sales_rollup_day sessions',
    'only derived tables are left out of the dump');

my $dump = $node->basedir . '/warehouse.dump';
$node->command_ok([ 'pg_dump', '-Fc', '-d', $node->connstr('warehouse'), '-f', $dump ],
    'pg_dump of the warehouse');

$node->safe_psql('postgres', 'CREATE DATABASE restored');
$node->command_ok([ 'pg_restore', '--exit-on-error', '-d', $node->connstr('restored'), $dump ],
    'pg_restore into a fresh database');

my $after = kept_checksums('restored');
is($after, $before, 'every user-data table has the same rows after restore');

# the sessions are derived, not dumped: the first refresh rebuilds them
my $sessions_sql = q{SELECT count(*) || ' ' || md5(string_agg(s::text, ',' ORDER BY session_key))
                     FROM customer_analytics.sessions s};
my $sessions_before = $node->safe_psql('warehouse', $sessions_sql);
like($sessions_before, qr/^[1-9]\d* /, 'source has sessions');
$node->safe_psql('restored', 'SELECT count(*) FROM customer_analytics.refresh_clickstream()');
is($node->safe_psql('restored', $sessions_sql), $sessions_before,
    'the first refresh after the restore rebuilds the same sessions');

# the sales rollups are derived too: the first refresh rebuilds the same
my $rollup_sql = q{SELECT (SELECT count(*) || ' ' || md5(string_agg(r::text, ',' ORDER BY r::text)) FROM customer_analytics.sales_rollup_day r)
                  || ' ' || (SELECT count(*) || ' ' || md5(string_agg(r::text, ',' ORDER BY r::text)) FROM customer_analytics.sales_rollup_category r)};
my $rollup_before = $node->safe_psql('warehouse', $rollup_sql);
like($rollup_before, qr/^[1-9]\d* \w+ [1-9]\d* /, 'source has sales rollups');
$node->safe_psql('restored', 'SELECT customer_analytics.refresh_sales_rollup()');
is($node->safe_psql('restored', $rollup_sql), $rollup_before,
    'the first rollup refresh after the restore rebuilds the same rollups');

# segment_summary's sums are derived, not dumped: restoring the scores'
# rows fills them again, the same
my $segment_sql = q{SELECT count(*) || ' ' || md5(string_agg(s::text, ',' ORDER BY segment))
                    FROM customer_analytics_internal.rfm_segment_stat s};
my $segment_before = $node->safe_psql('warehouse', $segment_sql);
like($segment_before, qr/^[1-9]\d* /, 'source has segment sums');
is($node->safe_psql('restored', $segment_sql), $segment_before,
    'restoring the scores fills the same segment sums');

# customer_rfm's scores are dumped; its rollup is derived: the first
# refresh after the restore rebuilds it, and rewrites no score
my $rfm_sql = q{SELECT count(*) || ' ' || md5(string_agg(r::text, ',' ORDER BY r::text)) FROM customer_analytics.rfm_rollup_customer r};
my $rfm_before = $node->safe_psql('warehouse', $rfm_sql);
like($rfm_before, qr/^[1-9]\d* /, 'source has an RFM rollup');
is($node->safe_psql('restored', q{
    SELECT customer_analytics.refresh_customer_rfm()
    FROM (SELECT set_config('customer_analytics.as_of', as_of::text, false)
          FROM customer_analytics.customer_rfm_refresh) same_as_of}),
    '0', 'the first RFM refresh after the restore rewrites no score');
is($node->safe_psql('restored', $rfm_sql), $rfm_before, 'and rebuilds the same RFM rollup');
# nothing is known of the checks' past: the first pass after a restore is
# whole, the next one over what changed
is($node->safe_psql('restored', q{
    SELECT count(*) FILTER (WHERE incremental) || ' ' || count(*) FILTER (WHERE NOT passed AND failing_rows < 0)
    FROM customer_analytics.run_checks()}), '0 0', 'the first pass of the checks after a restore reads whole tables');
is($node->safe_psql('restored', q{
    SELECT bool_or(incremental) FROM customer_analytics.run_checks()}), 't',
    'and the next one what changed');

# the users' objects: builtin rows once (from CREATE EXTENSION), theirs
# (from the dump), the view, the grants
is($node->safe_psql('restored', q{
    SELECT (SELECT string_agg(task || ':' || builtin, ' ' ORDER BY task) FROM customer_analytics.pipeline_task)
    || ' / ' || (SELECT count(*) FILTER (WHERE builtin) || ' ' || string_agg(name, ',') FILTER (WHERE NOT builtin)
                 FROM customer_analytics.quality_check)}),
    $node->safe_psql('warehouse', q{
    SELECT (SELECT string_agg(task || ':' || builtin, ' ' ORDER BY task) FROM customer_analytics.pipeline_task)
    || ' / ' || (SELECT count(*) FILTER (WHERE builtin) || ' ' || string_agg(name, ',') FILTER (WHERE NOT builtin)
                 FROM customer_analytics.quality_check)}),
    'pipeline tasks and quality checks: the builtin ones once, the user\'s restored');
is($node->safe_psql('restored', q{
    SET ROLE wh_analyst;
    SELECT (SELECT count(*) FROM customer_analytics.fact_order_line) > 0, (SELECT count(*) FROM customer_analytics.ingest_reject) >= 0}),
    "t|t", "the analyst's grants are restored");

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

# The pipeline runs in the restored database: the user's task and view
# are in its plan, and a run succeeds.
my $plan = $node->safe_psql('restored', q{SELECT string_agg(step, ', ' ORDER BY step_no) FROM customer_analytics.pipeline_plan()});
like($plan, qr/count lines/, "the user's task is in the restored pipeline");
like($plan, qr/refresh public\.category_revenue/, "the user's view is in the restored pipeline");
$node->safe_psql('restored', 'CALL customer_analytics.run_pipeline()');
is($node->safe_psql('restored', q{
    SELECT r.status || ' ' || (SELECT count(*) FROM customer_analytics.pipeline_step s
                              WHERE s.run_id = r.run_id AND s.status NOT IN ('succeeded', 'skipped'))
    FROM customer_analytics.pipeline_run r ORDER BY r.run_id DESC LIMIT 1}), 'succeeded 0',
    'a pipeline run in the restored database succeeds, every step');
is($node->safe_psql('restored', q{
    SELECT (SELECT sum(revenue) FROM public.category_revenue)
         = (SELECT sum(revenue) FROM customer_analytics.fact_order_line)}), 't',
    "the run refreshed the user's view from the restored facts");

# Scheduling from the restored database (pg_cron lives in postgres: the
# loopback connection), and pg_cron running it at the next minute.
my $started = $node->safe_psql('restored', 'SELECT max(run_id) FROM customer_analytics.pipeline_run');
cmp_ok($node->safe_psql('restored', q{SELECT customer_analytics.schedule_pipeline('* * * * *')}), '>', 0,
    'the restored database can schedule its pipeline');
is($node->safe_psql('restored', q{SELECT jobname || ' ' || database FROM customer_analytics.pipeline_jobs()}),
    'customer_analytics restored all restored', 'the job is in pg_cron for the restored database');
my $cron_run = '';
foreach my $i (1 .. 180)
{
	$cron_run = $node->safe_psql('restored', qq{
		SELECT status || ' ' || triggered_by FROM customer_analytics.pipeline_run
		WHERE run_id > $started AND status <> 'running' ORDER BY run_id LIMIT 1});
	last if $cron_run ne '';
	sleep 1;
}
is($cron_run, 'succeeded pg_cron', 'pg_cron ran the restored pipeline, and the run succeeded');
ok($node->safe_psql('restored', q{SELECT customer_analytics.unschedule_pipeline()}) eq 't', 'unscheduled');

$node->stop;
done_testing();
