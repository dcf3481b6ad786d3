"""torch 2.13 DDP over Gloo training what ferrun-train trains, for `ferrun-bench trainer`.

The same data (scikit-learn's digits, every 5th image held out), model (Linear/ReLU MLP of the
same widths, torch's default init), optimizer (AdamW, torch's defaults but lr), per-rank batch,
epochs and one intra-op thread per rank; torch's DistributedSampler. Run under torchrun. Rank 0
prints one line: `final: accuracy=… samples/s=…`, samples/s over the epochs' loops as
ferrun-train counts them (per-epoch held-out evaluation included).
"""

import argparse
import gzip
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def digits():
    import sklearn

    path = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "data", "digits.csv.gz")
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x, y = rows[:, :64] / 16.0, rows[:, 64].astype(np.int64)
    held = np.arange(len(y)) % 5 == 4
    return (torch.from_numpy(x[~held]), torch.from_numpy(y[~held])), (
        torch.from_numpy(x[held]),
        torch.from_numpy(y[held]),
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--hidden", default="128,128")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(a.seed)
    sizes = [64] + [int(h) for h in a.hidden.split(",")] + [10]
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i + 2 < len(sizes):
            layers.append(nn.ReLU())
    model = DDP(nn.Sequential(*layers))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    (xt, yt), (xh, yh) = digits()
    sampler = DistributedSampler(TensorDataset(xt, yt), num_replicas=world, rank=rank, seed=a.seed)
    loader = DataLoader(TensorDataset(xt, yt), batch_size=a.batch_size, sampler=sampler)
    loss_fn = nn.CrossEntropyLoss()
    seen, start = 0, time.perf_counter()
    mine = torch.arange(rank, len(yh), world)
    for epoch in range(a.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            seen += len(y) * world
        with torch.no_grad():
            logits = model.module(xh[mine])
            totals = torch.tensor(
                [float((logits.argmax(-1) == yh[mine]).sum()), float(len(mine))], dtype=torch.float64
            )
        dist.all_reduce(totals)
    rate = seen / (time.perf_counter() - start)
    if rank == 0:
        print(f"final: accuracy={totals[0] / totals[1]:.4f} samples/s={rate:.0f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
