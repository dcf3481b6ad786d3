"""torch.distributed on `--backend` (gloo or ferrun), through torch's own API, for
`ferrun-bench torch`. Run under a launcher (ferrun or torchrun).

sweep: `dist.all_reduce` (SUM) of CPU f32 tensors at each size, Python overhead included; the
       result is checked before and after the timed loop (every element must equal the sum of
       the ranks' values), and rank 0 writes per-size time, algbw and busbw (nccl-tests'
       definition: algbw × 2(n−1)/n) and the count of wrong elements as JSON.
ddp:   DDP training steps of a communication-bound MLP (`--params` parameters, batch of 8, SGD);
       rank 0 writes the median step time, and whether the parameters ended bitwise identical
       on every rank.
"""

import argparse
import json
import time

import torch
import torch.distributed as dist


def sweep(a, rank, n):
    rows = []
    for size in a.sizes:
        count = max(size // 4, 1)
        t = torch.empty(count)
        wrong = 0

        def check():
            t.fill_(float(rank + 1))
            dist.all_reduce(t)
            return int((t != n * (n + 1) / 2).sum())

        wrong += check()
        iters = max(min(a.iters, int(a.budget_bytes // max(size, 1))), 5)
        # Warm up (first touches of buffers and rings, wake-up paths) as much as is timed, up
        # to 20 ops.
        for _ in range(min(iters, 20)):
            dist.all_reduce(t)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        elapsed = (time.perf_counter() - start) / iters
        wrong += check()
        # The slowest rank's time is the collective's.
        slowest = torch.tensor([elapsed], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        elapsed = slowest.item()
        algbw = count * 4 / elapsed / 1e9
        rows.append({"size": count * 4, "time_us": elapsed * 1e6, "algbw": algbw,
                     "busbw": algbw * 2 * (n - 1) / n, "wrong": wrong})
    return {"sweep": rows}


def ddp(a, rank, n):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    width = int((a.params / 5) ** 0.5)
    layers = []
    for _ in range(5):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    model = DDP(torch.nn.Sequential(*layers[:-1]))
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(rank)
    times = []
    for step in range(a.steps + 2):
        x = torch.randn(8, width, generator=gen)
        start = time.perf_counter()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 2:
            times.append(time.perf_counter() - start)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(n)]
    dist.all_gather(everyone, flat)
    identical = all(torch.equal(e, flat) for e in everyone)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return {"ddp": {"params": params, "step_ms": float(slowest.median()) * 1e3,
                    "identical": identical}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", required=True, choices=["gloo", "ferrun"])
    p.add_argument("--mode", required=True, choices=["sweep", "ddp"])
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[4])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--budget-bytes", type=float, default=2e9, help="bytes per size's timed loop")
    p.add_argument("--params", type=float, default=25e6)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", required=True)
    a = p.parse_args()
    if a.backend == "ferrun":
        import ferrun.torch  # noqa: F401
    dist.init_process_group(a.backend)
    rank, n = dist.get_rank(), dist.get_world_size()
    result = sweep(a, rank, n) if a.mode == "sweep" else ddp(a, rank, n)
    if rank == 0:
        with open(a.json, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
