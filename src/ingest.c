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
 */
#include "postgres.h"

#include <fcntl.h>
#include <fnmatch.h>
#include <sys/stat.h>
#include <unistd.h>

#include "access/heapam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_type.h"
#include "commands/copy.h"
#include "commands/copyfrom_internal.h"
#include "commands/progress.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "common/cryptohash.h"
#include "common/sha2.h"
#include "executor/executor.h"
#include "executor/nodeModifyTable.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "optimizer/optimizer.h"
#include "pgstat.h"
#include "rewrite/rewriteHandler.h"
#include "storage/fd.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/rls.h"
#include "utils/timestamp.h"
#include "utils/varlena.h"

#include "customer_analytics.h"

PG_FUNCTION_INFO_V1(ca_ingest_csv);
PG_FUNCTION_INFO_V1(ca_ingest_csv_text);
PG_FUNCTION_INFO_V1(ca_ingest_directory);

#define BATCH_RECORDS 1000		/* records parsed per subtransaction */
#define MAX_BUFFERED_ROWS 1000	/* rows per multi-insert, as COPY */
#define MAX_BUFFERED_BYTES 65536
#define MAX_RAW_LINE 65536		/* longest raw line kept in a reject */
#define SOURCE_CHUNK 65536

/* customer_analytics.ingest_allowed_directories */
static char *allowed_directories = NULL;

void
ca_ingest_init(void)
{
	DefineCustomStringVariable(CA_GUC_PREFIX ".ingest_allowed_directories",
							   "Directories ingest_csv() and ingest_directory() may read from (comma-separated); empty: any.",
							   "The file actually opened is checked, with its links resolved, so neither '..' nor a symbolic link leads out.",
							   &allowed_directories,
							   "",
							   PGC_SUSET,
							   GUC_LIST_INPUT,
							   NULL, NULL, NULL);
}

/* ---------------------------------------------------------------------
 * Options
 * ---------------------------------------------------------------------
 */
typedef struct IngestOptions
{
	bool		header;
	char	   *delimiter;
	char	   *quote;
	char	   *escape;			/* NULL: same as quote */
	char	   *null_string;
	char	   *encoding;		/* NULL: database encoding */
	Jsonb	   *column_map;
	bool		ignore_extra_columns;
	bool		abort_on_error;
	int64		max_rejects;	/* -1: no limit */
	double		max_reject_ratio;	/* -1: no limit */
	bool		force;
	bool		validate;
} IngestOptions;

/* ---------------------------------------------------------------------
 * Byte source: a file or text in memory, hashed once in order
 * ---------------------------------------------------------------------
 */
typedef struct ByteSource
{
	int			fd;				/* -1 for memory */
	const char *path;			/* for messages */
	const char *data;			/* memory source */
	int64		size;
	int64		pos;			/* next byte to give to COPY */
	int64		hashed;			/* [0, hashed) is in the checksum */
	pg_cryptohash_ctx *hash;
	char	   *scratch;
} ByteSource;

static size_t
source_pread(ByteSource *src, int64 pos, char *buf, size_t n)
{
	if (pos >= src->size || n == 0)
		return 0;
	n = Min(n, (size_t) (src->size - pos));
	if (src->fd < 0)
	{
		memcpy(buf, src->data + pos, n);
		return n;
	}
	for (size_t done = 0; done < n;)
	{
		ssize_t		got = pg_pread(src->fd, buf + done, n - done, (off_t) (pos + done));

		if (got < 0 && errno == EINTR)
		{
			CHECK_FOR_INTERRUPTS();
			continue;
		}
		if (got < 0)
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not read file \"%s\": %m", src->path)));
		if (got == 0)
			return done;
		done += got;
	}
	return n;
}

static void
source_hash(ByteSource *src, const char *buf, size_t n)
{
	if (pg_cryptohash_update(src->hash, (const uint8 *) buf, n) < 0)
		elog(ERROR, "could not update SHA-256 checksum");
	src->hashed += n;
}

/* Extend the checksum to cover [0, upto), reading any gap. */
static void
source_hash_upto(ByteSource *src, int64 upto)
{
	upto = Min(upto, src->size);
	while (src->hashed < upto)
	{
		size_t		n = source_pread(src, src->hashed, src->scratch,
									 Min((int64) SOURCE_CHUNK, upto - src->hashed));

		if (n == 0)
			break;
		source_hash(src, src->scratch, n);
		CHECK_FOR_INTERRUPTS();
	}
}

/* CaChunkProducer: the next chunk for COPY, hashing bytes seen first */
static bool
source_produce(void *arg, StringInfo out)
{
	ByteSource *src = arg;
	size_t		n;

	enlargeStringInfo(out, SOURCE_CHUNK);
	n = source_pread(src, src->pos, out->data + out->len, SOURCE_CHUNK);
	if (n > 0)
	{
		/* bytes before pos that were skipped by a restart get hashed first */
		source_hash_upto(src, src->pos);
		if (src->hashed == src->pos)
			source_hash(src, out->data + out->len, n);
		else if (src->hashed < src->pos + (int64) n)
			source_hash(src, out->data + out->len + (src->hashed - src->pos),
						src->pos + n - src->hashed);
		out->len += n;
		out->data[out->len] = '\0';
		src->pos += n;
	}
	else if (src->pos < src->size)
	{
		/* else COPY would wait forever for the bytes fstat() promised */
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("file \"%s\" shrank while it was being read", src->path),
				 errdetail("It had " INT64_FORMAT " bytes when it was opened; reading stopped at byte " INT64_FORMAT ".",
						   src->size, src->pos),
				 errhint("Write files into the landing directory under another name and rename them when complete.")));
	}
	return src->pos < src->size;
}

