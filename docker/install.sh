#!/usr/bin/env bash
# Install stas_pipeline and its dependencies into the current Python environment WITHOUT replacing the
# torch, torchvision, triton or NVIDIA CUDA libraries already there (the NGC container's own builds).
# Used by the Dockerfile; CI runs it too and checks that torch is left untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=$(mktemp)
python -m pip list --format=freeze | grep -iE '^(torch|torchvision|torchaudio|triton|nvidia-[a-z0-9-]+)==' > "$keep" || true
echo "keeping $(wc -l < "$keep") installed packages: $(cut -d= -f1 "$keep" | tr '\n' ' ')"
python -m pip install --no-cache-dir -c "$keep" -e ".[weights]"
rm -f "$keep"
