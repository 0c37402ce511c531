# Shared by scripts/demo.sh and scripts/test.sh: become root, install what
# is missing, build and install the extension.  Sourced, not run.

PG_MAJOR=15
# PG_CONFIG may point at another (relocated) installation of PostgreSQL 15
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/$PG_MAJOR/bin/pg_config}
PG_BINDIR=$("$PG_CONFIG" --bindir 2>/dev/null || echo /usr/lib/postgresql/$PG_MAJOR/bin)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# the unprivileged user that runs throwaway clusters (initdb refuses root)
PG_OS_USER=${PG_OS_USER:-postgres}

# Debian packages the build, the tests and the demo need.
PACKAGES=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR postgresql-$PG_MAJOR-cron
          make gcc libipc-run-perl graphviz gnuplot-nox locales)

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Re-run the calling script as root (through sudo) if needed.
ensure_root() {
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "run this as root (sudo is not installed)"
        exec sudo -E bash "$0" "$@"
    fi
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "packages: all present"
        return
    fi
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}"; then
        apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}" \
            || die "apt-get install failed"
    fi
    id "$PG_OS_USER" >/dev/null 2>&1 || die "user $PG_OS_USER does not exist"
}

# sql/13_ingest_translated loads a file under German lc_messages: it needs
# the OS locale (PostgreSQL's German messages come with postgresql-15).
# Without it that test reports itself skipped.
ensure_test_locale() {
    locale -a 2>/dev/null | grep -qiE '^de_DE\.utf-?8$' && return
    log "generating the locale de_DE.UTF-8"
    localedef -i de_DE -c -f UTF-8 de_DE.UTF-8 \
        || log "could not generate de_DE.UTF-8: sql/13_ingest_translated will be skipped"
}

# Warnings are errors.  The exemptions are for PostgreSQL's own headers and
# idioms: unused fmgr arguments, partially initialized structs, signed/
# unsigned comparisons in its macros, and PG_TRY's setjmp (-Wclobbered
# fires on elog.h's own variables; ours that need it are volatile).
CA_CFLAGS="-Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare -Wno-clobbered"

# Build with warnings as errors, then install into the PostgreSQL tree.
build_and_install() {
    log "building customer_analytics"
    make -C "$REPO" -s PG_CONFIG="$PG_CONFIG" \
        PG_CFLAGS="$CA_CFLAGS" \
        >/dev/null || return 1
    make -C "$REPO" -s PG_CONFIG="$PG_CONFIG" install >/dev/null || return 1
}

# A copy of the source tree that the unprivileged user can write in
# (pg_regress writes results/ and its temporary instance there).
scratch_copy() {
    local dest
    dest=$(mktemp -d "/tmp/customer_analytics_$1.XXXXXX")
    tar -C "$REPO" --exclude=.git --exclude='*.o' --exclude='*.bc' --exclude='*.so' \
        --exclude=results --exclude=tmp_check --exclude=tmp_check_iso --exclude=output_iso \
        -cf - . | tar -C "$dest" -xf -
    chown -R "$PG_OS_USER" "$dest"
    echo "$dest"
}

as_pg_user() {
    runuser -u "$PG_OS_USER" -- "$@"
}
