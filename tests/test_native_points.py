"""Native point-cloud op ``solve_points``: parity with the torch loop on the dense cost.

The oracle is the torch backend (`sinkhorn_ot._loop.solve_potentials`) run on the dense
cost ``cost_scale * c(x, y)`` built by `sinkhorn_ot.costs` from the same points, with
the eps table of `sinkhorn_ot._loop.eps_table` for that cost: the same potentials (1e-10
relative in float64, 1e-4 in float32) and the same iteration counts, for every cost,
both methods, padding, annealing and both ways of spreading work over threads.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from sinkhorn_ot import KernelUnderflowError, costs, native, ops
from sinkhorn_ot._loop import eps_table
from sinkhorn_ot._loop import solve_potentials as torch_solve


def _toolchain_missing() -> str | None:
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler on PATH"
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed"
    if not native.enabled():
        return "native backends disabled by SINKHORN_OT_NATIVE=0"
    return None


_MISSING = _toolchain_missing()
if _MISSING is not None:
    pytest.skip(f"native-cpu cannot be built here: {_MISSING}", allow_module_level=True)

DTYPES = [torch.float64, torch.float32]
METHODS = ["log", "kernel"]
COSTS = ["sqeuclidean", "euclidean", "cosine"]
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
DENSE = {"sqeuclidean": costs.sqeuclidean, "euclidean": costs.euclidean, "cosine": costs.cosine}


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, reason = native.availability(torch.device("cpu"), torch.float64)
    assert ok, f"the native CPU backend must build on a machine with a toolchain: {reason}"


def clouds(batch, n, m, d, dtype, seed=0, pad_rows=0, pad_cols=0):
    """Points in [0, 1)^d (cosine: centred, so costs spread over [0, 2]) and weights;
    the last `pad_rows` / `pad_cols` weights of problem 0 are zero padding."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, n, d, generator=gen, dtype=torch.float64)
    y = torch.rand(batch, m, d, generator=gen, dtype=torch.float64)
    a = torch.rand(batch, n, generator=gen, dtype=torch.float64) + 0.2
    b = torch.rand(batch, m, generator=gen, dtype=torch.float64) + 0.2
    if pad_rows:
        a[0, n - pad_rows :] = 0
    if pad_cols:
        b[0, m - pad_cols :] = 0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    return tuple(t.to(dtype) for t in (x, y, a, b))


def default_f0(a, eps):
    positive = a > 0
    return torch.where(positive, -eps.unsqueeze(-1) * torch.where(positive, a, 1).log(), 0)


def assert_close_rel(actual, expected, rtol, what):
    scale = max(1.0, float(expected.abs().max()))
    diff = float((actual - expected).abs().max())
    assert diff <= rtol * scale, f"{what}: max abs difference {diff:.3g} > {rtol * scale:.3g}"


def both(
    x, y, a, b, *, cost, cost_scale=1.0, eps_rel=0.1, eps=None, eps_scaling=None, f0=None, **kw
):
    """(torch loop on the dense cost, solve_points); eps = eps_rel * max C per problem
    unless given."""
    C = DENSE[cost](x, y) * cost_scale
    scale = C.abs().amax(dim=(1, 2))
    if eps is None:
        eps = (eps_rel * scale).clamp_min(1e-3)
    if f0 is None:
        f0 = default_f0(a, eps)
    ref = torch_solve(C, a, b, eps, f0, eps_scaling=eps_scaling, **kw)
    table = eps_table(eps, scale, eps_scaling)
    out = ops.solve_points(x, y, a, b, f0, table, cost=cost, cost_scale=cost_scale, **kw)
    return ref, out


def assert_parity(ref, out, dtype):
    rtol = RTOL[dtype]
    (f_r, g_r, it_r, err_r), (f_n, g_n, it_n, err_n) = ref, out
    assert f_n.dtype == dtype and g_n.dtype == dtype
    assert it_n.dtype == torch.int64 and err_n.dtype == torch.float64
    assert torch.equal(it_n, it_r), f"n_iter: native {it_n.tolist()} vs torch {it_r.tolist()}"
    assert_close_rel(f_n, f_r, rtol, "f")
    assert_close_rel(g_n, g_r, rtol, "g")
    assert_close_rel(err_n, err_r, 100 * rtol, "err")