static char *
source_finish_checksum(ByteSource *src)
{
	uint8		digest[PG_SHA256_DIGEST_LENGTH];
	char	   *hex = palloc(PG_SHA256_DIGEST_LENGTH * 2 + 1);

	source_hash_upto(src, src->size);
	if (pg_cryptohash_final(src->hash, digest, sizeof(digest)) < 0)
		elog(ERROR, "could not finish SHA-256 checksum");
	/* it belongs to the file's subtransaction: free it before that ends */
	pg_cryptohash_free(src->hash);
	src->hash = NULL;
	hex_encode((const char *) digest, sizeof(digest), hex);
	hex[PG_SHA256_DIGEST_LENGTH * 2] = '\0';
	return hex;
}

/* ---------------------------------------------------------------------
 * Per-load state
 * ---------------------------------------------------------------------
 */
typedef enum ImputeKind
{
	IMPUTE_NONE,
	IMPUTE_CONSTANT,
	IMPUTE_DEFAULT,
	IMPUTE_PREVIOUS
} ImputeKind;

typedef struct ImputeRule
{
	ImputeKind	kind;
	Datum		value;			/* constant (also 'unknown') */
	ExprState  *expr;			/* default */
	bool		have_previous;
	Datum		previous;
	int64		count;
} ImputeRule;

typedef struct PendingReject
{
	int64		line;
	int64		offset;			/* -1: unknown */
	char	   *raw;
	bool		raw_truncated;
	char	   *column;
	char		sqlstate[6];
	char	   *message;
	char	   *detail;
} PendingReject;

typedef struct RowOrigin		/* where a buffered row came from (checked
								 * mode) */
{
	int64		line;
	int64		offset;
	char	   *raw;
	bool		raw_truncated;
} RowOrigin;

typedef enum Phase
{
	PHASE_READ,
	PHASE_CONVERT
} Phase;

typedef struct IngestState
{
	Relation	rel;
	TupleDesc	tupdesc;
	IngestOptions *opts;
	int64		load_id;
	char	   *target_name;
	char	   *file_label;
	ByteSource *src;
	List	   *copy_options;
	int			db_encoding;

	/* mapping: CSV field i goes to attribute field_att[i] (0: ignored) */
	int			nfields;
	int		   *field_att;
	bool	   *att_mapped;		/* per attribute (1-based) */
	FmgrInfo   *in_funcs;
	Oid		   *typioparams;
	ExprState **default_exprs;	/* per attribute not mapped, or NULL */
	AttrNumber	load_id_att;
	ImputeRule *impute;			/* per attribute */
	bool		any_impute;
	int			nchecks;
	ExprState **check_exprs;
	char	  **check_names;
	bool		has_generated;

	/* executor */
	EState	   *estate;
	ResultRelInfo *rri;
	BulkInsertState bistate;
	CommandId	cid;
	bool		checked_mode;	/* unique indexes or foreign keys */
	bool		has_ri_triggers;

	/* buffered rows */
	TupleTableSlot **slots;
	RowOrigin  *origins;
	int			nbuffered;
	Size		buffered_bytes;
	MemoryContext batchcxt;

	/* rejects waiting to be written, and the statement that writes them */
	List	   *rejects;
	SPIPlanPtr	reject_plan;
	MemoryContext rejectcxt;

	/* COPY parser and position */
	CaCopyReader *reader;
	CopyFromState cstate;
	bool		transcoding;
	int64		session_start;	/* byte offset where this parser started */
	int64		line_base;		/* lines before this parser's first line */
	uint64		prev_lineno;	/* cstate->cur_lineno after the last record */

	/* parser position before the current record, to see that it moved */
	int			mark_input_index;
	uint64		mark_bytes;

	/* current record */
	Phase		phase;
	int64		cur_line;
	int64		cur_offset;
	const char *cur_column;
	bool		abort_requested;
	bool		eof;

	/* counters */
	int64		rows_read;
	int64		rows_loaded;
	int64		rows_rejected;
	int64		rows_imputed;
	int64		blank_lines;
} IngestState;

static void report_progress(IngestState *st, bool restart);

/* ---------------------------------------------------------------------
 * Rejects
 * ---------------------------------------------------------------------
 */

/* Copy raw bytes into valid database-encoding text, invalid bytes as \xNN. */
static char *
escape_raw(IngestState *st, const char *bytes, int len, bool *truncated)
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
static void
current_raw_line(IngestState *st, char **raw, bool *truncated)
{
	if (st->cstate)
		*raw = escape_raw(st, st->cstate->line_buf.data, st->cstate->line_buf.len, truncated);
	else
	{
		*raw = NULL;
		*truncated = false;
	}
}

