/*
 * ingest_read.c
 *	  Reading records through COPY's parser (its position, restarts after a
 *	  line it cannot get past, the "\." marker) and converting one record
 *	  into a row: input functions, defaults, imputation, NOT NULL and CHECK
 *	  constraints, each failure a reject rather than an error.
 */
#include "postgres.h"

#include "commands/progress.h"
#include "executor/executor.h"
#include "executor/nodeModifyTable.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/datum.h"
#include "utils/memutils.h"

#include "ingest.h"

/* Bytes of the input the parser has consumed (exact when not transcoding). */
static int64
consumed_offset(IngestState *st)
{
	CopyFromState cs = st->cstate;

	if (st->transcoding)
		return -1;
	return st->src->pos - (cs->raw_buf_len - cs->input_buf_index);
}

/*
 * (Re)state our progress in pg_stat_progress_copy.  BeginCopyFrom starts
 * the report, but aborting a subtransaction (a rejected batch) ends it,
 * so it is started again after each.
 */
void
ingest_report_progress(IngestState *st, bool restart)
{
	const int	index[] = {PROGRESS_COPY_COMMAND, PROGRESS_COPY_TYPE, PROGRESS_COPY_BYTES_TOTAL,
	PROGRESS_COPY_TUPLES_PROCESSED, PROGRESS_COPY_TUPLES_EXCLUDED};
	int64		values[5];

	if (restart)
		pgstat_progress_start_command(PROGRESS_COMMAND_COPY, RelationGetRelid(st->rel));
	values[0] = PROGRESS_COPY_COMMAND_FROM;
	values[1] = st->src->fd >= 0 ? PROGRESS_COPY_TYPE_FILE : PROGRESS_COPY_TYPE_CALLBACK;
	values[2] = st->src->size;
	values[3] = st->rows_loaded;
	values[4] = st->rows_rejected;
	pgstat_progress_update_multi_param(5, index, values);
}

void
ingest_start_parser(IngestState *st, int64 offset, int64 line_base)
{
	st->src->pos = offset;
	st->session_start = offset;
	st->line_base = line_base;
	st->prev_lineno = 0;
	st->reader = ca_copy_reader_begin(st->rel, st->copy_options, ingest_source_produce, st->src);
	st->cstate = ca_copy_reader_state(st->reader);
	st->transcoding = st->cstate->need_transcoding;
	ingest_report_progress(st, false);
}

void
ingest_stop_parser(IngestState *st, bool abandon)
{
	if (st->reader)
		ca_copy_reader_end(st->reader, abandon);
	st->reader = NULL;
	st->cstate = NULL;
}

/* Offset just after the end of the physical line starting at offset. */
static int64
next_line_offset(IngestState *st, int64 offset)
{
	char		buf[4096];
	int64		pos = offset;

	for (;;)
	{
		size_t		n = ingest_source_pread(st->src, pos, buf, sizeof(buf));

		if (n == 0)
			return st->src->size;
		for (size_t i = 0; i < n; i++)
		{
			if (buf[i] == '\n')
				return pos + i + 1;
			if (buf[i] == '\r')
			{
				/* \r\n counts as one end of line */
				if (i + 1 < n)
					return pos + i + 1 + (buf[i + 1] == '\n');
				if (ingest_source_pread(st->src, pos + i + 1, buf, 1) == 1 && buf[0] == '\n')
					return pos + i + 2;
				return pos + i + 1;
			}
		}
		pos += n;
		CHECK_FOR_INTERRUPTS();
	}
}

/* The raw bytes of the physical line at offset, escaped, for a reject. */
static char *
raw_line_at(IngestState *st, int64 offset, int64 end, bool *truncated)
{
	int64		len = Min(end - offset, (int64) MAX_RAW_LINE + 1);
	char	   *bytes = palloc(len + 1);
	size_t		n = ingest_source_pread(st->src, offset, bytes, len);

	while (n > 0 && (bytes[n - 1] == '\n' || bytes[n - 1] == '\r'))
		n--;
	return ingest_escape_raw(st, bytes, n, truncated);
}

/*
 * Skip the line at st->cur_offset (its reject already recorded) and start a
 * new parser at the next line, or end the file if the offsets are unknown.
 */
static void
restart_after_current_line(IngestState *st)
{
	int64		next;

	ingest_stop_parser(st, true);
	if (st->cur_offset < 0)
	{
		st->eof = true;
		return;
	}
	next = next_line_offset(st, st->cur_offset);
	if (next >= st->src->size)
	{
		st->eof = true;
		return;
	}
	ingest_start_parser(st, next, st->cur_line);
}

