/*
 * ingest.c
 *	  CSV ingestion through PostgreSQL's COPY parser: bad rows are kept with
 *	  their line and reason while the good rows load, missing values are
 *	  imputed, and a file content is loaded into a target only once.
 *
 * How a file is read.  Our own byte source (a file, or client text) feeds
 * COPY's parser through a data-source callback, computing the SHA-256 of
 * the content as it goes.  Records come out of NextCopyFromRawFields() as
 * raw fields; we map them to columns by the header's names, convert them
 * with the columns' input functions, fill the other columns with their
 * defaults, apply imputation rules, and check NOT NULL and CHECK
 * constraints without throwing.
 *
 * How bad rows are kept without losing the others.  PostgreSQL 15 has no
 * soft input errors, so parsing and conversion run inside a subtransaction
 * per batch of records (not per row: that would cost too much).  When a
 * record fails, the records before it in the batch are already converted
 * and stay buffered; the bad one becomes a reject, and a new subtransaction
 * starts with the next record.  Only data errors (SQLSTATE classes 22 and
 * 23) are caught: cancel, out-of-memory, disk full and the rest are thrown
 * on at once.  Good rows are written with table_multi_insert() and index
 * maintenance outside any batch subtransaction, so no XID is spent per row.
 * A target with unique indexes or foreign keys is written in
 * subtransactions per batch instead, bisected when a batch fails, so that
 * a duplicate key or an orphan becomes a reject too.
 *
 * Errors that are not row-local.  An unterminated quote swallows the rest
 * of the input into one record: it becomes one reject saying so.  An
 * invalid byte sequence is sticky in COPY's state, and a line holding only
 * "\." ends COPY's input in CSV mode (it would silently drop the rest of
 * the file): in both cases the line becomes a reject and a new COPY parser
 * is started at the next line.  Byte offsets, which that restart needs,
 * are exact when the file is in the database encoding; for transcoded
 * files they are not recorded, and an encoding error ends the file.
 *
 * Raw lines and line numbers come from COPY's internal state
 * (commands/copyfrom_internal.h: cur_lineno, line_buf, the input buffer
 * positions), which PostgreSQL installs but does not promise to keep
 * stable; the fields used exist in 15 to 17.
 *
 * Each file is loaded in one subtransaction of its own: a content found at
 * the end to be a duplicate of an earlier load is rolled back cleanly and
 * recorded as skipped, and ingest_directory() records a file that fails
 * and goes on with the next.
 *
 * The files, sharing ingest.h (the per-load state):
 *   ingest.c          the load loop, one load start to finish, SQL entry points
 *   ingest_source.c   the byte source and its checksum
 *   ingest_files.c    which server files may be read, and opening them
 *   ingest_setup.c    target checks, header mapping, imputation, executor state
 *   ingest_read.c     reading records and converting them into rows
 *   ingest_reject.c   rejects and the reject limits
 *   ingest_writer.c   writing the buffered rows
 */
#include "postgres.h"

#include <fnmatch.h>
#include <sys/stat.h>

#include "access/table.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/fd.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

#include "ingest.h"
#include "utils.h"

PG_FUNCTION_INFO_V1(ca_ingest_csv);
PG_FUNCTION_INFO_V1(ca_ingest_csv_text);
PG_FUNCTION_INFO_V1(ca_ingest_directory);

/* ---------------------------------------------------------------------
 * The load loop
 * ---------------------------------------------------------------------
 */

/*
 * Whether COPY stopped on a quoted field that is never closed.  The parser
 * says so only in its message, which lc_messages translates, so decide by
 * its state: inside quotes a newline is data, so CopyReadLine() took the
 * rest of the input as one line, and CopyReadAttributesCSV() ran off its
 * end inside quotes.  Hence: the input is used up, and the line, scanned
 * with the parser's own quote and escape rules, ends inside quotes.  Any
 * other format error stops CopyReadLine() before the end of its input.
 */
