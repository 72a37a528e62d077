"""2-process CPU (gloo) DDP: each rank updates with its shard; compute() equals the union.

One ``torch.multiprocessing.spawn`` covers all three metrics. The shards are uneven, one rank
adds no canary at all (an empty ``cat`` state on that rank) and one rank sees only members, so
the test fails unless the states really are gathered before ``compute()``.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import stats

from antimemo.functional.membership import token_logprob_stats
from antimemo.metrics import CanaryExposure, ExtractableMemorization, MembershipInference

pytestmark = pytest.mark.ddp

WORLD_SIZE = 2


def _data() -> dict:
    """The full (union) data set, built identically in every process from fixed seeds."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (11, 8), generator=gen)
    generated = target.clone()
    flip = torch.rand(11, 8, generator=gen) < 0.15  # some probes exact, some near, some not
    generated[flip] = (generated[flip] + 1) % 5
    generated[0] = target[0]
    rng = np.random.default_rng(0)
    reference = torch.tensor(
        stats.skewnorm.rvs(3.0, 10.0, 2.0, size=300, random_state=rng), dtype=torch.float32
    )
    canary = torch.tensor([4.0, 8.5, 10.0, 12.0, 20.0])
    n, t, v = 20, 10, 7
    labels = torch.randint(0, v, (n, t), generator=gen)
    is_member = torch.arange(n) < 10  # rank 0 gets rows 0..5: members only
    logits = torch.randn(n, t, v, generator=gen)
    logits[:, :-1] += 1.0 * torch.nn.functional.one_hot(labels[:, 1:], v) * is_member.view(n, 1, 1)
    labels[4, 6:] = -100
    log_probs, mu, sigma, mask = token_logprob_stats(logits, labels)
    texts = [",".join(map(str, row.tolist())) for row in labels]
    return {
        "generated": generated,
        "target": target,
        "canary": canary,
        "reference": reference,
        "log_probs": log_probs,
        "mu": mu,
        "sigma": sigma,
        "mask": mask,
        "texts": texts,
        "is_member": is_member,
    }


def _metrics():
    return (
        ExtractableMemorization(prefix_length=4, suffix_length=8, near_verbatim_threshold=0.85),
        CanaryExposure(),
        MembershipInference(min_k=0.3),
    )


def _update(metrics, d: dict, probes: slice, canaries: slice, refs: slice, rows: slice) -> None:
    extraction, exposure, membership = metrics
    extraction.update(d["generated"][probes], d["target"][probes])
    if canaries.stop is None or canaries.stop > (canaries.start or 0):
        exposure.update(canary_scores=d["canary"][canaries])
    exposure.update(reference_scores=d["reference"][refs])
    membership.update(
        d["log_probs"][rows],
        d["is_member"][rows],
        mask=d["mask"][rows],
        mu=d["mu"][rows],
        sigma=d["sigma"][rows],
        texts=d["texts"][rows],
    )


# rank 0: probes 0..2, all 5 canaries, references 0..99, MIA rows 0..5 (members only)
# rank 1: probes 3..10, no canary, references 100..299, MIA rows 6..19
SHARDS = [
    (slice(0, 3), slice(0, 5), slice(0, 100), slice(0, 6)),
    (slice(3, 11), slice(5, 5), slice(100, 300), slice(6, 20)),
]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        d = _data()
        metrics = _metrics()
        _update(metrics, d, *SHARDS[rank])
        results = [m.compute() for m in metrics]
        # compute() leaves the local (unsynced) state in place
        local_probes = int(metrics[0].n_probes)
        torch.save({"results": results, "local_probes": local_probes}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_three_metrics_under_ddp_equal_single_process_union(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    d = _data()
    single = _metrics()
    _update(single, d, slice(0, 11), slice(0, 5), slice(0, 300), slice(0, 20))
    expected = [m.compute() for m in single]
    # sanity: the union is not trivial, so equality below means something
    assert 0.0 < expected[0]["exact_match"].item() < 1.0
    assert expected[2]["loss/auc"].item() > 0.5

    for rank in range(WORLD_SIZE):
        saved = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert saved["local_probes"] == (3 if rank == 0 else 8)
        for got, want in zip(saved["results"], expected):
            assert got.keys() == want.keys()
            for key in want:
                torch.testing.assert_close(got[key], want[key], msg=f"rank {rank}: {key}")
