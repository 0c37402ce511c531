#!/usr/bin/env bash
# The diagrams in docs/: the ERD generated from the catalog of an installed
# extension (docs/erd.sql -> docs/erd.dot), and the hand-written pipeline
# architecture (docs/pipeline_architecture.dot), each rendered with
# Graphviz to .svg and .png.
#
# With PG* variables (PGHOST, PGPORT, PGUSER, PGDATABASE) set, the ERD is read
# from that database (customer_analytics must be installed there); without,
# the extension is built and installed and a throwaway cluster is started,
# used and removed.  sql/90_erd.sql fails when docs/erd.dot is stale: run
# this script and commit the result.
#
#   ./scripts/erd.sh [output directory, default docs/]
set -euo pipefail
. "$(dirname "$0")/common.sh"

OUT=${1:-$REPO/docs}
mkdir -p "$OUT"

render() {   # render <file.dot>: .svg and .png beside it
    local base=${1%.dot}
    dot -Tsvg "$1" -o "$base.svg"
    dot -Tpng -Gdpi=96 "$1" -o "$base.png"
}

if [ -n "${PGHOST:-}${PGPORT:-}${PGDATABASE:-}" ]; then
    psql -X -v ON_ERROR_STOP=1 -Atq -f "$REPO/docs/erd.sql" >"$OUT/erd.dot.tmp"
else
    ensure_root "$@"
    install_packages
    build_and_install || die "build failed"
    TMP=$(mktemp -d /tmp/customer_analytics_erd.XXXXXX)
    chown "$PG_OS_USER" "$TMP"
    PORT=${ERD_PORT:-54331}
    trap 'as_pg_user "$PG_BINDIR/pg_ctl" -D "$TMP/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$TMP"' EXIT
    as_pg_user "$PG_BINDIR/initdb" -D "$TMP/data" -A trust -U postgres -E UTF8 --locale=C.UTF-8 >/dev/null
    printf "port = %s\nlisten_addresses = ''\nunix_socket_directories = '%s'\n" "$PORT" "$TMP" >>"$TMP/data/postgresql.conf"
    as_pg_user "$PG_BINDIR/pg_ctl" -D "$TMP/data" -l "$TMP/log" -w start >/dev/null
    as_pg_user "$PG_BINDIR/psql" -X -q -h "$TMP" -p "$PORT" -U postgres -d postgres \
        -c "SET client_min_messages = warning" -c "CREATE EXTENSION customer_analytics" >/dev/null
    as_pg_user "$PG_BINDIR/psql" -X -v ON_ERROR_STOP=1 -Atq -h "$TMP" -p "$PORT" -U postgres -d postgres \
        <"$REPO/docs/erd.sql" >"$OUT/erd.dot.tmp"
fi
mv "$OUT/erd.dot.tmp" "$OUT/erd.dot"
render "$OUT/erd.dot"
if [ "$OUT" != "$REPO/docs" ]; then
    cp "$REPO/docs/pipeline_architecture.dot" "$OUT/"
fi
render "$OUT/pipeline_architecture.dot"
log "diagrams written: $OUT/erd.{dot,svg,png} $OUT/pipeline_architecture.{svg,png}"
