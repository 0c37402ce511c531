/*
 * ingest.h
 *	  What the files of CSV ingestion (src/ingest*.c) share: the per-load
 *	  state and the functions that cross files.  Private to ingestion; the
 *	  design is described at the top of ingest.c.
 */
#ifndef CA_INGEST_H
#define CA_INGEST_H

#include <sys/types.h>

#include "access/heapam.h"
#include "commands/copyfrom_internal.h"
#include "common/cryptohash.h"
#include "executor/spi.h"
#include "nodes/execnodes.h"
#include "utils/jsonb.h"
#include "utils/relcache.h"

#include "copy_source.h"

#define BATCH_RECORDS 1000		/* records parsed per subtransaction */
#define MAX_BUFFERED_ROWS 1000	/* rows per multi-insert, as COPY */
#define MAX_BUFFERED_BYTES 65536
#define MAX_RAW_LINE 65536		/* longest raw line kept in a reject */
#define SOURCE_CHUNK 65536

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
 * (ingest_source.c)
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

/* An opened server file, checked, and what fstat() said of it. */
typedef struct ServerFile
{
	int			fd;
	int64		size;
	TimestampTz mtime;
} ServerFile;

/* ---------------------------------------------------------------------
 * Functions that cross files, by file
 * ---------------------------------------------------------------------
 */

/* ingest_source.c */
extern size_t ingest_source_pread(ByteSource *src, int64 pos, char *buf, size_t n);
extern bool ingest_source_produce(void *arg, StringInfo out);
extern char *ingest_source_checksum(ByteSource *src);

/* ingest_files.c */
extern char *ingest_check_server_path(const char *path, const char *what);
extern void ingest_check_opened_path(int fd, const char *path, const char *what);
extern void ingest_open_server_file(const char *path, ServerFile *f);

/* ingest_setup.c */
extern void ingest_check_target(Relation rel);
extern List *ingest_copy_options(IngestOptions *opts);
extern void ingest_map_columns(IngestState *st, char **header, int nheader);
extern void ingest_load_imputation_rules(IngestState *st);
extern void ingest_check_required_columns(IngestState *st);
extern void ingest_setup_executor(IngestState *st);
extern void ingest_teardown_executor(IngestState *st);

/* ingest_read.c */
extern void ingest_report_progress(IngestState *st, bool restart);
extern void ingest_start_parser(IngestState *st, int64 offset, int64 line_base);
extern void ingest_stop_parser(IngestState *st, bool abandon);
extern void ingest_reject_line_and_skip(IngestState *st, int sqlerrcode,
										const char *message, const char *detail);
extern bool ingest_read_record(IngestState *st, char ***fields, int *nfields);
extern void ingest_process_record(IngestState *st, char **fields, int nfields);

/* ingest_reject.c */
extern char *ingest_escape_raw(IngestState *st, const char *bytes, int len, bool *truncated);
extern void ingest_current_raw_line(IngestState *st, char **raw, bool *truncated);
extern void ingest_add_reject(IngestState *st, int sqlerrcode, const char *column,
							  const char *message, const char *detail,
							  char *raw, bool raw_truncated);
extern void ingest_flush_rejects(IngestState *st);
extern void ingest_check_reject_limits(IngestState *st, bool at_end);

/* ingest_writer.c */
extern bool ingest_is_row_error(int sqlerrcode);
extern void ingest_flush_rows(IngestState *st);

#endif							/* CA_INGEST_H */
