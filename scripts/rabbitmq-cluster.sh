#!/usr/bin/env bash
# A three-node RabbitMQ cluster on one machine, for the cluster fault test
# (tests/tests/faults/cluster.rs) and for trying failover by hand. It needs
# only an installed RabbitMQ (Debian's rabbitmq-server package, or a generic
# Unix build with its sbin/ on PATH); it never touches the machine's own node
# (rabbit@<host> on 5672) and runs as whoever calls it.
#
#   scripts/rabbitmq-cluster.sh start DIR        start the nodes not running, cluster them
#   scripts/rabbitmq-cluster.sh stop DIR         stop every node (SIGTERM, then SIGKILL)
#   scripts/rabbitmq-cluster.sh stop-node N DIR  stop node N gracefully, as a rolling restart does
#   scripts/rabbitmq-cluster.sh kill-node N DIR  SIGKILL node N, as when its machine dies
#   scripts/rabbitmq-cluster.sh status DIR       which nodes run, and the cluster as node 1..3 sees it
#   scripts/rabbitmq-cluster.sh urls DIR         the AMQP URLs, comma-separated (AEGIS_AMQP_URL)
#   scripts/rabbitmq-cluster.sh ctl N DIR ARGS…  rabbitmqctl ARGS against node N
#
# Node N (1..3) is aegis-cN@localhost, takes AMQP on 127.0.0.1:$((BASE + N))
# and Erlang distribution on 127.0.0.1:$((BASE + 20000 + N)), where BASE is
# AEGIS_CLUSTER_BASE_PORT (5700). Everything else lives in DIR: a random
# Erlang cookie shared by the three (DIR/.erlang.cookie, HOME for every node
# and CLI call), each node's configuration, data, logs and pid file, and an
# empty plugin list (so no management or Prometheus listener can clash).
#
# `start` is idempotent: with no node of DIR running it wipes their data and
# forms a fresh cluster; otherwise it starts only the missing nodes, which
# rejoin with their data. Every step waits on a condition and fails loudly,
# with the end of the node's log, when it is not met in time. Exit status: 0
# done, 1 failed, 2 usage, 3 no RabbitMQ installed.
set -euo pipefail

NODES=(1 2 3)
BASE=${AEGIS_CLUSTER_BASE_PORT:-5700}
HOST=localhost
# How long a node may take to boot, and to stop before it is killed.
START_TIMEOUT=${AEGIS_CLUSTER_START_TIMEOUT:-90}
STOP_TIMEOUT=30

