"""ReplicaRate / GenerationDiversity / FeatureFrechetDistance on constructed cases, and under 2-process DDP."""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from antimemo.functional.replica import replica_scores
from antimemo.metrics import FeatureFrechetDistance, GenerationDiversity, ReplicaRate


def _ref(n=30, seed=0):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _generated():
    ref = _ref()
    g = torch.Generator().manual_seed(5)
    near = (ref[[3, 8]] + 0.02 * torch.randn(2, 1, 16, 16, generator=g)).clamp(0, 1)
    return torch.cat([ref[[0, 11, 29]], near, torch.rand(4, 1, 16, 16, generator=g)])  # 3 exact, 2 near, 4 unrelated


def test_rate_percentiles_and_indices():
    ref, gen = _ref(), _generated()
    m = ReplicaRate(ref, "cosine", threshold=0.9)
    m.update(gen[:4])
    m.update(gen[4:])
    out = m.compute()
    s, i = replica_scores(gen, ref, "cosine")
    assert out["indices"][:5].tolist() == [0, 11, 29, 3, 8]
    assert torch.equal(out["indices"], i)
    assert math.isclose(float(out["rate"]), 5 / 9, rel_tol=1e-6)
    assert math.isclose(float(out["p50"]), float(torch.quantile(s.double(), 0.5)), rel_tol=1e-6)
    assert math.isclose(float(out["p95"]), float(torch.quantile(s.double(), 0.95)), rel_tol=1e-6)
    assert float(out["p99"]) <= 1.0 + 1e-6 and float(out["mean"]) < float(out["p99"])


@pytest.mark.parametrize("similarity", ["l2", "carlini"])
def test_pixel_similarities_flag_copies_only(similarity):
    ref, gen = _ref(), _generated()
    m = ReplicaRate(ref, similarity, k=10)
    m.update(gen)
    out = m.compute()
    flagged = out["scores"] > m.threshold
    assert flagged[:5].all() and not flagged[5:].any(), out["scores"]
    assert math.isclose(float(out["rate"]), 5 / 9, rel_tol=1e-6)


def test_custom_embedder_and_approximate_index():
    ref, gen = _ref(), _generated()
    proj = nn.Sequential(nn.Flatten(), nn.Linear(256, 16))
    exact = ReplicaRate(ref, "cosine", embedder=proj)
    approx = ReplicaRate(ref, "cosine", embedder=proj, exact=False)
    exact.update(gen)
    approx.update(gen)
    a, b = exact.compute(), approx.compute()
    assert torch.equal(a["indices"], b["indices"])
    assert a["indices"][:3].tolist() == [0, 11, 29]
    assert "embedder" not in dict(exact.named_children())  # not registered: no weights in state_dict


