#!/usr/bin/env bash
# A CI job as a user would write it: chained seqtool commands on a tiny model, checking exit codes and JSON.
set -euo pipefail
work="$1"
seqtool --quiet inspect tiny-llama --json > "$work/inspect.json"
seqtool --quiet convert tiny-llama --to gqa --kv-heads 2 -o "$work/gqa" --json > "$work/convert.json"
seqtool --quiet prune "$work/gqa" --ratio 0.3 --samples 4 --seq-len 32 -o "$work/pruned" --json > "$work/prune.json"
seqtool --quiet patch "$work/pruned" --method streaming --budget 64 --set min_len=0 -o "$work/patched" --json > "$work/patch.json"
seqtool --quiet profile "$work/patched" --seq-len 256 --decode-tokens 4 --warmup 0 --repeats 1 --json > "$work/profile.json"
seqtool --quiet eval "$work/patched" --task passkey --seq-len 256 --samples 2 --depths 0.5 --json > "$work/eval.json"
# Bad input must fail with exit code 2 and one line on stderr, and must not touch the existing output.
set +e
seqtool --quiet profile tiny-llama --seq-len 32q 2> "$work/err.txt"; rc_len=$?
seqtool --quiet convert tiny-llama --to gqa --kv-heads 2 -o "$work/gqa" 2>> "$work/err.txt"; rc_exists=$?
set -e
test "$rc_len" -eq 2 && test "$rc_exists" -eq 2
test "$(wc -l < "$work/err.txt")" -eq 2
echo "ci job ok"
