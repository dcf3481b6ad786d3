# Says it is ready, then runs until killed. With --trap-term it reports SIGTERM and keeps running,
# so only SIGKILL ends it.
import os
import signal
import sys

rank = int(os.environ["RANK"])
if "--trap-term" in sys.argv:
    def on_term(signum, frame):
        print(f"rank {rank} got SIGTERM", flush=True)
    signal.signal(signal.SIGTERM, on_term)
print(f"ready {rank} {os.getpid()}", flush=True)
while True:
    signal.pause()
