"""Ragged batches: pad problems of different sizes into one ``(B, N, M)`` batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._arrays import Arrays


def pad_batch(
    list_of_C: Sequence[torch.Tensor],
    list_of_a: Sequence[torch.Tensor | None] | None = None,
    list_of_b: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack ragged problems into one padded batch.

    Costs are zero-padded (any finite value would do: padded entries get zero weight,
    so their plan entries are exactly zero). Weights are zero-padded; a missing weight
    vector is uniform with mass 1 (or the mass of the other side, if given).

    Args:
        list_of_C: ``B`` costs of shapes ``(N_k, M_k)``, same dtype and device.
        list_of_a: ``B`` row weights ``(N_k,)`` or ``None`` entries; ``None`` = uniform.
        list_of_b: ``B`` column weights ``(M_k,)`` or ``None`` entries.

    Returns:
        ``C (B, N, M)``, ``a (B, N)``, ``b (B, M)`` with ``N = max N_k``, ``M = max M_k``;
        NumPy arrays when the entries are NumPy arrays (no tensor among them), tensors
        otherwise.

    Example:
        >>> import torch
        >>> from sinkhorn_ot import pad_batch, sinkhorn
        >>> C, a, b = pad_batch([torch.rand(2, 3), torch.rand(4, 1)])
        >>> C.shape, a[0].tolist()
        (torch.Size([2, 4, 3]), [0.5, 0.5, 0.0, 0.0])
        >>> sinkhorn(C, a, b, eps=0.1).plan[0, 2:].abs().max().item()
        0.0
    """
    if isinstance(list_of_C, torch.Tensor) or not isinstance(list_of_C, Sequence):
        raise TypeError(
            f"`list_of_C` must be a list of (N_k, M_k) tensors, got {type(list_of_C).__name__}"
        )
    if len(list_of_C) == 0:
        raise ValueError("`list_of_C` must hold at least one cost matrix, got an empty list")
    count = len(list_of_C)
    list_of_a = _check_list("list_of_a", list_of_a, count)
    list_of_b = _check_list("list_of_b", list_of_b, count)
    arrays = Arrays(*list_of_C, *list_of_a, *list_of_b)  # NumPy in, NumPy out
    list_of_C = [arrays.tensor(C) for C in list_of_C]
    list_of_a = [arrays.tensor(w) for w in list_of_a]
    list_of_b = [arrays.tensor(w) for w in list_of_b]
    first = list_of_C[0]
    for k, C in enumerate(list_of_C):
        if not isinstance(C, torch.Tensor) or C.dim() != 2:
            got = tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__
            raise ValueError(f"`list_of_C[{k}]` must be a 2-D (N_k, M_k) tensor, got {got}")
        if C.dtype != first.dtype or C.device != first.device:
            raise ValueError(
                f"`list_of_C[{k}]` must share dtype and device with list_of_C[0] "
                f"({first.dtype}, {first.device}), got ({C.dtype}, {C.device})"
            )
    n = max(C.shape[0] for C in list_of_C)
    m = max(C.shape[1] for C in list_of_C)
    kw = {"dtype": first.dtype, "device": first.device}
    C_out = torch.zeros(count, n, m, **kw)
    a_out = torch.zeros(count, n, **kw)
    b_out = torch.zeros(count, m, **kw)
    for k, C in enumerate(list_of_C):
        nk, mk = C.shape
        a_k = _weights("list_of_a", k, list_of_a[k], nk, list_of_b[k], C)
        b_k = _weights("list_of_b", k, list_of_b[k], mk, list_of_a[k], C)
        C_out[k, :nk, :mk] = C
        a_out[k, :nk] = a_k
        b_out[k, :mk] = b_k
    return arrays.back((C_out, a_out, b_out))


def _check_list(name, values, count):
    if values is None:
        return [None] * count
    if len(values) != count:
        raise ValueError(
            f"`{name}` must have one entry per cost matrix ({count}), got {len(values)}"
        )
    return list(values)


def _weights(name, k, w, size, other, C):
    if w is None:
        # Mask the other side's zeros (padding) so they get no gradient through the mass.
        if other is not None:
            mass = torch.where(other > 0, other, 0).sum()
        else:
            mass = torch.ones((), dtype=C.dtype, device=C.device)
        return (mass / size).to(C.dtype).expand(size)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (size,):
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(
            f"`{name}[{k}]` must have shape ({size},) to match list_of_C[{k}], got {got}"
        )
    return w


