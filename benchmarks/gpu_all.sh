#!/usr/bin/env bash
# Every GPU check and benchmark in priority order (correctness first), time-boxed for a short GPU loan.
# Usage: bash benchmarks/gpu_all.sh OUT_DIR [TOTAL_SECONDS]
# Results are written as they are produced; commit them under benchmarks/results/ with the device name.
set -uo pipefail
out="${1:?usage: gpu_all.sh OUT_DIR [TOTAL_SECONDS]}"
total="${2:-540}"
mkdir -p "$out"
start=$(date +%s)
left() { echo $(( total - ($(date +%s) - start) )); }
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
python -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))" > "$out/env.txt" 2>&1
# flash-linear-attention is the speed anchor of the gated rows (gated_linear_attn / delta_rule_attn vs fla's chunk
# kernels); they are skipped with a note when it does not import. Record whether it is there.
python -c "import fla; print('fla', fla.__version__)" >> "$out/env.txt" 2>&1 || echo "fla not installed" >> "$out/env.txt"
# 1. Triton kernels: correctness against the references, then the kernel benchmark table.
timeout $(( $(left) * 6 / 10 )) python benchmarks/gpu_kernels_check.py --out "$out/kernels" --budget-s $(( $(left) * 5 / 10 )) \
  > "$out/kernels.log" 2>&1
# 2. Sparse patches end to end (Triton path through seqtool.kernels).
[ "$(left)" -gt 60 ] && timeout $(( $(left) / 2 )) python benchmarks/patches.py --out "$out/patches-cuda.md" > "$out/patches.log" 2>&1
# 3. Real-shape presets, 8k-32k.
[ "$(left)" -gt 60 ] && timeout $(( $(left) - 10 )) python benchmarks/profile_presets.py --device cuda \
  --presets llama-3.2-1b,llama-3.1-8b --sweep 8k,16k,32k --repeats 3 --out-dir "$out/profile" > "$out/profile.log" 2>&1
echo "done in $(( $(date +%s) - start )) s" > "$out/done.txt"
