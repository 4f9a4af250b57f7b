#!/usr/bin/env bash
# The architecture's invariants that a dependency tree can show (ARCHITECTURE.md):
# core knows no transport, database or broker, each adapter crate only its
# own, only the worker can send HTTP requests, and the
# receivers' verifier crate brings nothing but hashing, encoding and
# constant-time comparison into a customer's service; and what a grep can
# show: the portal's data path, the roles' supervised message tasks.
set -euo pipefail

forbid() {
  local crate=$1 dependency=$2
  if cargo tree -p "$crate" -i "$dependency" -e normal >/dev/null 2>&1; then
    echo "INVARIANT BROKEN: $crate depends on $dependency" >&2
    cargo tree -p "$crate" -i "$dependency" -e normal >&2
    exit 1
  fi
}

# Core is the domain and its ports: no transport, no database, no broker.
for outside in axum async-graphql reqwest hyper sea-orm sqlx lapin; do
  forbid aegis-webhook-core "$outside"
done
# Each adapter is only itself: storage knows no broker, the broker adapter no database.
for outside in lapin axum async-graphql reqwest; do
  forbid aegis-webhook-storage "$outside"
done
for outside in sea-orm sqlx axum async-graphql reqwest; do
  forbid aegis-webhook-rabbitmq "$outside"
done
# Only the binary assembles the broker adapter into processes.
for role in aegis-webhook-api aegis-webhook-ingester aegis-webhook-worker; do
  forbid "$role" lapin
done
forbid aegis-webhook-api reqwest
forbid aegis-webhook-ingester reqwest
forbid aegis-webhook-ingester axum
forbid aegis-webhook-worker async-graphql
forbid aegis-webhook-worker axum
for heavy in tokio futures sea-orm sqlx lapin opentelemetry tracing serde aegis-webhook-core; do
  forbid aegis-webhook-verify "$heavy"
done
# The portal adds no data path: its pages read and change a tenant's data only
# through the use cases (api::actions), as GraphQL does; from storage it takes
# types and its own sessions, never a query.
portal_queries=$(grep -rnE 'sea_orm|(deliveries|webhooks|events|tenants|audit)::[a-z_]+\(' \
  crates/aegis-webhook-api/src/portal || true)
if [ -n "$portal_queries" ]; then
  echo "INVARIANT BROKEN: the portal queries storage itself instead of calling api::actions:" >&2
  echo "$portal_queries" >&2
  exit 1
fi
# Every task a role spawns for its messages is supervised
# (queue::consume::MessageTasks): under a bare tracker a panic would leave
# its message, and its slot, held for good.
# A file's tests (from its `#[cfg(test)]` on) may spawn as they like.
bare_spawns=$(for file in $(find crates/aegis-webhook-ingester/src crates/aegis-webhook-worker/src -name '*.rs'); do
  awk -v file="$file" '/^#\[cfg\(test\)\]/ { exit } /TaskTracker|JoinSet|tokio::spawn|tokio::task::spawn|spawn_local|spawn_blocking|std::thread::spawn/ { print file ":" FNR ": " $0 }' "$file"
done)
if [ -n "$bare_spawns" ]; then
  echo "INVARIANT BROKEN: a role spawns a task outside MessageTasks:" >&2
  echo "$bare_spawns" >&2
  exit 1
fi
echo "invariants hold"
