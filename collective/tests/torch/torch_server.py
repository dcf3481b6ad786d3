# Hosts torch 2.13's own TCPStore server, sets one key, prints the port, and serves until its
# standard input closes.
import sys

import torch.distributed as dist

server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
server.set("from_torch", "hello")
print(server.port, flush=True)
sys.stdin.read()
