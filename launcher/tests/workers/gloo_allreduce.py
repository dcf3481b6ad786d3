# All-reduces rank+1 over gloo and prints the sum with the interface Gloo was told to use.
# With --fail-rank R, rank R exits 5 right after joining and every other rank waits forever:
# only the launchers can end that job.
import os
import signal
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
if "--fail-rank" in sys.argv:
    if rank == int(sys.argv[sys.argv.index("--fail-rank") + 1]):
        print(f"rank {rank} failing", flush=True)
        sys.exit(5)
    print(f"rank {rank} waiting", flush=True)
    while True:
        signal.pause()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
print(f"rank {rank} of {world} sum {t.item():g} ifname {os.environ.get('GLOO_SOCKET_IFNAME')}", flush=True)
dist.destroy_process_group()
