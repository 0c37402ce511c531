/*
 * copy_source.c
 *	  Load bytes produced in memory through PostgreSQL's own COPY FROM.
 *
 * COPY's parser, type input functions, constraint checks, multi-insert
 * buffering and index maintenance are reused whole: the caller supplies a
 * producer that appends CSV (or text) chunks, and ca_copy_from_producer()
 * runs CopyFrom() over them.
 *
 * PostgreSQL 15's copy_data_source_cb takes no context argument, so the
 * producer being read is kept in a file-level pointer for the duration of
 * one CopyFrom() call.  It is saved and restored around the call (a trigger
 * on the target could start a nested load) and cleared on error.  This is
 * the one piece of module-level mutable state, forced by that signature.
 */
#include "postgres.h"

#include "access/table.h"
#include "catalog/namespace.h"
#include "commands/copy.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "nodes/value.h"
#include "parser/parse_node.h"
#include "parser/parse_relation.h"
#include "storage/lockdefs.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

#include "citus_guard.h"
#include "copy_source.h"
#include "utils.h"

typedef struct ProducerSource
{
	CaChunkProducer produce;
	void	   *arg;
	StringInfoData chunk;		/* bytes produced but not yet consumed */
	int			consumed;		/* how much of chunk COPY has taken */
	bool		exhausted;		/* producer said it has nothing more */
} ProducerSource;

static ProducerSource *active_source = NULL;

/*
 * copy_data_source_cb: hand COPY between minread and maxread bytes, asking
 * the producer for more as needed.  Returning less than minread means EOF.
 */
static int
producer_read(void *outbuf, int minread, int maxread)
{
	ProducerSource *src = active_source;
	int			copied = 0;

	Assert(src != NULL);
	while (copied < minread)
	{
		int			avail = src->chunk.len - src->consumed;
		int			n;

		if (avail == 0)
		{
			if (src->exhausted)
				break;
			resetStringInfo(&src->chunk);
			src->consumed = 0;
			if (!src->produce(src->arg, &src->chunk))
				src->exhausted = true;
			CHECK_FOR_INTERRUPTS();
			continue;
		}
		n = Min(avail, maxread - copied);
		memcpy((char *) outbuf + copied, src->chunk.data + src->consumed, n);
		src->consumed += n;
		copied += n;
	}
	return copied;
}

/*
 * COPY FROM the producer's output straight into rel, through the table AM.
 */
static uint64
copy_into(Relation rel, List *attnames, List *copy_options,
		  CaChunkProducer produce, void *arg)
{
	ProducerSource src;
	ProducerSource *saved = active_source;
	ParseState *pstate = make_parsestate(NULL);
	uint64		processed = 0;

	src.produce = produce;
	src.arg = arg;
	initStringInfo(&src.chunk);
	src.consumed = 0;
	src.exhausted = false;

	/* CopyFrom() opens its result relation through the range table. */
	addRangeTableEntryForRelation(pstate, rel, RowExclusiveLock,
								  NULL, false, false);

	active_source = &src;
	PG_TRY();
	{
		CopyFromState cstate;

		cstate = BeginCopyFrom(pstate, rel, NULL, NULL, false,
							   producer_read, attnames, copy_options);
		processed = CopyFrom(cstate);
		EndCopyFrom(cstate);
	}
	PG_FINALLY();
	{
		active_source = saved;
	}
	PG_END_TRY();

	pfree(src.chunk.data);
	free_parsestate(pstate);
	return processed;
}

/*
 * A Citus table's rows live in shards that the table AM cannot reach:
 * COPY into a temporary table with the same columns, then INSERT ... SELECT
 * from it, which Citus routes to the shards.  Every row that COPY took must
 * come out of the INSERT, or the load fails.
 */
