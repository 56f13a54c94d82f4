"""Random problems and tolerances shared by the tests and the benchmarks.

Example:
    >>> from sinkhorn_ot.testing import random_problem
    >>> C, a, b = random_problem(2, 3, 4, seed=0)
    >>> C.shape, a.shape, b.shape
    (torch.Size([2, 3, 4]), torch.Size([2, 3]), torch.Size([2, 4]))
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # hypothesis is a test dependency, imported only when a strategy is built
    from hypothesis.strategies import SearchStrategy

    from .result import SinkhornResult

#: Relative tolerances for comparing solver outputs, by dtype.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def default_init(a: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The solver's initial row potential ``f0 = -eps log a`` (0 on padding), ``(B, N)``.

    For tests that call the loops or native ops directly with the start
    :func:`sinkhorn_ot.sinkhorn` uses. ``a`` is ``(B, N)``, ``eps`` ``(B,)``.

    Example:
        >>> import torch
        >>> from sinkhorn_ot.testing import default_init
        >>> default_init(torch.tensor([[0.5, 0.0]]), torch.tensor([0.1])).tolist()
        [[0.06931471824645996, 0.0]]
    """
    positive = a > 0
    return torch.where(positive, -eps.unsqueeze(-1) * torch.where(positive, a, 1).log(), 0)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str):
    """Assert ``|actual - expected| <= rtol * max(1, max |expected|)`` entrywise (in float64).

    ``actual`` and ``expected`` have one shape, e.g. potentials ``(B, N)``; ``what`` names
    them in the failure message.

    Example:
        >>> import torch
        >>> from sinkhorn_ot.testing import assert_close_rel
        >>> assert_close_rel(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-7]), 1e-6, "f")
    """
    scale = max(1.0, float(expected.abs().max()))
    diff = float((actual.double() - expected.double()).abs().max())
    assert diff <= rtol * scale, f"{what}: max abs difference {diff:.3g} > {rtol * scale:.3g}"


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


#: The families :func:`adversarial_problems` draws from (each drawn independently).
FAMILIES = ("offset", "padded", "tiny", "anneal", "mixed", "missing")

#: Slack of :func:`check_contract`, in units of the compute dtype's machine epsilon.
CONTRACT_SLACK_ULPS = 8


@dataclass(frozen=True)
class AdversarialProblem:
    """One drawn problem: the arguments of a :func:`~sinkhorn_ot.sinkhorn` call.

    Attributes:
        C: cost ``(N, M)`` or ``(B, N, M)``, any floating dtype.
        a: row weights ``(N,)``/``(B, N)`` or ``None``.
        b: column weights ``(M,)``/``(B, M)`` or ``None``.
        kwargs: the keyword arguments (``eps``, ``grad``, ``method``, ``max_iter``,
            ``tol``, ``eps_scaling``).
        families: the entries of :data:`FAMILIES` this problem belongs to.
        seed: seed of the tensors' generator (with ``families`` and ``kwargs`` it
            reproduces the problem).

    Example:
        >>> import torch
        >>> from sinkhorn_ot.testing import AdversarialProblem
        >>> p = AdversarialProblem(torch.rand(2, 3), None, None, {"eps": 0.1}, (), 0)
        >>> result, warned = p.solve()
        >>> result.plan.shape, warned
        (torch.Size([2, 3]), False)
    """

    C: torch.Tensor
    a: torch.Tensor | None
    b: torch.Tensor | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    families: tuple[str, ...] = ()
    seed: int = 0

    @property
    def tol(self) -> float:
        """The tolerance ``converged`` may refer to at most: ``tol``, 1e-5 when
        ``tol=None``, and for ``tol="auto"`` (the default) the larger of 1e-5 and
        ``finfo(dtype).eps * max|C_ij| / eps`` over the real entries (``a_i, b_j > 0``)
        of ``C`` as passed (the solver's own value, ``result.tol``, is computed after it
        centres ``C``, which can only lower it)."""
        tol = self.kwargs.get("tol", "auto")
        if tol is None:
            return 1e-5
        if tol != "auto":
            return tol
        C = self.C if self.C.dim() == 3 else self.C.unsqueeze(0)
        real = torch.ones(C.shape, dtype=torch.bool)
        if self.a is not None:
            real = real & (self.a.reshape(C.shape[0], -1, 1) > 0)
        if self.b is not None:
            real = real & (self.b.reshape(C.shape[0], 1, -1) > 0)
        scale = torch.where(real, C.detach().double().abs(), 0).amax(dim=(1, 2))
        eps = torch.as_tensor(self.kwargs["eps"], dtype=torch.float64).detach().reshape(-1)
        dtype = torch.float64 if C.dtype == torch.float64 else torch.float32
        return max(1e-5, torch.finfo(dtype).eps * float((scale / eps).max()))

    def solve(self) -> tuple[SinkhornResult, bool]:
        """Run :func:`~sinkhorn_ot.sinkhorn`; return the result and whether a
        :class:`~sinkhorn_ot.SinkhornConvergenceWarning` was issued (it is recorded,
        not raised)."""
        from .solver import SinkhornConvergenceWarning, sinkhorn

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SinkhornConvergenceWarning)
            result = sinkhorn(self.C, self.a, self.b, **self.kwargs)
        warned = any(issubclass(w.category, SinkhornConvergenceWarning) for w in caught)
        return result, warned


