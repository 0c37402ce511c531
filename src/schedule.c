/*
 * schedule.c
 *	  What the scheduling functions need from C: when a cron schedule fires
 *	  next, and a way to reach pg_cron when it lives in another database.
 *
 *	- cron_next_run(schedule, after): the first minute after "after" that a
 *	  pg_cron schedule matches, read with pg_cron's own grammar and
 *	  evaluated in UTC as pg_cron 1.4 does.
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
#include "pgstat.h"
#include "postmaster/postmaster.h"
#include "storage/fd.h"
#include "storage/latch.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/formatting.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "customer_analytics.h"

PG_FUNCTION_INFO_V1(ca_cron_next_run);
PG_FUNCTION_INFO_V1(ca_cron_remote_query);

static char *cron_conninfo = NULL;

void
ca_schedule_init(void)
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
 *
 * The grammar is pg_cron's, character for character: its parser
 * (src/entry.c, Vixie cron's load_entry) decides what cron.schedule()
 * accepts, and a schedule that it accepts and we refuse would break
 * pipeline_jobs(), while one that we accept and it refuses fails only at
 * scheduling time.  So the scanner below follows entry.c's steps, quirks
 * included: names (Jan..Dec, Sun..Sat, three letters, any case) only in
 * the month and day-of-week fields; a step only after * or a range ("5/15"
 * is refused); anything after the fifth field, or after the end of a list
 * within a field ("*5", "1-2-3"), is ignored; leading blank lines and
 * "#" comment lines are skipped; @reboot and @restart are accepted.
 *
 * Where the pg_cron versions differ we accept what either accepts, since
 * the function does not know which version will run the job: 1.4 takes a
 * step larger than the field (60 for the minutes), 1.5 adds "N seconds"
 * (1 to 59) and 1.6 "$" (last day of the month) in the day-of-month field.
 * --------------------------------------------------------------------- */

#define CRON_MAX_SCHEDULE	1000	/* pg_cron's MAX_FILE_BUFFER_LENGTH */
#define CRON_MAX_TOKEN		1000	/* its MAX_TEMPSTR */

typedef enum CronKind
{
	CRON_CLOCK,					/* the five fields */
	CRON_REBOOT,				/* @reboot: at pg_cron's start, not by clock */
	CRON_INTERVAL				/* 'N seconds' (pg_cron 1.5) */
} CronKind;

typedef struct CronFields
{
	CronKind	kind;
	int			interval_seconds;
	bool		minute[60];
	bool		hour[24];
	bool		dom[31];		/* day - 1 */
	bool		month[12];		/* month - 1 */
	bool		dow[8];			/* 0 and 7: Sunday */
	bool		dom_star;		/* the field began with '*' */
	bool		dow_star;
	bool		dom_last;		/* '$' */
} CronFields;

/* The schedule read as pg_cron's in-memory FILE reads it */
typedef struct CronScanner
{
	const char *str;
	int			len;
	int			pos;
	int			field_start;	/* where the field being read begins */
	const char *field_name;
	const char *why;			/* the first reason for refusing */
} CronScanner;

static const char *const cron_month_names[] = {
	"Jan", "Feb", "Mar", "Apr", "May", "Jun",
	"Jul", "Aug", "Sep", "Oct", "Nov", "Dec", NULL
};
static const char *const cron_dow_names[] = {
	"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun", NULL
};

/* like pg_cron's get_char(): the text, then one '\0', then EOF */
static int
cron_get(CronScanner *sc)
{
	if (sc->pos < sc->len)
		return (unsigned char) sc->str[sc->pos++];
	if (sc->pos++ == sc->len)
		return '\0';
	sc->pos = sc->len + 1;
	return EOF;
}

static void
cron_unget(CronScanner *sc)
{
	sc->pos--;
}

static inline bool
cron_blank(int ch)
{
	return ch == ' ' || ch == '\t';
}

static int
cron_skip_blanks(CronScanner *sc, int ch)
{
	while (cron_blank(ch))
		ch = cron_get(sc);
	return ch;
}

/* a refusal: remember the first reason, and say so to the caller (EOF) */
static int
cron_refuse(CronScanner *sc, const char *why)
{
	if (sc->why == NULL)
		sc->why = why;
	return EOF;
}

