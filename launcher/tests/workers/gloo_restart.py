# Joins a gloo process group through the agent store and all-reduces rank+1. On the first
# attempt rank 1 dies right after joining, so the restarted group must rendezvous again on the
# same store without tripping over the first attempt's keys.
import os
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
if attempt == 0 and rank == 1:
    sys.exit(7)
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
print(f"attempt {attempt} rank {rank} sum {t.item():g} expected {world * (world + 1) / 2:g}", flush=True)
dist.destroy_process_group()
