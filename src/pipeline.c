/*
 * pipeline.c
 *	  Settings of the in-database pipeline (run_pipeline() and its
 *	  schedule).  The pipeline itself is SQL (src/sql/70_pipeline.sql): it
 *	  is a procedure so that it can commit after every step and keep the
 *	  record of a failed step.  The settings live here because our GUC
 *	  prefix is reserved: only settings defined in C may use it.
 */
#include "postgres.h"

#include "utils/guc.h"

#include "customer_analytics.h"

static int	pipeline_retries = 2;
static double pipeline_retry_backoff = 1.0;
static char *history_retention = NULL;
static char *full_checks_interval = NULL;

void
ca_pipeline_init(void)
{
	DefineCustomIntVariable(CA_GUC_PREFIX ".pipeline_retries",
							"How many times run_pipeline() retries a step that failed with a transient error.",
							"Transient: serialization failure, deadlock, lock not available, lost connection, "
							"out of resources.",
							&pipeline_retries,
							2, 0, 10,
							PGC_USERSET, 0,
							NULL, NULL, NULL);
	DefineCustomRealVariable(CA_GUC_PREFIX ".pipeline_retry_backoff",
							 "Seconds before the first retry of a step; each further retry waits twice as long.",
							 NULL,
							 &pipeline_retry_backoff,
							 1.0, 0.0, 600.0,
							 PGC_USERSET, 0,
							 NULL, NULL, NULL);
	DefineCustomStringVariable(CA_GUC_PREFIX ".history_retention",
							   "How long run_pipeline() keeps its run history and pg_cron's run details of its jobs.",
							   "An interval, e.g. '30 days'.",
							   &history_retention,
							   "30 days",
							   PGC_USERSET, 0,
							   NULL, NULL, NULL);
	DefineCustomStringVariable(CA_GUC_PREFIX ".full_checks_interval",
							   "How often run_checks() runs each check over whole tables instead of over what changed.",
							   "An interval, e.g. '1 day': a check whose last full run is older runs full.",
							   &full_checks_interval,
							   "1 day",
							   PGC_USERSET, 0,
							   NULL, NULL, NULL);
}
