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
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

#include "citus_guard.h"
#include "utils.h"

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