static void
add_reject(IngestState *st, int sqlerrcode, const char *column,
		   const char *message, const char *detail, char *raw, bool raw_truncated)
{
	MemoryContext old = MemoryContextSwitchTo(st->rejectcxt);
	PendingReject *r = palloc0(sizeof(PendingReject));

	r->line = st->cur_line;
	r->offset = st->cur_offset;
	if (raw == NULL)
		current_raw_line(st, &r->raw, &r->raw_truncated);
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
 * check_reject_limits() names the reject that aborted it from the list.
 */
static void
flush_rejects(IngestState *st)
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

/* ---------------------------------------------------------------------
 * Writing rows
 * ---------------------------------------------------------------------
 */
static void
insert_slots(IngestState *st, int lo, int hi)
{
	/*
	 * heap_multi_insert and the index AMs allocate as they go: in the batch
	 * context, which flush_rows() resets, so memory does not grow with the
	 * file.
	 */
	MemoryContext old = MemoryContextSwitchTo(st->batchcxt);

	/*
	 * A bulk-insert state keeps a page pinned between calls, which must not
	 * cross the subtransactions of checked mode.
	 */
	table_multi_insert(st->rel, st->slots + lo, hi - lo, st->cid, 0,
					   st->checked_mode ? NULL : st->bistate);
	for (int i = lo; i < hi; i++)
	{
		List	   *recheck = NIL;

		if (st->rri->ri_NumIndices > 0)
			recheck = ca_ExecInsertIndexTuples(st->rri, st->slots[i], st->estate,
											   false, false, NULL, NIL);
		if (st->has_ri_triggers)
			ExecARInsertTriggers(st->estate, st->rri, st->slots[i], recheck, NULL);
		list_free(recheck);
	}
	MemoryContextSwitchTo(old);
}

static bool
is_row_error(int sqlerrcode)
{
	int			category = ERRCODE_TO_CATEGORY(sqlerrcode);

	return category == ERRCODE_DATA_EXCEPTION ||
		category == ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION;
}

/*
 * The foreign-key triggers fetch inserted rows into the result relation's
 * trigger slots, which keep a buffer pinned; the pin belongs to the
 * subtransaction and must be dropped before it ends.
 */
static void
clear_slots_of(ResultRelInfo *rri)
{
	if (rri->ri_TrigNewSlot)
		ExecClearTuple(rri->ri_TrigNewSlot);
	if (rri->ri_TrigOldSlot)
		ExecClearTuple(rri->ri_TrigOldSlot);
}

static void
clear_trigger_slots(IngestState *st)
{
	ListCell   *lc;

	clear_slots_of(st->rri);
	foreach(lc, st->estate->es_trig_target_relations)
		clear_slots_of((ResultRelInfo *) lfirst(lc));
}

/*
 * Checked mode: insert slots [lo, hi) in a subtransaction, firing the
 * foreign-key checks at its end; on a key violation, split the range in
 * two and try again, down to the single row, which becomes a reject.
 */
static int
insert_checked(IngestState *st, int lo, int hi)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	volatile int inserted = 0;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		if (st->has_ri_triggers)
			AfterTriggerBeginQuery();
		insert_slots(st, lo, hi);
		if (st->has_ri_triggers)
			AfterTriggerEndQuery(st->estate);
		clear_trigger_slots(st);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		inserted = hi - lo;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		clear_trigger_slots(st);
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		if (!is_row_error(edata->sqlerrcode))
			ReThrowError(edata);
		report_progress(st, true);
		if (hi - lo == 1)
		{
			RowOrigin  *o = &st->origins[lo];

			st->cur_line = o->line;
			st->cur_offset = o->offset;
			add_reject(st, edata->sqlerrcode, edata->column_name, edata->message,
					   edata->detail, o->raw, o->raw_truncated);
		}
		else
		{
			int			mid = lo + (hi - lo) / 2;

			inserted = insert_checked(st, lo, mid) + insert_checked(st, mid, hi);
		}
		FreeErrorData(edata);
	}
	PG_END_TRY();
	return inserted;
}

static void
flush_rows(IngestState *st)
{
	int			n = st->nbuffered;

	if (n == 0)
		return;
	if (st->opts->validate)
		st->rows_loaded += n;
	else if (st->checked_mode)
		st->rows_loaded += insert_checked(st, 0, n);
	else
	{
		insert_slots(st, 0, n);
		st->rows_loaded += n;
	}
	for (int i = 0; i < n; i++)
		ExecClearTuple(st->slots[i]);
	st->nbuffered = 0;
	st->buffered_bytes = 0;
	MemoryContextReset(st->batchcxt);
	report_progress(st, false);
}

/* ---------------------------------------------------------------------
 * Reading records
 * ---------------------------------------------------------------------
 */

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
static void
report_progress(IngestState *st, bool restart)
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

static void
start_parser(IngestState *st, int64 offset, int64 line_base)
{
	st->src->pos = offset;
	st->session_start = offset;
	st->line_base = line_base;
	st->prev_lineno = 0;
	st->reader = ca_copy_reader_begin(st->rel, st->copy_options, source_produce, st->src);
	st->cstate = ca_copy_reader_state(st->reader);
	st->transcoding = st->cstate->need_transcoding;
	report_progress(st, false);
}

static void
stop_parser(IngestState *st, bool abandon)
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
		size_t		n = source_pread(st->src, pos, buf, sizeof(buf));

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
				if (source_pread(st->src, pos + i + 1, buf, 1) == 1 && buf[0] == '\n')
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
	size_t		n = source_pread(st->src, offset, bytes, len);

	while (n > 0 && (bytes[n - 1] == '\n' || bytes[n - 1] == '\r'))
		n--;
	return escape_raw(st, bytes, n, truncated);
}

/*
 * Skip the line at st->cur_offset (its reject already recorded) and start a
 * new parser at the next line, or end the file if the offsets are unknown.
 */
static void
restart_after_current_line(IngestState *st)
{
	int64		next;

	stop_parser(st, true);
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
	start_parser(st, next, st->cur_line);
}

/*
 * The next record, or false at the end of the input.  Handles the "\."
 * end-of-copy marker: COPY stops there in CSV mode, which would drop the
 * rest of the file.
 */
