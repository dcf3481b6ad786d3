# Failures on the ferrun backend, as a user sees them. The first argument picks the case:
#   kill VICTIM     DDP trains; at step 5 rank VICTIM SIGKILLs itself. Every other rank must
#                   get a RuntimeError naming rank VICTIM, within the group's timeout.
#   mismatch        rank 0 calls all_reduce where the others call broadcast: every rank must
#                   get an error that names both calls.
#   lifecycle       destroy_process_group releases the group's threads and descriptors (also
#                   with ops still queued, which complete first), and a new group made after it
#                   works.
#   exit            ops still queued when the program ends without destroy_process_group
#                   complete, and the process exits 0.
# Each rank prints one line saying what it saw, and exits 0 only when it saw what it must.
import datetime
import os
import signal
import sys
import time
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import ferrun.torch  # noqa: E402,F401

TIMEOUT = datetime.timedelta(seconds=60)
case = sys.argv[1]


def counts():
    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))


before = counts()
rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
# The store is the test's (as a launcher's agent store is), one for every group of this
# process: a group made again after destroy_process_group meets the keys of the one before.
store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), n, False,
                      timeout=TIMEOUT)


def init():
    dist.init_process_group("ferrun", store=store, rank=rank, world_size=n, timeout=TIMEOUT)


init()
say = lambda line: print(f"rank {rank}: {line}", flush=True)  # noqa: E731

if case == "kill":
    victim = int(sys.argv[2])
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    try:
        for step in range(1_000_000):
            if step == 5 and rank == victim:
                os.kill(os.getpid(), signal.SIGKILL)
            if step == 5:
                killed_at = time.monotonic()
            loss = model(torch.randn(8, 256)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    except RuntimeError as e:
        took = time.monotonic() - killed_at
        ok = f"rank {victim}" in str(e) and took < TIMEOUT.total_seconds()
        say(f"{'named' if ok else 'WRONG'} after {took:.2f}s: {e}")
        os._exit(0 if ok else 1)
    say("trained on without noticing")
    os._exit(1)

if case == "mismatch":
    t = torch.ones(8)
    try:
        if rank == 0:
            dist.all_reduce(t)
        else:
            dist.broadcast(t, src=0)
    except RuntimeError as e:
        # The ranks that met the other call name both; the others, that the ranks disagree.
        ok = ("all_reduce" in str(e) and "broadcast" in str(e)) or "called different collectives" in str(e)
        say(f"{'told' if ok else 'WRONG'}: {e}")
        os._exit(0 if ok else 1)
    say("no error")
    os._exit(1)

if case == "lifecycle":
    # The first group may leave process-wide things of torch's and tokio's behind (a thread, a
    # socket pair); every group after it must give back all it took.
    settled = None
    for round_ in range(4):
        t = torch.full((100_000,), float(rank))
        dist.all_reduce(t)
        assert t[0].item() == sum(range(n)), t[0]
        during = counts()
        # Queued, not waited for: destroy lets them complete first.
        pending = [dist.all_reduce(torch.ones(200_000), async_op=True) for _ in range(3)]
        dist.destroy_process_group()
        after = counts()
        if not all(w.is_completed() and w.is_success() for w in pending):
            say(f"round {round_}: ops queued before destroy_process_group did not complete")
            sys.exit(1)
        settled = settled or after
        if after != settled or during[0] <= after[0]:
            say(f"LEAKED in round {round_}: threads/fds after the first group {settled}, during {during}, after {after}")
            sys.exit(1)
        if round_ < 3:
            init()
    say(f"released: threads/fds before {before}, after each group {settled}")
    sys.exit(0)

if case == "exit":
    pending = [dist.all_reduce(torch.ones(200_000), async_op=True) for _ in range(5)]
    say("exiting with ops queued")
    sys.exit(0)

say(f"unknown case {case}")
sys.exit(2)