def pad_points(
    list_of_x: Sequence[torch.Tensor],
    list_of_y: Sequence[torch.Tensor],
    list_of_a: Sequence[torch.Tensor | None] | None = None,
    list_of_b: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack ragged pairs of point clouds into one padded batch for :class:`PointCloud`.

    Points are zero-padded (their position does not matter: padded points get zero
    weight, so their plan rows and columns are exactly zero and they get no gradient).
    Weights are zero-padded; a missing weight vector is uniform with mass 1 (or the mass
    of the other side, if given), as in :func:`pad_batch`.

    Args:
        list_of_x: ``B`` clouds ``(N_k, D)``, same ``D``, dtype and device.
        list_of_y: ``B`` clouds ``(M_k, D)``.
        list_of_a: ``B`` weights ``(N_k,)`` or ``None`` entries; ``None`` = uniform.
        list_of_b: ``B`` weights ``(M_k,)`` or ``None`` entries.

    Returns:
        ``x (B, N, D)``, ``y (B, M, D)``, ``a (B, N)``, ``b (B, M)`` with ``N = max N_k``
        and ``M = max M_k``; NumPy arrays when the entries are NumPy arrays.

    Example:
        >>> import torch
        >>> from sinkhorn_ot import PointCloud, pad_points, sinkhorn
        >>> x, y, a, b = pad_points([torch.randn(3, 2), torch.randn(5, 2)], [torch.randn(4, 2)] * 2)
        >>> x.shape, [round(w, 4) for w in a[0].tolist()]
        (torch.Size([2, 5, 2]), [0.3333, 0.3333, 0.3333, 0.0, 0.0])
        >>> res = sinkhorn(PointCloud(x, y), a, b, eps=0.5)
        >>> res.plan.to_dense()[0, 3:].abs().max().item()
        0.0
    """
    for name, values in (("list_of_x", list_of_x), ("list_of_y", list_of_y)):
        if isinstance(values, torch.Tensor) or not isinstance(values, Sequence):
            raise TypeError(
                f"`{name}` must be a list of (N_k, D) point clouds, got {type(values).__name__}"
            )
    if len(list_of_x) == 0 or len(list_of_x) != len(list_of_y):
        raise ValueError(
            "`list_of_x` and `list_of_y` must hold the same, positive number of clouds, got "
            f"{len(list_of_x)} and {len(list_of_y)}"
        )
    count = len(list_of_x)
    list_of_a = _check_list("list_of_a", list_of_a, count)
    list_of_b = _check_list("list_of_b", list_of_b, count)
    arrays = Arrays(*list_of_x, *list_of_y, *list_of_a, *list_of_b)  # NumPy in, NumPy out
    list_of_x = [arrays.tensor(t) for t in list_of_x]
    list_of_y = [arrays.tensor(t) for t in list_of_y]
    list_of_a = [arrays.tensor(w) for w in list_of_a]
    list_of_b = [arrays.tensor(w) for w in list_of_b]
    first = list_of_x[0]
    for name, clouds in (("list_of_x", list_of_x), ("list_of_y", list_of_y)):
        for k, t in enumerate(clouds):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != first.shape[-1]:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"`{name}[{k}]` must be a 2-D (N_k, D) tensor with D = {first.shape[-1]}, "
                    f"got {got}"
                )
            if t.dtype != first.dtype or t.device != first.device:
                raise ValueError(
                    f"`{name}[{k}]` must share dtype and device with list_of_x[0] "
                    f"({first.dtype}, {first.device}), got ({t.dtype}, {t.device})"
                )
    n = max(t.shape[0] for t in list_of_x)
    m = max(t.shape[0] for t in list_of_y)
    kw = {"dtype": first.dtype, "device": first.device}
    dim = first.shape[-1]
    x_out, y_out = torch.zeros(count, n, dim, **kw), torch.zeros(count, m, dim, **kw)
    a_out, b_out = torch.zeros(count, n, **kw), torch.zeros(count, m, **kw)
    for k, (x, y) in enumerate(zip(list_of_x, list_of_y)):
        nk, mk = x.shape[0], y.shape[0]
        x_out[k, :nk], y_out[k, :mk] = x, y
        a_out[k, :nk] = _weights("list_of_a", k, list_of_a[k], nk, list_of_b[k], x)
        b_out[k, :mk] = _weights("list_of_b", k, list_of_b[k], mk, list_of_a[k], x)
    return arrays.back((x_out, y_out, a_out, b_out))
