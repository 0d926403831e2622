#!/usr/bin/env bash
# One-GPU check of what CPU runs cannot show (the B/W split with CUDA autograd, bf16 GPT, copy
# bandwidth, offload cost, event vs wall timing, Transformer Engine). Never in CI; needs a GPU.
#
# Prints ONE JSON object on stdout (python -m megatron_offload_plugin.bench.gpu_check);
# setup and logs go to stderr. Exit: 0 every section ran, 1 a section raised (JSON still
# printed, see "errors"), 2 no GPU, 124 the check ran past GPU_CHECK_TIMEOUT_S.
#
# Environment: works on a fresh GPU machine without a venv. A venv that exists is used as is
# (setup_env.sh keeps its torch). A new one sees the base python's site-packages when that python
# already has a CUDA torch (kept, never reinstalled); otherwise pip installs its default torch
# (a CUDA build on Linux) instead of the CPU pin. VENV, PYTHON, TORCH_REQUIREMENT override.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TIMEOUT_S="${GPU_CHECK_TIMEOUT_S:-420}"  # the check itself, setup excluded (the whole must fit in 8 minutes)

log() { echo "[gpu_check] $*" >&2; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    log "no NVIDIA GPU visible (nvidia-smi -L failed); run this on a machine with a GPU"
    exit 2
fi

if [ ! -x "$VENV/bin/python" ] \
        && "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; then
    log "keeping the CUDA torch of $PYTHON: the new venv sees its site-packages"
    export VENV_SYSTEM_SITE_PACKAGES=1
fi
export TORCH_REQUIREMENT="${TORCH_REQUIREMENT:-torch}"
if ! VENV="$VENV" PYTHON="$PYTHON" bash "$ROOT/scripts/setup_env.sh" >&2; then
    # e.g. an optional test dependency that cannot build here: the check needs only torch and megatron-core
    log "setup_env.sh failed; going on with what $VENV has"
fi
if ! "$VENV/bin/python" -c "import torch, megatron.core, megatron_offload_plugin" >&2; then
    log "$VENV cannot import torch, megatron.core and megatron_offload_plugin; see the setup log above"
    exit 1
fi

cd "$ROOT"
exec timeout --kill-after=15 "$TIMEOUT_S" "$VENV/bin/python" -m megatron_offload_plugin.bench.gpu_check "$@"
