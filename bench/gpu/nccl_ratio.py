"""bench/gpu-check.sh's ratio: per size, ferrun's NCCL all_reduce time beside torch's over the
rounds (medians, with the spread), ferrun's algbw ÷ torch's; exits 1 if any size is under the
goal or any result was wrong. At one rank busbw is 0 by definition, so algbw is compared."""

import csv
import glob
import statistics
import sys

out, goal = sys.argv[1], float(sys.argv[2])


def rounds(who):
    by_size = {}
    files = sorted(glob.glob(f"{out}/{who}-nccl-*.csv"))
    if not files:
        raise SystemExit(f"no {who}-nccl-*.csv under {out}: the sweep did not run")
    for path in files:
        for row in csv.DictReader(open(path)):
            if row["wrong"] != "0":
                raise SystemExit(f"{path}: wrong results at {row['size_bytes']} B")
            by_size.setdefault(int(row["size_bytes"]), []).append(float(row["time_us"]))
    return by_size


ours, theirs = rounds("ferrun"), rounds("torch")
print(f"{'size':>12} {'ferrun us':>10} {'torch us':>10} {'spread':>16} {'ratio':>6}")
bad = []
for size in sorted(theirs):
    if size not in ours:
        bad.append(size)
        continue
    o, t = statistics.median(ours[size]), statistics.median(theirs[size])
    ratio = t / o
    spread = f"{min(ours[size]):.0f}-{max(ours[size]):.0f}/{min(theirs[size]):.0f}-{max(theirs[size]):.0f}"
    print(f"{size:>12} {o:>10.1f} {t:>10.1f} {spread:>16} {ratio:>6.3f}")
    if ratio < goal:
        bad.append(size)
print(f"ratio goal {goal}: {'met' if not bad else 'missed at ' + ', '.join(map(str, bad))}")
sys.exit(1 if bad else 0)
