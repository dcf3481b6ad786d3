# Every op of the ferrun backend against the same op on gloo, in one process: the world group
# is gloo, a new_group of every rank is ferrun, and sub-groups of each come from new_group. For
# each dtype, reduction and size (zero, one, not divisible by the world, large enough for the
# ring), and for non-contiguous tensors, the two must agree. Prints "ops ok: N checks" on
# success; any disagreement raises with the op, dtype, size and both results.
import datetime
import os
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import ferrun.torch  # noqa: E402,F401

dist.init_process_group("gloo")
rank, n = dist.get_rank(), dist.get_world_size()
gloo = dist.group.WORLD
fr = dist.new_group(backend="ferrun")
assert fr.name() == "ferrun", fr.name()
checks = 0

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
INTS = [torch.int32, torch.int64, torch.uint8, torch.int8, torch.int16]
# Gloo reduces these dtypes; the others ferrun supports are compared against a reference.
GLOO_REDUCES = {torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32,
                torch.int64, torch.uint8, torch.int8}
OPS = [dist.ReduceOp.SUM, dist.ReduceOp.PRODUCT, dist.ReduceOp.MIN, dist.ReduceOp.MAX,
       dist.ReduceOp.AVG]
SIZES = [0, 1, n + 1, 3 * n + 1, 70_000]


def data(dtype, count, seed, op=None):
    """Small integer values (exact in every dtype, so any reduction order agrees), or 1 and 2
    for products."""
    gen = torch.Generator().manual_seed(seed)
    hi = 3 if op == dist.ReduceOp.PRODUCT else 10
    lo = 1 if op == dist.ReduceOp.PRODUCT else 0
    return torch.randint(lo, hi, (count,), generator=gen).to(dtype)


def same(what, a, b):
    global checks
    checks += 1
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
        raise AssertionError(f"rank {rank}: {what}: ferrun {a} != gloo {b}")


def both(fn):
    """`fn(group)` on ferrun and on gloo: what each returned."""
    return fn(fr), fn(gloo)


def reference_reduce(tensors, op):
    acc = tensors[0].clone()
    for t in tensors[1:]:
        if op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            acc = acc + t
        elif op == dist.ReduceOp.PRODUCT:
            acc = acc * t
        elif op == dist.ReduceOp.MIN:
            acc = torch.minimum(acc, t)
        else:
            acc = torch.maximum(acc, t)
    if op == dist.ReduceOp.AVG:
        acc = acc / len(tensors) if acc.is_floating_point() else acc // len(tensors)
    return acc.to(tensors[0].dtype)


# all_reduce (and AVG, which gloo lacks, against a reference), reduce, broadcast.
for dtype in FLOATS + INTS:
    for op in OPS:
        for count in SIZES:
            mine = data(dtype, count, rank, op)
            everyone = [data(dtype, count, r, op) for r in range(n)]
            t = mine.clone()
            dist.all_reduce(t, op=op, group=fr)
            if op != dist.ReduceOp.AVG and dtype in GLOO_REDUCES:
                g = mine.clone()
                dist.all_reduce(g, op=op, group=gloo)
                same(f"all_reduce {dtype} {op} × {count}", t, g)
            same(f"all_reduce {dtype} {op} × {count} (reference)", t, reference_reduce(everyone, op))
        t = data(dtype, 1000, rank)
        root = n - 1
        r = t.clone()
        dist.reduce(r, dst=root, op=dist.ReduceOp.MAX, group=fr)
        if rank == root:
            same(f"reduce {dtype}", r, reference_reduce([data(dtype, 1000, q) for q in range(n)], dist.ReduceOp.MAX))
        b = t.clone()
        dist.broadcast(b, src=root, group=fr)
        same(f"broadcast {dtype}", b, data(dtype, 1000, root))

# bool reduces as any/all; complex moves as bytes.
flags = torch.tensor([rank == 0, True, False])
dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=fr)
same("all_reduce bool SUM", flags, torch.tensor([True, True, False]))
z = torch.tensor([complex(rank, 1)], dtype=torch.complex64)
dist.broadcast(z, src=0, group=fr)
same("broadcast complex64", z, torch.tensor([complex(0, 1)], dtype=torch.complex64))
# torch reduces complex SUM as its real view.
z = torch.tensor([complex(rank, 1)], dtype=torch.complex64)
dist.all_reduce(z, group=fr)
same("all_reduce complex64", z, torch.tensor([complex(sum(range(n)), n)], dtype=torch.complex64))

# Non-contiguous tensors are reduced through a copy and written back.
base = data(torch.float32, 64, rank).reshape(8, 8)
ft, gt = base.clone().t(), base.clone().t()
dist.all_reduce(ft, group=fr)
dist.all_reduce(gt, group=gloo)
same("all_reduce non-contiguous", ft, gt)

# all_gather: list form, tensor form (also in place, as FSDP calls it), object form.
for dtype in [torch.float32, torch.bfloat16, torch.int64, torch.uint8]:
    for count in [0, 1, 7, 30_000]:
        mine = data(dtype, count, rank)
        outs = both(lambda g: [torch.empty(count, dtype=dtype) for _ in range(n)])
        for group, out in zip((fr, gloo), outs):
            dist.all_gather(out, mine, group=group)
        for a, b in zip(*outs):
            same(f"all_gather {dtype} × {count}", a, b)
        flat_f, flat_g = torch.empty(n * count, dtype=dtype), torch.empty(n * count, dtype=dtype)
        dist.all_gather_into_tensor(flat_f, mine, group=fr)
        dist.all_gather_into_tensor(flat_g, mine, group=gloo)
        same(f"all_gather_into_tensor {dtype} × {count}", flat_f, flat_g)
        inplace = torch.zeros(n * count, dtype=dtype)
        inplace[rank * count : (rank + 1) * count] = mine
        dist.all_gather_into_tensor(inplace, inplace[rank * count : (rank + 1) * count], group=fr)
        same(f"all_gather_into_tensor in place {dtype} × {count}", inplace, flat_g)
objs_f, objs_g = [None] * n, [None] * n
dist.all_gather_object(objs_f, {"rank": rank, "text": "x" * rank}, group=fr)
dist.all_gather_object(objs_g, {"rank": rank, "text": "x" * rank}, group=gloo)
checks += 1
assert objs_f == objs_g, (objs_f, objs_g)
objs = [f"from {rank}", rank] if rank == 0 else [None, None]
dist.broadcast_object_list(objs, src=0, group=fr)
checks += 1
assert objs == ["from 0", 0], objs

# reduce_scatter: list form and tensor form, sizes not divisible by the world.
for dtype in [torch.float32, torch.float64, torch.int32]:
    for count in [0, 1, 5, 20_000]:
        for op in [dist.ReduceOp.SUM, dist.ReduceOp.MAX]:
            ins = [data(dtype, count, rank * n + j) for j in range(n)]
            out_f, out_g = torch.empty(count, dtype=dtype), torch.empty(count, dtype=dtype)
            dist.reduce_scatter(out_f, ins, op=op, group=fr)
            dist.reduce_scatter(out_g, ins, op=op, group=gloo)
            same(f"reduce_scatter {dtype} {op} × {count}", out_f, out_g)
            flat = torch.cat(ins)
            t_f = torch.empty(count, dtype=dtype)
            dist.reduce_scatter_tensor(t_f, flat, op=op, group=fr)
            same(f"reduce_scatter_tensor {dtype} {op} × {count}", t_f, out_g)

# all_to_all: equal blocks, uneven split sizes, list form.
for dtype in [torch.float32, torch.int64, torch.complex64]:
    inp = torch.arange(n * 6, dtype=torch.float32).to(dtype) + 100 * rank
    out_f, out_g = torch.empty_like(inp), torch.empty_like(inp)
    dist.all_to_all_single(out_f, inp, group=fr)
    if dtype != torch.complex64:
        dist.all_to_all_single(out_g, inp, group=gloo)
        same(f"all_to_all_single {dtype}", out_f, out_g)
# Rank i sends j + 1 rows of 3 to rank j.
send = [j + 1 for j in range(n)]
recv = [rank + 1] * n
inp = torch.cat([torch.full((j + 1, 3), float(rank * 10 + j)) for j in range(n)])
uf, ug = torch.empty(sum(recv), 3), torch.empty(sum(recv), 3)
dist.all_to_all_single(uf, inp, recv, send, group=fr)
dist.all_to_all_single(ug, inp, recv, send, group=gloo)
same("all_to_all_single uneven", uf, ug)
ins = [torch.full((4,), float(rank * n + j)) for j in range(n)]
lf, lg = ([torch.empty(4) for _ in range(n)] for _ in range(2))
dist.all_to_all(lf, ins, group=fr)
dist.all_to_all(lg, ins, group=gloo)
for a, b in zip(lf, lg):
    same("all_to_all list", a, b)
# Uneven lists (gloo takes equal sizes only): rank i sends j + 2 elements to rank j.
ins = [torch.full((j + 2,), float(rank)) for j in range(n)]
lf = [torch.empty(rank + 2) for _ in range(n)]
dist.all_to_all(lf, ins, group=fr)
for i, a in enumerate(lf):
    same("all_to_all uneven list", a, torch.full((rank + 2,), float(i)))

# gather and scatter at every root.
for root in range(n):
    mine = data(torch.float32, 9, rank)
    gf = [torch.empty(9) for _ in range(n)] if rank == root else None
    gg = [torch.empty(9) for _ in range(n)] if rank == root else None
    dist.gather(mine, gf, dst=root, group=fr)
    dist.gather(mine, gg, dst=root, group=gloo)
    if rank == root:
        for a, b in zip(gf, gg):
            same(f"gather root {root}", a, b)
    parts = [data(torch.int64, 4, 50 + r) for r in range(n)] if rank == root else None
    sf, sg = torch.empty(4, dtype=torch.int64), torch.empty(4, dtype=torch.int64)
    dist.scatter(sf, parts, src=root, group=fr)
    dist.scatter(sg, parts, src=root, group=gloo)
    same(f"scatter root {root}", sf, sg)

# send / recv with tags, isend/irecv pairs, barrier.
if n > 1:
    peer_next, peer_prev = (rank + 1) % n, (rank - 1) % n
    for tag in [0, 7]:
        out = torch.full((1000,), float(rank * 100 + tag))
        got = torch.empty(1000)
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, out, peer_next, fr, tag),
                                       dist.P2POp(dist.irecv, got, peer_prev, fr, tag)])
        for req in reqs:
            req.wait()
        same(f"isend/irecv tag {tag}", got, torch.full((1000,), float(peer_prev * 100 + tag)))
    if rank == 0:
        dist.send(torch.arange(5.0), dst=1, group=fr, tag=3)
    elif rank == 1:
        got = torch.empty(5)
        dist.recv(got, src=0, group=fr, tag=3)
        same("send/recv", got, torch.arange(5.0))
dist.barrier(group=fr)

# Sub-groups: the even ranks, and every rank but 0, on both backends.
for members in [list(range(0, n, 2)), list(range(1, n))]:
    if not members:
        continue
    sub_f = dist.new_group(members, backend="ferrun")
    sub_g = dist.new_group(members, backend="gloo")
    if rank in members:
        a, b = data(torch.float32, 333, rank), data(torch.float32, 333, rank)
        dist.all_reduce(a, group=sub_f)
        dist.all_reduce(b, group=sub_g)
        same(f"all_reduce in sub-group {members}", a, b)
        bc = torch.full((3,), float(rank))
        dist.broadcast(bc, src=members[-1], group=sub_f)
        same(f"broadcast in sub-group {members}", bc, torch.full((3,), float(members[-1])))

# Asynchronous ops overlap and complete in order; their futures carry the tensors.
ts = [torch.full((50_000,), float(rank + k)) for k in range(4)]
works = [dist.all_reduce(t, group=fr, async_op=True) for t in ts]
futs = [w.get_future() for w in works]
for k, f in enumerate(futs):
    (res,) = f.wait()
    same(f"async all_reduce #{k}", res, torch.full((50_000,), float(sum(range(n)) + n * k)))

# wait(timeout) honours its timeout: rank 1 sends only after rank 0's wait gave up.
if n > 1:
    pair = dist.new_group([0, 1], backend="gloo")
    if rank == 0:
        box = torch.zeros(3)
        req = dist.irecv(box, src=1, group=fr, tag=99)
        try:
            req.wait(datetime.timedelta(milliseconds=200))
        except RuntimeError as e:
            assert "did not complete within" in str(e), str(e)
            checks += 1
        else:
            raise AssertionError("wait(200 ms) returned before the peer sent")
        dist.barrier(group=pair)
        req.wait()
        same("recv after a timed-out wait", box, torch.ones(3))
    elif rank == 1:
        dist.barrier(group=pair)
        dist.send(torch.ones(3), dst=0, group=fr, tag=99)

# Errors that are the caller's are raised at the call, naming the problem.
for bad, words in [
    (lambda: dist.all_reduce(torch.zeros(2, dtype=torch.uint16), group=fr), "reductions of torch.uint16"),
    (lambda: dist.all_gather_into_tensor(torch.empty(3), torch.empty(2), group=fr), "world size"),
    (lambda: dist.all_reduce(torch.zeros(2), op=dist.ReduceOp.BAND, group=fr), "not supported"),
    # No GPU here: a tensor on another device stands for a CUDA one.
    (lambda: dist.all_reduce(torch.zeros(2, device="meta"), group=fr), "runs CPU and CUDA tensors"),
]:
    try:
        bad()
    except (ValueError, RuntimeError) as e:
        assert words in str(e), (words, str(e))
        checks += 1
    else:
        raise AssertionError(f"no error for {words}")

# No GPU here: the GPU communicator CUDA tensors would use says what is missing, at once.
from ferrun import _native
from ferrun.torch._util import _StoreAdapter

try:
    store = dist.distributed_c10d._get_default_store()
    _native.GpuGroup(_StoreAdapter(store, "gpu-check/", datetime.timedelta(seconds=30)), rank, n, 30.0, 0)
except RuntimeError as e:
    assert "cannot join its GPU group on cuda:0" in str(e) and "libcuda.so.1" in str(e), str(e)
    checks += 1
else:
    raise AssertionError("a GPU group was made on a machine without a GPU")

dist.destroy_process_group()
print(f"rank {rank}: ops ok: {checks} checks over {os.environ.get('FERRUN_TRANSPORT', 'auto')}", flush=True)
