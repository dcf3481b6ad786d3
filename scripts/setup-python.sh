#!/usr/bin/env bash
# Installs torch 2.13.0 (PyPI, ~4.7 GB) into a virtualenv kept outside the clone and reused when
# present. Prints the virtualenv's path. Override the location with FERRUN_VENV.
set -euo pipefail
venv="${FERRUN_VENV:-$HOME/.cache/ferrun/venv-torch-2.13.0}"
has_torch() {
  "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null
}
if ! has_torch; then
  echo "installing torch==2.13.0 into $venv (once; about 4.7 GB)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --progress-bar off torch==2.13.0 >&2
  has_torch || { echo "torch 2.13.0 did not install into $venv" >&2; exit 1; }
fi
echo "$venv"
