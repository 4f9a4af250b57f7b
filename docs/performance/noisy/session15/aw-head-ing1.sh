#!/bin/bash
# experiment: the ingester on one tokio worker thread, every other role as built
for arg in "$@"; do [ "$arg" = ingester ] && export TOKIO_WORKER_THREADS=1; done
exec /tmp/aw-head "$@"
