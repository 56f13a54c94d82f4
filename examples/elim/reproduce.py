"""Baseline against ELIM over several seeds; writes a Markdown table of mean ± std.

    python examples/elim/reproduce.py                       # 3 seeds x {baseline, elim}
    python examples/elim/reproduce.py --jobs 2 --methods baseline elim elim-attention elim-age
                                                            # appendix Tables 1 and 2
    python examples/elim/reproduce.py --seeds 0 1 -- --max-steps 50 --backbone resnet18
    python examples/elim/reproduce.py --jobs 2 --variant "elim (released BN)" \
        "--method elim --elim-bn-stats update"             # an extra column, 2 runs at a time

``--methods`` names are presets (:data:`PRESETS`): ``baseline``, ``elim``
(ELIM-Sinkhorn), ``elim-attention`` (appendix §4.3) and ``elim-age`` (§4.4: ``--method
elim --domain age --samples-per-identity 8``: the five age groups are the domains, so a
batch of 32 is 4 groups x 8 images instead of 8 identities x 4); any other name ``M``
runs ``--method M``. With more than one column, a compact table in the layout of the
appendix's Tables 1 and 2 (one row per method: RMSE and CCC of valence and arousal) comes
first, then the full table (+ SAGR, PCC) as columns.

Each run is ``train.py ARGS --seed S --out OUT/M-seedS`` plus the shared
arguments (``--train-args``, default ``--threads 1``, then anything after ``--``), in a
fresh process. Every method sees the same seeds, hence the same initial weights,
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ("rmse", "sagr", "pcc", "ccc")
BEGIN, END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"
PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "baseline": ("baseline", ("--method", "baseline")),
    "elim": ("ELIM-Sinkhorn", ("--method", "elim")),
    "elim-attention": ("ELIM-Attention", ("--method", "elim-attention")),
    # 5 age groups cannot fill P = 8 domains per batch; K = 8 keeps the batch at 32.
    "elim-age": (
        "ELIM-Age",
        ("--method", "elim", "--domain", "age", "--samples-per-identity", "8"),
    ),
    # Control for ELIM-Age: its batches (4 age groups x 8 images), no ELIM loss.
    "baseline-age": (
        "baseline (age batches)",
        ("--method", "baseline", "--domain", "age", "--samples-per-identity", "8"),
    ),
}
"""``--methods`` name -> (display name, train.py arguments)."""
DEFAULT_TRAIN_ARGS = ("--threads", "1")
"""Every run is train.py's default run (same budget), pinned to one thread so that the
numbers do not depend on how busy the machine was (the thread count changes the
floating-point summation order)."""


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


def method_rows_table(
    runs: dict[str, list[dict[str, float]]], names: dict[str, str] | None = None
) -> str:
    """The appendix's Table 1/2 layout: one row per method, RMSE and CCC of V and A.

    Args:
        runs: ``{method: [metrics of each seed]}``.
        names: display name of each method (default: the key itself).

    Example:
        >>> m = {f"{k}_{a}": 0.5 for k in METRICS for a in "va"}
        >>> print(method_rows_table({"elim": [m, m]}, {"elim": "ELIM-Sinkhorn"}).splitlines()[2])
        | ELIM-Sinkhorn | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 |
    """
    names = names or {}
    columns = (("rmse_v", "RMSE (V)"), ("ccc_v", "CCC (V)"), ("rmse_a", "RMSE (A)"))
    columns += (("ccc_a", "CCC (A)"),)
    lines = [
        "| method | " + " | ".join(c for _, c in columns) + " | mean CCC |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for method, records in runs.items():
        cells = []
        for key, _ in columns:
            m, s = mean_std([r[key] for r in records])
            cells.append(f"{m:.3f} ± {s:.3f}")
        m, s = mean_std([mean_ccc(r) for r in records])
        cells.append(f"{m:.3f} ± {s:.3f}")
        lines.append(f"| {names.get(method, method)} | " + " | ".join(cells) + " |")
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


RUN_CONTROL = ("out", "progress", "plots", "threads", "resume", "workers", "cache")
"""Config fields that do not change a run's results (ignored by ``--reuse``)."""


