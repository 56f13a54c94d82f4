"""Scaling of the sharded solve over processes (runs with ``--benchmark`` only)."""

from __future__ import annotations

from .distributed_scaling import run_scaling


def test_distributed_scaling():
    print(run_scaling())
