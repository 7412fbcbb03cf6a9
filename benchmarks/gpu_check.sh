#!/usr/bin/env bash
# The GPU measurements the issues ask for, as one script for a lent GPU (a few minutes on an H200).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Needs the project installed in .venv (the README's first command) and a CUDA device. Writes JSON
# and text reports to OUT_DIR (default: $OUT or runs/gpu_check) and runs the CUDA-only tests.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$out"
py=.venv/bin/python
export WANDB_MODE=disabled

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

# 1. Frozen forward, samflow against segment-anything, vit_b at 1024, bf16 (issue 2 ratios on a GPU).
timeout 240 $py benchmarks/throughput.py --variant vit_b --device cuda --bf16 --batch 2 --steps 10 --warmup 3 \
    --no-train --json "$out/forward_vit_b_1024_bf16.json" | tee "$out/forward.txt"

# 1b. Issue 15: vit_h frozen forward at 1024, bf16, and which SDPA backend the rel-pos attention gets
#     (augmented head dim d + h + w = 64 + 128 = 192 for vit_b/l/h at 1024; flash takes up to 256).
timeout 300 $py benchmarks/throughput.py --variant vit_h --device cuda --bf16 --batch 2 --steps 10 --warmup 3 \
    --no-train --json "$out/forward_vit_h_1024_bf16.json" | tee "$out/forward_vit_h.txt"
timeout 120 $py - <<'PY' 2>&1 | tee "$out/sdpa_backend.txt"
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from samflow.sam.ops import rel_pos_attention
q, k, v = torch.randn(3, 2, 12, 4096, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
rel = torch.randn(127, 64, device="cuda", dtype=torch.bfloat16)
for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
    try:
        with sdpa_kernel(backend):
            rel_pos_attention(q, k, v, rel, rel, (64, 64), 0.125)
        torch.cuda.synchronize()
        print(f"{backend.name}: runs rel_pos_attention (vit_b global block at 1024, bf16)")
    except RuntimeError as err:
        print(f"{backend.name}: unavailable: {str(err).splitlines()[0]}")
PY

# 2. Training steps, vit_b at 1024, batch 2, bf16 (issue 3: SAM-Adapter images/s and peak memory),
#    each plugin alone, then SAM-Adapter with activation checkpointing.
timeout 300 $py benchmarks/throughput.py --variant vit_b --device cuda --bf16 --batch 2 --steps 10 --warmup 3 \
    --no-forward --plugins sam_adapter hq_sam pa_sam decoder_tuning \
    --json "$out/train_vit_b_1024_bf16.json" | tee "$out/train.txt"
timeout 120 $py benchmarks/throughput.py --variant vit_b --device cuda --bf16 --batch 2 --steps 10 --warmup 3 \
    --no-forward --plugins sam_adapter --checkpoint-blocks \
    --json "$out/train_sam_adapter_ckpt.json" | tee "$out/train_ckpt.txt"

# 2b. Issue 14: the other encoder-side plugins (LoRA, BA-SAM) and the other image encoders, same setting.
timeout 240 $py benchmarks/throughput.py --variant vit_b --device cuda --bf16 --batch 2 --steps 10 --warmup 3 \
    --no-forward --plugins lora ba_sam --json "$out/train_lora_ba_sam.json" | tee "$out/train_encoder_plugins.txt"
for variant in mobile_sam efficient_sam_vitt efficient_sam_vits; do
    timeout 120 $py benchmarks/throughput.py --variant "$variant" --device cuda --bf16 --batch 2 --steps 10 \
        --warmup 3 --plugins hq_sam --json "$out/$variant.json" | tee "$out/$variant.txt"
done

# 3. Tests that need a GPU (kornia augmentation and SAM-Adapter on the device), and the module suite on CUDA.
timeout 240 $py -m pytest -q -rs tests/data/test_gpu_augment.py tests/plugins_sam_adapter 2>&1 | tee "$out/tests.txt"
