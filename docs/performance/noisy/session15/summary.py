"""One line per noisy report: A's rate, B's p99/max, B while A published and after, the ingester's CPU."""
import re, sys, glob
def rate(text, who):
    m = re.search(r"^  tenant %s .*\n\s+(\d+) deliveries/s" % who, text, re.M)
    return int(m.group(1)) if m else None
for path in sys.argv[1:]:
    t = open(path).read()
    a = rate(t, "A")
    b = re.search(r"^  tenant B .*\n.*latency p50 ([\d.]+) ms, p90 [\d.]+ ms, p99 ([\d.]+) ms, max ([\d.]+) ms", t, re.M)
    w = re.search(r"while A was publishing: p50 ([\d.]+) ms, p90 [\d.]+ ms, p99 [\d.]+ ms, max ([\d.]+) ms \((\d+) deliveries\); after: p50 [\d.]+ ms, p90 [\d.]+ ms, p99 ([\d.]+) ms, max ([\d.]+) ms", t)
    ing = re.search(r"ingester \(pid \d+\)\s+([\d.]+)", t) or re.search(r"aegis-webhook \(pid \d+\)\s+([\d.]+)", t)
    thr = re.search(r"^  throughput\s+(\d+) deliveries/s", t, re.M)
    name = path.split("/")[-1].replace(".txt", "")
    if b:
        print(f"{name:14} A {a:>5}/s  B p50 {b.group(1):>5} p99 {b.group(2):>6} max {b.group(3):>6}  while A published: p50 {w.group(1):>5} max {w.group(2):>6} ({w.group(3)})  after: p99 {w.group(4):>5} max {w.group(5):>5}  cpu {ing.group(1) if ing else '-'}")
    else:
        print(f"{name:14} burst {thr.group(1) if thr else '?'}/s  cpu {ing.group(1) if ing else '-'}")