def adversarial_problems(
    *, max_n: int = 6, max_batch: int = 3, grads: tuple[str, ...] | None = None
) -> SearchStrategy[AdversarialProblem]:
    """A hypothesis strategy of problems that stress the solver's contract.

    Each draw picks any subset of :data:`FAMILIES`:

    * ``offset``: float32 costs ``C = rand - 1e4`` (a large constant offset: the plan is
      that of ``rand``, but the potentials are about ``-5e3``);
    * ``padded``: zero weights (padding) on both sides, at least one real point a side;
    * ``tiny``: some weights ``1e-30`` (0 in float16, so padding there);
    * ``anneal``: ``eps_scaling`` with ``max_iter`` shorter than the annealing schedule;
    * ``mixed``: ``C`` in float16/bfloat16/float32/float64 and the weights in another
      dtype (float16/float32/float64);
    * ``missing``: ``a`` or ``b`` is ``None`` (uniform with the other side's mass);

    and a ``grad`` mode (``"implicit"``, ``"envelope"``, ``"unroll"``, ``"none"``; the
    inputs require grad unless ``"none"``), ``method`` ``"log"`` or ``"auto"``, ``tol``
    in {1e-5, 1e-3, None, "auto"}, ``eps`` in ``[0.01, 1]`` (times the spread of ``C``),
    batched or not. Weights are valid input: non-negative, equal masses to rounding.

    Args:
        max_n: largest ``N`` and ``M``.
        max_batch: largest batch ``B`` (``1`` may also be drawn unbatched).
        grads: the grad modes to draw from (default all).

    Returns:
        A strategy of :class:`AdversarialProblem` (needs ``hypothesis``).

    Example:
        >>> from hypothesis import given, settings
        >>> from sinkhorn_ot.testing import adversarial_problems
        >>> @settings(max_examples=20, deadline=None, database=None)
        ... @given(adversarial_problems(max_n=3))
        ... def shapes_agree(p):
        ...     n, m = p.C.shape[-2:]
        ...     assert p.a is None or p.a.shape[-1] == n
        ...     assert p.b is None or p.b.shape[-1] == m
        ...     assert p.C.dtype == torch.float32 or "offset" not in p.families
        >>> shapes_agree()
    """
    from hypothesis import strategies as st

    from ._validation import GRADS

    grad_modes = tuple(grads) if grads is not None else GRADS

    @st.composite
    def draw_problem(draw) -> AdversarialProblem:
        families = tuple(f for f in FAMILIES if draw(st.booleans()))
        seed = draw(st.integers(0, 2**31 - 1))
        gen = torch.Generator().manual_seed(seed)
        batch = draw(st.integers(1, max_batch))
        batched = batch > 1 or draw(st.booleans())
        n, m = draw(st.integers(1, max_n)), draw(st.integers(1, max_n))
        if "padded" in families:  # room for a real and a padded point on each side
            n, m = max(n, 2), max(m, 2)
        C = torch.rand(batch, n, m, generator=gen, dtype=torch.float64)
        C = C * draw(st.sampled_from([1.0, 10.0]))
        spread = float(C.max() - C.min()) or 1.0
        if "offset" in families:
            C = C - 1e4
        c_dtype = torch.float32 if "offset" in families else torch.float64
        w_dtype = c_dtype
        if "mixed" in families and "offset" not in families:
            c_dtype = draw(
                st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64])
            )
        if "mixed" in families:
            w_dtype = draw(
                st.sampled_from(
                    [d for d in (torch.float16, torch.float32, torch.float64) if d != c_dtype]
                )
            )
        a = torch.rand(batch, n, generator=gen, dtype=torch.float64) + 0.05
        b = torch.rand(batch, m, generator=gen, dtype=torch.float64) + 0.05
        if "padded" in families:
            for w, size in ((a, n), (b, m)):
                w[torch.rand(batch, size, generator=gen) < 0.5] = 0.0
                real = torch.randint(size, (batch,), generator=gen)
                pad = (real + 1 + torch.randint(size - 1, (batch,), generator=gen)) % size
                w[torch.arange(batch), real] = 1.0
                w[torch.arange(batch), pad] = 0.0
        if "tiny" in families:
            for w, size in ((a, n), (b, m)):
                tiny = (torch.rand(batch, size, generator=gen) < 0.3) & (w > 0)
                tiny[w.cumsum(-1) == w] = False  # keep the first real point's mass
                w[tiny] = 1e-30
        mass = draw(st.sampled_from([1.0, 3.0]))
        a, b = mass * a / a.sum(-1, keepdim=True), mass * b / b.sum(-1, keepdim=True)
        if "missing" in families:
            if draw(st.booleans()):
                a = None
            else:
                b = None
        eps = spread * 10 ** draw(st.floats(-2.0, 0.0))
        kwargs: dict[str, Any] = {
            "eps": eps,
            "grad": draw(st.sampled_from(grad_modes)),
            "method": draw(st.sampled_from(["log", "auto"])),
            "tol": draw(st.sampled_from([1e-5, 1e-3, None, "auto"])),
            "max_iter": 1000,
        }
        if "anneal" in families:
            s = draw(st.floats(0.3, 0.9))
            steps = math.ceil(math.log(max(float(C.abs().max()), eps) / eps) / -math.log(s))
            kwargs["eps_scaling"] = s
            kwargs["max_iter"] = draw(st.integers(0, max(steps - 1, 0)))
        C = C.to(c_dtype)
        a = a.to(w_dtype) if a is not None else None
        b = b.to(w_dtype) if b is not None else None
        if not batched:
            C = C[0]
            a = a[0] if a is not None else None
            b = b[0] if b is not None else None
        if kwargs["grad"] != "none":
            C.requires_grad_(True)
            for w in (a, b):
                if w is not None:
                    w.requires_grad_(True)
        return AdversarialProblem(C, a, b, kwargs, families, seed)

    return draw_problem()


