#!/usr/bin/env bash
# Fresh machine -> working orthrus: install everything into the current python3, then run the main
# job: parallel decoding of a few prompts on the default model (smollm2-135m), JSON Lines on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh

# The shipped trained adapter (with its own block size) when there is one; else a fresh untrained one
# ('init'), which is just as exact (greedy output identical to the model's own) but accepts few
# drafts, so a small block (8) wastes less work than the default 32.
ADAPTER=(--adapter init --block-size 8)
if [ -f orthrus/adapters/smollm2-135m/adapter.safetensors ]; then
    ADAPTER=(--adapter orthrus/adapters/smollm2-135m)
fi
python3 -m orthrus.cli generate --model smollm2-135m --mode parallel "${ADAPTER[@]}" \
    --max-new-tokens 64 --json \
    "What is the capital of France? Answer in one sentence." \
    "Write a Python function that returns the square of a number."
