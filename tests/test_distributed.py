"""sinkhorn(group=...) on 2 gloo ranks (CPU processes) against the single-process solve.

Every rank also solves the whole problem in one process (``group=None``, the oracle;
``newton=False``, since sharded solves have no Newton polish) and checks its own slice
of the sharded result against it, to 1e-10 in float64. Each
test spawns its ranks once and runs several cases in them (starting processes costs
more than the solves). One test goes through ``torchrun`` itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_launch import run_ranks

from sinkhorn_ot import (
    DenseCost,
    ImplicitGradientError,
    PointCloud,
    SinkhornConvergenceWarning,
    sinkhorn,
    sqeuclidean,
)

WORLD = 2
TOL = 1e-10
ATOL = 1e-10
F64 = torch.float64


def _problem(seed, batch=2, n=13, m=9, dim=3, pad_rows=(), pad_cols=()):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, dim, generator=gen, dtype=F64)
    y = torch.randn(batch, m, dim, generator=gen, dtype=F64) + 0.5
    a = torch.rand(batch, n, generator=gen, dtype=F64) + 0.1
    b = torch.rand(batch, m, generator=gen, dtype=F64) + 0.1
    for problem, rows in pad_rows:
        a[problem, rows] = 0
    for problem, cols in pad_cols:
        b[problem, cols] = 0
    b = b / b.sum(-1, keepdim=True) * a.sum(-1, keepdim=True)
    return x, y, a, b


def _close(name, got, want, atol=ATOL):
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    if got.shape != want.shape or not torch.allclose(
        got.double(), want.double(), rtol=0, atol=atol
    ):
        gap = (got.double() - want.double()).abs().max().item() if got.shape == want.shape else "-"
        raise AssertionError(f"{name}: max gap {gap} (shapes {got.shape} vs {want.shape})")


def _same_result(label, sharded, full, rows, cols=slice(None), plan=True):
    _close(f"{label} f", sharded.f, full.f[..., rows])
    _close(f"{label} g", sharded.g, full.g[..., cols])
    for field in ("value", "value_linear"):
        _close(f"{label} {field}", getattr(sharded, field), getattr(full, field))
    if not torch.equal(sharded.n_iter, full.n_iter):
        raise AssertionError(f"{label} n_iter {sharded.n_iter} vs {full.n_iter}")
    if not torch.equal(sharded.converged, full.converged):
        raise AssertionError(f"{label} converged {sharded.converged} vs {full.converged}")
    _close(f"{label} err", sharded.err, full.err, atol=1e-13)
    if plan:
        local = sharded.plan
        local = local.to_dense() if hasattr(local, "to_dense") else local
        whole = full.plan.to_dense() if hasattr(full.plan, "to_dense") else full.plan
        _close(f"{label} plan", local, whole[..., rows, :])


def _slices(rank, cuts):
    return slice(cuts[rank], cuts[rank + 1])


# ---------------------------------------------------------------------- forward
def _forward_worker(rank, world):
    group = dist.group.WORLD
    settings = {"eps": 0.3, "tol": TOL, "backend": "torch"}
    uneven = _slices(rank, [0, 5, 13])

    # Balanced point cloud, uneven shards (5 and 8 rows).
    x, y, a, b = _problem(0)
    full = sinkhorn(PointCloud(x, y), a, b, **settings, newton=False)
    sharded = sinkhorn(PointCloud(x[:, uneven], y), a[:, uneven], b, group=group, **settings)
    _same_result("balanced", sharded, full, uneven)

    # Padded rows and columns; rank 0's rows of problem 1 all have zero weight.
    x, y, a, b = _problem(1, pad_rows=[(0, [2, 11]), (1, slice(0, 5))], pad_cols=[(1, [0, 7])])
    full = sinkhorn(PointCloud(x, y), a, b, **settings, newton=False)
    sharded = sinkhorn(PointCloud(x[:, uneven], y), a[:, uneven], b, group=group, **settings)
    _same_result("padded", sharded, full, uneven)

    # A rank whose every weight is zero, in every problem.
    x, y, a, b = _problem(2, pad_rows=[(0, slice(0, 5)), (1, slice(0, 5))])
    full = sinkhorn(PointCloud(x, y), a, b, **settings, newton=False)
    sharded = sinkhorn(PointCloud(x[:, uneven], y), a[:, uneven], b, group=group, **settings)
    _same_result("zero-weight rank", sharded, full, uneven)

    # A dense row block C_local (B, N_r, M), unbatched, uniform weights, annealed eps.
    x, y, _, _ = _problem(3, batch=1)
    C = sqeuclidean(x[0], y[0])
    scaled = {**settings, "eps": 0.1, "eps_scaling": 0.5}
    full = sinkhorn(C, **scaled, newton=False)
    sharded = sinkhorn(DenseCost(C[uneven]), group=group, **scaled)
    _same_result("dense unbatched", sharded, full, uneven)

    # A float32 dense cost far from zero: solved on C - offset, as in one process (the
    # plan would otherwise miss tol=1e-4 by about 1e-2).
    C32 = torch.rand(1, 13, 11, generator=torch.Generator().manual_seed(10)) + 1e4
    full = sinkhorn(C32, eps=0.1, tol=1e-4, backend="torch", newton=False)
    sharded = sinkhorn(DenseCost(C32[:, uneven]), eps=0.1, tol=1e-4, group=group)
    if not (bool(sharded.converged.all()) and float(sharded.err.max()) <= 1e-4):
        raise AssertionError(f"float32 offset cost: err {sharded.err.tolist()}")
    _close("float32 offset plan", sharded.plan, full.plan[:, uneven], atol=1e-6)
    _close("float32 offset value", sharded.value / 1e4, full.value / 1e4, atol=1e-6)
    _close("float32 offset g", sharded.g - sharded.g.mean(), full.g - full.g.mean(), atol=5e-3)

    # float32 at a small eps with the default tol="auto": the same rounding-floor
    # tolerance (above 1e-5) as in one process. (The loop reaches it; the plan's err can
    # exceed it by rounding, which one process refines and a sharded solve does not.)
    x, y, a, b = (t.float() for t in _problem(6))
    small = {"eps": 0.05, "max_iter": 5000}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SinkhornConvergenceWarning)
        full = sinkhorn(PointCloud(x, y), a, b, **small, backend="torch", newton=False)
        sharded = sinkhorn(PointCloud(x[:, uneven], y), a[:, uneven], b, **small, group=group)
    if not (sharded.tol == full.tol > 1e-5 and float(sharded.err.max()) < 1.1 * sharded.tol):
        raise AssertionError(f"float32 auto tol: {sharded.tol} vs {full.tol}, {sharded.err}")

    # A warm start and tol=None (exactly max_iter iterations).
    x, y, a, b = _problem(4)
    first = sinkhorn(PointCloud(x, y), a, b, eps=0.3, max_iter=5, tol=None, backend="torch")
    full = sinkhorn(
        PointCloud(x, y), a, b, eps=0.3, init=first.potentials, backend="torch", newton=False
    )
    warm = (first.f[:, uneven], first.g)
    sharded = sinkhorn(
        PointCloud(x[:, uneven], y), a[:, uneven], b, eps=0.3, init=warm, group=group
    )
    _same_result("warm start", sharded, full, uneven)

    # Rows and columns sharded (shard_y): a ring over both clouds, uneven both ways.
    x, y, a, b = _problem(5, pad_rows=[(1, [3])], pad_cols=[(0, [8])])
    full = sinkhorn(PointCloud(x, y), a, b, **settings, newton=False)
    columns = _slices(rank, [0, 6, 9])
    sharded = sinkhorn(
        PointCloud(x[:, uneven], y[:, columns]), a[:, uneven], b[:, columns],
        group=group, shard_y=True, **settings,
    )  # fmt: skip
    _same_result("shard_y", sharded, full, uneven, columns, plan=False)
    if sharded.plan is not None:
        raise AssertionError("shard_y: the plan is spread over ranks and must be None")


def test_sharded_forward_equals_single_process():
    run_ranks(_forward_worker, WORLD)


# ---------------------------------------------------------------------- communication
def _count_calls(name):
    """Count the calls of ``torch.distributed.<name>`` (the solver's module sees it)."""
    original = getattr(dist, name)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(dist, name, counting)
    return calls, lambda: setattr(dist, name, original)


def _communication_worker(rank, world):
    group = dist.group.WORLD
    rows, columns = _slices(rank, [0, 6, 13]), _slices(rank, [0, 4, 9])
    x, y, a, b = _problem(9)
    per_call = {}
    for iters in (10, 30):
        reduces, restore_reduce = _count_calls("all_reduce")
        rings, restore_ring = _count_calls("batch_isend_irecv")
        try:
            geometry = PointCloud(x[:, rows], y)
            sinkhorn(geometry, a[:, rows], b, eps=0.3, max_iter=iters, tol=None, group=group)
            rows_layout = len(reduces)
            reduces.clear()
            sharded_y = PointCloud(x[:, rows], y[:, columns])
            sinkhorn(sharded_y, a[:, rows], b[:, columns], eps=0.3, max_iter=iters, tol=None,
                     group=group, shard_y=True)  # fmt: skip
            ring_layout = len(reduces)
            reduces.clear()
            sinkhorn(geometry, a[:, rows], b, eps=0.3, max_iter=iters, tol=None, group=group,
                     rho_b=1.0)  # fmt: skip
            per_call[iters] = (rows_layout, ring_layout, len(rings), len(reduces))
        finally:
            restore_reduce()
            restore_ring()
    (r10, y10, p10, u10), (r30, y30, p30, u30) = per_call[10], per_call[30]
    # Rows sharded: ONE all-reduce per iteration (column update + stopping test together).
    if r30 - r10 != 20:
        raise AssertionError(f"rows: {r30 - r10} all-reduces for 20 iterations")
    # Relaxed (potentials rule): one more, the MAX of the potentials change.
    if u30 - u10 != 2 * 20:
        raise AssertionError(f"relaxed rows: {u30 - u10} all-reduces for 20 iterations")
    # shard_y: one all-reduce (the violation) and two rings of P - 1 hops per iteration.
    if y30 - y10 != 20 or p30 - p10 != 2 * 20 * (world - 1):
        raise AssertionError(f"shard_y: {y30 - y10} all-reduces, {p30 - p10} ring hops")


def test_one_all_reduce_per_iteration():
    run_ranks(_communication_worker, WORLD)


# ---------------------------------------------------------------------- gradients
def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _grad_worker(rank, world):
    group = dist.group.WORLD
    rows = _slices(rank, [0, 6, 13])
    x, y, a, b = _problem(6, pad_rows=[(1, [0])])
    eps = torch.tensor([0.4, 0.3], dtype=F64)
    for grad in ("envelope", "implicit"):
        # A loss on value and on g (replicated), the same on every rank.
        weights = torch.linspace(-1, 1, y.shape[1], dtype=F64) * (grad == "implicit")

        def loss_of(res, weights=weights):
            return res.value.sum() + (res.g * weights).sum()

        xf, yf, af, bf, ef = _leaves(x, y, a, b, eps)
        full = sinkhorn(
            PointCloud(xf, yf), af, bf, eps=ef, tol=TOL, grad=grad, backend="torch", newton=False
        )
        want = torch.autograd.grad(loss_of(full), (xf, yf, af, bf, ef))
        xs, ys, as_, bs, es = _leaves(x[:, rows], y, a[:, rows], b, eps)
        sharded = sinkhorn(PointCloud(xs, ys), as_, bs, eps=es, tol=TOL, grad=grad, group=group)
        got = torch.autograd.grad(loss_of(sharded), (xs, ys, as_, bs, es))
        names = ("x", "y", "a", "b", "eps")
        for name, g_got, g_want, part in zip(names, got, want, (rows, None, rows, None, None)):
            g_want = g_want[:, part] if part is not None else g_want
            _close(f"{grad} d/d{name}", g_got, g_want, atol=1e-8)

    # A dense row block, implicit gradient of the plan's rows and of f.
    C = sqeuclidean(x, y)
    (Cf,) = _leaves(C)
    full = sinkhorn(Cf, a, b, eps=0.3, tol=TOL, backend="torch", newton=False)
    probe = torch.randn(C.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    want = torch.autograd.grad((full.plan * probe).sum() + full.f.pow(2).sum(), Cf)[0]
    (Cs,) = _leaves(C[:, rows])
    sharded = sinkhorn(DenseCost(Cs), a[:, rows], b, eps=0.3, tol=TOL, group=group)
    from sinkhorn_ot.distributed import sum_over_ranks

    local_loss = (sharded.plan * probe[:, rows]).sum() + sharded.f.pow(2).sum()
    got = torch.autograd.grad(sum_over_ranks(local_loss, group), Cs)[0]
    _close("dense implicit dC", got, want[:, rows], atol=1e-8)


def test_sharded_gradients_equal_single_process():
    run_ranks(_grad_worker, WORLD)


# ---------------------------------------------------------------------- bad input
def _expect_error(label, kind, needle, call):
    try:
        call()
    except kind as error:
        if needle not in str(error):
            raise AssertionError(f"{label}: {needle!r} not in {error!r}") from error
        return str(error)
    raise AssertionError(f"{label}: no {kind.__name__} raised")


def _bad_input_worker(rank, world):
    group = dist.group.WORLD
    rows = _slices(rank, [0, 7, 13])
    x, y, a, b = _problem(8)
    x_l, a_l = x[:, rows], a[:, rows]
    bad_a = a_l.clone()
    if rank == 1:
        bad_a[0, 0] = -1.0
    message = _expect_error(
        "negative weight on rank 1", ValueError, "on rank 1 of 2: `a` must be non-negative",
        lambda: sinkhorn(PointCloud(x_l, y), bad_a, b, eps=0.3, group=group),
    )  # fmt: skip
    messages = [None] * world
    dist.all_gather_object(messages, message)
    if len(set(messages)) != 1:
        raise AssertionError(f"ranks raised different errors: {messages}")
    other_y = y + (rank == 1)
    _expect_error(
        "y differs", ValueError, "`y` must be the same on every rank",
        lambda: sinkhorn(PointCloud(x_l, other_y), a_l, b, eps=0.3, group=group),
    )  # fmt: skip
    _expect_error(
        "masses", ValueError, "same total mass",
        lambda: sinkhorn(PointCloud(x_l, y), a_l, 2 * b, eps=0.3, group=group),
    )  # fmt: skip
    _expect_error(
        "max_iter differs", ValueError, "`max_iter` must be the same on every rank",
        lambda: sinkhorn(PointCloud(x_l, y), a_l, b, eps=0.3, max_iter=10 + rank, group=group),
    )  # fmt: skip
    _expect_error(
        "kernel", ValueError, "`method` must be 'log' or 'auto' with `group`",
        lambda: sinkhorn(PointCloud(x_l, y), a_l, b, eps=0.3, method="kernel", group=group),
    )  # fmt: skip
    x_grad = x_l.clone().requires_grad_(True)
    _expect_error(
        "shard_y gradients", NotImplementedError, "shard_y=True are not implemented",
        lambda: sinkhorn(PointCloud(x_grad, y[:, rows]), a_l, b[:, rows], eps=0.3,
                         group=group, shard_y=True),
    )  # fmt: skip
    stopped = sinkhorn(
        PointCloud(x_grad, y), a_l, b, eps=0.05, max_iter=1, tol=None, group=group
    )  # far from a fixed point: the sharded adjoint refuses, on every rank
    _expect_error(
        "implicit far from a fixed point", ImplicitGradientError, "fixed point",
        lambda: torch.autograd.grad(stopped.value.sum(), x_grad),
    )  # fmt: skip
    # After all these failures the ranks are still in step: a valid solve works.
    full = sinkhorn(PointCloud(x, y), a, b, eps=0.3, tol=TOL, backend="torch", newton=False)
    sharded = sinkhorn(PointCloud(x_l, y), a_l, b, eps=0.3, tol=TOL, group=group)
    _same_result("after errors", sharded, full, rows)


def test_bad_input_on_one_rank_fails_every_rank_alike():
    run_ranks(_bad_input_worker, WORLD)


def test_group_needs_an_initialised_process_group():
    x = torch.randn(4, 2)
    with pytest.raises(RuntimeError, match=r"initialised torch\.distributed process group"):
        sinkhorn(PointCloud(x, x), eps=0.5, group=object())
    with pytest.raises(ValueError, match="`shard_y=True` needs `group`"):
        sinkhorn(PointCloud(x, x), eps=0.5, shard_y=True)


# ---------------------------------------------------------------------- torchrun
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "distributed_sinkhorn.py"


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name(
    "torchrun").exists(), reason="torchrun is not installed")  # fmt: skip
def test_torchrun_two_processes():
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun) if torchrun.exists() else "torchrun"]
    command += ["--nproc_per_node", "2", "--master_port", str(_port()), str(SCRIPT)]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["OMP_NUM_THREADS"] = "1"
    env["SHARDED_CHECK_DEVICE"] = "cpu"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("sharded == single-process") == 2, done.stdout


