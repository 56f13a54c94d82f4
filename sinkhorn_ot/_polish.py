"""What ``newton="auto"``/``True`` does around the Sinkhorn loop of :func:`sinkhorn`.

The loop runs first, for the schedule plus :data:`~sinkhorn_ot._newton.NEWTON_PATIENCE`
iterations (``"auto"``) or the schedule alone (``True``): :func:`loop_budget`. Then
:func:`finish` takes the problems still above ``tol``:

1. ``"auto"`` runs :data:`RATE_WINDOW` more iterations of the same loop to measure each
   problem's contraction rate; a problem whose rate predicts at most
   :data:`NEWTON_WORTH` more iterations (and within its budget) continues the loop for
   up to that many, so it gets exactly the iterates of ``newton=False`` (for plain
   Sinkhorn) if it converges by then.
2. The others, and those the rate misjudged, are polished by a continuation in eps
   (:data:`~sinkhorn_ot._newton.NEWTON_STAGES` halvings down to the target): an
   annealed log-domain Sinkhorn run into the first stage, then at each stage Sinkhorn
   with momentum down to :data:`~sinkhorn_ot._newton.NEWTON_START` and Newton steps
   (:func:`sinkhorn_ot._newton.polish`), and Sinkhorn at the target eps if the last
   steps stall.

Every stage stays within the caller's ``max_iter``. ``run`` is the solver's loop
dispatch (``solver._run``: the torch loop or a native op), passed in so that this
module does not import the solver.
"""

from __future__ import annotations

import math

import torch

from . import _newton
from ._loop import eps_table
from ._updates import safe_log
from .geometry import DenseCost

#: ``"auto"``: iterations after the patience over which a problem's rate is measured.
RATE_WINDOW = 10
#: ``"auto"`` polishes a problem when its rate predicts more iterations than this to
#: ``tol`` (or more than its budget): the polish costs about as much as a few hundred
#: Sinkhorn iterations (an annealed run, then Newton steps of ``N x N`` solves).
NEWTON_WORTH = 500


def loop_budget(polish: bool, newton, max_iter: int, table: torch.Tensor) -> int:
    """``max_iter`` of the first loop: all of it without the polish."""
    if not polish:
        return max_iter
    patience = _newton.NEWTON_PATIENCE if newton == "auto" else 0
    return min(max_iter, table.shape[1] - 1 + patience)


class _Batch:
    """The batch's ``f, g, n_iter, err``, updated problem subset by problem subset."""

    def __init__(self, f, g, n_iter, err):
        self.f, self.g, self.n_iter, self.err = f, g, n_iter, err

    def stalled(self, tol: float, max_iter: int) -> torch.Tensor:
        """Indices of the problems above ``tol`` with iterations left, ``(K,)``."""
        return ((self.err > tol) & (self.n_iter < max_iter)).nonzero().flatten()

    def update(self, index, f, g, extra, err) -> None:
        self.f = self.f.index_copy(0, index, f.to(self.f.dtype))
        self.g = self.g.index_copy(0, index, g.to(self.g.dtype))
        self.n_iter = self.n_iter.index_copy(0, index, self.n_iter[index] + extra)
        self.err = self.err.index_copy(0, index, err.to(self.err.dtype))


def finish(
    run, geometry, a, b, eps, f, g, n_iter, err, *, tol, max_iter, newton, method, momentum,
    eps_scaling, eps_stage_iters, backend, newton_tol,
):  # fmt: skip
    """Continue or polish the problems the first loop left above ``tol``.

    Args:
        run: ``run(backend, geometry, a, b, f0, table, max_iter, tol, method,
            momentum=...)`` returning ``f, g, n_iter, err`` (``solver._run``).
        geometry, a, b: the batch's problems (``(B, N, M)``, weights ``(B, N)``, ``(B, M)``).
        eps: ``(B,)`` target eps.
        f, g, n_iter, err: what the first loop returned, ``(B, N)``, ``(B, M)``, ``(B,)``.
        tol, max_iter, newton, method, momentum, eps_scaling, eps_stage_iters, backend:
            the call's settings (validated; ``tol`` resolved to a float).
        newton_tol: what the last Newton stage aims for, at most ``tol``: below it for
            ``tol="auto"`` in float32: the steps compute in float64, so they
            reach ``1e-5`` where the float32 loop stops at its rounding floor
            (:func:`sinkhorn_ot._tolerance.aim`).

    Returns:
        ``f, g, n_iter, err`` as the loop returns them.
    """
    state = _Batch(f, g, n_iter, err)
    index = state.stalled(tol, max_iter)
    if len(index) == 0:
        return f, g, n_iter, err
    target = eps.unsqueeze(-1)

    def loop(index, table, iterations, loop_tol, loop_method, loop_momentum):
        f_sub, g_sub, extra, err_sub = run(
            backend, geometry.select(index), a[index], b[index], state.f[index], table,
            iterations, loop_tol, loop_method, momentum=loop_momentum,
        )  # fmt: skip
        state.update(index, f_sub, g_sub, extra, err_sub)

    def budget(index) -> int:
        return int((max_iter - state.n_iter[index]).min())

    if newton == "auto":
        before = state.err[index]
        loop(index, target[index], min(RATE_WINDOW, budget(index)), tol, method, momentum)
        slow = _predicted_iterations(before, state.err[index], tol) > torch.minimum(
            torch.full_like(before, NEWTON_WORTH), (max_iter - state.n_iter[index]).double()
        )
        quick = index[~slow]
        quick = quick[torch.isin(quick, state.stalled(tol, max_iter))]
        if len(quick):  # the loop as it was (the iterates of newton=False), for as long
            # as the polish would cost: an early rate can be optimistic.
            iterations = min(budget(quick), NEWTON_WORTH)
            loop(quick, target[quick], iterations, tol, method, momentum)
        index = index[torch.isin(index, state.stalled(tol, max_iter))]
        if len(index) == 0:
            return state.f, state.g, state.n_iter, state.err
    _polish(state, loop, budget, geometry, a, b, eps, index, tol, newton_tol, max_iter, momentum,
            eps_scaling, eps_stage_iters, backend)  # fmt: skip
    return state.f, state.g, state.n_iter, state.err


