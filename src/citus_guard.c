/*
 * citus_guard.c
 *	  Tell whether a table is managed by Citus.
 *
 * On a Citus node a distributed, reference or Citus-local table is an empty
 * shell on the coordinator; its rows live in shards that only Citus's planner
 * and executor hooks reach.  Our C paths that open a table and scan it or
 * insert into it through the table AM (the COPY machinery of ingest_csv and
 * the generator, rfm()'s direct scan) would read or fill the shell and
 * report rows that nobody will ever see.  They ask here first, and either go
 * through SQL (which Citus intercepts) or refuse.
 *
 * Cheap where Citus is absent (one pg_extension lookup), which is where
 * single-node speed matters.
 *
 * Also here: whether this node is a Citus worker, and staging_xid(), the
 * staging tables' transaction mark, which Citus must evaluate on the
 * coordinator (why: at staging_xid() below).
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/xid8.h"

#include "citus_guard.h"
#include "utils.h"

PG_FUNCTION_INFO_V1(ca_staging_xid);

/*
 * How Citus manages relid, from its metadata (pg_dist_partition, which the
 * coordinator and, since Citus 11, every worker hold).
 */
CaCitusKind
ca_citus_kind(Oid relid)
{
	Oid			types[1] = {OIDOID};
	Datum		values[1];
	CaCitusKind kind = CA_CITUS_NONE;

	if (!OidIsValid(get_extension_oid("citus", true)))
		return CA_CITUS_NONE;

	values[0] = ObjectIdGetDatum(relid);
	SPI_connect();
	if (SPI_execute_with_args("SELECT partmethod::pg_catalog.text, repmodel::pg_catalog.text "
							  "FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1",
							  1, types, values, NULL, true, 1) == SPI_OK_SELECT &&
		SPI_processed > 0)
	{
		char	   *method = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		char	   *repmodel = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);

		if (method && method[0] != 'n')
			kind = CA_CITUS_DISTRIBUTED;
		else if (repmodel && repmodel[0] == 't')
			kind = CA_CITUS_REFERENCE;
		else
			kind = CA_CITUS_LOCAL;
	}
	SPI_finish();
	return kind;
}

/*
 * The errdetail of a refusal to touch a Citus table through the table AM:
 * where its rows really are.  For use inside the caller's ereport(), which
 * says what was refused (errmsg) and the way round (errhint).
 */
int
ca_citus_errdetail(Oid relid, CaCitusKind kind)
{
	char	   *name = ca_relation_name(relid);

	if (kind == CA_CITUS_DISTRIBUTED)
		return errdetail("%s is a Citus distributed table: its rows live in shards on the workers, and the table on this node is an empty shell that only Citus's query planner reaches.", name);
	if (kind == CA_CITUS_REFERENCE)
		return errdetail("%s is a Citus reference table: its rows live in a shard on every node, and the table itself is an empty shell that only Citus's query planner reaches.", name);
	return errdetail("%s is managed by Citus (a Citus-local or single-shard table): its rows live in a shard that only Citus's query planner reaches.", name);
}

/*
 * Is this node a Citus worker?
 *
 * Where Citus is not created in the database, this is one lookup of a
 * relation name in the syscache, whose negative entries are cached too: no
 * table is opened.  With Citus, pg_dist_local_group holds one row, the
 * node's group: 0 on the coordinator (and on a node not in a cluster),
 * another on a worker.  Read each time rather than cached per backend, as
 * citus_add_node() sets a worker's group after its backends have started.
 * Not citus_is_coordinator(): it says false on a node with Citus but no
 * cluster, where the staging tables are plain tables and staging must work.
 */