static bool
read_record(IngestState *st, char ***fields, int *nfields)
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
			add_reject(st, ERRCODE_BAD_COPY_FILE_FORMAT, NULL,
					   "end-of-data marker \\. in the file",
					   "COPY treats a line holding only \\. as the end of CSV data; the line was skipped and the rest of the file loaded.",
					   raw, truncated);
			if (end < st->src->size)
			{
				stop_parser(st, false);
				start_parser(st, end, st->cur_line);
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
static void
process_record(IngestState *st, char **fields, int nfields)
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
		add_reject(st, ERRCODE_BAD_COPY_FILE_FORMAT, NULL,
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
			add_reject(st, ERRCODE_NOT_NULL_VIOLATION, NameStr(a->attname),
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
			add_reject(st, ERRCODE_CHECK_VIOLATION, NULL,
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
		current_raw_line(st, &o->raw, &o->raw_truncated);
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
			if (!read_record(st, &fields, &nfields))
				break;
			st->phase = PHASE_CONVERT;
			process_record(st, fields, nfields);
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
		if (!is_row_error(edata->sqlerrcode))
			ReThrowError(edata);
		if (st->cstate)
			report_progress(st, true);

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
		{
			bool		truncated = false;
			char	   *raw = NULL;

			if (st->cur_offset >= 0)
				raw = raw_line_at(st, st->cur_offset, next_line_offset(st, st->cur_offset), &truncated);
			add_reject(st, edata->sqlerrcode, NULL, edata->message,
					   st->cur_offset >= 0
					   ? "Invalid bytes are shown as \\xNN; the rest of the file was loaded from the next line."
					   : "The file is being converted from another encoding, so the rest of it could not be read.",
					   raw, truncated);
			restart_after_current_line(st);
		}
		else if (st->phase == PHASE_READ && edata->sqlerrcode == ERRCODE_BAD_COPY_FILE_FORMAT &&
				 stopped_in_open_quote(st->cstate))
		{
			add_reject(st, edata->sqlerrcode, NULL, edata->message,
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
			bool		truncated = false;
			char	   *raw = NULL;

			if (st->cur_offset >= 0)
				raw = raw_line_at(st, st->cur_offset, next_line_offset(st, st->cur_offset), &truncated);
			add_reject(st, edata->sqlerrcode, NULL, edata->message,
					   st->cur_offset >= 0
					   ? "The rest of the file was loaded from the next line."
					   : "The file is being converted from another encoding, so the rest of it could not be read.",
					   raw, truncated);
			restart_after_current_line(st);
		}
		else
			add_reject(st, edata->sqlerrcode,
					   st->phase == PHASE_CONVERT ? st->cur_column : NULL,
					   edata->message, edata->detail, NULL, false);
		FreeErrorData(edata);
	}
	PG_END_TRY();
}

static void
check_reject_limits(IngestState *st, bool at_end)
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

/* ---------------------------------------------------------------------
 * Setting up a load
 * ---------------------------------------------------------------------
 */

/* the first header field may start with a UTF-8 byte order mark */
static char *
clean_header_name(const char *name, bool first)
{
	const char *p = name;
	int			len;

	if (first && (unsigned char) p[0] == 0xEF && (unsigned char) p[1] == 0xBB &&
		(unsigned char) p[2] == 0xBF)
		p += 3;
	while (*p == ' ' || *p == '\t')
		p++;
	len = strlen(p);
	while (len > 0 && (p[len - 1] == ' ' || p[len - 1] == '\t'))
		len--;
	return pnstrdup(p, len);
}

static AttrNumber
find_attribute(TupleDesc tupdesc, const char *name)
{
	AttrNumber	found = InvalidAttrNumber;

	for (int i = 0; i < tupdesc->natts; i++)
	{
		Form_pg_attribute a = TupleDescAttr(tupdesc, i);

		if (a->attisdropped)
			continue;
		if (strcmp(NameStr(a->attname), name) == 0)
			return a->attnum;
		if (found == InvalidAttrNumber && pg_strcasecmp(NameStr(a->attname), name) == 0)
			found = a->attnum;
	}
	return found;
}

/* column_map: CSV header name -> table column, keys compared case-insensitively */
static const char *
map_header_name(IngestState *st, const char *name)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken r;
	char	   *key = NULL;

	if (st->opts->column_map == NULL)
		return name;
	if (!JB_ROOT_IS_OBJECT(st->opts->column_map))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("column_map must be a JSON object"),
				 errhint("Map CSV header names to columns, e.g. {\"Customer ID\": \"customer_id\"}.")));
	it = JsonbIteratorInit(&st->opts->column_map->root);
	while ((r = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (r == WJB_KEY)
			key = pnstrdup(v.val.string.val, v.val.string.len);
		else if (r == WJB_VALUE && key && pg_strcasecmp(key, name) == 0)
		{
			if (v.type != jbvString)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("column_map value for \"%s\" is not a column name", key)));
			return pnstrdup(v.val.string.val, v.val.string.len);
		}
	}
	return name;
}

