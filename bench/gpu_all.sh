#!/usr/bin/env bash
# Every GPU figure the README and docs still call unmeasured, in one run on one GPU (< 8 min on
# one H200 by the scripts' own estimates), ending with one dated table. From the repository root:
#
#     bash bench/gpu_all.sh [out dir]        # default out dir: bench-gpu-<date>
#
# Each part runs under its own time limit and its output is kept in <out>/<part>.log; a part that
# fails or runs out of time is marked so in the table and the others still run.
#   gpu        bench/gpu.py --pairs 13 50 256: the training step with the loader at 26, 100 and 512
#              patches (13 pairs: one rank's share of 50 on 4 GPUs under scaling=paper)   ~3 min
#   ops        bench/ops.py: CaffeNet's equal-output implementation choices, bf16, 512 patches ~1 min
#   detection  bench/detection.py --device cuda: the detection protocol's network stages    ~2 min
#   sync       bench/sync_debug.py: torch.cuda.set_sync_debug_mode on a real 60-step run     ~1 min
set -u
cd "$(dirname "$0")/.."
stamp=$(date -u +%Y-%m-%dT%H:%MZ)
out=${1:-bench-gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
gpu=${gpu:-"no GPU found"}
summary=()

tables() {  # the markdown tables a script printed, the line before each (its caption), detection's projection
    awk '/^\|/ { if (!intable && prev != "") print prev; print; intable = 1; next }
         { intable = 0; prev = $0 } /^whole protocol/ { print }' "$1"
}

part() {  # part <name> <time limit, s> <command...>
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS status
    echo "== $name: $*" >&2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    case $? in
        0) status=ok ;;
        124) status="timed out (${limit} s)" ;;
        *) status="failed (see $out/$name.log)" ;;
    esac
    summary+=("| $name | \`$*\` | $status | $((SECONDS - start)) |")
}

# limits sum to 8 min: the whole script ends within them whatever a part does
part gpu 210 python bench/gpu.py --pairs 13 50 256 --steps 40 --warmup 8
part ops 60 python bench/ops.py --rounds 3
part detection 120 python bench/detection.py --device cuda
part sync 90 python bench/sync_debug.py

{
    echo "# vidrep GPU figures, $stamp, $gpu (bench/gpu_all.sh; logs in $out/)"
    echo
    echo "| part | command | status | wall s |"
    echo "|---|---|---|---|"
    printf '%s\n' "${summary[@]}"
    for name in gpu ops detection sync; do
        echo
        echo "## $name"
        echo
        tables=$(tables "$out/$name.log")
        if [ -n "$tables" ]; then echo "$tables"; else tail -5 "$out/$name.log"; fi
    done
} | tee "$out/table.md"
