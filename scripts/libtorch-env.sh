#!/usr/bin/env bash
# Prints the environment that builds the trainer (ferrun-trainer links libtorch): LIBTORCH at
# the torch 2.13.0 wheel in ferrun's venv (scripts/setup-python.sh installs it; pass its path
# as $1 to skip that). Use: eval "$(scripts/libtorch-env.sh)"; cargo build -p ferrun-trainer
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-${FERRUN_VENV:-$(scripts/setup-python.sh)}}"
torch="$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
echo "export LIBTORCH='$torch'"
echo "export FERRUN_VENV='$venv'"
