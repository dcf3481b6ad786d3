#!/usr/bin/env bash
# The main job: ferrun's Rust trainer (ferrun-train, tch-rs) learning the handwritten digits in
# 4 data-parallel processes on CPU, launched by ferrun with its embedded single-node rendezvous.
# Sets up everything on a fresh machine (torch 2.13.0 and scikit-learn in a venv, the build).
# Extra arguments go to ferrun-train (`--stage zero3`, `--epochs 10`, `--checkpoint-dir D`, …).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(scripts/setup-python.sh)"
eval "$(scripts/libtorch-env.sh "$venv")"
echo "building ferrun and ferrun-train (the first build compiles libtorch's bindings: minutes)" >&2
cargo build --release --quiet -p ferrun-launcher -p ferrun-trainer
PATH="$venv/bin:$PATH" exec target/release/ferrun --standalone --nproc-per-node 4 --no-python \
  target/release/ferrun-train "$@"
