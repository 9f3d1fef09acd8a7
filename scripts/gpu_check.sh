#!/usr/bin/env bash
# The GPU checks in one command, on a machine with a CUDA GPU (H100 / H200): about 10 minutes.
#
#     bash scripts/gpu_check.sh                  # writes gpu_check_out/<UTC time>/
#     bash scripts/gpu_check.sh OUT_DIR          # or there
#     PYTHON=/path/to/python bash scripts/gpu_check.sh
#
# Parts, each under its own `timeout` and a total budget (GPU_CHECK_BUDGET_S, default 570 s),
# each writing its log to OUT_DIR/<part>.log:
#   tests          the GPU test subset (kernels compiled for this GPU, align stress test,
#                  paged attention, the model with the Triton kernels vs transformers)
#   bench_kernels  scripts/bench_kernels.py --quick (fused MoE vs the per-expert loop and
#                  torch._grouped_mm, next to this GPU's matmul and copy peaks)
#   bench_attention scripts/bench_attention.py (the paged kernel vs gather + SDPA)
#   tune_ep1/ep8   scripts/tune_fused_moe.py for seed-30b at EP 1 and 8 (quick grid; the
#                  configs it writes are copied to OUT_DIR/configs/)
#   tiny_*         the tiny preset on this GPU through `moerun generate --stats` (bf16, 32
#                  requests x 32+64 tokens), eager and graphs (bench.py's offline section
#                  runs on the CPU, so it is not the GPU check)
#   bench_30b_*    scripts/bench.py --section strategy --strategy optimized --quick: one
#                  rank's seed-30b shard at the layout's per-rank batch, eager and graphs
# Eager runs pass --enforce-eager where the engine has it (the CUDA-graph engine); without
# it only the default run happens and eager_skipped.txt says so.
# A part that fails or times out is recorded and the rest still run; summary.md lists every
# part's exit status and seconds. Exit status: 0 when every part passed, else 1.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
OUT="${1:-gpu_check_out/$(date -u +%Y%m%dT%H%M%SZ)}"
BUDGET="${GPU_CHECK_BUDGET_S:-570}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
START=$SECONDS
FAILED=0
printf '| part | exit | seconds | log |\n|---|---|---|---|\n' > "$OUT/summary.md"

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA GPU visible to $PY; nothing was run" | tee "$OUT/summary.md"
    exit 1
fi
"$PY" - > "$OUT/device.txt" 2>&1 <<'EOF'
import datetime, torch, triton
p = torch.cuda.get_device_properties(0)
print(f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC  {p.name}  {p.total_memory / 2**30:.0f} GiB  "
      f"{p.multi_processor_count} SMs  torch {torch.__version__}  triton {triton.__version__}")
EOF
cat "$OUT/device.txt"

# part NAME CAP_SECONDS COMMAND...: runs COMMAND under timeout min(CAP, budget left)
part() {
    local name="$1" cap="$2"
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 10 )); then
        printf '| %s | skipped (budget spent) | 0 | - |\n' "$name" >> "$OUT/summary.md"
        FAILED=1
        return
    fi
    echo "== $name (at most ${limit}s): $*"
    local t0=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    local took=$((SECONDS - t0))
    if (( rc == 124 || rc == 137 )); then
        printf '| %s | timed out (%ss) | %s | %s.log |\n' "$name" "$limit" "$took" "$name" >> "$OUT/summary.md"
    else
        printf '| %s | %s | %s | %s.log |\n' "$name" "$rc" "$took" "$name" >> "$OUT/summary.md"
    fi
    (( rc == 0 )) || FAILED=1
    tail -n 3 "$OUT/$name.log"
}

part tests 140 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_kernels.py tests/test_kernels_fused_moe.py tests/test_kernels_attention.py \
    tests/test_moe_triton.py tests/test_model_paged_attention.py
part bench_kernels 65 "$PY" scripts/bench_kernels.py --quick
part bench_attention 30 "$PY" scripts/bench_attention.py --iters 10
part tune_ep1 75 "$PY" scripts/tune_fused_moe.py --grid quick --ep 1 --tokens 1 8 64 4096 1024 --iters 5
part tune_ep8 55 "$PY" scripts/tune_fused_moe.py --grid quick --ep 8 --tokens 1 8 64 1024 --iters 5
mkdir -p "$OUT/configs"
cp kernels/configs/*.json "$OUT/configs/" 2>/dev/null || true

# The engine's eager flag comes with the CUDA-graph engine; without it only the default runs.
GEN_EAGER=() BENCH_EAGER=()
if "$PY" -m moerun.cli generate --help 2>/dev/null | grep -q -- '--enforce-eager'; then
    GEN_EAGER=(--enforce-eager)
else
    echo "moerun generate has no --enforce-eager: tiny_eager skipped" | tee -a "$OUT/eager_skipped.txt"
fi
if "$PY" scripts/bench.py --help 2>/dev/null | grep -q -- '--enforce-eager'; then
    BENCH_EAGER=(--enforce-eager)
else
    echo "bench.py has no --enforce-eager: bench_30b_eager skipped" | tee -a "$OUT/eager_skipped.txt"
fi
"$PY" -c 'import json, random
r = random.Random(0)
for _ in range(32):
    print(json.dumps({"prompt_ids": [r.randrange(256) for _ in range(32)], "max_new_tokens": 64}))' \
    > "$OUT/tiny_prompts.jsonl"
TINY=(-m moerun.cli generate --model tiny --device cuda --dtype bfloat16 --prompts-file
      "$OUT/tiny_prompts.jsonl" --ignore-eos --stats)
if (( ${#GEN_EAGER[@]} )); then
    part tiny_eager 35 "$PY" "${TINY[@]}" "${GEN_EAGER[@]}"
fi
part tiny_graphs 35 "$PY" "${TINY[@]}"
if (( ${#BENCH_EAGER[@]} )); then
    part bench_30b_eager 65 "$PY" scripts/bench.py --section strategy --strategy optimized --quick \
        "${BENCH_EAGER[@]}" --json "$OUT/bench_30b_eager.json"
fi
part bench_30b_graphs 65 "$PY" scripts/bench.py --section strategy --strategy optimized --quick \
    --json "$OUT/bench_30b_graphs.json"

echo "total: $((SECONDS - START)) s (budget ${BUDGET} s)" >> "$OUT/summary.md"
echo "== summary ($OUT/summary.md)"
cat "$OUT/summary.md"
exit "$FAILED"