static void
map_columns(IngestState *st, char **header, int nheader)
{
	TupleDesc	tupdesc = st->tupdesc;
	StringInfoData unknown;

	initStringInfo(&unknown);
	st->att_mapped = palloc0(sizeof(bool) * (tupdesc->natts + 1));
	if (header == NULL)
	{
		/* no header: the file's fields are the table's columns, in order */
		int			n = 0;

		st->field_att = palloc0(sizeof(int) * tupdesc->natts);
		for (int i = 0; i < tupdesc->natts; i++)
		{
			Form_pg_attribute a = TupleDescAttr(tupdesc, i);

			if (a->attisdropped || a->attgenerated)
				continue;
			st->field_att[n++] = a->attnum;
			st->att_mapped[a->attnum] = true;
		}
		st->nfields = n;
		return;
	}

	st->nfields = nheader;
	st->field_att = palloc0(sizeof(int) * Max(nheader, 1));
	for (int i = 0; i < nheader; i++)
	{
		char	   *name;
		const char *column;
		AttrNumber	att;

		if (header[i] == NULL || header[i][0] == '\0')
			ereport(ERROR,
					(errcode(ERRCODE_BAD_COPY_FILE_FORMAT),
					 errmsg("column %d of the header of \"%s\" has no name", i + 1, st->file_label),
					 errhint("Every field of the header line must name a column; use header => false for a file without one.")));
		name = clean_header_name(header[i], i == 0);
		column = map_header_name(st, name);
		att = find_attribute(tupdesc, column);
		if (att == InvalidAttrNumber)
		{
			if (!st->opts->ignore_extra_columns)
				appendStringInfo(&unknown, "%s\"%s\"", unknown.len ? ", " : "", name);
			continue;
		}
		if (TupleDescAttr(tupdesc, att - 1)->attgenerated)
			ereport(ERROR,
					(errcode(ERRCODE_GENERATED_ALWAYS),
					 errmsg("column \"%s\" of %s is generated and cannot be loaded",
							column, st->target_name),
					 errdetail("Header field %d of \"%s\" maps to it.", i + 1, st->file_label),
					 errhint("Leave it out of the file, or use ignore_extra_columns => true with a column_map that maps it elsewhere.")));
		if (st->att_mapped[att])
			ereport(ERROR,
					(errcode(ERRCODE_DUPLICATE_COLUMN),
					 errmsg("column \"%s\" of %s is named twice in the header of \"%s\"",
							NameStr(TupleDescAttr(tupdesc, att - 1)->attname), st->target_name,
							st->file_label),
					 errhint("Rename one of the header fields with column_map.")));
		st->field_att[i] = att;
		st->att_mapped[att] = true;
	}
	if (unknown.len > 0)
	{
		StringInfoData columns;

		initStringInfo(&columns);
		for (int i = 0; i < tupdesc->natts; i++)
			if (!TupleDescAttr(tupdesc, i)->attisdropped)
				appendStringInfo(&columns, "%s%s", columns.len ? ", " : "",
								 NameStr(TupleDescAttr(tupdesc, i)->attname));
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("the header of \"%s\" has columns that %s does not have: %s",
						st->file_label, st->target_name, unknown.data),
				 errdetail("%s has the columns %s.", st->target_name, columns.data),
				 errhint("Map them with column_map => '{\"csv name\": \"column\"}', or pass ignore_extra_columns => true to skip them.")));
	}
}

static void
load_imputation_rules(IngestState *st)
{
	Oid			types[1] = {OIDOID};
	Datum		values[1];

	st->impute = palloc0(sizeof(ImputeRule) * (st->tupdesc->natts + 1));
	values[0] = ObjectIdGetDatum(RelationGetRelid(st->rel));
	SPI_connect();
	SPI_execute_with_args("SELECT column_name::pg_catalog.text, rule, value FROM customer_analytics.imputation_rule "
						  "WHERE target OPERATOR(pg_catalog.=) $1 ORDER BY column_name",
						  1, types, values, NULL, true, 0);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	td = SPI_tuptable->tupdesc;
		char	   *column = SPI_getvalue(tup, td, 1);
		char	   *rule = SPI_getvalue(tup, td, 2);
		char	   *value = SPI_getvalue(tup, td, 3);
		AttrNumber	att = find_attribute(st->tupdesc, column);
		ImputeRule *r;
		Form_pg_attribute a;
		MemoryContext old;

		if (att == InvalidAttrNumber)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("imputation rule for column \"%s\", which %s does not have",
							column, st->target_name),
					 errhint("Fix or delete the row of customer_analytics.imputation_rule.")));
		a = TupleDescAttr(st->tupdesc, att - 1);
		r = &st->impute[att];
		old = MemoryContextSwitchTo(st->estate->es_query_cxt);
		if (strcmp(rule, "constant") == 0 || strcmp(rule, "unknown") == 0)
		{
			const char *text = value;
			Oid			func;
			Oid			typioparam;
			FmgrInfo	flinfo;

			if (strcmp(rule, "unknown") == 0)
			{
				char		category;
				bool		preferred;

				get_type_category_preferred(a->atttypid, &category, &preferred);
				if (category == TYPCATEGORY_NUMERIC)
					text = "-1";

				else if (category == TYPCATEGORY_STRING)
					text = "#unknown";

				else
					ereport(ERROR,
							(errcode(ERRCODE_DATATYPE_MISMATCH),
							 errmsg("imputation rule 'unknown' does not apply to column \"%s\" of type %s",
									column, format_type_be(a->atttypid)),
							 errhint("'unknown' means -1 for numbers and '#unknown' for text; use a constant.")));
			}
			getTypeInputInfo(a->atttypid, &func, &typioparam);
			fmgr_info(func, &flinfo);
			r->value = InputFunctionCall(&flinfo, (char *) text, typioparam, a->atttypmod);
			r->kind = IMPUTE_CONSTANT;
		}
		else if (strcmp(rule, "default") == 0)
		{
			Node	   *expr = build_column_default(st->rel, att);

			if (expr == NULL)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("imputation rule 'default' for column \"%s\", which has no default",
								column),
						 errhint("Give the column a DEFAULT, or use a constant rule.")));
			r->expr = ExecInitExpr(expression_planner((Expr *) expr), NULL);
			r->kind = IMPUTE_DEFAULT;
		}
		else
			r->kind = IMPUTE_PREVIOUS;
		MemoryContextSwitchTo(old);
		st->any_impute = true;
	}
	SPI_finish();
}

