#!/usr/bin/env bash
# The five-minute GPU check, on one H100 / H200, no downloads. From the repository root:
#
#   bash benches/gpu_wheels.sh      # first, on a machine with the package registry: fills .gpu_wheels/
#   bash benches/gpu_check.sh       # on the GPU machine (carry .gpu_wheels/ along); OUT=folder to choose where
#
# 1. builds the package in place (the C++ matcher) and installs the carried wheels;
# 2. parity: the compiled kernels against the fp64 reference at V = 151,936 (fp32, bf16, fp16; every loss feature;
#    the trainer's [B, T + 1, V] layout with the gradient in place; > 2^31 logits; no host sync), and the
#    ahead-of-time compile check;
# 3. the loss benchmark: eager TRL-style, torch.compile, Liger-Kernel (when carried) and ours at 8x1024 and
#    16x2048, each checked against one reference (loss and logits gradient), with time, peak memory and TB/s;
# 4. the LM head fused into the loss (no logits tensor) against materialised logits and Liger's fused linear GRPO
#    loss, bf16, H 1536 / 3584, 8x1024 and 16x2048 tokens: time and peak memory;
# 5. three StepGRPO steps on a Qwen2-VL-2B-shaped model (random weights, depth cut);
# 6. image sizing against the GPU image's AutoImageProcessor (with torchvision there, the fast processor: token
#    counts must agree; pixel values are compared too, and a difference is reported, not hidden);
# 7. the shared prompt against the repeated layout on the GPU (fp32, SDPA) for every family: log-probs, loss and
#    every gradient within 1e-5 (tests/test_share_prompt.py with R1VL_TEST_DEVICE=cuda);
# 8. three StepGRPO steps at Qwen3-VL-2B's widths (deepstack) and at a 2B-class Qwen3.5 (Gated DeltaNet), depth
#    cut, shared prompt, bf16 (flash-attn where installed);
# 9. $OUT/summary.json with every figure.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
rm -f "$OUT/steps.jsonl"
export TRITON_INTERPRET=0 PIP_DISABLE_PIP_VERSION_CHECK=1
PY="${PYTHON:-python3}"
status=0

run() {  # run NAME SECONDS COMMAND...: log to $OUT/NAME.log, record rc and time in $OUT/steps.jsonl
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >>"$OUT/steps.jsonl"
  echo "== $name: rc $rc in $((SECONDS - start)) s"
  tail -n 4 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1
if [ -d .gpu_wheels ]; then
  run wheels 120 "$PY" -m pip install -q --no-index --find-links .gpu_wheels .gpu_wheels/*.whl
fi
run install 240 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
run parity 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_grpo_ops_cuda.py tests/test_kernels_compile.py
run loss_bench 300 "$PY" -m pytest -q -p no:cacheprovider benches/test_bench_grpo_loss.py --benchmark-only \
  --benchmark-json="$OUT/loss_bench.json"
run linear_bench 240 "$PY" -m pytest -q -s -p no:cacheprovider benches/test_bench_linear_loss.py -k gpu \
  --benchmark-only --benchmark-json="$OUT/linear_bench.json"
run train_step 240 "$PY" benches/gpu_step.py --out "$OUT/step"
run sizing 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_image_sizing.py
run share_parity 150 env R1VL_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_share_prompt.py \
  -k shared_prompts_give
run train_step_qwen3_vl 150 "$PY" benches/gpu_step.py --arch qwen3-vl --layers 4 --vision_depth 4 --prompts 4 \
  --max_completion_length 128 --out "$OUT/step-qwen3-vl"
run train_step_qwen3_5 150 "$PY" benches/gpu_step.py --arch qwen3.5 --layers 4 --vision_depth 4 --prompts 4 \
  --max_completion_length 128 --out "$OUT/step-qwen3.5"
"$PY" benches/gpu_summary.py "$OUT" >"$OUT/summary.json" && cat "$OUT/summary.json"
exit $status