static bool
stopped_in_open_quote(CopyFromState cstate)
{
	const char *p = cstate->line_buf.data;
	const char *end = p + cstate->line_buf.len;
	char		quotec;
	char		escapec;
	bool		in_quote = false;

	if (!cstate->opts.csv_mode || !cstate->input_reached_eof || INPUT_BUF_BYTES(cstate) > 0)
		return false;
	quotec = cstate->opts.quote[0];
	escapec = cstate->opts.escape[0];
	while (p < end)
	{
		char		c = *p++;

		if (!in_quote)
			in_quote = (c == quotec);
		else if (c == escapec && p < end && (*p == escapec || *p == quotec))
			p++;				/* an escaped quote or escape stays inside */
		else if (c == quotec)
			in_quote = false;
	}
	return in_quote;
}

/*
 * One batch: parse and convert up to BATCH_RECORDS records in a
 * subtransaction.  A data error ends the batch at the failing record, which
 * becomes a reject; the records before it stay buffered.
 */
static void
run_batch(IngestState *st)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		for (int n = 0; n < BATCH_RECORDS && !st->abort_requested; n++)
		{
			char	  **fields;
			int			nfields;

			if (st->nbuffered >= MAX_BUFFERED_ROWS || st->buffered_bytes >= MAX_BUFFERED_BYTES)
				break;
			st->phase = PHASE_READ;
			if (!ingest_read_record(st, &fields, &nfields))
				break;
			st->phase = PHASE_CONVERT;
			ingest_process_record(st, fields, nfields);
		}
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;
		bool		sticky;

		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		if (!ingest_is_row_error(edata->sqlerrcode))
			ReThrowError(edata);
		if (st->cstate)
			ingest_report_progress(st, true);

		/* the slot being filled holds nothing */
		ExecClearTuple(st->slots[st->nbuffered]);
		sticky = st->phase == PHASE_READ &&
			(edata->sqlerrcode == ERRCODE_CHARACTER_NOT_IN_REPERTOIRE ||
			 edata->sqlerrcode == ERRCODE_UNTRANSLATABLE_CHARACTER);
		if (st->phase == PHASE_READ)
		{
			/* a record that could not be split into fields still counts */
			st->rows_read++;
			st->prev_lineno = st->cstate->cur_lineno;
		}
		if (sticky)
			ingest_reject_line_and_skip(st, edata->sqlerrcode, edata->message,
										"Invalid bytes are shown as \\xNN; the rest of the file was loaded from the next line.");
		else if (st->phase == PHASE_READ && edata->sqlerrcode == ERRCODE_BAD_COPY_FILE_FORMAT &&
				 stopped_in_open_quote(st->cstate))
		{
			ingest_add_reject(st, edata->sqlerrcode, NULL, edata->message,
							  psprintf("The quote opened on line " INT64_FORMAT " is never closed, so lines "
									   INT64_FORMAT " to " INT64_FORMAT " could not be split into rows.",
									   st->cur_line, st->cur_line,
									   (int64) (st->line_base + st->cstate->cur_lineno)),
							  NULL, false);
		}
		else if (st->phase == PHASE_READ &&
				 st->cstate->input_buf_index == st->mark_input_index &&
				 st->cstate->bytes_processed == st->mark_bytes)
		{
			/*
			 * The parser stopped without moving (a line ending unlike the
			 * first line's): reading again would fail the same way, so go on
			 * from the next line with a new parser.
			 */
			ingest_reject_line_and_skip(st, edata->sqlerrcode, edata->message,
										"The rest of the file was loaded from the next line.");
		}
		else
			ingest_add_reject(st, edata->sqlerrcode,
							  st->phase == PHASE_CONVERT ? st->cur_column : NULL,
							  edata->message, edata->detail, NULL, false);
		FreeErrorData(edata);
	}
	PG_END_TRY();
}

/* ---------------------------------------------------------------------
 * One load, start to finish
 * ---------------------------------------------------------------------
 */
typedef struct LoadResult
{
	int64		load_id;
	char	   *file;
	const char *status;
	int64		rows_read;
	int64		rows_loaded;
	int64		rows_rejected;
	int64		rows_imputed;
	double		seconds;
} LoadResult;

/*
 * Serialize loads of the same thing into the same target: an advisory
 * transaction lock on a hash of (kind, target, what).
 */
