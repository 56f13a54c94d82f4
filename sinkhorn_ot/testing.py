"""Random problems and tolerances shared by the tests and the benchmarks.

Example:
    >>> from sinkhorn_ot.testing import random_problem
    >>> C, a, b = random_problem(2, 3, 4, seed=0)
    >>> C.shape, a.shape, b.shape
    (torch.Size([2, 3, 4]), torch.Size([2, 3]), torch.Size([2, 4]))
"""

from __future__ import annotations

import torch

#: Relative tolerances for comparing solver outputs, by dtype.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def random_problem(
    batch: int,
    n: int,
    m: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    uniform: bool = False,
    dim: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared-Euclidean cost between random point clouds, with random weights.

    Args:
        batch, n, m: problem sizes.
        dtype, device: of the returned tensors.
        seed: the generator seed (same seed, same problem).
        uniform: uniform weights instead of random positive ones.
        dim: dimension of the point clouds.

    Returns:
        ``C (B, N, M)`` with entries in about ``[0, 2 dim]``, ``a (B, N)``, ``b (B, M)``
        each summing to 1.

    Example:
        >>> from sinkhorn_ot.testing import random_problem
        >>> C, a, b = random_problem(4, 5, 6, seed=1)
        >>> C.shape, round(float(a.sum(-1)[0]), 12), round(float(b.sum(-1)[0]), 12)
        (torch.Size([4, 5, 6]), 1.0, 1.0)
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, n, dim, generator=gen, dtype=torch.float64)
    y = torch.rand(batch, m, dim, generator=gen, dtype=torch.float64)
    C = torch.cdist(x, y) ** 2
    if uniform:
        a = torch.full((batch, n), 1 / n, dtype=torch.float64)
        b = torch.full((batch, m), 1 / m, dtype=torch.float64)
    else:
        a = torch.rand(batch, n, generator=gen, dtype=torch.float64) + 0.1
        b = torch.rand(batch, m, generator=gen, dtype=torch.float64) + 0.1
        a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    kw = {"dtype": dtype, "device": device}
    return C.to(**kw), a.to(**kw), b.to(**kw)
