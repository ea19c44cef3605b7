#!/usr/bin/env bash
# Start, inspect and stop a local kvs cluster on 127.0.0.1.
#
#   tools/local-cluster.sh start [N] [BASE_PORT]   N nodes (default 3) on BASE_PORT.. (default 9001)
#   tools/local-cluster.sh status                  each node's /health
#   tools/local-cluster.sh stop                    SIGTERM every node it started, wait for exit
#
# Configs, data dirs, logs and pid files live in $KVS_CLUSTER_DIR (default ./local-cluster).
# Node 1 founds the cluster; every other node is seeded with node 1.
set -euo pipefail
dir=${KVS_CLUSTER_DIR:-./local-cluster}
cmd=${1:-}

health() { curl -fsS --max-time 1 "http://127.0.0.1:$1/health" 2>/dev/null; }

case "$cmd" in
start)
  n=${2:-3}
  base=${3:-9001}
  [[ "$n" =~ ^[1-9][0-9]*$ && "$base" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 start [N] [BASE_PORT]" >&2; exit 2; }
  if compgen -G "$dir/*/pid" >/dev/null; then echo "a cluster is already running in $dir; stop it first" >&2; exit 1; fi
  cargo build --release --quiet --bin kvs
  bin=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/kvs
  for i in $(seq 1 "$n"); do
    port=$((base + i - 1))
    node="$dir/node$i"
    mkdir -p "$node"
    seeds="[]"
    [ "$i" -gt 1 ] && seeds="[\"127.0.0.1:$base\"]"
    cat > "$node/config.yaml" <<CONF
node_id: node$i
port: $port
data_dir: ./data
seed_nodes: $seeds
gossip_interval_min: 1
gossip_interval_max: 2
failure_timeout: 10
removal_timeout: 30
sync_interval: 5
catchup_interval: 5
CONF
    "$bin" "$node/config.yaml" >>"$node/node.log" 2>&1 &
    echo $! > "$node/pid"
  done
  for i in $(seq 1 "$n"); do
    port=$((base + i - 1))
    for _ in $(seq 1 100); do health "$port" >/dev/null && break; sleep 0.1; done
    health "$port" >/dev/null || { echo "node$i did not come up; see $dir/node$i/node.log" >&2; exit 1; }
    echo "node$i  http://127.0.0.1:$port  log: $dir/node$i/node.log"
  done
  ;;
status)
  for node in "$dir"/node*; do
    [ -f "$node/config.yaml" ] || continue
    port=$(sed -n 's/^port: //p' "$node/config.yaml")
    printf '%s  %s\n' "$(basename "$node")" "$(health "$port" || echo down)"
  done
  ;;
stop)
  for pidfile in "$dir"/node*/pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$pidfile"
    echo "stopped $(basename "$(dirname "$pidfile")")"
  done
  ;;
*)
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
  ;;
esac