static void
lock_pair(const char *kind, const char *target, const char *what)
{
	char	   *key = psprintf("customer_analytics.ingest:%s:%s:%s", kind, target, what);
	Datum		hash = DirectFunctionCall2Coll(hashtextextended, C_COLLATION_OID,
											   CStringGetTextDatum(key), Int64GetDatum(0));

	DirectFunctionCall1(pg_advisory_xact_lock_int8, hash);
}

/* A committed (or our own) load of this content into this target. */
static int64
find_loaded(const char *target, const char *column, const char *value,
			int64 size, TimestampTz mtime, bool match_identity)
{
	Oid			types[4] = {TEXTOID, TEXTOID, INT8OID, TIMESTAMPTZOID};
	Datum		values[4];
	int64		found = 0;
	char	   *sql;

	values[0] = CStringGetTextDatum(target);
	values[1] = CStringGetTextDatum(value);
	values[2] = Int64GetDatum(size);
	values[3] = TimestampTzGetDatum(mtime);
	sql = psprintf("SELECT load_id FROM customer_analytics.ingest_load "
				   "WHERE target OPERATOR(pg_catalog.=) $1 AND %s OPERATOR(pg_catalog.=) $2 "
				   "AND status OPERATOR(pg_catalog.=) 'loaded'%s "
				   "ORDER BY load_id LIMIT 1",
				   column,
				   match_identity ? " AND file_size OPERATOR(pg_catalog.=) $3"
				   " AND file_mtime OPERATOR(pg_catalog.=) $4" : "");

	/*
	 * Not read-only: in READ COMMITTED that takes a new snapshot, which sees
	 * a concurrent load that committed while we waited for its lock.
	 */
	SPI_connect();
	SPI_execute_with_args(sql, match_identity ? 4 : 2, types, values, NULL, false, 1);
	if (SPI_processed > 0)
	{
		bool		isnull;

		found = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	}
	SPI_finish();
	return found;
}

static void
json_text_member(StringInfo buf, const char *key, const char *value)
{
	appendStringInfo(buf, "%s\"%s\": ", buf->len > 1 ? ", " : "", key);
	if (value)
		escape_json(buf, value);
	else
		appendStringInfoString(buf, "null");
}

/* the options of a load, as recorded in ingest_load.options */
static char *
options_json(IngestOptions *o)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	json_text_member(&buf, "header", o->header ? "true" : "false");
	json_text_member(&buf, "delimiter", o->delimiter);
	json_text_member(&buf, "quote", o->quote);
	json_text_member(&buf, "escape", o->escape);
	json_text_member(&buf, "null", o->null_string);
	json_text_member(&buf, "encoding", o->encoding);
	json_text_member(&buf, "on_error", o->abort_on_error ? "abort" : "reject");
	json_text_member(&buf, "ignore_extra_columns", o->ignore_extra_columns ? "true" : "false");
	json_text_member(&buf, "force", o->force ? "true" : "false");
	json_text_member(&buf, "validate", o->validate ? "true" : "false");
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

