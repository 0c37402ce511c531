#!/usr/bin/env bash
# Run the whole test suite on this machine: installs what is missing,
# builds (warnings are errors) and installs the extension, then runs the
# pg_regress, isolation and TAP tests as an unprivileged user, each on its
# own throwaway instance; last, the Debian package test.  Last line:
# "N passed, N failed".
#
#   ./scripts/test.sh            every tested major it can set up (15 and 18)
#   ./scripts/test.sh --pg 18    one of them
#   PG_CONFIG=... ./scripts/test.sh
#                                that one installation (of a supported major)
#
# Each major runs pg_regress, the isolation tests and the TAP tests; the
# pg_upgrade test runs in the oldest major's TAP run (to the newest), and
# is skipped, visibly, in the others.
set -uo pipefail
. "$(dirname "$0")/common.sh"
ensure_root "$@"

usage() { echo "usage: $0 [--pg 15|18]" >&2; exit 2; }
want_major=
while [ $# -gt 0 ]; do
    case $1 in
        --pg) [ $# -ge 2 ] || usage; want_major=$2; shift 2 ;;
        --pg=*) want_major=${1#--pg=}; shift ;;
        -h|--help) usage ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done

passed=0
failed=0
start_all=$SECONDS
timings=()
summary() {
    echo
    [ ${#timings[@]} -gt 0 ] && printf 'time: %s\n' "${timings[@]}"
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit $?
}
# timed LABEL START: note how long a part took (from START, in $SECONDS)
timed() { timings+=("$(printf '%-28s %4d s' "$1" $((SECONDS - $2)))"); }

# A PG_CONFIG given by the caller means: that installation only.
if [ "$PG_CONFIG_FROM_CALLER" = 1 ]; then
    majors=("$PG_MAJOR")
    [ -z "$want_major" ] || [ "$want_major" = "$PG_MAJOR" ] \
        || die "PG_CONFIG ($PG_CONFIG) is PostgreSQL $PG_MAJOR, but --pg $want_major was asked for"
elif [ -n "$want_major" ]; then
    case " ${TESTED_MAJORS[*]} " in
        *" $want_major "*) majors=("$want_major") ;;
        *) die "--pg $want_major: the test command runs on PostgreSQL ${TESTED_MAJORS[*]}" ;;
    esac
else
    majors=("${TESTED_MAJORS[@]}")
fi
case " ${SUPPORTED_MAJORS[*]} " in
    *" ${majors[0]} "*) ;;
    *) die "PostgreSQL ${majors[0]} ($PG_CONFIG) is not supported: customer_analytics supports ${SUPPORTED_MAJORS[*]}" ;;
esac

install_packages "${BASE_PACKAGES[@]}"
ensure_test_locale

# Set up every major first (install or build PostgreSQL, build and install
# the extension into it): the pg_upgrade test of one run needs the other
# installation ready.  A major that cannot be set up counts as one failure
# and the others still run.
declare -A config_of
ready=()
for major in "${majors[@]}"; do
    t0=$SECONDS
    if [ "$PG_CONFIG_FROM_CALLER" = 1 ]; then
        install_packages
    elif ! select_pg "$major"; then
        echo "PostgreSQL $major: could not be set up (see above): counted as failed"
        failed=$((failed + 1))
        timed "setup PostgreSQL $major" "$t0"
        continue
    fi
    timed "setup PostgreSQL $major" "$t0"
    t0=$SECONDS
    if ! build_and_install; then
        echo "PostgreSQL $major: building the extension failed: counted as failed"
        failed=$((failed + 1))
        timed "build for $major" "$t0"
        continue
    fi
    timed "build for $major" "$t0"
    # Citus (15 to 17) for t/017_citus.pl, built once into a cache; the
    # test says it is skipped where Citus cannot be had
    case $major in
        15|16|17)
            t0=$SECONDS
            PG_CONFIG="$PG_CONFIG" "$REPO/scripts/citus.sh" \
                || log "Citus is not available for PostgreSQL $major: t/017_citus.pl will be skipped"
            timed "citus for $major" "$t0" ;;
    esac
    config_of[$major]=$PG_CONFIG
    ready+=("$major")
done

# The real public data sets live beside the checkout (../shared/data); the
# scratch copy is elsewhere, so tell the tests where they are.
if [ -n "${CA_SHARED_DATA:-}" ]; then
    :   # given by the caller (CA_SHARED_DATA=/nonexistent runs the skipped path)
elif [ -d "$REPO/../shared/data" ]; then
    export CA_SHARED_DATA=$(cd "$REPO/../shared/data" && pwd)
else
    export CA_SHARED_DATA=/nonexistent
fi

