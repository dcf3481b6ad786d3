#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the end-to-end tests that run real
# ferrun, torchrun and torch processes. Installs what it needs (torch 2.13.0 in a reused venv).
set -euo pipefail
cd "$(dirname "$0")/.."
# The multi-host tests build hosts from network namespaces (iproute2; run as root, as CI does).
# The etcd rendezvous tests start a real etcd (Debian's etcd-server; nothing auto-starts).
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v etcd >/dev/null || need+=(etcd-server)
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
export FERRUN_VENV="$(scripts/setup-python.sh)"
# The trainer links the venv's libtorch.
eval "$(scripts/libtorch-env.sh "$FERRUN_VENV")"
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The workspace builds the collectives with their GPU feature (the bench and the torch backend
# ask for it); a build without it must stay clean and say so when asked for a GPU.
cargo clippy -p ferrun-collective --all-targets --quiet -- -D warnings
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
cargo test -p ferrun-collective --lib --no-fail-fast gpu:: 2>&1 | tee -a "$log" || status=$?
# One closing line for the whole suite (cargo prints one per test binary), failures or not.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
