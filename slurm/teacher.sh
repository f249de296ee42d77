#!/usr/bin/env bash
# The teacher stage alone: train the teacher data-parallel over every process of the job and save it to
# teacher.checkpoint, so that student jobs (peer.sh, sweep.sh) submitted after it load it instead of training it:
#   tid=$(sbatch --parsable slurm/teacher.sh configs/paper/tsp.yaml teacher.checkpoint=runs/teacher.pt)
#   sbatch --dependency=afterok:$tid slurm/peer.sh configs/paper/tsp.yaml teacher.checkpoint=runs/teacher.pt
# Any number of processes works here: the students' world-size rules do not apply.
#
#SBATCH --job-name=dist-tsp-teacher
##SBATCH --partition=gpu             # your site's partition and account: delete one '#' to use them
##SBATCH --account=my-project
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts one process per GPU
#SBATCH --gpus-per-node=3            # 0 on CPU nodes (then PROCESSES_PER_NODE processes, 3 by default)
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue                    # no checkpoints inside this stage: a requeued job trains the teacher again
set -euo pipefail

# ---- edit these ------------------------------------------------------------------------------------------------
# source .venv/bin/activate
# export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0
# -----------------------------------------------------------------------------------------------------------------

cd "${SLURM_SUBMIT_DIR:?submit this script with sbatch, from the repository root}"
config=${1:?usage: sbatch slurm/teacher.sh CONFIG [key=value ...]}
source slurm/launch.sh
launch dist_tsp/train.py --teacher-only --config "$config" "${@:2}"
