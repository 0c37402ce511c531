#!/usr/bin/env bash
# Run the whole test suite on this machine: installs what is missing,
# builds (warnings are errors) and installs the extension, then runs the
# pg_regress, isolation and TAP tests as an unprivileged user, each on its
# own throwaway instance.  Last line: "N passed, N failed".
set -uo pipefail
. "$(dirname "$0")/common.sh"
ensure_root "$@"

passed=0
failed=0
summary() {
    echo
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit $?
}

install_packages
ensure_test_locale
if ! build_and_install; then
    echo "build failed"
    failed=1
    summary
fi

# issue 17: Citus for t/017_citus.pl, built once into a cache (the test skips without it)
PG_CONFIG="$PG_CONFIG" "$REPO/scripts/citus.sh" || log "Citus is not available: t/017_citus.pl will be skipped"

WORK=$(scratch_copy test)
log "running tests in $WORK"

# Count the "ok" / "FAILED" lines of a pg_regress-style log.
count_regress() {
    local ok bad
    ok=$(grep -E -c '\.\.\. +ok( |$)' "$1" || true)
    bad=$(grep -E -c '\.\.\. +(FAILED|failed)' "$1" || true)
    passed=$((passed + ok))
    failed=$((failed + bad))
    printf '%s: %d passed, %d failed\n' "$2" "$ok" "$bad"
}

# The real public data sets live beside the checkout (../shared/data); the
# scratch copy is elsewhere, so tell the tests where they are.
if [ -n "${CA_SHARED_DATA:-}" ]; then
    :   # given by the caller (CA_SHARED_DATA=/nonexistent runs the skipped path)
elif [ -d "$REPO/../shared/data" ]; then
    export CA_SHARED_DATA=$(cd "$REPO/../shared/data" && pwd)
else
    export CA_SHARED_DATA=/nonexistent
fi

run_family() {
    local name=$1 target=$2 logfile="$WORK/$1.log"
    log "$name tests"
    as_pg_user env CA_SHARED_DATA="$CA_SHARED_DATA" make -C "$WORK" PG_CONFIG="$PG_CONFIG" "$target" >"$logfile" 2>&1
    local rc=$?
    cat "$logfile"
    echo "$rc" >"$WORK/$name.rc"
}

run_family regress check-regress
count_regress "$WORK/regress.log" regress
if [ "$(cat "$WORK/regress.rc")" -ne 0 ] && ! grep -q '\.\.\. *FAILED' "$WORK/regress.log"; then
    echo "pg_regress did not run to completion"; failed=$((failed + 1))
fi
[ -f "$WORK/regression.diffs" ] && { echo "--- regression.diffs"; cat "$WORK/regression.diffs"; }

if ls "$WORK"/specs/*.spec >/dev/null 2>&1; then
    run_family isolation check-isolation
    count_regress "$WORK/isolation.log" isolation
    if [ "$(cat "$WORK/isolation.rc")" -ne 0 ] && ! grep -q '\.\.\. *FAILED' "$WORK/isolation.log"; then
        echo "isolation tester did not run to completion"; failed=$((failed + 1))
    fi
    [ -f "$WORK/output_iso/regression.diffs" ] && { echo "--- isolation regression.diffs"; cat "$WORK/output_iso/regression.diffs"; }
fi

if ls "$WORK"/t/*.pl >/dev/null 2>&1; then
    run_family tap check-tap
    # prove prints one line per test file: "t/001_x.pl .. ok" or a failure
    tap_ok=$(grep -E -c '^t/[^ ]+\.pl \.+ ok' "$WORK/tap.log" || true)
    tap_total=$(ls "$WORK"/t/*.pl | wc -l)
    passed=$((passed + tap_ok))
    failed=$((failed + tap_total - tap_ok))
    printf 'tap: %d passed, %d failed\n' "$tap_ok" "$((tap_total - tap_ok))"
    if [ "$tap_ok" -ne "$tap_total" ]; then
        for f in "$WORK"/tmp_check/log/regress_log_*; do
            [ -f "$f" ] && { echo "--- $f (tail)"; tail -n 60 "$f"; }
        done
    fi
fi

if [ "$failed" -eq 0 ]; then
    rm -rf "$WORK"
else
    echo "test output kept in $WORK"
fi
summary
