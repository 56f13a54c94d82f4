"""Argument checks of :func:`sinkhorn_ot.sinkhorn_divergence` (one error per mistake,
naming the argument, what was expected and what was received)."""

from __future__ import annotations

import math
import numbers

import torch

from ._validation import check_masses, compute_dtype


def _shape(t) -> tuple[int, ...] | str:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def positive_float(name: str, value: object, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "None or a positive float" if optional else "a positive float"
        raise TypeError(f"`{name}` must be {kind}, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a positive finite float, got {value}")
    return float(value)


def check_scaling(scaling: object) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"`scaling` must be a float in (0, 1), got {type(scaling).__name__}")
    if not 0 < scaling < 1:
        raise ValueError(f"`scaling` must be a float in (0, 1), got {scaling}")
    return float(scaling)


def check_p(p: object) -> int:
    if isinstance(p, bool) or p not in (1, 2):
        raise ValueError(f"`p` must be 1 (cost |x - y|) or 2 (cost |x - y|^2 / 2), got {p!r}")
    return int(p)


def blur_and_eps(blur: object, eps: object, p: int) -> float:
    """The target blur from ``blur`` or ``eps = blur^p`` (one of them; default 0.05)."""
    if blur is not None and eps is not None:
        raise ValueError(
            f"give `blur` or `eps` (= blur^p), not both; got blur={blur!r} and eps={eps!r}"
        )
    if eps is not None:
        return positive_float("eps", eps) ** (1.0 / p)
    return positive_float("blur", 0.05 if blur is None else blur)


def check_points(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of points, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"`{name}` must be a floating tensor, got dtype {t.dtype}")
    if t.dim() not in (2, 3) or t.shape[-2] == 0 or (t.dim() == 3 and t.shape[0] == 0):
        raise ValueError(
            f"`{name}` must have shape (N, D) or (B, N, D) with N >= 1, got {_shape(t)}"
        )
    return t


def check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != y.dim() or x.shape[-1] != y.shape[-1] or x.shape[:-2] != y.shape[:-2]:
        raise ValueError(
            "`x` and `y` must share the batch size and the dimension D: expected (B, N, D) "
            f"and (B, M, D) (or (N, D) and (M, D)), got {_shape(x)} and {_shape(y)}"
        )
    if x.dtype != y.dtype or x.device != y.device:
        raise ValueError(
            f"`x` and `y` must share dtype and device, got ({x.dtype}, {x.device}) and "
            f"({y.dtype}, {y.device})"
        )
    for name, t in (("x", x), ("y", y)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"`{name}` must be finite, got NaN or infinite coordinates")


def check_weights(
    name: str, w: object, batch: int, size: int, batched: bool, ref: torch.Tensor
) -> torch.Tensor:
    """``w`` batched ``(B, size)`` in the compute dtype; ``None`` gives uniform weights."""
    dtype = compute_dtype(ref.dtype)
    if w is None:
        return torch.full((batch, size), 1.0 / size, dtype=dtype, device=ref.device)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        got = f"dtype {w.dtype}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"`{name}` must be a floating torch.Tensor or None, got {got}")
    expected = (batch, size) if batched else (size,)
    if tuple(w.shape) != expected:
        raise ValueError(f"`{name}` must have shape {expected}, got {tuple(w.shape)}")
    if w.device != ref.device:
        raise ValueError(
            f"`{name}` must be on the device of the points ({ref.device}), got {w.device}"
        )
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"`{name}` must be finite, got NaN or infinite weights")
    if bool((w < 0).any()):
        raise ValueError(
            f"`{name}` must be non-negative, got minimum {float(w.min()):.3g}; zero weights "
            "mark padding"
        )
    w = w if batched else w.unsqueeze(0)
    if bool((w.sum(-1) == 0).any()):
        bad = (w.sum(-1) == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"`{name}` must have positive mass in every problem, got none in {bad[:10]}"
        )
    return w.to(dtype)


def check_balanced_masses(a: torch.Tensor, b: torch.Tensor) -> None:
    """Balanced divergences (``reach=None``) need equal masses; say how to relax that."""
    try:
        check_masses(a, b)
    except ValueError as error:
        raise ValueError(f"{error}, or pass `reach=` for an unbalanced divergence") from None


def check_cost_matrix(name: str, C: object, shape: tuple[int, ...]) -> torch.Tensor:
    from .geometry import DenseCost

    if isinstance(C, DenseCost):
        C = C.C
    if not isinstance(C, torch.Tensor) or not C.is_floating_point():
        got = f"dtype {C.dtype}" if isinstance(C, torch.Tensor) else type(C).__name__
        raise TypeError(f"`{name}` must be a DenseCost or a floating tensor, got {got}")
    if tuple(C.shape) != shape:
        raise ValueError(f"`{name}` must have shape {shape}, got {tuple(C.shape)}")
    if not bool(torch.isfinite(C).all()):
        raise ValueError(f"`{name}` must be finite, got NaN or infinite entries")
    return C