/*
 * The current line cannot be got past by this parser (an encoding error is
 * sticky in COPY's state; a parser that stopped without moving would stop
 * there again): reject it with its raw bytes and go on from the next line
 * with a new parser.  The offsets of a transcoded file are unknown, so there
 * the file ends instead, and the reject says so in place of "detail".
 */
void
ingest_reject_line_and_skip(IngestState *st, int sqlerrcode,
							const char *message, const char *detail)
{
	bool		truncated = false;
	char	   *raw = NULL;

	if (st->cur_offset >= 0)
		raw = raw_line_at(st, st->cur_offset, next_line_offset(st, st->cur_offset), &truncated);
	ingest_add_reject(st, sqlerrcode, NULL, message,
					  st->cur_offset >= 0
					  ? detail
					  : "The file is being converted from another encoding, so the rest of it could not be read.",
					  raw, truncated);
	restart_after_current_line(st);
}

/*
 * The next record, or false at the end of the input.  Handles the "\."
 * end-of-copy marker: COPY stops there in CSV mode, which would drop the
 * rest of the file.
 */
bool
ingest_read_record(IngestState *st, char ***fields, int *nfields)
{
	for (;;)
	{
		int64		start;

		if (st->eof)
			return false;
		start = consumed_offset(st);
		st->cur_offset = start;
		st->mark_input_index = st->cstate->input_buf_index;
		st->mark_bytes = st->cstate->bytes_processed;
		st->cur_line = st->line_base + st->prev_lineno + 1;
		st->cur_column = NULL;
		if (NextCopyFromRawFields(st->cstate, fields, nfields))
		{
			st->prev_lineno = st->cstate->cur_lineno;
			return true;
		}

		/* end of COPY's input: is that the end of ours? */
		st->prev_lineno = st->cstate->cur_lineno;
		if (start >= 0 && consumed_offset(st) > start)
		{
			bool		truncated;
			int64		end = consumed_offset(st);
			char	   *raw = raw_line_at(st, start, end, &truncated);

			st->rows_read++;	/* a line that is not a row still counts */
			ingest_add_reject(st, ERRCODE_BAD_COPY_FILE_FORMAT, NULL,
							  "end-of-data marker \\. in the file",
							  "COPY treats a line holding only \\. as the end of CSV data; the line was skipped and the rest of the file loaded.",
							  raw, truncated);
			if (end < st->src->size)
			{
				ingest_stop_parser(st, false);
				ingest_start_parser(st, end, st->cur_line);
				continue;
			}
		}
		st->eof = true;
		return false;
	}
}

/* ---------------------------------------------------------------------
 * Converting and checking a record
 * ---------------------------------------------------------------------
 */
