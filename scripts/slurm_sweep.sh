#!/bin/bash
# A sweep over many machines as a SLURM job array: each array task runs one disjoint part of the
# grid (--shard auto reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT) and writes its records to
# the same shared results directory. Runs already completed there are skipped, so resubmitting
# the array after a crash or a preemption resumes it.
#
#   sbatch --array=0-3 scripts/slurm_sweep.sh configs/sweeps/lora_rank.yaml      # 4 machines
#   ftbench report results/lora_rank                                            # when all are done
#
# A run that needs several GPUs of its node (DDP/FSDP) takes them from the sweep file
# (`trainer: [../trainer/quickstart.yaml, ../trainer/ddp.yaml]`, `trainer.devices: 4`); ask SLURM
# for them below (--gres, --ntasks-per-node) and Lightning's SLURM support wires up the ranks.
#SBATCH --job-name=ftbench-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
SWEEP=${1:?usage: sbatch --array=0-N scripts/slurm_sweep.sh SWEEP.yaml [ftbench sweep options]}
shift
# offline W&B unless a key is configured; runs are grouped under the sweep's name either way
export WANDB_MODE=${WANDB_MODE:-$([ -n "${WANDB_API_KEY:-}" ] && echo online || echo offline)}
exec ftbench sweep "$SWEEP" --shard auto "$@"
