"""ELIM identity matching (reference §2, step 2), batched over all identity pairs.

One ELIM step on a mini-batch of features ``z`` (B, D) and labels ``y`` (B, 2):

1. :func:`group_by_domain` splits the batch by identity (or age group: any domain id);
   :func:`choose_domains` picks ``num_domains`` of them, the first being the reference.
2. :func:`gumbel_topk` keeps at most ``k`` samples per domain, favouring large
   ``||y||`` (Algorithm 3).
3. :func:`pairwise_cost` and :func:`relevance_weights` build ``M_ij = 1 - cos(z_i, z_j)``
   and the weights ``a``, ``b`` for every (reference, target) pair at once.
4. :func:`ot_id_shift` solves every pair with ONE call of :func:`sinkhorn_ot.sinkhorn`
   and returns ``mu_j = sum_i X_ij M_ij`` per target sample.
5. :func:`shift_and_normalize` shifts target features by ``mu`` and RMS-normalises them.

:func:`elim_matching_step` runs all of it and returns padded tensors for
:func:`elim.losses.elim_loss`.

Padding convention (the same as :func:`sinkhorn_ot.pad_batch`): sets are stored as
``(T, L, ...)`` tensors with real samples first and a bool mask (``True`` = real);
padded costs are 0 and padded weights are 0, so padded columns carry no mass.

Choices that differ from the released code (reference §6):

- Equal masses: ``a`` and ``b`` are both rescaled to sum to the target set size ``m``
  (``mass="target"``, default). The released code scaled ``a`` to ``n`` and ``b`` to
  ``m`` and fed them to a balanced solver. Using ``m`` for both keeps the plan's column
  sums ``b_j`` at 1 on average, as in the released code, so ``mu_j`` stays on the same
  scale (a per-sample average cost in [0, 2]) whatever the set sizes. ``"unit"`` (both
  sum to 1) and ``"reference"`` (both sum to ``n``) are available; the plan, hence
  ``mu``, scales linearly with the common mass.
- An all-zero ReLU weight vector falls back to uniform weights, so the solver never
  sees a problem without mass.
- ``shift="vector"`` (default) shifts every target sample by its own ``mu_j``;
  ``shift="scalar"`` reproduces the released code, which used ``mu_0`` for the whole set.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

import sinkhorn_ot
from sinkhorn_ot.options import BACKENDS, GRADS, METHODS

__all__ = [
    "DomainGroups",
    "GumbelTopK",
    "MatchedBatch",
    "MatchingConfig",
    "MatchingSets",
    "choose_domains",
    "elim_matching_step",
    "group_by_domain",
    "gumbel_topk",
    "ot_id_shift",
    "pairwise_cost",
    "relevance_weights",
    "sample_sets",
    "shift_and_normalize",
]

_SHIFTS = ("vector", "scalar")
_MASSES = ("target", "unit", "reference")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class MatchingConfig:
    """Settings of one ELIM matching step.

    The defaults are the paper's: 10 domains, Gumbel top-10, ``eps = 0.2`` (the code's
    ``K = exp(-5 M)``) and Algorithm 1 exactly (``method="kernel"``, 5 fixed iterations,
    no tolerance). :meth:`converged` instead runs the log-domain solver to ``tol=1e-5``.

    Attributes:
        num_domains: identities drawn per step, reference included (fewer if the batch
            has fewer).
        top_k: samples kept per domain by Gumbel top-k; ``None`` keeps all.
        gumbel_temperature: softmax temperature of the reported Gumbel probabilities
            (it does not change which samples are selected; see :func:`gumbel_topk`).
        eps: entropic regularisation of the solver.
        method: ``"kernel"`` (Algorithm 1), ``"log"`` (stable) or ``"auto"``.
        max_iter: Sinkhorn iterations (``T`` of Algorithm 1 when ``tol`` is None).
        tol: stopping tolerance, ``None`` = exactly ``max_iter`` iterations.
        grad: the solver's gradient mode; it only matters when ``detach_shift`` is False.
        shift: ``"vector"`` (one shift per target sample) or ``"scalar"`` (released code).
        mass: common total mass of ``a`` and ``b``: ``"target"`` (m), ``"unit"`` (1) or
            ``"reference"`` (n).
        detach_shift: compute the shift from detached features (the reference code);
            only the normalised features then carry gradient to the encoder.
        rms_eps: the ``1e-6`` added to the RMS in the normalisation.
        backend: the solver's backend: ``"auto"`` (the native kernels, built on first
            use, else torch), ``"torch"`` or ``"native"``.

    Example:
        >>> MatchingConfig().method, MatchingConfig.converged().tol
        ('kernel', 1e-05)
    """

    num_domains: int = 10
    top_k: int | None = 10
    gumbel_temperature: float = 0.5
    eps: float = 0.2
    method: Literal["kernel", "log", "auto"] = "kernel"
    max_iter: int = 5
    tol: float | None = None
    grad: Literal["none", "implicit", "envelope", "unroll"] = "none"
    shift: Literal["vector", "scalar"] = "vector"
    mass: Literal["target", "unit", "reference"] = "target"
    detach_shift: bool = True
    rms_eps: float = 1e-6
    backend: Literal["auto", "torch", "native"] = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.num_domains, bool) or not isinstance(self.num_domains, int):
            raise ValueError(f"`num_domains` must be an int >= 2, got {self.num_domains!r}")
        if self.num_domains < 2:
            raise ValueError(
                f"`num_domains` must be >= 2 (reference + target), got {self.num_domains}"
            )
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"`top_k` must be None or an int >= 1, got {self.top_k!r}")
        if not self.gumbel_temperature > 0:
            raise ValueError(f"`gumbel_temperature` must be > 0, got {self.gumbel_temperature}")
        if not self.eps > 0:
            raise ValueError(f"`eps` must be > 0, got {self.eps}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"`max_iter` must be an int >= 1, got {self.max_iter!r}")
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"`tol` must be None or > 0, got {self.tol}")
        if not self.rms_eps >= 0:
            raise ValueError(f"`rms_eps` must be >= 0, got {self.rms_eps}")
        _check_choice("method", self.method, METHODS)
        _check_choice("grad", self.grad, GRADS)
        _check_choice("shift", self.shift, _SHIFTS)
        _check_choice("mass", self.mass, _MASSES)
        _check_choice("backend", self.backend, BACKENDS)

    @classmethod
    def paper(cls, **overrides: object) -> MatchingConfig:
        """Algorithm 1 as published: kernel form, 5 fixed iterations (the defaults)."""
        return replace(cls(), **{"method": "kernel", "max_iter": 5, "tol": None, **overrides})

    @classmethod
    def converged(cls, **overrides: object) -> MatchingConfig:
        """Log-domain Sinkhorn run to ``tol=1e-5`` (at most 1000 iterations)."""
        return replace(cls(), **{"method": "log", "max_iter": 1000, "tol": 1e-5, **overrides})


class DomainGroups(NamedTuple):
    """A batch split by domain, domains in sorted id order.

    Attributes:
        ids: the distinct domain ids, sorted.
        indices: per domain, the batch positions of its samples ``(n_e,)`` int64.
        features: per domain, ``(n_e, D)``.
        labels: per domain, ``(n_e, 2)``.
    """

    ids: list[Hashable]
    indices: list[torch.Tensor]
    features: list[torch.Tensor]
    labels: list[torch.Tensor]


def _domain_codes(domain_ids: torch.Tensor | Sequence[Hashable], batch: int, device: torch.device):
    """Map domain ids to codes 0..E-1 in sorted id order; return (codes, sorted ids)."""
    if isinstance(domain_ids, torch.Tensor):
        if domain_ids.dim() != 1 or domain_ids.shape[0] != batch or domain_ids.is_floating_point():
            raise ValueError(
                f"`domain_ids` must be an integer tensor of shape ({batch},), "
                f"got {domain_ids.dtype} of shape {tuple(domain_ids.shape)}"
            )
        uniq, codes = torch.unique(domain_ids, sorted=True, return_inverse=True)
        return codes.to(device), uniq.tolist()
    ids = list(domain_ids)
    if len(ids) != batch:
        raise ValueError(f"`domain_ids` must have {batch} entries (one per sample), got {len(ids)}")
    uniq = sorted(set(ids))
    lookup = {d: i for i, d in enumerate(uniq)}
    return torch.tensor([lookup[d] for d in ids], dtype=torch.long, device=device), uniq


def group_by_domain(
    features: torch.Tensor,
    labels: torch.Tensor,
    domain_ids: torch.Tensor | Sequence[Hashable],
) -> DomainGroups:
    """Split a batch by domain (appendix Algorithm 2).

    Args:
        features: ``(B, D)``.
        labels: ``(B, 2)`` valence/arousal.
        domain_ids: ``(B,)`` integer tensor, or a length-B sequence of sortable
            hashables (e.g. clip folder names).

    Returns:
        :class:`DomainGroups`, domains in sorted id order, samples in batch order.

    Example:
        >>> g = group_by_domain(torch.zeros(4, 3), torch.zeros(4, 2), ["b", "a", "b", "c"])
        >>> g.ids, [i.tolist() for i in g.indices]
        (['a', 'b', 'c'], [[1], [0, 2], [3]])
    """
    if features.dim() != 2:
        raise ValueError(f"`features` must have shape (B, D), got {tuple(features.shape)}")
    batch = features.shape[0]
    if tuple(labels.shape) != (batch, 2):
        raise ValueError(f"`labels` must have shape ({batch}, 2), got {tuple(labels.shape)}")
    codes, ids = _domain_codes(domain_ids, batch, features.device)
    # A stable sort keeps batch order inside each domain.
    order = torch.sort(codes, stable=True).indices
    counts = torch.bincount(codes, minlength=len(ids)).tolist()
    indices = list(torch.split(order, counts))
    return DomainGroups(
        ids,
        indices,
        [features[i] for i in indices],
        [labels[i] for i in indices],
    )


def choose_domains(
    num_available: int, num_domains: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw distinct domains at random; the first one is the reference.

    Args:
        num_available: number of domains in the batch.
        num_domains: how many to draw; all of them (shuffled) if fewer are available.
        generator: source of randomness (CPU generator).

    Returns:
        Positions into the available domains, ``(min(num_domains, num_available),)``.

    Example:
        >>> choose_domains(5, 3, torch.Generator().manual_seed(0)).shape
        torch.Size([3])
    """
    if num_available < 1:
        raise ValueError(f"`num_available` must be >= 1, got {num_available}")
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(num_available, generator=generator, device=device)[:num_domains]


