"""Replica similarities, nearest neighbours (FAISS vs brute force), penalty and diversity, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from antimemo.functional.diversity import mean_pairwise_distance, vendi_score
from antimemo.functional.replica import (
    carlini_scores,
    check_images,
    cosine_similarity_matrix,
    nearest_neighbors,
    normalized_l2,
    pixel_embedding,
    replica_penalty,
    replica_scores,
    tiled_l2,
)


def _ref(n=40, size=16, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_normalized_and_tiled_l2_by_hand():
    a = torch.zeros(1, 1, 4, 4)
    b = torch.zeros(2, 1, 4, 4)
    b[0, 0, 0, 0] = 1.0  # one pixel of 16 off by 1
    b[1] += 0.5  # all pixels off by 0.5
    assert torch.allclose(normalized_l2(a, b), torch.tensor([[math.sqrt(1 / 16), 0.5]]))
    # 2x2 grid: the top-left tile (4 pixels) holds the whole difference -> sqrt(1/4)
    assert torch.allclose(tiled_l2(a, b, grid=(2, 2)), torch.tensor([[0.5, 0.5]]))
    # grid (1, 1) is the plain normalised l2
    assert torch.allclose(tiled_l2(a, b, grid=(1, 1)), normalized_l2(a, b))


def test_cosine_and_pixel_embedding_ignore_brightness_offset():
    x = _ref(3)
    shifted = (x * 0.8 + 0.1).clamp(0, 1)
    e1, e2 = pixel_embedding(x), pixel_embedding(shifted)
    assert torch.allclose((e1 * e2).sum(1), torch.ones(3), atol=1e-5)
    assert torch.allclose(cosine_similarity_matrix(e1, e1).diag(), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("exact", [True, False])
def test_faiss_equals_brute_force(metric, exact):
    g = torch.Generator().manual_seed(1)
    ref = torch.nn.functional.normalize(torch.randn(500, 24, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(60, 24, generator=g), dim=1)
    sf, i_f = nearest_neighbors(q, ref, k=5, metric=metric, exact=exact, ef_search=256)
    st, i_t = nearest_neighbors(q, ref, k=5, metric=metric, backend="torch")
    # HNSW at this size and breadth finds the exact neighbours as well
    assert torch.equal(i_f, i_t)
    assert torch.allclose(sf, st, atol=1e-4)


def test_exact_copies_score_one_and_unrelated_do_not():
    ref = _ref(40)
    gen = torch.cat([ref[[5, 17]], _ref(2, seed=99)])
    for similarity, threshold in (("cosine", 0.9), ("l2", -0.15), ("carlini", 0.0)):
        s, i = replica_scores(gen, ref, similarity, k=10, grid=(4, 4))
        assert i[:2].tolist() == [5, 17], similarity
        assert torch.allclose(s[:2], torch.tensor([1.0, 1.0]) if similarity != "l2" else torch.zeros(2), atol=1e-5)
        assert (s[2:] < threshold).all(), (similarity, s)


def test_shifted_image_is_not_a_replica_under_pixel_metrics():
    # a digit-like blob moved by 4 pixels: a different image in pixel space
    ref = torch.zeros(10, 1, 16, 16)
    for j in range(10):
        ref[j, 0, j : j + 4, 2:6] = 1.0
    ref[:, 0, 12:, 12:] = torch.rand(10, 4, 4, generator=torch.Generator().manual_seed(0))
    gen = torch.roll(ref[:1], shifts=4, dims=3)
    s, _ = replica_scores(gen, ref, "cosine")
    assert float(s[0]) < 0.9
    s, _ = replica_scores(gen, ref, "carlini", k=5)
    assert float(s[0]) < 0.0


def test_carlini_ratio_by_hand():
    # reference: distances from a zero query are 0.1, 0.3, 0.5 (uniform images); k=3, alpha=0.5
    ref = torch.stack([torch.full((1, 4, 4), v) for v in (0.1, 0.3, 0.5)])
    gen = torch.zeros(1, 1, 4, 4)
    score, idx, ratio = carlini_scores(gen, ref, k=3, alpha=0.5, grid=(2, 2))
    expected = 0.1 / (0.5 * (0.1 + 0.3 + 0.5) / 3)
    assert int(idx[0]) == 0
    assert math.isclose(float(ratio[0]), expected, rel_tol=1e-5)
    assert math.isclose(float(score[0]), 1 - expected, rel_tol=1e-5)
    # FAISS and torch neighbour search agree
    s2, i2, r2 = carlini_scores(gen, ref, k=3, alpha=0.5, grid=(2, 2), backend="torch")
    assert torch.equal(i2, idx) and torch.allclose(r2, ratio)


def test_replica_penalty_by_hand_and_gradient():
    target = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    pred = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]]], requires_grad=True)
    # centred: t = [-.5,.5,-.5,.5], p = [-.5,.5,0,0] -> cos = 0.5 / (1 * sqrt(0.5))
    cos = 0.5 / math.sqrt(0.5)
    p = replica_penalty(pred, target, torch.tensor([0.95]), threshold=0.5, min_noise=0.8)
    assert math.isclose(float(p[0]), cos - 0.5, rel_tol=1e-5)
    p.sum().backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    # below min_noise or under the threshold: zero
    assert float(replica_penalty(pred, target, torch.tensor([0.5]), 0.5, 0.8)[0]) == 0.0
    assert float(replica_penalty(pred, target, torch.tensor([0.95]), 0.9, 0.8)[0]) == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"threshold": 1.0}, "threshold"), ({"min_noise": 1.5}, "min_noise"), ({"threshold": True}, "threshold")],
)
def test_replica_penalty_invalid_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        replica_penalty(torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1), **kwargs)


def test_check_images_errors_name_the_problem():
    ref = _ref(4)
    with pytest.raises(TypeError, match="floating-point"):
        check_images((ref * 255).to(torch.uint8), "generated")
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        check_images(ref[0], "generated")
    with pytest.raises(ValueError, match="resize"):
        check_images(torch.rand(2, 1, 8, 8), "generated", like=ref)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        check_images(ref * 2 - 1, "generated")
    with pytest.raises(ValueError, match="similarity"):
        replica_scores(ref, ref, "sscd")


def test_vendi_and_pairwise_distance_by_hand():
    assert math.isclose(float(vendi_score(torch.eye(5))), 5.0, rel_tol=1e-5)
    assert math.isclose(float(vendi_score(torch.ones(4, 3))), 1.0, rel_tol=1e-5)
    # two identical + one orthogonal: K/n eigenvalues 2/3, 1/3
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    lam = np.array([2 / 3, 1 / 3])
    assert math.isclose(float(vendi_score(x)), float(np.exp(-(lam * np.log(lam)).sum())), rel_tol=1e-5)
    # pairs: (0,1): 0, (0,2): 1, (1,2): 1 -> mean 2/3
    assert math.isclose(float(mean_pairwise_distance(x)), 2 / 3, rel_tol=1e-6)
    assert math.isclose(float(mean_pairwise_distance(x, "l2")), 2 * math.sqrt(2) / 3, rel_tol=1e-6)
    assert math.isnan(float(mean_pairwise_distance(x[:1])))


def test_ivf_index_finds_near_copies_and_validates_its_arguments():
    from antimemo.functional.replica import build_faiss_index, nearest_neighbors

    g = torch.Generator().manual_seed(0)
    ref = torch.nn.functional.normalize(torch.randn(4000, 32, generator=g), dim=1)
    src = torch.arange(0, 4000, 40)
    queries = torch.nn.functional.normalize(ref[src] + 0.02 * torch.randn(len(src), 32, generator=g), dim=1)
    index = build_faiss_index(ref, "ip", exact=False, kind="ivf", nlist=64, nprobe=16)
    assert (index.nlist, index.nprobe, index.ntotal) == (64, 16, 4000)
    scores, idx = nearest_neighbors(queries, None, 1, "ip", index=index)
    exact_scores, exact_idx = nearest_neighbors(queries, ref, 1, "ip", backend="torch")
    assert torch.equal(exact_idx[:, 0], src)  # the planted source is the true neighbour
    assert (idx[:, 0] == src).float().mean() >= 0.95  # IVF finds (almost) all of them
    found = idx[:, 0] == src
    assert torch.allclose(scores[found, 0], exact_scores[found, 0], atol=1e-5)
    # the same seed gives the same index (training sample and k-means are seeded)
    again = build_faiss_index(ref, "ip", exact=False, kind="ivf", nlist=64, nprobe=16)
    assert torch.equal(nearest_neighbors(queries, None, 1, "ip", index=again)[1], idx)
    with pytest.raises(ValueError, match="kind must be 'hnsw' or 'ivf'"):
        build_faiss_index(ref, exact=False, kind="lsh")
    with pytest.raises(ValueError, match="nlist=5000 exceeds the 4000 reference rows"):
        build_faiss_index(ref, exact=False, kind="ivf", nlist=5000)
