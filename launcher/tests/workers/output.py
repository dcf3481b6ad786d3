# Writes one line to stdout and one to stderr, naming the rank.
import os
import sys

rank = os.environ["RANK"]
print(f"out from {rank}", flush=True)
print(f"err from {rank} loss=1.0", file=sys.stderr, flush=True)