static void
record_load(IngestState *st, const char *status, const char *checksum, int64 size,
			TimestampTz mtime, bool have_mtime, int64 duplicate_of, const char *message,
			TimestampTz started)
{
	StringInfoData imputed;
	Oid			types[18] = {INT8OID, TEXTOID, TEXTOID, INT8OID, TIMESTAMPTZOID, TEXTOID, TEXTOID,
		BOOLOID, INT8OID, INT8OID, INT8OID, INT8OID, INT8OID, INT8OID, TEXTOID, TEXTOID, TEXTOID,
	TIMESTAMPTZOID};
	Datum		values[18];
	char		nulls[18];

	initStringInfo(&imputed);
	appendStringInfoChar(&imputed, '{');
	if (st->impute)
		for (int att = 1; att <= st->tupdesc->natts; att++)
			if (st->impute[att].count > 0)
				appendStringInfo(&imputed, "%s\"%s\": " INT64_FORMAT, imputed.len > 1 ? ", " : "",
								 NameStr(TupleDescAttr(st->tupdesc, att - 1)->attname),
								 st->impute[att].count);
	appendStringInfoChar(&imputed, '}');

	memset(nulls, ' ', sizeof(nulls));
	values[0] = Int64GetDatum(st->load_id);
	values[1] = CStringGetTextDatum(st->target_name);
	values[2] = CStringGetTextDatum(st->file_label);
	values[3] = Int64GetDatum(size);
	values[4] = TimestampTzGetDatum(mtime);
	if (!have_mtime)
		nulls[4] = 'n';
	values[5] = checksum ? CStringGetTextDatum(checksum) : (Datum) 0;
	if (!checksum)
		nulls[5] = 'n';
	values[6] = CStringGetTextDatum(status);
	values[7] = BoolGetDatum(st->opts->force);
	values[8] = Int64GetDatum(duplicate_of);
	if (duplicate_of == 0)
		nulls[8] = 'n';
	values[9] = Int64GetDatum(st->rows_read);
	values[10] = Int64GetDatum(st->rows_loaded);
	values[11] = Int64GetDatum(st->rows_rejected);
	values[12] = Int64GetDatum(st->rows_imputed);
	values[13] = Int64GetDatum(st->blank_lines);
	values[14] = CStringGetTextDatum(imputed.data);
	values[15] = CStringGetTextDatum(options_json(st->opts));
	values[16] = message ? CStringGetTextDatum(message) : (Datum) 0;
	if (!message)
		nulls[16] = 'n';
	values[17] = TimestampTzGetDatum(started);
	SPI_connect();
	SPI_execute_with_args("INSERT INTO customer_analytics.ingest_load "
						  "(load_id, target, file, file_size, file_mtime, checksum, status, forced, duplicate_of, "
						  " rows_read, rows_loaded, rows_rejected, rows_imputed, blank_lines, imputed, options, "
						  " message, started_at, finished_at) "
						  "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, "
						  " $15::pg_catalog.jsonb, $16::pg_catalog.jsonb, $17, $18, pg_catalog.clock_timestamp())",
						  18, types, values, nulls, false, 0);
	SPI_finish();
}

static int64
next_load_id(void)
{
	Oid			seq = get_relname_relid("load_id_seq", get_namespace_oid("customer_analytics", false));

	return nextval_internal(seq, false);
}

/*
 * Read and load one source into rel.  Runs inside the caller's
 * subtransaction; throws on errors that are not about a row (and, in abort
 * mode or past a reject limit, on those too).
 */
static void
load_source(IngestState *st)
{
	PG_TRY();
	{
		char	  **header = NULL;
		int			nheader = 0;

		ingest_start_parser(st, 0, 0);
		if (st->opts->header)
		{
			st->cur_line = 1;
			st->cur_offset = 0;
			if (!NextCopyFromRawFields(st->cstate, &header, &nheader))
				st->eof = true;
			st->prev_lineno = st->cstate->cur_lineno;
		}
		if (!st->eof || !st->opts->header)
		{
			ingest_map_columns(st, st->opts->header ? header : NULL, nheader);
			ingest_load_imputation_rules(st);
			ingest_check_required_columns(st);
		}
		while (!st->eof)
		{
			run_batch(st);
			if (st->abort_requested)
				break;
			if (st->nbuffered >= MAX_BUFFERED_ROWS || st->buffered_bytes >= MAX_BUFFERED_BYTES || st->eof)
				ingest_flush_rows(st);
			ingest_flush_rejects(st);
			ingest_check_reject_limits(st, false);
			CHECK_FOR_INTERRUPTS();
		}
		ingest_check_reject_limits(st, false);
		ingest_flush_rows(st);
		ingest_flush_rejects(st);
		ingest_check_reject_limits(st, true);
		if (st->reject_plan)
			SPI_freeplan(st->reject_plan);
		st->reject_plan = NULL;
		ingest_stop_parser(st, false);
		pgstat_progress_end_command();
	}
	PG_CATCH();
	{
		ingest_stop_parser(st, true);
		if (st->reject_plan)
			SPI_freeplan(st->reject_plan);
		st->reject_plan = NULL;
		PG_RE_THROW();
	}
	PG_END_TRY();
}

