"""Every check on user input, in one place.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong shape or value) with a message that names the argument, says what was expected
and what was received. Nothing here uses ``assert``: user input must be checked even
under ``python -O``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._tolerance import is_auto
from .options import BACKENDS, GRADS, METHODS, NEWTON  # noqa: F401  (re-exported)

_LOW_PRECISION = (torch.float16, torch.bfloat16)
#: Devices whose tensors carry shapes but no values: nothing can be solved there.
_NO_DATA_DEVICES = ("meta",)


@dataclass(frozen=True)
class Problem:
    """A validated, batched problem in its compute dtype.

    Attributes:
        C: cost, ``(B, N, M)``.
        a: row weights, ``(B, N)``.
        b: column weights, ``(B, M)``.
        eps: regularisation, ``(B,)``.
        batched: whether the user passed a batch (outputs keep the batch dimension).
        input_dtype: dtype the user passed ``C`` (or the points) in.
        geometry: the cost as a geometry in the compute dtype, batched (``DenseCost(C)``
            for a tensor; then ``C`` is that tensor, else ``C`` is ``None``).
        padded: whether any weight is zero (padding).
        padded_rows: whether any row weight ``a`` is zero.
        offset: ``(B,)`` constant to take off a dense cost before solving (see
            :func:`cost_offset`), or ``None`` where no problem needs one.
        rho: ``(B, 2)`` relaxation ``(rho_a, rho_b)`` in the compute dtype (``inf`` =
            hard), or ``None`` when every problem is balanced.
    """

    C: torch.Tensor | None
    a: torch.Tensor
    b: torch.Tensor
    eps: torch.Tensor
    batched: bool
    input_dtype: torch.dtype
    geometry: object = None
    padded: bool = True
    padded_rows: bool = True
    offset: torch.Tensor | None = None
    rho: torch.Tensor | None = None


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


class ValueChecks:
    """Checks on tensor values, evaluated together with a single device-to-host copy.

    Each check is a 0-d bool tensor (``True`` = fine) and a function that raises the
    detailed error. On a GPU every ``bool(tensor)`` waits for the device; with ~10
    checks per call that dominated the time of small solves, so :func:`check_problem`
    collects them here and reads all flags at once. On failure the first failing
    check (in the order they were added, the order of the arguments) raises; only
    then are the details of the message computed.
    """

    def __init__(self) -> None:
        self._flags: list[torch.Tensor] = []
        self._raisers: list[Callable[[], None]] = []
        self._facts: list[torch.Tensor] = []

    def add(self, ok: torch.Tensor, raise_error: Callable[[], None]) -> None:
        self._flags.append(ok.reshape(()))
        self._raisers.append(raise_error)

    def observe(self, fact: torch.Tensor) -> int:
        """Read the 0-d bool ``fact`` in the same host copy; its index in :meth:`run`'s list.

        The solver needs a few facts about valid input (is there padding? does the cost
        need centring?); reading them here keeps a call at one host sync.
        """
        self._facts.append(fact.reshape(()))
        return len(self._facts) - 1

    def run(self) -> list[bool]:
        """Raise the first failing check's error; return the observed facts."""
        if not self._flags and not self._facts:
            return []
        values = torch.stack(self._flags + self._facts).tolist()  # the one host sync
        flags, facts = values[: len(self._flags)], values[len(self._flags) :]
        for ok, raise_error in zip(flags, self._raisers):
            if not ok:
                raise_error()
        self._flags.clear()
        self._raisers.clear()
        self._facts.clear()
        return facts


def _now(ok: torch.Tensor, raise_error: Callable[[], None]) -> None:
    """Run one value check immediately (callers outside :func:`check_problem`)."""
    if not bool(ok):
        raise_error()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed in float32; float32/float64 as they are."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}")
    return value


def check_cost(C: object, checks: ValueChecks | None = None) -> torch.Tensor:
    if not isinstance(C, torch.Tensor):
        raise TypeError(f"`C` must be a torch.Tensor, got {type(C).__name__}")
    if not C.is_floating_point():
        raise TypeError(
            f"`C` must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {C.dtype}; convert it with C.float() or C.double()"
        )
    if C.layout != torch.strided:
        raise TypeError(
            f"`C` must be a dense (strided) tensor, got layout {C.layout}; use C.to_dense()"
        )
    if C.device.type in _NO_DATA_DEVICES:
        raise ValueError(
            f"`C` is on the {C.device.type!r} device, which holds no values to solve with; "
            "move it to a device with data, e.g. C.to('cpu') or C.to('cuda')"
        )
    if C.dim() not in (2, 3):
        raise ValueError(
            f"`C` must have shape (N, M) or (B, N, M), got {C.dim()} dimensions {_shape(C)}"
        )
    if C.shape[-1] == 0 or C.shape[-2] == 0 or (C.dim() == 3 and C.shape[0] == 0):
        raise ValueError(f"`C` must have non-empty dimensions, got shape {_shape(C)}")

    def not_finite() -> None:
        n_bad = int((~torch.isfinite(C)).sum())
        raise ValueError(
            f"`C` must be finite, got {n_bad} NaN or infinite entries; "
            "padding entries should be 0 (see pad_batch), not inf"
        )

    (checks.add if checks is not None else _now)(torch.isfinite(C).all(), not_finite)
    return C


