#!/bin/bash
# perf-record the ingester of the next benchmark run for its first $1 seconds
for i in $(seq 1 600); do
  pid=$(pgrep -f 'aegis-webhook ingester' | head -1)
  [ -n "$pid" ] && break
  sleep 0.05
done
perf record -F 2000 -g --call-graph dwarf,16384 -p $pid -o $2 -- sleep $1 >/dev/null 2>&1