/*
 * Cancel, terminate and resource exhaustion end a landing directory's load
 * rather than failing one of its files.
 */
static bool
error_ends_directory(int sqlerrcode)
{
	return sqlerrcode == ERRCODE_QUERY_CANCELED ||
		sqlerrcode == ERRCODE_ADMIN_SHUTDOWN ||
		ERRCODE_TO_CATEGORY(sqlerrcode) == ERRCODE_INSUFFICIENT_RESOURCES;
}

/*
 * Load one file or text into the target, with exactly-once bookkeeping.
 * fd is an ingest_open_server_file() descriptor, or -1 for client text (data, size
 * given); the caller closes it.
 */
static LoadResult
ingest_one(Relation rel, IngestOptions *opts, int fd, const char *label,
		   const char *data, int64 size, TimestampTz mtime, bool from_directory)
{
	IngestState *st = palloc0(sizeof(IngestState));
	ByteSource *src = palloc0(sizeof(ByteSource));
	LoadResult	result;
	TimestampTz started = GetCurrentTimestamp();
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	volatile int64 duplicate_of = 0;
	char	   *volatile checksum = NULL;
	const char *volatile status = NULL;
	char	   *failure = NULL;
	bool		have_mtime = (fd >= 0);

	st->rel = rel;
	st->tupdesc = RelationGetDescr(rel);
	st->opts = opts;
	st->target_name = ca_relation_name(RelationGetRelid(rel));
	st->file_label = pstrdup(label);
	st->db_encoding = GetDatabaseEncoding();
	st->copy_options = ingest_copy_options(opts);
	st->src = src;
	src->path = label;
	src->fd = fd;
	src->data = data;
	src->size = size;
	src->scratch = palloc(SOURCE_CHUNK);

	/* the same file (name, size, mtime) is not read again */
	lock_pair("file", st->target_name, label);
	if (fd >= 0 && !opts->force && !opts->validate)
	{
		int64		loaded = find_loaded(st->target_name, "file", label, size, mtime, true);

		if (loaded > 0)
		{
			ereport(NOTICE,
					(errmsg("\"%s\" was already loaded into %s (load " INT64_FORMAT "): skipped",
							label, st->target_name, loaded),
					 errhint("Pass force => true to load it again.")));
			st->load_id = next_load_id();
			record_load(st, "skipped", NULL, size, mtime, have_mtime, loaded,
						"same file name, size and modification time", started);
			result.load_id = st->load_id;
			result.file = st->file_label;
			result.status = "skipped";
			result.rows_read = result.rows_loaded = result.rows_rejected = result.rows_imputed = 0;
			result.seconds = 0;
			return result;
		}
	}

	st->load_id = next_load_id();
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		src->hash = pg_cryptohash_create(PG_SHA256);
		if (pg_cryptohash_init(src->hash) < 0)
			elog(ERROR, "could not initialize SHA-256 checksum");

		ingest_setup_executor(st);
		load_source(st);
		checksum = ingest_source_checksum(src);
		ingest_teardown_executor(st);

		/* the same content loaded before (or concurrently) is skipped */
		if (!opts->validate)
		{
			lock_pair("content", st->target_name, checksum);
			if (!opts->force)
				duplicate_of = find_loaded(st->target_name, "checksum", checksum, 0, 0, false);
		}
		if (duplicate_of > 0)
		{
			RollbackAndReleaseCurrentSubTransaction();
			status = "skipped";
		}
		else
		{
			status = opts->validate ? "validated" : "loaded";
			record_load(st, status, checksum, size, mtime, have_mtime, 0, NULL, started);
			ReleaseCurrentSubTransaction();
		}
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;

		/*
		 * A file of a directory that fails is recorded and the next one goes
		 * on; a direct call reports the error to its caller.  Cancel and the
		 * like always go up.
		 */
		if (!from_directory || error_ends_directory(edata->sqlerrcode))
			ReThrowError(edata);
		failure = psprintf("%s [SQLSTATE %s]", edata->message, unpack_sql_state(edata->sqlerrcode));
		ereport(WARNING,
				(errmsg("could not load \"%s\" into %s: %s", label, st->target_name, edata->message),
				 edata->detail ? errdetail_internal("%s", edata->detail) : 0,
				 edata->hint ? errhint("%s", edata->hint) : 0));
		status = "failed";
		st->rows_loaded = 0;
		FreeErrorData(edata);
	}
	PG_END_TRY();

	if (duplicate_of > 0)
	{
		ereport(NOTICE,
				(errmsg("the content of \"%s\" was already loaded into %s (load " INT64_FORMAT "): skipped",
						label, st->target_name, duplicate_of),
				 errhint("Pass force => true to load it again.")));
		record_load(st, "skipped", checksum, size, mtime, have_mtime, duplicate_of,
					"same content (SHA-256) as an earlier load", started);
		st->rows_loaded = st->rows_rejected = st->rows_imputed = 0;
	}
	else if (failure)
		record_load(st, "failed", NULL, size, mtime, have_mtime, 0, failure, started);

	result.load_id = st->load_id;
	result.file = st->file_label;
	result.status = status;
	result.rows_read = st->rows_read;
	result.rows_loaded = st->rows_loaded;
	result.rows_rejected = st->rows_rejected;
	result.rows_imputed = st->rows_imputed;
	result.seconds = (double) (GetCurrentTimestamp() - started) / USECS_PER_SEC;
	if (strcmp(status, "loaded") == 0 || strcmp(status, "validated") == 0)
		ereport(NOTICE,
				(opts->validate
				 ? errmsg("validated " INT64_FORMAT " of " INT64_FORMAT " rows from \"%s\" for %s in %.2f s; "
						  INT64_FORMAT " rejected, " INT64_FORMAT " with imputed values",
						  st->rows_loaded, st->rows_read, label, st->target_name, result.seconds,
						  st->rows_rejected, st->rows_imputed)
				 : errmsg("loaded " INT64_FORMAT " of " INT64_FORMAT " rows from \"%s\" into %s in %.2f s; "
						  INT64_FORMAT " rejected, " INT64_FORMAT " with imputed values",
						  st->rows_loaded, st->rows_read, label, st->target_name, result.seconds,
						  st->rows_rejected, st->rows_imputed),
				 st->rows_rejected > 0
				 ? errhint("The rejected rows are in customer_analytics.ingest_reject with load_id " INT64_FORMAT ".",
						   st->load_id) : 0));
	return result;
}

