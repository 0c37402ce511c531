#!/usr/bin/env bash
# pgindent-style formatting of src/*.c and src/*.h (or of the files given):
# pg_bsd_indent (Debian package pg-bsd-indent) with pgindent's flags, and a
# typedefs list built from the installed server headers plus our own types,
# so that a declaration of one of ours (CaCopyReader *reader) is laid out
# as one of PostgreSQL's is.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
INCLUDE=$(/usr/lib/postgresql/15/bin/pg_config --includedir-server)
# libpq's client header (PGconn, PGresult) lives beside the server headers
LIBPQ_FE=$(/usr/lib/postgresql/15/bin/pg_config --includedir)/libpq-fe.h
command -v pg_bsd_indent >/dev/null || {
    echo "pg_bsd_indent is missing: apt-get install pg-bsd-indent" >&2; exit 1; }

typedefs=$(mktemp)
trap 'rm -f "$typedefs" "$typedefs.out"' EXIT
{
    # typedef [struct|enum|union] [Tag] [*]Name;  (opaque and pointer types too)
    grep -rhoE 'typedef\s+(struct|enum|union)?\s*[A-Za-z_0-9]*\s*\**\s*[A-Za-z_][A-Za-z_0-9]*\s*;' "$INCLUDE" "$LIBPQ_FE" "$REPO/src" \
        | sed -E 's/.*[ *]([A-Za-z_][A-Za-z_0-9]*)\s*;$/\1/'
    # function pointer types
    grep -rhoE 'typedef .*\(\*[A-Za-z_0-9]+\)' "$INCLUDE" "$LIBPQ_FE" "$REPO/src" | sed -E 's/.*\(\*([A-Za-z_0-9]+)\)/\1/'
    # the name after the closing brace of typedef struct/enum/union { ... } Name;
    grep -rhoE '^\}\s*[A-Za-z_][A-Za-z_0-9]*\s*;' "$INCLUDE" "$LIBPQ_FE" "$REPO/src" | sed -E 's/^\}\s*([A-Za-z_0-9]+)\s*;/\1/'
    # the types lib/simplehash.h makes for each SH_PREFIX of ours
    grep -rhoE '^#define\s+SH_PREFIX\s+[A-Za-z_0-9]+' "$REPO/src" \
        | sed -E 's/.*SH_PREFIX\s+([A-Za-z_0-9]+)/\1_hash\n\1_iterator/'
    printf '%s\n' FILE size_t uint64 int64 uint32 int32 int128 uint128
} | sort -u >"$typedefs"

if [ $# -gt 0 ]; then
    files=("$@")
else
    files=("$REPO"/src/*.c "$REPO"/src/*.h)
fi
for f in "${files[@]}"; do
    pg_bsd_indent -bad -bap -bbb -bc -bl -cli1 -cp33 -cdb -nce -d0 -di12 -nfc1 -i4 -l79 \
        -lp -lpl -nip -npro -sac -tpg -ts4 -U"$typedefs" "$f" "$typedefs.out"
    # pgindent's post_indent: a function's return type alone on its line
    # keeps a single space before the '*' (indent lays "char *" out as a
    # declaration when no "static" precedes it)
    sed -i -E 's/^([A-Za-z_][^ \t]*)[ \t]+\*$/\1 */' "$typedefs.out"
    if ! cmp -s "$f" "$typedefs.out"; then
        cp "$typedefs.out" "$f"
        echo "indented $(basename "$f")"
    fi
done