bool
ca_citus_worker_node(void)
{
	Oid			relid = get_relname_relid("pg_dist_local_group", PG_CATALOG_NAMESPACE);
	Relation	rel;
	SysScanDesc scan;
	HeapTuple	tuple;
	bool		worker = false;

	if (!OidIsValid(relid))
		return false;
	rel = table_open(relid, AccessShareLock);
	scan = systable_beginscan(rel, InvalidOid, false, NULL, 0, NULL);
	tuple = systable_getnext(scan);
	if (HeapTupleIsValid(tuple))
	{
		bool		isnull;
		Datum		groupid = heap_getattr(tuple, 1, RelationGetDescr(rel), &isnull);

		worker = !isnull && DatumGetInt32(groupid) != 0;
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return worker;
}

/*
 * Is this backend one that Citus opened to run a task of another session's
 * statement (on a worker, or on the coordinator itself)?  Citus names every such connection by this prefix of its
 * application_name (CITUS_APPLICATION_NAME_PREFIX in Citus's
 * connection_management.h, followed by the initiator's global pid), and
 * tells its own backends apart by it.
 */
static bool
ca_citus_internal_backend(void)
{
	static const char prefix[] = "citus_internal gpid=";

	return application_name != NULL &&
		strncmp(application_name, prefix, sizeof(prefix) - 1) == 0;
}

/*
 * staging_xid(): the default of every staging table's staged_xid, the
 * top-level transaction id exactly as pg_current_xact_id() gives it, by
 * which transform() tells the rows of the transactions committed since its
 * last run.  It must be the staging session's own, on the coordinator: a
 * worker's transaction ids are another sequence, another backend's another
 * transaction, and a row marked with one is skipped or taken runs later,
 * silently.
 *
 * Citus evaluates a default in the staging session for INSERT ... VALUES,
 * for COPY, for an INSERT ... SELECT from a local table, and for one it
 * pushes down whole to the shards (it sends the value).  But an INSERT ...
 * SELECT from a Citus table that it pulls to the coordinator or
 * repartitions (any that leaves stage_id to its nextval() default) is
 * planned as a distributed SELECT of the source with the defaults in its
 * target list, run by the workers, or by connections Citus opens to the
 * coordinator itself for what it holds (the reference tables' copies,
 * shards): they evaluate the defaults, volatile or not; only nextval() is
 * kept in the session (tried with Citus 13.2).  No default of an xid8
 * column can hold a nextval() (Citus wants the sequence to be of the
 * column's type), so such rows cannot get the session's id: evaluated
 * there, this refuses, and the statement fails instead of staging rows that
 * transform() would miss.  The same refusal covers a statement run on a
 * worker itself (Citus lets a worker route writes to the shards).  (Citus's
 * local execution of what the coordinator holds runs in the session: the
 * right id, no refusal.)
 *
 * STABLE like pg_current_xact_id(), so that a pushed-down INSERT ... SELECT
 * still gets the session's value.  The worker check reads a catalog, so
 * the checks are made once per statement and transaction, not per row
 * (the transaction checked is kept in the call's fn_extra, not in a
 * static); without Citus that is one syscache lookup and a string
 * comparison per statement.
 */
Datum
ca_staging_xid(PG_FUNCTION_ARGS)
{
	FmgrInfo   *flinfo = fcinfo->flinfo;
	FullTransactionId *checked = flinfo ? (FullTransactionId *) flinfo->fn_extra : NULL;
	FullTransactionId xid;

	/* pg_current_xact_id()'s own check, which would otherwise be an elog */
	PreventCommandDuringRecovery("staging_xid()");
	xid = GetTopFullTransactionId();
	if (checked == NULL || !FullTransactionIdEquals(xid, *checked))
	{
		if (ca_citus_worker_node())
			ereport(ERROR,
					errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					errmsg("staged rows must be marked with the Citus coordinator's transaction id, and this node is a worker"),
					errdetail("Either the statement runs on a worker, or it is an INSERT ... SELECT from a Citus table that Citus runs through the workers, which evaluate the default of staged_xid; transform() would skip such rows or take them runs later."),
					errhint("Stage through the coordinator: with VALUES, COPY, or from a local table (CREATE TEMP TABLE ... AS SELECT from the Citus table, then INSERT ... SELECT from that)."));
		if (ca_citus_internal_backend())
			ereport(ERROR,
					errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					errmsg("staged rows must be marked with the Citus coordinator's transaction id, and this is a connection Citus opened to run part of another session's statement"),
					errdetail("Citus evaluates the default of staged_xid in such connections for an INSERT ... SELECT from a Citus table that it pulls to the coordinator or repartitions (here over a connection to the coordinator itself, which holds copies of the reference tables and may hold shards); their transaction ids are not the staging session's, and transform() would skip such rows or take them runs later."),
					errhint("Stage through the coordinator: with VALUES, COPY, or from a local table (CREATE TEMP TABLE ... AS SELECT from the Citus table, then INSERT ... SELECT from that)."));
		if (flinfo != NULL)
		{
			if (checked == NULL)
				flinfo->fn_extra = checked = MemoryContextAlloc(flinfo->fn_mcxt, sizeof(FullTransactionId));
			*checked = xid;
		}
	}
	PG_RETURN_FULLTRANSACTIONID(xid);
}
