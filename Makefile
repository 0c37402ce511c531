# customer_analytics: PGXS build.
#
# C sources and the SQL pieces of the install script are discovered by
# wildcard, so a new capability is a new src/<name>.c plus
# src/sql/NN_<name>.sql; the NN prefix orders the pieces in the script.
#
# Releasing a version: copy the built customer_analytics--<old>.sql to a
# committed file, raise default_version in the control file, and write
# customer_analytics--<old>--<new>.sql doing what the changed pieces do
# (t/005_upgrade.pl checks that an upgraded and a fresh install have the
# same catalog).

EXTENSION  = customer_analytics
EXTVERSION = $(shell sed -n "s/^default_version *= *'\(.*\)'/\1/p" $(EXTENSION).control)

MODULE_big = $(EXTENSION)
OBJS       = $(patsubst %.c,%.o,$(sort $(wildcard src/*.c)))
SQL_PIECES = $(sort $(wildcard src/sql/*.sql))
# The current version's script is built from the pieces; the scripts of
# released versions (frozen, committed) and the upgrade scripts between
# them are installed as they are, so ALTER EXTENSION ... UPDATE works
# from every release.
DATA_built = $(EXTENSION)--$(EXTVERSION).sql
DATA       = $(filter-out $(DATA_built),$(wildcard $(EXTENSION)--*.sql))

PG_CPPFLAGS = -I$(srcdir)/src -I$(shell $(PG_CONFIG) --includedir)
SHLIB_LINK  = -lpq

# Tests.  pg_regress and the isolation tester each start a throwaway
# instance with pg_cron preloaded; TAP tests (t/*.pl) start their own.
REGRESS        = $(patsubst sql/%.sql,%,$(sort $(wildcard sql/*.sql)))
REGRESS_OPTS   = --temp-config=$(srcdir)/sql/regress.conf \
                 --temp-instance=./tmp_check
ISOLATION      = $(patsubst specs/%.spec,%,$(sort $(wildcard specs/*.spec)))
ISOLATION_OPTS = --temp-config=$(srcdir)/sql/regress.conf \
                 --temp-instance=./tmp_check_iso
TAP_TESTS      = 1

EXTRA_CLEAN = results output_iso tmp_check tmp_check_iso log \
              regression.diffs regression.out

PG_CONFIG ?= pg_config

# One source tree for these majors (src/pg_compat.h holds what differs);
# another fails here, before a compiler error could hide why.
SUPPORTED_MAJORS = 15 16 17 18
PG_MAJOR := $(shell $(PG_CONFIG) --version 2>/dev/null | sed -n 's/^PostgreSQL \([0-9][0-9]*\).*/\1/p')
ifeq ($(PG_MAJOR),)
$(error cannot run "$(PG_CONFIG) --version": set PG_CONFIG to the pg_config of PostgreSQL 15, 16, 17 or 18)
endif
ifeq ($(filter $(PG_MAJOR),$(SUPPORTED_MAJORS)),)
$(error customer_analytics supports PostgreSQL 15 to 18, but $(PG_CONFIG) is PostgreSQL $(PG_MAJOR); set PG_CONFIG to the pg_config of a supported installation)
endif
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

$(EXTENSION)--$(EXTVERSION).sql: $(SQL_PIECES) $(EXTENSION).control
	cat $(SQL_PIECES) > $@

# pg_regress tells the SQL tests where the checkout is (PG_ABS_SRCDIR, read
# by sql/include/settings.sql); the TAP tests find it from their own path
# (t/lib/CustomerAnalytics.pm).  The shared real data sets, outside the
# repository, reach both through the environment.
CA_SHARED_DATA ?= $(abspath $(srcdir)/../shared/data)
export CA_SHARED_DATA

# The three test families as separate targets, so that the test command
# can run every family and count the results even when one fails.
.PHONY: check-regress check-isolation check-tap
check-regress:
	$(pg_regress_installcheck) $(REGRESS_OPTS) $(REGRESS)

check-isolation:
ifneq ($(strip $(ISOLATION)),)
	$(pg_isolation_regress_installcheck) $(ISOLATION_OPTS) $(ISOLATION)
endif

check-tap:
	$(prove_installcheck)
