"""Ragged batches of :func:`sinkhorn_ot.sinkhorn_divergence` solved in size buckets.

A padded batch of point clouds (:func:`sinkhorn_ot.pad_points`) costs every problem
``K^2`` pairs per update, ``K`` the largest cloud of the batch. When the sizes differ
widely, most of those pairs are padding: 16 clouds of 200 to 1 000 points do about three
times the work of the same problems alone. The problems are then split into buckets of
similar size (each sliced to its own largest cloud, trailing padding dropped) and each
bucket is one batched call; padding never changes a problem's value or gradients, so
the results are those of the whole batch, reassembled in order.
"""

from __future__ import annotations

import torch

from ._divergence_args import check_balanced_masses

#: Bucket only when it saves at least this share of the padded batch's pair work.
MIN_SAVING = 0.3
#: ... and only clouds at least this large: below, a call's fixed cost dominates.
MIN_SIZE = 128
#: A bucket grows while its largest cloud stays within this factor of its smallest.
SPREAD = 1.25


def _used_lengths(w: torch.Tensor) -> list[int]:
    """``1 +`` the last index of a positive weight of every problem of ``w (B, N)``."""
    index = torch.arange(1, w.shape[1] + 1, device=w.device)
    return torch.where(w > 0, index, 0).amax(-1).tolist()


def size_buckets(x, y, a, b, balanced: bool) -> list[tuple[list[int], int, int]] | None:
    """``[(problems, n, m), ...]`` covering the batch, or ``None`` (no bucketing).

    ``x (B, N, D)``, ``y (B, M, D)``, ``a (B, N)``, ``b (B, M)`` as given by the user:
    ``None`` whenever they are not plain, finite, non-negative batched weights with
    positive (and, when ``balanced``, equal) masses (the single call then checks them
    and names what is wrong and in which problem), when the batch has one problem, or
    when buckets would not save :data:`MIN_SAVING` of the pair work.
    """
    tensors = (x, y, a, b)
    if not all(isinstance(t, torch.Tensor) for t in tensors) or x.dim() != 3 or y.dim() != 3:
        return None
    batch = x.shape[0]
    if batch < 2 or a.shape != x.shape[:2] or b.shape != y.shape[:2]:
        return None
    if max(x.shape[1], y.shape[1]) < MIN_SIZE or not (
        a.is_floating_point() and b.is_floating_point()
    ):
        return None
    with torch.no_grad():
        valid = torch.isfinite(a).all() & (a >= 0).all() & torch.isfinite(b).all() & (b >= 0).all()
        valid = valid & (a.sum(-1) > 0).all() & (b.sum(-1) > 0).all()
        if not bool(valid):
            return None
        if balanced:
            try:
                check_balanced_masses(a, b)
            except ValueError:
                return None
        n_used, m_used = _used_lengths(a), _used_lengths(b)
    sizes = [max(n, m) for n, m in zip(n_used, m_used, strict=True)]
    order = sorted(range(batch), key=sizes.__getitem__)
    buckets: list[list[int]] = []
    for k in order:
        if buckets and sizes[k] <= SPREAD * max(1, sizes[buckets[-1][0]]):
            buckets[-1].append(k)
        else:
            buckets.append([k])
    padded = batch * max(sizes) ** 2
    bucketed = sum(len(bk) * max(sizes[k] for k in bk) ** 2 for bk in buckets)
    if len(buckets) < 2 or bucketed > (1 - MIN_SAVING) * padded:
        return None
    return [
        (bk, max(1, max(n_used[k] for k in bk)), max(1, max(m_used[k] for k in bk)))
        for bk in buckets
    ]


def solve_in_buckets(solve, buckets, x, y, a, b) -> torch.Tensor:
    """``(B,)`` values of ``solve(x_k, y_k, a_k, b_k)`` over the buckets, in batch order."""
    values, index = [], []
    for problems, n, m in buckets:
        rows = torch.tensor(problems, device=x.device)
        values.append(solve(x[rows, :n], y[rows, :m], a[rows, :n], b[rows, :m]))
        index += problems
    inverse = torch.empty(len(index), dtype=torch.long, device=x.device)
    inverse[torch.tensor(index, device=x.device)] = torch.arange(len(index), device=x.device)
    return torch.cat(values)[inverse]
