/*
 * cron_link.c
 *	  What the scheduling functions need from C: when a cron schedule fires
 *	  next, and a way to reach pg_cron when it lives in another database.
 *
 *	- cron_next_run(schedule, after): the first minute after "after" that a
 *	  five-field cron schedule (or @hourly, @daily, ...) matches, evaluated
 *	  in UTC as pg_cron 1.4 does.
 *	- cron_remote_query(query, params, hint): runs a query in the database
 *	  pg_cron serves (cron.database_name) over a loopback libpq connection,
 *	  as dblink and postgres_fdw do, and returns its rows as jsonb.  In the
 *	  usual set-up pg_cron lives in "postgres" and cron.* cannot be reached
 *	  from the warehouse database any other way.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "libpq-fe.h"
#include "miscadmin.h"
#include "postmaster/postmaster.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "customer_analytics.h"

PG_FUNCTION_INFO_V1(ca_cron_next_run);
PG_FUNCTION_INFO_V1(ca_cron_remote_query);

static char *cron_conninfo = NULL;

void
ca_cron_link_init(void)
{
	DefineCustomStringVariable(CA_GUC_PREFIX ".cron_conninfo",
							   "libpq connection string to the database pg_cron runs in, when it is not this one.",
							   "Empty: a loopback connection through this server's first Unix socket (or localhost), "
							   "to cron.database_name, as the current user.",
							   &cron_conninfo,
							   "",
							   PGC_SUSET, 0,
							   NULL, NULL, NULL);
}

/* ---------------------------------------------------------------------
 * Cron schedules
 * --------------------------------------------------------------------- */

typedef struct CronFields
{
	bool		minute[60];
	bool		hour[24];
	bool		dom[32];		/* 1..31 */
	bool		month[13];		/* 1..12 */
	bool		dow[7];			/* 0 = Sunday */
	bool		dom_star;
	bool		dow_star;
} CronFields;

static void
bad_schedule(const char *schedule, const char *field, const char *why)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid cron schedule \"%s\"", schedule),
			 errdetail("Field \"%s\": %s.", field, why),
			 errhint("Use five fields: minute hour day-of-month month day-of-week, "
					 "e.g. '*/15 * * * *', or @hourly, @daily, @weekly, @monthly, @yearly.")));
}

/* parse one field: a star, a number, a range, any of those with a /step, or a comma list */
static void
parse_field(const char *schedule, char *text, bool *set, int lo, int hi, bool *star)
{
	char	   *saveptr = NULL;
	char	   *item;
	char	   *copy = pstrdup(text);

	*star = (strcmp(text, "*") == 0);
	for (item = strtok_r(copy, ",", &saveptr); item; item = strtok_r(NULL, ",", &saveptr))
	{
		int			from = lo,
					to = hi,
					step = 1;
		char	   *slash = strchr(item, '/');
		char	   *end;

		if (slash)
		{
			*slash = '\0';
			step = (int) strtol(slash + 1, &end, 10);
			if (*end != '\0' || end == slash + 1 || step < 1)
				bad_schedule(schedule, text, "the step after / must be a positive number");
		}
		if (strcmp(item, "*") != 0)
		{
			char	   *dash = strchr(item, '-');

			if (dash)
				*dash = '\0';
			from = (int) strtol(item, &end, 10);
			if (*end != '\0' || end == item)
				bad_schedule(schedule, text, "expected a number, a range or *");
			to = from;
			if (dash)
			{
				to = (int) strtol(dash + 1, &end, 10);
				if (*end != '\0' || end == dash + 1)
					bad_schedule(schedule, text, "expected a number after -");
			}
			else if (slash)
				to = hi;
		}
		if (from < lo || to > hi || from > to)
			bad_schedule(schedule, text, psprintf("values must be within %d-%d", lo, hi));
		for (int v = from; v <= to; v += step)
			set[v] = true;
	}
}

