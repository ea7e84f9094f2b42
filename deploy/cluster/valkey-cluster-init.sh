#!/bin/sh
# One-shot: joins six empty Valkey nodes into a cluster of three masters with one replica
# each (`valkey-cli --cluster create ... --cluster-replicas 1`), then waits until every node
# knows all six and reports cluster_state:ok. Run by the valkey-cluster-init service of docker-compose.yml in
# this folder, after every node is healthy.
#
# Safe to run again (a `docker compose up` after a restart or a `down` without -v runs it
# every time): once any node is in a cluster nothing is created, the script only waits until
# all nodes know each other and report cluster_state:ok (after a failover the masters are
# other nodes than at creation, which is fine). Only when every node is alone and empty is
# the cluster created. A partial cluster (a node left out, say on a fresh volume) ends the
# wait with an error instead of a guess: repair it by hand with `valkey-cli --cluster fix` /
# `--cluster add-node`.
#
# VALKEY_CLUSTER_INIT_NODES: the nodes as space-separated host:port (default: the six compose
# services). VALKEY_CLUSTER_INIT_WAIT: seconds to wait for cluster_state:ok (default 60).
# VALKEY_PASSWORD: passed to valkey-cli (REDISCLI_AUTH) when set.
set -eu

nodes=${VALKEY_CLUSTER_INIT_NODES:-"valkey-1:6379 valkey-2:6379 valkey-3:6379 valkey-4:6379 valkey-5:6379 valkey-6:6379"}
wait_s=${VALKEY_CLUSTER_INIT_WAIT:-60}
if [ -n "${VALKEY_PASSWORD:-}" ]; then
  REDISCLI_AUTH=$VALKEY_PASSWORD
  export REDISCLI_AUTH
fi

say() { echo "valkey-cluster-init: $*"; }
cli() { # cli host:port args...
  node=$1
  shift
  valkey-cli -h "${node%:*}" -p "${node##*:}" "$@"
}
info_field() { # info_field host:port field -> value of `field` in CLUSTER INFO
  cli "$1" cluster info | tr -d '\r' | sed -n "s/^$2://p"
}

count=0
for node in $nodes; do
  count=$((count + 1))
  tries=0
  until cli "$node" ping 2>/dev/null | grep -q PONG; do
    tries=$((tries + 1))
    [ "$tries" -lt "$wait_s" ] || { say "$node does not answer PING"; exit 1; }
    sleep 1
  done
  [ "$(info_field "$node" cluster_enabled 2>/dev/null || true)" != 0 ] ||
    { say "$node runs without --cluster-enabled yes"; exit 1; }
done

# How many nodes each node knows: 1 = itself only, more = it is part of a cluster.
clustered=0
empty=0
for node in $nodes; do
  known=$(info_field "$node" cluster_known_nodes)
  if [ "$known" -gt 1 ]; then
    clustered=$((clustered + 1))
  elif [ "$(cli "$node" dbsize | tr -d '\r')" = 0 ]; then
    empty=$((empty + 1))
  fi
done

if [ "$clustered" -gt 0 ]; then
  say "$clustered of $count nodes are in a cluster already: not creating it again"
elif [ "$empty" = "$count" ]; then
  # CLUSTER MEET takes addresses, not host names: resolve the compose service names. The
  # nodes announce their names (cluster-announce-hostname), so clients still see names.
  addrs=""
  for node in $nodes; do
    host=${node%:*}
    ip=$(getent hosts "$host" | awk '{ print $1; exit }')
    [ -n "$ip" ] || { say "$host does not resolve"; exit 1; }
    addrs="$addrs $ip:${node##*:}"
  done
  say "creating the cluster:$addrs"
  # shellcheck disable=SC2086 # one argument per address
  valkey-cli --cluster create $addrs --cluster-replicas 1 --cluster-yes
else
  say "no node is in a cluster but $((count - empty)) hold data: not creating a cluster over" \
    "them (start from empty volumes, or join them by hand)"
  exit 1
fi

# Formed: every node knows every other one (gossip spreads that within seconds of a create)
# and reports cluster_state:ok. A node left out (an empty one beside a formed cluster) never
# gets there: the wait ends with a repair hint instead.
for node in $nodes; do
  tries=0
  until [ "$(info_field "$node" cluster_known_nodes)" = "$count" ] &&
    [ "$(info_field "$node" cluster_state)" = ok ]; do
    tries=$((tries + 1))
    [ "$tries" -lt "$wait_s" ] || {
      say "$node: knows $(info_field "$node" cluster_known_nodes) of $count nodes," \
        "cluster_state $(info_field "$node" cluster_state) after ${wait_s}s: a partial cluster;" \
        "repair it with valkey-cli --cluster fix / add-node (or start from empty volumes)"
      exit 1
    }
    sleep 1
  done
done
say "all $count nodes know each other, cluster_state:ok"
