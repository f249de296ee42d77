#!/usr/bin/env bash
# A sweep as a job array: array task N runs trial N, the N-th line of TRIALS (config overrides, e.g. a grid point
# `loss.alpha=0.1 loss.beta=0.8 loss.gamma=0.1` or a seed `seed=2`), in DIR/trial_N. Each task that finishes
# rewrites DIR/sweep.md and DIR/sweep.csv: one row per trial, every student's accuracy.
#   sbatch --array=1-3 slurm/sweep.sh slurm/seeds.txt runs/seeds configs/demo.yaml [key=value ...]
# Trials are ordinary runs: preempted, they requeue and resume; `python -m dist_tsp.sweep collect DIR` redoes the table.
# Give every trial the same teacher: run teacher.sh first and pass teacher.checkpoint=... here.
#
#SBATCH --job-name=dist-tsp-sweep
##SBATCH --partition=gpu             # your site's partition and account: delete one '#' to use them
##SBATCH --account=my-project
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=3            # 0 on CPU nodes (then PROCESSES_PER_NODE processes, 3 by default)
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail

# ---- edit these ------------------------------------------------------------------------------------------------
# source .venv/bin/activate
# export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0
# -----------------------------------------------------------------------------------------------------------------

cd "${SLURM_SUBMIT_DIR:?submit this script with sbatch, from the repository root}"
usage="usage: sbatch --array=1-N slurm/sweep.sh TRIALS DIR CONFIG [key=value ...]"
[ $# -ge 3 ] || { echo "$usage" >&2; exit 2; }
: "${SLURM_ARRAY_TASK_ID:?not an array job: $usage (N = the number of trials)}"
trials=$1 sweep_dir=$2 config=$3
mapfile -t trial < <(python3 -m dist_tsp.sweep trial "$trials" "$sweep_dir" "$SLURM_ARRAY_TASK_ID")
[ "${#trial[@]}" -gt 0 ] || exit 2  # the line above said why
source slurm/launch.sh
name=trial_$SLURM_ARRAY_TASK_ID  # a tracker's run is named for the trial, in a group named for the sweep (as sweep run)
launch dist_tsp/train.py --config "$config" "tracking.group=\"$(basename "$(realpath "$sweep_dir")")\"" "tracking.run_name=$name" "${@:4}" \
  "${trial[@]}" "output_dir=$sweep_dir/$name"
python3 -m dist_tsp.sweep collect "$sweep_dir"