def check_weights(
    name: str,
    w: object,
    shape: tuple[int, int],
    C: torch.Tensor,
    batched: bool,
    checks: ValueChecks | None = None,
    *,
    positive_mass: bool = True,
) -> torch.Tensor | None:
    """Validate ``a`` or ``b`` and return it batched, or ``None`` if it was ``None``.

    ``positive_mass=False`` lets every weight be zero (one rank's slice of a problem
    split over processes; the total mass is checked across ranks instead).
    """
    if w is None:
        return None
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor or None, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"`{name}` must be a floating tensor, got dtype {w.dtype}")
    if w.layout != torch.strided:
        raise TypeError(
            f"`{name}` must be a dense (strided) tensor, got layout {w.layout}; "
            f"use {name}.to_dense()"
        )
    if w.device != C.device:
        raise ValueError(f"`{name}` must be on the same device as `C` ({C.device}), got {w.device}")
    if not batched:
        expected = (shape[1],)
        if _shape(w) != expected:
            raise ValueError(f"`{name}` must have shape {expected} to match `C`, got {_shape(w)}")
        w = w.unsqueeze(0)
    elif _shape(w) != shape:
        letter = "N" if name == "a" else "M"
        raise ValueError(
            f"`{name}` must have shape (B, {letter}) = {shape} to match `C`, got {_shape(w)}"
        )
    add = checks.add if checks is not None else _now

    def not_finite() -> None:
        raise ValueError(f"`{name}` must be finite, got NaN or infinite entries")

    def negative() -> None:
        raise ValueError(
            f"`{name}` must be non-negative, got minimum {float(w.min()):.3g}; "
            "zero weights mark padding"
        )

    def empty() -> None:
        problems = (w.sum(-1) == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"`{name}` must have positive total mass in every problem, "
            f"got all-zero weights in problem(s) {problems[:10]}"
        )

    add(torch.isfinite(w).all(), not_finite)
    add(~(w < 0).any(), negative)
    if positive_mass:
        add((w.sum(-1) != 0).all(), empty)
    return w


def check_masses(
    a: torch.Tensor,
    b: torch.Tensor,
    checks: ValueChecks | None = None,
    relaxed: torch.Tensor | None = None,
) -> None:
    """Balanced OT needs equal total mass per problem, up to the rounding of the weights.

    Problems flagged in ``relaxed (B,)`` (a KL-relaxed marginal) are not checked.

    ``a`` and ``b`` are the weights as given (batched), each in its own dtype. Their
    masses are summed in float64 and compared with a relative tolerance of the square
    root of the machine epsilon of the coarser of the two dtypes: the precision the
    user's weights actually carry, whatever the dtype of ``C``.
    """
    sa = a.sum(-1, dtype=torch.float64)
    sb = b.sum(-1, dtype=torch.float64)
    coarse = max(a.dtype, b.dtype, key=lambda d: torch.finfo(d).eps)
    rtol = torch.finfo(coarse).eps ** 0.5
    differs = (sa - sb).abs() > rtol * torch.maximum(sa, sb)
    if relaxed is not None:
        differs = differs & ~relaxed

    def unequal() -> None:
        bad = differs.nonzero().flatten()
        i = int(bad[0])
        x, y = float(sa[i]), float(sb[i])
        raise ValueError(
            f"`a` and `b` must have the same total mass in every problem (balanced OT), "
            f"got a.sum() = {x!r} and b.sum() = {y!r} in problem {i} (relative difference "
            f"{abs(x - y) / max(x, y):.3g} > {rtol:.3g} allowed for {coarse} weights; "
            f"{len(bad)} problem(s) differ); rescale one of them"
        )

    (checks.add if checks is not None else _now)(~differs.any(), unequal)


