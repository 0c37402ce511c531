#!/usr/bin/env bash
# The Debian package, as a user gets it: builds the .deb from a copy of the
# checkout with dpkg-buildpackage (debian/, pg_buildext), moves the files a
# PGXS "make install" put into the system's PostgreSQL aside, installs the
# package with apt-get, and in a throwaway cluster of that PostgreSQL runs
# CREATE EXTENSION and one call of each capability.  Then it removes the
# package and puts the PGXS files back, leaving the machine as it found it.
# scripts/test.sh runs it last and counts it as one test; it exits non-zero
# on any failure.
set -uo pipefail
. "$(dirname "$0")/common.sh"
ensure_root "$@"

PKG_BUILD_PACKAGES=(debhelper dpkg-dev postgresql-server-dev-all libpq-dev make gcc)
PKG_NAME_RE='^postgresql-([0-9]+)-customer-analytics_[^_]+_[^_]+\.deb$'

# One run at a time: two would fight over dpkg's lock and over the files.
exec 9>/var/lock/customer_analytics-package-test.lock
flock 9

T=$(mktemp -d /tmp/customer_analytics_package.XXXXXX)
chmod 755 "$T"
installed_pkgs=()
cluster_dirs=()
restore_dirs=()

cleanup() {
    local d entry pkg
    for entry in "${cluster_dirs[@]}"; do
        d=${entry#*:}
        [ -f "$d/data/postmaster.pid" ] \
            && as_pg_user "/usr/lib/postgresql/${entry%%:*}/bin/pg_ctl" -D "$d/data" -m immediate stop >/dev/null 2>&1
    done
    for pkg in "${installed_pkgs[@]}"; do
        log "removing $pkg"
        DEBIAN_FRONTEND=noninteractive apt-get purge -y -q "$pkg" >"$T/purge-$pkg.log" 2>&1 \
            || echo "error: apt-get purge $pkg failed (see $T/purge-$pkg.log)" >&2
    done
    # the PGXS-installed files go back where they were
    for d in "${restore_dirs[@]}"; do
        (cd "$d" && find . -type f -print0 | tar --null -T - -cf - | tar -C / -xpf -) \
            || echo "error: restoring the files saved in $d failed" >&2
    done
    if [ "${keep:-false}" = true ]; then
        echo "package test output kept in $T" >&2
    else
        rm -rf "$T"
    fi
}
trap cleanup EXIT

fail() { echo "package test FAILED: $*" >&2; keep=true; exit 1; }

missing=()
for p in "${PKG_BUILD_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing the packaging tools: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >"$T/apt.log" 2>&1 \
        || { apt-get update -q >>"$T/apt.log" 2>&1 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$T/apt.log" 2>&1; } \
        || fail "apt-get install ${missing[*]} failed (see $T/apt.log)"
fi

log "building the .deb (dpkg-buildpackage -us -uc -b)"
mkdir "$T/src"
copy_tree "$T/src"
# debian/control must list a package for each installed major of
# debian/pgversions (what pg_buildext checkcontrol verifies)
(cd "$T/src" && pg_buildext updatecontrol) >"$T/build.log" 2>&1 || fail "pg_buildext updatecontrol failed (see $T/build.log)"
(cd "$T/src" && dpkg-buildpackage -us -uc -b) >>"$T/build.log" 2>&1 \
    || { tail -n 40 "$T/build.log" >&2; fail "dpkg-buildpackage failed (see $T/build.log)"; }

