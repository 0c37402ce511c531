#!/usr/bin/env bash
# The main job, end to end on this machine: install what is missing, build
# and install the extension, start a throwaway cluster (pg_cron preloaded)
# in ./demo_out as an unprivileged user, create the extension, then run the
# steps in scripts/demo/ in order: generate the sample shop, load and
# transform it, run the analytics, print the reports; then draw charts of
# them into ./demo_out/charts (scripts/charts.sh).
#
# To use an existing server instead, set the usual PG* variables (PGHOST,
# PGPORT, PGUSER, PGDATABASE); nothing is started or stopped then.
# --pg 18 runs it on PostgreSQL 18 (from apt, or built: scripts/pg18.sh).
set -euo pipefail
. "$(dirname "$0")/common.sh"
ensure_root "$@"

OUT=${DEMO_OUT:-$REPO/demo_out}
DEMO_PORT=${DEMO_PORT:-54329}
CUSTOMERS=${DEMO_CUSTOMERS:-10000}
DAYS=${DEMO_DAYS:-365}

# --pg 18: the demo on PostgreSQL 18 (installed or built: scripts/pg18.sh)
want_major=
while [ $# -gt 0 ]; do
    case $1 in
        --pg) [ $# -ge 2 ] || die "usage: $0 [--pg 15|18]"; want_major=$2; shift 2 ;;
        --pg=*) want_major=${1#--pg=}; shift ;;
        *) die "usage: $0 [--pg 15|18]" ;;
    esac
done
if [ -n "$want_major" ] && [ "$want_major" != "$PG_MAJOR" ]; then
    [ "$PG_CONFIG_FROM_CALLER" = 0 ] || die "PG_CONFIG ($PG_CONFIG) is PostgreSQL $PG_MAJOR, but --pg $want_major was asked for"
    install_packages "${BASE_PACKAGES[@]}"
    select_pg "$want_major" || die "PostgreSQL $want_major could not be set up"
else
    install_packages
fi
build_and_install || die "build failed"

if [ -n "${PGHOST:-}${PGPORT:-}${PGDATABASE:-}" ]; then
    log "using the existing server given by PG* variables"
    PSQL=(psql -X -v ON_ERROR_STOP=1)
    OWN_CLUSTER=false
else
    OWN_CLUSTER=true
    DATA=$OUT/pgdata
    log "starting a throwaway cluster in $DATA (port $DEMO_PORT)"
    mkdir -p "$OUT"
    chown "$PG_OS_USER" "$OUT"
    if [ -f "$DATA/postmaster.pid" ]; then
        as_pg_user "$PG_BINDIR/pg_ctl" -D "$DATA" -m fast stop >/dev/null 2>&1 || true
    fi
    rm -rf "$DATA"
    as_pg_user "$PG_BINDIR/initdb" -D "$DATA" -A trust -U postgres -E UTF8 --locale=C.UTF-8 >/dev/null
    cat >>"$DATA/postgresql.conf" <<CONF
port = $DEMO_PORT
listen_addresses = ''
unix_socket_directories = '$OUT'
shared_preload_libraries = 'pg_cron'
cron.database_name = 'warehouse'
cron.use_background_workers = on
max_worker_processes = 20
max_wal_size = '4GB'
CONF
    as_pg_user "$PG_BINDIR/pg_ctl" -D "$DATA" -l "$OUT/server.log" -w start >/dev/null
    export PGHOST=$OUT PGPORT=$DEMO_PORT PGUSER=postgres
    as_pg_user "$PG_BINDIR/psql" -X -q -h "$OUT" -p "$DEMO_PORT" -U postgres -d postgres -c "CREATE DATABASE warehouse" >/dev/null
    export PGDATABASE=warehouse
    PSQL=(runuser -u "$PG_OS_USER" -- "$PG_BINDIR/psql" -X -v ON_ERROR_STOP=1 -h "$OUT" -p "$DEMO_PORT" -U postgres -d warehouse)
fi

log "creating the extensions"
"${PSQL[@]}" -q <<'SQL'
SET client_min_messages = warning;
-- pg_cron can only be installed in its cron.database_name; elsewhere the
-- demo goes on without it
DO $$
BEGIN
    IF current_setting('cron.database_name', true) = current_database() THEN
        CREATE EXTENSION IF NOT EXISTS pg_cron;
    ELSE
        RAISE WARNING 'pg_cron is not available in database % (cron.database_name is %)',
            current_database(), coalesce(current_setting('cron.database_name', true), 'not set');
    END IF;
END
$$;
DROP EXTENSION IF EXISTS customer_analytics CASCADE;
DROP SCHEMA IF EXISTS customer_analytics CASCADE;
CREATE EXTENSION customer_analytics;
SQL

# The demo's steps, in name order: scripts/demo/NN_<step>.sql.  Each
# loads, runs or reports one capability; psql variables carry the settings.
for step in "$REPO"/scripts/demo/*.sql; do
    log "step $(basename "$step" .sql)"
    "${PSQL[@]}" -v customers="$CUSTOMERS" -v days="$DAYS" -v out="$OUT" -f - <"$step"
done

log "charts of the demo's output (gnuplot)"
"$REPO/scripts/charts.sh" "$OUT/charts" >/dev/null
chown -R "$PG_OS_USER" "$OUT/charts" 2>/dev/null || true
echo "    charts: $(cd "$OUT/charts" && ls *.png | tr '\n' ' ')"
echo "    in $OUT/charts (the data behind them in $OUT/charts/data)"

if $OWN_CLUSTER; then
    log "done. The cluster keeps running: psql -h $OUT -p $DEMO_PORT -U postgres warehouse"
    echo "    stop it with: runuser -u $PG_OS_USER -- $PG_BINDIR/pg_ctl -D $OUT/pgdata stop"
fi