static void
parse_schedule(const char *schedule, CronFields *cf)
{
	const char *expanded = schedule;
	char	   *fields[5];
	int			n = 0;
	char	   *saveptr = NULL;
	char	   *copy;
	bool		dow[8] = {false};
	bool		unused;

	if (schedule[0] == '@')
	{
		if (strcmp(schedule, "@hourly") == 0)
			expanded = "0 * * * *";
		else if (strcmp(schedule, "@daily") == 0 || strcmp(schedule, "@midnight") == 0)
			expanded = "0 0 * * *";
		else if (strcmp(schedule, "@weekly") == 0)
			expanded = "0 0 * * 0";
		else if (strcmp(schedule, "@monthly") == 0)
			expanded = "0 0 1 * *";
		else if (strcmp(schedule, "@yearly") == 0 || strcmp(schedule, "@annually") == 0)
			expanded = "0 0 1 1 *";
		else
			bad_schedule(schedule, schedule, "unknown shorthand");
	}
	copy = pstrdup(expanded);
	for (char *f = strtok_r(copy, " \t", &saveptr); f; f = strtok_r(NULL, " \t", &saveptr))
	{
		if (n == 5)
			bad_schedule(schedule, f, "more than five fields (pg_cron 1.4 has no seconds)");
		fields[n++] = f;
	}
	if (n != 5)
		bad_schedule(schedule, expanded, psprintf("%d fields instead of five", n));

	memset(cf, 0, sizeof(*cf));
	parse_field(schedule, fields[0], cf->minute, 0, 59, &unused);
	parse_field(schedule, fields[1], cf->hour, 0, 23, &unused);
	parse_field(schedule, fields[2], cf->dom, 1, 31, &cf->dom_star);
	parse_field(schedule, fields[3], cf->month, 1, 12, &unused);
	parse_field(schedule, fields[4], dow, 0, 7, &cf->dow_star);
	for (int d = 0; d < 7; d++)
		cf->dow[d] = dow[d];
	if (dow[7])
		cf->dow[0] = true;		/* 7 is Sunday too */
}

/* classic cron: when both day fields are restricted, either may match */
static bool
day_matches(const CronFields *cf, int mday, int wday)
{
	if (!cf->dom_star && !cf->dow_star)
		return cf->dom[mday] || cf->dow[wday];
	return cf->dom[mday] && cf->dow[wday];
}

/* cron_next_run(schedule text, after timestamptz) -> timestamptz (UTC) */
Datum
ca_cron_next_run(PG_FUNCTION_ARGS)
{
	char	   *schedule = text_to_cstring(PG_GETARG_TEXT_PP(0));
	TimestampTz after = PG_GETARG_TIMESTAMPTZ(1);
	CronFields	cf;
	TimestampTz day_start;
	int64		minutes_in;

	parse_schedule(schedule, &cf);
	if (TIMESTAMP_NOT_FINITE(after))
		PG_RETURN_NULL();

	/* the first whole minute strictly after "after", walked day by day */
	day_start = after - (after % USECS_PER_DAY + (after % USECS_PER_DAY < 0 ? USECS_PER_DAY : 0));
	minutes_in = (after - day_start) / USECS_PER_MINUTE + 1;
	for (int days = 0; days <= 366 * 8; days++)
	{
		struct pg_tm tm;
		fsec_t		fsec;
		TimestampTz t = day_start + days * USECS_PER_DAY;

		if (timestamp2tm(t, NULL, &tm, &fsec, NULL, NULL) != 0)
			PG_RETURN_NULL();
		/* timestamp2tm leaves tm_wday unset */
		if (cf.month[tm.tm_mon] &&
			day_matches(&cf, tm.tm_mday, j2day(date2j(tm.tm_year, tm.tm_mon, tm.tm_mday))))
		{
			for (int m = (days == 0 ? (int) minutes_in : 0); m < 24 * 60; m++)
				if (cf.hour[m / 60] && cf.minute[m % 60])
					PG_RETURN_TIMESTAMPTZ(t + m * USECS_PER_MINUTE);
		}
	}
	PG_RETURN_NULL();			/* e.g. 30 February: never */
}

/* ---------------------------------------------------------------------
 * Loopback to pg_cron's database
 * --------------------------------------------------------------------- */

