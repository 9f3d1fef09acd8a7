#!/usr/bin/env bash
# Several nodes with c10d rendezvous (elastic: nodes may start in any order, a node that
# restarts rejoins): run it on every node with the same RDZV_ENDPOINT and RDZV_ID.
#   NNODES=2 NPROC=8 RDZV_ENDPOINT=10.0.0.1:29400 launch/multi_node_c10d.sh generate --tp 8 --pp 2 ...
# Which node gets global rank 0 is decided by the rendezvous, not by the host: for
# `serve`, whose HTTP API lives on rank 0, prefer launch/multi_node.sh (static ranks).
set -euo pipefail
cmd=${1:?usage: multi_node_c10d.sh serve|generate FLAGS...}
shift
exec torchrun --nnodes="${NNODES:?set NNODES}" --nproc-per-node="${NPROC:-8}" \
    --rdzv-backend=c10d --rdzv-endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT host:port}" \
    --rdzv-id="${RDZV_ID:-moerun}" -m "moerun.${cmd}" "$@"