/* a number, or a name of "names" (then worth its index + low) */
static int
cron_get_number(CronScanner *sc, int *value, int low,
				const char *const *names, int ch)
{
	char		token[CRON_MAX_TOKEN];
	int			len = 0;
	bool		all_digits = true;

	*value = 0;
	while (ch != EOF && ch < 128 && isalnum(ch))
	{
		if (++len >= CRON_MAX_TOKEN)
			return cron_refuse(sc, "a value is too long");
		token[len - 1] = (char) ch;
		if (!isdigit(ch))
			all_digits = false;
		ch = cron_get(sc);
	}
	token[len] = '\0';
	if (len == 0)
		return cron_refuse(sc, ch == '\0' || ch == EOF
						   ? "it ends too early"
						   : "expected a number, a name, a range or *");
	for (int i = 0; names && names[i]; i++)
	{
		if (pg_strcasecmp(names[i], token) == 0)
		{
			*value = i + low;
			return ch;
		}
	}
	if (!all_digits)
		return cron_refuse(sc, names
						   ? "unknown name (three letters: Jan to Dec, Sun to Sat)"
						   : "names are allowed only in the month and day-of-week fields");
	/* atoi(), as pg_cron: 64-bit strtol() truncated to int */
	*value = (int) strtol(token, NULL, 10);
	return ch;
}

/*
 * pg_cron's set_range() sets bits with bit_nset() for a step of 1, which
 * works a byte of eight values at a time: a reversed range within one byte
 * sets nothing, one across bytes sets the ends of both bytes.  Kept, so
 * that such a schedule fires when pg_cron fires it; bits past the field's
 * last value (pg_cron's bytes have them) are never tested, so not kept.
 */
static void
cron_set_range(bool *bits, int nbits, int start, int stop, int step)
{
	if (step == 1 && start > stop && start / 8 != stop / 8)
	{
		for (int i = start; i < Min((start / 8 + 1) * 8, nbits); i++)
			bits[i] = true;
		for (int i = stop / 8 * 8; i <= stop; i++)
			bits[i] = true;
		return;
	}
	for (int i = start; i <= stop; i += step)
		bits[i] = true;
}

/* one element of a list: number | number-number[/step] | *[/step] */
static int
cron_get_range(CronScanner *sc, bool *bits, int low, int high,
			   const char *const *names, int ch)
{
	int			num1,
				num2,
				step = 1;

	if (ch == '*')
	{
		num1 = low;
		num2 = high;
		ch = cron_get(sc);
		if (ch == EOF)
			return cron_refuse(sc, "it ends too early");
	}
	else
	{
		ch = cron_get_number(sc, &num1, low, names, ch);
		if (ch == EOF)
			return EOF;
		if (ch != '-')
		{
			if (ch == '/')
				return cron_refuse(sc, "a step needs * or a range before it (write 5-59/15, not 5/15)");
			if (num1 < low || num1 > high)
				return cron_refuse(sc, psprintf("values must be within %d-%d", low, high));
			bits[num1 - low] = true;
			return ch;
		}
		ch = cron_get(sc);
		if (ch == EOF)
			return cron_refuse(sc, "it ends too early");
		ch = cron_get_number(sc, &num2, low, names, ch);
		if (ch == EOF)
			return EOF;
	}
	if (ch == '/')
	{
		ch = cron_get(sc);
		if (ch == EOF)
			return cron_refuse(sc, "it ends too early");
		ch = cron_get_number(sc, &step, 0, NULL, ch);
		if (ch == EOF || step <= 0)
			return cron_refuse(sc, "the step after / must be a positive number");
	}
	/* pg_cron 1.6 also refuses a step larger than the field; 1.4 does not */
	if (num1 < low || num1 > high || num2 < low || num2 > high)
		return cron_refuse(sc, psprintf("values must be within %d-%d", low, high));
	cron_set_range(bits, high - low + 1, num1 - low, num2 - low, step);
	return ch;
}

