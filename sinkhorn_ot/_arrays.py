"""Array inputs at the public entry points: NumPy arrays in, NumPy arrays out.

:func:`~sinkhorn_ot.sinkhorn`, :func:`~sinkhorn_ot.emd`, :func:`~sinkhorn_ot.pad_batch`
and the cost builders of :mod:`sinkhorn_ot.costs` take, besides tensors, NumPy arrays,
nested lists and anything else :func:`torch.as_tensor` reads (objects with
``__array__``, ``__dlpack__`` or ``__cuda_array_interface__``). The rule for what comes
back, one for every entry point:

* tensors in (any of the array arguments is a :class:`torch.Tensor` or a geometry):
  tensors out; the other array arguments are moved to that tensor's device;
* otherwise, NumPy arrays, lists or other objects NumPy reads: NumPy arrays out (0-d
  results as NumPy scalars, like NumPy's own reductions), as a POT user expects;
* DLPack / CUDA-array objects (CuPy, JAX, ...) without a tensor: tensors out, on their
  device (``torch.as_tensor`` keeps it).

NumPy integer and boolean arrays become float64 (NumPy's own promotion for arithmetic);
floating arrays keep their dtype (float64 stays float64). Memory is shared with the
input where ``torch.from_numpy`` allows it; read-only, byte-swapped or negatively
strided arrays are copied. Gradients do not flow back into NumPy arrays.

Example:
    >>> import numpy as np
    >>> from sinkhorn_ot import sinkhorn
    >>> M = np.array([[0.0, 1.0], [1.0, 0.0]])
    >>> res = sinkhorn(M, eps=0.1)
    >>> type(res.plan).__name__, res.plan.dtype, type(res.value).__name__
    ('ndarray', dtype('float64'), 'float64')
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

__all__ = ["Arrays"]


def _numpy_like(x: object) -> bool:
    """Read through NumPy (and so returned as NumPy arrays)."""
    if isinstance(x, np.ndarray | list | tuple):
        return True
    return hasattr(x, "__array__") and not _device_array(x)


def _device_array(x: object) -> bool:
    """Read through DLPack or the CUDA array interface (and returned as tensors)."""
    if isinstance(x, np.ndarray):
        return False
    return hasattr(x, "__dlpack__") or hasattr(x, "__cuda_array_interface__")


def _array_like(x: object) -> bool:
    return not isinstance(x, torch.Tensor) and (_numpy_like(x) or _device_array(x))


def _from_numpy(x: object) -> torch.Tensor:
    arr = np.asarray(x)
    if arr.dtype.kind in "biu":
        arr = arr.astype(np.float64)
    if arr.dtype.kind in "fc" and (
        not arr.flags.writeable or not arr.dtype.isnative or any(s < 0 for s in arr.strides)
    ):
        arr = np.array(arr, dtype=arr.dtype.newbyteorder("="))
    if arr.dtype.kind not in "fc":
        # torch cannot hold strings or objects; the caller's check names the argument.
        return x  # type: ignore[return-value]
    return torch.from_numpy(arr)


def _to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        arr = value.detach().cpu().numpy()
        return arr[()] if arr.ndim == 0 else arr
    return value


class Arrays:
    """The conversion of one call: array arguments to tensors, results back.

    Args:
        *values: the call's array arguments (``None`` entries are ignored); they decide
            the return type by the rule of the module docstring.

    Example:
        >>> import numpy as np, torch
        >>> from sinkhorn_ot._arrays import Arrays
        >>> arrays = Arrays(np.ones(2), None)
        >>> t = arrays.tensor(np.ones(2))
        >>> t.dtype, arrays.back(t * 2).tolist()
        (torch.float64, [2.0, 2.0])
        >>> Arrays(torch.ones(2), np.ones(2)).back(torch.ones(1))
        tensor([1.])
    """

    def __init__(self, *values: object):
        given = [v for v in values if v is not None]
        ref = next((v for v in given if isinstance(v, torch.Tensor)), None)
        self.device = ref.device if ref is not None else None
        self.numpy = bool(given) and all(_numpy_like(v) for v in given)

    def tensor(self, x: Any) -> Any:
        """``x`` as a tensor if it is an array; anything else (tensors, ``None``,
        floats, geometries) unchanged."""
        if not _array_like(x):
            return x
        t = _from_numpy(x) if _numpy_like(x) else torch.as_tensor(x)
        if self.device is not None and isinstance(t, torch.Tensor):
            t = t.to(self.device)
        return t

    def pair(self, x: Any) -> Any:
        """A pair such as ``init=(f, g)``, each entry converted."""
        if isinstance(x, tuple | list) and len(x) == 2:
            return type(x)(self.tensor(v) for v in x)
        return x

    def back(self, out: Any) -> Any:
        """A result in the caller's type: a tensor, a tuple of tensors or a result
        dataclass (its tensor fields), as NumPy when the inputs were NumPy."""
        if not self.numpy:
            return out
        if dataclasses.is_dataclass(out) and not isinstance(out, type):
            fields = {f.name: _to_numpy(getattr(out, f.name)) for f in dataclasses.fields(out)}
            return dataclasses.replace(out, **fields)
        if isinstance(out, tuple):
            return tuple(_to_numpy(v) for v in out)
        return _to_numpy(out)
