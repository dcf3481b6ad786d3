# A worker of an operator-rendered job: joins the gloo group ferrun set up, all-reduces
# rank + 1, trains a small model with DDP, and writes what it saw of the contract and of the
# training to $RESULT_DIR/rank<N>.
import os
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)

# Each rank its own shard of y = x·w; DDP averages the gradients.
torch.manual_seed(0)
model = DDP(torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
gen = torch.Generator().manual_seed(100 + rank)
w = torch.arange(8, dtype=torch.float32).unsqueeze(1) / 8
losses = []
for _ in range(15):
    x = torch.randn(64, 8, generator=gen)
    loss = torch.nn.functional.mse_loss(model(x), x @ w)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
# Every rank must hold the same parameters, bit for bit.
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
everyone = [torch.empty_like(flat) for _ in range(world)]
dist.all_gather(everyone, flat)
identical = all(torch.equal(flat, other) for other in everyone)

env = os.environ
line = (
    f"rank={rank} world={world} group_rank={env['GROUP_RANK']} local_world={env['LOCAL_WORLD_SIZE']}"
    f" sum={t.item():g} trained={losses[-1] < losses[0] / 2} identical={identical}"
)
with open(os.path.join(env["RESULT_DIR"], f"rank{rank}"), "w") as f:
    f.write(line)
print(line, flush=True)
dist.destroy_process_group()
