#!/usr/bin/env bash
# lt-engine on Slurm: multi-node torchrun, checkpoint on preemption, requeue, resume.
#
#   RUN_DIR=/shared/runs/inlt-x50 sbatch docs/launch/slurm-train.sh --preset imagenet-lt-resnext50 data.root=/data/imagenet
#
# Slurm sends SIGUSR1 to this batch shell 180 s before the time limit (--signal=B:USR1@180) and SIGTERM when
# the job is preempted. The trap forwards SIGTERM to srun → torchrun → every training process, which finishes
# its step, writes an atomic last.pt and exits 75; the script then requeues the job, and the next start
# continues from last.pt (`--resume auto`). RUN_DIR must be on a file system every node sees.
#SBATCH --job-name=lt-engine
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -uo pipefail
: "${RUN_DIR:?set RUN_DIR to the run folder (on a shared file system)}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PORT=${PORT:-29500}
ENGINE_PYTHON=${ENGINE_PYTHON:-python}   # the venv's python, e.g. /path/to/lt-engine/.venv/bin/python
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

stop_requested=0
forward_stop() {
    stop_requested=1
    [ -n "${srun_pid:-}" ] && kill -TERM "$srun_pid" 2>/dev/null
}
trap forward_stop USR1 TERM

srun --kill-on-bad-exit=1 "$ENGINE_PYTHON" -m torch.distributed.run \
    --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$head_node:$PORT" --rdzv-id "$SLURM_JOB_ID" \
    -m engine.cli train --out "$RUN_DIR" --resume auto "$@" &
srun_pid=$!

# `wait` returns early when a trapped signal arrives; keep waiting until srun itself has exited.
status=0
while true; do
    wait "$srun_pid"
    status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done

if [ "$stop_requested" -eq 1 ] || [ "$status" -eq 75 ]; then
    echo "lt-engine: stopped for preemption or the time limit (exit $status); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
