/*
 * clickstream.c
 *	  Clickstream sessionization: the session_number() window function and
 *	  the settings of the clickstream (session gap, event lateness).
 *
 *	- session_number(ts, gap) OVER (PARTITION BY visitor ORDER BY ts):
 *	  1 for the visitor's first event, then the same number while events
 *	  follow each other within the gap, the next number after a longer
 *	  pause.  The rule: an event starts a new session when it comes MORE
 *	  than gap after the previous event (a pause exactly equal to the gap
 *	  continues the session).  One pass, constant state per partition: it
 *	  replaces lag() + a CASE + a running sum() (two window passes).  The
 *	  gap is read from the first row of each partition (it is meant to be a
 *	  constant).
 *	- session_gap(), event_lateness(): the effective settings
 *	  customer_analytics.session_gap and customer_analytics.event_lateness,
 *	  validated when set.
 *	- on_citus_worker(): whether track_event() is called on a Citus worker,
 *	  where it must be refused.
 *
 * A gap is a fixed duration: days count as 24 hours and months are refused
 * (a month has no fixed length).
 */
#include "postgres.h"

#include "common/int.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/guc.h"
#include "utils/timestamp.h"
#include "windowapi.h"

#include "citus_guard.h"
#include "customer_analytics.h"

PG_FUNCTION_INFO_V1(ca_session_number);
PG_FUNCTION_INFO_V1(ca_session_gap);
PG_FUNCTION_INFO_V1(ca_event_lateness);
PG_FUNCTION_INFO_V1(ca_on_citus_worker);

/* settings (strings, so that they read as intervals: '30 minutes') */
static char *session_gap_setting = NULL;
static char *event_lateness_setting = NULL;

/*
 * Parse an interval without throwing (a GUC check hook must not): false if
 * the text is not an interval.
 */
static bool
parse_interval_soft(const char *text, Interval *result)
{
	char		workbuf[MAXDATELEN + MAXDATEFIELDS];
	char	   *field[MAXDATEFIELDS];
	int			ftype[MAXDATEFIELDS];
	int			nf;
	int			dtype;
	struct pg_itm_in itm;

	if (strlen(text) >= MAXDATELEN)
		return false;
	if (ParseDateTime(text, workbuf, sizeof(workbuf), field, ftype,
					  MAXDATEFIELDS, &nf) != 0)
		return false;
	if (DecodeInterval(field, ftype, nf, INTERVAL_FULL_RANGE, &dtype, &itm) != 0)
	{
		if (DecodeISO8601Interval(unconstify(char *, text), &dtype, &itm) != 0)
			return false;
	}
	if (dtype != DTK_DELTA)
		return false;
	return itmin2interval(&itm, result) == 0;
}

/*
 * A fixed-length interval as microseconds; false if it has months or does
 * not fit.
 */
static bool
interval_usecs(const Interval *span, int64 *usecs)
{
	int64		days;

	if (span->month != 0)
		return false;
	if (pg_mul_s64_overflow((int64) span->day, USECS_PER_DAY, &days) ||
		pg_add_s64_overflow(days, span->time, usecs))
		return false;
	return true;
}

static bool
check_session_gap(char **newval, void **extra, GucSource source)
{
	Interval	span;
	int64		usecs;

	if (!parse_interval_soft(*newval, &span))
	{
		GUC_check_errdetail("\"%s\" is not an interval.", *newval);
		GUC_check_errhint("Use a duration such as '30 minutes'.");
		return false;
	}
	if (!interval_usecs(&span, &usecs) || usecs <= 0)
	{
		GUC_check_errdetail("The session gap must be a positive duration without months, not \"%s\".",
							*newval);
		GUC_check_errhint("Use a duration such as '30 minutes'.");
		return false;
	}
	return true;
}

static bool
check_event_lateness(char **newval, void **extra, GucSource source)
{
	Interval	span;
	int64		usecs;

	if ((*newval)[0] == '\0')
		return true;			/* no limit */
	if (!parse_interval_soft(*newval, &span))
	{
		GUC_check_errdetail("\"%s\" is not an interval.", *newval);
		GUC_check_errhint("Use a duration such as '3 days', or an empty string for no limit.");
		return false;
	}
	if (!interval_usecs(&span, &usecs) || usecs < 0)
	{
		GUC_check_errdetail("The lateness window must be a duration of zero or more without months, not \"%s\".",
							*newval);
		GUC_check_errhint("Use a duration such as '3 days', or an empty string for no limit.");
		return false;
	}
	return true;
}

