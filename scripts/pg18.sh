# PostgreSQL 18 for the tests: from the PostgreSQL project's apt packages
# when this machine can install them, otherwise built from the upstream
# source archives in ../shared/vendor into a cache directory outside the
# checkout (a second run reuses it).  Sourced by common.sh; run directly,
# it sets 18 up and prints its pg_config.

PG18_VERSION=18.6
PG18_TARBALL=postgresql-$PG18_VERSION.tar.bz2
PG18_SHA256=555610c24d53e4316da5b7d3fc25c279d96856d5e0e23ee308c328c5fa881d9f
PGCRON18_VERSION=1.6.7
PGCRON18_TARBALL=pg_cron-$PGCRON18_VERSION.tar.gz
PGCRON18_SHA256=6684ba135a8de3663af5eddbae354a080b37d2f28f2c1801eeab3bbbb4c39f6a
# Raised whenever the configure options or the steps below change, so that
# a cache built the old way is rebuilt rather than trusted.
PG18_RECIPE=2

# Build dependencies of the source build (Debian names).
PG18_BUILD_PACKAGES=(bison flex libreadline-dev zlib1g-dev libicu-dev pkg-config
                     libssl-dev liblz4-dev libzstd-dev libxml2-dev make gcc libipc-run-perl)

CA_BUILD_CACHE=${CA_BUILD_CACHE:-/var/cache/customer_analytics}
CA_VENDOR_DIR=${CA_VENDOR_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/shared/vendor}

# True when apt can install the PGDG packages (the candidate is not "(none)").
pg18_apt_available() {
    local p
    for p in postgresql-18 postgresql-server-dev-18 postgresql-18-cron; do
        apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [0-9]' || return 1
    done
}

# Checks one vendored archive against its pinned sha256: a missing or
# corrupt archive is the user's to fix, so say which file and how.
pg18_check_archive() {
    local file=$CA_VENDOR_DIR/$1 want=$2 got
    if [ ! -f "$file" ]; then
        echo "error: $file is missing: PostgreSQL 18 cannot be built." >&2
        echo "  Put the upstream release $1 (sha256 $want) there, set CA_VENDOR_DIR to the" >&2
        echo "  directory holding it, or install postgresql-18, postgresql-server-dev-18 and" >&2
        echo "  postgresql-18-cron from apt.postgresql.org; or run with --pg 15." >&2
        return 1
    fi
    got=$(sha256sum "$file" | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
        echo "error: $file is corrupt (sha256 $got, expected $want)." >&2
        echo "  Download $1 again from the upstream release (see $CA_VENDOR_DIR/SOURCE.md)." >&2
        return 1
    fi
}

# Sets PG18_CONFIG to a usable PostgreSQL 18 with pg_cron, or returns 1
# with the reason on stderr.  The build log stays in the cache directory.
ensure_pg18() {
    if pg18_apt_available; then
        local p missing=()
        for p in postgresql-18 postgresql-server-dev-18 postgresql-18-cron; do
            dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
        done
        if [ ${#missing[@]} -gt 0 ]; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
                || { echo "error: apt-get install ${missing[*]} failed" >&2; return 1; }
        fi
        PG18_CONFIG=/usr/lib/postgresql/18/bin/pg_config
        return 0
    fi

    local dir=$CA_BUILD_CACHE/pg18 prefix stamp want
    prefix=$dir/install
    stamp=$prefix/.customer_analytics-stamp
    want="postgresql $PG18_SHA256 pg_cron $PGCRON18_SHA256 recipe $PG18_RECIPE"
    PG18_CONFIG=$prefix/bin/pg_config
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$PG18_CONFIG" ]; then
        echo "PostgreSQL $PG18_VERSION: reusing the build in $prefix" >&2
        return 0
    fi

    pg18_check_archive "$PG18_TARBALL" "$PG18_SHA256" || return 1
    pg18_check_archive "$PGCRON18_TARBALL" "$PGCRON18_SHA256" || return 1

    local missing=() p
    for p in "${PG18_BUILD_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing the build dependencies of PostgreSQL 18: ${missing[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
            || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; } \
            || { echo "error: apt-get install ${missing[*]} failed" >&2; return 1; }
    fi

    echo "PostgreSQL $PG18_VERSION: building into $prefix (a few minutes; log in $dir/build.log)" >&2
    # Built and installed aside (DESTDIR), then moved into place: a failed
    # or interrupted build leaves the previous installation as it was.
    rm -rf "$dir/src" "$dir/stage"
    mkdir -p "$dir/src" || return 1
    local jobs stage=$dir/stage$prefix
    jobs=$(nproc 2>/dev/null || echo 2)
    (
        set -e
        cd "$dir/src"
        tar -xjf "$CA_VENDOR_DIR/$PG18_TARBALL"
        tar -xzf "$CA_VENDOR_DIR/$PGCRON18_TARBALL"
        cd "postgresql-$PG18_VERSION"
        # --enable-tap-tests: PGXS's prove_installcheck needs the Perl test
        # modules installed; the --with options are those of Debian's and
        # the PostgreSQL project's packages (a 15 cluster from Debian is
        # pg_upgrade'd to this one; the demo's report uses query_to_xml).
        ./configure --prefix="$prefix" --enable-tap-tests --with-openssl --with-lz4 \
            --with-zstd --with-icu --with-libxml
        make -j"$jobs" world-bin
        make install-world-bin DESTDIR="$dir/stage"
        # pg_regress, the isolation tester and the TAP modules are what PGXS
        # test targets run; install them explicitly in case world-bin did not.
        make -C src/test/regress install DESTDIR="$dir/stage"
        make -C src/test/isolation install DESTDIR="$dir/stage"
        make -C src/test/perl install DESTDIR="$dir/stage"
        # PostgreSQL is relocatable: the staged pg_config names the staged tree
        cd "../pg_cron-$PGCRON18_VERSION"
        make PG_CONFIG="$stage/bin/pg_config"
        make PG_CONFIG="$stage/bin/pg_config" install
    ) >"$dir/build.log" 2>&1
    if [ $? -ne 0 ]; then
        echo "error: building PostgreSQL $PG18_VERSION failed; the last lines of $dir/build.log:" >&2
        tail -n 30 "$dir/build.log" >&2
        return 1
    fi
    # The tests run as an unprivileged user that must read the installation.
    chmod -R a+rX "$stage"
    rm -rf "$prefix.old"
    [ -e "$prefix" ] && mv "$prefix" "$prefix.old"
    mv "$stage" "$prefix" || return 1
    rm -rf "$prefix.old" "$dir/stage" "$dir/src"
    echo "$want" >"$stamp"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -u
    ensure_pg18 || exit 1
    echo "$PG18_CONFIG"
fi
