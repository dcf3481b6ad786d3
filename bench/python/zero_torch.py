"""torch 2.13's analogue of a ZeRO stage, on CPU with Gloo, for `ferrun-bench zero`.

Run under a launcher (ferrun or torchrun). Stage 0: DDP + AdamW; stage 1: DDP +
ZeroRedundancyOptimizer(AdamW); stage 2: FSDP SHARD_GRAD_OP; stage 3: FSDP FULL_SHARD. The model is
`layers` x Linear(dim, dim) in f32; a step is forward and backward of a batch of one row, the
optimizer step and zero_grad. Rank 0 writes the peak resident set above the process's before the
model was built (VmHWM, reset first), and the median step time, as JSON.
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def rss():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    kb = lambda k: int(fields[k].split()[0]) * 1024
    return kb("VmRSS"), kb("VmHWM")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", required=True)
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    base, _ = rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    model = torch.nn.Sequential(*[torch.nn.Linear(a.dim, a.dim) for _ in range(a.layers)])
    if a.stage in (0, 1):
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model)
        if a.stage == 0:
            name, opt = "DDP + AdamW", torch.optim.AdamW(model.parameters(), lr=1e-3)
        else:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            name = "DDP + ZeroRedundancyOptimizer"
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

        strategy = ShardingStrategy.SHARD_GRAD_OP if a.stage == 2 else ShardingStrategy.FULL_SHARD
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        # One FSDP unit per layer, as ferrun's buckets are about a layer each.
        model = FSDP(model, sharding_strategy=strategy, auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}),
                     device_id=torch.device("cpu"))
        name = f"FSDP {strategy.name}"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(1, a.dim)
    times = []
    for step in range(a.steps + 1):
        t = time.perf_counter()
        model(x).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if step > 0:
            times.append(time.perf_counter() - t)
    _, hwm = rss()
    times.sort()
    peak = torch.tensor([hwm - base], dtype=torch.int64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(a.json, "w") as f:
            json.dump({"side": "torch", "name": name, "stage": a.stage, "ranks": dist.get_world_size(),
                       "rss_peak_bytes": int(peak.item()), "step_s": times[len(times) // 2]}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
