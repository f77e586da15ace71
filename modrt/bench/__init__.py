"""``modrt bench``: the routed bundle against dense and its peers, in one process and one
run (DESIGN.md §8).

For each batch size the variants (routed, dense, bound, torch, ort_moe; see
``modrt.peers``) are measured *interleaved*: round after round, each variant runs for a
short block, until every one has had its time budget. Background load then hits all of
them alike, so the ratios hold even when absolute numbers are noisy. Latency is per call
(one batch; for a recurrent bundle one window of ``--seq`` tokens); ``infer_per_s``
counts rows (batch x calls / s), as perf_analyzer counts inferences.

    timing.py   BenchConfig, the interleaved timing loop, latency statistics
    report.py   run(bundle) -> the JSON report; format_table(report)
    sweep.py    --sweep: synthetic bundles over module widths, CSV, PNG, break-even widths
    cli.py      the ``modrt bench`` command

Each module imports only those listed above it (cli: report, timing, sweep; sweep:
report, timing; report: timing), never this ``__init__``, which re-exports their names.
"""

from __future__ import annotations

from modrt._cli_types import STRATEGY, STRATEGY_HELP
from modrt.bench.cli import bench
from modrt.bench.report import RATIOS, VARIANTS, format_table, run
from modrt.bench.timing import STRATEGY_CHOICES, BenchConfig, measure, stats

__all__ = ["BenchConfig", "RATIOS", "STRATEGY", "STRATEGY_CHOICES", "STRATEGY_HELP", "VARIANTS", "bench",
           "format_table", "measure", "run", "stats"]
