/*
 * customer_analytics.h
 *	  Declarations shared between the modules of customer_analytics.
 *
 * Each capability lives in its own src/<module>.c; its one-time set-up
 * (GUCs) is declared here and called from _PG_init in customer_analytics.c.
 */
#ifndef CUSTOMER_ANALYTICS_H
#define CUSTOMER_ANALYTICS_H

#include "datatype/timestamp.h"
#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "utils/relcache.h"

#include "pg_compat.h"

/* GUC prefix; every setting of ours is customer_analytics.<name> */
#define CA_GUC_PREFIX "customer_analytics"

/* customer_analytics.c */
extern char *ca_business_timezone;

/* a timestamptz, timestamp or date column's value as timestamptz */
extern TimestampTz ca_datum_to_timestamptz(Datum d, Oid type);

/* per-module settings, defined from _PG_init */
extern void ca_ingest_init(void);
extern void ca_rfm_init(void);
extern void ca_sessionize_init(void);
extern void ca_zscore_init(void);
extern void ca_cron_link_init(void);
extern void ca_pipeline_init(void);

/*
 * forecast.c: Nelder-Mead minimiser, shared with clv.c.  The objective
 * returns NaN or infinity for a point it refuses.
 */
typedef double (*CaObjective) (void *arg, const double *x);

extern double ca_nelder_mead(CaObjective f, void *arg, int n, double *x,
							 double step, double ftol, int max_iter);

/*
 * copy_source.c: feed bytes produced in memory to PostgreSQL's COPY FROM
 * machinery.  The producer appends its next chunk to "out" and returns
 * false once it has nothing more to give.
 */
typedef bool (*CaChunkProducer) (void *arg, StringInfo out);

extern uint64 ca_copy_from_producer(Relation rel, List *attnames,
									List *copy_options,
									CaChunkProducer produce, void *arg);

typedef struct CaCopyReader CaCopyReader;
typedef struct CopyFromStateData *CaCopyFromState;

extern CaCopyReader * ca_copy_reader_begin(Relation rel, List *copy_options,
										   CaChunkProducer produce, void *arg);
extern CaCopyFromState ca_copy_reader_state(CaCopyReader * reader);
extern void ca_copy_reader_end(CaCopyReader * reader, bool abandon);

#endif							/* CUSTOMER_ANALYTICS_H */