debs=()
for f in "$T"/*.deb; do
    [[ "$(basename "$f")" =~ $PKG_NAME_RE ]] && debs+=("$f")
done
[ ${#debs[@]} -gt 0 ] || fail "dpkg-buildpackage made no postgresql-NN-customer-analytics package"

for deb in "${debs[@]}"; do
    [[ "$(basename "$deb")" =~ $PKG_NAME_RE ]]
    major=${BASH_REMATCH[1]}
    pkg=postgresql-$major-customer-analytics
    config=/usr/lib/postgresql/$major/bin/pg_config
    log "$pkg: $(basename "$deb")"
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        fail "$pkg is installed already; remove it first (apt-get purge $pkg): this test installs and removes its own"
    fi

    # Move the files of a PGXS install aside: the package must bring its own.
    save=$T/saved-$major
    mkdir -p "$save"
    restore_dirs+=("$save")
    for f in "$("$config" --sharedir)"/extension/customer_analytics[.-]* \
             "$("$config" --pkglibdir)"/customer_analytics.so \
             "$("$config" --pkglibdir)"/bitcode/customer_analytics.index.bc \
             "$("$config" --pkglibdir)"/bitcode/customer_analytics; do
        [ -e "$f" ] || continue
        tar -cf - "$f" 2>/dev/null | tar -C "$save" -xpf - && rm -rf "$f"
    done
    log "moved aside: $(cd "$save" && find . -type f | wc -l) PGXS-installed files"

    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$deb" >"$T/install-$major.log" 2>&1 \
        || fail "apt-get install $deb failed (see $T/install-$major.log)"
    installed_pkgs+=("$pkg")
    owner=$(dpkg -S "$("$config" --sharedir)/extension/customer_analytics.control" 2>/dev/null | cut -d: -f1)
    [ "$owner" = "$pkg" ] || fail "customer_analytics.control does not come from $pkg (dpkg -S says: ${owner:-nothing})"

    # A throwaway cluster of that major, pg_cron preloaded when installed.
    dir=$T/cluster-$major
    mkdir -p "$dir"
    chown "$PG_OS_USER" "$dir"
    cluster_dirs+=("$major:$dir")
    port=$((56000 + major))
    as_pg_user "/usr/lib/postgresql/$major/bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null \
        || fail "initdb ($major) failed"
    cron=false
    [ -f "$("$config" --pkglibdir)/pg_cron.so" ] && cron=true
    {
        echo "port = $port"
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$dir'"
        if $cron; then
            echo "shared_preload_libraries = 'pg_cron'"
            echo "cron.database_name = 'postgres'"
            echo "cron.use_background_workers = on"
            echo "max_worker_processes = 20"
        fi
    } >>"$dir/data/postgresql.conf"
    as_pg_user "/usr/lib/postgresql/$major/bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null \
        || fail "the $major cluster did not start (see $dir/server.log)"

    # One call of each capability, each printing one checked line.
    cat >"$dir/calls.sql" <<'SQL'
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
CREATE EXTENSION customer_analytics;
SELECT 'version ' || extversion FROM pg_extension WHERE extname = 'customer_analytics';
SELECT 'generator ' || (sum(rows) > 0) FROM customer_analytics.generate_sample_data(customers => 60, days => 30, seed => 3);
SELECT 'transform ' || (sum(rows_affected) > 0) FROM customer_analytics.transform();
SELECT 'ingest ' || rows_loaded || ' ' || rows_rejected FROM customer_analytics.ingest_csv_text('customer_analytics.stg_orders',
    E'order_id,line_number,customer_id,product_id,order_ts,quantity,unit_price\n'
    'PKG-1,1,C0000001,P00001,2025-01-10 10:00+00,1,5.00\nPKG-2,1,C0000001,P00001,not a time,1,5.00\n');
SET customer_analytics.as_of = '2025-01-31';
SELECT 'rfm ' || (count(*) > 0) FROM customer_analytics.rfm();
SELECT 'anomalies ' || customer_analytics.stats_mean(customer_analytics.stats_agg(x)) FROM generate_series(1, 9) x;
CALL customer_analytics.run_pipeline();
SELECT 'pipeline ' || status FROM customer_analytics.pipeline_run ORDER BY run_id DESC LIMIT 1;
SELECT 'forecast ' || count(*) FROM customer_analytics.forecast(
    (SELECT customer_analytics.holt_winters(d::date, 100 + extract(dow FROM d)::float8, 7)
     FROM generate_series('2025-01-01'::date, '2025-02-28', '1 day') d), 7);
SELECT 'clv ' || (count(*) > 0) FROM customer_analytics.customer_clv;
SELECT 'clickstream ' || (customer_analytics.track_event('page_view', 'pkg-session') IS NOT NULL);
SELECT 'alerts ' || (customer_analytics.raise_alert('package_test', 'subject') > 0);
CREATE ROLE pkg_analyst;
SELECT 'privileges ' || (count(*) > 0) FROM customer_analytics.grant_analyst('pkg_analyst');
SQL
    if $cron; then
        cat >>"$dir/calls.sql" <<'SQL'
CREATE EXTENSION pg_cron;
SELECT 'schedule ' || (customer_analytics.schedule_pipeline('*/15 * * * *') > 0) || ' ' || customer_analytics.unschedule_pipeline();
SQL
    fi
    out=$(as_pg_user "/usr/lib/postgresql/$major/bin/psql" -X -q -A -t -h "$dir" -p "$port" -U postgres -d postgres \
              -f "$dir/calls.sql" 2>&1) || { echo "$out" >&2; fail "a call failed on PostgreSQL $major"; }
    echo "$out"
    want="version 0.2
generator true
transform true
ingest 1 1
rfm true
anomalies 5
pipeline succeeded
forecast 7
clv true
clickstream true
alerts true
privileges true"
    $cron && want+=$'\nschedule true true'
    [ "$out" = "$want" ] || { diff <(echo "$want") <(echo "$out") >&2; fail "unexpected results on PostgreSQL $major"; }
    as_pg_user "/usr/lib/postgresql/$major/bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null
    log "$pkg: installed from the .deb, every capability answered on PostgreSQL $major"
done
echo "package test: ok (${#debs[@]} package(s): $(for d in "${debs[@]}"; do basename "$d"; done | tr '\n' ' '))"
