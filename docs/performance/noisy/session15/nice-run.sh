#!/bin/bash
# production noisy run with chosen processes' threads reniced once they start
# usage: nice-run.sh OUT WHAT(ingester|beam|worker|none) NICE
out=$1; what=$2; n=$3
cd /tmp/s15
/tmp/ab-base --bin ${BIN:-/tmp/aw-base} --mode production --scenario noisy --json $out.json > $out.txt 2>&1 &
bench=$!
for i in $(seq 1 400); do pid=$(pgrep -f "aw-.* ingester" | head -1); [ -n "$pid" ] && break; sleep 0.05; done
sleep 0.5
case $what in
  ingester) pids=$(pgrep -f "aw-.* ingester");;
  worker) pids=$(pgrep -f "aw-.* worker");;
  beam) pids=$(pgrep beam.smp);;
  *) pids="";;
esac
for p in $pids; do for t in /proc/$p/task/*; do tid=${t##*/}; name=$(cat $t/comm); case $name in aegis-bulk*) ;; *) renice -n $n -p $tid >/dev/null;; esac; done; done
echo "$what $n: $(for p in $pids; do ls /proc/$p/task | wc -l; done) threads"
wait $bench
grep -E "tenant A|tenant B" -A2 $out.txt | grep -E "deliveries/s|while A" | sed 's/^ *//' | cut -c1-250
