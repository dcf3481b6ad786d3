"""A few DDP steps of a small MLP on CUDA with the backend named on the command line; rank 0
writes the final parameters to the file given. Same seed, same data, any backend: the
parameters must agree (bench/gpu/ddp_compare.py compares them)."""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

backend, out = sys.argv[1], sys.argv[2]
if backend == "ferrun":
    import ferrun.torch  # noqa: F401  registers the backend
local = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local % torch.cuda.device_count())
dist.init_process_group(backend)
rank, n = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
).cuda()
ddp = DDP(model, bucket_cap_mb=1)
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
g = torch.Generator().manual_seed(1 + rank)
for step in range(5):
    x = torch.randn(32, 64, generator=g).cuda()
    y = torch.randint(0, 10, (32,), generator=g).cuda()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    opt.step()
torch.cuda.synchronize()
if rank == 0:
    torch.save([p.detach().cpu() for p in model.parameters()], out)
path = getattr(dist.group.WORLD, "_get_backend", lambda d: None)(torch.device("cuda"))
print(f"rank {rank}: {backend} on {n} ranks done ({type(path).__name__})", flush=True)
dist.destroy_process_group()
