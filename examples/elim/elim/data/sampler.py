"""Identity-aware (P x K) batch samplers and the age groups of ELIM-Age.

ELIM matches feature sets of *different identities inside one mini-batch*, so each batch
must hold several identities with several samples each. A plain shuffled loader gives
mostly singletons on AFEW-VA (600 clips), hence these samplers: every batch is ``P``
distinct domains (identities, or age groups for ELIM-Age) times ``K`` samples each, laid
out contiguously ``[d_1 x K, d_2 x K, ...]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

AGE_GROUP_EDGES = (18, 30, 40, 50, 60, 85)
"""Bin edges of the five ELIM-Age groups: [18,30), [30,40), [40,50), [50,60), [60,85)."""

AGE_GROUP_NAMES = ("18-29", "30-39", "40-49", "50-59", "60-84")


def age_group(age: int | float, *, clamp: bool = True) -> int:
    """Map an age in years to one of the five ELIM-Age groups.

    Args:
        age: age in years, ``>= 0``.
        clamp: ages outside ``[18, 85)`` go to the nearest group (AffectNet contains
            children and a few very old faces, and the paper has only five groups).
            With ``clamp=False`` such ages raise instead.

    Returns:
        Group index in ``0..4`` for ``[18,30), [30,40), [40,50), [50,60), [60,85)``.

    Raises:
        ValueError: negative or non-finite age, or an out-of-range age with ``clamp=False``.

    Example:
        >>> [age_group(a) for a in (18, 29, 30, 59, 60, 84)]
        [0, 0, 1, 3, 4, 4]
    """
    if not np.isfinite(age) or age < 0:
        raise ValueError(f"`age` must be a finite number >= 0, got {age!r}")
    low, high = AGE_GROUP_EDGES[0], AGE_GROUP_EDGES[-1]
    if not low <= age < high:
        if not clamp:
            raise ValueError(f"`age` must lie in [{low}, {high}) with clamp=False, got {age!r}")
        return 0 if age < low else len(AGE_GROUP_EDGES) - 2
    return int(np.searchsorted(AGE_GROUP_EDGES, age, side="right")) - 1


def _as_domain_array(domains: Sequence[int] | torch.Tensor | np.ndarray) -> np.ndarray:
    array = domains.cpu().numpy() if isinstance(domains, torch.Tensor) else np.asarray(domains)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"`domains` must be a non-empty 1-D sequence, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"`domains` must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def _take_distinct(queue: list[int], count: int, pool: np.ndarray, rng: np.random.Generator):
    """Pop ``count`` distinct items of ``pool`` from ``queue``, refilling it by reshuffling.

    Cycling through shuffled passes visits every item once per pass (so every identity
    and every image is seen), and putting the leftovers of the old pass first on refill
    keeps the ``count`` items distinct.
    """
    if len(queue) < count:
        leftover = set(queue)
        queue.extend(int(i) for i in rng.permutation(pool) if int(i) not in leftover)
    taken = queue[:count]
    del queue[:count]
    return taken


class DistributedIdentityBatchSampler(Sampler[list[int]]):
    """P x K batch sampler whose ranks receive disjoint domains at every step.

    At each step all ranks draw, from the same ``seed``/``epoch`` generator, the same
    ``P * world_size`` distinct domains and their samples; rank ``r`` keeps domains
    ``r*P .. (r+1)*P - 1``. All ranks therefore yield the same number of batches and
    never share a domain within a step, with no communication.

    Domains are visited in shuffled passes (each domain once per pass) and, within a
    domain, samples likewise, so an epoch covers the data evenly. A domain with fewer
    than ``K`` samples contributes all of them plus draws with replacement.

    Args:
        domains: ``(N,)`` integer domain label per sample (identity, or age group).
        identities_per_batch: ``P``, distinct domains per batch on each rank.
        samples_per_identity: ``K``, samples per domain per batch.
        num_batches: batches per epoch on each rank; default ``N // (P * K * world_size)``
            (at least 1), i.e. about one pass over the data across all ranks.
        rank: this process's rank; default from :mod:`torch.distributed`.
        world_size: number of ranks; default from :mod:`torch.distributed`.
        seed: base seed; combined with the epoch set by :meth:`set_epoch`.

    Example:
        >>> domains = [0, 0, 0, 1, 1, 2, 2, 2, 3]
        >>> s = DistributedIdentityBatchSampler(domains, 1, 2, rank=1, world_size=2, seed=0)
        >>> s.set_epoch(3)
        >>> [len(b) for b in s]
        [2, 2]
    """

    def __init__(
        self,
        domains: Sequence[int] | torch.Tensor | np.ndarray,
        identities_per_batch: int,
        samples_per_identity: int,
        *,
        num_batches: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
    ) -> None:
        if rank is None or world_size is None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise RuntimeError(
                    "pass `rank` and `world_size`, or initialise torch.distributed first"
                )
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        for name, value in (
            ("identities_per_batch", identities_per_batch),
            ("samples_per_identity", samples_per_identity),
            ("world_size", world_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be an integer in [0, {world_size}), got {rank!r}")
        self.domains = _as_domain_array(domains)
        self._pool = np.unique(self.domains)
        needed = identities_per_batch * world_size
        if needed > self._pool.size:
            raise ValueError(
                f"`identities_per_batch` * world_size = {identities_per_batch} * {world_size} "
                f"= {needed} distinct domains are needed per step, but `domains` has only "
                f"{self._pool.size}"
            )
        order = np.argsort(self.domains, kind="stable")
        bounds = np.searchsorted(self.domains[order], self._pool, side="left")
        self._members = {
            int(d): order[start:end]
            for d, start, end in zip(self._pool, bounds, [*bounds[1:], order.size])
        }
        self.identities_per_batch = identities_per_batch
        self.samples_per_identity = samples_per_identity
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        batch = identities_per_batch * samples_per_identity
        if num_batches is None:
            num_batches = max(1, self.domains.size // (batch * world_size))
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"`num_batches` must be an integer >= 1, got {num_batches!r}")
        self.num_batches = num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch so that each epoch draws different (but reproducible) batches."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def _draw(self, domain: int, queues: dict[int, list[int]], rng: np.random.Generator):
        members = self._members[domain]
        k = self.samples_per_identity
        if members.size < k:
            extra = rng.choice(members, size=k - members.size, replace=True)
            return [int(i) for i in rng.permutation(np.concatenate([members, extra]))]
        return _take_distinct(queues.setdefault(domain, []), k, members, rng)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        p = self.identities_per_batch
        domain_queue: list[int] = []
        sample_queues: dict[int, list[int]] = {}
        for _ in range(self.num_batches):
            chosen = _take_distinct(domain_queue, p * self.world_size, self._pool, rng)
            # Every rank draws the samples of every chosen domain so that all ranks keep
            # identical generator states.
            draws = [self._draw(d, sample_queues, rng) for d in chosen]
            mine = draws[self.rank * p : (self.rank + 1) * p]
            yield [index for group in mine for index in group]


class IdentityBatchSampler(DistributedIdentityBatchSampler):
    """Single-process P x K batch sampler: ``P`` distinct domains x ``K`` samples per batch.

    Use it as ``DataLoader(dataset, batch_sampler=IdentityBatchSampler(...))``. See
    :class:`DistributedIdentityBatchSampler` for how domains and samples are visited.

    Args:
        domains: ``(N,)`` integer domain label per sample (identity, or age group).
        identities_per_batch: ``P``, distinct domains per batch.
        samples_per_identity: ``K``, samples per domain per batch.
        num_batches: batches per epoch; default ``N // (P * K)`` (at least 1).
        seed: base seed; combined with the epoch set by :meth:`set_epoch`.

    Example:
        >>> sampler = IdentityBatchSampler([0, 0, 1, 1, 1, 2], 2, 2, seed=0)
        >>> batch = next(iter(sampler))
        >>> len(batch), len({[0, 0, 1, 1, 1, 2][i] for i in batch})
        (4, 2)
    """

    def __init__(
        self,
        domains: Sequence[int] | torch.Tensor | np.ndarray,
        identities_per_batch: int,
        samples_per_identity: int,
        *,
        num_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            domains,
            identities_per_batch,
            samples_per_identity,
            num_batches=num_batches,
            rank=0,
            world_size=1,
            seed=seed,
        )
