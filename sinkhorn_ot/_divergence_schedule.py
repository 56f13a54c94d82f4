"""The eps schedule of :func:`sinkhorn_ot.sinkhorn_divergence`: GeomLoss's, per problem.

GeomLoss's ``SamplesLoss("sinkhorn")`` runs one symmetric Sinkhorn update per value of
the list ``[d^p, d^p, d^p s^p, d^p s^{2p}, ..., blur^p]``: ``d`` is the diameter of the
data (the diagonal of the bounding box of both clouds), ``s`` the ``scaling``, and the
geometric part stops before it passes ``blur^p`` (it is NumPy's ``arange`` of the
logarithms). The value depends on that list, so a drop-in must rebuild it exactly.

Differences from GeomLoss, both so that a problem's answer depends on that problem only:
the diameter is computed per problem (GeomLoss takes one box around the whole batch) and
ignores points of zero weight (padding); a zero diameter (a single point, or identical
points) starts the list at ``blur^p`` instead of at ``0``.
"""

from __future__ import annotations

import math

import torch


def bounding_diameters(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """Diagonal of the bounding box of the weighted points of ``x`` and ``y``, ``(B,)``.

    Args:
        x: ``(B, N, D)``, y: ``(B, M, D)``.
        a: ``(B, N)``, b: ``(B, M)``: points of zero weight are left out.

    Returns:
        ``(B,)`` float64, detached.

    Example:
        >>> import torch
        >>> from sinkhorn_ot._divergence_schedule import bounding_diameters
        >>> x, y = torch.zeros(1, 2, 2), torch.tensor([[[3.0, 4.0], [99.0, 99.0]]])
        >>> bounding_diameters(x, y, torch.ones(1, 2), torch.tensor([[1.0, 0.0]])).tolist()
        [5.0]
    """
    with torch.no_grad():
        real_x, real_y = (a > 0).unsqueeze(-1), (b > 0).unsqueeze(-1)
        inf = float("inf")
        low = torch.minimum(
            torch.where(real_x, x, inf).amin(1), torch.where(real_y, y, inf).amin(1)
        )
        high = torch.maximum(
            torch.where(real_x, x, -inf).amax(1), torch.where(real_y, y, -inf).amax(1)
        )
        return (high - low).norm(dim=-1).double()


def epsilon_list(p: float, diameter: float, blur: float, scaling: float) -> list[float]:
    """GeomLoss's list of temperatures, from ``diameter^p`` down to ``blur^p``.

    ``[d^p, exp(p log d + k p log s) for k = 0 .. K - 1, blur^p]`` with ``K`` the length
    of NumPy's ``arange(p log d, p log blur, p log s)``. A diameter whose ``p``-th power
    is not positive (a single point) is replaced by ``blur``.

    Example:
        >>> from sinkhorn_ot._divergence_schedule import epsilon_list
        >>> [round(e, 6) for e in epsilon_list(2, 1.0, 0.25, 0.5)]
        [1.0, 1.0, 0.25, 0.0625]
    """
    if not diameter**p > 0:
        diameter = blur
    start, stop, step = p * math.log(diameter), p * math.log(blur), p * math.log(scaling)
    count = max(0, math.ceil((stop - start) / step))
    return [diameter**p] + [math.exp(start + k * step) for k in range(count)] + [blur**p]


def epsilon_table(
    p: float, diameters: torch.Tensor, blur: float, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lists of every problem as one table, and their lengths.

    Args:
        p, blur, scaling: as :func:`epsilon_list`.
        diameters: ``(B,)`` one diameter per problem.
        dtype: of the table.

    Returns:
        ``table (B, S)`` with ``S`` the longest list (shorter rows are padded with
        ``blur^p``, which a problem never reaches: it stops after its own length) and
        ``lengths (B,)`` int64.

    Example:
        >>> import torch
        >>> from sinkhorn_ot._divergence_schedule import epsilon_table
        >>> table, lengths = epsilon_table(2, torch.tensor([1.0, 0.5]), 0.25, 0.5, torch.float64)
        >>> table.tolist(), lengths.tolist()
        ([[1.0, 1.0, 0.25, 0.0625], [0.25, 0.25, 0.0625, 0.0625]], [4, 3])
    """
    lists = [epsilon_list(p, float(d), blur, scaling) for d in diameters.tolist()]
    width = max(len(row) for row in lists)
    rows = [row + [blur**p] * (width - len(row)) for row in lists]
    table = torch.tensor(rows, dtype=torch.float64).to(dtype)
    lengths = torch.tensor([len(row) for row in lists], dtype=torch.int64)
    return table, lengths
