/*
 * customer_analytics.h
 *	  Declarations shared between the modules of customer_analytics.
 *
 * Each capability lives in its own src/<module>.c; its one-time set-up
 * (GUCs) is declared here and called from _PG_init in customer_analytics.c.
 */
#ifndef CUSTOMER_ANALYTICS_H
#define CUSTOMER_ANALYTICS_H

#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "utils/relcache.h"

/* GUC prefix; every setting of ours is customer_analytics.<name> */
#define CA_GUC_PREFIX "customer_analytics"

/* customer_analytics.c */
extern char *ca_business_timezone;

/*
 * copy_source.c: feed bytes produced in memory to PostgreSQL's COPY FROM
 * machinery.  The producer appends its next chunk to "out" and returns
 * false once it has nothing more to give.
 */
typedef bool (*CaChunkProducer) (void *arg, StringInfo out);

extern uint64 ca_copy_from_producer(Relation rel, List *attnames,
									List *copy_options,
									CaChunkProducer produce, void *arg);

#endif							/* CUSTOMER_ANALYTICS_H */
