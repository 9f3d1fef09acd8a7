#!/usr/bin/env bash
# One node, NPROC processes (one per GPU): the layout's tp*pp*dp must equal NPROC.
#   NPROC=8 launch/single_node.sh serve --tp 2 --pp 2 --ep 4 --dp 2 --model /ckpt
#   NPROC=4 launch/single_node.sh generate --tp 2 --pp 2 --prompt-ids 1,2,3 --json
# The first argument is the moerun command (serve or generate); the rest are its flags.
set -euo pipefail
cmd=${1:?usage: single_node.sh serve|generate FLAGS...}
shift
exec torchrun --standalone --nproc-per-node="${NPROC:-8}" -m "moerun.${cmd}" "$@"
