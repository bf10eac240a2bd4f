#!/usr/bin/env bash
# The Dockerfile's install step must leave an already-installed torch untouched (NGC containers ship their own).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_id='import os, torch; print(torch.__version__, os.stat(torch.__file__).st_mtime_ns)'
torch_before=$(python -c "$torch_id")
bash docker/install.sh > /dev/null
torch_after=$(python -c "$torch_id")
[ "$torch_before" = "$torch_after" ] || { echo "docker/install.sh changed torch: $torch_before -> $torch_after"; exit 1; }
echo "docker/install.sh kept torch $torch_after"
