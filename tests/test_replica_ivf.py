"""calibrate_nprobe: the smallest IVF nprobe that finds every replica's exact top-1."""

from __future__ import annotations

import numpy as np
import pytest
import torch


from antimemo.functional.replica import build_faiss_index, calibrate_nprobe, nearest_neighbors


def _clustered(n_centres=40, per=100, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_centres, dim, generator=g), dim=1)
    ref = torch.nn.functional.normalize(centres.repeat(per, 1) + 0.25 * torch.randn(n_centres * per, dim, generator=g), dim=1)
    copies = torch.nn.functional.normalize(ref[torch.randperm(len(ref), generator=g)[:100]] + 0.02 * torch.randn(100, dim, generator=g), dim=1)
    fresh = torch.nn.functional.normalize(torch.randn(100, dim, generator=g), dim=1)
    return ref, torch.cat([copies, fresh])


def _replica_recall(index, nprobe, queries, ref, threshold):
    index.nprobe = nprobe
    exact_s, exact_i = nearest_neighbors(queries, ref, backend="torch")
    s, i = nearest_neighbors(queries, ref, index=index)
    keep = exact_s[:, 0] >= threshold
    return float(((i[keep, 0] == exact_i[keep, 0]) | torch.isclose(s[keep, 0], exact_s[keep, 0], atol=1e-6, rtol=0)).float().mean())


def test_smallest_candidate_reaching_the_target_is_chosen_and_set():
    ref, queries = _clustered()
    index = build_faiss_index(ref, exact=False, kind="ivf", nlist=64, nprobe=1)
    result = calibrate_nprobe(index, queries, ref, threshold=0.95)
    assert index.nprobe == result.nprobe and result.recall[result.nprobe] == 1.0
    assert result.replica_queries == int((nearest_neighbors(queries, ref, backend="torch")[0][:, 0] >= 0.95).sum())
    tried = list(result.recall)
    assert tried == [p for p in [1, 2, 4, 8, 16, 32, 64] if p <= result.nprobe]  # doubling, stops at the first hit
    assert all(r < 1.0 for p, r in result.recall.items() if p < result.nprobe)
    # the recorded recalls are what an independent search measures
    for p, r in result.recall.items():
        assert _replica_recall(index, p, queries, ref, 0.95) == pytest.approx(r)


def test_a_lower_target_needs_no_more_probes_and_custom_candidates():
    ref, queries = _clustered(seed=1)
    index = build_faiss_index(ref, exact=False, kind="ivf", nlist=64, nprobe=1)
    full = calibrate_nprobe(index, queries, ref, threshold=0.95).nprobe
    lower = calibrate_nprobe(index, queries, ref, threshold=0.95, target_recall=0.5).nprobe
    assert lower <= full
    result = calibrate_nprobe(index, queries, ref, threshold=0.95, candidates=[3, 64])
    assert list(result.recall)[0] == 3 and result.nprobe in (3, 64)


def test_l2_index_uses_distance_at_most_threshold():
    ref, queries = _clustered(seed=2)
    index = build_faiss_index(ref, "l2", exact=False, kind="ivf", nlist=32, nprobe=1)
    result = calibrate_nprobe(index, queries, ref, threshold=0.1)  # squared distance of unit rows = 2 - 2 cos
    exact_d = nearest_neighbors(queries, ref, metric="l2", backend="torch")[0][:, 0]
    assert result.replica_queries == int((exact_d <= 0.1).sum()) > 0
    assert result.recall[result.nprobe] == 1.0