def _predicted_iterations(before, after, tol) -> torch.Tensor:
    """``(K,)`` float64 iterations to ``tol`` at the rate from ``before`` to ``after``
    over :data:`RATE_WINDOW` iterations (``inf`` where the error did not shrink)."""
    before, after = before.double(), after.double()
    shrinking = (after < before) & (after > 0)
    log_rate = torch.where(shrinking, (after / before).log() / RATE_WINDOW, -1.0)
    remaining = torch.log(tol / after.clamp_min(tol)) / log_rate
    return torch.where(shrinking, remaining, math.inf)


def _polish(state, loop, budget, geometry, a, b, eps, index, tol, aim, max_iter, momentum,
            eps_scaling, eps_stage_iters, backend):  # fmt: skip
    """Newton continuation in eps: annealed Sinkhorn to the first stage, then at each stage
    Sinkhorn to NEWTON_START and Newton steps (the last ones to ``aim <= tol``), then
    Sinkhorn if the last steps stall."""
    sub = geometry.select(index)
    cost = sub.C if isinstance(sub, DenseCost) else sub.dense()
    log_a, log_b = safe_log(a[index]), safe_log(b[index])
    scale = sub.scale()  # max |C|: a pass over every cost entry of a point cloud
    stages = _stage_eps(eps[index], scale)
    # Annealed into the first stage (with the caller's factor if any) and with momentum
    # where the backend has it (the native CUDA loops do not): the fastest way into
    # Newton's reach. Always the log domain: annealing from max|C| would underflow the
    # kernel form, and the native stabilised kernel has no momentum.
    scaling = _newton.NEWTON_BRIDGE_SCALING if eps_scaling is None else eps_scaling
    cuda_native = backend == "native" and geometry.device.type != "cpu"
    bridge_momentum = "auto" if momentum == 1.0 and not cuda_native else momentum
    solved = []  # f after each stage's Newton steps, for the extrapolation
    for number, stage in enumerate(stages):
        last = number == len(stages) - 1
        stage_tol = aim if last else max(aim, _newton.NEWTON_STAGE_TOL)
        if number == 0:
            table = eps_table(stage, scale, scaling, eps_stage_iters)
        else:
            table = stage.unsqueeze(-1)
            if len(solved) == 2:  # f is about linear in eps between the stages
                state.f = state.f.index_copy(
                    0, index, _extrapolate(*solved, *stages[number - 2 : number + 1])
                )
        loop(index, table, budget(index), max(stage_tol, _newton.NEWTON_START), "log",
             bridge_momentum)  # fmt: skip
        f_sub, steps, err_sub = _newton.polish(
            cost, a[index], b[index], stage, state.f[index], stage_tol,
            max_iter - state.n_iter[index],
        )  # fmt: skip
        step = sub.log_step(log_a, log_b, stage.unsqueeze(-1))
        state.update(index, f_sub, step.col(f_sub), steps, err_sub)
        solved = [*solved[-1:], f_sub.to(state.f.dtype)]

    left = state.stalled(tol, max_iter)
    left = left[torch.isin(left, index)]
    if len(left):  # the steps stalled: Sinkhorn at the target eps, for what is left
        loop(left, eps[left].unsqueeze(-1), budget(left), tol, "log", momentum)


def _stage_eps(target: torch.Tensor, scale: torch.Tensor) -> list[torch.Tensor]:
    """The eps of the continuation's stages, ``(K,)`` each, the last one ``target``:
    ``target * 2**s`` for ``s = NEWTON_STAGES, ..., 0``, none above the cost scale."""
    ceiling = torch.maximum(scale.to(target.dtype), target)
    powers = range(_newton.NEWTON_STAGES, -1, -1)
    return [torch.minimum(target * 2.0**power, ceiling) for power in powers]


def _extrapolate(f_older, f_old, eps_older, eps_old, eps_new) -> torch.Tensor:
    """``(K, N)`` start of the next stage: the line through the last two stages' ``f``
    (``f`` moves about linearly with eps), or ``f_old`` where those two eps coincide
    (stages capped at the cost scale)."""
    gap = (eps_old - eps_older).unsqueeze(-1)
    slope = torch.where(gap != 0, (f_old - f_older) / torch.where(gap != 0, gap, 1), 0)
    return f_old + slope * (eps_new - eps_old).unsqueeze(-1)