# Count the "ok" / "FAILED" lines of a pg_regress-style log.
count_regress() {
    local ok bad
    ok=$(grep -E -c '\.\.\. +ok( |$)' "$1" || true)
    bad=$(grep -E -c '\.\.\. +(FAILED|failed)' "$1" || true)
    # PostgreSQL 16 and later print "ok 1 - name  123 ms" (TAP style)
    ok=$((ok + $(grep -E -c '^ok [0-9]+ +[-+] ' "$1" || true)))
    bad=$((bad + $(grep -E -c '^not ok [0-9]+ +[-+] ' "$1" || true)))
    passed=$((passed + ok))
    failed=$((failed + bad))
    printf '%s: %d passed, %d failed\n' "$2" "$ok" "$bad"
}

# run_family WORK NAME TARGET [VAR=value...]: one family of tests, its
# output in WORK/NAME.log and its exit code in WORK/NAME.rc
run_family() {
    local work=$1 name=$2 target=$3 logfile="$1/$2.log"
    shift 3
    log "PostgreSQL $major: $name tests"
    as_pg_user env CA_SHARED_DATA="$CA_SHARED_DATA" "$@" \
        make -C "$work" PG_CONFIG="${config_of[$major]}" "$target" >"$logfile" 2>&1
    local rc=$?
    cat "$logfile"
    echo "$rc" >"$work/$name.rc"
}

# a regress-style family that stopped without reporting a failure failed
incomplete() {
    if [ "$(cat "$1/$2.rc")" -ne 0 ] && ! grep -E -q '\.\.\. *FAILED|^not ok ' "$1/$2.log"; then
        echo "$2 did not run to completion"; failed=$((failed + 1))
    fi
}

# regress_family NAME TARGET DIFFS: a pg_regress-style family on $major in
# $WORK, counted, with its diffs shown
regress_family() {
    local t0=$SECONDS
    run_family "$WORK" "$1" "$2"
    count_regress "$WORK/$1.log" "$major $1"
    incomplete "$WORK" "$1"
    [ -f "$3" ] && { echo "--- $1: ${3#$WORK/}"; cat "$3"; }
    timed "$1 on $major" "$t0"
}

for major in "${ready[@]}"; do
    WORK=$(scratch_copy "test$major")
    log "PostgreSQL $major: running tests in $WORK"
    failed_before=$failed

    regress_family regress check-regress "$WORK/regression.diffs"
    if ls "$WORK"/specs/*.spec >/dev/null 2>&1; then
        regress_family isolation check-isolation "$WORK/output_iso/regression.diffs"
    fi

    if ls "$WORK"/t/*.pl >/dev/null 2>&1; then
        t0=$SECONDS
        # the pg_upgrade test upgrades from this installation to the newest
        # one set up here, when there are two
        upgrade_env=()
        newest=${ready[${#ready[@]}-1]}
        if [ "$newest" != "$major" ]; then
            upgrade_env=(CA_UPGRADE_OLD_BINDIR="$("${config_of[$major]}" --bindir)"
                         CA_UPGRADE_NEW_BINDIR="$("${config_of[$newest]}" --bindir)")
        fi
        run_family "$WORK" tap check-tap "${upgrade_env[@]}"
        # prove prints one line per test file: "t/001_x.pl .. ok", a
        # failure, or "skipped: why" (neither passed nor failed; shown)
        tap_ok=$(grep -E -c '^t/[^ ]+\.pl \.+ ok' "$WORK/tap.log" || true)
        tap_skipped=$(grep -E -c '^t/[^ ]+\.pl \.+ skipped' "$WORK/tap.log" || true)
        tap_total=$(ls "$WORK"/t/*.pl | wc -l)
        tap_bad=$((tap_total - tap_ok - tap_skipped))
        passed=$((passed + tap_ok))
        failed=$((failed + tap_bad))
        printf '%s tap: %d passed, %d failed, %d skipped\n' "$major" "$tap_ok" "$tap_bad" "$tap_skipped"
        grep -E '^t/[^ ]+\.pl \.+ skipped' "$WORK/tap.log" | sed "s/^/$major tap: /"
        if [ "$tap_bad" -ne 0 ]; then
            for f in "$WORK"/tmp_check/log/regress_log_*; do
                [ -f "$f" ] && { echo "--- $f (tail)"; tail -n 60 "$f"; }
            done
        fi
        timed "tap on $major" "$t0"
    fi

    if [ "$failed" -eq "$failed_before" ]; then
        rm -rf "$WORK"
    else
        echo "test output of PostgreSQL $major kept in $WORK"
    fi
done

# Last: the Debian package, built, installed and used as a user would.
t0=$SECONDS
log "package test"
if "$REPO/scripts/package_test.sh"; then
    passed=$((passed + 1))
    echo "package: 1 passed, 0 failed"
else
    failed=$((failed + 1))
    echo "package: 0 passed, 1 failed"
fi
timed "package test" "$t0"
timed "total" "$start_all"
summary
