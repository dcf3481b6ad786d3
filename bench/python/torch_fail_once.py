# The restart benchmark's worker: the anchors' fail_once.py with torch. Each worker imports
# torch, then says when it runs; on attempt 0, rank 1 fails after --fail-after seconds (every
# launcher gets the same wait, which the measured gap does not include; it gives a warm start's
# next interpreters time to import, as a real job's minutes of training would).
import argparse
import os
import sys
import time

import torch  # noqa: F401  (the cost a restart pays, or a warm start does not)

parser = argparse.ArgumentParser()
parser.add_argument("--fail-after", type=float, default=8.0)
# os._exit, as a crash ends a process, instead of sys.exit, whose interpreter teardown (with
# torch loaded, ~0.5 s here) every launcher must wait out before it sees the failure.
parser.add_argument("--hard-exit", action="store_true")
args = parser.parse_args()
rank = int(os.environ["RANK"])
attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")


def say():
    print(f"rank {rank} attempt {attempt} pid {os.getpid()} t={time.time():.3f}", flush=True)


say()
if rank == 1 and attempt == "0":
    time.sleep(args.fail_after)
    say()
    if args.hard_exit:
        os._exit(1)
    sys.exit(1)
