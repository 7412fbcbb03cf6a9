#!/usr/bin/env bash
# The GPU measurements the issues ask for, as one script for a lent GPU (about 9-11 minutes on an H200: two device calls).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#   SECTIONS="3 4" bash benchmarks/gpu_check.sh [OUT_DIR]     # only these sections (numbers below)
#
# Needs samflow importable with its dependencies (the README's install, or the wheels of
# benchmarks/README.md's "GPU" section on a machine without a registry) and a CUDA device. Sections run
# in order of importance, each under its own time limit; everything is appended to OUT_DIR/log.txt and
# the JSON results are packed into OUT_DIR/json.tar after every section, so a run cut short still
# returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$out"
py="${PYTHON:-.venv/bin/python}"
json="$(mktemp -d)"
log="$out/log.txt"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
bench() { # bench SECONDS NAME ARGS...: one throughput.py run, its JSON kept
    local limit=$1 name=$2
    shift 2
    echo "=== $name: throughput.py $*" | tee -a "$log"
    timeout "$limit" "$py" benchmarks/throughput.py --device cuda --json "$json/$name.json" "$@" 2>&1 | tee -a "$log"
    tar -C "$json" -cf "$out/json.tar" .
}

section() { # section N: true when SECTIONS is unset or names N
    [[ -z "${SECTIONS:-}" || " $SECTIONS " == *" $1 "* ]]
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
"$py" -c "import torch, samflow; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$log"

# 1. Frozen forward, samflow against segment-anything, vit_b at 1024, bf16 (issue 15's GPU target: >= 2x).
if section 1; then
bench 90 forward_vit_b_bf16 --variant vit_b --bf16 --batch 2 --steps 10 --warmup 3 --no-train

# 1b. Where the forward's time goes: encoder and decoder apart, every host sync samflow causes.
echo "=== profile_forward.py" | tee -a "$log"
timeout 150 "$py" benchmarks/profile_forward.py --variant vit_b --batch 2 2>&1 | tee -a "$log"

# 1c. Operators per decode under CUDA's autocast (each at least one kernel launch).
echo "=== forward_ops.py" | tee -a "$log"
timeout 60 "$py" benchmarks/forward_ops.py --device cuda --variant vit_b --batch 2 --prompt box 2>&1 | tee -a "$log"
fi

# 2. Which SDPA backend runs the rel-pos attention (augmented head dim 64 + 64 + 64 = 192 for a vit_b
#    global block at 1024; flash takes up to 256), and the same attention timed per backend.
if section 2; then
echo "=== SDPA backends" | tee -a "$log"
timeout 60 "$py" - <<'PY' 2>&1 | tee -a "$log"
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from samflow.sam.rel_pos import rel_pos_attention
q, k, v = torch.randn(3, 2, 12, 4096, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
rel = torch.randn(127, 64, device="cuda", dtype=torch.bfloat16)
for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
    try:
        with sdpa_kernel(backend):
            for _ in range(3):
                rel_pos_attention(q, k, v, rel, rel, (64, 64), 0.125)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                rel_pos_attention(q, k, v, rel, rel, (64, 64), 0.125)
            end.record()
        torch.cuda.synchronize()
        print(f"{backend.name}: runs rel_pos_attention (vit_b global block at 1024, batch 2, bf16): "
              f"{start.elapsed_time(end) / 20:.3f} ms")
    except RuntimeError as err:
        print(f"{backend.name}: unavailable: {str(err).splitlines()[0]}")
PY

fi

# 3. Training steps, vit_b at 1024, batch 2, bf16: each built-in plugin alone; SAM-Adapter with
#    activation checkpointing; the reference SAM-Adapter loop (fp32) beside samflow's in fp32.
#    tests/test_benchmarks_smoke.py checks that every built-in plugin has a row here.
if section 3; then
bench 120 train_vit_b_bf16 --variant vit_b --bf16 --batch 2 --steps 10 --warmup 3 --no-forward \
    --plugins sam_adapter hq_sam pa_sam decoder_tuning lora ba_sam
bench 90 train_vit_b_bf16_more --variant vit_b --bf16 --batch 2 --steps 10 --warmup 3 --no-forward \
    --alone --plugins tokens wsi_sam sapnet
bench 90 train_vit_b_bf16_ckpt --variant vit_b --bf16 --batch 2 --steps 10 --warmup 3 --no-forward \
    --plugins sam_adapter hq_sam lora ba_sam --checkpoint-blocks
bench 90 train_vit_b_fp32_reference --variant vit_b --batch 2 --steps 10 --warmup 3 --no-forward \
    --plugins sam_adapter --reference-sam-adapter

fi

# 4. vit_h at 1024, bf16: frozen forward, and training steps with and without checkpointing.
if section 4; then
bench 90 forward_vit_h_bf16 --variant vit_h --bf16 --batch 2 --steps 10 --warmup 3 --no-train --no-encoder-rows
bench 120 train_vit_h_bf16 --variant vit_h --bf16 --batch 2 --steps 5 --warmup 2 --no-forward \
    --plugins sam_adapter hq_sam pa_sam decoder_tuning lora ba_sam
bench 60 train_vit_h_bf16_ckpt --variant vit_h --bf16 --batch 2 --steps 5 --warmup 2 --no-forward \
    --plugins sam_adapter --checkpoint-blocks

fi

# 5. torch.compile (the warm-up includes the compilation).
if section 5; then
bench 150 forward_vit_b_bf16_compile --variant vit_b --bf16 --batch 2 --steps 10 --warmup 3 --no-train \
    --no-encoder-rows --compile
for plugin in sam_adapter hq_sam lora pa_sam decoder_tuning ba_sam; do
    bench 90 "train_vit_b_bf16_compile_$plugin" --variant vit_b --bf16 --batch 2 --steps 20 --warmup 10 \
        --no-forward --plugins "$plugin" --compile
done

fi

# 6. The other image encoders (issue 14), HQ-SAM on each.
if section 6; then
for variant in mobile_sam efficient_sam_vitt efficient_sam_vits; do
    bench 45 "$variant" --variant "$variant" --bf16 --batch 2 --steps 10 --warmup 3 --plugins hq_sam --no-encoder-rows
done

fi

# 7. Tests with a CUDA case (kornia augmentation, SAM-Adapter, keyed draws and no device reads on the
#    device). tests/test_benchmarks_smoke.py checks that every test file with one is listed here.
if section 7; then
echo "=== CUDA tests" | tee -a "$log"
timeout 180 "$py" -m pytest -q -rs -p no:cacheprovider tests/data/test_gpu_augment.py tests/plugins_sam_adapter \
    tests/data/test_augment_keyed_by_id.py tests/plugins_lora/test_lora_dropout.py tests/sam/test_rand_on_device.py \
    tests/sam/test_no_device_read_of_rows.py tests/test_testing_helpers.py tests/test_readme_claims_api.py 2>&1 |
    tail -15 | tee -a "$log"
fi