/* ---------------------------------------------------------------------
 * SQL entry points
 * ---------------------------------------------------------------------
 */
static char *
text_arg_or(FunctionCallInfo fcinfo, int n, const char *dflt)
{
	return PG_ARGISNULL(n) ? (dflt ? pstrdup(dflt) : NULL) : text_to_cstring(PG_GETARG_TEXT_PP(n));
}

/*
 * Options in the common argument order: header, delimiter, quote, escape,
 * null_string, encoding (absent for text), column_map, ignore_extra_columns,
 * on_error, max_rejects, max_reject_ratio, force, validate.
 */
static IngestOptions *
parse_options(FunctionCallInfo fcinfo, int first, bool has_encoding, bool has_force)
{
	IngestOptions *o = palloc0(sizeof(IngestOptions));
	int			i = first;
	char	   *on_error;

	o->header = PG_ARGISNULL(i) ? true : PG_GETARG_BOOL(i);
	i++;
	o->delimiter = text_arg_or(fcinfo, i++, ",");
	o->quote = text_arg_or(fcinfo, i++, "\"");
	o->escape = text_arg_or(fcinfo, i++, NULL);
	o->null_string = text_arg_or(fcinfo, i++, "");
	if (has_encoding)
		o->encoding = text_arg_or(fcinfo, i++, NULL);
	o->column_map = PG_ARGISNULL(i) ? NULL : PG_GETARG_JSONB_P(i);
	i++;
	o->ignore_extra_columns = PG_ARGISNULL(i) ? false : PG_GETARG_BOOL(i);
	i++;
	on_error = text_arg_or(fcinfo, i++, "reject");
	if (strcmp(on_error, "reject") == 0)
		o->abort_on_error = false;
	else if (strcmp(on_error, "abort") == 0)
		o->abort_on_error = true;
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid on_error \"%s\"", on_error),
				 errhint("Use 'reject' (keep bad rows aside and load the others) or 'abort' (refuse the file at its first bad row).")));
	o->max_rejects = PG_ARGISNULL(i) ? -1 : PG_GETARG_INT64(i);
	i++;
	o->max_reject_ratio = PG_ARGISNULL(i) ? -1 : PG_GETARG_FLOAT8(i);
	i++;
	if (o->max_rejects < -1 || (o->max_reject_ratio != -1 && (o->max_reject_ratio < 0 || o->max_reject_ratio > 1)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_rejects must be at least 0 and max_reject_ratio between 0 and 1")));
	if (has_force)
	{
		o->force = PG_ARGISNULL(i) ? false : PG_GETARG_BOOL(i);
		i++;
		o->validate = PG_ARGISNULL(i) ? false : PG_GETARG_BOOL(i);
	}
	return o;
}

static void
put_result(ReturnSetInfo *rsinfo, LoadResult *r)
{
	Datum		values[8];
	bool		nulls[8] = {false, false, false, false, false, false, false, false};

	values[0] = Int64GetDatum(r->load_id);
	values[1] = CStringGetTextDatum(r->file);
	values[2] = CStringGetTextDatum(r->status);
	values[3] = Int64GetDatum(r->rows_read);
	values[4] = Int64GetDatum(r->rows_loaded);
	values[5] = Int64GetDatum(r->rows_rejected);
	values[6] = Int64GetDatum(r->rows_imputed);
	values[7] = Float8GetDatum(r->seconds);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

static Relation
open_target(FunctionCallInfo fcinfo)
{
	Relation	rel;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the target table must not be NULL")));
	rel = table_open(PG_GETARG_OID(0), RowExclusiveLock);
	ingest_check_target(rel);
	return rel;
}

/* ingest_csv(target, path, options...) */
Datum
ca_ingest_csv(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	IngestOptions *opts;
	Relation	rel;
	char	   *path;
	ServerFile	f;
	LoadResult	r;

	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the path of the file to load must not be NULL")));
	path = ingest_check_server_path(text_to_cstring(PG_GETARG_TEXT_PP(1)), "file");
	opts = parse_options(fcinfo, 2, true, true);
	rel = open_target(fcinfo);
	ingest_open_server_file(path, &f);
	InitMaterializedSRF(fcinfo, 0);
	r = ingest_one(rel, opts, f.fd, path, NULL, f.size, f.mtime, false);
	CloseTransientFile(f.fd);
	put_result(rsinfo, &r);
	table_close(rel, NoLock);
	return (Datum) 0;
}

/* ingest_csv_text(target, data, options..., source_name) */
Datum
ca_ingest_csv_text(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	IngestOptions *opts;
	Relation	rel;
	text	   *data;
	char	   *label;
	LoadResult	r;

	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the data to load must not be NULL")));
	data = PG_GETARG_TEXT_PP(1);
	opts = parse_options(fcinfo, 2, false, true);
	label = text_arg_or(fcinfo, 14, "client data");
	rel = open_target(fcinfo);
	InitMaterializedSRF(fcinfo, 0);
	r = ingest_one(rel, opts, -1, label, VARDATA_ANY(data), VARSIZE_ANY_EXHDR(data), 0, false);
	put_result(rsinfo, &r);
	table_close(rel, NoLock);
	return (Datum) 0;
}

static int
compare_names(const void *a, const void *b)
{
	return strcmp(*(char *const *) a, *(char *const *) b);
}

/*
 * Open one entry of a landing directory, in a subtransaction so that a
 * refusal can be caught.  An entry that cannot be loaded (a FIFO, a
 * device, a link out of the allowed directories, an unreadable file)
 * becomes a failed load with its reason and a WARNING, and the directory
 * goes on; one that disappeared since the directory was listed (moved
 * away by its writer) is passed over quietly.
 */
static bool
open_directory_entry(Relation rel, IngestOptions *opts, const char *target_name,
					 const char *path, ServerFile *f, ReturnSetInfo *rsinfo)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	TimestampTz started = GetCurrentTimestamp();
	ErrorData  *volatile edata = NULL;
	IngestState *st;
	LoadResult	r;
	struct stat lst;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		ingest_open_server_file(path, f);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		if (error_ends_directory(edata->sqlerrcode))
			ReThrowError(edata);
	}
	PG_END_TRY();
	if (edata == NULL)
		return true;
	if (edata->sqlerrcode == ERRCODE_UNDEFINED_FILE && lstat(path, &lst) != 0 && errno == ENOENT)
		return false;

	ereport(WARNING,
			(errmsg("could not load \"%s\" into %s: %s", path, target_name, edata->message),
			 edata->detail ? errdetail_internal("%s", edata->detail) : 0,
			 edata->hint ? errhint("%s", edata->hint) : 0));
	st = palloc0(sizeof(IngestState));
	st->rel = rel;
	st->tupdesc = RelationGetDescr(rel);
	st->opts = opts;
	st->target_name = pstrdup(target_name);
	st->file_label = pstrdup(path);
	st->load_id = next_load_id();
	record_load(st, "failed", NULL, 0, 0, false, 0,
				psprintf("%s [SQLSTATE %s]", edata->message, unpack_sql_state(edata->sqlerrcode)),
				started);
	memset(&r, 0, sizeof(r));
	r.load_id = st->load_id;
	r.file = st->file_label;
	r.status = "failed";
	r.seconds = (double) (GetCurrentTimestamp() - started) / USECS_PER_SEC;
	put_result(rsinfo, &r);
	FreeErrorData(edata);
	return false;
}

