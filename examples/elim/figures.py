"""Figures and linear probes of the runs of ``reproduce.py``, in one command.

    python examples/elim/figures.py --runs examples/elim/runs/reproduce
    python examples/elim/figures.py --runs examples/elim/runs/reproduce --probes-only

Reads ``RUNS/<method>-seed<S>/`` (checkpoint and logs, as written by ``reproduce.py``)
for the methods baseline, elim, elim-attention, elim-age, the control baseline-age and
the variant elim-shared-bn (those present) and writes,
under ``--out`` (default ``examples/elim/figures/``):

* ``tsne.png`` (appendix Fig. 3): t-SNE of the frozen features of 10 held-out
  identities, coloured by valence, one panel per method (seed ``--figure-seed``);
* ``identity_shift.png`` (appendix Fig. 1): pairs of held-out images of different
  people with the most similar labels (chosen from the labels only), with every
  method's predictions in the valence-arousal plane;
* ``training_curves.png``: losses and held-out mean CCC of every method, averaged over
  seeds (from ``train_log.jsonl`` and ``eval_log.jsonl``);

and the probe table (identity accuracy of a logistic-regression probe, lower = more
identity-invariant, with chance level; valence/arousal R² of a ridge probe with
identity-disjoint folds, higher = better; mean ± std over seeds): printed, saved as
``RUNS/probes.json`` and, with ``--results FILE``, written between the
``<!-- probes:begin -->`` and ``<!-- probes:end -->`` markers of FILE.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the `elim` package beside this file

from elim import analysis, plots
from elim.checkpoint import read_jsonl

HERE = Path(__file__).resolve().parent
METHODS = {
    "baseline": "baseline",
    "elim": "ELIM-Sinkhorn",
    "elim-attention": "ELIM-Attention",
    "elim-age": "ELIM-Age",
    "baseline-age": "baseline (age batches)",
    "elim-shared-bn": "ELIM, shared BN",
}
"""Run-folder prefix (``reproduce.py --methods`` name) -> display name."""
FIGURE_METHODS = ("baseline", "elim", "elim-attention", "elim-age")
"""Methods drawn in the t-SNE and identity-shift figures (controls only in the tables)."""


def find_runs(runs: Path, seeds: list[int], level: str = "partial") -> dict[str, dict[int, Path]]:
    """``{method: {seed: folder}}`` of the run folders that hold a checkpoint.

    reproduce.py names a run ``<method>-<level>-seed<S>`` (``<method>-seed<S>`` for a
    column without a confounding level); the first that exists is taken.
    """
    found: dict[str, dict[int, Path]] = {}
    for method in METHODS:
        for seed in seeds:
            for folder in (runs / f"{method}-{level}-seed{seed}", runs / f"{method}-seed{seed}"):
                if (folder / "checkpoint.pt").is_file():
                    found.setdefault(method, {})[seed] = folder
                    break
    return found


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def probe_table(probes: dict[str, dict[int, dict[str, float]]]) -> str:
    """Markdown table of the probe results, one row per method (mean ± std over seeds).

    Example:
        >>> r = {"accuracy": 0.5, "chance": 0.0625, "r2_v": 0.1, "r2_a": 0.2}
        >>> print(probe_table({"elim": {0: r, 1: r}}).splitlines()[2])
        | ELIM-Sinkhorn | 2 | 0.500 ± 0.000 | 0.100 ± 0.000 | 0.200 ± 0.000 |
    """
    chance = {r["chance"] for by_seed in probes.values() for r in by_seed.values()}
    chance_text = "/".join(f"{c:.3f}" for c in sorted(chance))
    lines = [
        f"| method | seeds | identity accuracy (chance {chance_text}) ↓ | R² valence ↑ | R² arousal ↑ |",
        "|---|---|---|---|---|",
    ]
    for method, by_seed in probes.items():
        rows = list(by_seed.values())
        cells = [_fmt([r[k] for r in rows]) for k in ("accuracy", "r2_v", "r2_a")]
        lines.append(f"| {METHODS.get(method, method)} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Compute the probes and draw the figures; returns ``{"probes": ..., "figures": [...]}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=str(HERE / "runs" / "reproduce"))
    parser.add_argument("--out", default=str(HERE / "figures"), help="folder of the PNGs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--figure-seed", type=int, default=0, help="seed of the runs drawn")
    parser.add_argument(
        "--level", default="partial", help="confounding level of the runs (reproduce.py columns)"
    )
    parser.add_argument("--tsne-identities", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=3, help="identity-shift pairs drawn")
    parser.add_argument("--results", default=None, help="Markdown file for the probe table")
    parser.add_argument("--probes-only", action="store_true", help="no figures")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs_dir, out = Path(args.runs), Path(args.out)
    found = find_runs(runs_dir, args.seeds, args.level)
    if not found:
        raise SystemExit(
            f"--runs {runs_dir}: no <method>-seed<S>/checkpoint.pt for methods "
            f"{list(METHODS)} and seeds {args.seeds}"
        )

    # ------------------------------------------------------------------ probes
    probes: dict[str, dict[int, dict[str, float]]] = {}
    drawn: dict[str, dict[str, np.ndarray]] = {}
    heldout: dict[str, tuple] = {}  # one held-out set per data source, shared by runs
    for method, by_seed in found.items():
        for seed, folder in by_seed.items():
            cfg, model = analysis.load_trained(folder)
            key = json.dumps(
                [cfg.data, cfg.data_root, cfg.image_size, cfg.synthetic_overrides], sort_keys=True
            )
            if key not in heldout:
                heldout[key] = analysis.heldout_set(cfg)
            dataset, images = heldout[key]
            feats, preds = analysis.extract(model, images)
            ids, labels = dataset.identities.numpy(), dataset.labels.double().numpy()
            result = analysis.identity_probe(feats, ids)
            result.update(analysis.va_probe(feats, labels, ids))
            probes.setdefault(method, {})[seed] = result
            print(
                f"{folder.name}: identity accuracy {result['accuracy']:.3f} (chance "
                f"{result['chance']:.3f}), R² valence {result['r2_v']:.3f}, arousal "
                f"{result['r2_a']:.3f}",
                flush=True,
            )
            if seed == args.figure_seed and method in FIGURE_METHODS:
                drawn[method] = {"features": feats, "predictions": preds, "key": key}
    table = probe_table(probes)
    print("\n" + table)
    (runs_dir / "probes.json").write_text(json.dumps(probes, indent=2) + "\n")
    if args.results:
        command = "python examples/elim/figures.py " + " ".join(argv or sys.argv[1:])
        analysis.write_marked_block(
            args.results, f"Command: `{command.strip()}`\n\n{table}", "probes"
        )
    figures: list[Path] = []
    if args.probes_only:
        return {"probes": probes, "figures": figures}

    # ------------------------------------------------------------------ figures
    out.mkdir(parents=True, exist_ok=True)
    if drawn:
        dataset, images = heldout[next(iter(drawn.values()))["key"]]
        ids, labels = dataset.identities.numpy(), dataset.labels.numpy()
        chosen = np.unique(ids)[: args.tsne_identities]
        rows = np.isin(ids, chosen)
        panels = {
            METHODS[m]: (analysis.tsne_embedding(d["features"][rows]), labels[rows, 0], ids[rows])
            for m, d in drawn.items()
        }
        figures.append(
            plots.plot_tsne(
                panels,
                out / "tsne.png",
                f"t-SNE of frozen features, {len(chosen)} held-out identities "
                f"(marker = identity), seed {args.figure_seed}",
            )
        )
        pairs = analysis.shift_pairs(labels, ids, args.pairs)
        predictions = {METHODS[m]: d["predictions"] for m, d in drawn.items()}
        figures.append(
            plots.plot_identity_shift(
                pairs,
                images.numpy(),
                labels,
                predictions,
                out / "identity_shift.png",
                f"Held-out pairs of different people with similar labels, seed {args.figure_seed}",
            )
        )
    logs = {
        METHODS[m]: [
            (read_jsonl(f / "train_log.jsonl"), read_jsonl(f / "eval_log.jsonl"))
            for f in by_seed.values()
        ]
        for m, by_seed in found.items()
    }
    seeds_used = sorted({s for by_seed in found.values() for s in by_seed})
    figures.append(
        plots.plot_method_curves(logs, out / "training_curves.png", f"mean over seeds {seeds_used}")
    )
    for path in figures:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return {"probes": probes, "figures": figures}


if __name__ == "__main__":
    main()
