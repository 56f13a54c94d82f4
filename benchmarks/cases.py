"""Benchmark problems: the forward grid, the two ELIM-shaped cases, deterministic seeds.

Every case is a ready-to-solve batch ``C (B, N, M)``, ``a (B, N)``, ``b (B, M)`` plus
``eps = 0.05 * median cost``, built from a fixed seed so that every implementation and
every run sees exactly the same inputs.

* Grid cases: squared Euclidean costs between uniform points in the unit cube
  (``d = 3``), uniform weights. The cost scale is O(1), so ``eps`` is about 0.02.
* ``elim-9x10x10``: one reference identity against 9 target identities, 10 samples each
  (the ELIM training step with ``no_domain = 10``, top-k = 10): cosine cost between
  ReLU features (``D = 64``) and the relevance weights of ELIM, normalised to mass 1.
* ``elim-ragged-45``: all 45 pairs of 10 identities with 4 to 40 samples each, padded
  to one batch with :func:`sinkhorn_ot.pad_batch` (zero weights on the padding).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from sinkhorn_ot import cosine, pad_batch, sqeuclidean

#: Forward grid on CPU, ``(B, N, M)``: same total work order, from many tiny problems
#: to one large one.
CPU_GRID = [(256, 32, 32), (64, 128, 128), (8, 512, 512), (1, 2000, 2000)]

#: Larger grid used when the suite runs on a CUDA device (B up to 4096, N up to 8192).
CUDA_GRID = [
    (4096, 32, 32),
    (1024, 128, 128),
    (256, 256, 256),
    (64, 512, 512),
    (8, 2048, 2048),
    (1, 8192, 8192),
]

#: Multiplier of the median cost that defines eps for every case.
EPS_FACTOR = 0.05

#: Case used for the backward/memory targets of the differentiation issue.
TARGET_SHAPE = (64, 128, 128)

#: Cases for the memory probes, ``(B, N, M)``. The small one is where ``unroll`` can
#: run 1000 iterations (it keeps two ``(B, N, M)`` tensors per iteration: about 0.5 GB
#: here, 8 GB at the target shape, which we do not ask of a shared 2-core machine).
MEMORY_SHAPES = {"small": (16, 64, 64), "target": TARGET_SHAPE}


@dataclass
class Case:
    """One benchmark problem (already on its device, float32 unless stated).

    Attributes:
        name: short id used in test ids, tables and the JSON (e.g. ``"64x128x128"``).
        C, a, b: ``(B, N, M)``, ``(B, N)``, ``(B, M)``; zero weights mark padding.
        eps: ``EPS_FACTOR * median`` of the real (unpadded) cost entries.
        kind: ``"grid"`` or ``"elim"``.
        sizes: the unpadded ``(N_k, M_k)`` of each problem (used by per-problem loops).
    """

    name: str
    C: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    eps: float
    kind: str
    sizes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.C.shape)

    @property
    def batch(self) -> int:
        return self.C.shape[0]

    @property
    def work(self) -> int:
        """``B * N * M``: cost entries touched by one half-iteration (the x axis of plots)."""
        B, N, M = self.C.shape
        return B * N * M

    def unpadded(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Problem ``k`` without its padding: ``C (N_k, M_k)``, ``a (N_k,)``, ``b (M_k,)``."""
        n, m = self.sizes[k]
        return self.C[k, :n, :m], self.a[k, :n], self.b[k, :m]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _eps(costs: list[torch.Tensor]) -> float:
    """``EPS_FACTOR * median`` over the real cost entries (padding excluded)."""
    flat = torch.cat([c.reshape(-1) for c in costs]).double()
    return EPS_FACTOR * float(flat.median())


def grid_case(B: int, N: int, M: int, device="cpu", dtype=torch.float32, seed: int = 0) -> Case:
    """Squared Euclidean cost between uniform points in ``[0, 1]^3``, uniform weights."""
    g = _generator(seed + 1000 * B + N + M)
    x = torch.rand(B, N, 3, generator=g, dtype=torch.float64)
    y = torch.rand(B, M, 3, generator=g, dtype=torch.float64)
    C = sqeuclidean(x, y).to(dtype)
    a = torch.full((B, N), 1.0 / N, dtype=dtype)
    b = torch.full((B, M), 1.0 / M, dtype=dtype)
    eps = _eps([C])
    case = Case(f"{B}x{N}x{M}", C, a, b, eps, "grid", [(N, M)] * B)
    return to_device(case, device)


