# Says where the round placed it, then: exits 0 when WORLD_SIZE is --exit-world (any, if 0);
# as rank --fail-rank on the first attempt, exits 3; with --exit-when PATH, exits 0 once PATH
# exists; otherwise runs until the launcher stops it.
import argparse
import os
import signal
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--exit-world", type=int, default=0)
parser.add_argument("--fail-rank", type=int, default=-1)
parser.add_argument("--exit-when", default="")
args = parser.parse_args()
rank, world, group, restart = (
    int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RESTART_COUNT")
)
master = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
print(f"placed rank {rank} world {world} group {group} restart {restart} master {master}", flush=True)
if rank == args.fail_rank and restart == 0:
    print(f"rank {rank} fails on purpose", file=sys.stderr, flush=True)
    sys.exit(3)
if args.exit_when:
    while not os.path.exists(args.exit_when):
        time.sleep(0.1)
    sys.exit(0)
if args.exit_world in (0, world):
    sys.exit(0)
while True:
    signal.pause()
