"""Entropic OT between two point clouds without ever storing the cost or the plan.

Run: ``python examples/point_clouds.py [--n 2000] [--eps 0.05] [--out FIGURE.png]``
(a few seconds on a CPU; the figure needs matplotlib). It solves
``sinkhorn(PointCloud(x, y, scale=0.5), eps=...)`` (GeomLoss's ``p=2`` cost
``|x - y|^2 / 2``), prints the transport cost, maps each source point to its barycentric
image ``plan @ y / plan.marginals()[0]``, takes one gradient step on ``x`` along
``-d value / dx`` (the envelope gradient ``a_i x_i - (P y)_i``: a step of size ``1/a_i``
moves every point onto its image), and saves a figure of the clouds and the map.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile

import torch

from sinkhorn_ot import PointCloud, sinkhorn


def clouds(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian blob ``x (n, 2)`` and a ring ``y (n, 2)``."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 2, generator=gen) + torch.tensor([-1.0, 0.0])
    angle = 2 * math.pi * torch.rand(n, generator=gen)
    radius = 1.0 + 0.1 * torch.randn(n, generator=gen)
    y = torch.stack((radius * angle.cos(), radius * angle.sin()), -1) + torch.tensor([1.5, 0.0])
    return x, y


def run(n: int = 2000, eps: float = 0.05, out: str | None = None, seed: int = 0) -> dict:
    """Solve, map, step; save the figure to ``out`` (if given). Returns the numbers."""
    x, y = clouds(n, seed)
    x.requires_grad_(True)
    res = sinkhorn(PointCloud(x, y, scale=0.5), eps=eps, grad="envelope", tol=1e-4)
    plan = res.plan  # a LazyPlan: products, never an (n, n) tensor
    rows, _ = plan.marginals()
    with torch.no_grad():
        mapped = (plan @ y) / rows.unsqueeze(-1)  # barycentric map T(x_i)

    res.value.backward()  # envelope gradient: a_i x_i - (P y)_i for scale=0.5
    with torch.no_grad():
        stepped = x - x.grad / rows.unsqueeze(-1)  # step 1/a_i: onto T(x_i)
        after = sinkhorn(PointCloud(stepped, y, scale=0.5), eps=eps, grad="none", tol=1e-4)
    numbers = {
        "n": n,
        "iterations": int(res.n_iter),
        "transport_cost": float(res.value_linear),
        "value": float(res.value.detach()),
        "value_after_step": float(after.value),
        "step_matches_map": bool(torch.allclose(stepped, mapped, atol=1e-4)),
    }
    print(
        f"n={n} eps={eps}: {numbers['iterations']} iterations, transport cost <C, P> = "
        f"{numbers['transport_cost']:.4f}, value {numbers['value']:.4f} -> "
        f"{numbers['value_after_step']:.4f} after one gradient step on x"
    )
    print(f"the gradient step lands on the barycentric map: {numbers['step_matches_map']}")
    if out is not None:
        _figure(x.detach(), y, mapped, out)
        numbers["figure"] = out
        print(f"figure saved to {out}")
    return numbers


def _figure(x: torch.Tensor, y: torch.Tensor, mapped: torch.Tensor, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(*y.T, s=2, c="tab:orange", label="target y")
    ax.scatter(*x.T, s=2, c="tab:blue", label="source x")
    ax.scatter(*mapped.T, s=2, c="tab:green", label="barycentric map of x")
    shown = torch.linspace(0, len(x) - 1, min(len(x), 60)).long()
    for i in shown.tolist():
        ax.plot(*torch.stack((x[i], mapped[i])).T, c="grey", lw=0.4, alpha=0.6)
    ax.set_aspect("equal")
    ax.legend(loc="upper left", markerscale=4, fontsize=8)
    ax.set_title("PointCloud(x, y, scale=0.5): plan @ y / plan.marginals()[0]")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="points per cloud")
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument(
        "--out",
        default=os.path.join(tempfile.gettempdir(), "sinkhorn_ot_point_clouds.png"),
        help="where to save the figure (default: in the temporary directory)",
    )
    args = p.parse_args(argv)
    run(args.n, args.eps, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