/* a comma list of ranges, then past the rest of the field and its blanks */
static int
cron_get_list(CronScanner *sc, bool *bits, int low, int high,
			  const char *const *names, int ch, const char *field_name)
{
	sc->field_start = sc->pos - 1;
	sc->field_name = field_name;
	for (;;)
	{
		ch = cron_get_range(sc, bits, low, high, names, ch);
		if (ch != ',')
			break;
		ch = cron_get(sc);
	}
	while (ch != '\t' && ch != ' ' && ch != '\n' && ch != EOF && ch != '\0')
		ch = cron_get(sc);
	return cron_skip_blanks(sc, ch);
}

static void
cron_set_all(bool *bits, int n)
{
	for (int i = 0; i < n; i++)
		bits[i] = true;
}

/* the @ shorthands, as pg_cron expands them */
static bool
cron_shorthand(const char *name, CronFields *cf)
{
	if (strcmp(name, "reboot") == 0 || strcmp(name, "restart") == 0)
	{
		cf->kind = CRON_REBOOT;
		return true;
	}
	cf->minute[0] = true;
	if (strcmp(name, "hourly") == 0)
	{
		cron_set_all(cf->hour, 24);
		cron_set_all(cf->dom, 31);
		cron_set_all(cf->month, 12);
		cron_set_all(cf->dow, 8);
		return true;
	}
	cf->hour[0] = true;
	cf->dow_star = true;		/* all but @daily, as pg_cron */
	if (strcmp(name, "daily") == 0 || strcmp(name, "midnight") == 0)
	{
		cf->dow_star = false;
		cron_set_all(cf->dom, 31);
		cron_set_all(cf->month, 12);
		cron_set_all(cf->dow, 8);
	}
	else if (strcmp(name, "weekly") == 0)
	{
		cron_set_all(cf->dom, 31);
		cron_set_all(cf->month, 12);
		cf->dow[0] = true;
	}
	else if (strcmp(name, "monthly") == 0)
	{
		cf->dom[0] = true;
		cron_set_all(cf->month, 12);
		cron_set_all(cf->dow, 8);
	}
	else if (strcmp(name, "yearly") == 0 || strcmp(name, "annually") == 0)
	{
		cf->dom[0] = true;
		cf->month[0] = true;
		cron_set_all(cf->dow, 8);
	}
	else
		return false;
	return true;
}

/* pg_cron 1.5's TryParseInterval(): "<1..59> second[s]", any case */
static bool
cron_interval(const char *schedule, int *seconds)
{
	char	   *lower = asc_tolower(schedule, strlen(schedule));
	unsigned int n = 0;
	char		last = '\0',
				plural = '\0',
				extra = '\0';
	int			parts = sscanf(lower, " %u secon%c%c %c", &n, &last, &plural, &extra);

	if (last != 'd' || !(parts == 2 || (parts == 3 && plural == 's')))
		return false;
	if (n < 1 || n > 59)
		return false;
	*seconds = (int) n;
	return true;
}

/*
 * The five-field (or @) schedule as pg_cron's parse_cron_entry() reads it;
 * false, with sc->why and sc->field_name set, where it would return NULL.
 */