static PGconn *
connect_to_cron_database(const char *hint_statement)
{
	PGconn	   *conn;
	const char *cron_db = GetConfigOption("cron.database_name", true, false);
	const char *keywords[8];
	const char *values[8];
	int			n = 0;
	char		port[16];
	char	   *host = NULL;

	if (cron_conninfo && cron_conninfo[0] != '\0')
	{
		keywords[n] = "dbname";
		values[n++] = cron_conninfo;	/* expand_dbname: a full conninfo */
	}
	else
	{
		const char *sockets = GetConfigOption("unix_socket_directories", true, false);

		if (sockets && sockets[0] != '\0')
		{
			host = pstrdup(sockets);
			host[strcspn(host, ",")] = '\0';
			while (*host == ' ')
				host++;
		}
		snprintf(port, sizeof(port), "%d", PostPortNumber);
		keywords[n] = "host";
		values[n++] = host ? host : "localhost";
		keywords[n] = "port";
		values[n++] = port;
		keywords[n] = "dbname";
		values[n++] = cron_db ? cron_db : "postgres";
		keywords[n] = "user";
		values[n++] = GetUserNameFromId(GetUserId(), false);
	}
	keywords[n] = "application_name";
	values[n++] = "customer_analytics";
	keywords[n] = NULL;
	values[n] = NULL;

	conn = PQconnectdbParams(keywords, values, true);
	if (conn == NULL || PQstatus(conn) != CONNECTION_OK)
	{
		char	   *msg = pchomp(conn ? PQerrorMessage(conn) : "out of memory");

		if (conn)
			PQfinish(conn);
		ereport(ERROR,
				(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
				 errmsg("could not connect to pg_cron's database \"%s\"", cron_db ? cron_db : "postgres"),
				 errdetail("%s", msg),
				 errhint("Allow the connection (pg_hba.conf, or set customer_analytics.cron_conninfo), "
						 "or run this in database \"%s\" yourself: %s",
						 cron_db ? cron_db : "postgres", hint_statement)));
	}

	/*
	 * The remote session's search_path is whatever its role's default is:
	 * make it safe, so that no object in a public schema over there can stand
	 * in for pg_catalog's or cron's (the queries name cron.*).
	 */
	{
		PGresult   *res = PQexec(conn, "SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', false)");

		if (PQresultStatus(res) != PGRES_TUPLES_OK)
		{
			char	   *msg = pchomp(PQresultErrorMessage(res));

			PQclear(res);
			PQfinish(conn);
			ereport(ERROR,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("could not set a safe search_path on the connection to pg_cron's database \"%s\"",
							cron_db ? cron_db : "postgres"),
					 errdetail("%s", msg)));
		}
		PQclear(res);
	}
	return conn;
}

/*
 * cron_remote_query(query text, params text[], hint_statement text)
 *	 RETURNS SETOF jsonb: each row of the query, run in pg_cron's database.
 */
Datum
ca_cron_remote_query(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	   *query = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *hint = PG_ARGISNULL(2) ? pstrdup(query) : text_to_cstring(PG_GETARG_TEXT_PP(2));
	const char **param_values = NULL;
	int			nparams = 0;
	volatile	PGconn *conn;
	char	   *wrapped;

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);

	if (!PG_ARGISNULL(1))
	{
		ArrayType  *arr = PG_GETARG_ARRAYTYPE_P(1);
		Datum	   *elems;
		bool	   *nulls;

		deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &nparams);
		param_values = palloc(sizeof(char *) * Max(nparams, 1));
		for (int i = 0; i < nparams; i++)
			param_values[i] = nulls[i] ? NULL : TextDatumGetCString(elems[i]);
	}
	wrapped = psprintf("WITH q AS (%s) SELECT pg_catalog.row_to_json(q)::text FROM q", query);

	conn = connect_to_cron_database(hint);
	PG_TRY();
	{
		PGresult   *res = PQexecParams((PGconn *) conn, wrapped, nparams, NULL, param_values,
									   NULL, NULL, 0);

		if (PQresultStatus(res) != PGRES_TUPLES_OK)
		{
			char	   *msg = pchomp(PQresultErrorMessage(res));
			const char *field = PQresultErrorField(res, PG_DIAG_SQLSTATE);
			int			sqlstate = field && strlen(field) == 5
			? MAKE_SQLSTATE(field[0], field[1], field[2], field[3], field[4])
			: ERRCODE_CONNECTION_FAILURE;

			PQclear(res);
			ereport(ERROR,
					(errcode(sqlstate),
					 errmsg("in pg_cron's database: %s", msg),
					 errhint("The statement was: %s", hint)));
		}
		for (int r = 0; r < PQntuples(res); r++)
		{
			Datum		value;
			bool		isnull = false;

			value = DirectFunctionCall1(jsonb_in, CStringGetDatum(PQgetvalue(res, r, 0)));
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, &value, &isnull);
		}
		PQclear(res);
	}
	PG_FINALLY();
	{
		PQfinish((PGconn *) conn);
	}
	PG_END_TRY();
	return (Datum) 0;
}
