"""torch.distributed's nccl all_reduce, timed as `ferrun-bench collective` times its own (the
anchor of bench/gpu-check.sh): per size, warm-up ops, then samples after a barrier of ops that
each end with the stream synchronized; a sample's time is the slowest rank's, the reported time
the median sample. Run under a launcher (ferrun or torchrun)."""

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def plan(nbytes):
    # As bench/src/collective.rs `plan`: (warm-up ops, samples, ops per sample).
    if nbytes <= 64 << 10:
        return 20, 25, 20
    if nbytes <= 1 << 20:
        return 5, 15, 5
    if nbytes <= 16 << 20:
        return 3, 11, 1
    return 2, 7, 1


def main():
    p = argparse.ArgumentParser()
    p.add_argument("-b", type=size, default=1 << 20)
    p.add_argument("-e", type=size, default=1 << 30)
    p.add_argument("--csv")
    a = p.parse_args()
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(__import__("os").environ.get("LOCAL_RANK", "0")))
    rows = ["collective,ranks,transport,size_bytes,count,time_us,algbw_gbs,busbw_gbs,wrong"]
    nbytes = a.b
    while nbytes <= a.e:
        x = torch.full((nbytes // 4,), float(rank + 1), device="cuda")
        dist.all_reduce(x)
        torch.cuda.synchronize()
        wrong = int((x != n * (n + 1) / 2).sum())
        warm, samples, k = plan(nbytes)
        for _ in range(warm):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(samples):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(k):
                dist.all_reduce(x)
                torch.cuda.synchronize()
            t = torch.tensor([(time.perf_counter() - t0) / k], device="cuda", dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times.append(t.item())
        median = statistics.median(times)
        algbw = nbytes / median / 1e9
        busbw = algbw * 2 * (n - 1) / n
        rows.append(f"AllReduce,{n},torch-nccl,{nbytes},{nbytes // 4},{median * 1e6},{algbw},{busbw},{wrong}")
        if rank == 0:
            print(f"{nbytes:>12} {median * 1e6:>10.1f} us {algbw:>8.2f} GB/s algbw {busbw:>8.2f} busbw wrong {wrong}")
        nbytes *= 2
    if rank == 0 and a.csv:
        open(a.csv, "w").write("\n".join(rows) + "\n")
    dist.destroy_process_group()
    if any(r.split(",")[-1] != "0" for r in rows[1:]):
        raise SystemExit("torch's nccl all_reduce gave wrong results")


main()
