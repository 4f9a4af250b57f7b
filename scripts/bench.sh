#!/usr/bin/env bash
# Reproduces the figures of docs/performance.md: makes sure PostgreSQL and
# RabbitMQ are up, builds the release binaries, then runs every scenario in
# both modes. Each run writes its JSON report and its text summary to the
# output folder (default bench-results/<UTC time>/, git-ignored).
#
#   scripts/bench.sh [OUTPUT_DIR [SECTION...]]
#
# SECTIONs, all of them by default but the last: burst, steady, slow, noisy,
# portal, memory (the 10-minute steady run); and retention, which runs
# ${PAIRS:-3} pairs of 10-minute steady runs, with a two-minute retention and
# without, alternating which goes first (about 22 minutes a pair).
# `scripts/bench.sh out burst steady` runs the Svix comparison's two load
# shapes, both modes, in about 6 minutes.
#
# Exits 1 when any run lost or mis-signed a delivery; the other runs still go.
# Each run may take up to 10 minutes (--timeout 600s); the last one, the
# 10-minute steady run, takes 10. The whole script takes about 17 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/aegis-target}"
known=(burst steady slow noisy portal memory retention)
is_section() { [[ " ${known[*]} " == *" $1 "* ]]; }
if [ $# -gt 0 ] && is_section "$1"; then
  echo "'$1' is a section: name the output folder first (scripts/bench.sh OUTPUT_DIR $*)" >&2
  exit 2
fi
out="${1:-bench-results/$(date -u +%Y%m%dT%H%M%SZ)}"
shift || true
sections=("$@")
if [ ${#sections[@]} -eq 0 ]; then sections=(burst steady slow noisy portal memory); fi
for section in "${sections[@]}"; do
  if ! is_section "$section"; then
    echo "unknown section '$section' (${known[*]})" >&2
    exit 2
  fi
done
pairs=${PAIRS:-3}
if ! [[ $pairs =~ ^[1-9][0-9]*$ ]]; then
  echo "PAIRS must be a whole number of at least 1, not '$pairs'" >&2
  exit 2
fi
wanted() { [[ " ${sections[*]} " == *" $1 "* ]]; }
mkdir -p "$out"

scripts/services.sh
cargo build --release -p aegis-webhook -p aegis-webhook-bench
bench="$CARGO_TARGET_DIR/release/aegis-bench"

status=0
run() {
  local name=$1
  shift
  echo "== $name: aegis-bench $*"
  if ! "$bench" --timeout "${timeout:-600s}" --json "$out/$name.json" "$@" | tee "$out/$name.txt"; then
    echo "!! $name failed (see above)" >&2
    status=1
  fi
}

# (a) burst: 2,000 events × 10 webhooks, as fast as possible.
if wanted burst; then
  run embedded-burst --mode embedded --scenario burst
  run production-burst-amqp --mode production --scenario burst --via amqp
  run production-burst-http --mode production --scenario burst --via http
fi

# (b) steady: 100 events/s for 30 s to one webhook.
if wanted steady; then
  run embedded-steady --mode embedded --scenario steady
  run production-steady-amqp --mode production --scenario steady --via amqp
  run production-steady-http --mode production --scenario steady --via http
fi

# (c) slow receivers: every response 200 ms late; throughput against
# workers × concurrency ÷ 200 ms as concurrency and worker processes grow. The
# scenario has two webhooks, so each run lifts the per-webhook cap to the
# worker's concurrency: what is measured is the worker, not that cap.
slow() {
  local name=$1 concurrency=$2
  shift 2
  run "$name" --scenario slow --concurrency "$concurrency" --set "AEGIS_WEBHOOK_CONCURRENCY=$concurrency" "$@"
}
if wanted slow; then
  slow embedded-slow-c256 256 --mode embedded --events 2000
  slow production-slow-c256-w1 256 --mode production --workers 1 --events 2000
  slow production-slow-c256-w2 256 --mode production --workers 2 --events 4000
  slow production-slow-c1000-w1 1000 --mode production --workers 1 --events 5000
  slow production-slow-c2000-w1 2000 --mode production --workers 1 --events 10000
fi

# (d) noisy: tenant A floods 20,000 events × 10 webhooks while tenant B sends
# 10 events/s to one; fairness on, then off (first in, first out), and A's
# flood alone for its throughput's comparison (docs/performance.md, "Fair
# sharing between tenants").
for mode in embedded production; do
  if ! wanted noisy; then break; fi
  run "$mode-noisy-fair" --mode "$mode" --scenario noisy
  run "$mode-noisy-fifo" --mode "$mode" --scenario noisy --set AEGIS_FAIRNESS=off
  run "$mode-burst-20000x10" --mode "$mode" --scenario burst --events 20000
done

# (e) the customer portal: 10,000 deliveries to one webhook, then its pages
# timed (docs/performance.md, "The portal's pages").
if wanted portal; then
  for mode in embedded production; do run "$mode-portal" --mode "$mode" --scenario portal; done
fi

# Memory over time: 10 minutes of the steady scenario; compare its peak RSS
# with the 30 s run's (flat memory: about the same).
if wanted memory; then
  timeout=900s run production-steady-10min --mode production --scenario steady --via amqp --duration 600s
fi

# Retention's cost to latency (docs/performance.md, "Data retention"): the
# same 10-minute steady run with a two-minute retention (a partition dropped
# and its events deleted every minute) and without (passes that find
# nothing), in pairs whose order alternates, so that a drift of the machine
# over the hour weighs on both sides. Run it with the server's autovacuum on,
# as in production (aegis-bench warns when it is off).
if wanted retention; then
  with=(--set AEGIS_RETENTION=2m --set AEGIS_RETENTION_MIN=1m --set AEGIS_RETENTION_MAX=2m --set AEGIS_PARTITION_WIDTH=1m)
  for pair in $(seq 1 "$pairs"); do
    order=(with without)
    if [ $((pair % 2)) -eq 0 ]; then order=(without with); fi
    for side in "${order[@]}"; do
      settings=(--set AEGIS_EXPIRY_INTERVAL=10s)
      if [ "$side" = with ]; then settings+=("${with[@]}"); fi
      timeout=900s run "retention-pair$pair-$side" --mode production --scenario steady --via amqp \
        --rate 100 --duration 10m "${settings[@]}"
    done
  done
fi

echo "reports in $out"
exit "$status"
