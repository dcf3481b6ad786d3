# ferrun's warm-start interpreter (`ferrun --warm-start`): one per local worker, started by
# the agent before the worker is needed. It imports the heavy modules (torch, and those the
# user lists) once, then waits on its control socket (fd 3) for the attempt it is to become:
# argv, the full environment, the working directory, and the worker's stdout and stderr as
# file descriptors. It then *is* that worker: it is never reused, so no state of an earlier
# attempt can leak into it. With a gate (fd 4), it first waits for the interpreter before it
# to have finished its own imports (the gate closes then), so two generations never import
# at once. It trusts its agent (its parent, over a private socket pair).
import gc
import importlib
import os
import runpy
import socket
import struct
import sys

CONTROL_FD = 3
GATE_FD = 4
MAGIC = b"FRW1"


def read_exact(sock, n, data):
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            sys.exit(0)  # the agent let this interpreter go unused
        data += chunk
    return data


def main():
    if sys.argv[2:] == ["gate"]:
        while os.read(GATE_FD, 1):
            pass
        os.close(GATE_FD)
    for name in filter(None, sys.argv[1].split(",")):
        try:
            importlib.import_module(name)
        except Exception as e:  # the worker meets the same error if it imports it: as cold
            print(f"ferrun warm start: cannot pre-import {name} ({e!r}); the worker imports what it needs itself", file=sys.stderr, flush=True)
    # What the imports built lives as long as the process: collect their garbage once, then
    # keep the rest out of every later collection. The worker's collections then skip torch's
    # objects, and so does the interpreter's teardown, which with torch imported spends most
    # of a failing worker's exit (measured: 1.0 s → 0.35 s) traversing them.
    gc.collect()
    gc.freeze()
    sock = socket.socket(fileno=CONTROL_FD)
    data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, 3)
    if not data:
        sys.exit(0)
    if len(fds) == 3:
        os.close(fds.pop())  # this interpreter's imports are done: open the next one's gate
    data = read_exact(sock, 8, data)
    magic, size = data[:4], struct.unpack(">I", data[4:8])[0]
    if magic != MAGIC or len(fds) != 2:
        sys.exit(f"ferrun warm start: unexpected control message {magic!r} with {len(fds)} fds")
    body = read_exact(sock, 8 + size, data)[8:]
    sock.close()
    fields, at = [], 0
    while at < len(body):
        (n,) = struct.unpack_from(">I", body, at)
        fields.append(body[at + 4 : at + 4 + n])
        at += 4 + n
    argc, envc = struct.unpack(">II", fields[0])
    argv = [os.fsdecode(a) for a in fields[1 : 1 + argc]]
    env = fields[1 + argc : 1 + argc + 2 * envc]
    cwd = fields[1 + argc + 2 * envc]

    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    os.close(fds[0])
    os.close(fds[1])
    os.environb.clear()
    os.environb.update(zip(env[0::2], env[1::2]))
    os.chdir(cwd)
    # What `python -u <argv>` would have done.
    if argv[0] == "-m":
        sys.argv = argv[1:]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c"] + argv[2:]
        sys.path[0] = ""
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
