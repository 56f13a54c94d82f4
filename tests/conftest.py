"""Shared fixtures: the backends every solver test runs on."""

import os

import pytest
import torch

from sinkhorn_ot import native


def _backends():
    params = [pytest.param("torch", id="torch")]
    ok, reason = native.availability(torch.device("cpu"), torch.float64)
    if not ok and os.environ.get("SINKHORN_OT_REQUIRE_NATIVE") == "1":
        raise RuntimeError(f"SINKHORN_OT_REQUIRE_NATIVE=1 but native-cpu is unavailable: {reason}")
    marks = [] if ok else [pytest.mark.skip(reason=f"native-cpu unavailable: {reason}")]
    params.append(pytest.param("native", id="native", marks=marks))
    return params


@pytest.fixture(params=_backends())
def backend(request):
    """Backend name for solver tests; native runs wherever it is built."""
    return request.param