def _elim_pair(z_ref: torch.Tensor, z_tgt: torch.Tensor):
    """ELIM's cost ``1 - cos`` and relevance weights (ReLU of the dot product with the
    other set's mean feature), normalised to mass 1 so both sides balance."""
    C = cosine(z_ref, z_tgt)
    a = torch.relu(z_ref @ z_tgt.mean(0)) + 1e-3  # the floor keeps every sample in play
    b = torch.relu(z_tgt @ z_ref.mean(0)) + 1e-3
    return C, a / a.sum(), b / b.sum()


def _features(n: int, g: torch.Generator, dim: int = 64) -> torch.Tensor:
    """ReLU features, like the output of ELIM's ``Linear-BN-ReLU`` encoder head."""
    return torch.relu(torch.randn(n, dim, generator=g, dtype=torch.float64))


def elim_targets_case(device="cpu", dtype=torch.float32, seed: int = 1) -> Case:
    """One reference identity vs 9 target identities, 10 samples each: ``(9, 10, 10)``."""
    g = _generator(seed)
    z_ref = _features(10, g)
    pairs = [_elim_pair(z_ref, _features(10, g)) for _ in range(9)]
    C = torch.stack([p[0] for p in pairs]).to(dtype)
    a = torch.stack([p[1] for p in pairs]).to(dtype)
    b = torch.stack([p[2] for p in pairs]).to(dtype)
    case = Case("elim-9x10x10", C, a, b, _eps([C]), "elim", [(10, 10)] * 9)
    return to_device(case, device)


def elim_ragged_case(device="cpu", dtype=torch.float32, seed: int = 2) -> Case:
    """All 45 pairs of 10 identities with 4..40 samples each, padded by ``pad_batch``."""
    g = _generator(seed)
    counts = torch.randint(4, 41, (10,), generator=g).tolist()
    feats = [_features(n, g) for n in counts]
    pairs = [_elim_pair(feats[i], feats[j]) for i, j in itertools.combinations(range(10), 2)]
    costs = [p[0].to(dtype) for p in pairs]
    C, a, b = pad_batch(costs, [p[1].to(dtype) for p in pairs], [p[2].to(dtype) for p in pairs])
    sizes = [tuple(c.shape) for c in costs]
    case = Case("elim-ragged-45", C, a, b, _eps(costs), "elim", sizes)
    return to_device(case, device)


def to_device(case: Case, device) -> Case:
    """The same case on ``device`` (inputs are always generated on the CPU so that they
    do not depend on the device's random number generator)."""
    if torch.device(device).type == "cpu":
        return case
    return Case(
        case.name,
        case.C.to(device),
        case.a.to(device),
        case.b.to(device),
        case.eps,
        case.kind,
        case.sizes,
    )


@dataclass(frozen=True)
class CaseSpec:
    """A case known by name and batch size before it is built (for test parametrisation)."""

    name: str
    batch: int
    shape: tuple[int, int, int] | None  # None for the ragged case (padded shape varies)


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def forward_specs(device="cpu") -> list[CaseSpec]:
    """The forward grid for ``device``, then the two ELIM-shaped cases."""
    grid = CUDA_GRID if _is_cuda(device) else CPU_GRID
    return [CaseSpec(f"{B}x{N}x{M}", B, (B, N, M)) for B, N, M in grid] + [
        CaseSpec("elim-9x10x10", 9, (9, 10, 10)),
        CaseSpec("elim-ragged-45", 45, None),
    ]


_CACHE: dict[tuple[str, str], Case] = {}


def get_case(name: str, device="cpu") -> Case:
    """Build (once per session) the case called ``name`` on ``device``."""
    key = (name, str(torch.device(device)))
    if key not in _CACHE:
        if name == "elim-9x10x10":
            case = elim_targets_case(device)
        elif name == "elim-ragged-45":
            case = elim_ragged_case(device)
        else:
            B, N, M = (int(s) for s in name.split("x"))
            case = grid_case(B, N, M, device=device)
        _CACHE[key] = case
    return _CACHE[key]
