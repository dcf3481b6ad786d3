#!/usr/bin/env bash
# Installs torch 2.13.0 (PyPI, ~4.7 GB), numpy (torch's object collectives need it), maturin,
# scikit-learn (its wheel carries the digits data the trainer learns), the kfp SDK and the
# training SDK (the Kubeflow Pipelines examples and their launcher step) into a virtualenv kept outside the clone and reused when
# present, then builds this checkout's
# `ferrun` Python package (the torch backend, torch-backend/) and installs it there. Prints the
# virtualenv's path. Override the location with FERRUN_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
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
if ! "$venv/bin/python" -c "import numpy, maturin, sklearn, kfp, kubeflow.training, sys; sys.exit(kfp.__version__ != '2.17.3')" 2>/dev/null; then
  "$venv/bin/pip" install --quiet --progress-bar off numpy 'maturin>=1.9,<2' scikit-learn==1.9.1 \
    kfp==2.17.3 kubeflow-training==1.9.4 >&2
fi
# Built every time, so that the venv holds this checkout's backend (cargo makes it quick when
# nothing changed); abi3, so the one wheel serves every CPython >= 3.9.
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
(cd torch-backend && "$venv/bin/maturin" build --release --quiet --interpreter "$venv/bin/python" \
  --out "$wheels" >&2)
"$venv/bin/pip" install --quiet --force-reinstall --no-deps "$wheels"/ferrun-*.whl >&2
"$venv/bin/python" -c "import ferrun.torch" >&2
echo "$venv"
