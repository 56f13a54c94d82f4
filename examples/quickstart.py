"""Solve a batch of entropic OT problems and compare with POT and the exact LP.

Run: ``python examples/quickstart.py`` (needs POT: ``pip install pot``).
"""

import ot
import torch

from sinkhorn_ot import emd, pad_batch, sinkhorn
from sinkhorn_ot.costs import sqeuclidean


def main() -> None:
    torch.manual_seed(0)
    x = torch.rand(8, 30, 2, dtype=torch.float64)
    y = torch.rand(8, 40, 2, dtype=torch.float64)
    C = sqeuclidean(x, y)  # (8, 30, 40)

    res = sinkhorn(C, eps=0.01, tol=1e-9)
    pot = ot.solve_batch(C, 0.01, max_iter=10000, tol=1e-12, method="log_sinkhorn", reg_type="kl")
    exact = emd(C)
    print(f"method={res.method} backend={res.backend} iterations={res.n_iter.tolist()}")
    print("problem  <C,P> ours    <C,P> POT     exact LP    |P - P_pot|_max")
    for k in range(C.shape[0]):
        diff = float((res.plan[k] - pot.plan[k]).abs().max())
        print(
            f"{k:7d}  {float(res.value_linear[k]):.6f}  {float(pot.value_linear[k]):.6f}"
            f"  {float(exact.value[k]):.6f}  {diff:.2e}"
        )

    # Ragged problems: pad them into one batch; padded rows/columns get zero mass.
    C_ragged, a, b = pad_batch([C[0, :10, :12], C[1, :25, :7]])
    ragged = sinkhorn(C_ragged, a, b, eps=0.01)
    print(
        "ragged plans:", tuple(ragged.plan.shape), "padding mass:", float(ragged.plan[0, 10:].sum())
    )

    # Gradients at the fixed point (implicit differentiation, the default).
    C.requires_grad_(True)
    sinkhorn(C, eps=0.01).value.sum().backward()
    print("dvalue/dC equals the plan:", torch.allclose(C.grad, res.plan, atol=1e-6))


if __name__ == "__main__":
    main()
