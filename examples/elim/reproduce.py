"""Baseline against ELIM over seeds and confounding levels; writes Markdown tables.

    python examples/elim/reproduce.py --jobs 2          # the full table of RESULTS.md
    python examples/elim/reproduce.py --methods baseline elim --seeds 0 1 2
    python examples/elim/reproduce.py --methods elim@strong baseline@strong
    python examples/elim/reproduce.py --seeds 0 1 -- --max-steps 50 --backbone resnet18
    python examples/elim/reproduce.py --table-only      # the table of the runs finished so far

A column is a preset name (:data:`PRESETS`), optionally with ``@LEVEL`` for a
``--confounding`` level of the synthetic faces (``elim@strong``); without it the column
uses train.py's default level. Any other name ``M`` runs ``--method M``. The default
columns (:data:`DEFAULT_COLUMNS`) are baseline and ELIM at the three levels, ELIM with
a shared projector BatchNorm (``elim-shared-bn``) at two, and ELIM-Attention, ELIM-Age
and the age-batch baseline at the default level, each for seeds 0-4.

Each run is ``train.py ARGS --seed S --out OUT/COLUMN-seedS`` plus the shared
arguments (``--train-args``, then anything after ``--``), in a fresh process. Every
column sees the same seeds, hence the same initial weights, batches and augmentation.
Each method is compared with its control at the same level (:func:`control_of`): the
paired difference of mean CCC over seeds, with a 95 % t interval. The tables are
written between the ``<!-- reproduce:begin -->`` and ``<!-- reproduce:end -->``
markers of ``--results`` (default ``examples/elim/RESULTS.md``); text outside them is
kept.
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
    "elim": ("ELIM", ("--method", "elim")),
    # The documented variant: one projector call (one BatchNorm batch) for all matched
    # identities, so the ELIM loss can move an identity's mean feature.
    "elim-shared-bn": ("ELIM, shared BN", ("--method", "elim", "--per-domain-projector", "false")),
    "elim-attention": ("ELIM-Attention", ("--method", "elim-attention")),
    # train.py fits the batch to the five age groups by itself (5 groups x 24 images).
    "elim-age": ("ELIM-Age", ("--method", "elim", "--domain", "age")),
    # Control for ELIM-Age: its batches (age groups, not people), no ELIM loss.
    "baseline-age": ("baseline (age batches)", ("--method", "baseline", "--domain", "age")),
}
"""Column name -> (display name, train.py arguments)."""
DEFAULT_COLUMNS = (
    "baseline@partial",
    "elim@partial",
    "baseline@strong",
    "elim@strong",
    "baseline@none",
    "elim@none",
    "elim-attention@partial",
    "baseline-age@partial",
    "elim-age@partial",
    "elim-shared-bn@partial",
    "elim-shared-bn@strong",
)
"""The columns of RESULTS.md, in the order they run (most important first)."""
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_TRAIN_ARGS: tuple[str, ...] = ()
"""Every run is train.py's default run (same budget, its fixed default of one thread,
so that the numbers do not depend on how busy the machine was)."""

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}
T_975.update({9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042})
"""Two-sided 95 % quantiles of Student's t by degrees of freedom."""