def check_contract(
    result: SinkhornResult,
    C: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    tol: float,
    *,
    slack: float | None = None,
) -> torch.Tensor:
    """Assert the output contract of :func:`~sinkhorn_ot.sinkhorn` on one result.

    Recomputes the plan's marginals in float64 and asserts:

    * every output (``plan``, ``f``, ``g``, ``value``, ``value_linear``, ``err``) is finite;
    * the plan is exactly 0 on padded rows (``a_i = 0``) and columns (``b_j = 0``);
    * ``converged`` is true only where the recomputed relative L1 violation
      ``(||P 1 - a||_1 + ||P^T 1 - b||_1) / sum(a) <= tol + slack``.

    The marginals compared with are the weights as the solver defines them: ``None`` is
    uniform with the other side's mass (or 1), and ``b`` is rescaled to ``a``'s mass
    (masses may differ by rounding). ``slack`` defaults to
    :data:`CONTRACT_SLACK_ULPS` machine epsilons of the plan's dtype (``8 * 1.2e-7``
    in float32, ``8 * 2.2e-16`` in float64): the rounding of each plan entry (a few
    operations, each within half an epsilon relative) and of the weights to that dtype,
    each a relative error per entry and so a relative error of the L1 sums. It does not
    cover the conditioning of the plan's formula (``|f| + |g| + |C|`` large against
    ``eps``): a plan that claims convergence must meet ``tol`` as returned.

    Args:
        result: what ``sinkhorn(C, a, b, ...)`` returned (batched or not).
        C: cost ``(N, M)`` or ``(B, N, M)`` as passed.
        a: row weights ``(N,)``/``(B, N)`` as passed, or ``None``.
        b: column weights ``(M,)``/``(B, M)`` as passed, or ``None``.
        tol: the tolerance ``converged`` refers to (1e-5 for ``tol=None``).
        slack: added to ``tol``; default as above.

    Returns:
        ``(B,)`` float64: the recomputed violations (``()`` for unbatched input).

    Raises:
        AssertionError: naming the first broken promise.

    Example:
        >>> import dataclasses, torch
        >>> from sinkhorn_ot import sinkhorn
        >>> from sinkhorn_ot.testing import check_contract
        >>> C = torch.rand(2, 3, 4, dtype=torch.float64)
        >>> a = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
        >>> res = sinkhorn(C, a, None, eps=0.1)
        >>> bool((check_contract(res, C, a, None, 1e-5) <= 1e-5).all())
        True
        >>> bad = dataclasses.replace(res, plan=res.plan * 1.01)
        >>> check_contract(bad, C, a, None, 1e-5)
        Traceback (most recent call last):
        ...
        AssertionError: converged=True but the plan's recomputed violation is 0.02 > tol ...
    """
    batched = C.dim() == 3
    one = (lambda t: t) if batched else (lambda t: t.unsqueeze(0))
    plan = one(result.plan.detach())
    batch, n, m = plan.shape
    for name in ("plan", "f", "g", "value", "value_linear", "err"):
        value = getattr(result, name).detach()
        assert torch.isfinite(value).all(), f"`{name}` has non-finite entries: {value}"
    wa = None if a is None else one(a.detach()).double()
    wb = None if b is None else one(b.detach()).double()
    given = wa if wa is not None else wb
    mass = given.sum(-1, keepdim=True) if given is not None else plan.new_ones(batch, 1).double()
    wa = wa if wa is not None else (mass / n).expand(batch, n)
    wb = wb if wb is not None else (mass / m).expand(batch, m)
    wb = wb * (wa.sum(-1, keepdim=True) / wb.sum(-1, keepdim=True))
    pad_rows, pad_cols = wa == 0, wb == 0
    assert (plan[pad_rows.unsqueeze(-1).expand_as(plan)] == 0).all(), "padded rows not 0"
    assert (plan[pad_cols.unsqueeze(-2).expand_as(plan)] == 0).all(), "padded columns not 0"
    p64 = plan.double()
    violation = ((p64.sum(-1) - wa).abs().sum(-1) + (p64.sum(-2) - wb).abs().sum(-1)) / wa.sum(-1)
    if slack is None:
        slack = CONTRACT_SLACK_ULPS * torch.finfo(plan.dtype).eps
    claimed = one(result.converged.detach())
    broken = claimed & ~(violation <= tol + slack)
    if bool(broken.any()):
        k = int(broken.nonzero()[0])
        raise AssertionError(
            f"converged=True but the plan's recomputed violation is {float(violation[k]):.3g} "
            f"> tol {tol:g} + slack {slack:.3g} in problem {k} (reported err "
            f"{float(one(result.err.detach())[k]):.3g})"
        )
    return violation if batched else violation[0]
