"""Train ELIM (Kim & Song, NeurIPS 2022) or its baseline, then evaluate on held-out identities.

    python examples/elim/train.py                              # ELIM, synthetic faces, ~3.5 min of CPU
    python examples/elim/train.py --method baseline            # regression loss only
    python examples/elim/train.py --method elim-attention      # ELIM-Attention (appendix §4.3)
    python examples/elim/train.py --domain age                 # ELIM-Age (§4.4): age groups as domains
    python examples/elim/train.py --confounding strong         # the strongly confounded faces
    python examples/elim/train.py --config examples/elim/configs/paper_afew_va.toml --data-root /data/AFEW-VA
    torchrun --nproc_per_node 2 examples/elim/train.py          # DDP (gloo on CPU, nccl on GPU)
    python examples/elim/train.py --resume                     # continue OUT/checkpoint.pt

Every flag is a field of ``elim.config.TrainConfig`` (``--help`` lists them with their
defaults); ``--config FILE`` (.toml/.json) sets fields too, and flags override it.

One iteration is :func:`train_step` below; the rest of this file is the run around it
(data, model, loop, logs, checkpoints, evaluation).

Outputs in ``--out``: ``train_log.jsonl`` (one record per iteration), ``eval_log.jsonl``
(every evaluation), ``metrics.json`` (final held-out metrics: rmse/sagr/pcc/ccc for
valence and arousal), ``predictions.csv``, ``checkpoint.pt``, ``run.json`` (config,
timing, machine) and the plots ``va_scatter.png`` and ``training_curves.png``.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the `elim` package beside this file

from elim import checkpoint, distributed, matching, metrics, plots
from elim.config import MATCHING_METHODS, TrainConfig, matching_config, parse_args
from elim.data import pipeline
from elim.data.base import augment, normalize
from elim.losses import elim_loss, regression_loss, warmup_ramp
from elim.models import ELIMModel, Optimizers, build_model, build_optimizers, frozen_bn_stats

import sinkhorn_ot

EXAMPLE_DIR = Path(__file__).resolve().parent


def train_step(
    model: torch.nn.Module,
    opt: Optimizers,
    images: torch.Tensor,
    labels: torch.Tensor,
    domains: torch.Tensor,
    step: int,
    cfg: TrainConfig,
    match_cfg: matching.MatchingConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """One training iteration; returns its log record.

    ``update="two-step"`` (the released code): main step, then the ELIM step on features
    recomputed by the updated encoder, each with its own optimiser step.
    ``update="combined"``: one backward of main + ELIM loss and one optimiser step.

    Args:
        model: the :class:`elim.models.ELIMModel`, possibly wrapped in DDP.
        opt: encoder, projector (and attention) optimisers.
        images: normalised, augmented batch ``(B, 3, S, S)`` on the device.
        labels: ``(B, 2)`` on the device.
        domains: ``(B,)`` identity (or age-group) ids, on the CPU.
        step: 0-based iteration, for the warm-up ramp.
        cfg: training settings.
        match_cfg: matching settings (:func:`elim.config.matching_config`).
        generator: CPU generator of the domain draw and the Gumbel noise.

    Returns:
        ``loss_main``, ``loss_elim`` (weighted, as optimised; 0 for the baseline and
        during warm-up), ``ramp``, ``step_seconds`` and, for ELIM steps, ``shift_mean``,
        ``n_domains``, ``grad_norm`` (encoder, before clipping) and
        ``matching_seconds`` (grouping to normalised features).
    """
    t_step = _clock(images.device)
    core: ELIMModel = getattr(model, "module", model)
    ramp = (
        warmup_ramp(step, cfg.ramp_start, cfg.ramp_end) if cfg.method in MATCHING_METHODS else 0.0
    )
    record = {"loss_main": 0.0, "loss_elim": 0.0, "ramp": ramp}
    model.train()

    # ---- main step: f_theta(f_phi(x)) against the labels
    z, pred = model(images)
    loss_main = regression_loss(pred, labels)  # MSE_v + MSE_a + (L_PCC + L_CCC) / 2
    record["loss_main"] = loss_main.item()
    if ramp == 0.0 or cfg.update == "two-step":
        opt.zero_grad()
        loss_main.backward()
        opt.step()
        if ramp == 0.0:  # the baseline, or ELIM before its warm-up
            record["step_seconds"] = _clock(images.device) - t_step
            return record
        z, _ = model(images, project=False)  # fresh features from the updated encoder

    # ---- matching step (appendix Algorithm 2); the shift comes from detached features
    # (as released) unless --ot-grad differentiates through the solver
    t_match = _clock(images.device)
    sets = matching.sample_sets(labels, domains, match_cfg, generator)  # ID grouping, Gumbel top-k
    if sets is None:  # fewer than two domains in this batch: nothing to match
        loss_elim = sum(p.sum() for p in core.parameters()) * 0.0  # keeps DDP buckets complete
        record.update(n_domains=0.0, shift_mean=0.0)
    else:
        source = z.detach() if match_cfg.detach_shift else z
        ref, tgt, tgt_mask = source[sets.reference], source[sets.targets], sets.target_mask
        if cfg.method == "elim-attention":  # a learned weight replaces the OT shift
            mu = core.attention(ref, tgt, tgt_mask)
        else:
            cost = matching.pairwise_cost(ref, tgt, tgt_mask)  # (T, n, m): 1 - cos
            a, b = matching.relevance_weights(ref, tgt, tgt_mask, match_cfg.mass)
            plan = sinkhorn_ot.sinkhorn(  # every (reference, target) pair in ONE call
                cost,
                a,
                b,
                eps=match_cfg.eps,
                method=match_cfg.method,
                max_iter=match_cfg.max_iter,
                tol=match_cfg.tol,
                grad=match_cfg.grad,
                backend=match_cfg.backend,
            ).plan
            mu = (plan * cost).sum(1)  # ID shift mu_j = sum_i X_ij M_ij, (T, m)
            if match_cfg.shift == "scalar":  # the released code's single value per pair
                mu = mu[:, :1].expand_as(mu)
            mu = mu.masked_fill(~tgt_mask, 0.0)
        z_hat = matching.shift_and_normalize(z[sets.targets], mu, match_cfg.rms_eps)  # RMS
        matched = sets.assemble(z[sets.reference], z_hat, mu, labels)
        record["matching_seconds"] = _clock(images.device) - t_match
        record.update(
            n_domains=float(matched.mask.shape[0]),
            shift_mean=matched.shift[matched.mask[1:]].mean().item(),
        )
        # ---- ELIM loss: sum over the chosen identities of MSE(f_theta(z_hat_e), y_e)
        with frozen_bn_stats(core.projector, cfg.elim_bn_stats == "freeze"):
            loss_elim = elim_loss(
                core.projector,
                matched.features,
                matched.labels,
                matched.mask,
                ramp=ramp,
                weight=cfg.elim_weight,
                per_domain=cfg.per_domain_projector,
            )
        record["loss_elim"] = loss_elim.item()

    if cfg.update == "combined":  # one backward of both losses, one optimiser step
        loss = loss_main + loss_elim
    else:  # two-step: the ELIM step alone (the main step was taken above)
        loss = loss_elim
    opt.zero_grad()
    loss.backward()
    record["grad_norm"] = _clip(core.encoder, cfg.clip_grad)
    opt.step()
    record["step_seconds"] = _clock(images.device) - t_step
    return record


def _clip(encoder: torch.nn.Module, max_norm: float) -> float:
    """Clip the encoder's gradient norm (0 = only measure it); return the norm before."""
    params = [p for p in encoder.parameters() if p.grad is not None]
    if not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))


