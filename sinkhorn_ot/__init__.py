"""sinkhorn_ot: batched, differentiable entropic optimal transport for PyTorch.

Example:
    >>> import torch
    >>> from sinkhorn_ot import sinkhorn
    >>> res = sinkhorn(torch.rand(4, 6, 5), eps=0.05)
    >>> res.plan.shape
    torch.Size([4, 6, 5])
"""

from ._loop import KernelUnderflowError
from .costs import cosine, euclidean, sqeuclidean
from .divergence import SinkhornLoss, sinkhorn_divergence
from .errors import ImplicitGradientError, SinkhornConvergenceWarning
from .exact import EMDResult, emd
from .geometry import DenseCost, Geometry, PointCloud
from .padding import pad_batch, pad_points
from .plan import LazyPlan
from .result import SinkhornResult
from .solver import sinkhorn

__version__ = "0.1.0"

__all__ = [
    "DenseCost",
    "EMDResult",
    "Geometry",
    "ImplicitGradientError",
    "KernelUnderflowError",
    "LazyPlan",
    "PointCloud",
    "SinkhornConvergenceWarning",
    "SinkhornLoss",
    "SinkhornResult",
    "cosine",
    "emd",
    "euclidean",
    "pad_batch",
    "pad_points",
    "sinkhorn",
    "sinkhorn_divergence",
    "sqeuclidean",
]
