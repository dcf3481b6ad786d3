# Trains (all-reduces rank+1 every step) in whatever world the round gives it. Rank 0 keeps the
# sequence of world sizes the job has run in, in --state; once its last entries are --worlds
# (e.g. 3,2: three nodes, then two after one was lost), the round trains --steps steps and
# exits 0. Every other round trains until the launcher stops it.
import argparse
import os
import time
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--worlds", required=True)
parser.add_argument("--state", required=True)
parser.add_argument("--steps", type=int, default=10)
args = parser.parse_args()
want = [int(w) for w in args.worlds.split(",")]

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
last_round = torch.zeros(1)
if rank == 0:
    path = os.path.join(args.state, "worlds")
    seen = open(path).read().split() if os.path.exists(path) else []
    if not seen or int(seen[-1]) != world:
        seen.append(str(world))
        with open(path, "w") as f:
            f.write(" ".join(seen))
    last_round[0] = float([int(w) for w in seen[-len(want):]] == want)
dist.broadcast(last_round, 0)
restart = os.environ["TORCHELASTIC_RESTART_COUNT"]
step = 0
while True:
    step += 1
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    if step % 5 == 0:
        print(f"world {world} rank {rank} step {step} sum {t.item():g} restart {restart}", flush=True)
    if last_round.item() == 1.0 and step >= args.steps:
        break
    time.sleep(0.05)
dist.destroy_process_group()
