#!/usr/bin/env bash
# Regenerate every generated picture committed in docs/: the ERD and the
# architecture diagram (scripts/erd.sh), then the demo (scripts/demo.sh, its
# own throwaway cluster in $DEMO_OUT, default ./demo_out) and a copy of its
# charts into docs/screenshots/.
set -euo pipefail
. "$(dirname "$0")/common.sh"
ensure_root "$@"
"$REPO/scripts/erd.sh" "$REPO/docs"
"$REPO/scripts/demo.sh" >/dev/null
OUT=${DEMO_OUT:-$REPO/demo_out}
mkdir -p "$REPO/docs/screenshots"
cp "$OUT"/charts/*.png "$REPO/docs/screenshots/"
log "docs/erd.{dot,svg,png}, docs/pipeline_architecture.{svg,png} and docs/screenshots/*.png regenerated"
