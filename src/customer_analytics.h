/*
 * customer_analytics.h
 *	  The module entry points: each capability's one-time set-up (its
 *	  settings), called from _PG_init in customer_analytics.c.
 *
 * Each capability lives in its own src/<module>.c; what modules share is
 * declared in a header of its own (utils.h, numerics.h, copy_source.h,
 * citus_guard.h, pg_compat.h).
 */
#ifndef CUSTOMER_ANALYTICS_H
#define CUSTOMER_ANALYTICS_H

/* GUC prefix; every setting of ours is customer_analytics.<name> */
#define CA_GUC_PREFIX "customer_analytics"

/* per-module settings, defined from _PG_init */
extern void ca_ingest_init(void);
extern void ca_rfm_init(void);
extern void ca_clickstream_init(void);
extern void ca_anomalies_init(void);
extern void ca_schedule_init(void);
extern void ca_pipeline_init(void);
extern void ca_clv_init(void);

#endif							/* CUSTOMER_ANALYTICS_H */
