"""Runs bench/gpu/ddp_step.py under ferrun with backend "ferrun" and with a reference backend
(nccl, or gloo on CUDA tensors where ranks share a GPU), and compares the parameters:
`ddp_compare.py FERRUN RANKS REFERENCE OUTPREFIX`; exits 1 when they differ."""

import os
import subprocess
import sys

import torch

ferrun, ranks, reference, prefix = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
here = os.path.dirname(os.path.abspath(__file__))
params = {}
for backend in ["ferrun", reference]:
    out = f"{prefix}-{backend}.pt"
    run = subprocess.run(
        [ferrun, "--standalone", "--nproc-per-node", ranks, f"{here}/ddp_step.py", backend, out],
        capture_output=True, text=True, timeout=100,
    )
    print(run.stdout[-3000:], run.stderr[-3000:], sep="\n")
    if run.returncode != 0:
        raise SystemExit(f"ddp_step.py with {backend} on {ranks} ranks failed (exit {run.returncode})")
    params[backend] = torch.load(out)
worst = max((a - b).abs().max().item() for a, b in zip(params["ferrun"], params[reference]))
print(f"params: ferrun vs {reference} on {ranks} ranks: largest difference {worst:.3g}")
sys.exit(0 if worst <= 1e-5 else 1)
