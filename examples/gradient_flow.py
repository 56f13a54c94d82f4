"""A point cloud flows onto a target shape by gradient descent on ``SinkhornLoss``.

Run: ``python examples/gradient_flow.py [--n 500] [--steps 40] [--target ring]
[--out FIGURE.png]`` (a few seconds on a CPU at the default size; the figure needs
matplotlib). A Gaussian blob ``x`` descends the Sinkhorn divergence ``S(x, y)`` to a
target ``y`` (a ring, two moons or a spiral). The gradient of ``S`` w.r.t. a point is its
weight ``1/n`` times a displacement (for ``p=2``: its entropic barycentric image in ``y``
minus its image in ``x`` itself), so each step moves the points by ``-lr * n * grad``, a
fraction ``lr`` of that displacement (Feydy et al. 2019, "Interpolating between optimal
transport and MMD using Sinkhorn divergences"). The figure shows the cloud at a few
steps and the loss curve.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile

import torch

from sinkhorn_ot import SinkhornLoss

TARGETS = ("ring", "moons", "spiral")


def source_cloud(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian blob ``(n, 2)`` left of the target."""
    return 0.25 * torch.randn(n, 2, generator=generator) + torch.tensor([-1.5, 0.0])


def target_cloud(shape: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points ``(n, 2)`` of a ring, two moons or a spiral, about the origin."""
    noise = 0.03 * torch.randn(n, 2, generator=generator)
    t = torch.rand(n, generator=generator)
    if shape == "ring":
        angle = 2 * math.pi * t
        points = torch.stack((angle.cos(), angle.sin()), -1)
    elif shape == "moons":
        upper = torch.arange(n) < n // 2
        angle = math.pi * t
        points = torch.where(
            upper.unsqueeze(-1),
            torch.stack((angle.cos(), angle.sin()), -1),
            torch.stack((1 - angle.cos(), 0.5 - angle.sin()), -1),
        ) - torch.tensor([0.5, 0.25])
    elif shape == "spiral":
        angle = 3 * math.pi * t.sqrt()
        radius = 0.15 + 0.3 * angle / math.pi
        points = torch.stack((radius * angle.cos(), radius * angle.sin()), -1)
    else:
        raise ValueError(f"`shape` must be one of {TARGETS}, got {shape!r}")
    return points + noise


def flow(
    n: int = 500,
    steps: int = 40,
    target: str = "ring",
    blur: float = 0.05,
    lr: float = 0.25,
    snapshots: int = 5,
    seed: int = 0,
) -> dict:
    """Run the flow. Returns the losses ``(steps + 1,)``, the snapshots and the target."""
    generator = torch.Generator().manual_seed(seed)
    x = source_cloud(n, generator)
    y = target_cloud(target, n, generator)
    loss = SinkhornLoss(blur=blur)
    # Snapshots crowd the start, where the cloud moves most.
    shown = sorted({round(steps * (k / (snapshots - 1)) ** 2) for k in range(snapshots)})
    losses, frames = [], {}
    for step in range(steps + 1):
        x.requires_grad_(True)
        value = loss(x, y)
        losses.append(float(value.detach()))
        if step in shown:
            frames[step] = x.detach().clone()
        if step == steps:
            break
        (grad,) = torch.autograd.grad(value, x)
        # grad_i = (1/n) * displacement_i: scale by n so that lr is in units of a full
        # step to the barycentric target, whatever the number of points.
        x = (x - lr * n * grad).detach()
    return {"losses": losses, "frames": frames, "target": y, "blur": blur, "shape": target}


def figure(result: dict, out: str) -> None:
    """Save the snapshots and the loss curve of :func:`flow`'s result to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = result["frames"]
    y = result["target"]
    every = torch.cat([y, *frames.values()])
    low, high = (every.amin(0) - 0.1).tolist(), (every.amax(0) + 0.1).tolist()
    fig, axes = plt.subplots(1, len(frames) + 1, figsize=(2.4 * (len(frames) + 1), 2.6))
    for ax, (step, x) in zip(axes, frames.items(), strict=False):
        ax.scatter(*y.T, s=1, c="tab:orange", alpha=0.4)
        ax.scatter(*x.T, s=1, c="tab:blue")
        ax.set_title(f"step {step}: S = {result['losses'][step]:.2e}", fontsize=8)
        ax.set_xlim(low[0], high[0])
        ax.set_ylim(low[1], high[1])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    curve = axes[-1]
    curve.semilogy(result["losses"], c="tab:blue")
    curve.set_xlabel("step", fontsize=8)
    curve.set_title(f"S(x, y), blur={result['blur']}", fontsize=8)
    curve.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500, help="points per cloud")
    p.add_argument("--steps", type=int, default=40, help="gradient steps")
    p.add_argument("--target", choices=TARGETS, default="ring")
    p.add_argument("--blur", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=0.25, help="step, in units of 1/n")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=os.path.join(tempfile.gettempdir(), "sinkhorn_ot_gradient_flow.png"),
        help="where to save the figure (default: in the temporary directory)",
    )
    args = p.parse_args(argv)
    result = flow(args.n, args.steps, args.target, args.blur, args.lr, seed=args.seed)
    losses = result["losses"]
    print(
        f"n={args.n} target={args.target} blur={args.blur}: S(x, y) {losses[0]:.4e} -> "
        f"{losses[-1]:.4e} after {args.steps} steps ({losses[0] / losses[-1]:.0f}x smaller)"
    )
    figure(result, args.out)
    print(f"figure saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
