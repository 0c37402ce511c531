/*
 * copy_source.h
 *	  Feed bytes produced in memory to PostgreSQL's COPY FROM machinery
 *	  (copy_source.c): whole, or record by record through a reader.
 */
#ifndef CA_COPY_SOURCE_H
#define CA_COPY_SOURCE_H

#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "utils/relcache.h"

/*
 * The producer appends its next chunk to "out" and returns false once it
 * has nothing more to give.
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

#endif							/* CA_COPY_SOURCE_H */
