#!/usr/bin/env bash
# The demo on 3 CPU processes (gloo): three different students and a small ResNet teacher on
# scikit-learn's digits, offline. Extra arguments are config overrides, e.g. output_dir=runs/mine.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m dist_tsp.launch --config_file configs/accelerate/cpu.yaml dist_tsp/train.py \
  --config configs/demo.yaml "$@"
