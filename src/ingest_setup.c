/*
 * ingest_setup.c
 *	  Setting up a load: the target checked as COPY FROM checks it, the
 *	  header mapped to columns, imputation rules read, the executor state
 *	  (input functions, defaults, constraints, indexes, slots) built.
 */
#include "postgres.h"

#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/executor.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "optimizer/optimizer.h"
#include "rewrite/rewriteHandler.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rls.h"

#include "citus_guard.h"
#include "ingest.h"
#include "utils.h"

/* ---------------------------------------------------------------------
 * Target checks, as COPY FROM makes them
 * ---------------------------------------------------------------------
 */
void
ingest_check_target(Relation rel)
{
	char	   *name = ca_relation_name(RelationGetRelid(rel));
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

void
ingest_map_columns(IngestState *st, char **header, int nheader)
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

void
ingest_load_imputation_rules(IngestState *st)
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
void
ingest_check_required_columns(IngestState *st)
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

void
ingest_setup_executor(IngestState *st)
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

void
ingest_teardown_executor(IngestState *st)
{
	FreeBulkInsertState(st->bistate);
	ExecCloseIndices(st->rri);
	ExecResetTupleTable(st->estate->es_tupleTable, false);
	FreeExecutorState(st->estate);
}

List *
ingest_copy_options(IngestOptions *opts)
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