void
ingest_process_record(IngestState *st, char **fields, int nfields)
{
	TupleTableSlot *slot;
	Datum	   *values;
	bool	   *nulls;
	int			natts = st->tupdesc->natts;
	bool		imputed_any = false;
	ExprContext *econtext = GetPerTupleExprContext(st->estate);
	MemoryContext old;

	/* an empty line holds no row */
	if (st->cstate->line_buf.len == 0 && nfields == 1 && fields[0] == NULL && st->nfields > 1)
	{
		st->blank_lines++;
		return;
	}
	st->rows_read++;
	if (nfields != st->nfields)
	{
		ingest_add_reject(st, ERRCODE_BAD_COPY_FILE_FORMAT, NULL,
						  nfields == 1
						  ? psprintf("row has %d field, expected %d", nfields, st->nfields)
						  : psprintf("row has %d fields, expected %d", nfields, st->nfields),
						  st->opts->header ? "The header line names the expected fields." : NULL,
						  NULL, false);
		return;
	}

	slot = st->slots[st->nbuffered];
	ExecClearTuple(slot);
	values = slot->tts_values;
	nulls = slot->tts_isnull;
	memset(nulls, true, natts * sizeof(bool));
	ResetExprContext(econtext);

	old = MemoryContextSwitchTo(st->batchcxt);
	for (int i = 0; i < nfields; i++)
	{
		int			att = st->field_att[i];

		if (att == 0)
			continue;
		st->cur_column = NameStr(TupleDescAttr(st->tupdesc, att - 1)->attname);
		if (fields[i] != NULL)
		{
			values[att - 1] = InputFunctionCall(&st->in_funcs[att - 1], fields[i],
												st->typioparams[att - 1],
												TupleDescAttr(st->tupdesc, att - 1)->atttypmod);
			nulls[att - 1] = false;
		}
	}
	st->cur_column = NULL;

	/* columns the file does not have: load id, defaults */
	for (int att = 1; att <= natts; att++)
	{
		if (st->att_mapped[att])
			continue;
		if (att == st->load_id_att)
		{
			values[att - 1] = Int64GetDatum(st->load_id);
			nulls[att - 1] = false;
		}
		else if (st->default_exprs[att])
		{
			st->cur_column = NameStr(TupleDescAttr(st->tupdesc, att - 1)->attname);
			values[att - 1] = ExecEvalExpr(st->default_exprs[att], econtext, &nulls[att - 1]);
		}
	}
	st->cur_column = NULL;

	/* imputation of what is still missing */
	if (st->any_impute)
	{
		for (int att = 1; att <= natts; att++)
		{
			ImputeRule *rule = &st->impute[att];

			if (rule->kind == IMPUTE_NONE || !nulls[att - 1])
				continue;
			switch (rule->kind)
			{
				case IMPUTE_CONSTANT:
					values[att - 1] = rule->value;
					nulls[att - 1] = false;
					break;
				case IMPUTE_DEFAULT:
					values[att - 1] = ExecEvalExpr(rule->expr, econtext, &nulls[att - 1]);
					break;
				case IMPUTE_PREVIOUS:
					if (rule->have_previous)
					{
						Form_pg_attribute a = TupleDescAttr(st->tupdesc, att - 1);

						/*
						 * A copy in the batch: the row stays buffered after
						 * the next accepted row frees rule->previous to keep
						 * its own value.
						 */
						values[att - 1] = datumCopy(rule->previous, a->attbyval, a->attlen);
						nulls[att - 1] = false;
					}
					break;
				default:
					break;
			}
			if (!nulls[att - 1])
			{
				rule->count++;
				imputed_any = true;
			}
		}
	}
	MemoryContextSwitchTo(old);

	/* NOT NULL */
	for (int att = 1; att <= natts; att++)
	{
		Form_pg_attribute a = TupleDescAttr(st->tupdesc, att - 1);

		if (a->attnotnull && nulls[att - 1] && !a->attisdropped && !a->attgenerated)
		{
			ingest_add_reject(st, ERRCODE_NOT_NULL_VIOLATION, NameStr(a->attname),
							  psprintf("null value in column \"%s\" violates not-null constraint",
									   NameStr(a->attname)),
							  st->att_mapped[att] ? "The field is empty." : "The file has no such column and it has no default.",
							  NULL, false);
			return;
		}
	}

	ExecStoreVirtualTuple(slot);
	if (st->has_generated)
	{
		old = MemoryContextSwitchTo(st->batchcxt);
		ExecComputeStoredGenerated(st->rri, st->estate, slot, CMD_INSERT);
		MemoryContextSwitchTo(old);
	}

	/* CHECK constraints, evaluated without throwing */
	econtext->ecxt_scantuple = slot;
	for (int i = 0; i < st->nchecks; i++)
	{
		if (!ExecCheck(st->check_exprs[i], econtext))
		{
			ingest_add_reject(st, ERRCODE_CHECK_VIOLATION, NULL,
							  psprintf("new row violates check constraint \"%s\"", st->check_names[i]),
							  NULL, NULL, false);
			ExecClearTuple(slot);
			return;
		}
	}

	/* accepted */
	if (st->checked_mode)
	{
		RowOrigin  *o = &st->origins[st->nbuffered];

		o->line = st->cur_line;
		o->offset = st->cur_offset;
		old = MemoryContextSwitchTo(st->batchcxt);
		ingest_current_raw_line(st, &o->raw, &o->raw_truncated);
		MemoryContextSwitchTo(old);
	}
	if (st->any_impute)
	{
		for (int att = 1; att <= natts; att++)
		{
			ImputeRule *rule = &st->impute[att];

			if (rule->kind == IMPUTE_PREVIOUS && !nulls[att - 1])
			{
				Form_pg_attribute a = TupleDescAttr(st->tupdesc, att - 1);

				old = MemoryContextSwitchTo(st->estate->es_query_cxt);
				if (rule->have_previous && !a->attbyval)
					pfree(DatumGetPointer(rule->previous));
				rule->previous = datumCopy(values[att - 1], a->attbyval, a->attlen);
				rule->have_previous = true;
				MemoryContextSwitchTo(old);
			}
		}
	}
	if (imputed_any)
		st->rows_imputed++;
	st->buffered_bytes += st->cstate->line_buf.len + 64;
	st->nbuffered++;
}