# (B, N, M, D): B = 1 and B > 1, odd sizes, D on both sides of the direct-difference
# limit (8), sizes below, at and above whole vectors and 4-vector tiles.
SHAPES = [(1, 1, 3, 1), (2, 5, 17, 3), (3, 17, 5, 5), (1, 64, 33, 17), (2, 3, 64, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity_fixed_iterations(shape, cost, method, dtype):
    x, y, a, b = clouds(*shape, dtype, seed=1)
    ref, out = both(x, y, a, b, cost=cost, max_iter=25, tol=None, method=method)
    assert_parity(ref, out, dtype)
    assert bool((out[2] == 25).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cost", COSTS)
def test_parity_tol_padding_and_cost_scale(cost, method, dtype):
    # Padding on both sides of problem 0, early stopping at different counts.
    x, y, a, b = clouds(3, 21, 19, 3, dtype, seed=2, pad_rows=4, pad_cols=7)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for eps_rel in (0.05, 0.2):
        ref, out = both(
            x,
            y,
            a,
            b,
            cost=cost,
            cost_scale=2.5,
            eps_rel=eps_rel,
            max_iter=3000,
            tol=tol,
            method=method,
        )
        assert_parity(ref, out, dtype)
        assert bool((out[3] <= tol).all())
    # Padding is exact: the padded problem equals the same problem without its padding.
    single = both(
        x[:1, :17],
        y[:1, :12],
        a[:1, :17],
        b[:1, :12],
        cost=cost,
        cost_scale=2.5,
        eps=(0.2 * 2.5 * DENSE[cost](x[:1], y[:1])).amax(dim=(1, 2)),  # eps of the padded one
        max_iter=3000,
        tol=tol,
        method=method,
    )[1]
    assert int(single[2][0]) == int(out[2][0])
    assert_close_rel(single[0][0], out[0][0, :17], RTOL[dtype], "f of the padded problem")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cost", COSTS)
def test_parity_annealing(cost, method, dtype):
    x, y, a, b = clouds(2, 13, 11, 5, dtype, seed=3, pad_cols=2)
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    kw = {"cost": cost, "eps_rel": 0.03, "method": method}
    ref, out = both(x, y, a, b, eps_scaling=0.6, max_iter=3000, tol=tol, **kw)
    assert_parity(ref, out, dtype)
    ref, out = both(x, y, a, b, eps_scaling=0.5, max_iter=4, tol=None, **kw)
    assert_parity(ref, out, dtype)


@pytest.mark.parametrize("method", METHODS)
def test_parity_interior_zero_weights_and_warm_start(method):
    x, y, a, b = clouds(2, 9, 14, 3, torch.float64, seed=4)
    a[:, 2] = 0
    b[1, 0] = 0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    f0 = torch.randn(2, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref, out = both(
        x, y, a, b, cost="sqeuclidean", f0=f0 * 0.01, max_iter=20, tol=None, method=method
    )
    assert_parity(ref, out, torch.float64)
    ref, out = both(x, y, a, b, cost="sqeuclidean", max_iter=0, tol=1e-6, method=method)
    assert_parity(ref, out, torch.float64)


@pytest.mark.parametrize("threads", [1, 2])
def test_parity_both_parallel_paths(threads):
    # B = 1: each half-step split over threads; B = 8 small: whole problems per thread.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(1, 300, 257, 3), (1, 130, 70, 20), (8, 40, 33, 2)]:
            x, y, a, b = clouds(*shape, torch.float64, seed=5, pad_rows=3, pad_cols=5)
            for method in METHODS:
                ref, out = both(x, y, a, b, cost="euclidean", max_iter=15, tol=None, method=method)
                assert_parity(ref, out, torch.float64)
    finally:
        torch.set_num_threads(previous)


def test_results_do_not_depend_on_thread_count():
    x, y, a, b = clouds(1, 200, 301, 3, torch.float32, seed=6, pad_cols=3)
    table = torch.full((1, 1), 0.05)
    f0 = torch.zeros_like(a)
    previous = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(
                [
                    ops.solve_points(
                        x,
                        y,
                        a,
                        b,
                        f0,
                        table,
                        max_iter=10,
                        tol=None,
                        method=method,
                        cost=cost,
                        cost_scale=1.0,
                    )
                    for method in METHODS
                    for cost in COSTS
                ]
            )
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(runs[0], runs[1]):
        for p, q in zip(one, two):
            assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_underflow_raises_like_torch(dtype):
    x, y, a, b = clouds(2, 8, 9, 3, dtype, seed=7)
    y = y + 5  # far apart: exp(-C / eps) underflows
    kw = {"cost": "sqeuclidean", "eps_rel": 1e-3, "max_iter": 20, "tol": 1e-6}
    with pytest.raises(KernelUnderflowError, match="method='log'"):
        both(x, y, a, b, method="kernel", **kw)
    C = costs.sqeuclidean(x, y)
    eps = 1e-3 * C.amax(dim=(1, 2))
    with pytest.raises(KernelUnderflowError, match="method='log'"):
        torch_solve(C, a, b, eps, default_f0(a, eps), max_iter=20, tol=1e-6, method="kernel")
    ref, out = both(x, y, a, b, method="log", **kw)  # the log domain handles it
    assert_parity(ref, out, dtype)


# --- the op and its wrapper ----------------------------------------------------------


def op_args(dtype=torch.float64, method="log", cost="sqeuclidean", tol=1e-6, d=3):
    x, y, a, b = clouds(3, 6, 5, d, dtype, seed=8)
    table = torch.tensor([[0.4, 0.2, 0.1], [0.3, 0.2, 0.2], [0.5, 0.1, 0.05]], dtype=dtype)
    return (x, y, a, b, torch.zeros_like(a), table, 40, tol, method, cost, 1.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cost", COSTS)
def test_opcheck(cost, method, dtype):
    op = torch.ops.sinkhorn_ot.solve_points.default
    torch.library.opcheck(op, op_args(dtype, method, cost))
    torch.library.opcheck(op, op_args(dtype, method, cost, tol=None, d=12))


def test_op_traces_under_torch_compile():
    x, y, a, b, f0, table, *rest = op_args()

    def fn(x, y, a, b, f0, table):
        f, g, n_iter, err = torch.ops.sinkhorn_ot.solve_points(x, y, a, b, f0, table, *rest)
        return f * 2, g + 1, n_iter, err

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for p, q in zip(compiled(x, y, a, b, f0, table), fn(x, y, a, b, f0, table)):
        assert torch.equal(p, q)


def test_op_accepts_non_contiguous_points():
    x, y, *rest = op_args()
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xt.is_contiguous()
    for p, q in zip(
        torch.ops.sinkhorn_ot.solve_points(xt, y, *rest),
        torch.ops.sinkhorn_ot.solve_points(x, y, *rest),
    ):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("index", "value", "match"),
    [
        (0, torch.ones(6, 3, dtype=torch.float64), r"`x` must have shape \(B, N, D\)"),
        (1, torch.ones(3, 5, 4, dtype=torch.float64), r"`y` must have shape \(B, M, D\)"),
        (1, torch.ones(3, 5, 3), "`y` must have the dtype of `x`"),
        (2, torch.ones(3, 7, dtype=torch.float64), r"`a` must have shape \[3, 6\]"),
        (5, torch.ones(2, 1, dtype=torch.float64), r"`eps_table` must have shape \(B, S\)"),
        (8, "auto", '`method` must be "log", "kernel" or "stabilised"'),
        (9, "manhattan", '`cost` must be "sqeuclidean", "euclidean" or "cosine"'),
        (10, float("inf"), "`cost_scale` must be finite"),
    ],
)
def test_op_rejects_bad_arguments(index, value, match):
    args = list(op_args())
    args[index] = value
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sinkhorn_ot.solve_points(*args)


def _wrapper_call(args, **kw):
    x, y, a, b, f0, table, max_iter, tol, method, cost, scale = args
    options = {
        "max_iter": max_iter,
        "tol": tol,
        "method": method,
        "cost": cost,
        "cost_scale": scale,
        **kw,
    }
    return ops.solve_points(x, y, a, b, f0, table, **options)


@pytest.mark.parametrize(
    ("index", "value", "error", "match"),
    [
        (0, torch.ones(6, 3, dtype=torch.float64), ValueError, r"`x` must have shape \(B, N, D\)"),
        (0, torch.ones(3, 6, 3, dtype=torch.int32), TypeError, "`x` must be float32 or float64"),
        (
            1,
            torch.ones(3, 5, 4, dtype=torch.float64),
            ValueError,
            r"`y` must have shape \(B, M, D\) = \(3, M, 3\), got \(3, 5, 4\)",
        ),
        (1, torch.ones(2, 5, 3, dtype=torch.float64), ValueError, r"`y` must have shape"),
        (1, torch.ones(3, 5, 3), TypeError, r"`y` must have the dtype of `x` \(torch.float64\)"),
        (
            1,
            torch.ones(3, 5, 3, dtype=torch.float64, device="meta"),
            ValueError,
            r"`y` must be on the device of `x` \(cpu\), got meta",
        ),
        (2, torch.ones(3, 7, dtype=torch.float64), ValueError, r"`a` must have shape \(3, 6\)"),
        (3, torch.ones(3, 5), TypeError, "`b` must have the dtype of `x`"),
        (5, torch.ones(3, 0, dtype=torch.float64), ValueError, "with S >= 1"),
    ],
)
def test_wrapper_rejects_bad_inputs(index, value, error, match):
    args = list(op_args())
    args[index] = value
    with pytest.raises(error, match=match):
        _wrapper_call(args)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"method": "auto"}, "`method` must be 'log', 'kernel' or 'stabilised', got 'auto'"),
        ({"cost": "manhattan"}, "`cost` must be one of 'sqeuclidean', 'euclidean', 'cosine'"),
        ({"cost_scale": float("nan")}, "`cost_scale` must be a finite float"),
        ({"max_iter": 2.5}, "`max_iter` must be an int >= 0"),
    ],
)
def test_wrapper_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        _wrapper_call(op_args(), **kw)