def match_masses(
    a: torch.Tensor, b: torch.Tensor, relaxed: torch.Tensor | None = None
) -> torch.Tensor:
    """``b`` rescaled to the mass of ``a`` (both in the compute dtype), so the rounding
    difference left after :func:`check_masses` cannot keep the iterations from
    converging. Problems flagged in ``relaxed (B,)`` keep their own masses."""
    sa = a.sum(-1, dtype=torch.float64)
    sb = b.sum(-1, dtype=torch.float64)
    ratio = (sa / sb).to(b.dtype)
    if relaxed is not None:
        if bool(relaxed.all()):
            return b
        ratio = torch.where(relaxed, 1, ratio)
    return b * ratio.unsqueeze(-1)


def check_eps(
    eps: object, batch: int, batched: bool, C: torch.Tensor, checks: ValueChecks | None = None
) -> torch.Tensor:
    """Return eps as a ``(B,)`` tensor on C's device."""
    if eps is None:
        raise TypeError("`eps` is required: pass a positive float or a (B,) tensor")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real | torch.Tensor):
        raise TypeError(f"`eps` must be a positive float or a tensor, got {type(eps).__name__}")
    if isinstance(eps, torch.Tensor):
        if not eps.is_floating_point():
            raise TypeError(f"`eps` must be a floating tensor, got dtype {eps.dtype}")
        if eps.device != C.device:
            raise ValueError(
                f"`eps` must be on the same device as `C` ({C.device}), got {eps.device}"
            )
        if eps.dim() == 0:
            eps = eps.expand(batch)
        elif _shape(eps) != (batch,) or (not batched and batch != 1):
            expected = f"(B,) = ({batch},)" if batched else "a scalar"
            raise ValueError(f"`eps` must be {expected}, got shape {_shape(eps)}")
        values = eps.detach()

        def invalid() -> None:
            bad = values[~(torch.isfinite(values) & (values > 0))]
            raise ValueError(f"`eps` must be > 0 and finite, got {bad[0].item():.6g}")

        ok = (torch.isfinite(values) & (values > 0)).all()
        (checks.add if checks is not None else _now)(ok, invalid)
        return eps
    value = float(eps)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`eps` must be > 0 and finite, got {value:.6g}")
    return torch.full((batch,), value, dtype=torch.float64, device=C.device)


def check_eps_in_dtype(
    eps: torch.Tensor, C: torch.Tensor | None, dtype: torch.dtype, checks: ValueChecks | None = None
) -> torch.Tensor:
    """``eps (B,)`` converted to the compute ``dtype``, checked to be usable there.

    A positive float can still be 0 in float32 (``1e-50``), have an infinite reciprocal
    (``1e-320`` in float64, a subnormal) or make ``C / eps`` overflow; the loop would then
    fail with non-finite potentials. Each is a ``ValueError`` naming ``eps``.

    Args:
        eps: ``(B,)`` positive and finite (as checked by :func:`check_eps`), any dtype.
        C: cost ``(B, N, M)`` in the compute dtype, or ``None`` (a point cloud, whose
            cost is not stored): then the ``max|C| / eps`` check is left out.
        dtype: the compute dtype.
    """
    eps_c = eps.to(dtype)
    values = eps_c.detach()
    if C is None:
        scale = torch.zeros_like(values)
    else:
        scale = C.detach().abs().amax(dim=(1, 2))
    positive = values > 0
    reciprocal = torch.isfinite(1 / values)
    scaled = torch.isfinite(scale / values)
    add = checks.add if checks is not None else _now

    def first(ok: torch.Tensor) -> tuple[int, float]:
        k = int((~ok).nonzero()[0])
        return k, float(eps.detach()[k])

    def zero() -> None:
        k, given = first(positive)
        raise ValueError(
            f"`eps` must be > 0 in the compute dtype {dtype}, got {given!r} (problem {k}), "
            f"which is 0 there; use eps >= {torch.finfo(dtype).tiny:.3g} or a float64 `C`"
        )

    def subnormal() -> None:
        k, given = first(reciprocal)
        raise ValueError(
            f"`eps` is too small for the compute dtype {dtype}: got {given!r} (problem {k}), "
            f"whose reciprocal 1/eps overflows; use eps >= {torch.finfo(dtype).tiny:.3g}"
        )

    def overflow() -> None:
        k, given = first(scaled)
        raise ValueError(
            f"`eps` is too small for the cost scale: max|C| / eps overflows {dtype} in "
            f"problem {k} (max|C| = {float(scale[k]):.6g}, eps = {given!r}); use a larger "
            "`eps`, rescale `C`, or a float64 `C`"
        )

    add(positive.all(), zero)
    add(reciprocal.all(), subnormal)
    add(scaled.all(), overflow)
    return eps_c