void
ca_clickstream_init(void)
{
	DefineCustomStringVariable(CA_GUC_PREFIX ".session_gap",
							   "Inactivity after which a visitor's next event starts a new session.",
							   "A pause exactly this long continues the session. Changing it makes the next "
							   "refresh_clickstream() rebuild the sessions.",
							   &session_gap_setting,
							   "30 minutes",
							   PGC_USERSET, 0,
							   check_session_gap, NULL, NULL);
	DefineCustomStringVariable(CA_GUC_PREFIX ".event_lateness",
							   "How far behind the event-time watermark an event may arrive and still be processed incrementally.",
							   "Later events stay in stg_events until a full refresh; empty means no limit.",
							   &event_lateness_setting,
							   "3 days",
							   PGC_USERSET, 0,
							   check_event_lateness, NULL, NULL);
}

static Datum
interval_setting(const char *text)
{
	Interval   *span = palloc(sizeof(Interval));

	/* validated by the check hook, so this cannot fail */
	if (!parse_interval_soft(text, span))
		elog(ERROR, "invalid interval setting \"%s\"", text);
	return IntervalPGetDatum(span);
}

/* session_gap() -> interval */
Datum
ca_session_gap(PG_FUNCTION_ARGS)
{
	return interval_setting(session_gap_setting);
}

/* event_lateness() -> interval, NULL when unlimited */
Datum
ca_event_lateness(PG_FUNCTION_ARGS)
{
	if (event_lateness_setting == NULL || event_lateness_setting[0] == '\0')
		PG_RETURN_NULL();
	return interval_setting(event_lateness_setting);
}

/* ---------------------------------------------------------------------
 * session_number(ts timestamptz, gap interval) window function
 * ---------------------------------------------------------------------
 */

/* per partition, zeroed by the executor at each partition start */
typedef struct SessionState
{
	bool		have_gap;		/* gap read (from the partition's first row) */
	bool		gap_null;
	int64		gap_usecs;
	bool		started;		/* seen a non-NULL ts in this partition */
	TimestampTz last_ts;		/* the previous non-NULL ts */
	int64		session;		/* its session number */
} SessionState;

Datum
ca_session_number(PG_FUNCTION_ARGS)
{
	WindowObject winobj = PG_WINDOW_OBJECT();
	SessionState *state;
	bool		isnull;
	TimestampTz ts;
	int64		gap_usecs;

	state = (SessionState *) WinGetPartitionLocalMemory(winobj, sizeof(SessionState));
	/* rows before this one are not needed again: let the executor drop them */
	WinSetMarkPosition(winobj, WinGetCurrentPosition(winobj));

	/*
	 * The gap is read once per partition, from its first row: it is meant to
	 * be a constant, and evaluating it again for every row would cost a good
	 * part of the function's time.
	 */
	if (!state->have_gap)
	{
		Interval   *gap;

		state->have_gap = true;
		gap = DatumGetIntervalP(WinGetFuncArgCurrent(winobj, 1, &isnull));
		state->gap_null = isnull;
		if (!isnull && (!interval_usecs(gap, &state->gap_usecs) || state->gap_usecs <= 0))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("session gap must be a positive duration without months"),
					 errdetail("The gap given was %s.",
							   DatumGetCString(DirectFunctionCall1(interval_out,
																   IntervalPGetDatum(gap)))),
					 errhint("Use a duration such as '30 minutes'.")));
	}
	if (state->gap_null)
		PG_RETURN_NULL();
	gap_usecs = state->gap_usecs;

	ts = DatumGetTimestampTz(WinGetFuncArgCurrent(winobj, 0, &isnull));
	if (isnull)
		PG_RETURN_NULL();		/* no time, no session; others unaffected */

	if (!state->started)
	{
		state->started = true;
		state->session = 1;
	}
	else
	{
		int64		pause;

		if (ts < state->last_ts)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("session_number() needs its rows in time order"),
					 errdetail("Timestamp %s follows %s in the window.",
							   pstrdup(timestamptz_to_str(ts)),
							   pstrdup(timestamptz_to_str(state->last_ts))),
					 errhint("Use OVER (PARTITION BY visitor ORDER BY ts), with ts the function's first argument.")));
		/* a pause too long to represent is certainly longer than the gap */
		if (pg_sub_s64_overflow(ts, state->last_ts, &pause) || pause > gap_usecs)
			state->session++;
	}
	state->last_ts = ts;
	PG_RETURN_INT64(state->session);
}

/*
 * Is this node a Citus worker?  track_event() asks at every event, and
 * refuses there: before distribute(), an event tracked on a worker would
 * stay in the worker's own copy of stg_events, which nothing reads; the
 * pipeline that moves events on, the sessions and the change queues are
 * the coordinator's.  (citus_guard.c says how it is told.)
 */
Datum
ca_on_citus_worker(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(ca_citus_worker_node());
}
