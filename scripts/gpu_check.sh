#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): memory against `ftbench estimate`, trained tokens/s and host syncs
# of full / LoRA / QLoRA-nf4 / GaLore on random-initialised Qwen2-0.5B-, Llama-3.2-1B- and Qwen2-1.5B-shaped
# models (configs/models/, no download), and the quickstart LoRA run's exact match against its pin.
# One large GPU, about 8 minutes; offline. Records and summary.{md,csv,json} go to OUT_DIR.
#   scripts/gpu_check.sh OUT_DIR [gpu_check.py options, e.g. --models qwen2-0.5b --batch-sizes 4]
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: scripts/gpu_check.sh OUT_DIR [options of scripts/gpu_check.py]" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec python "$ROOT/scripts/gpu_check.py" "$@"
