#!/usr/bin/env bash
# pgindent-style formatting of src/*.c and src/*.h: pg_bsd_indent (Debian
# package pg-bsd-indent) with pgindent's flags, and a typedefs list built
# from the installed server headers plus our own structs.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
INCLUDE=$(/usr/lib/postgresql/15/bin/pg_config --includedir-server)
command -v pg_bsd_indent >/dev/null || {
    echo "pg_bsd_indent is missing: apt-get install pg-bsd-indent" >&2; exit 1; }

typedefs=$(mktemp)
trap 'rm -f "$typedefs" "$typedefs.out"' EXIT
{
    grep -rhoE 'typedef\s+(struct|enum|union)?\s*[A-Za-z_0-9]*\s*\**\s*[A-Za-z_][A-Za-z_0-9]*\s*;' "$INCLUDE" \
        | sed -E 's/.*[ *]([A-Za-z_][A-Za-z_0-9]*)\s*;$/\1/'
    grep -rhoE 'typedef .*\(\*[A-Za-z_0-9]+\)' "$INCLUDE" "$REPO/src" | sed -E 's/.*\(\*([A-Za-z_0-9]+)\)/\1/'
    grep -rhoE '^\}\s*[A-Za-z_][A-Za-z_0-9]*\s*;' "$INCLUDE" "$REPO/src" | sed -E 's/^\}\s*([A-Za-z_0-9]+)\s*;/\1/'
    printf '%s\n' FILE size_t uint64 int64 uint32 int32
} | sort -u >"$typedefs"

for f in "$REPO"/src/*.c "$REPO"/src/*.h; do
    pg_bsd_indent -bad -bap -bbb -bc -bl -cli1 -cp33 -cdb -nce -d0 -di12 -nfc1 -i4 -l79 \
        -lp -lpl -nip -npro -sac -tpg -ts4 -U"$typedefs" "$f" "$typedefs.out"
    if ! cmp -s "$f" "$typedefs.out"; then
        cp "$typedefs.out" "$f"
        echo "indented $(basename "$f")"
    fi
done
