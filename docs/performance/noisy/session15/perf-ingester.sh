#!/bin/bash
# perf-profile (or, with MODE=stat, count) the ingester for the first 1.5 s of a production noisy run's flood
out=$1; shift
cd /tmp/s15
/tmp/ab-base --bin ${BIN:-/tmp/aw-base} --mode production --scenario noisy --json $out.json "$@" > $out.txt 2>&1 &
bench=$!
for i in $(seq 1 400); do pid=$(pgrep -f "aw-.* ingester" | head -1); [ -n "$pid" ] && break; sleep 0.05; done
echo "ingester pid $pid"
# wait until the ingester uses CPU (the flood starts), sampling /proc
prev=$(awk '{print $14+$15}' /proc/$pid/stat)
for i in $(seq 1 600); do sleep 0.02; cur=$(awk '{print $14+$15}' /proc/$pid/stat); [ $((cur-prev)) -ge 1 ] && break; prev=$cur; done
echo "flood at $(date +%T.%N)"
# MODE=stat counts context switches, migrations and CPU time per thread
# instead of sampling (stat-head-1, stat-ing1-1)
if [ "${MODE:-record}" = stat ]; then
  perf stat -e context-switches,cpu-migrations,task-clock --per-thread -p $pid -o $out.stat.txt -- sleep 1.5 2>&1 | tail -1
else
  perf record -F 4000 -p $pid -o $out.perf.data -- sleep 1.5 2>&1 | tail -1
fi
wait $bench
