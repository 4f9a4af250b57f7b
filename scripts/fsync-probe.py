#!/usr/bin/env python3
"""Measures the disk's flush beside a benchmark: writes 8 KiB to FILE and
fdatasyncs it every 10 ms for SECONDS, prints each flush slower than 10 ms
with its UTC time (to match with a report's `slowest` list), then the
percentiles. Put FILE on the disk PostgreSQL and RabbitMQ write to.

    python3 scripts/fsync-probe.py /var/lib/postgresql/15/main/probe.tmp 45
"""
import datetime
import os
import sys
import time

path, seconds = sys.argv[1], float(sys.argv[2])
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
block = os.urandom(8192)
end = time.monotonic() + seconds
took = []
while time.monotonic() < end:
    start = time.monotonic()
    os.pwrite(fd, block, 0)
    os.fdatasync(fd)
    ms = (time.monotonic() - start) * 1000
    took.append(ms)
    if ms > 10:
        now = datetime.datetime.now(datetime.timezone.utc)
        print(now.strftime("%H:%M:%S.%f")[:-3], f"{ms:.1f} ms", flush=True)
    time.sleep(0.01)
os.close(fd)
os.unlink(path)
took.sort()
print(f"flushes {len(took)} p50 {took[len(took) // 2]:.2f} p99 {took[int(len(took) * 0.99)]:.2f} max {took[-1]:.1f} ms")