def t_quantile(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (from a table;
    the nearest tabulated ``df`` at or below, 1.96 beyond 30).

    Example:
        >>> t_quantile(4), t_quantile(11), t_quantile(100)
        (2.776, 2.228, 1.96)
    """
    if df < 1:
        raise ValueError(f"`df` must be >= 1, got {df}")
    if df > 30:
        return 1.96
    return T_975[max(k for k in T_975 if k <= df)]


def paired_difference(treated: list[float], control: list[float]) -> tuple[float, float, float]:
    """Mean of the paired differences ``treated - control`` and its 95 % t interval.

    Example:
        >>> m, lo, hi = paired_difference([0.5, 0.6, 0.7], [0.4, 0.4, 0.6])
        >>> round(m, 3), round(lo, 3), round(hi, 3)
        (0.133, -0.01, 0.277)
    """
    diffs = [t - c for t, c in zip(treated, control)]
    m, s = mean_std(diffs)
    half = t_quantile(len(diffs) - 1) * s / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return m, m - half, m + half


def split_column(column: str) -> tuple[str, str | None]:
    """``"elim@strong"`` -> ``("elim", "strong")``; ``"elim"`` -> ``("elim", None)``."""
    method, _, level = column.partition("@")
    return method, level or None


def control_of(column: str) -> str:
    """The column a method is compared with: the baseline on the same batches and level.

    Example:
        >>> control_of("elim@strong"), control_of("elim-age@partial")
        ('baseline@strong', 'baseline-age@partial')
    """
    method, level = split_column(column)
    control = "baseline-age" if method == "elim-age" else "baseline"
    return control + (f"@{level}" if level else "")


def display_name(column: str) -> str:
    """Table name of a column: ``"ELIM (strong)"``."""
    method, level = split_column(column)
    name = PRESETS[method][0] if method in PRESETS else method
    return f"{name} ({level})" if level else name


def column_args(column: str) -> list[str]:
    """train.py arguments of a column."""
    method, level = split_column(column)
    args = list(PRESETS[method][1]) if method in PRESETS else ["--method", method]
    return args + (["--confounding", level] if level else [])


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


def per_seed_table(
    runs: dict[str, dict[int, dict[str, float]]], seeds: list[int], times: dict[str, dict]
) -> str:
    """Mean CCC and wall time of every run (``-`` where a run did not finish).

    Example:
        >>> m = {"ccc_v": 0.4, "ccc_a": 0.6}
        >>> print(per_seed_table({"elim": {0: m}}, [0, 1], {"elim": {0: 61.0}}).splitlines()[3])
        | 1 | - | - |
    """
    methods = [m for m in runs if runs[m]]
    lines = [
        "| seed | " + " | ".join(f"{m} mean CCC | {m} time (s)" for m in methods) + " |",
        "|---|" + "---|---|" * len(methods),
    ]
    for seed in seeds:
        cells = [
            f"{mean_ccc(runs[m][seed]):.3f} | {times[m][seed]:.0f}" if seed in runs[m] else "- | -"
            for m in methods
        ]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(curves: dict[str, list[dict[int, float]]], names: dict[str, str]) -> str:
    """Held-out mean CCC at every evaluation of training, mean ± std over seeds.

    Args:
        curves: ``{column: [{iteration: mean CCC} of each seed]}``.
        names: display name of each column.

    Example:
        >>> print(curve_table({"elim": [{250: 0.5, 500: 0.7}, {250: 0.3, 500: 0.7}]}, {}))
        | iteration | elim |
        |---|---|
        | 250 | 0.400 ± 0.141 |
        | 500 | 0.700 ± 0.000 |
    """
    steps = sorted({k for runs in curves.values() for run in runs for k in run})
    lines = [
        "| iteration | " + " | ".join(names.get(c, c) for c in curves) + " |",
        "|---|" + "---|" * len(curves),
    ]
    for step in steps:
        cells = []
        for runs in curves.values():
            values = [run[step] for run in runs if step in run]
            cells.append("{:.3f} ± {:.3f}".format(*mean_std(values)) if values else "-")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_curve(run_dir: Path) -> dict[int, float]:
    """``{iteration: held-out mean CCC}`` from a run's ``eval_log.jsonl``."""
    path = run_dir / "eval_log.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: mean_ccc(r) for r in records}


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
    """Run every (column, seed), print and write the tables; returns the metrics."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_COLUMNS))
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
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="run nothing: write the tables of the finished runs with the same settings "
        "and list the missing ones",
    )
    args = parser.parse_args(argv)
    shared = shlex.split(args.train_args) + extra
    out = Path(args.out)
    variants = [(m, column_args(m)) for m in args.methods]
    names = {m: display_name(m) for m in args.methods}
    variants += [(label, shlex.split(a)) for label, a in args.variant]

    jobs = []
    for label, variant_args in variants:  # column by column: the first ones finish first
        for seed in args.seeds:
            run_dir = out / f"{_slug(label.replace('@', '-'))}-seed{seed}"
            cmd = [sys.executable, str(HERE / "train.py"), *variant_args, "--seed", str(seed)]
            cmd += ["--out", str(run_dir), "--progress", "false", *shared]
            jobs.append((label, seed, run_dir, cmd))
            print("$", shlex.join(cmd), flush=True)
    if args.dry_run:
        return {label: [] for label, _ in variants}

    reused, missing = 0, []

    def run(job) -> float | None:
        nonlocal reused
        if (args.reuse or args.table_only) and (seconds := reusable(job[2], job[3])) is not None:
            reused += 1
            return seconds
        if args.table_only:
            missing.append((job[0], job[1]))
            return None
        t0 = time.perf_counter()
        subprocess.run(job[3], check=True, stdout=subprocess.DEVNULL if args.jobs > 1 else None)
        return time.perf_counter() - t0

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        durations = list(pool.map(run, jobs))
    total = time.perf_counter() - start
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    # Columns keep the seeds that finished; each comparison pairs the seeds both have.
    by_seed: dict[str, dict[int, dict[str, float]]] = {label: {} for label, _ in variants}
    time_of: dict[str, dict[int, float]] = {label: {} for label, _ in variants}
    curves: dict[str, list[dict[int, float]]] = {label: [] for label, _ in variants}
    for (label, seed, run_dir, _cmd), seconds in zip(jobs, durations):
        if seconds is not None:
            by_seed[label][seed] = json.loads((run_dir / "metrics.json").read_text())
            time_of[label][seed] = seconds
            curves[label].append(read_curve(run_dir))
    runs = {label: list(v.values()) for label, v in by_seed.items() if v}
    times = {label: list(v.values()) for label, v in time_of.items() if v}

    command = "python examples/elim/reproduce.py " + shlex.join(
        argv + (["--", *extra] if extra else [])
    )
    lines = [
        f"Command: `{command.strip()}`",
        "",
        "Every run: `"
        + " ".join(["train.py COLUMN --seed S", *map(shlex.quote, shared)])
        + f"` with seeds {', '.join(map(str, args.seeds))}; columns: "
        + "; ".join(f"{names.get(label, label)} = `{shlex.join(a)}`" for label, a in variants)
        + ". Metrics on the held-out identities; mean ± sample std over seeds.",
        "",
    ]
    if missing:
        by_column: dict[str, list[str]] = {}
        for label, seed in missing:
            by_column.setdefault(label, []).append(str(seed))
        left_out = "; ".join(f"{label} seed {', '.join(v)}" for label, v in by_column.items())
        lines += [f"Not finished (left out): {left_out}.", ""]
    if not runs:
        block = "\n".join(lines)
        print(block)
        write_block(Path(args.results), block)
        return runs
    if len(runs) > 1:
        lines += [method_rows_table(runs, names), "", "All metrics:", ""]
    lines += [results_table({names.get(k, k): v for k, v in runs.items()}), ""]
    for column in runs:
        control = control_of(column)
        if split_column(column)[0] in ("baseline", "baseline-age") or control not in runs:
            continue
        paired = [s for s in args.seeds if s in by_seed[column] and s in by_seed[control]]
        treated = [mean_ccc(by_seed[column][s]) for s in paired]
        base = [mean_ccc(by_seed[control][s]) for s in paired]
        m, lo, hi = paired_difference(treated, base)
        wins = sum(t > b for t, b in zip(treated, base))
        spread = f"95 % interval {lo:+.3f} to {hi:+.3f}" if len(paired) > 1 else "one seed"
        lines += [
            f"{names.get(column, column)} − {names.get(control, control)}, mean CCC: "
            f"**{m:+.3f}** ({spread}; paired over seeds {', '.join(map(str, paired))}, "
            f"ahead in {wins} of {len(paired)}).",
            "",
        ]
    lines += [
        "Held-out mean CCC during training (the periodic evaluations; mean ± std over "
        "the finished seeds):",
        "",
        curve_table({k: v for k, v in curves.items() if v}, names),
        "",
    ]
    load = (
        f"; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (other jobs "
        "share the machine, so times are upper bounds)"
        if load_before and load_after
        else ""
    )
    ran = sum(t is not None for t in durations) - reused
    lines += [
        per_seed_table(by_seed, args.seeds, time_of),
        "",
        f"Runtime: {total / 60:.1f} min for {ran} runs on {os.cpu_count()} CPU cores "
        f"({platform.machine()}), {args.jobs} at a time{load}; sum of the per-run times "
        f"{sum(sum(t) for t in times.values()) / 60:.1f} min"
        + (
            f"; {reused} finished runs with the same settings reused (their times are "
            "from their run.json)."
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