die() {
  echo "rabbitmq-cluster: ERROR: $*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

# The RabbitMQ scripts themselves, not Debian's /usr/sbin wrappers (which
# switch to the rabbitmq user and its cookie).
find_bin() {
  local candidate
  for candidate in "${RABBITMQ_BIN:-}" /usr/lib/rabbitmq/bin; do
    if [ -n "$candidate" ] && [ -x "$candidate/rabbitmq-server" ]; then
      echo "$candidate"
      return
    fi
  done
  candidate=$(command -v rabbitmq-server 2>/dev/null || true)
  if [ -n "$candidate" ] && ! grep -q 'su rabbitmq' "$candidate" 2>/dev/null; then
    dirname "$candidate"
    return
  fi
  echo "rabbitmq-cluster: ERROR: no RabbitMQ install found: install rabbitmq-server (Debian: apt-get install rabbitmq-server) or set RABBITMQ_BIN to its sbin directory" >&2
  exit 3
}

node_name() { echo "aegis-c$1@$HOST"; }
amqp_port() { echo $((BASE + $1)); }
dist_port() { echo $((BASE + 20000 + $1)); }

# The environment every node and CLI call of DIR runs in: nothing from
# /etc/rabbitmq (its env file names the machine's own node, its config file
# its listener), the cookie in DIR, Erlang distribution on loopback only.
node_env() {
  local n=$1 node_dir="$DIR/c$1"
  export HOME="$DIR"
  export RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf"
  export RABBITMQ_CONFIG_FILE="$node_dir/rabbitmq.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$node_dir/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins"
  export RABBITMQ_NODENAME
  RABBITMQ_NODENAME=$(node_name "$n")
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT
  RABBITMQ_NODE_PORT=$(amqp_port "$n")
  export RABBITMQ_DIST_PORT
  RABBITMQ_DIST_PORT=$(dist_port "$n")
  export RABBITMQ_MNESIA_BASE="$node_dir/mnesia"
  export RABBITMQ_LOG_BASE="$node_dir/log"
  export RABBITMQ_PID_FILE="$node_dir/rabbitmq.pid"
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export ERL_EPMD_ADDRESS=127.0.0.1
  unset ERL_FLAGS
}

# rabbitmqctl (or another CLI tool) against node N, in a subshell so the
# node's environment stays there.
cli() {
  local tool=$1 n=$2
  shift 2
  (node_env "$n" && "$BIN/$tool" -n "$(node_name "$n")" "$@")
}

# Node N's pid, from its pid file, if that process is node N's: a pid file
# left by a run that was killed (or on a machine booted again) may name a
# pid reused since by another process, which `stop` must not signal. The
# launcher and the VM both carry the node's environment.
pid_of() {
  local pid_file pid
  for pid_file in "$DIR/c$1/rabbitmq.pid" "$DIR/c$1/launcher.pid"; do
    [ -s "$pid_file" ] || continue
    pid=$(cat "$pid_file")
    if kill -0 "$pid" 2>/dev/null &&
      tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "RABBITMQ_MNESIA_BASE=$DIR/c$1/mnesia"; then
      echo "$pid"
      return 0
    fi
  done
  return 1
}

# Whether node N's Erlang VM is alive (by its pid file, not by asking it).
alive() {
  local pid
  pid=$(pid_of "$1") || return 1
  kill -0 "$pid" 2>/dev/null
}

# Whether node N runs the rabbit application (the broker is up).
running() {
  alive "$1" && cli rabbitmq-diagnostics "$1" -q check_running >/dev/null 2>&1
}

log_tail() {
  local n=$1
  echo "---- end of the log of $(node_name "$n") ----" >&2
  tail -n 30 "$DIR/c$n/stdout.log" "$DIR/c$n"/log/*.log 2>/dev/null >&2 || true
  echo "----" >&2
}

prepare_dir() {
  mkdir -p "$DIR"
  if ! [ -s "$DIR/.erlang.cookie" ]; then
    (umask 077 && head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/.erlang.cookie")
  fi
  chmod 400 "$DIR/.erlang.cookie"
  echo "[]." >"$DIR/enabled_plugins"
  : >"$DIR/rabbitmq-env.conf"
  local n
  for n in "${NODES[@]}"; do
    mkdir -p "$DIR/c$n/log"
    # Nothing beyond the defaults: the listener and the distribution port
    # come from the environment (node_env).
    echo "log.file.level = info" >"$DIR/c$n/rabbitmq.conf"
  done
}

port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

check_ports() {
  local n=$1 port
  for port in "$(amqp_port "$n")" "$(dist_port "$n")"; do
    port_free "$port" ||
      die "127.0.0.1:$port (for $(node_name "$n")) is taken by another process; stop it, or set AEGIS_CLUSTER_BASE_PORT"
  done
}

start_node() {
  local n=$1
  rm -f "$DIR/c$n/rabbitmq.pid"
  echo "starting $(node_name "$n") on 127.0.0.1:$(amqp_port "$n")"
  # Its own session, so signals for the caller's process group leave it
  # alone: only `stop` (or kill-node) ends it. Until the node writes its pid
  # file, the launcher's pid (whose SIGTERM stops the node) stands in for it.
  (node_env "$n" && exec setsid "$BIN/rabbitmq-server" >"$DIR/c$n/stdout.log" 2>&1 </dev/null) &
  echo $! >"$DIR/c$n/launcher.pid"
}

# Waits for node N's AMQP listener (a cheap poll: a CLI call starts an Erlang
# VM, which would take CPU from the booting nodes), then for the broker to
# say it has booted.
await_node() {
  local n=$1 deadline=$((SECONDS + START_TIMEOUT))
  until ! port_free "$(amqp_port "$n")" && alive "$n"; do
    if ! alive "$n"; then
      log_tail "$n"
      die "$(node_name "$n") exited while starting"
    fi
    if ((SECONDS > deadline)); then
      log_tail "$n"
      die "$(node_name "$n") did not start within ${START_TIMEOUT} s"
    fi
    sleep 0.2
  done
  if ! cli rabbitmqctl "$n" -q await_startup --timeout "$START_TIMEOUT" >/dev/null; then
    log_tail "$n"
    die "$(node_name "$n") did not finish booting within ${START_TIMEOUT} s"
  fi
  echo "$(node_name "$n") is up"
}

# Whether node N is among the running nodes of node 1's cluster.
clustered_with_first() {
  cli rabbitmqctl 1 -q cluster_status --formatter json 2>/dev/null |
    tr -d ' \n' | grep -o '"running_nodes":\[[^]]*\]' | grep -q "\"$(node_name "$1")\""
}

cmd_start() {
  prepare_dir
  local n any_alive=false
  for n in "${NODES[@]}"; do
    if alive "$n"; then any_alive=true; fi
  done
  if ! $any_alive; then
    # A fresh cluster: old data would make each node wait for the peers it
    # last saw, which are not running either.
    for n in "${NODES[@]}"; do
      rm -rf "$DIR/c$n/mnesia" "$DIR/c$n/log"/* "$DIR/c$n/stdout.log"
    done
  fi
  for n in "${NODES[@]}"; do
    alive "$n" || check_ports "$n"
  done
  for n in "${NODES[@]}"; do
    alive "$n" || start_node "$n"
  done
  for n in "${NODES[@]}"; do
    await_node "$n"
  done
  for n in "${NODES[@]:1}"; do
    if clustered_with_first "$n"; then
      continue
    fi
    echo "joining $(node_name "$n") to $(node_name 1)"
    # The CLI logs harmless errors while the node is between stop_app and
    # start_app; they are shown only when a step fails.
    local out="$DIR/c$n/join.log"
    if ! { cli rabbitmqctl "$n" -q stop_app &&
      cli rabbitmqctl "$n" -q join_cluster "$(node_name 1)" &&
      cli rabbitmqctl "$n" -q start_app; } >"$out" 2>&1; then
      cat "$out" >&2
      log_tail "$n"
      die "$(node_name "$n") could not join $(node_name 1)"
    fi
    clustered_with_first "$n" || die "$(node_name "$n") joined but does not run in the cluster"
  done
  echo "cluster up: $(cmd_urls)"
}

# Waits up to STOP_TIMEOUT for node N's VM to end, then kills it.
reap() {
  local n=$1 pid=$2 deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS > deadline)); then
      echo "$(node_name "$n") did not stop within ${STOP_TIMEOUT} s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    sleep 0.2
  done
  rm -f "$DIR/c$n/rabbitmq.pid" "$DIR/c$n/launcher.pid"
}

# SIGTERM: the node shuts down cleanly (connections closed, queues' state on disk).
cmd_stop_node() {
  local n=$1 pid
  if ! pid=$(pid_of "$n") || ! kill -0 "$pid" 2>/dev/null; then
    echo "$(node_name "$n") is not running"
    return
  fi
  echo "stopping $(node_name "$n") (pid $pid)"
  kill -TERM "$pid"
  reap "$n" "$pid"
  echo "$(node_name "$n") stopped"
}

cmd_kill_node() {
  local n=$1 pid
  if ! pid=$(pid_of "$n") || ! kill -0 "$pid" 2>/dev/null; then
    die "$(node_name "$n") is not running"
  fi
  echo "killing $(node_name "$n") (pid $pid)"
  kill -KILL "$pid"
  reap "$n" "$pid"
}

# Every node at once: one by one, each would wait for the others to notice.
cmd_stop() {
  local n pid pids=()
  for n in "${NODES[@]}"; do
    pids[n]=""
    if pid=$(pid_of "$n") && kill -0 "$pid" 2>/dev/null; then
      echo "stopping $(node_name "$n") (pid $pid)"
      kill -TERM "$pid"
      pids[n]=$pid
    fi
  done
  for n in "${NODES[@]}"; do
    if [ -n "${pids[n]}" ]; then
      reap "$n" "${pids[n]}"
    fi
  done
  echo "stopped"
}

cmd_status() {
  local n
  for n in "${NODES[@]}"; do
    if running "$n"; then
      echo "$(node_name "$n"): running, amqp://127.0.0.1:$(amqp_port "$n")"
    elif alive "$n"; then
      echo "$(node_name "$n"): VM alive, broker not running"
    else
      echo "$(node_name "$n"): stopped"
    fi
  done
  for n in "${NODES[@]}"; do
    if running "$n"; then
      cli rabbitmqctl "$n" cluster_status
      return
    fi
  done
}

cmd_urls() {
  local n urls=()
  for n in "${NODES[@]}"; do
    urls+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2f")
  done
  (IFS=,; echo "${urls[*]}")
}

node_arg() {
  case "${1:-}" in
    1 | 2 | 3) ;;
    *) die "node must be 1, 2 or 3 (got '${1:-}')" ;;
  esac
}

command=${1:-}
[ -n "$command" ] || usage
shift
case "$command" in
  stop-node | kill-node | ctl)
    node_arg "${1:-}"
    N=$1
    DIR=${2:-}
    [ -n "$DIR" ] || usage
    shift 2
    ;;
  start | stop | status | urls)
    DIR=${1:-}
    [ -n "$DIR" ] || usage
    shift
    ;;
  *) usage ;;
esac
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
[ "$command" = urls ] || BIN=$(find_bin)

case "$command" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  stop-node) cmd_stop_node "$N" ;;
  kill-node) cmd_kill_node "$N" ;;
  status) cmd_status ;;
  urls) cmd_urls ;;
  ctl) cli rabbitmqctl "$N" "$@" ;;
esac