def reusable(run_dir: Path, cmd: list[str]) -> float | None:
    """Wall time of a finished run in ``run_dir`` made with the same settings as ``cmd``
    (a ``train.py`` command line), else ``None``.

    "Same settings" = every config field equal except :data:`RUN_CONTROL`, so a run
    is only reused when rerunning it would repeat the same experiment.
    """
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from elim.config import parse_args

    metrics, info = run_dir / "metrics.json", run_dir / "run.json"
    if not (metrics.is_file() and info.is_file()):
        return None
    saved = json.loads(info.read_text())
    wanted = parse_args(cmd[2:])[0].to_dict()
    if any(saved["config"].get(k) != v for k, v in wanted.items() if k not in RUN_CONTROL):
        return None
    return float(saved["wall_seconds"])


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    """Run every (variant, seed), print and write the tables; returns the metrics."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["baseline", "elim"])
    parser.add_argument(
        "--variant",
        nargs=2,
        action="append",
        default=[],
        metavar=("LABEL", "ARGS"),
        help="an extra column: train.py arguments under a label, e.g. "
        "'elim (released BN)' '--method elim --elim-bn-stats update'",
    )
    parser.add_argument("--out", default=str(HERE / "runs" / "reproduce"))
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    parser.add_argument(
        "--train-args",
        default=shlex.join(DEFAULT_TRAIN_ARGS),
        help="arguments given to every train.py run (before those after --)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at a time (each uses --threads threads)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="skip runs whose folder already holds a finished run with the same settings "
        "(their time is taken from run.json)",
    )
    args = parser.parse_args(argv)
    shared = shlex.split(args.train_args) + extra
    out = Path(args.out)
    variants = [(m, list(PRESETS[m][1]) if m in PRESETS else ["--method", m]) for m in args.methods]
    names = {m: PRESETS[m][0] for m in args.methods if m in PRESETS}
    variants += [(label, shlex.split(a)) for label, a in args.variant]

    jobs = []
    for seed in args.seeds:
        for label, variant_args in variants:
            run_dir = out / f"{_slug(label)}-seed{seed}"
            cmd = [sys.executable, str(HERE / "train.py"), *variant_args, "--seed", str(seed)]
            cmd += ["--out", str(run_dir), "--progress", "false", *shared]
            jobs.append((label, seed, run_dir, cmd))
            print("$", shlex.join(cmd), flush=True)
    runs: dict[str, list[dict[str, float]]] = {label: [] for label, _ in variants}
    times: dict[str, list[float]] = {label: [] for label, _ in variants}
    if args.dry_run:
        return runs

    reused = 0

    def run(job) -> float:
        nonlocal reused
        if args.reuse and (seconds := reusable(job[2], job[3])) is not None:
            reused += 1
            return seconds
        t0 = time.perf_counter()
        subprocess.run(job[3], check=True, stdout=subprocess.DEVNULL if args.jobs > 1 else None)
        return time.perf_counter() - t0

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        durations = list(pool.map(run, jobs))  # in job order, so seeds stay paired
    for (label, _seed, run_dir, _cmd), seconds in zip(jobs, durations):
        times[label].append(seconds)
        runs[label].append(json.loads((run_dir / "metrics.json").read_text()))
    total = time.perf_counter() - start
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    command = "python examples/elim/reproduce.py " + shlex.join(
        argv + (["--", *extra] if extra else [])
    )
    lines = [
        f"Command: `{command.strip()}`",
        "",
        f"Every run: `train.py COLUMN --seed S {shlex.join(shared)}` with seeds "
        f"{', '.join(map(str, args.seeds))}; columns: "
        + "; ".join(f"{label} = `{shlex.join(a)}`" for label, a in variants)
        + ". Metrics on the held-out identities; mean ± sample std over seeds.",
        "",
    ]
    if len(runs) > 1:
        lines += [method_rows_table(runs, names), "", "All metrics:", ""]
    lines += [results_table(runs), ""]
    if "baseline" in runs and "elim" in runs:
        diffs = [mean_ccc(e) - mean_ccc(b) for b, e in zip(runs["baseline"], runs["elim"])]
        m, s = mean_std(diffs)
        wins = sum(d > 0 for d in diffs)
        lines += [
            f"ELIM − baseline, mean CCC: **{m:+.3f} ± {s:.3f}** (paired by seed; ELIM ahead "
            f"in {wins} of {len(diffs)} seeds; target: +0.050).",
            "",
        ]
    others = [m for m in runs if m not in ("baseline", "elim", "baseline-age")]
    for other in others if "baseline" in runs else []:
        diffs = [mean_ccc(e) - mean_ccc(b) for b, e in zip(runs["baseline"], runs[other])]
        m, s = mean_std(diffs)
        lines += [
            f"{names.get(other, other)} − baseline, mean CCC: **{m:+.3f} ± {s:.3f}** (paired "
            f"by seed; ahead in {sum(d > 0 for d in diffs)} of {len(diffs)} seeds).",
            "",
        ]
    load = (
        f"; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (other jobs "
        "share the machine, so times are upper bounds)"
        if load_before and load_after
        else ""
    )
    if "elim-age" in runs and "baseline-age" in runs:
        # The fair comparison for ELIM-Age: the same age-group batches, without ELIM.
        diffs = [mean_ccc(e) - mean_ccc(b) for b, e in zip(runs["baseline-age"], runs["elim-age"])]
        m, s = mean_std(diffs)
        lines += [
            f"ELIM-Age − baseline (age batches), mean CCC: **{m:+.3f} ± {s:.3f}** (paired by "
            f"seed, same batches; ahead in {sum(d > 0 for d in diffs)} of {len(diffs)} seeds).",
            "",
        ]
    lines += [
        per_seed_table(runs, args.seeds, times),
        "",
        f"Runtime: {total / 60:.1f} min for {sum(map(len, runs.values())) - reused} runs on "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), {args.jobs} at a time{load}"
        + (
            f"; {reused} finished runs with the same settings reused (--reuse; their times "
            "are from their run.json)."
            if reused
            else "."
        ),
    ]
    block = "\n".join(lines)
    print(block)
    write_block(Path(args.results), block)
    print(f"\nwritten to {args.results}")
    return runs


if __name__ == "__main__":
    main()
