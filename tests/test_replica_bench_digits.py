"""The ``--data digits`` builder of benchmarks/replica_bench.py: shapes, unit rows, held-out queries."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch


_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "replica_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("replica_bench", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["replica_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def extractor():
    from antimemo.diffusion.features import DigitsFeatures

    return DigitsFeatures(image_size=16, num_features=24, epochs=3, seed=0)


def test_augment_is_seeded_small_and_in_range(bench):
    x = torch.rand(6, 1, 16, 16)
    a = bench.augment_digits(x, torch.Generator().manual_seed(1), **bench.LIGHT_AUGMENT)
    b = bench.augment_digits(x, torch.Generator().manual_seed(1), **bench.LIGHT_AUGMENT)
    c = bench.augment_digits(x, torch.Generator().manual_seed(2), **bench.LIGHT_AUGMENT)
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a zero-strength augmentation is the identity (up to grid_sample rounding)
    zero = dict.fromkeys(bench.LIGHT_AUGMENT, 0.0)
    assert torch.allclose(bench.augment_digits(x, torch.Generator(), **zero), x, atol=1e-5)


@pytest.mark.parametrize("layer, dim", [("features", 24), ("conv", 512)])
def test_digits_data_shapes_units_and_holdout(bench, extractor, layer, dim):
    d = bench.make_digits_data(3000, 40, layer=layer, holdout=297, seed=0, progress=False, extractor=extractor)
    ref, q = d["reference"], d["queries"]
    assert ref.shape == (3000, dim) and q.shape == (40, dim)
    assert torch.allclose(ref.norm(dim=1), torch.ones(3000), atol=1e-4)
    assert torch.allclose(q.norm(dim=1), torch.ones(40), atol=1e-4)
    assert d["is_replica"].tolist() == [True] * 20 + [False] * 20
    in_ref = set(d["reference_source"].tolist())
    assert all(s in in_ref for s in d["query_source"][:20].tolist())  # replicas: source in the reference set
    assert not any(s in in_ref for s in d["query_source"][20:].tolist())  # non-replicas: held out
    assert len(in_ref) <= 1797 - 297


def test_conv_replicas_score_above_nonreplicas(bench, extractor):
    d = bench.make_digits_data(6000, 200, layer="conv", seed=0, progress=False, extractor=extractor)
    top, idx = (d["queries"] @ d["reference"].T).max(1)
    rep = d["is_replica"]
    assert float(top[rep].median()) > float(top[~rep].median())
    # the exact top-1 of a replica query is mostly an augmentation of its own source digit
    same = (d["reference_source"][idx[rep]] == d["query_source"][rep]).float().mean()
    assert float(same) > 0.6


def test_main_digits_end_to_end(bench, tmp_path):
    out = tmp_path / "rows.json"
    assert bench.main(["--data", "digits", "--layer", "conv", "--sizes", "2000", "--queries", "100",
                       "--repeats", "1", "--hnsw-max", "0", "--classifier-epochs", "2", "--nprobe", "1", "51", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["data"] == "digits" and row["dim"] == 512 and row["threshold"] == bench.DIGITS_THRESHOLD["conv"]
    assert row["ivf_nlist"] == 51 and row["flat_recall_vs_torch"] == 1.0
    # probing every cell is exact search
    assert row["ivf_np51_recall@1"] == 1.0 and row["ivf_np51_same_source"] == row["same_source_flat"]
    assert 0.0 <= row["ivf_np1_recall@1"] <= 1.0
