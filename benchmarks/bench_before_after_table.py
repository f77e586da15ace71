"""The median table of ``bench_before_after.sh``'s runs: routed/dense/bound p50 before and
after, their ratio, the strategies chosen, and bundle load times.

    python benchmarks/bench_before_after_table.py OUT_DIR
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
from pathlib import Path


def main(out: Path) -> None:
    p50 = collections.defaultdict(lambda: collections.defaultdict(list))
    strategy = collections.defaultdict(set)
    for f in sorted(out.glob("*.json")):
        bundle, ver, _ = f.stem.rsplit("-", 2)
        for r in json.loads(f.read_text())["results"]:
            for v in ("routed", "dense", "bound"):
                if r.get(v):
                    p50[(bundle, r["batch"], v)][ver].append(r[v]["p50_us"])
            strategy[(bundle, r["batch"], ver)].add(str(r.get("strategy")))
    print("| bundle | batch | variant | before p50 µs | after p50 µs | after/before | strategy before → after |")
    print("|---|---|---|---|---|---|---|")
    for (b, B, v), d in sorted(p50.items()):
        if d["before"] and d["after"]:
            lo, hi = statistics.median(d["before"]), statistics.median(d["after"])
            s = (f"{','.join(sorted(strategy[(b, B, 'before')]))} → {','.join(sorted(strategy[(b, B, 'after')]))}"
                 if v == "routed" else "")
            print(f"| {b} | {B} | {v} | {lo:.1f} | {hi:.1f} | {hi / lo:.3f} | {s} |")
    loads = collections.defaultdict(list)
    for line in (out / "load.txt").read_text().splitlines():
        _, ver, b, _, s = line.split()
        loads[(b, ver)].append(float(s))
    print("\n| bundle | load s before (median) | load s after |\n|---|---|---|")
    for b in sorted({k[0] for k in loads}):
        print(f"| {b} | {statistics.median(loads[(b, 'before')]):.2f} | {statistics.median(loads[(b, 'after')]):.2f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
