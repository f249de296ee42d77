# Sourced by the sbatch templates beside it (peer.sh, teacher.sh, sweep.sh), from the repository root.
# `launch SCRIPT ARGS...` runs `accelerate launch SCRIPT ARGS...` once per node of the job and turns USR1 to the
# batch shell (#SBATCH --signal=B:USR1@N, or `scancel --batch --signal=USR1 JOBID`) into a checkpoint and a requeue.

# One process per GPU on GPU nodes (NCCL, bf16); PROCESSES_PER_NODE gloo processes where there is no GPU.
gpus=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
if [ "$gpus" -gt 0 ]; then
  accelerate_config=configs/accelerate/gpu.yaml
  processes_per_node=${PROCESSES_PER_NODE:-$gpus}
else
  accelerate_config=configs/accelerate/cpu.yaml
  processes_per_node=${PROCESSES_PER_NODE:-3}
fi
main_ip=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
main_port=${MAIN_PORT:-$((15000 + SLURM_JOB_ID % 15000))}  # below the ephemeral ports; differs between jobs

# A dead or stuck rank ends the run instead of hanging it: a collective that waits longer than
# train.collective_timeout_s (600 s by default, gloo and NCCL alike) raises, NCCL errors abort the process,
# and srun --kill-on-bad-exit=1 then stops the other nodes.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
threads=$((${SLURM_CPUS_PER_TASK:-1} / processes_per_node))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}

launch() {
  echo "dist-tsp: job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NNODES node(s) x $processes_per_node" \
       "processes, $accelerate_config, main process at $main_ip:$main_port"
  # One task per node. The single quotes keep $SLURM_NODEID (the machine rank) for each task to expand on its own
  # node. The launcher ignores USR1, which would kill it; its workers inherit that until they install their handler.
  # (srun does not hand the job's --cpus-per-task on to its tasks in every Slurm version: pass it.)
  srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node=1 \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    bash -c 'trap "" USR1
      echo "dist-tsp: node $SLURMD_NODENAME is machine rank $SLURM_NODEID"
      exec accelerate launch --config_file "$1" --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
        --num_processes $((SLURM_NNODES * $2)) --main_process_ip "$3" --main_process_port "$4" "${@:5}"' \
    node "$accelerate_config" "$processes_per_node" "$main_ip" "$main_port" "$@" &
  step=$!
  signalled=0
  trap 'signalled=1; kill -USR1 "$step" 2>/dev/null || true' USR1  # srun passes it to every process of the step
  until [ "$signalled" = 1 ] || ! kill -0 "$step" 2>/dev/null; do wait "$step" || true; done
  [ "$signalled" = 0 ] || checkpoint_and_requeue
  wait "$step"  # its exit status: with set -e, a failed task fails the job
}

# After USR1: the workers checkpoint at their next log step and exit. Wait for them (until 30 s before the time
# limit at most), then requeue: the job runs the same command again, which resumes from that checkpoint.
checkpoint_and_requeue() {
  local end waited=0
  end=$(date -d "$(squeue -h -j "$SLURM_JOB_ID" -o %e)" +%s 2>/dev/null) || end=$(($(date +%s) + 365 * 86400))
  echo "dist-tsp: USR1: checkpointing at the next log step, then requeueing job $SLURM_JOB_ID"
  while kill -0 "$step" 2>/dev/null && [ "$(date +%s)" -lt $((end - 30)) ]; do
    sleep 1
    # Workers still loading data or the teacher ignore USR1: say it again until they are in the student phase.
    ((++waited % 10)) || kill -USR1 "$step" 2>/dev/null || true
  done
  if ! kill -0 "$step" 2>/dev/null && wait "$step"; then
    return 0  # the run had finished
  fi
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  echo "dist-tsp: job $SLURM_JOB_ID could not be requeued: submit the same command again to resume" >&2
  exit 75
}
