# Shared by scripts/demo.sh, scripts/test.sh and the benchmarks: become
# root, install what is missing, build and install the extension.  Sourced,
# not run.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# the unprivileged user that runs throwaway clusters (initdb refuses root)
PG_OS_USER=${PG_OS_USER:-postgres}

# The majors the source supports (the Makefile refuses others) and those
# the test command runs on: the oldest and the newest.
SUPPORTED_MAJORS=(15 16 17 18)
TESTED_MAJORS=(15 18)

# The major of a pg_config, empty when it cannot be run.
pg_major_of() {
    "$1" --version 2>/dev/null | sed -n 's/^PostgreSQL \([0-9][0-9]*\).*/\1/p'
}

# PG_CONFIG may point at another (relocated) installation; otherwise
# Debian's PostgreSQL 15 (select_pg switches to another major).
PG_CONFIG_FROM_CALLER=0
[ -n "${PG_CONFIG:-}" ] && PG_CONFIG_FROM_CALLER=1
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PG_MAJOR=$(pg_major_of "$PG_CONFIG")
PG_MAJOR=${PG_MAJOR:-15}
PG_BINDIR=$("$PG_CONFIG" --bindir 2>/dev/null || echo /usr/lib/postgresql/$PG_MAJOR/bin)

# Debian packages the build, the tests and the demo need, besides
# PostgreSQL itself (pg_packages).
BASE_PACKAGES=(make gcc libipc-run-perl graphviz gnuplot-nox locales)
pg_packages() { echo "postgresql-$1 postgresql-server-dev-$1 postgresql-$1-cron"; }
PACKAGES=("${BASE_PACKAGES[@]}")
# a relocated installation brings its own server and pg_cron
[ "$PG_CONFIG" = "/usr/lib/postgresql/$PG_MAJOR/bin/pg_config" ] && PACKAGES+=($(pg_packages "$PG_MAJOR"))

. "$REPO/scripts/pg18.sh"

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Re-run the calling script as root (through sudo) if needed.
ensure_root() {
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "run this as root (sudo is not installed)"
        exec sudo -E bash "$0" "$@"
    fi
}

# install_packages [package...]: PACKAGES when none are given.
install_packages() {
    local missing=() p want=("$@")
    [ ${#want[@]} -gt 0 ] || want=("${PACKAGES[@]}")
    for p in "${want[@]}"; do
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

# select_pg MAJOR: PG_CONFIG, PG_MAJOR and PG_BINDIR become those of that
# major: CA_PG<MAJOR>_CONFIG when set, else installed if missing: from apt
# when it has the packages (Debian's 15, or the PostgreSQL project's
# repository), else 18 is built from the vendored sources (scripts/pg18.sh).
# Returns 1 when it cannot be had.
select_pg() {
    local major=$1 given_var=CA_PG$1_CONFIG
    if [ -n "${!given_var:-}" ]; then
        # CA_PG15_CONFIG=... (etc.): that installation for this major
        [ "$(pg_major_of "${!given_var}")" = "$major" ] \
            || { echo "error: $given_var (${!given_var}) is not PostgreSQL $major" >&2; return 1; }
        PG_CONFIG=${!given_var}
    elif [ "$major" = 18 ]; then
        ensure_pg18 || return 1
        PG_CONFIG=$PG18_CONFIG
    else
        install_packages $(pg_packages "$major")
        PG_CONFIG=/usr/lib/postgresql/$major/bin/pg_config
    fi
    PG_MAJOR=$major
    PG_BINDIR=$("$PG_CONFIG" --bindir)
}

# Build with warnings as errors, then install into the PostgreSQL tree.
# Objects built for another installation are cleaned first: a module
# linked from another major's objects would be refused when loaded (or
# worse, not).
build_and_install() {
    local stamp=$REPO/.build-pg_config want
    want="$PG_CONFIG $("$PG_CONFIG" --version)"
    log "building customer_analytics for $("$PG_CONFIG" --version) ($PG_CONFIG)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        make -C "$REPO" -s PG_CONFIG="$PG_CONFIG" clean >/dev/null || return 1
        echo "$want" >"$stamp"
    fi
    make -C "$REPO" -s PG_CONFIG="$PG_CONFIG" \
        PG_CFLAGS="$CA_CFLAGS" \
        >/dev/null || return 1
    make -C "$REPO" -s PG_CONFIG="$PG_CONFIG" install >/dev/null || return 1
}

# copy_tree DEST: what git tracks in the checkout plus the untracked files
# it does not ignore (so no demo_out/ cluster, build products or test
# output); a plain copy without those when this is not a git checkout.
copy_tree() {
    local dest=$1
    if git -c safe.directory='*' -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # a tracked file deleted in the working tree is not copied
        git -c safe.directory='*' -C "$REPO" ls-files -z --cached --others --exclude-standard \
            | (cd "$REPO" && while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) \
            | sort -zu | tar -C "$REPO" --null -T - -cf - | tar -C "$dest" -xf -
    else
        tar -C "$REPO" --exclude=.git --exclude='*.o' --exclude='*.bc' --exclude='*.so' \
            --exclude=results --exclude=tmp_check --exclude=tmp_check_iso --exclude=output_iso \
            --exclude=demo_out --exclude=test_out --exclude=.build-pg_config \
            -cf - . | tar -C "$dest" -xf -
    fi
}

# A copy of the source tree that the unprivileged user can write in
# (pg_regress writes results/ and its temporary instance there).
scratch_copy() {
    local dest
    dest=$(mktemp -d "/tmp/customer_analytics_$1.XXXXXX")
    copy_tree "$dest" || return 1
    chown -R "$PG_OS_USER" "$dest"
    echo "$dest"
}

as_pg_user() {
    runuser -u "$PG_OS_USER" -- "$@"
}