static bool
cron_parse_entry(CronScanner *sc, CronFields *cf)
{
	int			ch;

	if (sc->len >= CRON_MAX_SCHEDULE)
	{
		cron_refuse(sc, psprintf("it is longer than %d characters", CRON_MAX_SCHEDULE - 1));
		return false;
	}

	/* skip_comments(): blank lines and lines starting with # */
	while ((ch = cron_get(sc)) != EOF)
	{
		ch = cron_skip_blanks(sc, ch);
		if (ch == EOF)
			break;
		if (ch != '\n' && ch != '#')
			break;
		while (ch != '\n' && ch != EOF)
			ch = cron_get(sc);
	}
	if (ch != EOF)
		cron_unget(sc);
	ch = cron_get(sc);
	if (ch == EOF)
	{
		cron_refuse(sc, "it holds only comments");
		return false;
	}

	if (ch == '@')
	{
		int			start = sc->pos;
		int			end;
		char	   *name;

		/* get_string(): up to a blank, a newline or the end */
		for (;;)
		{
			end = sc->pos;
			ch = cron_get(sc);
			if (ch == EOF || ch == '\0' || ch == ' ' || ch == '\t' || ch == '\n')
				break;
		}
		name = pnstrdup(sc->str + start, end - start);
		sc->field_start = start - 1;
		sc->field_name = "shorthand";
		if (!cron_shorthand(name, cf))
		{
			cron_refuse(sc, "pg_cron knows @reboot, @hourly, @daily, @midnight, @weekly, @monthly, @yearly and @annually, in lower case");
			return false;
		}
		return true;
	}

	if ((ch = cron_get_list(sc, cf->minute, 0, 59, NULL, ch, "minute")) == EOF)
		return false;
	if ((ch = cron_get_list(sc, cf->hour, 0, 23, NULL, ch, "hour")) == EOF)
		return false;
	if (ch == '$')
	{
		sc->field_start = sc->pos - 1;
		sc->field_name = "day-of-month";
		ch = cron_get(sc);
		if (!cron_blank(ch))
		{
			cron_refuse(sc, "$ (the last day of the month) stands alone");
			return false;
		}
		ch = cron_skip_blanks(sc, ch);
		cf->dom_last = true;
	}
	else
	{
		cf->dom_star = (ch == '*');
		ch = cron_get_list(sc, cf->dom, 1, 31, NULL, ch, "day-of-month");
	}
	if (ch == EOF)
		return false;
	if ((ch = cron_get_list(sc, cf->month, 1, 12, cron_month_names, ch, "month")) == EOF)
		return false;
	cf->dow_star = (ch == '*');
	if ((ch = cron_get_list(sc, cf->dow, 0, 7, cron_dow_names, ch, "day-of-week")) == EOF)
		return false;
	return true;
}

static void
bad_schedule(const char *schedule, const CronScanner *sc)
{
	const char *field = sc->str + Min(Max(sc->field_start, 0), sc->len);
	int			flen = strcspn(field, " \t\n");

	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid cron schedule \"%s\"", schedule),
			 sc->field_name == NULL || flen == 0
			 ? errdetail("The schedule is not accepted: %s.", sc->why)
			 : strcmp(sc->field_name, "shorthand") == 0
			 ? errdetail("The shorthand \"%.*s\" is unknown: %s.", flen, field, sc->why)
			 : errdetail("The %s field \"%.*s\" is not accepted: %s.",
						 sc->field_name, flen, field, sc->why),
			 errhint("Use pg_cron's five fields (minute hour day-of-month month day-of-week, "
					 "e.g. '*/15 * * * *' or '0 9 * * mon-fri'), a shorthand such as @hourly, "
					 "or 'N seconds' on pg_cron 1.5 and later.")));
}

static void
parse_schedule(const char *schedule, CronFields *cf)
{
	CronScanner sc = {schedule, strlen(schedule), 0, 0, NULL, NULL};

	memset(cf, 0, sizeof(*cf));
	if (cron_parse_entry(&sc, cf))
	{
		/* "make sundays equivalent" */
		if (cf->dow[0] || cf->dow[7])
			cf->dow[0] = cf->dow[7] = true;
		return;
	}
	memset(cf, 0, sizeof(*cf));
	if (cron_interval(schedule, &cf->interval_seconds))
	{
		cf->kind = CRON_INTERVAL;
		return;
	}
	if (sc.why == NULL)
		sc.why = "it ends too early";
	bad_schedule(schedule, &sc);
}