def _clock(device: torch.device) -> float:
    """Wall time in seconds, after the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run training and evaluation; returns the final held-out metrics."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    # ------------------------------------------------------------------ config
    cfg, given = parse_args(argv)
    cfg, resume_state = checkpoint.resolve_resume(cfg, given, EXAMPLE_DIR / "runs" / cfg.method)
    dist = distributed.setup(cfg.device)
    out = Path(cfg.out)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    # A fixed thread count: the count changes the order of float sums, so one that
    # followed the machine's load would change the numbers with it.
    torch.set_num_threads(cfg.threads)
    say = print if dist.is_main else (lambda *a, **k: None)
    say(
        f"ELIM training: method={cfg.method} backbone={cfg.backbone} data={cfg.data} "
        f"device={dist.device} processes={dist.world_size} threads/process={cfg.threads}"
    )
    match_cfg = matching_config(cfg)

    # ------------------------------------------------------------------ data
    data_root = (
        Path(cfg.data_root)
        if cfg.data_root
        else pipeline.default_data_root(cfg.data, cfg.confounding)
    )
    if cfg.synthetic_overrides:
        say(f"note: synthetic generator overridden by {cfg.synthetic_overrides}")
    t0 = time.perf_counter()
    train_set, eval_set = pipeline.build_training_data(cfg, data_root)
    if cfg.method != "baseline" and train_set.domain_kind == "image":
        raise ValueError(
            f"--method {cfg.method} matches domains, but {cfg.data} has no identities here; "
            "give ages (--age-file, --domain age) for ELIM-Age, or use --method baseline"
        )
    side = train_set[0][0].shape[-1]
    cache = pipeline.should_cache(cfg.cache, len(train_set) + len(eval_set), side)
    # The decoded images are also kept on disk beside the data, so later runs start fast.
    cache_dir = data_root / ".elim_cache"
    train_images = pipeline.preload(train_set, cfg.workers, cache_dir) if cache else None
    eval_images = pipeline.preload(eval_set, cfg.workers, cache_dir) if cache else None
    sampler, layout = pipeline.make_sampler(train_set, cfg, dist.rank, dist.world_size)
    if layout.note:
        say(f"note: {layout.note}")
    steps_per_epoch = len(sampler)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    kind = {"identity": "identities", "age_group": "age groups", "image": "images"}
    held_out = "validation" if cfg.validation_identities else "held-out"
    say(
        f"data: {len(train_set)} training images of {len(train_set.identity_names)} "
        f"{kind[train_set.domain_kind]}, {len(eval_set)} {held_out} images; "
        f"{'cached' if cache else 'streamed'} in {time.perf_counter() - t0:.1f} s; batches of "
        f"{layout.domains} x {layout.samples}, {steps_per_epoch} per epoch, {total_steps} iterations"
    )
    if cfg.method == "elim":
        say(f"matching: sinkhorn backend {_matching_backend(match_cfg, dist.device)}")

    # ------------------------------------------------------------------ model, optimisers
    torch.manual_seed(cfg.seed)  # same initial weights for every method with this seed
    core = build_model(cfg).to(dist.device)
    opt = build_optimizers(core, cfg)
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
                checkpoint.truncate_jsonl(path, step)

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
        scores, pred, true = metrics.evaluate(
            model, eval_set, eval_images, dist.device, dist.rank, dist.world_size, cfg.workers
        )
        if dist.is_main:
            # Identity shortcut diagnostic: how much of the prediction variance is
            # between held-out identities (their labels' share is near 0).
            pred_share = metrics.identity_share(pred, eval_set.identities)
            checkpoint.append_jsonl(
                eval_log_path,
                {
                    "step": step,
                    "n": len(true),
                    **scores,
                    "mean_ccc": (scores["ccc_v"] + scores["ccc_a"]) / 2,
                    "pred_identity_share_v": pred_share[0],
                    "pred_identity_share_a": pred_share[1],
                },
            )
        return scores, pred, true

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
    seconds = {"step": 0.0, "matching": 0.0}  # this run's totals, for the matching's share
    while step < total_steps:
        sampler.set_epoch(epoch)
        batches = pipeline.Batches(train_set, sampler, train_images, cfg.workers, batch_in_epoch)
        for images, labels, domains in batches:
            images = normalize(augment(images.to(dist.device), cfg.image_size, gens["augment"]))
            record = train_step(
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
            seconds["step"] += record["step_seconds"]
            seconds["matching"] += record.get("matching_seconds", 0.0)
            if step % cfg.log_every == 0 or step == total_steps:
                record = distributed.all_reduce_mean(record, dist.device)
                record["matching_share"] = record.get("matching_seconds", 0.0) / max(
                    record["step_seconds"], 1e-12
                )
                if dist.is_main:
                    checkpoint.append_jsonl(
                        train_log_path,
                        {
                            "step": step,
                            "epoch": epoch,
                            "lr": opt.encoder.param_groups[0]["lr"],
                            "time": round(time.perf_counter() - t_train, 3),
                            **record,
                        },
                    )
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
    train_seconds = time.perf_counter() - t_train
    if step == 0 or not (out / checkpoint.CHECKPOINT_NAME).exists():
        save_checkpoint()
    matching_share = seconds["matching"] / seconds["step"] if seconds["step"] else 0.0
    if cfg.method in MATCHING_METHODS:
        say(
            f"matching step: {matching_share:.1%} of the training steps' time "
            f"({seconds['matching']:.1f} of {seconds['step']:.1f} s)"
        )

    # ------------------------------------------------------------------ final evaluation
    scores, pred, true = run_eval()
    in_sync = distributed.replicas_in_sync(core)
    if dist.is_main:
        (out / "metrics.json").write_text(json.dumps(scores, indent=2) + "\n")
        with (out / "predictions.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["valence", "arousal", "pred_valence", "pred_arousal"])
            writer.writerows(torch.cat([true, pred], 1).tolist())
        if cfg.plots:
            title = f"{cfg.method}, {cfg.backbone}, {step} iterations, seed {cfg.seed}"
            plots.plot_va_scatter(pred.numpy(), true.numpy(), out / "va_scatter.png", title)
            plots.plot_training_curves(
                checkpoint.read_jsonl(train_log_path),
                checkpoint.read_jsonl(eval_log_path),
                out / "training_curves.png",
                title,
            )
        wall = time.perf_counter() - t_start
        (out / "run.json").write_text(
            json.dumps(
                {
                    "config": cfg.to_dict(),
                    "iterations": step,
                    "batch_layout": [layout.domains, layout.samples],
                    "world_size": dist.world_size,
                    "replicas_in_sync": in_sync,
                    "train_seconds": round(train_seconds, 1),
                    "wall_seconds": round(wall, 1),
                    # CPU time hardly depends on other jobs: the cost on an idle machine.
                    "cpu_seconds": round(time.process_time() - cpu_start, 1),
                    "matching_share": round(matching_share, 4),
                    "threads_per_process": cfg.threads,
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
                scores, f"{cfg.method} ({held_out} identities, n={len(true)})"
            )
        )
        say(
            f"mean CCC {(scores['ccc_v'] + scores['ccc_a']) / 2:.3f}; "
            f"training {train_seconds:.0f} s, total {wall:.0f} s "
            f"({time.process_time() - cpu_start:.0f} s of CPU); results in {out}"
        )
    if not in_sync:
        raise RuntimeError("DDP replicas hold different parameters at the end of training")
    distributed.cleanup()
    return scores


def _matching_backend(match_cfg: matching.MatchingConfig, device: torch.device) -> str:
    """Which solver backend ``backend="auto"`` resolves to here (building it if needed)."""
    if match_cfg.backend == "torch":
        return "torch (chosen)"
    from sinkhorn_ot import native

    ok, reason = native.availability(device, torch.float32)
    if match_cfg.backend == "native":
        return "native (chosen)"
    return "native (auto)" if ok and match_cfg.grad != "unroll" else f"torch (auto: {reason})"


if __name__ == "__main__":
    main()
