#!/usr/bin/env bash
# The paper's whole protocol (scratch, vanilla KD, TSP, grid-tuned TSP, alternate learning) for S seeds, with
# Tables 1 and 2, verdicts, curves and qualitative figures in one directory. See `launch/protocol.sh --help`.
#   launch/protocol.sh --config configs/fashion_mnist.yaml --seeds 3 --out runs/protocol
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"  # the user's relative paths stay relative to where they stand
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m dist_tsp.protocol "$@"
