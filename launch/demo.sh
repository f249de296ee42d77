#!/usr/bin/env bash
# The demo on 3 CPU processes (gloo): three different students and a small ResNet teacher on
# scikit-learn's digits, offline. Extra arguments are config overrides, e.g. output_dir=runs/mine.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"  # the user's relative paths stay relative to where they stand
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m dist_tsp.launch --config_file "$root/configs/accelerate/cpu.yaml" "$root/dist_tsp/train.py" \
  --config "$root/configs/demo.yaml" "$@"
