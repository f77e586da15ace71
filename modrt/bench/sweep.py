"""``modrt bench --sweep``: where routing starts to pay (DESIGN.md §8).

For each (M, K) configuration and module width w, a random-weight feed-forward bundle
``D -> w -> D`` with ``D = min(w, d_max)`` (so w=256 is the 256->256->256 case and
w=4096 the 1024->4096->1024 one) is built in a temporary directory and benched like
``modrt bench --synthetic``: routed (the strategy asked for, ``auto`` by default),
the dense baseline graph and ORT's fused MoE op, interleaved, per batch size.

Outputs: a CSV (one row per configuration, width and batch) and a PNG of routed/dense
and routed/ORT-MoE p50 latency ratios against width. The **break-even width** of a
(configuration, batch) curve is the smallest measured width from which the ratio stays
below 1: routing pays (against dense, or against the fused MoE op) for every module at
least that wide. Both are marked (★) and printed.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from modrt._exceptions import InputError
from modrt.bench.report import run as run_bundle
from modrt.bench.timing import BenchConfig

CSV_FIELDS = ("modules", "k", "width", "dims", "batch", "strategy", "routed_p50_us", "dense_p50_us",
              "ort_moe_p50_us", "routed_over_dense", "routed_over_ort_moe")


@dataclass(frozen=True)
class SweepConfig:
    widths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    configs: tuple[tuple[int, int], ...] = ((16, 1), (15, 3))  # (M, K)
    d_max: int = 1024  # input/output width: min(w, d_max)
    combine: str = "sum"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.widths or min(self.widths) < 1 or self.d_max < 1:
            raise ValueError(f"widths and d_max must be positive, got {list(self.widths)}, {self.d_max}")
        for M, K in self.configs:
            if not 1 <= K <= M:
                raise ValueError(f"sweep configuration M={M} K={K}: need 1 <= K <= M")

    def dims(self, width: int) -> tuple[int, int, int]:
        d = min(width, self.d_max)
        return d, width, d


def run(sweep: SweepConfig, bench_cfg: BenchConfig,
        log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Bench every (configuration, width); one row per batch size."""
    from modrt import synthetic

    cfg = replace(bench_cfg, torch=False, bound=False)
    rows = []
    for M, K in sweep.configs:
        for w in sorted(sweep.widths):
            dims = sweep.dims(w)
            log(f"sweep: M={M} K={K} dims={','.join(map(str, dims))}")
            with tempfile.TemporaryDirectory(prefix="modrt-sweep-") as tmp:
                synthetic.build(tmp, modules=M, k=K, dims=dims, seed=sweep.seed, combine=sweep.combine)
                report = run_bundle(tmp, cfg, {"synthetic": True, "dims": list(dims)}, progress=False)
            for r in report["results"]:
                routed, dense, moe = (r[v]["p50_us"] if r[v] else None for v in ("routed", "dense", "ort_moe"))
                rows.append({
                    "modules": M, "k": K, "width": w, "dims": "x".join(map(str, dims)), "batch": r["batch"],
                    "strategy": r["strategy"], "routed_p50_us": routed, "dense_p50_us": dense,
                    "ort_moe_p50_us": moe, "routed_over_dense": round(routed / dense, 4),
                    "routed_over_ort_moe": round(routed / moe, 4) if moe else None,
                })
    return rows


def break_even(rows: list[dict[str, Any]], ratio: str = "routed_over_dense"
               ) -> dict[tuple[int, int, int], int | None]:
    """(M, K, batch) -> smallest width from which ``ratio`` stays below 1 (None: never)."""
    out: dict[tuple[int, int, int], int | None] = {}
    for key in sorted({(r["modules"], r["k"], r["batch"]) for r in rows}):
        curve = sorted((r["width"], r[ratio]) for r in rows
                       if (r["modules"], r["k"], r["batch"]) == key and r[ratio] is not None)
        found = None
        for w, value in reversed(curve):
            if value >= 1:
                break
            found = w
        out[key] = found
    return out


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot(rows: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Two panels, routed/dense and routed/ORT-MoE against width; break-even widths marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InputError("the sweep plot needs matplotlib: pip install 'modrt[plot]'") from exc
    configs = sorted({(r["modules"], r["k"]) for r in rows}, key=lambda c: (c[1], -c[0]))
    batches = sorted({r["batch"] for r in rows})
    colors = dict(zip(batches, plt.get_cmap("viridis")([0.1 + 0.75 * i / max(1, len(batches) - 1)
                                                           for i in range(len(batches))]), strict=True))
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, key, label in ((axes[0], "routed_over_dense", "routed / dense"),
                           (axes[1], "routed_over_ort_moe", "routed / ORT fused MoE")):
        even = break_even(rows, key)
        for ci, (M, K) in enumerate(configs):
            for B in batches:
                pts = sorted((r["width"], r[key]) for r in rows
                             if (r["modules"], r["k"], r["batch"]) == (M, K, B) and r[key] is not None)
                if not pts:
                    continue
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, styles[ci % len(styles)], marker="o", ms=3, color=colors[B],
                        label=f"M={M} K={K}, batch {B}")
                w = even.get((M, K, B))
                if w is not None:
                    ax.plot([w], [dict(pts)[w]], marker="*", ms=13, color=colors[B], mec="black", mew=0.6)
        ax.axhline(1.0, color="grey", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("module width (hidden units)")
        ax.set_ylabel(f"{label}, p50 latency")
        ax.set_title(f"{label} (below 1: routed is faster)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    note = "★ break-even: the smallest width from which routed stays faster"
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def summary(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'M':>3} {'K':>2} {'width':>6} {'batch':>6} {'routed/dense':>13} {'routed/moe':>11}  strategy"]
    for r in rows:
        moe = f"{r['routed_over_ort_moe']:>10.2f}x" if r["routed_over_ort_moe"] else f"{'-':>11}"
        lines.append(f"{r['modules']:>3} {r['k']:>2} {r['width']:>6} {r['batch']:>6} "
                     f"{r['routed_over_dense']:>12.2f}x {moe}  {r['strategy']}")
    lines.append("")
    low = min(r["width"] for r in rows)
    for ratio, peer in (("routed_over_dense", "dense"), ("routed_over_ort_moe", "ORT fused MoE")):
        for (M, K, B), w in break_even(rows, ratio).items():
            when = ("at every width measured" if w == low else f"from width {w}" if w
                    else "at no width measured")
            lines.append(f"break-even vs {peer}, M={M} K={K} batch {B}: routed is faster {when}")
    return "\n".join(lines)


__all__ = ["SweepConfig", "break_even", "plot", "run", "summary", "write_csv"]
