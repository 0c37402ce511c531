/*
 * utils.h
 *	  Small helpers several modules share (utils.c): the aggregate
 *	  memory-context guard, datum conversions, names of files and tables
 *	  for messages, the rows of a query one by one.
 */
#ifndef CA_UTILS_H
#define CA_UTILS_H

#include <sys/types.h>

#include "access/htup.h"
#include "access/tupdesc.h"
#include "datatype/timestamp.h"
#include "fmgr.h"

extern MemoryContext ca_aggregate_context(FunctionCallInfo fcinfo,
										  const char *funcname);
extern TimestampTz ca_datum_to_timestamptz(Datum d, Oid type);
extern const char *ca_file_type_name(mode_t mode);
extern char *ca_relation_name(Oid relid);

/* each row of a read-only query, through a cursor (utils.c) */
typedef void (*CaSpiRowFunc) (HeapTuple tup, TupleDesc td, void *arg);
extern void ca_spi_for_each_row(const char *sql, int nargs, Oid * types, Datum *values,
								CaSpiRowFunc row, void *arg);

/* rfm.c: a numeric amount as an exact int64 in units of 10^-scale */
extern int64 ca_numeric_money_units(Datum value, int *scale);

#endif							/* CA_UTILS_H */
