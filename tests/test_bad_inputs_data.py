"""Table of bad data inputs: each must raise its exception type with a message naming the argument.

Index files (truncated, empty, random bytes, foreign, edited, old format), replica thresholds
per similarity (metric and functional), membership log-probs, goldfish token ids, and other
inputs of ``antimemo.functional`` / ``antimemo.metrics`` that used to be accepted silently.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from antimemo.dedup import CorruptIndexError, DuplicateIndex
from antimemo.functional.goldfish import goldfish_mask
from antimemo.functional.membership import mia_loss, mia_min_k_plus_plus
from antimemo.functional.replica import (
    build_faiss_index,
    calibrate_nprobe,
    carlini_scores,
    check_replica_threshold,
    embed,
    nearest_neighbors,
    normalized_l2,
    replica_penalty,
)
from antimemo.metrics import MembershipInference, ReplicaRate

TEXTS = ["alpha beta gamma", "Alpha  BETA gamma", "delta", "epsilon"]
CORRUPT = r"not a valid antimemo index \(truncated/corrupt\): '.*bad\.npz'"
MODIFIED = r"not a valid antimemo index \(modified after it was saved\): '.*bad\.npz'"


def _ref(n: int = 20) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _good_index(tmp: Path) -> Path:
    return DuplicateIndex.from_texts(TEXTS, progress=False).save(tmp / "good.npz")


def _arrays(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _load_bytes(tmp: Path, damage) -> None:
    bad = tmp / "bad.npz"
    bad.write_bytes(damage(_good_index(tmp).read_bytes()))
    DuplicateIndex.load(bad)


def _load_arrays(tmp: Path, edit) -> None:
    arrays = edit(_arrays(_good_index(tmp)))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (tmp / "bad.npz").write_bytes(buf.getvalue())
    DuplicateIndex.load(tmp / "bad.npz")


def _edit_meta(arrays: dict) -> dict:
    meta = json.loads(str(arrays["metadata"][()]))
    meta["kind"] = "tokens"
    return dict(arrays, metadata=np.array(json.dumps(meta, sort_keys=True)))


def _old_format(arrays: dict) -> dict:
    meta = json.loads(str(arrays["metadata"][()]))
    meta["format"] = "antimemo.dedup.DuplicateIndex/1"
    return {"cluster_ids": arrays["cluster_ids"], "metadata": np.array(json.dumps(meta))}


def _unit_ivf(metric: str = "ip"):
    g = torch.Generator().manual_seed(1)
    ref = torch.nn.functional.normalize(torch.randn(400, 8, generator=g), dim=1)
    return build_faiss_index(ref, metric, exact=False, kind="ivf", nlist=8, nprobe=2), ref


def _calibrate(threshold: float, metric: str = "ip") -> None:
    index, ref = _unit_ivf(metric)
    calibrate_nprobe(index, ref[:20], ref, threshold=threshold)


def _membership_update(log_probs: torch.Tensor) -> None:
    MembershipInference(scores=("loss",)).update(log_probs, is_member=torch.tensor([True, False]))


# (id, call(tmp_path), exception type, regex that names the argument)
CASES = [
    # ---------------------------------------------------------------- index files
    ("index-truncated", lambda t: _load_bytes(t, lambda d: d[: len(d) // 2]), CorruptIndexError, CORRUPT),
    ("index-cut-tail", lambda t: _load_bytes(t, lambda d: d[:-3]), CorruptIndexError, CORRUPT),
    ("index-empty", lambda t: _load_bytes(t, lambda d: b""), CorruptIndexError, CORRUPT),
    ("index-random-bytes", lambda t: _load_bytes(t, lambda d: bytes(range(256)) * 8), CorruptIndexError,
     CORRUPT + r".*not an \.npz archive"),
    ("index-zip-of-other-content", lambda t: _load_arrays(t, lambda a: {"weights": np.zeros(4)}), CorruptIndexError,
     r"not a valid antimemo index \(not a DuplicateIndex file\): '.*bad\.npz'.*\['weights'\]"),
    ("index-edited-cluster-ids", lambda t: _load_arrays(t, lambda a: dict(a, cluster_ids=np.array([0, 1, 2, 3]))),
     CorruptIndexError, MODIFIED + r".*\['cluster_ids'\] do not match"),
    ("index-edited-metadata", lambda t: _load_arrays(t, _edit_meta), CorruptIndexError,
     MODIFIED + r".*\['metadata'\] do not match"),
    ("index-missing-array", lambda t: _load_arrays(t, lambda a: {k: v for k, v in a.items() if k != "content_hashes"}),
     CorruptIndexError, MODIFIED + r".*missing arrays \['content_hashes'\]"),
    ("index-old-format", lambda t: _load_arrays(t, _old_format), CorruptIndexError,
     r"\(format 'antimemo.dedup.DuplicateIndex/1' has no integrity digest\): '.*bad\.npz'.*rebuild it: `antimemo dedup"),
    ("index-save-to-directory", lambda t: DuplicateIndex([0, 1]).save(t), IsADirectoryError,
     r"cannot write the file '.*': a directory of that name exists; pass a file path"),
    ("index-load-directory", lambda t: DuplicateIndex.load(t), IsADirectoryError, r"'.*' is a directory, not a DuplicateIndex"),
    # ---------------------------------------------------------------- replica thresholds (metric)
    ("replica-cosine-nan", lambda t: ReplicaRate(_ref(), "cosine", threshold=float("nan")), ValueError,
     r"threshold must be a finite number for similarity='cosine' \(in \[-1, 1\)\), got nan"),
    ("replica-cosine-5", lambda t: ReplicaRate(_ref(), "cosine", threshold=5.0), ValueError,
     r"threshold=5.0 is outside \[-1, 1\) for similarity='cosine'.*typical: 0.5"),
    ("replica-cosine-bool", lambda t: ReplicaRate(_ref(), "cosine", threshold=True), ValueError,
     r"threshold must be a finite number.*got True"),
    ("replica-l2-positive", lambda t: ReplicaRate(_ref(), "l2", threshold=0.15), ValueError,
     r"threshold=0.15 is outside \[-1, 0\) for similarity='l2'.*threshold=-0.15"),
    ("replica-l2-inf", lambda t: ReplicaRate(_ref(), "l2", threshold=float("-inf")), ValueError,
     r"threshold must be a finite number for similarity='l2'"),
    ("replica-carlini-1", lambda t: ReplicaRate(_ref(), "carlini", threshold=1.0, k=5), ValueError,
     r"threshold=1.0 is outside \[-1, 1\) for similarity='carlini'"),
    ("replica-threshold-string", lambda t: check_replica_threshold("0.5", "cosine"), ValueError,
     r"threshold must be a finite number.*got '0.5'"),
    # ---------------------------------------------------------------- replica (functional)
    ("calibrate-nan", lambda t: _calibrate(float("nan")), ValueError, r"threshold must be a finite number.*got nan"),
    ("calibrate-unit-rows-1.5", lambda t: _calibrate(1.5), ValueError,
     r"threshold=1.5 is outside \[-1, 1\], but the reference rows are unit vectors"),
    ("calibrate-l2-negative", lambda t: _calibrate(-0.2, "l2"), ValueError,
     r"threshold=-0.2 is negative, but an L2 index compares squared distances"),
    ("penalty-threshold-nan", lambda t: replica_penalty(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4), torch.ones(2),
                                                        threshold=float("nan")), ValueError,
     r"threshold must be a correlation in \[-1, 1\), got nan"),
    ("penalty-sigma-shape", lambda t: replica_penalty(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4), torch.ones(2, 2)),
     ValueError, r"sigma must be a tensor \[B\] with one noise level per sample \(B = 2\), got shape \(2, 2\)"),
    ("faiss-metric", lambda t: build_faiss_index(torch.eye(3), metric="cos"), ValueError,
     r"metric must be 'ip' \(inner product\) or 'l2'.*got 'cos'"),
    ("nn-chunk-zero", lambda t: nearest_neighbors(torch.eye(3), torch.eye(3), backend="torch", chunk=0), ValueError,
     r"chunk must be an integer >= 1, got 0"),
    ("l2-pixel-mismatch", lambda t: normalized_l2(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 8, 8)), ValueError,
     r"a and b must have the same number of pixels"),
    ("embed-batch-size", lambda t: embed(_ref(), torch.nn.Flatten(), batch_size=0), ValueError,
     r"batch_size must be an integer >= 1, got 0"),
    ("carlini-uint8-scale", lambda t: carlini_scores(_ref() * 255, _ref(), k=5), ValueError,
     r"generated must hold pixels in \[0, 1\]"),
    ("carlini-alpha-inf", lambda t: carlini_scores(_ref(), _ref(), k=5, alpha=float("inf")), ValueError,
     r"alpha must be a finite number > 0, got inf"),
    # ---------------------------------------------------------------- membership
    ("mia-positive-log-probs", lambda t: mia_loss(torch.tensor([[-1.0, 0.7]])), ValueError,
     r"log_probs must be log-probabilities \(<= 0\), got 0.7 at sequence 0, token 1"),
    ("metric-positive-log-probs", lambda t: _membership_update(torch.tensor([[-1.0, -2.0], [3.0, -1.0]])), ValueError,
     r"log_probs must be log-probabilities \(<= 0\), got 3 at sequence 1, token 0.*pass -loss"),
    ("mia-eps-inf", lambda t: mia_min_k_plus_plus(-torch.ones(1, 2), -torch.ones(1, 2), torch.ones(1, 2),
                                                  eps=float("inf")), ValueError, r"eps must be a finite number > 0"),
    # ---------------------------------------------------------------- goldfish
    ("goldfish-labels-as-ids", lambda t: goldfish_mask(torch.tensor([[-100, 5, 6, 7]])), ValueError,
     r"input_ids must hold token ids >= 0, got -100 at position \[0, 0\].*labels were passed as input_ids"),
    ("goldfish-negative-id", lambda t: goldfish_mask(torch.tensor([3, -1, 4])), ValueError,
     r"input_ids must hold token ids >= 0, got -1 at position \[1\]"),
]


@pytest.mark.parametrize(("call", "error", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(tmp_path, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(tmp_path)


def test_the_table_is_large_and_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 20 and len(set(ids)) == len(ids)


def test_the_same_inputs_done_right_are_accepted(tmp_path):
    # the good counterparts of the table's cases work, so the table tests the checks, not a broken setup
    assert DuplicateIndex.load(_good_index(tmp_path)).num_examples == 4
    ref = _ref()
    for similarity, threshold in (("cosine", 0.9), ("l2", -0.15), ("carlini", 0.0)):
        m = ReplicaRate(ref, similarity, threshold=threshold, k=5)
        m.update(ref[:2])
        assert float(m.compute()["rate"]) == 1.0
    _calibrate(0.9)
    _calibrate(0.1, "l2")
    assert replica_penalty(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4), torch.ones(2, 1, 1, 1)).shape == (2,)
    assert mia_loss(torch.tensor([[-1.0, 0.0]])).tolist() == [0.5]
    _membership_update(torch.tensor([[-1.0, -2.0], [-3.0, -1.0]]))
    assert goldfish_mask(torch.tensor([[0, 5, 6, 7]])).shape == (1, 4)
