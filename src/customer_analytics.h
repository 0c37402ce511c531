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

/* ingest.c: what a file is ("a FIFO (named pipe)", ...), for messages */
extern const char *ca_file_type_name(mode_t mode);

/* per-module settings, defined from _PG_init */
extern void ca_ingest_init(void);
extern void ca_rfm_init(void);
extern void ca_sessionize_init(void);
extern void ca_zscore_init(void);
extern void ca_cron_link_init(void);
extern void ca_pipeline_init(void);
extern void ca_clv_init(void);

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

extern CaCopyReader *ca_copy_reader_begin(Relation rel, List *copy_options,
										  CaChunkProducer produce, void *arg);
extern CaCopyFromState ca_copy_reader_state(CaCopyReader *reader);
extern void ca_copy_reader_end(CaCopyReader *reader, bool abandon);

/*
 * citus_guard.c: is a table managed by Citus (its rows in shards that only
 * SQL reaches, not the table AM)?
 */
typedef enum CaCitusKind
{
	CA_CITUS_NONE,				/* an ordinary table, or Citus is absent */
	CA_CITUS_DISTRIBUTED,
	CA_CITUS_REFERENCE,
	CA_CITUS_LOCAL				/* Citus-local or single-shard */
} CaCitusKind;

extern CaCitusKind ca_citus_kind(Oid relid);
extern int	ca_citus_errdetail(Oid relid, CaCitusKind kind);

#endif							/* CUSTOMER_ANALYTICS_H */
