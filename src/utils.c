/*
 * utils.c
 *	  Small helpers several modules share: the aggregate memory-context
 *	  guard of the transition functions, the conversion of a user's
 *	  timestamp-like column to timestamptz, what kind of file a mode is,
 *	  the qualified name of a table, and the rows of a query one by one.
 */
#include "postgres.h"

#include <sys/stat.h>

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "utils.h"

/*
 * The aggregate context of a transition (or final) function that keeps its
 * state there.  Called any other way (a direct SQL call of the support
 * function), there is no such context to keep the state in: a user error
 * with its SQLSTATE, not a can't-happen one.
 */
MemoryContext
ca_aggregate_context(FunctionCallInfo fcinfo, const char *funcname)
{
	MemoryContext aggcxt;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("%s called outside an aggregate", funcname),
				 errhint("It is a support function of an aggregate: call the aggregate instead.")));
	return aggcxt;
}

/*
 * Source columns named by users (rfm(), detect_anomalies()) may hold
 * timestamptz, timestamp or date; the callers check the type first.
 */
TimestampTz
ca_datum_to_timestamptz(Datum d, Oid type)
{
	switch (type)
	{
		case TIMESTAMPTZOID:
			return DatumGetTimestampTz(d);
		case TIMESTAMPOID:
			return DatumGetTimestampTz(DirectFunctionCall1(timestamp_timestamptz, d));
		case DATEOID:
			return DatumGetTimestampTz(DirectFunctionCall1(date_timestamptz, d));
		default:
			elog(ERROR, "unsupported timestamp type %u", type);
	}
	return 0;
}

/* What kind of file a mode is ("a FIFO (named pipe)", ...), for messages. */
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

/*
 * The schema-qualified, quoted name of a table: for messages, and safe to
 * put into generated SQL.
 */
char *
ca_relation_name(Oid relid)
{
	return quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)),
									  get_rel_name(relid));
}

/*
 * Calls row() on each row of a read-only query, fetched through a cursor so
 * that the rows never need to fit in memory at once: how the C readers of
 * the facts read a table the table AM must not scan (a view, a table with
 * row-level security, a Citus table whose rows are in shards).  row() runs
 * in a context reset after each row; what it keeps it allocates elsewhere.
 */
void
ca_spi_for_each_row(const char *sql, int nargs, Oid * types, Datum *values,
					CaSpiRowFunc row, void *arg)
{
	MemoryContext rowcxt = AllocSetContextCreate(CurrentMemoryContext, "query row", ALLOCSET_SMALL_SIZES);
	Portal		portal;

	SPI_connect();
	portal = SPI_cursor_open_with_args(NULL, sql, nargs, types, values, NULL, true, 0);
	for (;;)
	{
		SPI_cursor_fetch(portal, true, 10000);
		if (SPI_processed == 0)
			break;
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			MemoryContext old = MemoryContextSwitchTo(rowcxt);

			row(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, arg);
			MemoryContextSwitchTo(old);
			MemoryContextReset(rowcxt);
		}
		SPI_freetuptable(SPI_tuptable);
		CHECK_FOR_INTERRUPTS();
	}
	SPI_cursor_close(portal);
	SPI_finish();
	MemoryContextDelete(rowcxt);
}
