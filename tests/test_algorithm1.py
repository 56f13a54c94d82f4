"""Algorithm 1 of the ELIM appendix, transcribed literally in NumPy, is our kernel form."""

import numpy as np
import pytest
import torch

from sinkhorn_ot import sinkhorn


def algorithm1(C, a, b, eta, T):
    """Appendix Algorithm 1, line by line (the loop runs exactly T times)."""
    n = C.shape[0]
    K = np.exp(-C / eta)  # line 1
    K_tilde = np.diag(1.0 / a) @ K
    u_old = np.ones(n) / n
    t = 0
    while t < T:  # line 2 ("or t is less than T": a fixed count, as in the code)
        u = 1.0 / (K_tilde @ (b / (K.T @ u_old)))  # line 3
        u_old = u  # line 4
        t += 1  # line 5
    u_star = u_old  # line 7
    v_star = b / (K.T @ u_star)  # line 8
    return np.diag(u_star) @ K @ np.diag(v_star)  # line 9


@pytest.mark.parametrize("T", [1, 5, 20])
@pytest.mark.parametrize("eta", [0.2, 5.0])
def test_kernel_form_reproduces_algorithm1(backend, T, eta):
    rng = np.random.default_rng(T)
    n, m = 6, 9
    C = 1 - rng.uniform(-1, 1, (n, m))  # a 1 - cos cost, as in ELIM
    a = rng.uniform(0.2, 1.0, n)
    b = rng.uniform(0.2, 1.0, m)
    a, b = a / a.sum() * n, b / b.sum() * n  # equal masses, like ELIM's weights
    expected = algorithm1(C, a, b, eta, T)
    res = sinkhorn(
        torch.from_numpy(C),
        torch.from_numpy(a),
        torch.from_numpy(b),
        eps=eta,
        method="kernel",
        max_iter=T,
        tol=None,
        grad="none",
        backend=backend,
    )
    assert int(res.n_iter) == T
    np.testing.assert_allclose(res.plan.numpy(), expected, rtol=1e-12, atol=0)
    # Line 8 makes the column marginal exact whatever T is.
    np.testing.assert_allclose(res.plan.sum(0).numpy(), b, rtol=1e-12)


def test_batched_kernel_form_reproduces_algorithm1_per_problem(backend):
    rng = np.random.default_rng(0)
    B, n, m = 4, 5, 7
    C = rng.uniform(0, 2, (B, n, m))
    a = np.full((B, n), 1.0)
    b = np.full((B, m), n / m)
    res = sinkhorn(
        torch.from_numpy(C),
        torch.from_numpy(a),
        torch.from_numpy(b),
        eps=0.2,
        method="kernel",
        max_iter=5,
        tol=None,
        grad="none",
        backend=backend,
    )
    for k in range(B):
        np.testing.assert_allclose(
            res.plan[k].numpy(), algorithm1(C[k], a[k], b[k], 0.2, 5), rtol=1e-12
        )
