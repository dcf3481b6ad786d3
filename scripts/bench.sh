#!/usr/bin/env bash
# Every benchmark, each putting ferrun beside its peers in one invocation: the launcher against
# torchrun, the store against torch's TCPStore, all_reduce against Gloo and OpenMPI, ZeRO against
# torch's DDP, ZeroRedundancyOptimizer and FSDP.
# Installs what they need (torch 2.13.0 in the reused venv, OpenMPI from Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
anchors="${FERRUN_ANCHORS:-../shared/anchors}"
if ! command -v mpicc >/dev/null || [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev fonts-dejavu-core
fi
export FERRUN_VENV="$(scripts/setup-python.sh)"
cargo build --release --quiet -p ferrun-launcher -p ferrun-bench
target/release/ferrun-bench launcher --anchors "$anchors" --runs 7
target/release/ferrun-bench store
target/release/ferrun-bench rendezvous --rounds 3
target/release/ferrun-bench restart --runs 3
target/release/ferrun-bench lost-node --runs 2
mkdir -p bench/out
target/release/ferrun-bench compare all_reduce --anchors "$anchors" --plot bench/out/all_reduce_busbw.png
target/release/ferrun-bench compare all_reduce --anchors "$anchors" --two-hosts --plot bench/out/all_reduce_two_hosts_busbw.png
target/release/ferrun-bench zero --params 100M --ranks 1,2,4
target/release/ferrun-bench zero --params 100M --ranks 1,2,4,8 --dtype bf16
