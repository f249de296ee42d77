#!/usr/bin/env bash
# The paper's three rows on CIFAR-10 (scratch, vanilla KD, TSP), one student per process.
# The teacher is trained once (runs/paper/teacher/model.pt) and reused by the KD and TSP runs.
# Uses the GPU accelerate config when a GPU is present, the 3-process CPU one otherwise.
# Extra arguments are config overrides for every run, e.g. data.root=/data/cifar10.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"  # the user's relative paths stay relative to where they stand
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  accelerate_config="$root/configs/accelerate/gpu.yaml"
else
  accelerate_config="$root/configs/accelerate/cpu.yaml"
fi
for method in tsp kd scratch; do
  python3 -m dist_tsp.launch --config_file "$accelerate_config" "$root/dist_tsp/train.py" \
    --config "$root/configs/paper/$method.yaml" "$@"
done
