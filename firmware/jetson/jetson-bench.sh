#!/usr/bin/env bash
# Benchmark a bundle on a Jetson at a fixed power mode with locked clocks, then restore.
#   sudo firmware/jetson/jetson-bench.sh MODE BUNDLE [edgekit-runtime bench options...]
# MODE is an nvpmodel id (see `nvpmodel -q --verbose`; targets/jetson-*.yaml list them).
# tegrastats is sampled during the run and summarised in the JSON result.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 MODE BUNDLE [bench options]" >&2; exit 2; }
mode="$1"; bundle="$2"; shift 2
for tool in nvpmodel jetson_clocks tegrastats; do
  command -v "$tool" >/dev/null || { echo "$tool not found: not a Jetson?" >&2; exit 2; }
done
echo "power mode before: $(nvpmodel -q | head -n1)"
exec edgekit-runtime bench "$bundle" --power-mode "$mode" --lock-clocks "$@"