/* Columns that must come from somewhere: the file, a default or a rule. */
static void
check_required_columns(IngestState *st)
{
	for (int att = 1; att <= st->tupdesc->natts; att++)
	{
		Form_pg_attribute a = TupleDescAttr(st->tupdesc, att - 1);

		if (a->attisdropped || a->attgenerated || st->att_mapped[att] || att == st->load_id_att)
			continue;
		if (a->attnotnull && st->default_exprs[att] == NULL && st->impute[att].kind == IMPUTE_NONE)
			ereport(ERROR,
					(errcode(ERRCODE_NOT_NULL_VIOLATION),
					 errmsg("\"%s\" has no column for \"%s\", which %s requires",
							st->file_label, NameStr(a->attname), st->target_name),
					 errdetail("The column is NOT NULL and has no default."),
					 errhint("Add it to the file, map a header field to it with column_map, or add an imputation rule for it.")));
	}
}

static void
setup_executor(IngestState *st)
{
	TupleDesc	tupdesc = st->tupdesc;
	TupleConstr *constr = tupdesc->constr;
	int			natts = tupdesc->natts;

	st->estate = CreateExecutorState();
	st->estate->es_output_cid = st->cid = GetCurrentCommandId(true);
	st->rri = makeNode(ResultRelInfo);
	InitResultRelInfo(st->rri, st->rel, 1, NULL, 0);
	/* so that the after-trigger machinery finds it, and its slots */
	st->estate->es_opened_result_relations = list_make1(st->rri);
	ExecOpenIndices(st->rri, false);

	st->in_funcs = palloc0(sizeof(FmgrInfo) * natts);
	st->typioparams = palloc0(sizeof(Oid) * natts);
	st->default_exprs = palloc0(sizeof(ExprState *) * (natts + 1));
	for (int att = 1; att <= natts; att++)
	{
		Form_pg_attribute a = TupleDescAttr(tupdesc, att - 1);
		Oid			func;

		if (a->attisdropped)
			continue;
		getTypeInputInfo(a->atttypid, &func, &st->typioparams[att - 1]);
		fmgr_info(func, &st->in_funcs[att - 1]);
		if (strcmp(NameStr(a->attname), "load_id") == 0 && a->atttypid == INT8OID)
			st->load_id_att = att;
		if (!a->attgenerated)
		{
			Node	   *expr = build_column_default(st->rel, att);

			if (expr)
				st->default_exprs[att] = ExecInitExpr(expression_planner((Expr *) expr), NULL);
		}
		if (a->attgenerated == ATTRIBUTE_GENERATED_STORED)
			st->has_generated = true;
	}

	if (constr && constr->num_check > 0)
	{
		st->nchecks = constr->num_check;
		st->check_exprs = palloc(sizeof(ExprState *) * st->nchecks);
		st->check_names = palloc(sizeof(char *) * st->nchecks);
		for (int i = 0; i < st->nchecks; i++)
		{
			st->check_exprs[i] = ExecPrepareCheck(list_make1(stringToNode(constr->check[i].ccbin)),
												  st->estate);
			st->check_names[i] = constr->check[i].ccname;
		}
	}

	/* unique indexes or foreign keys: insert in bisectable subtransactions */
	for (int i = 0; i < st->rri->ri_NumIndices; i++)
		if (st->rri->ri_IndexRelationDescs[i]->rd_index->indisunique)
			st->checked_mode = true;
	if (st->rel->trigdesc && st->rel->trigdesc->numtriggers > 0)
	{
		st->has_ri_triggers = true;
		st->checked_mode = true;
		/* made now, not lazily inside a batch's subtransaction that owns them */
		(void) ExecGetTriggerNewSlot(st->estate, st->rri);
		(void) ExecGetTriggerOldSlot(st->estate, st->rri);
	}

	st->slots = palloc(sizeof(TupleTableSlot *) * MAX_BUFFERED_ROWS);
	for (int i = 0; i < MAX_BUFFERED_ROWS; i++)
		st->slots[i] = table_slot_create(st->rel, &st->estate->es_tupleTable);
	st->origins = palloc0(sizeof(RowOrigin) * MAX_BUFFERED_ROWS);
	st->bistate = GetBulkInsertState();
	st->batchcxt = AllocSetContextCreate(CurrentMemoryContext, "ingest batch", ALLOCSET_DEFAULT_SIZES);
	st->rejectcxt = AllocSetContextCreate(CurrentMemoryContext, "ingest rejects", ALLOCSET_DEFAULT_SIZES);
}

static void
teardown_executor(IngestState *st)
{
	FreeBulkInsertState(st->bistate);
	ExecCloseIndices(st->rri);
	ExecResetTupleTable(st->estate->es_tupleTable, false);
	FreeExecutorState(st->estate);
}

static List *
copy_options_list(IngestOptions *opts)
{
	List	   *options = NIL;

	options = lappend(options, makeDefElem("format", (Node *) makeString("csv"), -1));
	options = lappend(options, makeDefElem("delimiter", (Node *) makeString(opts->delimiter), -1));
	options = lappend(options, makeDefElem("quote", (Node *) makeString(opts->quote), -1));
	if (opts->escape)
		options = lappend(options, makeDefElem("escape", (Node *) makeString(opts->escape), -1));
	options = lappend(options, makeDefElem("null", (Node *) makeString(opts->null_string), -1));
	if (opts->encoding)
		options = lappend(options, makeDefElem("encoding", (Node *) makeString(opts->encoding), -1));
	return options;
}

/* ---------------------------------------------------------------------
 * Target checks, as COPY FROM makes them
 * ---------------------------------------------------------------------
 */
static char *
qualified_relation_name(Relation rel)
{
	return quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
									  RelationGetRelationName(rel));
}