def test_errors_name_the_problem():
    ref, queries = _clustered(seed=3)
    ivf = build_faiss_index(ref, exact=False, kind="ivf", nlist=16, nprobe=2)
    with pytest.raises(ValueError, match="index must be a FAISS IVF index"):
        calibrate_nprobe(build_faiss_index(ref), queries, ref, threshold=0.9)
    with pytest.raises(ValueError, match=r"no query passes threshold=1.0 \(the best exact top-1 score is"):
        calibrate_nprobe(ivf, queries, ref, threshold=1.0)  # noisy copies: every cosine is below 1
    with pytest.raises(ValueError, match=r"threshold=1.5 is outside \[-1, 1\], but the reference rows are unit vectors"):
        calibrate_nprobe(ivf, queries, ref, threshold=1.5)
    with pytest.raises(ValueError, match=r"threshold must be a finite number .* got nan"):
        calibrate_nprobe(ivf, queries, ref, threshold=float("nan"))
    l2_ivf = build_faiss_index(ref, "l2", exact=False, kind="ivf", nlist=16, nprobe=2)
    with pytest.raises(ValueError, match=r"threshold=-0.1 is negative, but an L2 index compares squared distances"):
        calibrate_nprobe(l2_ivf, queries, ref, threshold=-0.1)
    # rows that are not unit vectors: any finite inner product is a valid threshold
    scaled = build_faiss_index(ref * 3, exact=False, kind="ivf", nlist=16, nprobe=16)
    assert calibrate_nprobe(scaled, queries * 3, ref * 3, threshold=8.0).replica_queries > 0
    with pytest.raises(ValueError, match=r"target_recall must be a number in \(0, 1\], got 0"):
        calibrate_nprobe(ivf, queries, ref, threshold=0.9, target_recall=0)
    with pytest.raises(ValueError, match="candidates must be increasing distinct integers in \\[1, nlist=16\\]"):
        calibrate_nprobe(ivf, queries, ref, threshold=0.9, candidates=[4, 2])
    with pytest.raises(ValueError, match="candidates must be increasing distinct integers"):
        calibrate_nprobe(ivf, queries, ref, threshold=0.9, candidates=[1, 2.5])
    with pytest.raises(ValueError, match="reference has 10 rows but the index holds"):
        calibrate_nprobe(ivf, queries, ref[:10], threshold=0.9)
    with pytest.raises(ValueError, match=r"queries must be a 2-D float array \[N, 16\]"):
        calibrate_nprobe(ivf, queries[:, :8], ref, threshold=0.9)
    # unreachable target with too few candidates: the index keeps its nprobe
    hard = torch.nn.functional.normalize(torch.randn(2000, 16, generator=torch.Generator().manual_seed(9)), dim=1)
    hard_ivf = build_faiss_index(hard, exact=False, kind="ivf", nlist=32, nprobe=2)
    hard_q = torch.nn.functional.normalize(hard[:200] + 0.3 * torch.randn(200, 16, generator=torch.Generator().manual_seed(10)), dim=1)
    with pytest.raises(ValueError, match=r"no nprobe in \[1\] reaches replica recall 1.0"):
        calibrate_nprobe(hard_ivf, hard_q, hard, threshold=0.5, candidates=[1])
    assert hard_ivf.nprobe == 2
    assert np.isfinite(calibrate_nprobe(hard_ivf, hard_q, hard, threshold=0.5).nprobe)


def test_replica_rate_with_an_ivf_index_calibrated_on_its_own_rows_matches_exact_search():
    from antimemo.functional.replica import embed
    from antimemo.metrics import ReplicaRate

    g = torch.Generator().manual_seed(4)
    protos = torch.rand(20, 1, 8, 8, generator=g)
    ref = (protos.repeat(20, 1, 1, 1) + 0.15 * torch.rand(400, 1, 8, 8, generator=g)).clamp(0, 1)
    copies = (ref[:40] + 0.01 * torch.rand(40, 1, 8, 8, generator=g)).clamp(0, 1)
    generated = torch.cat([copies, torch.rand(24, 1, 8, 8, generator=g)])
    exact = ReplicaRate(ref, similarity="cosine", threshold=0.95)
    ivf = ReplicaRate(ref, similarity="cosine", threshold=0.95, exact=False, index_kind="ivf", nprobe=1)
    assert type(ivf.index).__name__.startswith("IndexIVF") and ivf.index.nprobe == 1
    assert torch.equal(ivf.reference_rows, embed(ref.float()))
    result = calibrate_nprobe(ivf.index, embed(copies), ivf.reference_rows, threshold=0.95)
    assert ivf.index.nprobe == result.nprobe
    exact.update(generated)
    ivf.update(generated)
    e, a = exact.compute(), ivf.compute()
    assert float(a["rate"]) == float(e["rate"]) > 0
    assert torch.equal(a["indices"][:40], e["indices"][:40])  # every replica's match is the exact one


def test_replica_rate_rejects_an_unknown_index_kind():
    from antimemo.metrics import ReplicaRate

    with pytest.raises(ValueError, match="index_kind must be 'hnsw' or 'ivf'.*got 'flat'"):
        ReplicaRate(torch.rand(4, 1, 8, 8), exact=False, index_kind="flat")
