"""The exceptions and warnings of the library, in one place.

* :class:`KernelUnderflowError`: kernel-form iterations produced a non-finite potential.
* :class:`NativeBuildWarning`: a native extension failed to build or load.
* :class:`SinkhornConvergenceWarning`: some problems did not reach ``tol``.
* :class:`ImplicitGradientError`: the implicit backward met a non-finite system.

They stay importable from where they were first defined (``sinkhorn_ot``,
``sinkhorn_ot._loop``, ``sinkhorn_ot.solver``, ``sinkhorn_ot.native``).

Example:
    >>> from sinkhorn_ot import errors, KernelUnderflowError
    >>> errors.KernelUnderflowError is KernelUnderflowError
    True
    >>> issubclass(errors.KernelUnderflowError, FloatingPointError)
    True
"""

from __future__ import annotations

__all__ = [
    "ImplicitGradientError",
    "KernelUnderflowError",
    "NativeBuildWarning",
    "SinkhornConvergenceWarning",
    "raise_non_finite",
]


class KernelUnderflowError(FloatingPointError):
    """Kernel-form iterations produced a non-finite potential (exp underflow)."""


class SinkhornConvergenceWarning(UserWarning):
    """Some problems of a batch did not reach ``tol`` within ``max_iter`` iterations."""


class ImplicitGradientError(FloatingPointError):
    """The implicit backward cannot be computed (non-finite adjoint system)."""


class NativeBuildWarning(RuntimeWarning):
    """A native extension failed to build or load; the torch backend is used instead."""


def raise_non_finite(method: str) -> None:
    """Raise the error of a loop whose potentials became non-finite.

    Args:
        method: ``"kernel"`` (raises :class:`KernelUnderflowError`) or ``"log"``
            (raises ``FloatingPointError``).

    Raises:
        KernelUnderflowError: for ``method="kernel"``.
        FloatingPointError: otherwise.

    Example:
        >>> from sinkhorn_ot.errors import raise_non_finite
        >>> raise_non_finite("kernel")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sinkhorn_ot.errors.KernelUnderflowError: kernel-form Sinkhorn underflowed: ...
    """
    if method == "kernel":
        raise KernelUnderflowError(
            "kernel-form Sinkhorn underflowed: exp(-C / eps) or a scaling vanished, giving "
            "non-finite potentials. Use method='log' (stable for any eps), a larger `eps`, "
            "or method='auto' to fall back automatically."
        )
    raise FloatingPointError(
        "log-domain Sinkhorn produced non-finite potentials; check `C`, `a`, `b` and `eps` "
        "for extreme values"
    )
