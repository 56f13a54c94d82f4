"""Unbalanced OT rows: batched dense problems against POT, point clouds against GeomLoss.

POT has no batched unbalanced solver: its rows are a Python loop over the batch of
``ot.unbalanced.sinkhorn_unbalanced(a, b, M, reg, reg_m, reg_type="kl")`` and of
``ot.solve(M, a, b, reg=eps, unbalanced=rho, unbalanced_type="KL")``. Every dense row
runs exactly ``ITERS`` iterations (no stopping test), so that the time per iteration is
what is compared. The point-cloud row runs GeomLoss ``SamplesLoss("sinkhorn", p=2,
blur=eps ** (1 / 2), reach=rho ** (1 / 2), scaling=s, debias=False)``, which anneals eps
with the factor ``s`` and stops when its schedule ends, against ours with the same
annealing (``eps_scaling=s``) to ``tol``: whole calls, same cost ``|x - y|^2 / 2``.
Results: ``<out>/<device>-unbalanced.md`` (:func:`render`), ratios peer / ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sinkhorn_ot import PointCloud, sinkhorn

#: Iterations of every dense row (fixed: per-iteration time).
ITERS = 100
#: Relaxation and regularisation of every row.
RHO, EPS = 0.5, 0.05
#: Dense cases (B, N, M) on the CPU grid.
DENSE_CASES = [(64, 128, 128), (16, 512, 512)]
#: Point-cloud cases (N, D) and the annealing factor.
PC_CASES = [(2000, 3), (5000, 3)]
PC_SCALING = 0.9


@dataclass
class DenseCase:
    name: str
    C: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor


def dense_case(B: int, N: int, M: int) -> DenseCase:
    gen = torch.Generator().manual_seed(B + N + M)
    C = torch.rand(B, N, M, generator=gen, dtype=torch.float64)
    a = torch.rand(B, N, generator=gen, dtype=torch.float64) + 0.5
    b = torch.rand(B, M, generator=gen, dtype=torch.float64) + 0.5
    a, b = a / a.sum(-1, keepdim=True), 2 * b / b.sum(-1, keepdim=True)  # masses 1 and 2
    return DenseCase(f"{B}x{N}x{M}", C, a, b)


def ours_dense(case: DenseCase, backend: str, method: str = "log"):
    res = sinkhorn(
        case.C, case.a, case.b, eps=EPS, rho_a=RHO, rho_b=RHO, tol=None, max_iter=ITERS,
        backend=backend, grad="none", method=method,
    )  # fmt: skip
    return res.plan


def pot_loop(case: DenseCase):
    import ot

    C, a, b = case.C.numpy(), case.a.numpy(), case.b.numpy()
    plans = [
        ot.unbalanced.sinkhorn_unbalanced(
            a[k], b[k], C[k], EPS, RHO, reg_type="kl", numItermax=ITERS, stopThr=0.0
        )
        for k in range(C.shape[0])
    ]
    return torch.from_numpy(np.stack(plans))


def pot_solve_loop(case: DenseCase):
    import ot

    C, a, b = case.C.numpy(), case.a.numpy(), case.b.numpy()
    plans = [
        ot.solve(
            C[k], a[k], b[k], reg=EPS, unbalanced=RHO, unbalanced_type="KL", max_iter=ITERS,
            tol=0.0,
        ).plan
        for k in range(C.shape[0])
    ]  # fmt: skip
    return torch.from_numpy(np.stack(plans))


def dense_impls(backends: list[str]):
    """``(key, label, fn)`` of every dense row available here. POT iterates in kernel
    form (products with a precomputed ``exp(-C / eps)``), so ours runs both forms."""
    out = [(f"ours-{b}", f"ours[{b}]", lambda c, b=b: ours_dense(c, b)) for b in backends]
    out += [
        (f"ours-{b}-kernel", f"ours[{b}, kernel]", lambda c, b=b: ours_dense(c, b, "kernel"))
        for b in backends
    ]
    try:
        import ot  # noqa: F401

        out.append(("pot-loop", "POT sinkhorn_unbalanced (loop)", pot_loop))
        out.append(("pot-solve", "POT ot.solve(unbalanced=) (loop)", pot_solve_loop))
    except ImportError:
        pass
    return out


def pc_case(N: int, D: int):
    gen = torch.Generator().manual_seed(N + D)
    x = torch.randn(1, N, D, generator=gen, dtype=torch.float32)
    y = torch.randn(1, N, D, generator=gen, dtype=torch.float32) * 0.8 + 0.5
    return x, y


def ours_points(x, y, backend: str):
    res = sinkhorn(
        PointCloud(x, y, scale=0.5), eps=EPS, rho_a=RHO, rho_b=RHO, tol=1e-4,
        eps_scaling=PC_SCALING, max_iter=5000, backend=backend, grad="none",
    )  # fmt: skip
    return res.value, int(res.n_iter[0])


def geomloss_points(x, y):
    from geomloss import SamplesLoss

    loss = SamplesLoss(
        "sinkhorn", p=2, blur=EPS**0.5, reach=RHO**0.5, scaling=PC_SCALING, debias=False,
        backend="tensorized",
    )  # fmt: skip
    return loss(x, y), None


def pc_impls(backends: list[str]):
    out = [(f"ours-{b}", f"ours[{b}]", lambda x, y, b=b: ours_points(x, y, b)) for b in backends]
    try:
        import geomloss  # noqa: F401

        out.append(("geomloss", "GeomLoss SamplesLoss(reach=)", geomloss_points))
    except ImportError:
        pass
    return out


def render(records) -> str:
    """Markdown tables of the ``ub-dense`` and ``ub-points`` records, ratios peer / ours."""
    lines = ["# Unbalanced OT", ""]
    for section, title in (("ub-dense", "Dense batches"), ("ub-points", "Point clouds")):
        rows = [r for r in records if r.section == section]
        if not rows:
            continue
        lines += [f"## {title}", "", "| case | implementation | time (s) | ratio / ours best |"]
        lines += ["|---|---|---|---|"]
        for case in dict.fromkeys(r.case for r in rows):
            mine = [r for r in rows if r.case == case]
            ours = [r.value for r in mine if r.info.get("ours") and math.isfinite(r.value)]
            best = min(ours) if ours else math.nan
            for r in mine:
                ratio = r.value / best if best == best else math.nan
                lines.append(f"| {case} | {r.impl} | {r.value:.4g} | {ratio:.3g} |")
        lines.append("")
    lines.append(
        f"Dense rows: exactly {ITERS} iterations, eps = {EPS:g}, rho = {RHO:g} on both sides "
        "(masses 1 and 2), float64. Point clouds: float32, one problem, whole calls with "
        f"eps annealing (factor {PC_SCALING:g})."
    )
    return "\n".join(lines) + "\n"