/* pg_cron's ShouldRunTask(): either day field may match when neither is * */
static bool
day_matches(const CronFields *cf, int mday, int wday, bool last_of_month)
{
	bool		thisdom = cf->dom[mday - 1] || (last_of_month && cf->dom_last);
	bool		thisdow = cf->dow[wday];

	if (cf->dom_star || cf->dow_star)
		return thisdom && thisdow;
	return thisdom || thisdow;
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
	if (TIMESTAMP_NOT_FINITE(after) || cf.kind == CRON_REBOOT)
		PG_RETURN_NULL();

	/*
	 * pg_cron starts an interval job that many seconds after its previous
	 * start, which is not known here: one interval from "after" is when it
	 * runs next if it ran at "after".
	 */
	if (cf.kind == CRON_INTERVAL)
		PG_RETURN_TIMESTAMPTZ(after + cf.interval_seconds * USECS_PER_SEC);

	/* the first whole minute strictly after "after", walked day by day */
	day_start = after - (after % USECS_PER_DAY + (after % USECS_PER_DAY < 0 ? USECS_PER_DAY : 0));
	minutes_in = (after - day_start) / USECS_PER_MINUTE + 1;
	for (int days = 0; days <= 366 * 8; days++)
	{
		struct pg_tm tm;
		fsec_t		fsec;
		TimestampTz t = day_start + days * USECS_PER_DAY;
		int			jd,
					next_year,
					next_month,
					next_mday;

		if (timestamp2tm(t, NULL, &tm, &fsec, NULL, NULL) != 0)
			PG_RETURN_NULL();
		/* timestamp2tm leaves tm_wday unset */
		jd = date2j(tm.tm_year, tm.tm_mon, tm.tm_mday);
		j2date(jd + 1, &next_year, &next_month, &next_mday);
		if (cf.month[tm.tm_mon - 1] &&
			day_matches(&cf, tm.tm_mday, j2day(jd), next_mday == 1))
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
 *
 * libpq's blocking calls (PQconnectdbParams, PQexec) wait in poll()
 * where neither a cancel nor statement_timeout can reach them, so a
 * server that accepts the connection and never answers would hold the
 * backend for good.  Every wait is on our latch and the socket instead,
 * with CHECK_FOR_INTERRUPTS() after each wake-up, as dblink and
 * postgres_fdw do (PostgreSQL 16 put that loop in libpq-be-fe-helpers.h;
 * 15 does not have it).
 * --------------------------------------------------------------------- */

/* what an error raised while talking to pg_cron's database says it was doing */
typedef struct CronLinkContext
{
	const char *database;
	const char *statement;
} CronLinkContext;

static void
cron_link_error_context(void *arg)
{
	CronLinkContext *ctx = (CronLinkContext *) arg;

	errcontext("statement in pg_cron's database \"%s\": %s", ctx->database, ctx->statement);
}

/* wait until the socket is ready as asked, or throw if interrupted */
static void
cron_link_wait(PGconn *conn, int io_flag)
{
	int			rc;

	rc = WaitLatchOrSocket(MyLatch, WL_LATCH_SET | WL_EXIT_ON_PM_DEATH | io_flag,
						   PQsocket(conn), -1L, PG_WAIT_EXTENSION);
	if (rc & WL_LATCH_SET)
		ResetLatch(MyLatch);
	CHECK_FOR_INTERRUPTS();
}

/* PQconnectPoll() until the connection is made or has failed */
static void
cron_link_connect_poll(PGconn *conn)
{
	PostgresPollingStatusType status = PGRES_POLLING_WRITING;

	if (PQstatus(conn) == CONNECTION_BAD)
		return;
	while (status != PGRES_POLLING_OK && status != PGRES_POLLING_FAILED)
	{
		cron_link_wait(conn, status == PGRES_POLLING_READING
					   ? WL_SOCKET_READABLE : WL_SOCKET_WRITEABLE);
		status = PQconnectPoll(conn);
	}
}

/*
 * Send a statement and wait for its last result without blocking; NULL if
 * the connection broke.  The caller PQclear()s the result.
 */
static PGresult *
cron_link_exec(PGconn *conn, const char *sql, int nparams, const char *const *values)
{
	PGresult   *volatile last = NULL;

	if (!PQsendQueryParams(conn, sql, nparams, NULL, values, NULL, NULL, 0))
		return NULL;
	PG_TRY();
	{
		int			flushed;

		/* a statement larger than the socket's buffer goes out in parts */
		while ((flushed = PQflush(conn)) == 1)
		{
			cron_link_wait(conn, WL_SOCKET_WRITEABLE | WL_SOCKET_READABLE);
			if (!PQconsumeInput(conn))
				break;
		}
		for (;;)
		{
			PGresult   *res;

			while (PQisBusy(conn))
			{
				cron_link_wait(conn, WL_SOCKET_READABLE);
				if (!PQconsumeInput(conn))
					break;
			}
			res = PQgetResult(conn);
			if (res == NULL)
				break;
			PQclear(last);
			last = res;
		}
	}
	PG_CATCH();
	{
		PQclear(last);
		PG_RE_THROW();
	}
	PG_END_TRY();
	return last;
}

/* a remote error as ours: its SQLSTATE, its text in the detail */
static void
cron_link_report(PGconn *conn, PGresult *res, bool setting_up, const char *database)
{
	const char *field = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
	const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
	const char *detail = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL) : NULL;
	const char *hint = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_HINT) : NULL;
	int			sqlstate = field && strlen(field) == 5
	? MAKE_SQLSTATE(field[0], field[1], field[2], field[3], field[4])
	: ERRCODE_CONNECTION_FAILURE;
	char	   *remote = pchomp(primary ? primary : PQerrorMessage(conn));

	if (detail)
		remote = psprintf("%s\n%s", remote, detail);
	PQclear(res);
	ereport(ERROR,
			(errcode(sqlstate),
			 setting_up
			 ? errmsg("could not set a safe search_path on the connection to pg_cron's database \"%s\"",
					  database)
			 : errmsg("could not run a statement in pg_cron's database \"%s\"", database),
			 errdetail_internal("%s", remote),
			 hint ? errhint("%s", hint) : 0));
}

