#!/usr/bin/env bash
# The students (TSP distillation) on one or more nodes: one `accelerate launch` per node, world size = nodes x
# processes per node. Submit from the repository root; arguments are the config and dotted overrides:
#   sbatch slurm/peer.sh configs/paper/tsp.yaml data.root=/data/cifar10 output_dir=runs/tsp
#   sbatch --nodes=2 slurm/peer.sh configs/paper/tsp.yaml ...        # 2 nodes: ranks 0.. on the first node
# Watch: tail -f slurm-dist-tsp-<jobid>.out. Rerunning the same command resumes from the last checkpoint.
#
#SBATCH --job-name=dist-tsp
##SBATCH --partition=gpu             # your site's partition and account: delete one '#' to use them
##SBATCH --account=my-project
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts one process per GPU
#SBATCH --gpus-per-node=3            # 0 on CPU nodes (then PROCESSES_PER_NODE processes, 3 by default)
#SBATCH --cpus-per-task=16           # every CPU the node's processes may use
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append           # a requeued job appends to the same log
#SBATCH --requeue
#SBATCH --signal=B:USR1@300          # 300 s before the time limit: checkpoint, requeue, resume
set -euo pipefail

# ---- edit these ------------------------------------------------------------------------------------------------
# source .venv/bin/activate           # the environment with dist-tsp installed (pip install -e .), if not the default
# export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0   # the interface between nodes, if not the default route's
# -----------------------------------------------------------------------------------------------------------------

cd "${SLURM_SUBMIT_DIR:?submit this script with sbatch, from the repository root}"
config=${1:?usage: sbatch slurm/peer.sh CONFIG [key=value ...]}
source slurm/launch.sh
launch dist_tsp/train.py --config "$config" "${@:2}"
