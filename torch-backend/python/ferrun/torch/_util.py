"""What `ferrun.torch`'s process group is made of: dtype and reduction tables, checks of the
tensors it is given, staging of the ones the native side cannot use in place, the Work it
returns, and torch's store as the native bootstrap reads it.

Trusts the tensors' own metadata (torch's); checks everything else before an op is queued.
"""

import datetime
import threading

import torch
import torch.distributed as dist

from .. import _native

_CODES = {getattr(torch, name): code for code, name in enumerate(_native.DTYPES)}
_BYTES = _CODES[torch.uint8]
_R = dist.ReduceOp.RedOpType
_OPS = {_R.SUM: "sum", _R.PRODUCT: "product", _R.MIN: "min", _R.MAX: "max", _R.AVG: "avg"}
# bool reduces as bytes: any-true for SUM and MAX, all-true for PRODUCT and MIN (as NCCL does).
_BOOL_OPS = {"sum": "max", "max": "max", "product": "min", "min": "min"}
# torch passes this when the caller gave no timeout of its own.
_UNSET = datetime.timedelta(milliseconds=-1)


def _fail(what):
    raise ValueError(f"ferrun: {what}")


def _check_dense(tensors):
    """Every tensor dense, on the CPU or CUDA, all on one kind of device."""
    kinds = set()
    for t in tensors:
        if t.device.type not in ("cpu", "cuda"):
            raise RuntimeError(
                f"ferrun: a tensor on {t.device}: ferrun's torch backend runs CPU and CUDA tensors; "
                "move it with .cpu() or .cuda()"
            )
        if t.layout != torch.strided:
            _fail(f"a {t.layout} tensor: only dense (strided) tensors are supported")
        kinds.add(t.device.type)
    if len(kinds) > 1:
        _fail("tensors on the CPU and on CUDA in one op: put them on one device")


def _host(t):
    """`t` contiguous in host memory: itself, or a copy of a CUDA tensor's contents."""
    return t.contiguous() if t.device.type == "cpu" else t.to("cpu")


def _on_gpu(t):
    """A contiguous CUDA tensor that ferrun's GPU communicator can take in place."""
    return t.device.type == "cuda" and t.is_contiguous()


def _buf(t):
    return (t.data_ptr(), t.numel())


def _reduction(opts, dtype):
    """The native reduction name and dtype code for reducing tensors of `dtype`."""
    op = _OPS.get(opts.reduceOp.op)
    if op is None:
        _fail(
            f"reduction {opts.reduceOp.op} is not supported: use SUM, PRODUCT, MIN, MAX or AVG"
        )
    if dtype == torch.bool:
        if op == "avg":
            _fail("AVG of bool tensors has no meaning: use SUM (any) or MIN (all)")
        return _BOOL_OPS[op], _BYTES
    code = _CODES.get(dtype)
    if code is None:
        _fail(
            f"reductions of {dtype} are not supported: use one of "
            + ", ".join(_native.DTYPES)
            + " or bool"
        )
    return op, code


class _Staged:
    """Tensors as the native (host) ops take them: contiguous, in host memory, and as bytes for
    dtypes that are only moved. Copies made for non-contiguous or CUDA outputs are copied back
    when the op completes (CUDA tensors the GPU communicator cannot take this way go through
    host memory)."""

    def __init__(self):
        self.back = []
        self.keep = []

    def input(self, t):
        if t.is_contiguous() and t.device.type == "cpu":
            return t
        staged = _host(t)
        self.keep.append(staged)
        return staged

    def hold(self, t):
        """Keeps `t` (a buffer of the op's own) alive until the op completes."""
        self.keep.append(t)
        return t

    def output(self, t):
        if t.is_contiguous() and t.device.type == "cpu":
            return t
        staged = _host(t)
        self.back.append((t, staged))
        return staged

    def inout(self, t):
        return self.output(t)


def _moved(t):
    """`t` (contiguous) and the dtype code it moves as: its own, or bytes."""
    code = _CODES.get(t.dtype)
    if code is None:
        return t.reshape(-1).view(torch.uint8), _BYTES
    return t, code


def _same(tensors, what):
    first = tensors[0]
    for t in tensors[1:]:
        if t.dtype != first.dtype or t.numel() != first.numel():
            _fail(
                f"{what}: every tensor must have the dtype and size of the first "
                f"({first.dtype}, {first.numel()} elements); got {t.dtype}, {t.numel()}"
            )


def _unflatten_into(flat, tensors, result):
    """A future callback: once the op is done, `flat`'s consecutive pieces go into `tensors`."""

    def copy_out(done):
        done.wait()
        at = 0
        for t in tensors:
            t.copy_(flat[at : at + t.numel()].view_as(t))
            at += t.numel()
        return result

    return copy_out


def _flat(tensors):
    """The tensors' elements end to end, in host memory."""
    return torch.cat([_host(t).reshape(-1) for t in tensors]) if tensors else torch.empty(0)


def _single(tensors, what):
    if len(tensors) != 1:
        _fail(f"{what} takes one tensor per rank (one device); got {len(tensors)}")
    return tensors[0]


def _unwrap(done):
    return done.value()  # raises the op's error


class _Work(dist._Work):
    """The Work of one op, over the future the native side completes.

    torch's own future-wrapping Work swallows the future's error in `wait()`; this one raises
    it, so a failed synchronous collective raises where it was called. The native side fails a
    future with `set_exception`, which torch's C++ (DDP's reducer) would read as a successful
    result holding an exception object: the future C++ gets (`get_future`) is chained, which
    turns the failure into a real error there. Chaining costs a few µs, so it is done only for
    those who ask (`raw`); a future that is already chained is handed out as it is."""

    __slots__ = ("_fut", "_raw", "_chained")

    def __init__(self, fut, raw=False):
        super().__init__()
        self._fut, self._raw, self._chained = fut, raw, None

    def wait(self, timeout=_UNSET):
        # torch passes 0 (kNoTimeout) or -1 ms (unset) for "no timeout of the caller's".
        if timeout is not None and timeout.total_seconds() > 0:
            done = threading.Event()
            self._fut.add_done_callback(lambda _: done.set())
            if not done.wait(timeout.total_seconds()):
                raise RuntimeError(
                    f"ferrun: the op did not complete within the {timeout} given to wait() "
                    "(it goes on; the group's own timeout bounds it)"
                )
        self._fut.wait()  # raises the op's error
        return True

    def get_future(self):
        if not self._raw:
            return self._fut
        if self._chained is None:
            self._chained = self._fut.then(_unwrap)
        return self._chained

    def is_completed(self):
        return self._fut.done()

    def is_success(self):
        return self.exception() is None

    def exception(self):
        if not self._fut.done():
            return None
        try:
            self._fut.wait()
        except Exception as e:  # noqa: BLE001 - the op's error, whatever it is
            return e
        return None

    def result(self):
        return self._fut.value()

    def source_rank(self):
        raise RuntimeError("ferrun: recv from any source is not supported")


class _StoreAdapter:
    """torch's store as the native bootstrap reads it: every key under this group's own
    generation, every wait bounded by the group's timeout."""

    def __init__(self, store, prefix, timeout):
        self._store, self._prefix, self._timeout = store, prefix, timeout

    def set(self, key, value):
        self._store.set(self._prefix + key, value)

    def get(self, key):
        self._store.wait([self._prefix + key], self._timeout)
        return self._store.get(self._prefix + key)


def _tcp_address(store):
    """The host and port of the TCPStore under `store`'s prefixes, if it is one."""
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if isinstance(store, dist.TCPStore):
        return (store.host, store.port)
    return None
