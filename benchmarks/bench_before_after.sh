#!/usr/bin/env bash
# modrt bench before and after a change, side by side in one session: the code at commit
# BEFORE (a git worktree) and the working tree, alternately, ROUNDS times, each bundle
# with its own fresh strategy cache; bundle load time (auto's measuring included) too.
#
#   benchmarks/bench_before_after.sh BEFORE OUT_DIR [ROUNDS] BUNDLE...
#   python benchmarks/bench_before_after_table.py OUT_DIR     # the median table
#
# BEFORE's modrt is imported by PYTHONPATH from the worktree (the core and serve only:
# modrt/ is a plain package there). Run it on a quiet machine: absolute times wander.
set -euo pipefail
before=$1; out=$2; shift 2
rounds=3
if [[ ${1:-} =~ ^[0-9]+$ ]]; then rounds=$1; shift; fi
tree=$(mktemp -d)/before
git worktree add -f --detach "$tree" "$before" >/dev/null
trap 'git worktree remove --force "$tree"' EXIT
mkdir -p "$out"
for round in $(seq 1 "$rounds"); do
  for ver in before after; do
    pp=""; [ "$ver" = before ] && pp=$tree
    for d in "$@"; do
      b=$(basename "$d"); cache=$(mktemp -d)
      t0=$(date +%s.%N)
      PYTHONPATH=$pp MODRT_CACHE=$cache python -c "import modrt, sys; modrt.load(sys.argv[1])" "$d"
      t1=$(date +%s.%N)
      echo "$round $ver $b load_s $(echo "$t1 - $t0" | bc)" >> "$out/load.txt"
      PYTHONPATH=$pp MODRT_CACHE=$cache python -m modrt bench "$d" --batch 1,8,64 --seconds 1.5 --no-torch \
        --no-ort-moe --json "$out/$b-$ver-$round.json" -q > "$out/$b-$ver-$round.txt" 2>&1
      rm -rf "$cache"
    done
  done
done
