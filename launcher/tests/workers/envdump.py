# Prints the worker's environment contract and command line as one JSON line.
import json
import os
import sys

KEYS = [
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_NAME", "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
]
env = {k: os.environ.get(k) for k in KEYS}
# orig_argv keeps interpreter flags such as -u; the interpreter path itself is left out.
print("ENV " + json.dumps({"env": env, "argv": sys.orig_argv[1:]}), flush=True)
