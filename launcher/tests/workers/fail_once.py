# Rank 1 fails on the first attempt (exit code from --code, default 1); all else succeeds.
import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--code", type=int, default=1)
parser.add_argument("--always", action="store_true", help="fail on every attempt")
args = parser.parse_args()
rank = int(os.environ["RANK"])
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
print(f"rank {rank} attempt {attempt} pid {os.getpid()}", flush=True)
if rank == 1 and (attempt == 0 or args.always):
    print(f"rank {rank} failing with code {args.code}", file=sys.stderr, flush=True)
    sys.exit(args.code)
