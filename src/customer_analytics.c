/*
 * customer_analytics.c
 *	  Module entry point: PG_MODULE_MAGIC and the settings (GUCs) shared by
 *	  the whole extension.
 *
 * Each capability has its own file (generator.c, ingest.c, rfm.c, ...);
 * this one only loads them.
 */
#include "postgres.h"

#include "fmgr.h"
#include "pgtime.h"
#include "utils/builtins.h"
#include "utils/guc.h"

#include "customer_analytics.h"
#include "pg_compat.h"

PG_MODULE_MAGIC;

/* Time zone in which timestamps are assigned to calendar days. */
static char *ca_business_timezone = NULL;

void		_PG_init(void);

PG_FUNCTION_INFO_V1(ca_business_timezone_name);

/*
 * A time zone name is valid if the server's tz database knows it; checking
 * here turns a typo into an error at SET time instead of in transform().
 */
static bool
check_business_timezone(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] == '\0' || pg_tzset(*newval) == NULL)
	{
		GUC_check_errdetail("\"%s\" is not a time zone name known to this server.",
							*newval ? *newval : "");
		GUC_check_errhint("Use a name from pg_timezone_names, such as \"UTC\" or \"Europe/London\".");
		return false;
	}
	return true;
}

static void
define_core_settings(void)
{
	DefineCustomStringVariable(CA_GUC_PREFIX ".timezone",
							   "Time zone in which order and event timestamps are assigned to calendar days.",
							   "Used by transform() for date keys and by the daily views. "
							   "Change it only before the first load: existing date keys are not rewritten.",
							   &ca_business_timezone,
							   "UTC",
							   PGC_USERSET,
							   0,
							   check_business_timezone, NULL, NULL);
}

/* One init call per module that has settings of its own. */
void
_PG_init(void)
{
	define_core_settings();
	ca_ingest_init();
	ca_rfm_init();
	ca_schedule_init();
	ca_pipeline_init();
	ca_anomalies_init();
	ca_clickstream_init();
	ca_clv_init();

	MarkGUCPrefixReserved(CA_GUC_PREFIX);
}

/*
 * business_timezone(): the effective customer_analytics.timezone.  Being a
 * C function, calling it also loads this module, so that a value set before
 * the module was loaded is validated.
 */
Datum
ca_business_timezone_name(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(ca_business_timezone));
}
