/*
 * ingest_reject.c
 *	  Rejects: a bad row kept with its line, byte offset, raw text (invalid
 *	  bytes escaped), column and reason, buffered and written to
 *	  ingest_reject outside the batch subtransactions; and the limits
 *	  (on_error => 'abort', max_rejects, max_reject_ratio) that end a load.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "ingest.h"

/* Copy raw bytes into valid database-encoding text, invalid bytes as \xNN. */
char *
ingest_escape_raw(IngestState *st, const char *bytes, int len, bool *truncated)
{
	StringInfoData buf;
	const char *p = bytes;
	const char *end;

	*truncated = len > MAX_RAW_LINE;
	if (*truncated)
		len = MAX_RAW_LINE;
	end = bytes + len;
	initStringInfo(&buf);
	while (p < end)
	{
		int			l = pg_encoding_verifymbchar(st->db_encoding, p, end - p);

		if (l <= 0)
		{
			appendStringInfo(&buf, "\\x%02X", (unsigned char) *p);
			p++;
		}
		else
		{
			appendBinaryStringInfo(&buf, p, l);
			p += l;
		}
	}
	return buf.data;
}

/* The raw text of the current record, from COPY's line buffer. */
void
ingest_current_raw_line(IngestState *st, char **raw, bool *truncated)
{
	if (st->cstate)
		*raw = ingest_escape_raw(st, st->cstate->line_buf.data, st->cstate->line_buf.len, truncated);
	else
	{
		*raw = NULL;
		*truncated = false;
	}
}

void
ingest_add_reject(IngestState *st, int sqlerrcode, const char *column,
				  const char *message, const char *detail, char *raw, bool raw_truncated)
{
	MemoryContext old = MemoryContextSwitchTo(st->rejectcxt);
	PendingReject *r = palloc0(sizeof(PendingReject));

	r->line = st->cur_line;
	r->offset = st->cur_offset;
	if (raw == NULL)
		ingest_current_raw_line(st, &r->raw, &r->raw_truncated);
	else
	{
		r->raw = pstrdup(raw);
		r->raw_truncated = raw_truncated;
	}
	r->column = column ? pstrdup(column) : NULL;
	strlcpy(r->sqlstate, unpack_sql_state(sqlerrcode), sizeof(r->sqlstate));
	r->message = pstrdup(message);
	r->detail = detail ? pstrdup(detail) : NULL;
	st->rejects = lappend(st->rejects, r);
	MemoryContextSwitchTo(old);

	st->rows_rejected++;
	if (st->opts->abort_on_error)
		st->abort_requested = true;
}

/*
 * Write pending rejects to ingest_reject; outside any batch subtransaction.
 * Not once the load is to be aborted: nothing of it will be kept, and
 * ingest_check_reject_limits() names the reject that aborted it from the list.
 */
void
ingest_flush_rejects(IngestState *st)
{
	ListCell   *lc;
	Oid			types[11] = {INT8OID, TEXTOID, TEXTOID, INT8OID, INT8OID, TEXTOID,
	BOOLOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID};

	if (st->rejects == NIL || st->abort_requested)
		return;
	SPI_connect();
	if (st->reject_plan == NULL)
	{
		/* planned once per load: a file can have many rejects */
		st->reject_plan = SPI_prepare("INSERT INTO customer_analytics.ingest_reject "
									  "(load_id, target, file, line_number, byte_offset, raw_line, raw_truncated, "
									  " column_name, sqlstate, message, detail) "
									  "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
									  11, types);
		if (st->reject_plan == NULL || SPI_keepplan(st->reject_plan) != 0)
			elog(ERROR, "could not prepare the insert into ingest_reject");
	}
	foreach(lc, st->rejects)
	{
		PendingReject *r = lfirst(lc);
		Datum		values[11];
		char		nulls[11];

		memset(nulls, ' ', sizeof(nulls));
		values[0] = Int64GetDatum(st->load_id);
		values[1] = CStringGetTextDatum(st->target_name);
		values[2] = CStringGetTextDatum(st->file_label);
		values[3] = Int64GetDatum(r->line);
		values[4] = Int64GetDatum(r->offset);
		if (r->offset < 0)
			nulls[4] = 'n';
		values[5] = r->raw ? CStringGetTextDatum(r->raw) : (Datum) 0;
		if (r->raw == NULL)
			nulls[5] = 'n';
		values[6] = BoolGetDatum(r->raw_truncated);
		values[7] = r->column ? CStringGetTextDatum(r->column) : (Datum) 0;
		if (r->column == NULL)
			nulls[7] = 'n';
		values[8] = CStringGetTextDatum(r->sqlstate);
		values[9] = CStringGetTextDatum(r->message);
		values[10] = r->detail ? CStringGetTextDatum(r->detail) : (Datum) 0;
		if (r->detail == NULL)
			nulls[10] = 'n';
		SPI_execute_plan(st->reject_plan, values, nulls, false, 0);
	}
	SPI_finish();
	st->rejects = NIL;
	MemoryContextReset(st->rejectcxt);
}

void
ingest_check_reject_limits(IngestState *st, bool at_end)
{
	if (st->abort_requested)
	{
		/*
		 * The first reject aborted the load (a bisected batch may have found
		 * more after it).
		 */
		PendingReject *r = linitial(st->rejects);

		ereport(ERROR,
				(errcode(MAKE_SQLSTATE(r->sqlstate[0], r->sqlstate[1], r->sqlstate[2],
									   r->sqlstate[3], r->sqlstate[4])),
				 r->column
				 ? errmsg("load of \"%s\" aborted at line " INT64_FORMAT ", column \"%s\": %s",
						  st->file_label, r->line, r->column, r->message)
				 : errmsg("load of \"%s\" aborted at line " INT64_FORMAT ": %s",
						  st->file_label, r->line, r->message),
				 r->raw ? errdetail("The line is: %s", r->raw) : 0,
				 errhint("With on_error => 'reject' the good rows load and the bad ones are kept in customer_analytics.ingest_reject.")));
	}
	if (st->opts->max_rejects >= 0 && st->rows_rejected > st->opts->max_rejects)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("load of \"%s\" aborted: " INT64_FORMAT " rows rejected, more than max_rejects (" INT64_FORMAT ")",
						st->file_label, st->rows_rejected, st->opts->max_rejects),
				 errdetail(INT64_FORMAT " rows read so far; nothing from this file was written.", st->rows_read),
				 errhint("Run again with validate => true to see the rejects, or raise max_rejects.")));
	if (at_end && st->opts->max_reject_ratio >= 0 && st->rows_read > 0 &&
		(double) st->rows_rejected / st->rows_read > st->opts->max_reject_ratio)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("load of \"%s\" aborted: " INT64_FORMAT " of " INT64_FORMAT " rows rejected (%.2f%%), more than max_reject_ratio (%.2f%%)",
						st->file_label, st->rows_rejected, st->rows_read,
						100.0 * st->rows_rejected / st->rows_read, 100.0 * st->opts->max_reject_ratio),
				 errdetail("Nothing from this file was written."),
				 errhint("Run again with validate => true to see the rejects, or raise max_reject_ratio.")));
}