def _port():
    from distributed_launch import free_port

    return free_port()


# ---------------------------------------------------------------------- unbalanced
def _unbalanced_worker(rank, world):
    group = dist.group.WORLD
    settings = {"eps": 0.3, "tol": TOL, "backend": "torch"}
    uneven = _slices(rank, [0, 5, 13])
    inf = float("inf")

    def both(label, geometry, local, a, b, rows=uneven, **kw):
        full = sinkhorn(geometry, a, b, **settings, **kw, newton=False)
        sharded = sinkhorn(local, a[:, rows], b, group=group, **settings, **kw)
        _same_result(label, sharded, full, rows)
        return sharded, full

    # Both sides relaxed, unequal masses, uneven shards (5 and 8 rows).
    x, y, a, b = _problem(20)
    b = 1.7 * b
    cloud, local = PointCloud(x, y), PointCloud(x[:, uneven], y)
    both("both relaxed", cloud, local, a, b, rho_a=0.8, rho_b=2.0)
    # Semi-relaxed: hard rows, relaxed columns.
    both("semi-relaxed", cloud, local, a, b, rho_b=0.5)
    # A mixed batch: problem 0 balanced (marginal rule), problem 1 relaxed.
    x, y, a, b = _problem(21)
    b[1] *= 0.6
    rho_a, rho_b = torch.tensor([inf, 1.5], dtype=F64), torch.tensor([inf, 0.4], dtype=F64)
    sharded, _ = both("mixed batch", PointCloud(x, y), PointCloud(x[:, uneven], y), a, b,
                      rho_a=rho_a, rho_b=rho_b)  # fmt: skip
    if not bool(sharded.converged.all()):
        raise AssertionError(f"mixed batch: err {sharded.err.tolist()}")
    # Padded rows and columns, rank 0's rows of problem 1 all zero, relaxed.
    x, y, a, b = _problem(22, pad_rows=[(0, [2, 11]), (1, slice(0, 5))], pad_cols=[(1, [0, 7])])
    both("padded relaxed", PointCloud(x, y), PointCloud(x[:, uneven], y), a, 0.5 * b,
         rho_a=1.0, rho_b=1.0)  # fmt: skip
    # A dense row block far from zero, relaxed: solved as given (no centring, which would
    # change how much mass is transported), with annealed eps.
    x, y, a, b = _problem(23)
    C = sqeuclidean(x, y) + 40.0
    both("dense relaxed offset", C, DenseCost(C[:, uneven]), a, b, rho_a=30.0, rho_b=30.0,
         eps_scaling=0.5)  # fmt: skip
    # A balanced problem on the potentials rule.
    x, y, a, b = _problem(24)
    both("stop=potentials", PointCloud(x, y), PointCloud(x[:, uneven], y), a, b,
         stop="potentials")  # fmt: skip

    # Envelope gradients (value) w.r.t. x, y, a, b, eps and rho, as in one process.
    rows = _slices(rank, [0, 6, 13])
    x, y, a, b = _problem(25, pad_rows=[(1, [0])])
    b = 1.3 * b
    eps, rho = torch.tensor([0.4, 0.3], dtype=F64), torch.tensor([0.7, inf], dtype=F64)
    kw = {"tol": TOL, "grad": "envelope", "rho_b": 1.2}
    xf, yf, af, bf, ef, rf = _leaves(x, y, a, b, eps, rho)
    full = sinkhorn(
        PointCloud(xf, yf), af, bf, eps=ef, rho_a=rf, backend="torch", **kw, newton=False
    )
    want = torch.autograd.grad(full.value.sum(), (xf, yf, af, bf, ef, rf))
    xs, ys, as_, bs, es, rs = _leaves(x[:, rows], y, a[:, rows], b, eps, rho)
    sharded = sinkhorn(PointCloud(xs, ys), as_, bs, eps=es, rho_a=rs, group=group, **kw)
    got = torch.autograd.grad(sharded.value.sum(), (xs, ys, as_, bs, es, rs))
    names = ("x", "y", "a", "b", "eps", "rho_a")
    for name, g_got, g_want, part in zip(names, got, want, (rows, None, rows, None, None, None)):
        g_want = g_want[:, part] if part is not None else g_want
        _close(f"relaxed envelope d/d{name}", g_got, g_want, atol=1e-8)

    # Bad input: every rank fails alike.
    x_l, a_l = x[:, rows], a[:, rows]
    message = _expect_error(
        "rho_a <= 0 on rank 1", ValueError, "on rank 1 of 2: `rho_a` must be > 0",
        lambda: sinkhorn(PointCloud(x_l, y), a_l, b, eps=0.3, rho_a=1.0 - 2 * rank,
                         group=group),
    )  # fmt: skip
    messages = [None] * world
    dist.all_gather_object(messages, message)
    if len(set(messages)) != 1:
        raise AssertionError(f"ranks raised different errors: {messages}")
    _expect_error(
        "rho differs", ValueError, "`rho_a`, `rho_b` must be the same on every rank",
        lambda: sinkhorn(PointCloud(x_l, y), a_l, b, eps=0.3, rho_b=1.0 + rank, group=group),
    )  # fmt: skip
    x_grad = x_l.clone().requires_grad_(True)
    _expect_error(
        "implicit relaxed", NotImplementedError, "grad='implicit' with `group` and `rho_a`",
        lambda: sinkhorn(PointCloud(x_grad, y), a_l, b, eps=0.3, rho_b=1.0, group=group),
    )  # fmt: skip
    _expect_error(
        "shard_y relaxed", NotImplementedError, "not supported with shard_y=True",
        lambda: sinkhorn(PointCloud(x_l, y[:, rows]), a_l, b[:, rows], eps=0.3, rho_b=1.0,
                         group=group, shard_y=True),
    )  # fmt: skip
    _expect_error(
        "stop=marginals relaxed", ValueError, "`stop` must be 'potentials' or None",
        lambda: sinkhorn(PointCloud(x_l, y), a_l, b, eps=0.3, rho_b=1.0, stop="marginals",
                         group=group),
    )  # fmt: skip
    # Still in step after the failures.
    both("after errors", PointCloud(x, y), PointCloud(x_l, y), a, b, rows=rows, rho_a=2.0)


def test_sharded_unbalanced_equals_single_process():
    run_ranks(_unbalanced_worker, WORLD)
