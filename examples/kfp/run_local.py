"""Runs ``digits_local_pipeline`` on this machine with kfp.local (the subprocess runner, in
this Python environment): ``python run_local.py [--epochs N] [--nproc-per-node N] [--stage S]
[--batch-size N] [--lr X] [--root DIR]``. ``ferrun`` and ``ferrun-train`` must be on PATH.
Prints the metrics artifact as JSON on its last line; exits 1 when the pipeline fails."""

import argparse
import json
import os
import sys
import tempfile

import kfp.local

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ferrun_pipelines as p  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nproc-per-node", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--stage", default="ddp")
    parser.add_argument("--root", help="pipeline root (default: a temporary directory)")
    a = parser.parse_args()
    root = a.root or tempfile.mkdtemp(prefix="ferrun-kfp-")
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=root)
    try:
        task = p.digits_local_pipeline(
            nproc_per_node=a.nproc_per_node, epochs=a.epochs, batch_size=a.batch_size,
            lr=a.lr, stage=a.stage,
        )
    except Exception as e:  # kfp.local raises when a task fails; its log is above
        print(f"run_local: the pipeline failed: {e}", file=sys.stderr)
        return 1
    metrics = task.output
    print(json.dumps({"uri": metrics.uri, "metrics": metrics.metadata}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
