#!/usr/bin/env bash
# GPU benchmark of the MM-DiT's building blocks, one call (< 8 minutes on one H100/H200): the bf16 matmul rate, the
# 3b layer's forward+backward (model TFLOP/s; MFU against the card's datasheet bf16 dense peak, as training states
# it, and the matmul-peak ratio; with activation recomputation; sessions packed into rows against one per row),
# flex vs dense-masked SDPA attention at 4k and 16k tokens, the FP8 GEMM ceiling (torch._scaled_mm), and TE FP8
# vs bf16 where Transformer Engine is importable.
#
#   bench/gpu/run.sh             on a GPU machine: details in $OUT/gpu_bench.json, a short table printed last
#   bench/gpu/run.sh --dry-run   the same code on the CPU with a tiny shape (a CI test)
#
# Needs PyTorch with Triton, numpy and PyYAML (all in the lent GPU machines' image) and this checkout on
# PYTHONPATH; nothing else travels with it. The TE comparison also needs transformer_engine and megatron-core,
# which that image lacks: carry both as wheels to run it (docs/operations.md, "The GPU path").
# PYTHON picks the interpreter (default python3); OUT the output directory (default ./bench-out).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu/bench.py --out "${OUT:-$PWD/bench-out}" "$@"
