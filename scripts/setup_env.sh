#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with the pinned stack.
# Idempotent: a stamp of the requirement files skips the pip step when nothing changed.
#
# Knobs (environment), defaults unchanged for CPU machines:
#   TORCH_REQUIREMENT           what pip installs when the venv has no torch
#                               (default torch==$TORCH_VERSION, the CPU wheel on these machines;
#                               scripts/gpu_check.sh passes "torch": pip's default build, CUDA on Linux)
#   VENV_SYSTEM_SITE_PACKAGES=1 create a new venv with --system-site-packages, so that a torch
#                               the base python already has (a GPU cluster's own) is kept
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_REQUIREMENT="${TORCH_REQUIREMENT:-torch==$TORCH_VERSION}"

log() { echo "[setup] $*" >&2; }

# DeepSpeed's async I/O (NVMe offload) JIT-builds against libaio.
if ! dpkg -s libaio-dev >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        log "installing libaio-dev (DeepSpeed async I/O)"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libaio-dev >/dev/null; }; then
            log "warning: could not install libaio-dev; NVMe offload will be unavailable"
        fi
    else
        log "note: libaio-dev is not installed; NVMe offload needs it (apt-get install libaio-dev)"
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    if [ "${VENV_SYSTEM_SITE_PACKAGES:-0}" = "1" ]; then
        log "creating virtual environment $VENV with $PYTHON (sees its site-packages)"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        log "creating virtual environment $VENV with $PYTHON"
        "$PYTHON" -m venv "$VENV"
    fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# torch first and on its own: with no torch present, a resolver pulling it in for
# megatron-core or deepspeed would choose a multi-GB CUDA build.  A torch that is
# already there (a GPU cluster's own build) is kept.
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    log "installing $TORCH_REQUIREMENT"
    "${PIP[@]}" install -q "$TORCH_REQUIREMENT"
fi

STAMP="$VENV/.megatron_offload_plugin.stamp"
WANT="$(cat "$ROOT/requirements/pinned.txt" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] \
        || ! "$VENV/bin/python" -c "import megatron_offload_plugin, megatron.core, deepspeed" >/dev/null 2>&1; then
    log "installing pinned packages and megatron-offload-plugin (editable)"
    "${PIP[@]}" install -q -r "$ROOT/requirements/pinned.txt" -e "$ROOT[test]"
    echo "$WANT" > "$STAMP"
fi
# DeepSpeed's async I/O op is JIT-built on first NVMe use (minutes); build it now, once per environment.
if ! "$VENV/bin/python" -m megatron_offload_plugin build-ops; then
    log "warning: DeepSpeed's async I/O op could not be built; NVMe offload will be unavailable"
fi
log "environment ready: $("$VENV/bin/python" -c 'from importlib.metadata import version as v; print(", ".join(f"{p} {v(p)}" for p in ("torch", "megatron-core", "deepspeed")))')"
