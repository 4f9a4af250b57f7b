#!/usr/bin/env bash
# Makes sure PostgreSQL (127.0.0.1:5432) and RabbitMQ (127.0.0.1:5672) are up,
# starting the machine's own installs when they are not, and that Node.js is
# there for the signature-snippet test, and Go for the Go snippet. Fails loudly
# when a service cannot start.
set -euo pipefail

wait_for() {
  local name=$1 check=$2
  for _ in $(seq 1 60); do
    if eval "$check" >/dev/null 2>&1; then
      echo "$name is up"
      return 0
    fi
    sleep 1
  done
  echo "ERROR: $name did not come up within 60 s" >&2
  return 1
}

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
fi
wait_for PostgreSQL "pg_isready -h 127.0.0.1 -p 5432 -q"

if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  echo "starting RabbitMQ"
  rabbitmq-server -detached
fi
wait_for RabbitMQ "rabbitmq-diagnostics -q ping"

# A node can answer pings and still refuse every quorum queue with
# at-least-once dead-lettering (ours): once its dead-letter supervisor has
# stopped (rabbitmq-server#16652; seen here after a queue was deleted while
# the broker restarted), declaring one fails with INTERNAL_ERROR until the
# node restarts, and every test would wait for the broker until CI's time
# ran out. Restart such a node first.
dead_letter_supervisor() {
  rabbitmqctl -q eval 'whereis(rabbit_fifo_dlx_sup).' 2>/dev/null
}
# Twice at most: queues whose deletion the first start finishes can stop it
# again (seen here); by the second they are gone.
for _ in 1 2; do
  [ "$(dead_letter_supervisor)" = undefined ] || break
  echo "RabbitMQ's dead-letter supervisor has stopped; restarting RabbitMQ"
  rabbitmqctl -q stop >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do
    rabbitmq-diagnostics -q ping >/dev/null 2>&1 || break
    sleep 1
  done
  rabbitmq-server -detached
  wait_for RabbitMQ "rabbitmqctl -q await_startup"
  # Its queues come back after start-up, and a deletion left over finishes
  # then: nothing to wait on says when, so a pause, on this rare path only.
  sleep 10
done
if [ "$(dead_letter_supervisor)" = undefined ]; then
  echo "ERROR: RabbitMQ's dead-letter supervisor is still stopped after two restarts" >&2
  exit 1
fi

if ! command -v node >/dev/null 2>&1; then
  echo "installing Node.js (the seed's verification snippet runs in it)"
  apt-get update -qq && apt-get install -y -qq nodejs
fi

# Debian's Go (1.19 on bookworm) runs the docs' Go snippet: an old Go, so a
# standard-library call newer than the page's promise (1.18) fails to build.
if ! command -v go >/dev/null 2>&1; then
  echo "installing Go (the docs' Go verification snippet runs in it)"
  apt-get update -qq && apt-get install -y -qq golang-go
fi

# The browser tests: Debian's Chromium, driven by playwright-core, and axe-core
# for the pages' accessibility checks (both pinned in
# tests/browser/package-lock.json; playwright-core never downloads a browser of
# its own). Each is looked for, so a tree installed before one was added gets it.
if ! [ -x /usr/bin/chromium ]; then
  echo "installing Chromium (the browser tests run in it)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
if ! [ -f tests/browser/node_modules/playwright-core/package.json ] ||
  ! [ -f tests/browser/node_modules/axe-core/axe.min.js ]; then
  echo "installing the browser tests' npm packages"
  npm ci --prefix tests/browser --no-audit --no-fund
fi
