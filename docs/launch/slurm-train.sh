#!/usr/bin/env bash
# lt-engine on Slurm: multi-node torchrun, checkpoint on preemption, requeue from the run's status, resume.
#
#   RUN_DIR=/shared/runs/inlt-x50 sbatch docs/launch/slurm-train.sh --preset imagenet-lt-resnext50 data.root=/data/imagenet
#
# A stop request reaches the training processes one of three ways: Slurm signals the whole job (preemption,
# time limit: batch shell and step), the job step only (`scancel --signal=TERM JOBID`), or this batch shell
# only (`--signal=B:USR1@180`, 180 s before the time limit). The trap below forwards a signal this shell
# receives to srun → torchrun → every rank, which finishes its step, writes an atomic last.pt, records
# `preempted` in $RUN_DIR/status.json and exits 75. torchrun reports 1 whatever its ranks' codes were, so
# the requeue decision is read from the run folder (`engine status`), never from srun's exit code:
#   preempted (75) → scontrol requeue, exit 75; the next start continues from last.pt (`--resume auto`)
#   finished (0)   → exit 0
#   anything else  → exit 1, no requeue (failed, killed without a status, bad RUN_DIR)
# RUN_DIR must be on a file system every node sees.
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

forward_stop() {
    [ -n "${srun_pid:-}" ] && kill -TERM "$srun_pid" 2>/dev/null
}
trap forward_stop USR1 TERM

srun --kill-on-bad-exit=1 "$ENGINE_PYTHON" -m torch.distributed.run \
    --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$head_node:$PORT" --rdzv-id "$SLURM_JOB_ID" \
    -m engine.cli train --out "$RUN_DIR" --resume auto "$@" &
srun_pid=$!

# `wait` returns early when a trapped signal arrives; keep waiting until srun itself has exited.
while true; do
    wait "$srun_pid"
    srun_code=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done

# From here on a stop signal has nothing left to stop: ignore it (also in `engine status`, which inherits that).
trap '' USR1 TERM
echo "lt-engine: srun exited $srun_code; the run's status:"
"$ENGINE_PYTHON" -m engine.cli status "$RUN_DIR"
status=$?
case "$status" in
    0) exit 0 ;;
    75)
        echo "lt-engine: preempted with a checkpoint; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 75 ;;
    *)
        echo "lt-engine: not requeued (engine status exited $status)"
        exit 1 ;;
esac
