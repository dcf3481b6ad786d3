#!/usr/bin/env bash
# The main job: 4-process data-parallel training on CPU (torch DDP over gloo), launched by ferrun
# with its embedded single-node rendezvous. Extra arguments go to the training script.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(scripts/setup-python.sh)"
cargo build --release --quiet -p ferrun-launcher
PATH="$venv/bin:$PATH" exec target/release/ferrun --standalone --nproc-per-node 4 \
  examples/python/ddp_train.py "$@"
