/*
 * ingest_writer.c
 *	  Writing the buffered rows: table_multi_insert() and index entries
 *	  outside any subtransaction, or, for a target with unique indexes or
 *	  foreign keys, in subtransactions bisected down to the row that fails.
 */
#include "postgres.h"

#include "access/tableam.h"
#include "access/xact.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "utils/memutils.h"

#include "ingest.h"
#include "pg_compat.h"

static void
insert_slots(IngestState *st, int lo, int hi)
{
	/*
	 * heap_multi_insert and the index AMs allocate as they go: in the batch
	 * context, which ingest_flush_rows() resets, so memory does not grow with
	 * the file.
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

bool
ingest_is_row_error(int sqlerrcode)
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
		if (!ingest_is_row_error(edata->sqlerrcode))
			ReThrowError(edata);
		ingest_report_progress(st, true);
		if (hi - lo == 1)
		{
			RowOrigin  *o = &st->origins[lo];

			st->cur_line = o->line;
			st->cur_offset = o->offset;
			ingest_add_reject(st, edata->sqlerrcode, edata->column_name, edata->message,
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

void
ingest_flush_rows(IngestState *st)
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
	ingest_report_progress(st, false);
}