static void
check_target(Relation rel)
{
	char	   *name = qualified_relation_name(rel);
	AclResult	acl;
	CaCitusKind citus;

	if (rel->rd_rel->relkind != RELKIND_RELATION)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("cannot ingest into %s: it is not a plain table", name),
				 errhint(rel->rd_rel->relkind == RELKIND_PARTITIONED_TABLE
						 ? "Ingest into one of its partitions, or into a staging table."
						 : "Ingest into a table, then use it from the view.")));
	acl = pg_class_aclcheck(RelationGetRelid(rel), GetUserId(), ACL_INSERT);
	if (acl != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to insert into %s", name),
				 errhint("Ingestion inserts as the calling user: GRANT INSERT ON %s TO it.", name)));
	if (check_enable_rls(RelationGetRelid(rel), InvalidOid, false) == RLS_ENABLED)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot ingest into %s: it has row-level security", name),
				 errdetail("Like COPY FROM, ingestion does not apply row-level security policies."),
				 errhint("Ingest into a table without policies, then INSERT ... SELECT from it.")));
	/* before the triggers: Citus puts a truncate trigger of its own on them */
	citus = ca_citus_kind(RelationGetRelid(rel));
	if (citus != CA_CITUS_NONE)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot ingest into %s: it is managed by Citus", name),
				 ca_citus_errdetail(RelationGetRelid(rel), citus),
				 errhint("Ingest into a local table with the same columns, then INSERT INTO %s SELECT ... FROM it: Citus routes that INSERT to the shards.", name)));
	if (rel->trigdesc)
	{
		for (int i = 0; i < rel->trigdesc->numtriggers; i++)
			if (!rel->trigdesc->triggers[i].tgisinternal)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("cannot ingest into %s: it has trigger \"%s\"",
								name, rel->trigdesc->triggers[i].tgname),
						 errdetail("Ingestion writes rows in batches and does not fire user triggers."),
						 errhint("Ingest into a staging table without triggers, or disable the trigger for the load.")));
	}
}

/*
 * Whether an absolute, canonical path lies in one of the allowed
 * directories (any path when none are set).  Each directory is matched as
 * written and with its links resolved: the path of an opened file has
 * every link resolved, while the setting may well name a link.
 */
static bool
path_is_allowed(const char *canon)
{
	List	   *dirs;
	ListCell   *lc;
	char	   *list;

	if (allowed_directories == NULL || allowed_directories[0] == '\0')
		return true;
	list = pstrdup(allowed_directories);
	if (!SplitDirectoriesString(list, ',', &dirs))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid customer_analytics.ingest_allowed_directories")));
	foreach(lc, dirs)
	{
		char	   *dir = lfirst(lc);
		char	   *real;
		bool		inside;

		canonicalize_path(dir);
		if (path_is_prefix_of_path(dir, canon))
			return true;
		real = realpath(dir, NULL);
		if (real == NULL)
			continue;
		inside = path_is_prefix_of_path(real, canon);
		free(real);
		if (inside)
			return true;
	}
	return false;
}

/* An absolute, canonical path inside the allowed directories, if any. */
static char *
check_server_path(const char *path, const char *what)
{
	char	   *canon = pstrdup(path);

	/* "file" or "directory": each message whole, so that it can be translated */
	bool		dir = strcmp(what, "directory") == 0;

	if (!has_privs_of_role(GetUserId(), ROLE_PG_READ_SERVER_FILES))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 dir
				 ? errmsg("permission denied to read directory \"%s\"", path)
				 : errmsg("permission denied to read file \"%s\"", path),
				 errdetail("Reading files on the database server needs superuser or the pg_read_server_files role, as COPY FROM a file does."),
				 errhint("Send the data from the client with ingest_csv_text(), or ask an administrator to GRANT pg_read_server_files.")));
	canonicalize_path(canon);
	if (!is_absolute_path(canon))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 dir
				 ? errmsg("directory \"%s\" is not an absolute path", path)
				 : errmsg("file \"%s\" is not an absolute path", path),
				 dir
				 ? errhint("The server reads the directory: give its full path on the database server.")
				 : errhint("The server reads the file: give its full path on the database server.")));
	if (path_contains_parent_reference(canon))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 dir
				 ? errmsg("directory \"%s\" leaves its parent directory with \"..\"", path)
				 : errmsg("file \"%s\" leaves its directory with \"..\"", path)));
	if (!path_is_allowed(canon))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 dir
				 ? errmsg("directory \"%s\" is outside the directories ingestion may read", canon)
				 : errmsg("file \"%s\" is outside the directories ingestion may read", canon),
				 errdetail("customer_analytics.ingest_allowed_directories is \"%s\".", allowed_directories),
				 dir
				 ? errhint("Move its files into one of them, or ask an administrator to allow it.")
				 : errhint("Move the file into one of them, or ask an administrator to allow its directory.")));
	return canon;
}

/* What kind of file a mode is, for messages. */
const char *
ca_file_type_name(mode_t mode)
{
	static const struct
	{
		mode_t		type;
		const char *name;
	}			types[] =
	{
		{S_IFREG, "a regular file"},
		{S_IFDIR, "a directory"},
		{S_IFIFO, "a FIFO (named pipe)"},
		{S_IFSOCK, "a socket"},
		{S_IFCHR, "a character device"},
		{S_IFBLK, "a block device"},
		{S_IFLNK, "a symbolic link"},
	};

	for (int i = 0; i < lengthof(types); i++)
		if ((mode & S_IFMT) == types[i].type)
			return types[i].name;
	return "a special file";
}

pg_noreturn static void
refuse_file_type(const char *path, mode_t mode)
{
	ereport(ERROR,
			(errcode(ERRCODE_WRONG_OBJECT_TYPE),
			 errmsg("file \"%s\" is %s, not a regular file", path, ca_file_type_name(mode)),
			 errdetail("Ingestion reads only regular files: a FIFO, socket or device could block the server process, and a directory holds no rows."),
			 S_ISDIR(mode)
			 ? errhint("Use ingest_directory() to load the files of a directory.")
			 : errhint("Write the data to a regular file and load that.")));
}

