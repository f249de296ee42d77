# Sourced by the sbatch templates beside it (peer.sh, teacher.sh, sweep.sh), from the repository root.
# `launch SCRIPT ARGS...` runs `dist-tsp-launch SCRIPT ARGS...` (accelerate launch's arguments) once per node of the
# job, exits with its code, and requeues the job when the workers stopped with a checkpoint (75): after USR1 to the
# batch shell (#SBATCH --signal=B:USR1@N, or `scancel --batch --signal=USR1 JOBID`), or a signal to the workers alone.
# Not after TERM (scancel, preemption): then Slurm decides whether the job comes back.

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
  # One task per node: dist-tsp-launch, which takes accelerate launch's arguments. The single quotes keep
  # $SLURM_NODEID (the machine rank) for each task to expand on its own node. USR1 is ignored until the launcher's
  # handler is in. (srun does not hand the job's --cpus-per-task on to its tasks in every Slurm version: pass it.)
  srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node=1 \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    bash -c 'trap "" USR1
      echo "dist-tsp: node $SLURMD_NODENAME is machine rank $SLURM_NODEID"
      exec python3 -m dist_tsp.launch --config_file "$1" --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
        --num_processes $((SLURM_NNODES * $2)) --main_process_ip "$3" --main_process_port "$4" "${@:5}"' \
    node "$accelerate_config" "$processes_per_node" "$main_ip" "$main_port" "$@" &
  step=$!
  signalled=
  # USR1 to this shell (#SBATCH --signal=B:USR1@N, scancel --batch --signal=USR1): checkpoint, then requeue. TERM
  # (scancel, preemption: Slurm sends it to every process of the job, and kills them KillWait later): checkpoint and
  # end. Both go on to the step as USR1, which srun passes to every process of the step; srun answers a TERM of its
  # own by killing them at once.
  trap 'signalled=USR1; kill -USR1 "$step" 2>/dev/null || true' USR1
  trap 'signalled=TERM; kill -USR1 "$step" 2>/dev/null || true' TERM
  until [ "$signalled" = USR1 ] || ! kill -0 "$step" 2>/dev/null; do wait "$step" || true; done
  [ "$signalled" != USR1 ] || wait_for_the_checkpoint
  while kill -0 "$step" 2>/dev/null; do wait "$step" || true; done
  local status=0
  wait "$step" || status=$?
  # 75: the workers stopped with a checkpoint. Requeue, unless Slurm itself is ending the job (then srun, signalled
  # too, no longer passes on what the tasks print: say it here).
  if [ "$status" = 75 ] && [ "$signalled" = TERM ]; then
    echo "dist-tsp: TERM: the workers stopped (exit 75): rerun the same command to resume from the last checkpoint"
  elif [ "$status" = 75 ]; then
    requeue
  fi
  return "$status"  # the workers' exit code: with set -e, the job's
}

# After USR1: the workers checkpoint after their next step and exit 75. Wait for them until 30 s before the time limit
# at most; a job still running then is requeued anyway, and resumes from its last checkpoint.
wait_for_the_checkpoint() {
  local end
  end=$(date -d "$(squeue -h -j "$SLURM_JOB_ID" -o %e)" +%s 2>/dev/null) || end=$(($(date +%s) + 365 * 86400))
  echo "dist-tsp: USR1: checkpointing after the next step, then requeueing job $SLURM_JOB_ID"
  while kill -0 "$step" 2>/dev/null && [ "$(date +%s)" -lt $((end - 30)) ]; do
    sleep 1
  done
  if kill -0 "$step" 2>/dev/null; then
    requeue
  fi
}

# The job runs the same command again, which resumes from the last checkpoint.
requeue() {
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  echo "dist-tsp: job $SLURM_JOB_ID could not be requeued: submit the same command again to resume" >&2
  exit 75
}
