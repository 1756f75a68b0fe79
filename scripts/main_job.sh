#!/usr/bin/env bash
# The README's main job: a real run of seqtool on CPU (a few minutes at most).
set -euo pipefail
seqtool inspect tiny-llama
seqtool profile tiny-llama --seq-len 2k --decode-tokens 16