def check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return int(value)


def check_tol(tol: object, auto: bool = False) -> float | str | None:
    """A positive float or ``None``; with ``auto``, also ``"auto"`` (resolved by
    :mod:`sinkhorn_ot._tolerance` once the problem is known)."""
    if tol is None or (auto and is_auto(tol)):
        return tol
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        expected = "a positive float, 'auto' or None" if auto else "a positive float or None"
        raise TypeError(f"`tol` must be {expected}, got {type(tol).__name__} {tol!r}")
    if not tol > 0:
        raise ValueError(
            f"`tol` must be > 0 (or None to run exactly max_iter iterations), got {tol}"
        )
    return float(tol)


def check_momentum(momentum: object) -> float | str:
    """``None`` -> 1.0 (plain Sinkhorn), ``"auto"``, or a float in (0, 2).

    Example:
        >>> from sinkhorn_ot._validation import check_momentum
        >>> check_momentum(None), check_momentum(1.5), check_momentum("auto")
        (1.0, 1.5, 'auto')
    """
    if momentum is None:
        return 1.0
    if isinstance(momentum, str):
        if momentum != "auto":
            raise ValueError(
                f"`momentum` must be None, 'auto' or a float in (0, 2), got {momentum!r}"
            )
        return momentum
    if isinstance(momentum, bool) or not isinstance(momentum, int | float):
        raise TypeError(
            f"`momentum` must be None, 'auto' or a float in (0, 2), got {type(momentum).__name__}"
        )
    if not 0 < float(momentum) < 2:
        raise ValueError(f"`momentum` must lie in (0, 2) (over-relaxation), got {momentum}")
    return float(momentum)


def check_newton(newton: object) -> bool | str:
    """``"auto"``, ``True`` or ``False``: the Newton polish (docs/choosing.md).

    Example:
        >>> from sinkhorn_ot._validation import check_newton
        >>> check_newton("auto"), check_newton(True), check_newton(False)
        ('auto', True, False)
    """
    if isinstance(newton, bool) or (isinstance(newton, str) and newton in NEWTON):
        return newton
    raise ValueError(f"`newton` must be 'auto', True or False, got {newton!r}")


def check_eps_scaling(eps_scaling: object) -> float | None:
    if eps_scaling is None:
        return None
    if isinstance(eps_scaling, bool) or not isinstance(eps_scaling, numbers.Real):
        raise TypeError(
            f"`eps_scaling` must be None or a float in (0, 1), got {type(eps_scaling).__name__}"
        )
    if not 0 < eps_scaling < 1:
        raise ValueError(f"`eps_scaling` must be None or a float in (0, 1), got {eps_scaling}")
    return float(eps_scaling)


def check_init(
    init: object, batch: int, n: int, m: int, batched: bool, C: torch.Tensor
) -> torch.Tensor | None:
    """Validate a warm start ``(f, g)``; return ``f`` batched (the loop starts from f)."""
    if init is None:
        return None
    if not isinstance(init, tuple | list) or len(init) != 2:
        raise TypeError(
            f"`init` must be a pair (f, g) of tensors or None, got {type(init).__name__}"
        )
    shapes = ((batch, n), (batch, m)) if batched else ((n,), (m,))
    out = []
    for name, t, shape in zip(("init[0] (f)", "init[1] (g)"), init, shapes):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"`{name}` must be a floating tensor, got {got}")
        if _shape(t) != shape:
            raise ValueError(f"`{name}` must have shape {shape}, got {_shape(t)}")
        if t.device != C.device:
            raise ValueError(
                f"`{name}` must be on the same device as `C` ({C.device}), got {t.device}"
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"`{name}` must be finite")
        out.append(t if batched else t.unsqueeze(0))
    return out[0]


