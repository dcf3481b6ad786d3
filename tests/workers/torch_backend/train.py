# Trains the same model from the same seed on the same data twice in one process, once over
# gloo and once over ferrun, wrapped as the first argument says: ddp, zero
# (ZeroRedundancyOptimizer over DDP), fsdp-full (FULL_SHARD) or fsdp-grad (SHARD_GRAD_OP).
# Prints the largest difference between the two runs' parameters and whether ferrun's
# parameters are bitwise identical on every rank; exits non-zero when either check fails.
#
# Tolerance: the two backends sum the same gradients in different orders. Each f32 sum of N
# terms then differs by a few ulps (N ≤ 4: ≤ 3 × 2⁻²⁴ relative), and after K steps of SGD with
# momentum on this small, well-conditioned model the parameters drift apart by at most about
# K × that, times the learning rate's amplification: well under 1e-5 for K = 20 (measured: a
# few 1e-7). Anything larger is a wrong reduction, not rounding.
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import ferrun.torch  # noqa: E402,F401

TOLERANCE = 1e-5
STEPS = 20
mode = sys.argv[1]

dist.init_process_group("gloo")
rank, n = dist.get_rank(), dist.get_world_size()
fr = dist.new_group(backend="ferrun")


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 1),
    )


def train(group):
    net = model()
    if mode == "ddp":
        wrapped = DDP(net, process_group=group, bucket_cap_mb=0.01)  # several buckets
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9)
    elif mode == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        wrapped = DDP(net, process_group=group)
        opt = ZeroRedundancyOptimizer(
            wrapped.parameters(), optimizer_class=torch.optim.SGD, process_group=group,
            lr=0.05, momentum=0.9,
        )
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        strategy = {"fsdp-full": ShardingStrategy.FULL_SHARD,
                    "fsdp-grad": ShardingStrategy.SHARD_GRAD_OP}[mode]
        wrapped = FSDP(net, process_group=group, sharding_strategy=strategy,
                       device_id=torch.device("cpu"), use_orig_params=True)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        x = torch.randn(16, 32, generator=gen)
        y = torch.sin(x.sum(dim=1, keepdim=True))
        loss = torch.nn.functional.mse_loss(wrapped(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if mode.startswith("fsdp"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(wrapped):
            return torch.cat([p.detach().reshape(-1).clone() for p in wrapped.parameters()])
    return torch.cat([p.detach().reshape(-1).clone() for p in net.parameters()])


over_gloo = train(dist.group.WORLD)
over_ferrun = train(fr)
diff = (over_gloo - over_ferrun).abs().max().item()
everyone = [torch.empty_like(over_ferrun) for _ in range(n)]
dist.all_gather(everyone, over_ferrun, group=dist.group.WORLD)  # compared over gloo
identical = all(torch.equal(e, over_ferrun) for e in everyone)
print(f"rank {rank}: {mode}: max |gloo - ferrun| = {diff:.3e}, identical across ranks: {identical}, "
      f"transport {fr.transport}", flush=True)
dist.destroy_process_group()
sys.exit(0 if diff <= TOLERANCE and identical else 1)
