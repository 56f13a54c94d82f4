"""Rigid registration of two point clouds by minimising ``SinkhornLoss`` with Adam.

Run: ``python examples/registration.py [--n 300] [--steps 100] [--out FIGURE.png]`` (a
few seconds on a CPU; the figure, optional, needs matplotlib). A 3-D shape (a trefoil
knot, which has no symmetry a rigid motion could confuse with the truth) is moved by a
known rotation, scaling and translation and its points are shuffled and jittered, so no
correspondence is known. The similarity transform ``y ≈ s R x + t`` (rotation as an axis
times an angle, ``log s``, ``t``: 7 parameters) is recovered by Adam on the Sinkhorn
divergence ``S(s R x + t, y)`` alone; the script prints the recovered parameters against
the truth.
"""

from __future__ import annotations

import argparse
import math

import torch

from sinkhorn_ot import SinkhornLoss


def trefoil(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points ``(n, 3)`` along a trefoil knot, centred, of radius about 1."""
    t = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    points = torch.stack(
        ((t.sin() + 2 * (2 * t).sin()), (t.cos() - 2 * (2 * t).cos()), -(3 * t).sin()), -1
    )
    return (points - points.mean(0)) / 3


def rotation(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rotation matrix ``(3, 3)`` of an axis-angle vector ``v (3,)`` (Rodrigues' formula).

    Written as ``I + sin(θ)/θ [v]× + (1 - cos θ)/θ² [v]×²`` with ``θ = |v|``: linear in
    ``v`` near 0, so the gradient at the identity (the starting point) is not zero.
    """
    theta = (axis_angle.square().sum() + 1e-24).sqrt()
    zero = torch.zeros((), dtype=axis_angle.dtype)
    v = axis_angle
    cross = torch.stack(
        (
            torch.stack((zero, -v[2], v[1])),
            torch.stack((v[2], zero, -v[0])),
            torch.stack((-v[1], v[0], zero)),
        )
    )
    eye = torch.eye(3, dtype=axis_angle.dtype)
    return eye + (theta.sin() / theta) * cross + ((1 - theta.cos()) / theta**2) * (cross @ cross)


def transform(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """``s R x + t`` for points ``x (N, 3)``."""
    matrix = params["log_scale"].exp() * rotation(params["axis_angle"])
    return x @ matrix.T + params["translation"]


def problem(n: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Source ``x (n, 3)``, target ``y (n, 3)`` and the true parameters."""
    generator = torch.Generator().manual_seed(seed)
    x = trefoil(n, generator)
    truth = {
        "axis_angle": torch.tensor([0.3, -0.5, 0.6], dtype=torch.float64),  # 47 degrees
        "log_scale": torch.tensor(math.log(1.3), dtype=torch.float64),
        "translation": torch.tensor([0.4, -0.2, 0.3], dtype=torch.float64),
    }
    with torch.no_grad():
        y = transform(x, truth)[torch.randperm(n, generator=generator)]
        y = y + noise * torch.randn(y.shape, generator=generator, dtype=y.dtype)
    return x, y, truth


def register(
    n: int = 300,
    steps: int = 100,
    blur: float = 0.02,
    lr: float = 0.05,
    noise: float = 0.005,
    seed: int = 0,
) -> dict:
    """Recover the transform; returns the parameters, the truth, losses and errors."""
    x, y, truth = problem(n, noise, seed)
    params = {
        "axis_angle": torch.zeros(3, dtype=torch.float64, requires_grad=True),
        "log_scale": torch.zeros((), dtype=torch.float64, requires_grad=True),
        # Start from the centroid offset: a translation guess that needs no matching.
        "translation": (y.mean(0) - x.mean(0)).clone().requires_grad_(True),
    }
    optimiser = torch.optim.Adam(params.values(), lr=lr)
    loss = SinkhornLoss(blur=blur)
    losses = []
    for _ in range(steps):
        optimiser.zero_grad()
        value = loss(transform(x, params), y)
        value.backward()
        optimiser.step()
        losses.append(float(value.detach()))
    with torch.no_grad():
        found = {k: v.detach() for k, v in params.items()}
        losses.append(float(loss(transform(x, found), y)))
        # Angle of R_found^T R_true: 0 when the rotations agree.
        relative = rotation(found["axis_angle"]).T @ rotation(truth["axis_angle"])
        cosine = ((relative.trace() - 1) / 2).clamp(-1, 1)
        errors = {
            "rotation_deg": math.degrees(math.acos(float(cosine))),
            "scale": abs(math.exp(found["log_scale"]) / math.exp(truth["log_scale"]) - 1),
            "translation": float((found["translation"] - truth["translation"]).norm()),
        }
    return {"found": found, "truth": truth, "losses": losses, "errors": errors, "x": x, "y": y}


def report(result: dict) -> str:
    """The recovered parameters against the truth, as printed by ``main``."""
    found, truth, errors = result["found"], result["truth"], result["errors"]

    def vector(v):
        return "[" + ", ".join(f"{float(c):+.3f}" for c in v.reshape(-1)) + "]"

    lines = [
        f"S(s R x + t, y): {result['losses'][0]:.3e} -> {result['losses'][-1]:.3e}",
        "parameter        recovered                 truth",
        f"axis*angle       {vector(found['axis_angle']):25s} {vector(truth['axis_angle'])}",
        f"scale            {math.exp(found['log_scale']):<25.4f} {math.exp(truth['log_scale']):.4f}",
        f"translation      {vector(found['translation']):25s} {vector(truth['translation'])}",
        f"errors: rotation {errors['rotation_deg']:.2f} deg, scale {errors['scale']:.2e} "
        f"(relative), translation {errors['translation']:.2e}",
    ]
    return "\n".join(lines)


def figure(result: dict, out: str) -> None:
    """Source, target and registered source (3-D scatter), and the loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = result["x"], result["y"]
    with torch.no_grad():
        moved = transform(x, result["found"])
    fig = plt.figure(figsize=(7.5, 3.2))
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    ax.scatter(*x.T, s=2, c="tab:blue", label="source x")
    ax.scatter(*y.T, s=12, c="tab:orange", alpha=0.3, label="target y")
    ax.scatter(*moved.T, s=1, c="tab:green", label="s R x + t (recovered)")
    ax.legend(fontsize=7, markerscale=3, loc="upper left")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_zticks([])
    curve = fig.add_subplot(1, 2, 2)
    curve.semilogy(result["losses"])
    curve.set_xlabel("Adam step", fontsize=8)
    curve.set_title("S(s R x + t, y)", fontsize=8)
    curve.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="points per cloud")
    p.add_argument("--steps", type=int, default=100, help="Adam steps")
    p.add_argument("--blur", type=float, default=0.02)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--noise", type=float, default=0.005, help="jitter of the target points")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="save a figure there (optional)")
    args = p.parse_args(argv)
    result = register(args.n, args.steps, args.blur, args.lr, args.noise, args.seed)
    print(report(result))
    if args.out is not None:
        figure(result, args.out)
        print(f"figure saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
