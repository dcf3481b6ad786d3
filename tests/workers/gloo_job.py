# A worker of an operator-rendered job: joins the gloo group ferrun set up, all-reduces
# rank + 1, and writes what it saw of the contract to $RESULT_DIR/rank<N>.
import os
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
env = os.environ
line = f"rank={rank} world={world} group_rank={env['GROUP_RANK']} local_world={env['LOCAL_WORLD_SIZE']} sum={t.item():g}"
with open(os.path.join(env["RESULT_DIR"], f"rank{rank}"), "w") as f:
    f.write(line)
print(line, flush=True)
dist.destroy_process_group()
