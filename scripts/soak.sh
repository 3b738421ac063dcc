#!/usr/bin/env bash
# Soak (issue 6 §5): the real `deskline serve` against the simulator with faults on, under routing
# load plus a steady stream of call reports, for a bounded time (default 600 s; first argument or
# SOAK_SECS). Samples the serve process's RSS every 10 s and fails if it keeps growing, if any
# RouteCall fails, or if any report is not synced at the end. Not run in CI (it takes ten minutes).
#
#   scripts/soak.sh            # ten minutes
#   scripts/soak.sh 120        # two minutes
set -euo pipefail
cd "$(dirname "$0")/.."
export SOAK_SECS="${1:-${SOAK_SECS:-600}}"
# Release build: debug timings and memory are not what production sees.
exec cargo test --release --test soak -- --ignored --nocapture
