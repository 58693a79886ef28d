#!/usr/bin/env bash
# The GPU check in one command, stopped after 8 minutes (it has not run on a GPU yet): the CUDA checks and the table of
# benchmarks/gpu_check.py. It needs no network: only this environment's packages (torch with CUDA, transformers, timm,
# accelerate and hvpnet_hf itself). On a machine without network, carry wheels along from one that has it:
#
#   pip wheel --wheel-dir wheels/ .                          # here: hvpnet_hf and its dependencies as wheels
#   pip install --no-index --find-links wheels/ hvpnet_hf    # there (its own torch stays where it fits the floors)
#
# Flags go to gpu_check.py: `benchmarks/gpu_check.sh --dry_run` runs it at tiny sizes on CPU. PYTHON picks the
# interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import hvpnet_hf, timm, transformers" 2>/dev/null; then
    sed -n '2,8p' "$0"
    exit 1
fi
export HF_HUB_OFFLINE=1
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"
