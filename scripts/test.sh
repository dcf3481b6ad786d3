#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the end-to-end tests that run real
# ferrun, torchrun and torch processes. Installs what it needs (torch 2.13.0 in a reused venv).
set -euo pipefail
cd "$(dirname "$0")/.."
export FERRUN_VENV="$(scripts/setup-python.sh)"
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace
