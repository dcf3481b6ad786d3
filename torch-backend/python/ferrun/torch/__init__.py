"""ferrun's collectives as a torch.distributed backend.

    import ferrun.torch  # registers the backend "ferrun"
    torch.distributed.init_process_group("ferrun")

Ranks on one host talk over shared memory, ranks on different hosts over TCP (chosen per pair,
as ferrun's own workers do). CUDA tensors go through ferrun's GPU communicator — NCCL when every
rank has a GPU of its own, else staged through pinned host memory — for all-reduce, broadcast,
all-gather and reduce-scatter of contiguous tensors (DDP's and FSDP's traffic), and through host
memory for the other ops; one backend name serves CPU and GPU jobs; the group bootstraps through the store torch hands the backend, so
sub-groups (``new_group``) and jobs launched by ``ferrun`` or ``torchrun`` work alike.

Ops run in call order, without the GIL, on the tensors' memory (contiguous CPU tensors in
place; others through a copy): on the group's own thread, the Work returned at once — or, for
a collective of at most 64 KiB called while nothing is queued, on the calling thread before the
call returns (it takes µs, and saves two thread hand-overs). A peer that dies, or ranks that call different collectives, fail every pending op with
a RuntimeError naming the cause, within the group's timeout.

What this module trusts: the tensors it is given (it checks device, dtype, layout and sizes
before anything is queued). What it does not: peers and the store (``ferrun._native`` and
ferrun's transports validate everything they receive).
"""

import atexit
import datetime
import uuid
import weakref

import torch
import torch.distributed as dist
from torch.futures import Future

from .. import _native
from ._util import (
    _Staged,
    _StoreAdapter,
    _Work,
    _buf,
    _check_dense,
    _fail,
    _flat,
    _host,
    _on_gpu,
    _moved,
    _reduction,
    _same,
    _single,
    _tcp_address,
    _unflatten_into,
)

__all__ = ["ProcessGroupFerrun"]


class ProcessGroupFerrun(dist.ProcessGroup):
    """A torch process group over ferrun's collectives (``backend="ferrun"``)."""

    def __init__(self, store, rank, size, timeout):
        super().__init__(rank, size)
        if timeout is None or timeout.total_seconds() <= 0:
            timeout = datetime.timedelta(minutes=30)
        self._timeout = timeout
        # A group made again under the same prefix (after destroy_process_group) must never
        # read the last one's keys: each generation counts its members in.
        generation = (store.add("ferrun/joined", 1) - 1) // size
        prefix = f"ferrun/{generation}/"
        if rank == 0:
            store.set(prefix + "id", uuid.uuid4().hex)
        store.wait([prefix + "id"], timeout)
        group_id = store.get(prefix + "id").decode()
        self._store, self._prefix, self._gpus = store, prefix, {}
        _live.add(self)
        self._group = _native.Group(
            _StoreAdapter(store, prefix, timeout),
            rank,
            size,
            timeout.total_seconds(),
            _tcp_address(store),
            f"ferrun/torch/{group_id}",
        )

    # -- identity ---------------------------------------------------------------------------

    def getBackendName(self):
        return "ferrun"

    @property
    def transport(self):
        """How this rank reaches its peers: ``shm``, ``tcp`` or ``shm+tcp``."""
        return self._group.transport

    def shutdown(self):
        self._group.close()

    def abort(self):
        self._group.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _work(self, start, result, staged=None):
        """Queues `start(future, held)`: a Work completed when the op has run (and what was
        staged is copied back)."""
        fut = Future()
        if staged is None or not (staged.back or staged.keep):
            start(fut, result)
            return _Work(fut, raw=True)
        back, keep = staged.back, staged.keep
        start(fut, (result, keep))

        def finish(done):
            done.wait()
            for dst, src in back:
                dst.copy_(src)
            return result

        return _Work(fut.then(finish))

    def _root(self, root, what):
        if not 0 <= root < self.size():
            _fail(f"{what}: root {root} is not a rank of this {self.size()}-rank group")
        return root

    def _gpu(self, device):
        """The GPU communicator of `device` (made at the first CUDA op, which every rank calls)."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        group = self._gpus.get(index)
        if group is None:
            group = _native.GpuGroup(
                _StoreAdapter(self._store, f"{self._prefix}gpu/{index}/", self._timeout),
                self.rank(),
                self.size(),
                self._timeout.total_seconds(),
                index,
                _tcp_address(self._store),
            )
            self._gpus[index] = group
        return group

    def _on_device(self, t, result, call):
        """Runs `call(gpu_group)` on `t`'s GPU once what torch queued on its stream is done: a
        Work already complete (or failed with the op's error)."""
        torch.cuda.current_stream(t.device).synchronize()
        fut = Future()
        try:
            call(self._gpu(t.device))
        except (RuntimeError, ValueError) as e:
            fut.set_exception(e)
        else:
            fut.set_result(result)
        return _Work(fut, raw=True)

    # -- reductions -------------------------------------------------------------------------

    def allreduce(self, tensors, opts=None):
        opts = opts or dist.AllreduceOptions()
        if len(tensors) == 1:
            t = tensors[0]
            if t.is_contiguous() and t.device.type == "cpu" and t.layout == torch.strided:
                # The common case (every DDP bucket), kept short: it is all overhead.
                op, code = _reduction(opts, t.dtype)
                fut = Future()
                self._group.all_reduce(fut, tensors, [(t.data_ptr(), t.numel())], code, op)
                return _Work(fut, raw=True)
            if _on_gpu(t) and t.layout == torch.strided:
                op, code = _reduction(opts, t.dtype)
                b = t.view(torch.uint8) if t.dtype == torch.bool else t
                return self._on_device(t, tensors, lambda g: g.all_reduce(_buf(b), code, op))
        _check_dense(tensors)
        if not tensors:
            return self._work(lambda f, r: f.set_result(r), tensors)
        if len(tensors) > 1:
            return self.allreduce_coalesced(tensors, opts)
        t = tensors[0]
        op, code = _reduction(opts, t.dtype)
        staged = _Staged()
        s = staged.inout(t)
        group = self._group
        return self._work(
            lambda f, r: group.all_reduce(f, r, [_buf(s)], code, op), tensors, staged
        )

    def allreduce_coalesced(self, tensors, opts=None):
        opts = opts or dist.AllreduceCoalescedOptions()
        _check_dense(tensors)
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:
            _fail(f"allreduce_coalesced: tensors of one dtype only; got {sorted(map(str, dtypes))}")
        if not tensors:
            return self._work(lambda f, r: f.set_result(r), tensors)
        op, code = _reduction(opts, tensors[0].dtype)
        flat = _flat(tensors)
        group = self._group

        fut = Future()
        group.all_reduce(fut, flat, [_buf(flat)], code, op)
        return _Work(fut.then(_unflatten_into(flat, tensors, tensors)))

    def reduce(self, tensors, opts=None):
        opts = opts or dist.ReduceOptions()
        t = _single(tensors, "reduce")
        _check_dense([t])
        op, code = _reduction(opts, t.dtype)
        root = self._root(opts.rootRank, "reduce")
        staged = _Staged()
        s = staged.inout(t)
        group = self._group
        return self._work(lambda f, r: group.reduce(f, r, _buf(s), code, op, root), tensors, staged)

    def reduce_scatter(self, output_tensors, input_tensors, opts=None):
        opts = opts or dist.ReduceScatterOptions()
        out = _single(output_tensors, "reduce_scatter")
        inputs = _single(input_tensors, "reduce_scatter")
        if len(inputs) != self.size():
            _fail(f"reduce_scatter: {len(inputs)} inputs for a {self.size()}-rank group")
        _check_dense([out, *inputs])
        _same([out, *inputs], "reduce_scatter")
        # Flattened where the tensors are, so that CUDA inputs can go to the GPU communicator.
        flat = torch.cat([t.reshape(-1) for t in inputs])
        return self._reduce_scatter(out, flat, opts, output_tensors, own_input=True)

    def reduce_scatter_single(self, output, input, opts=None):
        return self._reduce_scatter(output, input, opts or dist.ReduceScatterOptions(), output)

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_tensor_coalesced(self, outputs, inputs, opts=None):
        works = [self.reduce_scatter_single(o, i, opts) for o, i in zip(outputs, inputs)]
        return works[-1] if works else self._work(lambda f, r: f.set_result(r), outputs)

    def _reduce_scatter(self, output, input, opts, result, own_input=False):
        _check_dense([output, input])
        if output.dtype != input.dtype:
            _fail(f"reduce_scatter: output is {output.dtype}, input {input.dtype}")
        if input.numel() != output.numel() * self.size():
            _fail(
                f"reduce_scatter: the input holds {input.numel()} elements; it must hold "
                f"world size × output = {self.size()} × {output.numel()}"
            )
        op, code = _reduction(opts, output.dtype)
        if _on_gpu(output) and _on_gpu(input) and output.dtype != torch.bool:
            return self._on_device(
                output, result, lambda g: g.reduce_scatter(_buf(input), _buf(output), code, op)
            )
        staged = _Staged()
        i, o = staged.input(input), staged.output(output)
        if own_input:
            staged.hold(i)
        group = self._group
        return self._work(
            lambda f, r: group.reduce_scatter(f, r, _buf(i), _buf(o), code, op), result, staged
        )

    # -- data movement ----------------------------------------------------------------------

    def broadcast(self, tensors, opts=None):
        opts = opts or dist.BroadcastOptions()
        t = _single(tensors, "broadcast")
        _check_dense([t])
        root = self._root(opts.rootRank, "broadcast")
        if _on_gpu(t):
            m, code = _moved(t)
            return self._on_device(t, tensors, lambda g: g.broadcast(_buf(m), code, root))
        staged = _Staged()
        s, code = _moved(staged.inout(t))
        group = self._group
        return self._work(lambda f, r: group.broadcast(f, r, _buf(s), code, root), tensors, staged)

    def allgather(self, output_tensors, input_tensors, opts=None):
        t = _single(input_tensors, "allgather")
        outs = _single(output_tensors, "allgather")
        if len(outs) != self.size():
            _fail(f"allgather: {len(outs)} outputs for a {self.size()}-rank group")
        _check_dense([t, *outs])
        _same([t, *outs], "allgather")
        flat = torch.empty(t.numel() * self.size(), dtype=t.dtype)
        i, code = _moved(_host(t))
        o, _ = _moved(flat)
        group = self._group

        fut = Future()
        group.all_gather(fut, [i, o], _buf(i), _buf(o), code)
        return _Work(fut.then(_unflatten_into(flat, outs, output_tensors)))

    def all_gather_single(self, output, input, opts=None):
        _check_dense([output, input])
        if output.dtype != input.dtype:
            _fail(f"all_gather: output is {output.dtype}, input {input.dtype}")
        if output.numel() != input.numel() * self.size():
            _fail(
                f"all_gather: the output holds {output.numel()} elements; it must hold "
                f"world size × input = {self.size()} × {input.numel()}"
            )
        if _on_gpu(output) and _on_gpu(input):
            i, code = _moved(input)
            o, _ = _moved(output)
            return self._on_device(output, [output], lambda g: g.all_gather(_buf(i), _buf(o), code))
        staged = _Staged()
        i, code = _moved(staged.input(input))
        o, _ = _moved(staged.output(output))
        group = self._group
        return self._work(
            lambda f, r: group.all_gather(f, r, _buf(i), _buf(o), code), [output], staged
        )

    _allgather_base = all_gather_single

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts=None):
        works = [self.all_gather_single(o, i, opts) for o, i in zip(outputs, inputs)]
        return works[-1] if works else self._work(lambda f, r: f.set_result(r), outputs)

    def alltoall(self, output_tensors, input_tensors, opts=None):
        n = self.size()
        if len(output_tensors) != n or len(input_tensors) != n:
            _fail(f"alltoall: {len(input_tensors)} inputs and {len(output_tensors)} outputs for a {n}-rank group")
        _check_dense([*output_tensors, *input_tensors])
        dtypes = {t.dtype for t in [*output_tensors, *input_tensors]}
        if len(dtypes) > 1:
            _fail(f"alltoall: tensors of one dtype only; got {sorted(map(str, dtypes))}")
        send = [t.numel() for t in input_tensors]
        recv = [t.numel() for t in output_tensors]
        flat_in = _flat(input_tensors)
        flat_out = torch.empty(sum(recv), dtype=output_tensors[0].dtype)
        i, code = _moved(flat_in)
        o, _ = _moved(flat_out)
        scale = i.numel() // max(flat_in.numel(), 1) if flat_in.numel() else 1
        group = self._group

        fut = Future()
        group.all_to_all(
            fut, [i, o], _buf(i), _buf(o), code, [c * scale for c in send], [c * scale for c in recv]
        )
        return _Work(fut.then(_unflatten_into(flat_out, output_tensors, output_tensors)))

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        n = self.size()
        _check_dense([output, input])
        if output.dtype != input.dtype:
            _fail(f"all_to_all: output is {output.dtype}, input {input.dtype}")
        staged = _Staged()
        i, code = _moved(staged.input(input))
        o, _ = _moved(staged.output(output))
        group = self._group
        if not output_split_sizes and not input_split_sizes:
            if input.numel() != output.numel() or input.numel() % n:
                _fail(
                    f"all_to_all: input ({input.numel()}) and output ({output.numel()}) must "
                    f"hold the same multiple of the world size {n}, or give split sizes"
                )
            return self._work(
                lambda f, r: group.all_to_all(f, r, _buf(i), _buf(o), code), [output], staged
            )
        # Split sizes count rows (dim 0); the native op counts elements (of what it moves).
        def counts(splits, t, what):
            rows = t.shape[0] if t.dim() else 1
            if not splits:
                if rows % n:
                    _fail(f"all_to_all: {what} has {rows} rows, not a multiple of {n}: give its split sizes")
                splits = [rows // n] * n
            if len(splits) != n or sum(splits) != rows or min(splits) < 0:
                _fail(f"all_to_all: {what} split sizes {list(splits)} must be {n} counts adding up to its {rows} rows")
            per_row = (t.numel() // rows if rows else 0) * (o.numel() // max(output.numel(), 1) if output.numel() else 1)
            return [s * per_row for s in splits]

        send = counts(input_split_sizes, input, "the input")
        recv = counts(output_split_sizes, output, "the output")
        return self._work(
            lambda f, r: group.all_to_all(f, r, _buf(i), _buf(o), code, send, recv), [output], staged
        )

    alltoall_base = all_to_all_single

    def gather(self, output_tensors, input_tensors, opts=None):
        opts = opts or dist.GatherOptions()
        t = _single(input_tensors, "gather")
        root = self._root(opts.rootRank, "gather")
        _check_dense([t])
        i, code = _moved(_host(t))
        group = self._group
        if self.rank() != root:
            return self._work(lambda f, r: group.gather(f, r, _buf(i), None, code, root), [i])
        outs = _single(output_tensors, "gather")
        if len(outs) != self.size():
            _fail(f"gather: {len(outs)} outputs at the root for a {self.size()}-rank group")
        _check_dense(outs)
        _same([t, *outs], "gather")
        flat = torch.empty(t.numel() * self.size(), dtype=t.dtype)
        o, _ = _moved(flat)

        fut = Future()
        group.gather(fut, [i, o], _buf(i), _buf(o), code, root)
        return _Work(fut.then(_unflatten_into(flat, outs, output_tensors)))

    def scatter(self, output_tensors, input_tensors, opts=None):
        opts = opts or dist.ScatterOptions()
        out = _single(output_tensors, "scatter")
        root = self._root(opts.rootRank, "scatter")
        _check_dense([out])
        staged = _Staged()
        o, code = _moved(staged.output(out))
        group = self._group
        if self.rank() != root:
            return self._work(
                lambda f, r: group.scatter(f, r, None, _buf(o), code, root), output_tensors, staged
            )
        ins = _single(input_tensors, "scatter")
        if len(ins) != self.size():
            _fail(f"scatter: {len(ins)} inputs at the root for a {self.size()}-rank group")
        _check_dense(ins)
        _same([out, *ins], "scatter")
        i, _ = _moved(staged.hold(_flat(ins)))
        return self._work(
            lambda f, r: group.scatter(f, r, _buf(i), _buf(o), code, root),
            output_tensors,
            staged,
        )

    def barrier(self, opts=None):
        group = self._group
        return self._work(lambda f, r: group.barrier(f, r), None)

    # -- point to point ---------------------------------------------------------------------

    def _p2p(self, tensors, peer, tag, what):
        t = _single(tensors, what)
        _check_dense([t])
        if not 0 <= peer < self.size() or peer == self.rank():
            _fail(f"{what}: peer {peer} must be another rank of this {self.size()}-rank group")
        if not 0 <= tag < 2**32:
            _fail(f"{what}: tag {tag} must be in [0, 2³²)")
        return t

    def send(self, tensors, dstRank, tag):
        t = self._p2p(tensors, dstRank, tag, "send")
        staged = _Staged()
        s, code = _moved(staged.input(t))
        group = self._group
        return self._work(
            lambda f, r: group.send(f, r, _buf(s), code, dstRank, tag), tensors, staged
        )

    def recv(self, tensors, srcRank, tag):
        t = self._p2p(tensors, srcRank, tag, "recv")
        staged = _Staged()
        s, code = _moved(staged.output(t))
        group = self._group
        return self._work(lambda f, r: group.recv(f, r, _buf(s), code, srcRank, tag), tensors, staged)

    def recv_anysource(self, tensors, tag):
        raise RuntimeError(
            "ferrun: recv from any source is not supported: name the source rank (dist.recv(t, src=…))"
        )


# Groups not destroyed by the program are closed before the interpreter finalizes: their
# queued ops complete (or fail) while Python can still run the futures' callbacks.
_live = weakref.WeakSet()


@atexit.register
def _close_all():
    for pg in list(_live):
        group = getattr(pg, "_group", None)
        if group is not None:
            group.close()


def _create(store, rank, size, timeout):
    return ProcessGroupFerrun(store, rank, size, timeout)


if not hasattr(dist.Backend, "FERRUN"):
    dist.Backend.register_backend("ferrun", _create, devices=["cpu", "cuda"])