def test_wrapper_needs_an_available_backend():
    args = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in op_args()]
    with pytest.raises(RuntimeError, match=r"the native backend is unavailable: .*'meta'"):
        _wrapper_call(args)


# ------------------------------------------------------------------ point_softmin
def _softmin_args(dtype=torch.float64, cost="sqeuclidean", d=3, batch=3, n=37, m=29, seed=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(batch, m, d, generator=gen, dtype=torch.float64).to(dtype)
    h = torch.randn(batch, m, generator=gen, dtype=torch.float64).to(dtype)
    h[1, 3:9] = float("-inf")  # dropped points (zero weights)
    eps = torch.tensor([0.05, 0.3, 1.0][:batch], dtype=dtype)
    return x, y, h, eps


def _softmin_reference(x, y, h, eps, cost, scale):
    """-eps log sum_j exp((h_j - C_ij) / eps) on the dense cost, in float64."""
    C = scale * DENSE[cost](x.double(), y.double())
    e = eps.double().view(-1, 1, 1)
    return -e[..., 0] * torch.logsumexp((h.double().unsqueeze(1) - C) / e, dim=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("d", [2, 12])  # direct differences, then dot products
def test_point_softmin_equals_dense_logsumexp(cost, dtype, d):
    x, y, h, eps = _softmin_args(dtype, cost, d)
    out = ops.point_softmin(x, y, h, eps, cost=cost, cost_scale=0.7)
    want = _softmin_reference(x, y, h, eps, cost, 0.7)
    assert out.dtype == dtype and out.shape == (3, 37)
    gap = ((out.double() - want).abs() / want.abs().clamp_min(1)).max()
    assert float(gap) <= (1e-13 if dtype == torch.float64 else 2e-6)


def test_point_softmin_all_dropped_row_is_inf_and_threads_agree():
    x, y, h, eps = _softmin_args(batch=2)
    h[0] = float("-inf")
    out = ops.point_softmin(x, y, h, eps, cost="sqeuclidean", cost_scale=1.0)
    assert bool(torch.isposinf(out[0]).all()) and bool(torch.isfinite(out[1]).all())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = ops.point_softmin(x, y, h, eps, cost="sqeuclidean", cost_scale=1.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, alone)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cost", COSTS)
def test_point_softmin_ragged_batch_costs_only_real_pairs(cost, dtype):
    """A padded ragged batch: trailing dropped columns (h = -inf) are left out and rows
    past row_lengths are 0; the real rows equal each problem's unpadded soft-min."""
    x, y, h, eps = _softmin_args(dtype, cost, d=5)
    h[0, 20:] = float("-inf")  # trailing padding of y in problem 0
    h[2, 28] = float("-inf")
    lengths = torch.tensor([37, 11, 0])
    out = ops.point_softmin(x, y, h, eps, cost=cost, cost_scale=0.7, row_lengths=lengths)
    tight = 1e-13 if dtype == torch.float64 else 2e-6
    for k, (n_k, m_k) in enumerate([(37, 20), (11, 29), (0, 28)]):
        want = _softmin_reference(
            x[k : k + 1, :n_k], y[k : k + 1, :m_k], h[k : k + 1, :m_k], eps[k : k + 1], cost, 0.7
        )[0]
        gap = (out[k, :n_k].double() - want).abs() / want.abs().clamp_min(1)
        assert float(gap.max()) <= tight if n_k else True
        assert torch.equal(out[k, n_k:], torch.zeros(37 - n_k, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_point_softmin_opcheck(dtype):
    x, y, h, eps = _softmin_args(dtype)
    torch.library.opcheck(
        torch.ops.sinkhorn_ot.point_softmin.default, (x, y, h, eps, "euclidean", 0.5)
    )
    lengths = torch.tensor([37, 5, 0])
    torch.library.opcheck(
        torch.ops.sinkhorn_ot.point_softmin.default, (x, y, h, eps, "euclidean", 0.5, lengths)
    )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"y": torch.zeros(3, 29, 4, dtype=torch.float64)}, ValueError, r"`y` must have shape"),
        ({"h": torch.zeros(3, 28, dtype=torch.float64)}, ValueError, r"`h` must have shape"),
        ({"eps": torch.ones(3, dtype=torch.float32)}, TypeError, r"`eps` must have the dtype"),
        ({"cost": "manhattan"}, ValueError, r"`cost` must be one of"),
        ({"cost_scale": float("nan")}, ValueError, r"`cost_scale` must be a finite"),
        (
            {"row_lengths": torch.tensor([1.0, 2.0, 3.0])},
            TypeError,
            r"`row_lengths` must be an int64",
        ),
        (
            {"row_lengths": torch.tensor([1, 2])},
            ValueError,
            r"`row_lengths` must have shape \(3,\)",
        ),
        (
            {"row_lengths": torch.tensor([1, 38, 0])},
            RuntimeError,
            r"`row_lengths` must lie in \[0, N = 37\], got 38",
        ),
    ],
)
def test_point_softmin_rejects_bad_arguments(change, error, match):
    x, y, h, eps = _softmin_args()
    kwargs = {"x": x, "y": y, "h": h, "eps": eps, "cost": "sqeuclidean", "cost_scale": 1.0}
    kwargs.update(change)
    with pytest.raises(error, match=match):
        ops.point_softmin(
            kwargs.pop("x"), kwargs.pop("y"), kwargs.pop("h"), kwargs.pop("eps"), **kwargs
        )
