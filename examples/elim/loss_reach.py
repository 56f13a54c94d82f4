"""How far the ELIM loss reaches: its gradient on identities' mean features.

    python examples/elim/loss_reach.py                 # default recipe, untrained model
    python examples/elim/loss_reach.py --run examples/elim/runs/elim   # a trained run

For 20 training batches of train.py's default recipe, the matching step of ELIM, then
:func:`elim.analysis.elim_loss_reach` with the projector run once per identity (the
paper) and once for all identities (``--per-domain-projector false``): the mean over
batches of ``||sum_j g_j|| / sum_j ||g_j||`` for the reference and the target identities.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the `elim` package beside this file

from elim.analysis import elim_loss_reach, load_trained
from elim.config import TrainConfig, matching_config
from elim.data import pipeline
from elim.data.base import augment, normalize
from elim.matching import elim_matching_step
from elim.models import build_model


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    """Print and return ``{form: (reference ratio, mean target ratio)}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a train.py output folder (default: untrained model)")
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.run:
        cfg, model = load_trained(args.run)
    else:
        cfg = TrainConfig()
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
    model.train()
    root = (
        Path(cfg.data_root)
        if cfg.data_root
        else pipeline.default_data_root(cfg.data, cfg.confounding)
    )
    train, _ = pipeline.build_training_data(cfg, root)
    images = pipeline.preload(train, 0, root / ".elim_cache")
    sampler, _ = pipeline.make_sampler(train, cfg, 0, 1)
    found: dict[bool, list[list[float]]] = {True: [], False: []}
    for b, idx in zip(range(args.batches), sampler):
        idx = torch.as_tensor(idx)
        x = normalize(augment(images[idx], cfg.image_size, torch.Generator().manual_seed(b)))
        with torch.no_grad():
            z = model.encoder(x)
        matched = elim_matching_step(
            z,
            train.labels[idx],
            train.identities[idx],
            matching_config(cfg),
            torch.Generator().manual_seed(b),
        )
        for per_domain in found:
            found[per_domain].append(
                elim_loss_reach(
                    model.projector, matched.features, matched.labels, matched.mask, per_domain
                )
            )
    out = {}
    for per_domain, rows in found.items():
        name = "per-identity BN (paper)" if per_domain else "shared BN"
        ref = statistics.fmean(r[0] for r in rows)
        tgt = statistics.fmean(statistics.fmean(r[1:]) for r in rows)
        out[name] = (ref, tgt)
        print(f"{name}: reference {ref:.2e}, targets {tgt:.3f}")
    return out


if __name__ == "__main__":
    main()