static PGconn *
connect_to_cron_database(const char *cron_db, const char *hint_statement)
{
	PGconn	   *volatile conn;
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
		values[n++] = cron_db;
		keywords[n] = "user";
		values[n++] = GetUserNameFromId(GetUserId(), false);
	}
	keywords[n] = "application_name";
	values[n++] = "customer_analytics";
	keywords[n] = NULL;
	values[n] = NULL;

	/* the socket counts against max_files_per_process, as dblink's does */
	if (!AcquireExternalFD())
		ereport(ERROR,
				(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
				 errmsg("could not connect to pg_cron's database \"%s\"", cron_db),
				 errdetail("There are too many open files on the local server."),
				 errhint("Raise the server's max_files_per_process setting.")));
	conn = PQconnectStartParams(keywords, values, true);
	PG_TRY();
	{
		PGresult   *res;

		if (conn)
			cron_link_connect_poll(conn);
		if (conn == NULL || PQstatus(conn) != CONNECTION_OK)
			ereport(ERROR,
					(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
					 errmsg("could not connect to pg_cron's database \"%s\"", cron_db),
					 errdetail_internal("%s", pchomp(conn ? PQerrorMessage(conn) : "out of memory")),
					 errhint("Allow the connection (pg_hba.conf, or set customer_analytics.cron_conninfo), "
							 "or run this in database \"%s\" yourself: %s",
							 cron_db, hint_statement)));

		/*
		 * The remote session's search_path is whatever its role's default is:
		 * make it safe, so that no object in a public schema over there can
		 * stand in for pg_catalog's or cron's (the queries name cron.*).
		 */
		res = cron_link_exec(conn, "SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', false)",
							 0, NULL);
		if (PQresultStatus(res) != PGRES_TUPLES_OK)
			cron_link_report(conn, res, true, cron_db);
		PQclear(res);
	}
	PG_CATCH();
	{
		PQfinish(conn);
		ReleaseExternalFD();
		PG_RE_THROW();
	}
	PG_END_TRY();
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
	const char *setting = GetConfigOption("cron.database_name", true, false);
	const char **param_values = NULL;
	int			nparams = 0;
	PGconn	   *volatile conn;
	char	   *wrapped;
	CronLinkContext ctx;
	ErrorContextCallback errcallback;

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

	ctx.database = setting ? setting : "postgres";
	ctx.statement = hint;
	errcallback.callback = cron_link_error_context;
	errcallback.arg = &ctx;
	errcallback.previous = error_context_stack;
	error_context_stack = &errcallback;

	conn = connect_to_cron_database(ctx.database, hint);
	PG_TRY();
	{
		PGresult   *res = cron_link_exec(conn, wrapped, nparams, param_values);

		if (PQresultStatus(res) != PGRES_TUPLES_OK)
			cron_link_report(conn, res, false, ctx.database);
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
		PQfinish(conn);
		ReleaseExternalFD();
	}
	PG_END_TRY();
	error_context_stack = errcallback.previous;
	return (Datum) 0;
}
