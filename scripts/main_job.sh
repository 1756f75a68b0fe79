#!/usr/bin/env bash
# The README's main job: a real run of seqtool on the shipped reference model, on CPU (a few minutes at most).
set -euo pipefail
seqtool inspect ref
seqtool eval ref --task ppl,passkey,multikey --seq-len 2k --samples 4 --depths 0.1,0.5,0.9
seqtool profile ref --seq-len 2k --decode-tokens 16
