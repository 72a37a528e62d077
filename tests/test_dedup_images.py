"""Image near-duplicates: default embedder, FAISS search equals brute force, input validation."""

import sys

import numpy as np
import pytest
import torch
from torch import nn

from antimemo.dedup import DuplicateIndex, PixelEmbedder
from antimemo.dedup.images import embed_images, similar_pairs


def _images(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g)


def test_constructed_duplicates_cluster_and_distinct_images_do_not():
    g = torch.Generator().manual_seed(1)
    x = _images(40)
    noisy = (x[0] + 0.02 * torch.randn(3, 32, 32, generator=g)).clamp(0, 1)  # noise, 7% of the pixel std
    brighter = x[1] + 0.3  # a brightness offset: removed by the embedder's centring
    exact = x[2].clone()
    flipped = x[3].flip(-1)  # a mirror image is a different image for pixel embeddings
    batch = torch.cat([x, torch.stack([noisy, brighter, exact, flipped])])
    idx = DuplicateIndex.from_images(batch, progress=False)
    c = idx.cluster_ids
    assert c[40] == c[0] and c[41] == c[1] and c[42] == c[2]
    assert c[43] != c[3]
    assert idx.num_clusters == 41 and idx.kind == "images"  # 44 images, 3 of them copies
    assert idx.params["embedding_dim"] == 3 * 16 * 16


def test_sequence_of_images_with_different_sizes():
    x = _images(6, seed=2)
    small = nn.functional.interpolate(x[4:5], size=(16, 16), mode="area")[0]  # a downscaled copy
    seq = [x[i] for i in range(6)] + [small]
    idx = DuplicateIndex.from_images(seq, progress=False)
    assert idx.cluster_ids[6] == idx.cluster_ids[4] and idx.num_clusters == 6


def test_constant_images_share_a_cluster_only_when_identical():
    x = torch.stack([torch.full((1, 8, 8), 0.5), torch.full((1, 8, 8), 0.5), torch.full((1, 8, 8), 0.2)])
    emb, _ = embed_images(x)
    assert float(np.abs(emb).sum()) == 0.0  # centred constant images embed to zero vectors
    assert DuplicateIndex.from_images(x, progress=False).cluster_ids.tolist() == [0, 0, 1]


def test_faiss_pairs_equal_brute_force():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(30, 24))
    emb = np.concatenate([centers + 0.15 * rng.normal(size=(30, 24)) for _ in range(4)])  # 4 noisy copies
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb.astype(np.float32)
    sims = emb @ emb.T
    for threshold in (0.9, 0.97):
        # keep the comparison away from float rounding at the threshold
        assert np.abs(sims - threshold).min() > 1e-4
        i, j = np.nonzero(np.triu(sims > threshold, k=1))
        brute = np.stack([i, j], axis=1)
        got = similar_pairs(emb, threshold, query_batch=17)  # several query batches
        assert np.array_equal(got, brute)
        assert got.shape[0] > 50  # a non-trivial graph


class Projection(nn.Module):
    """A fixed random projection with a dropout layer, to check eval mode and mode restoration."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, 16, bias=False)
        self.drop = nn.Dropout(0.9)
        self.calls_in_eval = []

    def forward(self, x):
        self.calls_in_eval.append(not self.training)
        x = nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
        return self.drop(self.proj(x - x.mean(dim=1, keepdim=True)))


def test_custom_embedder_runs_in_eval_mode_and_mode_is_restored():
    torch.manual_seed(0)
    emb = Projection()
    emb.train()
    x = _images(5, seed=3)
    batch = torch.cat([x, x[:1]])
    idx = DuplicateIndex.from_images(batch, embedder=emb, batch_size=4, progress=False)
    assert idx.cluster_ids.tolist() == [0, 1, 2, 3, 4, 0]
    assert emb.calls_in_eval == [True, True] and emb.training  # eval during embedding, train again after
    assert idx.params["embedder"] == "Projection" and idx.params["embedding_dim"] == 16


def test_image_input_validation():
    with pytest.raises(ValueError, match=r"images must have shape \[N, C, H, W\]"):
        DuplicateIndex.from_images(torch.rand(3, 8, 8), progress=False)
    with pytest.raises(TypeError, match="floating-point tensor"):
        DuplicateIndex.from_images(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), progress=False)
    with pytest.raises(TypeError, match=r"images\[1\] must be a torch.Tensor"):
        DuplicateIndex.from_images([torch.rand(1, 4, 4), np.zeros((1, 4, 4))], progress=False)
    with pytest.raises(ValueError, match="images is empty"):
        DuplicateIndex.from_images(torch.rand(0, 1, 4, 4), progress=False)
    with pytest.raises(ValueError, match="threshold must be a cosine similarity"):
        DuplicateIndex.from_images(torch.rand(2, 1, 4, 4), threshold=1.5, progress=False)
    with pytest.raises(TypeError, match="embedder must be a torch.nn.Module"):
        DuplicateIndex.from_images(torch.rand(2, 1, 4, 4), embedder=lambda x: x, progress=False)

    class Bad(nn.Module):
        def forward(self, x):
            return x[:1].flatten(1)

    with pytest.raises(ValueError, match="embedder must return a tensor"):
        DuplicateIndex.from_images(torch.rand(2, 1, 4, 4), embedder=Bad(), progress=False)
    with pytest.raises(ValueError, match="size must be an integer >= 1"):
        PixelEmbedder(size=0)


def test_missing_faiss_raises_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        DuplicateIndex.from_images(torch.rand(2, 1, 4, 4), progress=False)
