# The lost-node benchmark's worker: joins the round's Gloo group, says its world and when it
# runs, then all-reduces until the launcher stops it (or, with a peer gone, hangs in Gloo as
# torch workers do).
import time
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo")
print(f"world {dist.get_world_size()} rank {dist.get_rank()} t={time.time():.3f}", flush=True)
while True:
    t = torch.ones(1)
    dist.all_reduce(t)
    time.sleep(0.05)
