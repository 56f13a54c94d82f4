"""Baseline against ELIM over several seeds; writes a Markdown table of mean ± std.

    python examples/elim/reproduce.py                       # 3 seeds x {baseline, elim}
    python examples/elim/reproduce.py --seeds 0 1 -- --max-steps 50 --backbone resnet18

Each run is ``train.py --method M --seed S --out OUT/M-seedS`` plus the shared
arguments (``--train-args`` defaults, then anything after ``--``), in a fresh process,
one after the other. Every method sees the same seeds, hence the same initial weights,
batches and augmentation; only the method differs. The table (held-out metrics, mean ±
sample std over seeds, and the ELIM - baseline difference in mean CCC) is written
between the ``<!-- reproduce:begin -->`` and ``<!-- reproduce:end -->`` markers of
``--results`` (default ``examples/elim/RESULTS.md``); text outside them is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ("rmse", "sagr", "pcc", "ccc")
BEGIN, END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"
DEFAULT_TRAIN_ARGS = ("--max-steps", "150", "--plots", "false")
"""The per-run budget of the committed RESULTS.md (shorter than train.py's default run)."""


def mean_ccc(metrics: dict[str, float]) -> float:
    """``(CCC_v + CCC_a) / 2``, the headline number."""
    return (metrics["ccc_v"] + metrics["ccc_a"]) / 2


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value).

    Example:
        >>> mean_std([1.0, 2.0, 3.0])
        (2.0, 1.0)
    """
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values)


def results_table(runs: dict[str, list[dict[str, float]]]) -> str:
    """Markdown table, one row per metric and axis, one column per method (mean ± std).

    Args:
        runs: ``{method: [metrics of each seed]}``.

    Example:
        >>> m = {f"{k}_{a}": 0.5 for k in METRICS for a in "va"}
        >>> print(results_table({"baseline": [m, m]}).splitlines()[2])
        | RMSE valence | 0.500 ± 0.000 |
    """
    methods = list(runs)
    lines = [
        "| metric | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for metric in METRICS:
        for axis, name in (("v", "valence"), ("a", "arousal")):
            cells = []
            for method in methods:
                m, s = mean_std([r[f"{metric}_{axis}"] for r in runs[method]])
                cells.append(f"{m:.3f} ± {s:.3f}")
            lines.append(f"| {metric.upper()} {name} | " + " | ".join(cells) + " |")
    cells = []
    for method in methods:
        m, s = mean_std([mean_ccc(r) for r in runs[method]])
        cells.append(f"**{m:.3f} ± {s:.3f}**")
    lines.append("| **mean CCC** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(runs: dict[str, list[dict[str, float]]], seeds: list[int], times) -> str:
    """Mean CCC and wall time of every run."""
    methods = list(runs)
    lines = [
        "| seed | " + " | ".join(f"{m} mean CCC | {m} time (s)" for m in methods) + " |",
        "|---|" + "---|---|" * len(methods),
    ]
    for i, seed in enumerate(seeds):
        cells = [f"{mean_ccc(runs[m][i]):.3f} | {times[m][i]:.0f}" for m in methods]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_block(path: Path, block: str) -> None:
    """Replace the text between the markers of ``path`` (or create the file)."""
    text = path.read_text() if path.is_file() else "# ELIM results\n\n"
    new = f"{BEGIN}\n{block.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: new, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    """Run every (method, seed), print and write the tables; returns the metrics."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["baseline", "elim"])
    parser.add_argument("--out", default=str(HERE / "runs" / "reproduce"))
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    parser.add_argument(
        "--train-args",
        default=shlex.join(DEFAULT_TRAIN_ARGS),
        help="arguments given to every train.py run (before those after --)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    shared = shlex.split(args.train_args) + extra
    out = Path(args.out)

    runs: dict[str, list[dict[str, float]]] = {m: [] for m in args.methods}
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    for seed in args.seeds:
        for method in args.methods:
            run_dir = out / f"{method}-seed{seed}"
            cmd = [
                sys.executable,
                str(HERE / "train.py"),
                "--method",
                method,
                "--seed",
                str(seed),
                "--out",
                str(run_dir),
                "--progress",
                "false",
                *shared,
            ]
            print("$", shlex.join(cmd), flush=True)
            if args.dry_run:
                continue
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            times[method].append(time.perf_counter() - t0)
            runs[method].append(json.loads((run_dir / "metrics.json").read_text()))
    if args.dry_run:
        return runs
    total = time.perf_counter() - start
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    command = "python examples/elim/reproduce.py " + shlex.join(
        argv + (["--", *extra] if extra else [])
    )
    lines = [
        f"Command: `{command.strip()}`",
        "",
        f"Every run: `train.py --method M --seed S {shlex.join(shared)}` "
        f"(seeds {', '.join(map(str, args.seeds))}); held-out identities; mean ± sample std "
        "over seeds.",
        "",
        results_table(runs),
        "",
    ]
    if "baseline" in runs and "elim" in runs:
        diffs = [mean_ccc(e) - mean_ccc(b) for b, e in zip(runs["baseline"], runs["elim"])]
        m, s = mean_std(diffs)
        wins = sum(d > 0 for d in diffs)
        lines += [
            f"ELIM − baseline, mean CCC: **{m:+.3f} ± {s:.3f}** (paired by seed; ELIM ahead "
            f"in {wins} of {len(diffs)} seeds; target: +0.050).",
            "",
        ]
    load = (
        f"; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (other jobs "
        "share the machine, so times are upper bounds)"
        if load_before and load_after
        else ""
    )
    lines += [
        per_seed_table(runs, args.seeds, times),
        "",
        f"Runtime: {total / 60:.1f} min for {sum(map(len, runs.values()))} runs on "
        f"{os.cpu_count()} CPU cores ({platform.machine()}){load}.",
    ]
    block = "\n".join(lines)
    print(block)
    write_block(Path(args.results), block)
    print(f"\nwritten to {args.results}")
    return runs


if __name__ == "__main__":
    main()
