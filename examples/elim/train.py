"""Train ELIM (Kim & Song, NeurIPS 2022) or its baseline, then evaluate on held-out identities.

    python examples/elim/train.py                              # ELIM, synthetic faces, ~5 min on 2 CPU cores
    python examples/elim/train.py --method baseline            # regression loss only
    python examples/elim/train.py --method elim-attention      # ELIM-Attention (appendix §4.3)
    python examples/elim/train.py --domain age --samples-per-identity 8   # ELIM-Age (§4.4)
    python examples/elim/train.py --config examples/elim/configs/afew_va.toml --data-root /data/AFEW-VA
    torchrun --nproc_per_node 2 examples/elim/train.py          # DDP (gloo on CPU, nccl on GPU)
    python examples/elim/train.py --resume                     # continue OUT/checkpoint.pt

Every flag is a field of ``elim.config.TrainConfig`` (``--help`` lists them with their
defaults); ``--config FILE`` (.toml/.json) sets fields too, and flags override it.

Outputs in ``--out``: ``train_log.jsonl`` (one record per iteration), ``eval_log.jsonl``
(every evaluation), ``metrics.json`` (final held-out metrics: rmse/sagr/pcc/ccc for
valence and arousal), ``predictions.csv``, ``checkpoint.pt``, ``run.json`` (config,
timing, machine) and the plots ``va_scatter.png`` and ``training_curves.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the `elim` package beside this file

from elim import checkpoint, distributed, plots
from elim import training as T
from elim.config import RESUMABLE_OVERRIDES, TrainConfig, parse_args


def resolve_resume(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, dict | None]:
    """With ``--resume``: the checkpoint's config, plus the run-control flags given now."""
    if cfg.out is None:
        cfg = dataclasses.replace(cfg, out=str(T.EXAMPLE_DIR / "runs" / cfg.method))
    if cfg.resume is None:
        return cfg, None
    path = Path(cfg.out) / checkpoint.CHECKPOINT_NAME if cfg.resume == "auto" else Path(cfg.resume)
    state = checkpoint.load(path)
    saved = TrainConfig.from_dict(state["config"])
    changed = sorted(k for k in given - RESUMABLE_OVERRIDES if getattr(cfg, k) != getattr(saved, k))
    if changed:
        raise ValueError(
            f"--resume continues the run saved in {path}; these settings differ from it: "
            + ", ".join(f"{k}={getattr(cfg, k)!r} (saved {getattr(saved, k)!r})" for k in changed)
        )
    overrides = {k: getattr(cfg, k) for k in given & RESUMABLE_OVERRIDES}
    overrides.setdefault("out", str(path.parent))  # results go beside the checkpoint
    overrides["resume"] = str(path)
    return dataclasses.replace(saved, **overrides), state


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run training and evaluation; returns the final held-out metrics."""
    t_start = time.perf_counter()
    # ------------------------------------------------------------------ config
    cfg, given = parse_args(argv)
    cfg, resume_state = resolve_resume(cfg, given)
    dist = distributed.setup(cfg.device)
    out = Path(cfg.out)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    # One share of the idle cores per process: oversubscribed threads slow everyone down.
    threads = cfg.threads or distributed.default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(threads)
    say = print if dist.is_main else (lambda *a, **k: None)
    say(
        f"ELIM training: method={cfg.method} backbone={cfg.backbone} data={cfg.data} "
        f"device={dist.device} processes={dist.world_size} threads/process={threads}"
    )
    if cfg.method == "elim":
        T.check_ot_grad(cfg.ot_grad)
    match_cfg = T.matching_config(cfg)

    # ------------------------------------------------------------------ data
    data_root = Path(cfg.data_root) if cfg.data_root else T.default_data_root(cfg.data)
    if cfg.synthetic_overrides:
        say(f"note: synthetic generator overridden by {cfg.synthetic_overrides}")
    t0 = time.perf_counter()
    train_set, eval_set = T.build_datasets_for(cfg, data_root)
    if cfg.method != "baseline" and train_set.domain_kind == "image":
        raise ValueError(
            f"--method {cfg.method} matches domains, but {cfg.data} has no identities here; "
            "give ages (--age-file, --domain age) for ELIM-Age, or use --method baseline"
        )
    side = train_set[0][0].shape[-1]
    cache = T.should_cache(cfg.cache, len(train_set) + len(eval_set), side)
    # The decoded images are also kept on disk beside the data, so later runs start fast.
    train_images = T.preload(train_set, cfg.workers, data_root / ".elim_cache") if cache else None
    eval_images = T.preload(eval_set, cfg.workers, data_root / ".elim_cache") if cache else None
    sampler = T.make_sampler(train_set, cfg, dist.rank, dist.world_size)
    steps_per_epoch = len(sampler)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    kind = {"identity": "identities", "age_group": "age groups", "image": "images"}
    say(
        f"data: {len(train_set)} training images of {len(train_set.identity_names)} "
        f"{kind[train_set.domain_kind]}, {len(eval_set)} held-out images of "
        f"{len(eval_set.identity_names)}; {'cached' if cache else 'streamed'} in "
        f"{time.perf_counter() - t0:.1f} s; batches of {sampler.identities_per_batch} x "
        f"{sampler.samples_per_identity}, {steps_per_epoch} per epoch, {total_steps} iterations"
    )

    # ------------------------------------------------------------------ model, optimisers
    torch.manual_seed(cfg.seed)  # same initial weights for every method with this seed
    core = T.build_model(cfg).to(dist.device)
    opt = T.build_optimizers(core, cfg)
    model = core
    if dist.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            core,
            device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            # The attention module only gets gradients in the ELIM step, not the main one.
            find_unused_parameters=core.attention is not None,
        )
    # Separate streams, all saved in checkpoints: dropout (global RNG, per rank),
    # augmentation, and the matching's domain draw + Gumbel noise.
    torch.manual_seed(cfg.seed * 1000 + 1 + dist.rank)
    gens = {
        "augment": torch.Generator().manual_seed(cfg.seed * 1000 + 2 + dist.rank),
        "matching": torch.Generator().manual_seed(cfg.seed * 1000 + 3 + dist.rank),
    }
    step, epoch, batch_in_epoch = 0, 0, 0
    if resume_state is not None:
        core.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state)
        step, epoch = resume_state["step"], resume_state["epoch"]
        batch_in_epoch = resume_state["batch_in_epoch"]
        rng = resume_state.get("rng", [])
        if len(rng) == dist.world_size:
            checkpoint.restore_rng(rng[dist.rank], gens)
        else:
            say(
                f"note: checkpoint has RNG states of {len(rng)} processes, not "
                f"{dist.world_size}; continuing with fresh random streams"
            )
        say(f"resumed from {cfg.resume} at iteration {step}")
    train_log_path, eval_log_path = out / "train_log.jsonl", out / "eval_log.jsonl"
    if dist.is_main:
        for path in (train_log_path, eval_log_path):
            if resume_state is None:
                path.unlink(missing_ok=True)
            else:
                T.truncate_jsonl(path, step)

    def save_checkpoint() -> None:
        rng_all = distributed.all_gather_object(checkpoint.capture_rng(gens))
        if dist.is_main:
            checkpoint.save(
                out / checkpoint.CHECKPOINT_NAME,
                {
                    "step": step,
                    "epoch": epoch,
                    "batch_in_epoch": batch_in_epoch,
                    "config": cfg.to_dict(),
                    "model": core.state_dict(),
                    **opt.state_dict(),
                    "rng": rng_all,
                },
            )
        distributed.barrier()

    def run_eval() -> tuple[dict, torch.Tensor, torch.Tensor]:
        metrics, pred, true = T.evaluate(
            model, eval_set, eval_images, dist.device, dist.rank, dist.world_size, cfg.workers
        )
        if dist.is_main:
            # Identity shortcut diagnostic: how much of the prediction variance is
            # between held-out identities (their labels' share is near 0).
            pred_share = T.identity_share(pred, eval_set.identities)
            record = {
                "step": step,
                "n": len(true),
                **metrics,
                "mean_ccc": (metrics["ccc_v"] + metrics["ccc_a"]) / 2,
                "pred_identity_share_v": pred_share[0],
                "pred_identity_share_a": pred_share[1],
            }
            with eval_log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        return metrics, pred, true

    # ------------------------------------------------------------------ training loop
    t_train = time.perf_counter()
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=cfg.method,
        unit="it",
        disable=not (dist.is_main and cfg.progress),
        dynamic_ncols=True,
    )
    log_file = train_log_path.open("a") if dist.is_main else None
    while step < total_steps:
        sampler.set_epoch(epoch)
        batches = T.Batches(train_set, sampler, train_images, cfg.workers, skip=batch_in_epoch)
        for images, labels, domains in batches:
            images = T.normalize(T.augment(images.to(dist.device), cfg.image_size, gens["augment"]))
            record = T.train_step(
                model,
                opt,
                images,
                labels.to(dist.device),
                domains,
                step,
                cfg,
                match_cfg,
                gens["matching"],
            )
            for scheduler in opt.schedulers.values():
                scheduler.step()
            step, batch_in_epoch = step + 1, batch_in_epoch + 1
            if batch_in_epoch == steps_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            if step % cfg.log_every == 0 or step == total_steps:
                record = distributed.all_reduce_mean(record, dist.device)
                if log_file is not None:
                    record = {
                        "step": step,
                        "epoch": epoch,
                        "lr": opt.encoder.param_groups[0]["lr"],
                        "time": round(time.perf_counter() - t_train, 3),
                        **record,
                    }
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                bar.set_postfix(
                    main=f"{record['loss_main']:.3f}",
                    elim=f"{record['loss_elim']:.3f}",
                    refresh=False,
                )
            bar.update(1)
            if step % cfg.ckpt_every == 0 or step == total_steps:
                save_checkpoint()
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                m, _, _ = run_eval()
                bar.write(
                    f"iteration {step}: CCC valence {m['ccc_v']:.3f}, arousal {m['ccc_a']:.3f}"
                )
            if step >= total_steps:
                break
    bar.close()
    if log_file is not None:
        log_file.close()
    train_seconds = time.perf_counter() - t_train
    if step == 0 or not (out / checkpoint.CHECKPOINT_NAME).exists():
        save_checkpoint()

    # ------------------------------------------------------------------ final evaluation
    metrics, pred, true = run_eval()
    in_sync = distributed.replicas_in_sync(core)
    if dist.is_main:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        with (out / "predictions.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["valence", "arousal", "pred_valence", "pred_arousal"])
            writer.writerows(torch.cat([true, pred], 1).tolist())
        if cfg.plots:
            title = f"{cfg.method}, {cfg.backbone}, {step} iterations, seed {cfg.seed}"
            plots.plot_va_scatter(pred.numpy(), true.numpy(), out / "va_scatter.png", title)
            plots.plot_training_curves(
                T.read_jsonl(train_log_path),
                T.read_jsonl(eval_log_path),
                out / "training_curves.png",
                title,
            )
        wall = time.perf_counter() - t_start
        (out / "run.json").write_text(
            json.dumps(
                {
                    "config": cfg.to_dict(),
                    "iterations": step,
                    "world_size": dist.world_size,
                    "replicas_in_sync": in_sync,
                    "train_seconds": round(train_seconds, 1),
                    "wall_seconds": round(wall, 1),
                    "threads_per_process": threads,
                    "device": str(dist.device),
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                },
                indent=2,
            )
            + "\n"
        )
        say()
        say(
            plots.format_results_table(
                metrics, f"{cfg.method} (held-out identities, n={len(true)})"
            )
        )
        say(
            f"mean CCC {(metrics['ccc_v'] + metrics['ccc_a']) / 2:.3f}; "
            f"training {train_seconds:.0f} s, total {wall:.0f} s; results in {out}"
        )
    if not in_sync:
        raise RuntimeError("DDP replicas hold different parameters at the end of training")
    distributed.cleanup()
    return metrics


if __name__ == "__main__":
    main()
