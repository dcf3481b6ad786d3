#!/usr/bin/env bash
# The GPU device check (issue 15), in two halves:
#
#   bench/gpu-check.sh build [DIR]   here (no GPU needed): release binaries with the GPU
#                                    collectives and the torch backend's wheel into DIR
#                                    (default .gpu-check/, git-ignored), small enough to carry.
#   bench/gpu-check.sh run OUT [DIR] on a GPU machine (torch with CUDA, no Rust, no network):
#                                    writes every result under OUT, and exits non-zero if any
#                                    check failed. About 5 minutes on one H200.
#
# `run` checks, in order:
#   1. every collective in every dtype against expected values: 1 rank (NCCL), then 2 and 4
#      ranks sharing the one GPU (staged through pinned host memory: NCCL refuses a shared GPU);
#   2. all_reduce from 1 MiB to 1 GiB on NCCL through ferrun beside torch.distributed's nccl
#      backend, at one rank, interleaved over 3 rounds (goal: ferrun ≥ 0.97 × torch);
#   3. a DDP step on CUDA with backend "ferrun" beside torch's "nccl" (1 rank) and beside
#      "gloo" on CUDA (2 ranks sharing the GPU, staged): the parameters must agree.
set -euo pipefail
cd "$(dirname "$0")/.."

build() {
  local dir="${1:-.gpu-check}"
  mkdir -p "$dir"
  # Stripped, without debug info: what travels to the GPU machine is limited in size.
  CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=true \
    cargo build --release --quiet --target-dir target/gpu-check --bin ferrun --bin ferrun-bench
  cp target/gpu-check/release/ferrun target/gpu-check/release/ferrun-bench "$dir/"
  local venv
  venv="$(bash scripts/setup-python.sh)"
  rm -f "$dir"/ferrun-*.whl
  (cd torch-backend && "$venv/bin/maturin" build --release --quiet --out "../$dir" >&2)
  cp bench/gpu/*.py "$dir/"
  du -sh "$dir"/* >&2
  echo "$dir"
}

run() {
  local out="${1:?usage: bench/gpu-check.sh run OUT [DIR]}" dir="${2:-.gpu-check}" failed=0
  mkdir -p "$out"
  dir="$(cd "$dir" && pwd)"
  out="$(cd "$out" && pwd)"
  local ferrun="$dir/ferrun" bench="$dir/ferrun-bench"
  export PYTHONUNBUFFERED=1
  # The backend's wheel, installed for this run only (nothing can be fetched there).
  python3 -m pip install --quiet --no-deps --no-index --target "$out/site" "$dir"/ferrun-*.whl
  export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}"
  { nvidia-smi -L; python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())'; } \
    | tee "$out/device.txt"
  step() { # NAME TIMEOUT COMMAND...: runs one check, its output to OUT/NAME.txt
    local name="$1" limit="$2"
    shift 2
    echo "== $name"
    if timeout "$limit" "$@" >"$out/$name.txt" 2>&1; then
      echo "   ok"
    else
      echo "   FAILED (exit $?): see $name.txt"
      failed=1
    fi
    grep -E "passed, [0-9]+ failed|GPU collectives|ratio|params" "$out/$name.txt" | sed 's/^/   /' | head -20 || true
  }
  for n in 1 2 4; do
    step "check-$n-ranks" 120 "$ferrun" --standalone --nproc-per-node "$n" --no-python \
      "$bench" gpu-check --json "$out/check-$n-ranks.json"
  done
  for round in 1 2 3; do
    step "ferrun-nccl-$round" 120 "$ferrun" --standalone --nproc-per-node 1 --no-python \
      "$bench" collective all_reduce --backend nccl --device cuda -b 1M -e 1G -f 2 \
      --csv "$out/ferrun-nccl-$round.csv"
    step "torch-nccl-$round" 120 "$ferrun" --standalone --nproc-per-node 1 \
      "$dir/torch_nccl_allreduce.py" -b 1M -e 1G --csv "$out/torch-nccl-$round.csv"
  done
  step "busbw" 30 python3 "$dir/nccl_ratio.py" "$out" 0.97
  step "ddp-1-rank" 120 python3 "$dir/ddp_compare.py" "$ferrun" 1 nccl "$out/ddp-1"
  step "ddp-2-ranks" 120 python3 "$dir/ddp_compare.py" "$ferrun" 2 gloo "$out/ddp-2"
  echo "results in $out"
  return "$failed"
}

case "${1:-}" in
  build) shift; build "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: bench/gpu-check.sh build [DIR] | run OUT [DIR]" >&2; exit 2 ;;
esac