def test_errors_on_mismatched_inputs():
    ref = _ref()
    m = ReplicaRate(ref)
    with pytest.raises(ValueError, match="resize"):
        m.update(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="resize"):
        m.update(torch.rand(2, 3, 16, 16))
    with pytest.raises(TypeError, match="floating-point"):
        m.update((ref[:2] * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.update(ref[:2] * 2 - 1)
    with pytest.raises(ValueError, match="similarity"):
        ReplicaRate(ref, "sscd")
    with pytest.raises(ValueError, match="embedder is used only"):
        ReplicaRate(ref, "l2", embedder=nn.Identity())
    with pytest.raises(ValueError, match="grid"):
        ReplicaRate(ref, "carlini", grid=(0, 4))
    with pytest.raises(ValueError, match="empty"):
        ReplicaRate(ref[:0])


@pytest.mark.parametrize(
    "similarity, threshold, pattern",
    [
        ("cosine", float("nan"), r"threshold must be a finite number for similarity='cosine' \(in \[-1, 1\)\), got nan; typical: 0.5"),
        ("cosine", 5.0, r"threshold=5.0 is outside \[-1, 1\) for similarity='cosine'"),
        ("cosine", 1.0, r"threshold=1.0 is outside \[-1, 1\).*nothing is a replica"),
        ("cosine", True, r"threshold must be a finite number.*got True"),
        ("cosine", "0.5", r"threshold must be a finite number.*got '0.5'"),
        ("l2", 0.15, r"threshold=0.15 is outside \[-1, 0\) for similarity='l2'.*l2 <= 0.15 is threshold=-0.15"),
        ("l2", float("-inf"), r"threshold must be a finite number for similarity='l2'.*got -inf"),
        ("carlini", 1.0, r"threshold=1.0 is outside \[-1, 1\) for similarity='carlini'"),
        ("carlini", -3.0, r"threshold=-3.0 is outside \[-1, 1\).*alpha=0.5.*typical: 0.0"),
    ],
)
def test_threshold_outside_the_score_range_of_the_similarity_is_refused(similarity, threshold, pattern):
    with pytest.raises(ValueError, match=pattern):
        ReplicaRate(_ref(), similarity, threshold=threshold)


def test_valid_thresholds_at_the_range_ends_and_exact_copies():
    ref = _ref()
    for similarity, threshold in (("cosine", -1.0), ("cosine", 0.999), ("l2", -1.0), ("l2", -1e-6), ("carlini", 0.999)):
        m = ReplicaRate(ref, similarity, threshold=threshold)
        m.update(ref[:4])
        assert float(m.compute()["rate"]) == 1.0, (similarity, threshold)  # exact copies pass every valid threshold
    # the carlini range follows alpha: with alpha=0.25 the score 1 - r is at least 1 - 4 = -3
    assert ReplicaRate(ref, "carlini", threshold=-3.0, alpha=0.25).threshold == -3.0


def test_empty_compute_is_nan():
    out = ReplicaRate(_ref()).compute()
    assert math.isnan(float(out["rate"])) and out["indices"].numel() == 0


def test_diversity_collapsed_vs_diverse():
    d = GenerationDiversity()
    d.update(_ref(1).repeat(8, 1, 1, 1))
    collapsed = d.compute()
    d.reset()
    d.update(_ref(8))
    diverse = d.compute()
    assert math.isclose(float(collapsed["vendi"]), 1.0, rel_tol=1e-4)
    assert float(collapsed["pairwise_distance"]) < 1e-5
    assert float(diverse["vendi"]) > 6.0 and float(diverse["pairwise_distance"]) > 0.5


def test_feature_frechet_distance_is_torchmetrics_fid_with_custom_feature():
    from torchmetrics.image.fid import FrechetInceptionDistance

    feat = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())  # 4 features, no weights
    fid = FeatureFrechetDistance(feat, input_shape=(1, 16, 16))
    assert isinstance(fid, FrechetInceptionDistance)
    real = _ref(64, seed=1)
    fid.update(real, real=True)
    fid.update(_ref(64, seed=2), real=False)
    same = float(fid.compute())
    fid.reset()
    fid.update(real, real=True)
    fid.update((_ref(64, seed=3) * 0.3), real=False)  # darker: means differ by ~0.35 per feature
    far = float(fid.compute())
    assert same < 0.05 < far
    # hand check of the mean term: ||mu_r - mu_f||^2 dominates for the darker set
    fr, ff = feat(real), feat(_ref(64, seed=3) * 0.3)
    assert far >= float(((fr.mean(0) - ff.mean(0)) ** 2).sum()) * 0.9
    with pytest.raises(ValueError, match="num_features"):
        FeatureFrechetDistance(feat)


# ------------------------------------------------------------------------------- DDP (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ivf_rate() -> ReplicaRate:
    """An approximate (IVF, 10 cells, 2 probed) metric over 400 images whose first 30 are ``_ref()``."""
    return ReplicaRate(_ref(400), "cosine", threshold=0.9, exact=False, index_kind="ivf", nprobe=2)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        ref, gen = _ref(), _generated()
        rate = ReplicaRate(ref, "cosine", threshold=0.9)
        ivf = _ivf_rate()  # each rank builds its own seeded IVF index: identical ones
        div = GenerationDiversity()
        shard = gen[:7] if rank == 0 else gen[7:]  # uneven shards: 7 and 2
        rate.update(shard)
        ivf.update(shard)
        div.update(shard)
        out, d, out_ivf = rate.compute(), div.compute(), ivf.compute()
        torch.save(
            (rank, {k: v.clone() for k, v in out.items()}, {k: float(v) for k, v in d.items()},
             {k: v.clone() for k, v in out_ivf.items()}),
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_union_equals_single_process(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = ReplicaRate(_ref(), "cosine", threshold=0.9)
    single.update(_generated())
    expect = single.compute()
    div = GenerationDiversity()
    div.update(_generated())
    expect_div = div.compute()
    single_ivf = _ivf_rate()
    single_ivf.update(_generated())
    expect_ivf = single_ivf.compute()
    assert single_ivf.index.nlist == 10 and float(expect_ivf["rate"]) > 0
    for rank, out, d, out_ivf in results:
        assert torch.equal(out_ivf["indices"], expect_ivf["indices"]), rank
        assert torch.equal(out_ivf["scores"], expect_ivf["scores"]), rank
        assert torch.equal(out["indices"], expect["indices"]), rank
        for key in ("rate", "p50", "p95", "p99", "mean"):
            assert math.isclose(float(out[key]), float(expect[key]), rel_tol=1e-6), (rank, key)
        assert math.isclose(d["vendi"], float(expect_div["vendi"]), rel_tol=1e-5)
