#!/usr/bin/env bash
# A whole CI job with seqtool quality and speed gates, on the tiny-llama preset (random weights, seconds on a CPU).
#
#   bash examples/ci.sh WORK_DIR
#
# Each gated command exits 1 with one line ("error: gate failed: ...") when a metric is worse than its threshold,
# which fails the job; `set -e` stops at the first failure. The thresholds suit a random 2-layer model (ppl of
# random weights is ~300 on byte tokens); on a trained model a job would use e.g. --fail-under passkey=0.9,ppl=40.
set -euo pipefail
work="${1:?usage: ci.sh WORK_DIR}"
mkdir -p "$work"
seqtool=(seqtool --quiet)
[ -n "${SEQTOOL:-}" ] && read -r -a seqtool <<< "$SEQTOOL --quiet"

# 1. the rewrite under test: prune 30 % of the attention heads and MLP channels
"${seqtool[@]}" prune tiny-llama --ratio 0.3 --samples 2 --seq-len 32 -o "$work/pruned" --force --json > "$work/prune.json"

# 2. quality gate: perplexity must not exceed PPL_MAX; passkey retrieval accuracy must be at least PASSKEY_MIN
"${seqtool[@]}" eval "$work/pruned" --task ppl,passkey --seq-len 256 --samples 1 --depths 0.5 --ppl-tokens 256 \
  --fail-under "ppl=${PPL_MAX:-1000},passkey=${PASSKEY_MIN:-0}" --json > "$work/eval.json"

# 3. speed/memory gate against the original: KV cache at most 0.8x, prefill time at most PREFILL_MAX x
"${seqtool[@]}" profile tiny-llama --compare "$work/pruned" --seq-len 64 --decode-tokens 2 --warmup 0 --repeats 1 \
  --fail-over "kv_cache=0.8,prefill=${PREFILL_MAX:-5}" --json > "$work/profile.json"

echo "ci gates passed"
