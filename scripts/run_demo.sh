#!/usr/bin/env bash
# Set up the environment if needed, then train a small GPT with pipeline-parallel size 4
# through Megatron-core (gloo + the CPU backend here; NCCL on GPUs) with the plugin applied.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
NPROC="${NPROC:-4}"
exec "${VENV:-$ROOT/.venv}/bin/torchrun" --nproc-per-node "$NPROC" --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29500}" \
    -m megatron_offload_plugin.launch scripts/pretrain_gpt.py \
    --num-layers 8 --hidden-size 256 --num-attention-heads 8 --seq-length 256 \
    --max-position-embeddings 256 --micro-batch-size 1 --global-batch-size 8 \
    --pipeline-model-parallel-size 4 --train-iters "${TRAIN_ITERS:-10}" --lr 6e-4 --min-lr 6e-5 \
    --lr-warmup-iters 4 --lr-decay-style cosine --seed 1234 --log-interval 1 \
    --pipeline-schedule zb-h1 --activation-offload full \
    --json-summary "${JSON_SUMMARY:-/tmp/megatron_offload_plugin_demo.json}" "$@"