static uint64
copy_through_sql(Relation rel, List *attnames, List *copy_options,
				 CaChunkProducer produce, void *arg)
{
	TupleDesc	desc = RelationGetDescr(rel);
	char	   *target = ca_relation_name(RelationGetRelid(rel));
	char	   *stage = psprintf("ca_citus_stage_%u", RelationGetRelid(rel));
	StringInfoData defs;
	StringInfoData cols;
	Oid			stage_oid;
	Relation	stage_rel;
	uint64		copied;
	uint64		inserted;
	ListCell   *lc;

	initStringInfo(&defs);
	initStringInfo(&cols);
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		bool		wanted = (attnames == NIL);

		if (att->attisdropped)
			continue;
		foreach(lc, attnames)
			wanted |= (strcmp(strVal(lfirst(lc)), NameStr(att->attname)) == 0);
		if (!wanted)
			continue;
		appendStringInfo(&defs, "%s%s %s", defs.len ? ", " : "",
						 quote_identifier(NameStr(att->attname)),
						 format_type_with_typemod(att->atttypid, att->atttypmod));
		appendStringInfo(&cols, "%s%s", cols.len ? ", " : "",
						 quote_identifier(NameStr(att->attname)));
	}

	SPI_connect();
	SPI_execute(psprintf("CREATE TEMPORARY TABLE %s (%s) ON COMMIT DROP", stage, defs.data), false, 0);
	SPI_finish();
	stage_oid = RangeVarGetRelid(makeRangeVar("pg_temp", stage, -1), NoLock, false);
	stage_rel = table_open(stage_oid, RowExclusiveLock);
	copied = copy_into(stage_rel, attnames, copy_options, produce, arg);
	table_close(stage_rel, NoLock);

	SPI_connect();
	SPI_execute(psprintf("INSERT INTO %s (%s) SELECT %s FROM pg_temp.%s",
						 target, cols.data, cols.data, stage), false, 0);
	inserted = SPI_processed;
	SPI_execute(psprintf("DROP TABLE pg_temp.%s", stage), false, 0);
	SPI_finish();
	if (inserted != copied)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("loading %s through Citus inserted " UINT64_FORMAT " rows of the " UINT64_FORMAT " read",
						target, inserted, copied),
				 errdetail("The load is undone rather than reported with rows that are not there.")));
	return copied;
}

/*
 * Run COPY FROM over the producer's output into rel, which the caller has
 * opened with RowExclusiveLock and checked for INSERT privilege.  attnames
 * lists the columns in input order (NIL: all columns); copy_options are
 * COPY's own options as DefElems (format, header, encoding, ...).
 * Returns the number of rows inserted.
 */
uint64
ca_copy_from_producer(Relation rel, List *attnames, List *copy_options,
					  CaChunkProducer produce, void *arg)
{
	if (ca_citus_kind(RelationGetRelid(rel)) != CA_CITUS_NONE)
		return copy_through_sql(rel, attnames, copy_options, produce, arg);
	return copy_into(rel, attnames, copy_options, produce, arg);
}

/*
 * A COPY FROM parser over a producer.  The caller reads with
 * NextCopyFrom()/NextCopyFromRawFields() on reader->cstate, and must call
 * ca_copy_reader_end() (also on error, from a PG_FINALLY) before starting
 * another reader.
 */
struct CaCopyReader
{
	ProducerSource src;
	ProducerSource *saved;
	ParseState *pstate;
	CopyFromState cstate;
};

CaCopyReader *
ca_copy_reader_begin(Relation rel, List *copy_options,
					 CaChunkProducer produce, void *arg)
{
	CaCopyReader *reader = palloc0(sizeof(CaCopyReader));

	reader->src.produce = produce;
	reader->src.arg = arg;
	initStringInfo(&reader->src.chunk);
	reader->pstate = make_parsestate(NULL);
	reader->saved = active_source;
	active_source = &reader->src;
	PG_TRY();
	{
		reader->cstate = BeginCopyFrom(reader->pstate, rel, NULL, NULL, false,
									   producer_read, NIL, copy_options);
	}
	PG_CATCH();
	{
		active_source = reader->saved;
		PG_RE_THROW();
	}
	PG_END_TRY();
	return reader;
}

CopyFromState
ca_copy_reader_state(CaCopyReader *reader)
{
	return reader->cstate;
}

void
ca_copy_reader_end(CaCopyReader *reader, bool abandon)
{
	/* after an error COPY's state may be half-built: just let it go */
	if (!abandon && reader->cstate)
		EndCopyFrom(reader->cstate);
	active_source = reader->saved;
}
