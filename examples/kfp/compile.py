"""Compiles the example pipelines to KFP IR YAML: ``python compile.py OUT_DIR``."""

import os
import sys

from kfp import compiler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ferrun_pipelines as p  # noqa: E402


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    pipelines = {
        "digits.yaml": p.digits_pipeline,
        "digits-local.yaml": p.digits_local_pipeline,
        "pytorchjob.yaml": p.pytorchjob_pipeline(p.pytorchjob_manifest()),
    }
    for file, pipeline in pipelines.items():
        compiler.Compiler().compile(pipeline, os.path.join(out, file))
        print(os.path.join(out, file))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: compile.py OUT_DIR")
    main(sys.argv[1])
