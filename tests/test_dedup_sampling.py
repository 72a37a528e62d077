"""DedupSampler without Lightning: policies, sampling frequencies, sharding, resumption, errors."""

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DistributedSampler

from antimemo.dedup import DuplicateIndex
from antimemo.sampling import DedupSampler

# clusters of sizes 1, 2, 4, 8, 16 (31 examples), interleaved so that members are not contiguous
SIZES = [1, 2, 4, 8, 16]
CLUSTERS = np.array(sum(([c] * s for c, s in enumerate(SIZES)), []))[np.random.default_rng(0).permutation(31)]


def _first_of_each(clusters, k=1):
    return sorted(i for c in set(clusters.tolist()) for i in np.flatnonzero(clusters == c)[:k].tolist())


def test_drop_keeps_the_first_example_of_each_cluster_once_per_epoch():
    s = DedupSampler(CLUSTERS, policy="drop", seed=0)
    assert len(s) == 5 and s.effective_size == 5 and isinstance(s, DistributedSampler)
    orders = []
    for epoch in range(4):
        s.set_epoch(epoch)
        seen = list(s)
        assert sorted(seen) == _first_of_each(CLUSTERS)
        orders.append(seen)
    assert len({tuple(o) for o in orders}) > 1  # the order changes with the epoch
    again = DedupSampler(CLUSTERS, policy="drop", seed=0)
    again.set_epoch(3)
    assert list(again) == orders[3]  # and is a function of (seed, epoch) only


def test_cap_keeps_at_most_max_copies_per_cluster():
    s = DedupSampler(CLUSTERS, policy="cap", max_copies=3)
    seen = list(s)
    # min(size, 3) per cluster: 1 + 2 + 3 + 3 + 3 = 12
    assert len(seen) == 12 == len(s) == s.effective_size
    assert sorted(seen) == _first_of_each(CLUSTERS, k=3)
    assert list(DedupSampler(CLUSTERS, policy="cap", max_copies=1)) == list(DedupSampler(CLUSTERS, policy="drop"))


def test_downweight_gives_every_cluster_the_same_frequency():
    s = DedupSampler(CLUSTERS, policy="downweight", seed=1, num_samples=2000)
    assert len(s) == 2000 and s.effective_size == 5
    draws = []
    for epoch in range(10):
        s.set_epoch(epoch)
        draws.extend(s)
    draws = np.array(draws)  # 20000 samples
    per_cluster = np.bincount(CLUSTERS[draws], minlength=5)
    # expected 20000 / 5 = 4000 per cluster (weight 1/size, so each cluster weighs one example)
    p_uniform = stats.chisquare(per_cluster, np.full(5, 4000.0)).pvalue
    assert p_uniform > 1e-3
    # the test has power: sampling examples uniformly would give 20000 * size / 31 per cluster
    naive = 20000 * np.array(SIZES) / 31
    assert stats.chisquare(per_cluster, naive).pvalue < 1e-12
    # and within the cluster of 16 members every member is equally likely
    members = np.flatnonzero(CLUSTERS == 4)
    counts = np.array([(draws == m).sum() for m in members])
    assert counts.sum() == per_cluster[4]
    assert stats.chisquare(counts).pvalue > 1e-3


def test_downweight_default_num_samples_is_the_number_of_clusters():
    idx = DuplicateIndex(CLUSTERS)
    assert len(DedupSampler(idx)) == 5  # a DuplicateIndex is accepted directly


@pytest.mark.parametrize("policy", ["drop", "downweight", "cap"])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_take_disjoint_shards_of_one_global_order(policy, world):
    samplers = [DedupSampler(CLUSTERS, policy=policy, max_copies=2, seed=5, num_replicas=world, rank=r)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    order = samplers[0].epoch_order().tolist()
    padded = order + order[: (-len(order)) % world]
    shards = [list(s) for s in samplers]
    assert {len(x) for x in shards} == {len(padded) // world} == {len(s) for s in samplers}
    for r, shard in enumerate(shards):
        assert shard == padded[r::world]  # positions r, r + world, ...: disjoint across ranks
    if policy != "downweight":  # without replacement: each kept example exactly once, plus padding
        flat = sum(shards, [])
        assert sorted(set(flat)) == sorted(order)
        assert len(flat) - len(set(flat)) == len(padded) - len(order)


def test_resume_mid_epoch_yields_the_rest_of_the_order():
    full = DedupSampler(CLUSTERS, policy="downweight", seed=2, num_samples=20)
    full.set_epoch(1)
    expected = list(full)
    s = DedupSampler(CLUSTERS, policy="downweight", seed=2, num_samples=20)
    s.set_epoch(1)
    it = iter(s)
    head = [next(it) for _ in range(7)]
    state = s.state_dict()
    assert state["epoch"] == 1 and state["num_yielded"] == 7
    resumed = DedupSampler(CLUSTERS, policy="downweight", seed=2, num_samples=20)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # Lightning sets the same epoch again after restoring: the offset survives
    assert head + list(resumed) == expected
    resumed.set_epoch(2)  # the next epoch starts from its beginning
    full.set_epoch(2)
    assert list(resumed) == list(full)


def test_resume_after_a_complete_epoch_starts_the_next_one():
    s = DedupSampler(CLUSTERS, policy="drop", seed=4)
    s.load_state_dict({"epoch": 3, "num_yielded": len(s)})
    ref = DedupSampler(CLUSTERS, policy="drop", seed=4)
    ref.set_epoch(4)
    assert s.epoch == 4 and list(s) == list(ref)


def test_state_is_plain_and_config_changes_are_refused():
    s = DedupSampler(CLUSTERS, policy="cap", max_copies=2, seed=1)
    state = s.state_dict()
    assert all(isinstance(v, (int, str)) for v in state.values())
    with pytest.raises(ValueError, match="saved state has policy='cap' but this sampler has policy='drop'"):
        DedupSampler(CLUSTERS, policy="drop", seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=1 but this sampler has seed=2"):
        DedupSampler(CLUSTERS, policy="cap", max_copies=2, seed=2).load_state_dict(state)


def test_the_global_rng_is_not_used():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    list(DedupSampler(CLUSTERS, policy="downweight", seed=0))
    list(DedupSampler(CLUSTERS, policy="drop", seed=0))
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"policy": "dedupe"}, ValueError, "policy must be one of"),
        ({"policy": "cap", "max_copies": 0}, ValueError, "max_copies must be an integer >= 1"),
        ({"num_replicas": 2, "rank": 2}, ValueError, r"rank must be in \[0, num_replicas=2\)"),
        ({"policy": "drop", "num_samples": 10}, ValueError, "num_samples applies only to policy='downweight'"),
        ({"num_samples": 0}, ValueError, "num_samples must be an integer >= 1"),
        ({"seed": -1}, ValueError, "seed must be an integer >= 0"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DedupSampler(CLUSTERS, **kwargs)


def test_bad_cluster_ids():
    with pytest.raises(ValueError, match="cluster_ids is empty"):
        DedupSampler([])
    with pytest.raises(ValueError, match="1-D integer array"):
        DedupSampler([0.5, 1.5])
