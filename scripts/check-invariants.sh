#!/usr/bin/env bash
# The architecture's invariants that a dependency tree can show (ARCHITECTURE.md):
# core knows no transport, only the worker can send HTTP requests, and the
# receivers' verifier crate brings nothing but hashing, encoding and
# constant-time comparison into a customer's service.
set -euo pipefail

forbid() {
  local crate=$1 dependency=$2
  if cargo tree -p "$crate" -i "$dependency" -e normal >/dev/null 2>&1; then
    echo "INVARIANT BROKEN: $crate depends on $dependency" >&2
    cargo tree -p "$crate" -i "$dependency" -e normal >&2
    exit 1
  fi
}

for transport in axum async-graphql reqwest hyper; do
  forbid aegis-webhook-core "$transport"
done
forbid aegis-webhook-api reqwest
forbid aegis-webhook-ingester reqwest
forbid aegis-webhook-ingester axum
forbid aegis-webhook-worker async-graphql
for heavy in tokio futures sea-orm sqlx lapin opentelemetry tracing serde aegis-webhook-core; do
  forbid aegis-webhook-verify "$heavy"
done
echo "invariants hold"
