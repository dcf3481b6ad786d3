# What a warm start must give a worker, as one JSON line: whether torch was imported before
# the script ran, its attempt's environment, its argv and working directory, and whether any
# state of an earlier attempt (an env var, an interpreter global) reached it. Attempt 0 sets
# that state and, once every rank has said its record (a key each in the agent store), exits 3
# (a failure to restart from); later attempts exit 0.
import builtins
import json
import os
import sys

pre_imported = "torch" in sys.modules
import torch  # noqa: E402  (after the check, on purpose)

record = {
    "pre_imported": pre_imported,
    "rank": int(os.environ["RANK"]),
    "local_rank": int(os.environ["LOCAL_RANK"]),
    "world": int(os.environ["WORLD_SIZE"]),
    "restart": int(os.environ["TORCHELASTIC_RESTART_COUNT"]),
    "master_port": os.environ["MASTER_PORT"],
    "agent_env": os.environ.get("FERRUN_TEST_AGENT_ENV"),
    "leaked_env": os.environ.get("FERRUN_TEST_LEAK"),
    "leaked_global": getattr(builtins, "ferrun_test_leak", None),
    "pid": os.getpid(),
    "argv": sys.argv,
    "cwd": os.getcwd(),
    "name": __name__,
    "torch": torch.__version__.split("+")[0],
}
print("WARM " + json.dumps(record), flush=True)
os.environ["FERRUN_TEST_LEAK"] = "attempt %d" % record["restart"]
builtins.ferrun_test_leak = record["pid"]
if record["restart"] == 0:
    # The first rank to fail stops the others: none may fail before all have printed. The
    # ranks meet in the agent store (each waits, bounded, for every rank's key).
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=60),
        use_libuv=False,
    )
    store.set(f"said-{record['rank']}", "1")
    store.wait([f"said-{r}" for r in range(record["world"])])
    sys.exit(3)
sys.exit(0)