/*
 * The real path of an open file, as the kernel resolved it when the file
 * was opened: a link swapped in since cannot change it.
 */
static char *
opened_file_path(int fd, const char *path)
{
	char		proc_link[64];
	char		real[MAXPGPATH];
	ssize_t		len;

	snprintf(proc_link, sizeof(proc_link), "/proc/self/fd/%d", fd);
	len = readlink(proc_link, real, sizeof(real));
	if (len >= (ssize_t) sizeof(real))
	{
		len = -1;
		errno = ENAMETOOLONG;
	}
	if (len < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not find the real path of \"%s\" through \"%s\": %m", path, proc_link),
				 errdetail("With customer_analytics.ingest_allowed_directories set, the file actually opened is checked, which needs /proc.")));
	real[len] = '\0';
	return pstrdup(real);
}

/*
 * Refuse an opened file or directory whose real path leaves the allowed
 * directories (a link inside them pointing out), naming where it leads.
 */
static void
check_opened_path(int fd, const char *path, const char *what)
{
	char	   *real;

	if (allowed_directories == NULL || allowed_directories[0] == '\0')
		return;
	real = opened_file_path(fd, path);
	if (!path_is_allowed(real))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 strcmp(what, "directory") == 0
				 ? errmsg("directory \"%s\" leads to \"%s\", outside the directories ingestion may read", path, real)
				 : errmsg("file \"%s\" leads to \"%s\", outside the directories ingestion may read", path, real),
				 errdetail("A symbolic link on its path points out of customer_analytics.ingest_allowed_directories (\"%s\").",
						   allowed_directories),
				 errhint("Copy the data into one of those directories instead of linking to it.")));
}

/* An opened server file, checked, and what fstat() said of it. */
typedef struct ServerFile
{
	int			fd;
	int64		size;
	TimestampTz mtime;
} ServerFile;

/*
 * Open a server file to load.  The open does not block (a FIFO without a
 * writer would otherwise hold the backend in open(), deaf to cancel and
 * terminate), and then the descriptor itself is checked: its real path
 * must be inside the allowed directories and it must be a regular file.
 * Everything is read from that same descriptor, so a file swapped for a
 * link after the checks is never read.  The file is a transient one of
 * the current (sub)transaction: an error closes it.
 */
static void
open_server_file(const char *path, ServerFile *f)
{
	struct stat st;
	int			fd;
	int			flags;

	fd = OpenTransientFile(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | PG_BINARY);
	if (fd < 0)
	{
		int			save_errno = errno;

		/* a socket cannot be opened at all: say what it is */
		if (save_errno == ENXIO && stat(path, &st) == 0 && !S_ISREG(st.st_mode))
			refuse_file_type(path, st.st_mode);
		errno = save_errno;
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not read file \"%s\": %m", path)));
	}
	check_opened_path(fd, path, "file");
	if (fstat(fd, &st) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not stat file \"%s\": %m", path)));
	if (!S_ISREG(st.st_mode))
		refuse_file_type(path, st.st_mode);

	/* a regular file: plain blocking reads from here on */
	flags = fcntl(fd, F_GETFL);
	if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not set file \"%s\" to blocking reads: %m", path)));
	f->fd = fd;
	f->size = st.st_size;
	f->mtime = time_t_to_timestamptz(st.st_mtime) + st.st_mtim.tv_nsec / 1000;
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

		start_parser(st, 0, 0);
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
			map_columns(st, st->opts->header ? header : NULL, nheader);
			load_imputation_rules(st);
			check_required_columns(st);
		}
		while (!st->eof)
		{
			run_batch(st);
			if (st->abort_requested)
				break;
			if (st->nbuffered >= MAX_BUFFERED_ROWS || st->buffered_bytes >= MAX_BUFFERED_BYTES || st->eof)
				flush_rows(st);
			flush_rejects(st);
			check_reject_limits(st, false);
			CHECK_FOR_INTERRUPTS();
		}
		check_reject_limits(st, false);
		flush_rows(st);
		flush_rejects(st);
		check_reject_limits(st, true);
		if (st->reject_plan)
			SPI_freeplan(st->reject_plan);
		st->reject_plan = NULL;
		stop_parser(st, false);
		pgstat_progress_end_command();
	}
	PG_CATCH();
	{
		stop_parser(st, true);
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
 * fd is an open_server_file() descriptor, or -1 for client text (data, size
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
	st->target_name = qualified_relation_name(rel);
	st->file_label = pstrdup(label);
	st->db_encoding = GetDatabaseEncoding();
	st->copy_options = copy_options_list(opts);
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

		setup_executor(st);
		load_source(st);
		checksum = source_finish_checksum(src);
		teardown_executor(st);

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
	check_target(rel);
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
	path = check_server_path(text_to_cstring(PG_GETARG_TEXT_PP(1)), "file");
	opts = parse_options(fcinfo, 2, true, true);
	rel = open_target(fcinfo);
	open_server_file(path, &f);
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
		open_server_file(path, f);
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
	dirpath = check_server_path(text_to_cstring(PG_GETARG_TEXT_PP(1)), "directory");
	pattern = text_arg_or(fcinfo, 2, "*.csv");
	opts = parse_options(fcinfo, 3, true, false);
	rel = open_target(fcinfo);
	target_name = qualified_relation_name(rel);
	InitMaterializedSRF(fcinfo, 0);

	dir = AllocateDir(dirpath);
	if (dir == NULL)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open directory \"%s\": %m", dirpath)));
	check_opened_path(dirfd(dir), dirpath, "directory");
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
