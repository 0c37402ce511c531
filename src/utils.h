/*
 * utils.h
 *	  Small helpers several modules share (utils.c): the aggregate
 *	  memory-context guard, datum conversions, names of files and tables
 *	  for messages.
 */
#ifndef CA_UTILS_H
#define CA_UTILS_H

#include <sys/types.h>

#include "datatype/timestamp.h"
#include "fmgr.h"

extern MemoryContext ca_aggregate_context(FunctionCallInfo fcinfo,
										  const char *funcname);
extern TimestampTz ca_datum_to_timestamptz(Datum d, Oid type);
extern const char *ca_file_type_name(mode_t mode);
extern char *ca_relation_name(Oid relid);

/* rfm.c: a numeric amount as an exact int64 in units of 10^-scale */
extern int64 ca_numeric_money_units(Datum value, int *scale);

#endif							/* CA_UTILS_H */
