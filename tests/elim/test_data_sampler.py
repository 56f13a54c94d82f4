"""P x K identity batch samplers and the ELIM-Age groups."""

from collections import Counter

import numpy as np
import pytest
import torch
from elim.data import (
    AGE_GROUP_NAMES,
    DistributedIdentityBatchSampler,
    IdentityBatchSampler,
    age_group,
)
from torch.utils.data import DataLoader, TensorDataset

# 7 identities of uneven size; identity 6 has a single sample and identity 5 has two.
SIZES = [10, 8, 6, 5, 4, 2, 1]
DOMAINS = np.repeat(np.arange(len(SIZES)), SIZES)


def _groups(batch, k):
    return [batch[i : i + k] for i in range(0, len(batch), k)]


def test_batches_are_p_distinct_identities_times_k_samples():
    p, k = 3, 4
    sampler = IdentityBatchSampler(DOMAINS, p, k, num_batches=20, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20
    for batch in batches:
        assert len(batch) == p * k
        groups = _groups(batch, k)
        owners = [set(DOMAINS[g].tolist()) for g in groups]
        assert all(len(o) == 1 for o in owners), "each group of K must be one identity"
        assert len({next(iter(o)) for o in owners}) == p, "the P identities must be distinct"
        for group in groups:
            identity = DOMAINS[group[0]]
            if SIZES[identity] >= k:
                assert len(set(group)) == k, "no repeats inside an identity with >= K samples"
            else:
                members = set(np.flatnonzero(DOMAINS == identity).tolist())
                assert set(group) == members, "a small identity contributes all its samples"


def test_every_identity_and_sample_is_visited():
    sampler = IdentityBatchSampler(DOMAINS, 2, 2, num_batches=40, seed=0)
    seen = [i for batch in sampler for i in batch]
    assert set(DOMAINS[seen].tolist()) == set(range(len(SIZES)))
    assert set(seen) == set(range(len(DOMAINS)))
    visits = Counter(DOMAINS[seen[::2]].tolist())  # one count per (identity, batch) group
    assert max(visits.values()) - min(visits.values()) <= 2, visits


def test_default_length_is_one_pass_over_the_data():
    sampler = IdentityBatchSampler(DOMAINS, 2, 3)
    assert len(sampler) == len(DOMAINS) // 6


def test_deterministic_from_seed_and_epoch():
    def run(seed, epoch):
        sampler = IdentityBatchSampler(DOMAINS, 3, 2, num_batches=10, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert run(0, 0) == run(0, 0)
    assert run(0, 0) != run(0, 1)
    assert run(0, 0) != run(1, 0)


def test_distributed_ranks_get_disjoint_identities_and_equal_lengths():
    world, p, k = 3, 2, 2
    runs = []
    for rank in range(world):
        sampler = DistributedIdentityBatchSampler(
            DOMAINS, p, k, rank=rank, world_size=world, seed=5
        )
        sampler.set_epoch(2)
        runs.append(list(sampler))
    assert len({len(r) for r in runs}) == 1
    assert len(runs[0]) == len(DOMAINS) // (p * k * world)
    for step in zip(*runs):
        per_rank = [set(DOMAINS[b].tolist()) for b in step]
        assert all(len(s) == p for s in per_rank)
        assert len(set.union(*per_rank)) == p * world, f"ranks share an identity: {per_rank}"


def test_world_size_one_matches_the_single_process_sampler():
    single = list(IdentityBatchSampler(DOMAINS, 2, 3, seed=4))
    dist = list(DistributedIdentityBatchSampler(DOMAINS, 2, 3, rank=0, world_size=1, seed=4))
    assert single == dist


def test_age_groups_work_as_domains():
    ages = np.array([19, 25, 33, 37, 44, 48, 52, 58, 61, 80])
    domains = [age_group(a) for a in ages]
    sampler = IdentityBatchSampler(domains, 5, 2, num_batches=3)
    for batch in sampler:
        assert sorted({domains[i] for i in batch}) == [0, 1, 2, 3, 4]


def test_works_as_dataloader_batch_sampler():
    data = TensorDataset(torch.arange(len(DOMAINS)), torch.as_tensor(DOMAINS))
    loader = DataLoader(data, batch_sampler=IdentityBatchSampler(DOMAINS, 2, 3, seed=0))
    index, domain = next(iter(loader))
    assert index.shape == (6,)
    assert torch.equal(domain, torch.as_tensor(DOMAINS)[index])
    assert domain.unique().numel() == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"identities_per_batch": 8}, r"7 distinct|has only 7"),
        ({"identities_per_batch": 0}, r"`identities_per_batch` must be an integer >= 1, got 0"),
        ({"samples_per_identity": 1.5}, r"`samples_per_identity` must be an integer"),
        ({"num_batches": 0}, r"`num_batches` must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"identities_per_batch": 2, "samples_per_identity": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        IdentityBatchSampler(DOMAINS, **args)


def test_distributed_argument_errors():
    with pytest.raises(ValueError, match=r"needed per step.*only 7"):
        DistributedIdentityBatchSampler(DOMAINS, 3, 2, rank=0, world_size=3)
    with pytest.raises(ValueError, match=r"`rank` must be an integer in \[0, 2\), got 2"):
        DistributedIdentityBatchSampler(DOMAINS, 1, 2, rank=2, world_size=2)
    with pytest.raises(RuntimeError, match=r"torch\.distributed"):
        DistributedIdentityBatchSampler(DOMAINS, 1, 2)
    with pytest.raises(ValueError, match="`domains` must hold integers"):
        IdentityBatchSampler([0.5, 1.5], 1, 1)


@pytest.mark.parametrize(
    ("age", "group"),
    [(18, 0), (29, 0), (29.9, 0), (30, 1), (39, 1), (40, 2), (50, 3), (59, 3), (60, 4), (84, 4)],
)
def test_age_group_bins(age, group):
    assert age_group(age) == group
    low, high = (int(x) for x in AGE_GROUP_NAMES[group].split("-"))
    assert low <= age < high + 1


def test_age_group_out_of_range():
    assert age_group(5) == 0
    assert age_group(90) == 4
    with pytest.raises(ValueError, match=r"\[18, 85\) with clamp=False, got 17"):
        age_group(17, clamp=False)
    with pytest.raises(ValueError, match=r"\[18, 85\) with clamp=False, got 85"):
        age_group(85, clamp=False)
    with pytest.raises(ValueError, match="finite number >= 0"):
        age_group(-1)
    with pytest.raises(ValueError, match="finite number >= 0"):
        age_group(float("nan"))
