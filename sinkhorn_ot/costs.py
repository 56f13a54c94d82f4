"""Cost matrices between point clouds, batched: ``(B, N, d), (B, M, d) -> (B, N, M)``.

Each builder takes tensors or NumPy arrays (anything :func:`torch.as_tensor` reads) and
returns a NumPy array when neither ``x`` nor ``y`` is a tensor, like ``ot.dist``:

    >>> import numpy as np
    >>> from sinkhorn_ot.costs import sqeuclidean
    >>> sqeuclidean(np.zeros((1, 2)), np.ones((3, 2)))
    array([[2., 2., 2.]])
"""

from __future__ import annotations

import torch

from ._arrays import Arrays


def _check_points(x: torch.Tensor, y: torch.Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"`{name}` must be a (N, d) or (B, N, d) tensor, got {got}")
    if x.dim() != y.dim() or x.shape[-1] != y.shape[-1] or x.shape[:-2] != y.shape[:-2]:
        raise ValueError(
            f"`x` and `y` must share batch size and feature dimension d, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )


def sqeuclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean cost ``C_ij = ||x_i - y_j||^2``.

    Args:
        x: ``(N, d)`` or ``(B, N, d)``.
        y: ``(M, d)`` or ``(B, M, d)``.

    Returns:
        ``(N, M)`` or ``(B, N, M)``, clamped at 0 (the expanded formula can round below).

    Example:
        >>> import torch
        >>> from sinkhorn_ot.costs import sqeuclidean
        >>> sqeuclidean(torch.zeros(1, 2), torch.ones(3, 2)).tolist()
        [[2.0, 2.0, 2.0]]
    """
    arrays = Arrays(x, y)
    x, y = arrays.tensor(x), arrays.tensor(y)
    _check_points(x, y)
    xx = (x * x).sum(-1).unsqueeze(-1)  # (B, N, 1)
    yy = (y * y).sum(-1).unsqueeze(-2)  # (B, 1, M)
    return arrays.back((xx + yy - 2 * x @ y.transpose(-1, -2)).clamp_min(0))


def euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean cost ``C_ij = ||x_i - y_j||``.

    Args:
        x: ``(N, d)`` or ``(B, N, d)``.
        y: ``(M, d)`` or ``(B, M, d)``.

    Returns:
        ``(N, M)`` or ``(B, N, M)``.

    Example:
        >>> import torch
        >>> from sinkhorn_ot.costs import euclidean
        >>> euclidean(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]])).tolist()
        [[5.0]]
    """
    arrays = Arrays(x, y)
    x, y = arrays.tensor(x), arrays.tensor(y)
    _check_points(x, y)
    return arrays.back(torch.cdist(x, y))


def cosine(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine cost ``C_ij = 1 - cos(x_i, y_j)``, in ``[0, 2]`` (ELIM's matching cost).

    Args:
        x: ``(N, d)`` or ``(B, N, d)``.
        y: ``(M, d)`` or ``(B, M, d)``.
        eps: floor on the norms, so zero vectors give cost 1 instead of NaN.

    Returns:
        ``(N, M)`` or ``(B, N, M)``.

    Example:
        >>> import torch
        >>> from sinkhorn_ot.costs import cosine
        >>> cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0], [3.0, 0.0]])).tolist()
        [[1.0, 0.0]]
    """
    arrays = Arrays(x, y)
    x, y = arrays.tensor(x), arrays.tensor(y)
    _check_points(x, y)
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    yn = y / y.norm(dim=-1, keepdim=True).clamp_min(eps)
    return arrays.back(1 - xn @ yn.transpose(-1, -2))
