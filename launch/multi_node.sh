#!/usr/bin/env bash
# Several nodes with a static rendezvous: run this once on every node, the same flags
# everywhere, NODE_RANK 0 on the first host. Static ranks pin global rank 0 (the server's
# HTTP API and the engine's leader) to NODE_RANK 0, i.e. to MASTER_ADDR's host.
#   NNODES=2 NODE_RANK=0 NPROC=8 MASTER_ADDR=10.0.0.1 launch/multi_node.sh serve --tp 8 --pp 2 --ep 8 --model /ckpt
#   NNODES=2 NODE_RANK=1 NPROC=8 MASTER_ADDR=10.0.0.1 launch/multi_node.sh serve --tp 8 --pp 2 --ep 8 --model /ckpt
# Ranks fill nodes in order and tp is the fastest mesh axis, so a TP group stays inside a
# node when tp divides NPROC; pipeline stages (the slowest axis) are what cross nodes.
set -euo pipefail
cmd=${1:?usage: multi_node.sh serve|generate FLAGS...}
shift
exec torchrun --nnodes="${NNODES:?set NNODES}" --node-rank="${NODE_RANK:?set NODE_RANK}" \
    --nproc-per-node="${NPROC:-8}" --master-addr="${MASTER_ADDR:?set MASTER_ADDR}" \
    --master-port="${MASTER_PORT:-29500}" -m "moerun.${cmd}" "$@"
