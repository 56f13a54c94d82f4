"""Outliers: balanced OT must transport them, unbalanced OT leaves them out.

Run: ``python examples/unbalanced_outliers.py [--n 200] [--outliers 10] [--rho 0.5]
[--out FIGURE.png]`` (about a second on a CPU; the figure needs matplotlib). Two clouds
of the same shape, the second shifted, plus a few far outliers in the second. The
balanced plan (``sinkhorn(C, eps=...)``) must send mass to every outlier, because every
column marginal is a hard constraint; the unbalanced plan (``rho_a = rho_b = rho``) pays
``rho KL`` for the mass it does not deliver instead of the outliers' large transport
cost, and leaves them almost empty. It prints the mass each plan sends to the outliers
and saves a figure of both plans (a line per heavy pair).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from sinkhorn_ot import sinkhorn, sqeuclidean


def clouds(n: int, outliers: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (n, 2)`` and ``y (n + outliers, 2)``: a blob, the blob shifted, far points."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.25 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    y = 0.25 * torch.randn(n, 2, generator=gen, dtype=torch.float64) + torch.tensor([0.6, 0.0])
    far = torch.randn(outliers, 2, generator=gen, dtype=torch.float64) * 0.3
    far = far + torch.tensor([0.3, 2.0], dtype=torch.float64)
    return x, torch.cat([y, far])


def solve(n: int, outliers: int, rho: float, eps: float = 0.01):
    """The balanced and the unbalanced plans and the mass each sends to the outliers."""
    x, y = clouds(n, outliers)
    C = sqeuclidean(x, y)
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    b = torch.full((n + outliers,), 1.0 / (n + outliers), dtype=torch.float64)
    balanced = sinkhorn(C, a, b, eps=eps, eps_scaling=0.7)
    unbalanced = sinkhorn(C, a, b, eps=eps, rho_a=rho, rho_b=rho, eps_scaling=0.7)
    to_outliers = {
        "balanced": float(balanced.plan[:, n:].sum()),
        "unbalanced": float(unbalanced.plan[:, n:].sum()),
        "unbalanced total": float(unbalanced.plan.sum()),
    }
    return x, y, balanced, unbalanced, to_outliers


def plot(x, y, n, balanced, unbalanced, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharex=True, sharey=True)
    for ax, res, title in ((axes[0], balanced, "balanced"), (axes[1], unbalanced, "unbalanced")):
        plan = res.plan
        heavy = (plan > 0.2 * plan.max()).nonzero()
        for i, j in heavy.tolist():
            alpha = float(plan[i, j] / plan.max())
            ax.plot([x[i, 0], y[j, 0]], [x[i, 1], y[j, 1]], color="0.4", lw=0.6, alpha=alpha)
        ax.scatter(x[:, 0], x[:, 1], s=8, label="source")
        ax.scatter(y[:n, 0], y[:n, 1], s=8, label="target")
        ax.scatter(y[n:, 0], y[n:, 1], s=30, marker="x", color="red", label="outliers")
        sent = float(plan[:, n:].sum())
        ax.set_title(f"{title} OT: {sent:.1%} of the mass to the outliers")
        ax.set_aspect("equal")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--outliers", type=int, default=10)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "outliers.png"))
    args = parser.parse_args(argv)
    x, y, balanced, unbalanced, to_outliers = solve(args.n, args.outliers, args.rho)
    for name in ("balanced", "unbalanced"):
        print(f"{name}: {to_outliers[name]:.4f} of the mass goes to the {args.outliers} outliers")
    print(f"unbalanced: {to_outliers['unbalanced total']:.4f} transported in all")
    try:
        plot(x, y, args.n, balanced, unbalanced, args.out)
        print(f"figure: {args.out}")
    except ImportError:
        print("figure skipped: matplotlib is not installed")
    return to_outliers


if __name__ == "__main__":
    main()
