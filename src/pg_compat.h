/*
 * pg_compat.h
 *	  What differs between the PostgreSQL majors customer_analytics builds
 *	  on (15 to 18), in one place.
 *
 * Each difference is a PG_VERSION_NUM guard that keeps the call sites
 * written against one spelling.  Included, after postgres.h, by the files
 * that use one of them, and by customer_analytics.c so that a build for an
 * unsupported major stops here.
 */
#ifndef CA_PG_COMPAT_H
#define CA_PG_COMPAT_H

#if PG_VERSION_NUM < 150000 || PG_VERSION_NUM >= 190000
#error "customer_analytics supports PostgreSQL 15, 16, 17 and 18"
#endif

/*
 * PostgreSQL 16 gave ExecInsertIndexTuples() a trailing onlySummarizing
 * argument (for HOT updates that only touch summarizing indexes).  Ours
 * are inserts, which go into every index: false, what 15 did.
 */
#if PG_VERSION_NUM >= 160000
#define ca_ExecInsertIndexTuples(rri, slot, estate, update, noDupErr, specConflict, arbiterIndexes) \
	ExecInsertIndexTuples(rri, slot, estate, update, noDupErr, specConflict, arbiterIndexes, false)
#else
#define ca_ExecInsertIndexTuples ExecInsertIndexTuples
#endif

/*
 * PostgreSQL 18 dropped c.h's Abs() macro in favour of the C library's
 * abs()/labs() and its own i64abs(), which 15 lacks.  generator.c applies
 * it to int and int64 alike, which only a macro does.
 */
#if PG_VERSION_NUM >= 180000 && !defined(Abs)
#define Abs(x)			((x) >= 0 ? (x) : -(x))
#endif

/*
 * PostgreSQL 16 gave DecodeDateTime() a trailing argument that reports
 * what was wrong; we only ask whether a setting is a time at all.
 */
#if PG_VERSION_NUM >= 160000
#include "utils/datetime.h"
static inline int
ca_DecodeDateTime(char **field, int *ftype, int nf, int *dtype,
				  struct pg_tm *tm, fsec_t *fsec, int *tzp)
{
	DateTimeErrorExtra extra;

	return DecodeDateTime(field, ftype, nf, dtype, tm, fsec, tzp, &extra);
}
#else
#define ca_DecodeDateTime DecodeDateTime
#endif

/*
 * PostgreSQL 18 replaced pg_attribute_noreturn(), written after a
 * declarator, by pg_noreturn, written before the declaration (C11's
 * _Noreturn where the compiler has it).  Ours are written the 18 way; on
 * older majors GCC's attribute stands in that place as well.
 */
#if PG_VERSION_NUM < 180000 && !defined(pg_noreturn)
#define pg_noreturn pg_attribute_noreturn()
#endif

#endif							/* CA_PG_COMPAT_H */
