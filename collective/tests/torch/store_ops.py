# Drives a TCPStore server with torch 2.13's own client and prints what every operation
# returned, as JSON. With port 0 it first starts torch's own server (torch-to-torch reference).
import json
import sys
import threading
from datetime import timedelta

import torch.distributed as dist

port = int(sys.argv[1])
server = None
if port == 0:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    port = server.port
T = timedelta(seconds=10)
c = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=T)
out = []


def record(name, f):
    try:
        value = f()
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, list):
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
        out.append([name, value])
    except Exception as e:  # the error's type is what must agree
        out.append([name, "error " + type(e).__name__])


record("set", lambda: c.set("k", "v"))
record("get", lambda: c.get("k"))
record("add", lambda: c.add("n", 5))
record("add again", lambda: c.add("n", -7))
record("compare_set hit", lambda: c.compare_set("k", "v", "w"))
record("compare_set miss", lambda: c.compare_set("k", "x", "y"))
record("compare_set missing key", lambda: c.compare_set("nokey", "e", "z"))
record("compare_set create", lambda: c.compare_set("fresh", "", "z"))
record("check present", lambda: c.check(["k", "n"]))
record("check absent", lambda: c.check(["k", "absent"]))
record("wait timeout", lambda: c.wait(["never"], timedelta(milliseconds=200)))
record("usable after timeout", lambda: c.get("k"))
record("multi_set", lambda: c.multi_set(["a", "b"], ["1", "2"]))
record("multi_get", lambda: c.multi_get(["b", "a"]))
record("delete", lambda: c.delete_key("a"))
record("delete again", lambda: c.delete_key("a"))
record("num_keys", lambda: c.num_keys())
record("append", lambda: c.append("b", "3"))
record("after append", lambda: c.get("b"))
record("queue_push", lambda: c.queue_push("q", "x"))
record("queue_len", lambda: c.queue_len("q"))
record("queue_pop", lambda: c.queue_pop("q"))
record("queue_pop empty", lambda: c.queue_pop("q", block=False))
record("get missing times out", lambda: dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(milliseconds=300)).get("missing"))


def waiter(i, results):
    s = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=T)
    if s.add("arrived", 1) == 32:
        s.set("all_arrived", "1")
    s.wait(["go"])
    results[i] = s.get("go").decode()


results = [None] * 32
threads = [threading.Thread(target=waiter, args=(i, results)) for i in range(32)]
for t in threads:
    t.start()
c.wait(["all_arrived"])
c.set("go", "now")
for t in threads:
    t.join(10)
record("32 clients woken", lambda: results)
print(json.dumps(out))