def _pad_indices(index_lists: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged index lists -> padded ``(E, L)`` indices (pad 0) and a validity mask."""
    lengths = torch.tensor([len(i) for i in index_lists], device=index_lists[0].device)
    padded = torch.nn.utils.rnn.pad_sequence(list(index_lists), batch_first=True)
    mask = torch.arange(padded.shape[1], device=padded.device) < lengths.unsqueeze(1)
    return padded, mask


def _compact(index: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the valid entries of each row to the front (stable) and trim the padding."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    index, mask = index.gather(1, order), mask.gather(1, order)
    width = max(int(mask.sum(1).max()), 1)
    return index[:, :width], mask[:, :width]


class GumbelTopK(NamedTuple):
    """Result of :func:`gumbel_topk`.

    Attributes:
        keep: ``(E, L)`` bool, the selected samples (``min(k, n_e)`` per row).
        probs: ``(E, L)`` Gumbel-softmax probabilities at the given temperature, 0 at
            padding.
    """

    keep: torch.Tensor
    probs: torch.Tensor


def gumbel_topk(
    labels: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    temperature: float = 0.5,
) -> GumbelTopK:
    """Gumbel top-k sampling of each domain, weighted by label norm (Algorithm 3).

    ``pi_i = log(||y_i|| / sum_j ||y_j||)`` per domain, perturbed by Gumbel noise; the
    ``k`` largest are kept. Since softmax is monotonic, selecting on the perturbed
    log-probabilities is the same as selecting on the temperature-0.5 softmax of the
    appendix, without the ties that softmax underflow would create; the softmax is
    still returned as ``probs``.

    A domain with fewer than ``k`` samples keeps them all. A zero label gets
    ``pi = log(tiny)`` instead of ``-inf``: still the least likely, but finite, so
    nothing becomes NaN; a domain whose labels are all zero is sampled uniformly.

    Args:
        labels: padded labels ``(E, L, 2)``.
        mask: ``(E, L)`` bool, ``True`` for real samples.
        k: samples to keep per domain, >= 1.
        generator: source of the Gumbel noise (drawn on the generator's device).
        temperature: softmax temperature of ``probs``.

    Returns:
        :class:`GumbelTopK` with ``keep`` and ``probs``, both ``(E, L)``.

    Example:
        >>> y = torch.tensor([[[0.5, 0.1], [0.0, 0.0], [0.9, -0.2]]])
        >>> out = gumbel_topk(y, torch.ones(1, 3, dtype=torch.bool), k=5)
        >>> out.keep.tolist()  # fewer than k samples: all kept
        [[True, True, True]]
    """
    if labels.dim() != 3 or labels.shape[-1] != 2:
        raise ValueError(f"`labels` must have shape (E, L, 2), got {tuple(labels.shape)}")
    if mask.dtype != torch.bool or mask.shape != labels.shape[:2]:
        raise ValueError(
            f"`mask` must be a bool tensor of shape {tuple(labels.shape[:2])}, "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an int >= 1, got {k!r}")
    labels = labels.detach()
    dtype = labels.dtype if labels.is_floating_point() else torch.float32
    norms = labels.to(dtype).norm(dim=-1).masked_fill(~mask, 0.0)
    total = norms.sum(-1, keepdim=True)
    count = mask.sum(-1, keepdim=True).clamp_min(1)
    p = torch.where(total > 0, norms / total.clamp_min(torch.finfo(dtype).tiny), 1.0 / count)
    pi = p.clamp_min(torch.finfo(dtype).tiny).log()

    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(pi.shape, generator=generator, device=gen_device, dtype=dtype).to(pi.device)
    u = u.clamp(torch.finfo(dtype).tiny, 1.0 - torch.finfo(dtype).eps)
    logits = (pi - torch.log(-torch.log(u))).masked_fill(~mask, float("-inf"))

    top = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).indices
    keep = torch.zeros_like(mask).scatter_(1, top, True) & mask
    probs = torch.softmax(logits / temperature, dim=-1).masked_fill(~mask, 0.0)
    return GumbelTopK(keep, probs)


def pairwise_cost(
    reference: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """Cosine cost ``M_ij = 1 - cos(z_i^ref, z_j^tgt)`` for every target set.

    Args:
        reference: ``(n, D)``.
        targets: padded target sets ``(T, m, D)``.
        target_mask: ``(T, m)`` bool, ``True`` for real samples.

    Returns:
        ``(T, n, m)`` costs in [0, 2]; 0 in padded columns (``pad_batch`` layout). A
        zero feature vector has cosine 0 with everything (cost 1).

    Example:
        >>> C = pairwise_cost(torch.eye(2), torch.eye(2)[None], torch.ones(1, 2).bool())
        >>> C.tolist()
        [[[0.0, 1.0], [1.0, 0.0]]]
    """
    ref = F.normalize(reference, dim=-1, eps=1e-8)
    tgt = F.normalize(targets, dim=-1, eps=1e-8)
    cost = 1.0 - torch.einsum("nd,tmd->tnm", ref, tgt)
    return cost.masked_fill(~target_mask.unsqueeze(1), 0.0)


def _rescale(raw: torch.Tensor, valid: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Rescale non-negative rows to sum to ``mass``; an all-zero row becomes uniform."""
    total = raw.sum(-1, keepdim=True)
    uniform = valid.to(raw.dtype) / valid.sum(-1, keepdim=True).clamp_min(1)
    share = torch.where(total > 0, raw / total.clamp_min(torch.finfo(raw.dtype).tiny), uniform)
    return share * mass


def relevance_weights(
    reference: torch.Tensor,
    targets: torch.Tensor,
    target_mask: torch.Tensor,
    mass: Literal["target", "unit", "reference"] = "target",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance weights ``a_i = ReLU(z_i^ref . mean(Z^tgt))``, ``b_j = ReLU(z_j^tgt . mean(Z^ref))``.

    Both are rescaled to the same total mass per pair (see the module docstring):
    the target set size ``m_t`` (``"target"``), 1 (``"unit"``) or ``n`` (``"reference"``).
    A weight vector that ReLU zeroes entirely is replaced by uniform weights.

    Args:
        reference: ``(n, D)``.
        targets: padded ``(T, m, D)``.
        target_mask: ``(T, m)`` bool.
        mass: common total mass.

    Returns:
        ``a`` ``(T, n)`` and ``b`` ``(T, m)`` (0 at padding); ``a[t].sum() == b[t].sum()``.

    Example:
        >>> a, b = relevance_weights(torch.rand(3, 4), torch.rand(2, 5, 4), torch.ones(2, 5).bool())
        >>> a.sum(-1).round(decimals=4).tolist(), b.sum(-1).round(decimals=4).tolist()
        ([5.0, 5.0], [5.0, 5.0])
    """
    _check_choice("mass", mass, _MASSES)
    valid = target_mask.to(targets.dtype)
    m_t = valid.sum(-1, keepdim=True)
    tgt_mean = (targets * valid.unsqueeze(-1)).sum(1) / m_t.clamp_min(1)  # (T, D)
    a_raw = F.relu(tgt_mean @ reference.T)  # (T, n)
    b_raw = F.relu(targets @ reference.mean(0)) * valid  # (T, m)
    n = reference.shape[0]
    if mass == "target":
        total = m_t
    elif mass == "reference":
        total = torch.full_like(m_t, float(n))
    else:
        total = torch.ones_like(m_t)
    ref_valid = torch.ones_like(a_raw, dtype=torch.bool)
    return _rescale(a_raw, ref_valid, total), _rescale(b_raw, target_mask, total)


def ot_id_shift(
    reference: torch.Tensor,
    targets: torch.Tensor,
    target_mask: torch.Tensor,
    config: MatchingConfig,
) -> torch.Tensor:
    """ID shift ``mu_j = sum_i X_ij M_ij`` of every target sample, one solver call.

    Every (reference, target) pair is one problem of a ``(T, n, m)`` batch solved by a
    single :func:`sinkhorn_ot.sinkhorn` call.

    Args:
        reference: ``(n, D)``.
        targets: padded ``(T, m, D)``.
        target_mask: ``(T, m)`` bool; padded columns get zero weight, hence ``mu = 0``.
        config: solver, mass and shift settings.

    Returns:
        ``mu`` ``(T, m)``; with ``config.shift="scalar"`` every row holds its first
        entry (the released code's scalar shift). Padded entries are 0.

    Example:
        >>> mask = torch.ones(2, 3, dtype=torch.bool)
        >>> ot_id_shift(torch.rand(4, 8), torch.rand(2, 3, 8), mask, MatchingConfig()).shape
        torch.Size([2, 3])
    """
    cost = pairwise_cost(reference, targets, target_mask)
    a, b = relevance_weights(reference, targets, target_mask, config.mass)
    result = sinkhorn_ot.sinkhorn(
        cost,
        a,
        b,
        eps=config.eps,
        method=config.method,
        max_iter=config.max_iter,
        tol=config.tol,
        grad=config.grad,
        backend=config.backend,
    )
    mu = (result.plan * cost).sum(1)
    if config.shift == "scalar":
        mu = mu[:, :1].expand_as(mu)
    return mu.masked_fill(~target_mask, 0.0)


def shift_and_normalize(z: torch.Tensor, mu: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``z_hat = (z - mu) / (sqrt(mean_d (z - mu)^2) + eps)``.

    ``mu`` holds one scalar per sample, subtracted from all ``D`` features of it.

    Args:
        z: features ``(..., D)``.
        mu: shifts ``(...)`` (the shape of ``z`` without its last dimension).
        eps: added to the RMS.

    Returns:
        ``(..., D)``; each row has RMS just under 1 (exactly 0 if ``z`` is constant
        ``mu``). Gradients stay finite in that case too.

    Example:
        >>> shift_and_normalize(torch.tensor([[1.0, 3.0]]), torch.tensor([2.0]))
        tensor([[-1.0000,  1.0000]])
    """
    if mu.shape != z.shape[:-1]:
        raise ValueError(
            f"`mu` must have shape {tuple(z.shape[:-1])} to match `z`, got {tuple(mu.shape)}"
        )
    centred = z - mu.unsqueeze(-1)
    mean_sq = centred.pow(2).mean(-1, keepdim=True)
    # sqrt'(0) is infinite; clamping (far below eps**2) keeps backward NaN-free when a
    # row equals its shift, e.g. an all-zero post-ReLU feature with zero weight.
    rms = mean_sq.clamp_min(torch.finfo(mean_sq.dtype).tiny).sqrt()
    return centred / (rms + eps)


class MatchingSets(NamedTuple):
    """The domains one ELIM step matches: batch positions, reference first.

    Attributes:
        reference: ``(n,)`` batch positions of the reference identity's kept samples.
        targets: ``(T, m)`` batch positions of each target identity's kept samples,
            real ones first, 0 at padding.
        target_mask: ``(T, m)`` bool, ``True`` for real samples.
        domain_ids: the ids of the chosen domains, reference first.
    """

    reference: torch.Tensor
    targets: torch.Tensor
    target_mask: torch.Tensor
    domain_ids: list[Hashable]

    def assemble(
        self,
        reference: torch.Tensor,
        targets: torch.Tensor,
        shift: torch.Tensor,
        labels: torch.Tensor,
    ) -> MatchedBatch:
        """Reference features and normalised targets in one padded :class:`MatchedBatch`.

        Args:
            reference: ``(n, D)`` reference features (used as they are).
            targets: ``(T, m, D)`` shifted, RMS-normalised target features.
            shift: ``(T, m)`` the shift of each target sample.
            labels: ``(B, 2)`` labels of the whole batch.
        """
        n, (t, m) = len(self.reference), self.target_mask.shape
        width = max(n, m)
        device = self.targets.device
        index = torch.zeros(t + 1, width, dtype=self.targets.dtype, device=device)
        mask = torch.zeros(t + 1, width, dtype=torch.bool, device=device)
        index[0, :n], mask[0, :n] = self.reference, True
        index[1:, :m], mask[1:, :m] = self.targets, self.target_mask
        features = torch.cat(
            [
                F.pad(reference, (0, 0, 0, width - n)).unsqueeze(0),
                F.pad(targets, (0, 0, 0, width - m)),
            ]
        ).masked_fill(~mask.unsqueeze(-1), 0.0)
        return MatchedBatch(
            features,
            labels[index].masked_fill(~mask.unsqueeze(-1), 0.0),
            mask,
            F.pad(shift, (0, width - m)).masked_fill(~mask[1:], 0.0),
            index,
            list(self.domain_ids),
        )


def sample_sets(
    labels: torch.Tensor,
    domain_ids: torch.Tensor | Sequence[Hashable],
    config: MatchingConfig,
    generator: torch.Generator | None = None,
) -> MatchingSets | None:
    """ID grouping, the domain draw and Gumbel top-k of one mini-batch.

    Groups the batch by domain, draws ``config.num_domains`` of them (the first is the
    reference) and keeps at most ``config.top_k`` samples of each by Gumbel top-k
    (Algorithm 3). The random draws use ``generator``: domains first, then the noise.

    Args:
        labels: ``(B, 2)`` valence/arousal.
        domain_ids: ``(B,)`` identity (or age-group) ids, a tensor or a sequence.
        config: matching settings (``num_domains``, ``top_k``, ``gumbel_temperature``).
        generator: CPU generator.

    Returns:
        :class:`MatchingSets`, or ``None`` if the batch holds fewer than two domains.

    Example:
        >>> y, ids = torch.rand(12, 2), torch.arange(12) // 4  # 3 identities x 4 images
        >>> sets = sample_sets(y, ids, MatchingConfig(num_domains=3, top_k=2))
        >>> sets.reference.shape, sets.targets.shape
        (torch.Size([2]), torch.Size([2, 2]))
    """
    if labels.dim() != 2 or labels.shape[1] != 2:
        raise ValueError(f"`labels` must have shape (B, 2), got {tuple(labels.shape)}")
    groups = group_by_domain(labels, labels, domain_ids)
    if len(groups.ids) < 2:
        return None
    chosen = choose_domains(len(groups.ids), config.num_domains, generator).tolist()
    # Padded (E, L) batch positions: all later steps gather from the batch with these.
    index, mask = _pad_indices([groups.indices[c] for c in chosen])
    if config.top_k is not None:
        keep = gumbel_topk(
            labels[index], mask, config.top_k, generator, config.gumbel_temperature
        ).keep
        index, mask = _compact(index, keep)
    n_ref = int(mask[0].sum())
    # Re-trim the targets alone: the reference may have been the widest set.
    targets, target_mask = _compact(index[1:], mask[1:])
    return MatchingSets(index[0, :n_ref], targets, target_mask, [groups.ids[c] for c in chosen])


@dataclass(frozen=True)
class MatchedBatch:
    """Output of :func:`elim_matching_step`: the chosen domains, padded.

    Row 0 is the reference identity (features unchanged), rows 1.. the targets
    (shifted and RMS-normalised). Real samples come first in each row.

    Attributes:
        features: ``(E, L, D)``, 0 at padding.
        labels: ``(E, L, 2)``, 0 at padding.
        mask: ``(E, L)`` bool, ``True`` for real samples.
        shift: ``(E - 1, L)`` shift (OT ``mu`` or attention weight) of each target
            sample, 0 at padding.
        indices: ``(E, L)`` batch position of each entry (0 at padding).
        domain_ids: the ids of the chosen domains, reference first.
    """

    features: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    shift: torch.Tensor
    indices: torch.Tensor
    domain_ids: list[Hashable]


def elim_matching_step(
    features: torch.Tensor,
    labels: torch.Tensor,
    domain_ids: torch.Tensor | Sequence[Hashable],
    config: MatchingConfig | None = None,
    generator: torch.Generator | None = None,
    attention: torch.nn.Module | None = None,
) -> MatchedBatch | None:
    """Group, sample, match and normalise one mini-batch for the ELIM loss.

    Args:
        features: encoder output ``(B, D)`` (with gradient).
        labels: ground-truth valence/arousal ``(B, 2)``.
        domain_ids: ``(B,)`` identity (or age-group) ids, a tensor or a sequence.
        config: matching settings; ``MatchingConfig()`` if None.
        generator: CPU generator for the domain draw and the Gumbel noise.
        attention: an :class:`elim.attention.ELIMAttention`; if given, its weights
            replace the OT shift (ELIM-Attention) and keep their gradient so that the
            module learns; its inputs follow ``config.detach_shift``.

    Returns:
        A :class:`MatchedBatch`, or ``None`` if the batch holds fewer than two domains
        (nothing to match; skip the ELIM step).

    Example:
        >>> z, y = torch.rand(12, 8), torch.rand(12, 2) - 0.5
        >>> ids = torch.arange(12) // 4  # three identities of four images
        >>> out = elim_matching_step(z, y, ids, MatchingConfig(num_domains=3, top_k=2))
        >>> out.features.shape, out.mask.sum(1).tolist()
        (torch.Size([3, 2, 8]), [2, 2, 2])
    """
    config = MatchingConfig() if config is None else config
    if features.dim() != 2:
        raise ValueError(f"`features` must have shape (B, D), got {tuple(features.shape)}")
    sets = sample_sets(labels, domain_ids, config, generator)
    if sets is None:
        return None
    source = features.detach() if config.detach_shift else features
    ref_src, tgt_src = source[sets.reference], source[sets.targets]
    if attention is None:
        mu = ot_id_shift(ref_src, tgt_src, sets.target_mask, config)
    else:
        mu = attention(ref_src, tgt_src, sets.target_mask)
    z_hat = shift_and_normalize(features[sets.targets], mu, config.rms_eps)
    return sets.assemble(features[sets.reference], z_hat, mu, labels)
