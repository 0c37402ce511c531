/*
 * citus_guard.h
 *	  Is a table managed by Citus (its rows in shards that only SQL
 *	  reaches, not the table AM)?  See citus_guard.c.
 */
#ifndef CA_CITUS_GUARD_H
#define CA_CITUS_GUARD_H

typedef enum CaCitusKind
{
	CA_CITUS_NONE,				/* an ordinary table, or Citus is absent */
	CA_CITUS_DISTRIBUTED,
	CA_CITUS_REFERENCE,
	CA_CITUS_LOCAL				/* Citus-local or single-shard */
} CaCitusKind;

extern CaCitusKind ca_citus_kind(Oid relid);

/* the errdetail() of a refusal: where the table's rows really are */
extern int	ca_citus_errdetail(Oid relid, CaCitusKind kind);

/* whether this node is a Citus worker (track_event() and staging refuse there) */
extern bool ca_citus_worker_node(void);

#endif							/* CA_CITUS_GUARD_H */