/* ingest_directory(target, directory, pattern, options...) */
Datum
ca_ingest_directory(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	IngestOptions *opts;
	Relation	rel;
	char	   *dirpath;
	char	   *pattern;
	DIR		   *dir;
	struct dirent *de;
	char	  **names = NULL;
	int			nnames = 0;
	int			capacity = 64;
	char	   *target_name;

	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the directory to load must not be NULL")));
	dirpath = ingest_check_server_path(text_to_cstring(PG_GETARG_TEXT_PP(1)), "directory");
	pattern = text_arg_or(fcinfo, 2, "*.csv");
	opts = parse_options(fcinfo, 3, true, false);
	rel = open_target(fcinfo);
	target_name = ca_relation_name(RelationGetRelid(rel));
	InitMaterializedSRF(fcinfo, 0);

	dir = AllocateDir(dirpath);
	if (dir == NULL)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open directory \"%s\": %m", dirpath)));
	ingest_check_opened_path(dirfd(dir), dirpath, "directory");
	names = palloc(sizeof(char *) * capacity);
	while ((de = ReadDir(dir, dirpath)) != NULL)
	{
		if (de->d_name[0] == '.' || fnmatch(pattern, de->d_name, 0) != 0)
			continue;
		if (nnames == capacity)
		{
			capacity *= 2;
			names = repalloc(names, sizeof(char *) * capacity);
		}
		names[nnames++] = pstrdup(de->d_name);
	}
	FreeDir(dir);
	qsort(names, nnames, sizeof(char *), compare_names);

	for (int i = 0; i < nnames; i++)
	{
		char	   *path = psprintf("%s/%s", dirpath, names[i]);
		ServerFile	f;
		LoadResult	r;

		CHECK_FOR_INTERRUPTS();
		if (!open_directory_entry(rel, opts, target_name, path, &f, rsinfo))
			continue;

		/*
		 * files already loaded are passed over quietly: this runs every
		 * minute
		 */
		if (find_loaded(target_name, "file", path, f.size, f.mtime, true) == 0)
		{
			r = ingest_one(rel, opts, f.fd, path, NULL, f.size, f.mtime, true);
			put_result(rsinfo, &r);
		}
		CloseTransientFile(f.fd);
	}
	table_close(rel, NoLock);
	return (Datum) 0;
}
