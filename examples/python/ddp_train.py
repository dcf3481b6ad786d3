"""Data-parallel training with torch DDP on CPU, launched by ferrun, over ferrun's collectives
(the torch.distributed backend "ferrun" of `import ferrun.torch`; `--backend gloo` for torch's).

    ferrun --standalone --nproc-per-node 4 examples/python/ddp_train.py

Each rank trains a small MLP on its shard of a synthetic regression problem; DDP averages the
gradients. Rank 0 prints the loss as it falls. At the end every rank checks that its parameters
equal rank 0's, bit for bit, and (with --out DIR) writes them to DIR/rank<N>.pt.
"""

import argparse
import os
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402


def synthetic_data(samples: int, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(samples, features, generator=gen)
    true_w = torch.randn(features, 1, generator=gen)
    y = torch.sin(x @ true_w) + 0.05 * torch.randn(samples, 1, generator=gen)
    return x, y


@record
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--out", help="directory to write each rank's final parameters to")
    parser.add_argument("--backend", choices=["ferrun", "gloo"], default="ferrun")
    args = parser.parse_args()

    if args.backend == "ferrun":
        import ferrun.torch  # noqa: F401  (registers the backend)
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)

    x, y = synthetic_data(2048, 16)
    shard = slice(rank, None, world)  # each rank trains on its own samples
    x, y = x[shard], y[shard]

    model = DDP(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = torch.nn.MSELoss()

    for epoch in range(args.epochs):
        total, batches = 0.0, 0
        for i in range(0, len(x), args.batch_size):
            opt.zero_grad()
            loss = loss_fn(model(x[i : i + args.batch_size]), y[i : i + args.batch_size])
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        mean = torch.tensor([total / batches])
        dist.all_reduce(mean)
        if rank == 0:
            print(f"epoch {epoch:3d}  loss {mean.item() / world:.5f}", flush=True)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    assert torch.equal(flat, reference), f"rank {rank}: parameters differ from rank 0's"
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"rank{rank}.bin"), "wb") as f:
            f.write(bytes(flat.view(torch.uint8).tolist()))  # raw float32, comparable bit for bit
    if rank == 0:
        print(f"done: {world} ranks over {args.backend} hold identical parameters (checksum {flat.double().sum().item():.6f})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
