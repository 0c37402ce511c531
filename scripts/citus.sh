#!/usr/bin/env bash
# Make Citus available in the PostgreSQL 15 tree that PG_CONFIG names, for
# t/017_citus.pl.  Citus is not packaged by Debian: when the tree has no
# citus yet, build it from the vendored release archive (checked against its
# published sha256) into a cache outside the checkout, then install the
# cached build into the tree.  A second run, or another tree of the same
# PostgreSQL version, reuses the cached build (a stamp records what it was
# built from).  Exit status 0: citus is installed; otherwise the reason is
# on stderr and the caller skips the cluster test.
#
# Environment: PG_CONFIG (the target tree), CA_VENDOR (directory holding
# citus-13.2.2.tar.gz and its patch; default ../shared/vendor beside the
# checkout), CA_BUILD_CACHE (default /var/cache/customer_analytics).
set -euo pipefail

CITUS_VERSION=13.2.2
CITUS_ARCHIVE=citus-$CITUS_VERSION.tar.gz
CITUS_SHA256=dd2453caec20a830e5e63f1def5c5a98cb6f57ae510407cdcd800916fcdab430
# PostgreSQL 15.14 and later export have_createdb_privilege(), which Citus
# 13.2.2 also defines as a static function; the patch renames Citus's copy.
CITUS_PATCH=citus-$CITUS_VERSION-pg15.14.patch
CITUS_PATCH_SHA256=396794a09fd543672a78aae4d636da80fcd1a81079c4562fdf4904e94db194b0
# what ./configure needs beyond the PostgreSQL server headers
CITUS_BUILD_DEPS=(liblz4-dev libzstd-dev libkrb5-dev libssl-dev libicu-dev libreadline-dev
                  zlib1g-dev make gcc patch)

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
VENDOR=${CA_VENDOR:-$REPO/../shared/vendor}
CACHE_ROOT=${CA_BUILD_CACHE:-/var/cache/customer_analytics}

say() { printf '==> citus: %s\n' "$*" >&2; }
fail() { printf 'citus: %s\n' "$*" >&2; exit 1; }

[ -x "$PG_CONFIG" ] || fail "PG_CONFIG=$PG_CONFIG is not an executable pg_config"
PKGLIBDIR=$("$PG_CONFIG" --pkglibdir)
SHAREDIR=$("$PG_CONFIG" --sharedir)
# "PostgreSQL 15.20 (Debian ...)" -> 15.20: the cache is per minor release,
# since the patch exists precisely because minor releases changed the API.
PG_VERSION=$("$PG_CONFIG" --version | awk '{print $2}')
case $PG_VERSION in
    15.*) ;;
    *) fail "this script builds Citus $CITUS_VERSION for PostgreSQL 15 only; $PG_CONFIG is $PG_VERSION" ;;
esac

if [ -f "$SHAREDIR/extension/citus.control" ] && [ -f "$PKGLIBDIR/citus.so" ]; then
    say "already installed in $PKGLIBDIR"
    exit 0
fi

CACHE=$CACHE_ROOT/citus-$CITUS_VERSION-pg$PG_VERSION
STAGE=$CACHE/stage
STAMP=$CACHE/stamp
STAMP_WANT="citus $CITUS_VERSION $CITUS_SHA256 patch $CITUS_PATCH_SHA256 pg $PG_VERSION"

check_sha() {
    local file=$1 want=$2 got
    [ -f "$file" ] || fail "$file is missing: put the unmodified upstream file there (see SOURCE.md beside it) or set CA_VENDOR to the directory that holds it"
    got=$(sha256sum "$file" | awk '{print $1}')
    [ "$got" = "$want" ] || fail "$file is corrupt or not the expected release: sha256 $got, expected $want; fetch it again (see SOURCE.md beside it)"
}

missing_deps() {
    local p missing=()
    for p in "${CITUS_BUILD_DEPS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    echo "${missing[@]}"
}

build() {
    local missing src
    missing=$(missing_deps)
    if [ -n "$missing" ]; then
        [ "$(id -u)" -eq 0 ] || fail "build dependencies missing: $missing (install them with apt-get as root)"
        say "installing $missing"
        export DEBIAN_FRONTEND=noninteractive
        # shellcheck disable=SC2086
        apt-get install -y -q --no-install-recommends $missing >&2 \
            || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends $missing >&2; } \
            || fail "apt-get install $missing failed"
    fi
    rm -rf "$CACHE/src" "$STAGE" "$STAMP"
    mkdir -p "$CACHE/src"
    tar -C "$CACHE/src" -xzf "$VENDOR/$CITUS_ARCHIVE"
    src=$CACHE/src/citus-$CITUS_VERSION
    [ -d "$src" ] || fail "$VENDOR/$CITUS_ARCHIVE did not unpack into citus-$CITUS_VERSION/"
    patch -d "$src" -p1 <"$VENDOR/$CITUS_PATCH" >&2
    say "building in $src (several minutes; log in $CACHE/build.log)"
    (
        cd "$src"
        ./configure --without-libcurl PG_CONFIG="$PG_CONFIG"
        make -j"$(nproc)"
        make install DESTDIR="$STAGE"
    ) >"$CACHE/build.log" 2>&1 || fail "build failed; see $CACHE/build.log"
    # The staged files sit under the build tree's own directories; keep them
    # relative to lib/ and share/ so that any tree of this version can take them.
    local blib bshare
    blib=$STAGE$PKGLIBDIR
    bshare=$STAGE$SHAREDIR
    [ -f "$blib/citus.so" ] && [ -f "$bshare/extension/citus.control" ] \
        || fail "build finished but $blib/citus.so or $bshare/extension/citus.control is missing; see $CACHE/build.log"
    mkdir -p "$CACHE/lib" "$CACHE/share"
    cp -a "$blib/." "$CACHE/lib/"
    cp -a "$bshare/." "$CACHE/share/"
    rm -rf "$CACHE/src" "$STAGE"
    echo "$STAMP_WANT" >"$STAMP"
}

mkdir -p "$CACHE"
# two suites started at once must not build into the same directory
exec 9>"$CACHE/lock"
flock 9
if [ "$(cat "$STAMP" 2>/dev/null)" != "$STAMP_WANT" ]; then
    # the archives are needed only to build; the stamp vouches for a cached build
    check_sha "$VENDOR/$CITUS_ARCHIVE" "$CITUS_SHA256"
    check_sha "$VENDOR/$CITUS_PATCH" "$CITUS_PATCH_SHA256"
    build
else
    say "using the cached build in $CACHE"
fi
cp -a "$CACHE/lib/." "$PKGLIBDIR/"
cp -a "$CACHE/share/." "$SHAREDIR/"
say "installed into $PKGLIBDIR"