def check_problem(
    C: object, a: object, b: object, eps: object, rho_a: object = None, rho_b: object = None
) -> Problem:
    """Validate ``C, a, b, eps`` (and ``rho_a, rho_b``) and return them batched, in the
    compute dtype.

    ``C`` is a cost tensor or a geometry (:mod:`sinkhorn_ot.geometry`). ``None``
    weights become uniform; if only one of ``a``/``b`` is given the other is uniform
    with the same total mass. Equal masses are required only of balanced problems.
    """
    from ._unbalanced import check_rho, relaxation, relaxed_problems
    from .geometry import DenseCost, Geometry, PointCloud

    checks = ValueChecks()
    if isinstance(C, Geometry):
        geometry = C
        if isinstance(geometry, DenseCost):
            ref = check_cost(geometry.C, checks)
        else:
            ref = _check_points(geometry, checks)
    else:
        ref = check_cost(C, checks)
        geometry = None
    batched = geometry.batched if geometry is not None else ref.dim() == 3
    batch, n, m = geometry.shape if geometry is not None else (ref if batched else ref[None]).shape
    a_b = check_weights("a", a, (batch, n), ref, batched, checks)
    b_b = check_weights("b", b, (batch, m), ref, batched, checks)
    dtype = compute_dtype(ref.dtype)
    rho = relaxation(
        check_rho("rho_a", rho_a, batch, batched, ref),
        check_rho("rho_b", rho_b, batch, batched, ref),
        batch,
        dtype,
        ref.device,
    )
    relaxed = relaxed_problems(rho, batch, ref.device) if rho is not None else None
    if isinstance(geometry, PointCloud):
        geometry = geometry.with_points(geometry.x.to(dtype), geometry.y.to(dtype))
        Cb = None
    else:
        Cb = (ref if batched else ref.unsqueeze(0)).to(dtype)
        geometry = DenseCost(Cb)
    if a_b is not None and b_b is not None:
        check_masses(a_b, b_b, checks, relaxed)
    # torch.where keeps values but gives zero weights (padding) exactly zero gradient.
    # Mask before anything else reads the weights: a missing side takes its mass from
    # the masked other side, so no gradient path bypasses the mask.
    a_b = torch.where(a_b > 0, a_b, 0).to(dtype) if a_b is not None else None
    b_b = torch.where(b_b > 0, b_b, 0).to(dtype) if b_b is not None else None
    given = a_b if a_b is not None else b_b
    if given is not None:
        mass = given.sum(-1, keepdim=True)
    else:
        mass = torch.ones(batch, 1, dtype=dtype, device=ref.device)
    a_b = a_b if a_b is not None else (mass / n).expand(batch, n)
    b_b = b_b if b_b is not None else (mass / m).expand(batch, m)
    b_b = match_masses(a_b, b_b, relaxed)  # a missing side already has the given side's mass
    eps_b = check_eps_in_dtype(check_eps(eps, batch, batched, ref, checks), Cb, dtype, checks)
    padded_rows_fact = checks.observe((a_b == 0).any())
    padded_fact = checks.observe((a_b == 0).any() | (b_b == 0).any())
    if Cb is not None:
        offset = cost_offset(Cb, a_b, b_b, rho)
        offset_fact = checks.observe((offset != 0).any())
    facts = checks.run()
    padded, padded_rows = facts[padded_fact], facts[padded_rows_fact]
    offset = offset if Cb is not None and facts[offset_fact] else None
    return Problem(
        Cb, a_b, b_b, eps_b, batched, ref.dtype, geometry, padded, padded_rows, offset, rho
    )


def cost_offset(
    C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rho: torch.Tensor | None = None
) -> torch.Tensor:
    """The shift ``c (B,)`` to take off ``C`` before solving (0 where none helps).

    ``c`` is the midpoint of the real entries' range (padding excluded), used only where
    it exceeds that range: then ``C - c`` has the same solution and plan, and float32
    potentials of size ``|C|`` no longer swamp the differences ``C_ij - C_kl`` that
    determine the plan (``torch.rand(10, 11) - 1e4`` lost 1e-2 of marginal accuracy).
    Elsewhere ``C`` is used as given, bit for bit, as it is in problems with a relaxed
    marginal (``rho (B, 2)`` finite somewhere: a shift of ``C`` changes how much mass
    they transport). No host sync: :func:`check_problem` reads whether any shift is
    non-zero together with its checks.
    """
    from ._unbalanced import relaxed_problems

    real = (a > 0).unsqueeze(2) & (b > 0).unsqueeze(1)
    values = C.detach()
    high = torch.where(real, values, float("-inf")).amax(dim=(1, 2))
    low = torch.where(real, values, float("inf")).amin(dim=(1, 2))
    centre = (high + low) / 2
    shift = (centre.abs() > (high - low)) & ~relaxed_problems(rho, C.shape[0], C.device)
    return torch.where(shift, centre, 0)


def _check_points(geometry, checks: ValueChecks) -> torch.Tensor:
    """Finite points; returns ``x``, the tensor the other checks compare against."""
    for name, t in (("x", geometry.x), ("y", geometry.y)):

        def not_finite(name=name, t=t) -> None:
            n_bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"`{name}` must be finite, got {n_bad} NaN or infinite entries")

        checks.add(torch.isfinite(t).all(), not_finite)
    return geometry.x
