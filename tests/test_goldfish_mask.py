"""Tests for antimemo.functional.goldfish.goldfish_mask (the goldfish hash and its rules).

``assert_goldfish_mask_matches_reference(device)`` is the reusable CPU/CUDA equality check: it
compares the torch implementation on ``device`` bit for bit against the pure-Python reference
below (Python ints masked to 64 bits). Call it with ``"cuda"`` on a GPU machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import antimemo.functional.goldfish as goldfish_module
from antimemo.functional.goldfish import _goldfish_hash, _mix64, goldfish_mask

# ---------------------------------------------------------------------------------------------
# Pure-Python reference implementation (the specification written out; docs/goldfish.md).
# ---------------------------------------------------------------------------------------------

M64 = (1 << 64) - 1
M63 = (1 << 63) - 1
GAMMA = 0x9E3779B97F4A7C15


def ref_mix64(z: int) -> int:
    """splitmix64 finalizer on Python ints (unsigned 64-bit)."""
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_offset_key(d: int) -> int:
    """Odd key of offset ``d`` (1 = the token just before the target)."""
    return ref_mix64(d * GAMMA) | 1


def ref_hash_row(row, attn, i: int, h: int, seed: int) -> tuple[int, int]:
    """(63-bit hash, number of window tokens used) for target position ``i`` of one row."""
    s = ref_mix64((seed + GAMMA) & M64)
    acc = 0
    used = 0
    for d in range(1, h + 1):  # offset d: the token d positions before the target
        j = i - d
        if j >= 0 and attn[j]:
            acc = (acc + ref_offset_key(d) * ref_mix64((row[j] + s) & M64)) & M64
            used += 1
    return ref_mix64(acc) & M63, used


def ref_goldfish_mask(rows, k, h, seed=0, exempt=(), attention=None) -> list[list[bool]]:
    """Reference goldfish mask for a list of rows of Python ints."""
    out = []
    for r, row in enumerate(rows):
        attn = [True] * len(row) if attention is None else [bool(a) for a in attention[r]]
        drops = []
        for i in range(len(row)):
            hsh, used = ref_hash_row(row, attn, i, h, seed)
            drops.append(used > 0 and attn[i] and row[i] not in set(exempt) and hsh % k == 0)
        out.append(drops)
    return out


def _to_signed(value: int) -> int:
    value &= M64
    return value - (1 << 64) if value >= (1 << 63) else value


def assert_goldfish_mask_matches_reference(device, num_cases: int = 40, seed: int = 1234) -> None:
    """Check goldfish_mask (and the raw 63-bit hashes) on ``device`` against the reference.

    Cases are drawn from a seeded CPU generator: batch sizes 1-4, lengths 0-40 (so h > T
    happens), h in 1..20, k in 2..9 or 50/1000, seeds including negative and >= 2**63,
    small vocabularies (repeated windows) and huge token ids (up to 2**63 - 1), int32 and int64,
    no mask / left padding / right padding / random interior zeros, and random exempt ids.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=gen))

    for case in range(num_cases):
        b, t = randint(1, 5), randint(0, 41)
        h = randint(1, 21)
        k = [2, 3, 4, 5, 7, 9, 50, 1000][randint(0, 8)]
        hash_seed = [0, 1, 12345, -1, 2**63 + 5, -(2**40)][randint(0, 6)]
        kind = case % 3
        if kind == 0:
            ids = torch.randint(0, 5, (b, t), generator=gen)  # tiny vocab: repeated windows
        elif kind == 1:
            ids = torch.randint(0, 50_000, (b, t), generator=gen)
        else:  # extreme ids: up to the int64 limit (negative ids are refused: not token ids)
            ids = torch.randint(0, 2**62, (b, t), generator=gen) * 2 + 1
        dtype = torch.int32 if (kind != 2 and case % 2 == 0) else torch.int64
        ids = ids.to(dtype)
        attn_kind = (case // 3) % 4
        if attn_kind == 0:
            attn = None
        else:
            lengths = torch.randint(0, t + 1, (b,), generator=gen)
            pos = torch.arange(t).unsqueeze(0)
            if attn_kind == 1:  # right padding
                attn = (pos < lengths.unsqueeze(1)).long()
            elif attn_kind == 2:  # left padding
                attn = (pos >= (t - lengths).unsqueeze(1)).long()
            else:  # arbitrary zeros
                attn = torch.randint(0, 2, (b, t), generator=gen)
        flat = ids.reshape(-1).tolist()
        exempt = tuple(flat[: randint(0, min(3, len(flat)) + 1)]) if flat else ()

        got = goldfish_mask(
            ids.to(device),
            k=k,
            h=h,
            seed=hash_seed,
            exempt_token_ids=exempt,
            attention_mask=None if attn is None else attn.to(device),
        )
        assert got.device.type == device.type and got.dtype == torch.bool
        assert got.shape == ids.shape
        rows = ids.tolist()
        attn_rows = None if attn is None else attn.tolist()
        expected = ref_goldfish_mask(rows, k, h, hash_seed, exempt, attn_rows)
        assert got.cpu().tolist() == expected, f"case {case}: k={k} h={h} seed={hash_seed}"

        # The raw hashes, bit for bit (stronger than the k-bucket decision).
        attended = None if attn is None else attn.to(device) != 0
        hashes, _ = _goldfish_hash(ids.to(device).long(), h, hash_seed, attended)
        full_attn = attn_rows or [[1] * t for _ in range(b)]
        ref_hashes = [
            [ref_hash_row(row, full_attn[r], i, h, hash_seed)[0] for i in range(t)]
            for r, row in enumerate(rows)
        ]
        assert hashes.cpu().tolist() == ref_hashes, f"case {case}: hash bits differ"


def _random_ids(shape, seed: int, vocab: int = 50_257) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# The hash itself
# ---------------------------------------------------------------------------------------------


def test_mixer_reproduces_published_splitmix64_outputs():
    # splitmix64 (Vigna, prng.di.unimi.it/splitmix64.c) seeded with 0 outputs
    # mix64(1 * GAMMA), mix64(2 * GAMMA), mix64(3 * GAMMA) =
    # 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F (its published first outputs).
    published = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    inputs = torch.tensor([_to_signed(n * GAMMA) for n in (1, 2, 3)], dtype=torch.int64)
    assert _mix64(inputs).tolist() == [_to_signed(v) for v in published]
    assert [ref_mix64(n * GAMMA) for n in (1, 2, 3)] == published


def test_torch_matches_python_reference_cpu():
    assert_goldfish_mask_matches_reference("cpu")


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.integers(min_value=0, max_value=2**31 - 1), min_size=6, max_size=6),
        min_size=1,
        max_size=3,
    ),
    k=st.integers(min_value=2, max_value=6),
    h=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=-(2**70), max_value=2**70),
)
def test_torch_matches_python_reference_hypothesis(rows, k, h, seed):
    got = goldfish_mask(torch.tensor(rows), k=k, h=h, seed=seed)
    assert got.tolist() == ref_goldfish_mask(rows, k, h, seed)


def test_hash_of_short_window_is_the_keyed_sum_written_out():
    # Position 2 with h=13 has only two preceding tokens (7 at offset 2, 11 at offset 1):
    # hash = mix64(K1 * mix64(11 + s) + K2 * mix64(7 + s)) & (2**63 - 1), s = mix64(seed + GAMMA),
    # K_d = mix64(d * GAMMA) | 1.
    ids = torch.tensor([[7, 11, 5]])
    hashes, has_context = _goldfish_hash(ids, 13, 0, None)
    s = ref_mix64(GAMMA)  # seed 0: the first splitmix64 output
    assert s == 0xE220A8397B1DCDAF
    k1 = 0xE220A8397B1DCDAF  # splitmix64(0) outputs 1 and 2 (both already odd)
    k2 = 0x6E789E6AA1B965F4 | 1
    h1 = ref_mix64((k1 * ref_mix64(7 + s)) & M64)
    h2 = ref_mix64((k1 * ref_mix64(11 + s) + k2 * ref_mix64(7 + s)) & M64)
    assert hashes[0, 1].item() == h1 & M63
    assert hashes[0, 2].item() == h2 & M63
    assert has_context.tolist() == [[False, True, True]]


def test_offset_keys_are_odd_and_distinct_for_the_pretraining_window():
    keys = goldfish_module._offset_keys(50, torch.device("cpu"))
    assert keys.shape == (50,) and bool((keys & 1 == 1).all())
    assert len(set(keys.tolist())) == 50
    # element e is the key of offset h - e (oldest first)
    assert [k & M64 for k in keys.tolist()] == [ref_offset_key(d) for d in range(50, 0, -1)]


def test_op_count_does_not_grow_with_h():
    # The hash is one fixed sequence of tensor ops (no loop over the h offsets): count the
    # aten ops dispatched for h=1 and h=50 on the same input.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    ids = _random_ids((4, 256), seed=30)
    attn = torch.ones(4, 256, dtype=torch.long)
    counts = []
    for h in (1, 13, 50):
        goldfish_module._offset_keys(h, ids.device)  # warm the key cache
        with Count() as counter:
            goldfish_mask(ids, k=4, h=h, attention_mask=attn, exempt_token_ids=(3,))
        counts.append(counter.n)
    assert counts[0] == counts[1] == counts[2], counts
    assert counts[0] < 60, counts  # the old per-offset fold took ~13 ops per offset


def test_memory_of_the_pretraining_window_is_one_window_tensor():
    # h=50 on [8, 4096]: only one [B, T, h] int64 temporary (13 MB) is ever allocated.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > 4 * 2**20:
                    self.big.append((tuple(t.shape), t.untyped_storage().nbytes()))
            return out

    ids = _random_ids((8, 4096), seed=31)
    with Largest() as mode:
        mask = goldfish_mask(ids, k=50, h=50)
    assert mode.big == [((8, 4096, 50), 8 * 4096 * 50 * 8)]  # 13.1 MB, once
    assert 0.01 < mask.float().mean().item() < 0.03


# ---------------------------------------------------------------------------------------------
# Rate, determinism, order
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "h"), [(2, 13), (4, 13), (7, 5), (50, 50)])
def test_drop_rate_is_one_in_k_within_five_sigma(k, h):
    t = 100_000
    ids = _random_ids((1, t), seed=k * 100 + h)
    mask = goldfish_mask(ids, k=k, h=h)
    n = t - 1  # every position but 0 has context and can be dropped
    p = 1.0 / k
    sigma = (n * p * (1 - p)) ** 0.5  # e.g. k=4: sqrt(99999 * 0.25 * 0.75) = 136.9
    dropped = int(mask.sum())
    assert abs(dropped - n * p) < 5 * sigma, (dropped, n * p, sigma)


def test_positions_with_short_context_are_dropped_at_the_same_rate():
    # Quirk 5 of the reference code (first h-1 targets never dropped) is not copied:
    # positions 1..12 (fewer than h=13 predecessors) are dropped about 1 in 4.
    b, k = 500, 4
    mask = goldfish_mask(_random_ids((b, 13), seed=5), k=k, h=13)
    assert not mask[:, 0].any()  # position 0 has no context: never dropped
    n = b * 12
    sigma = (n * 0.25 * 0.75) ** 0.5  # sqrt(6000 * 3/16) = 33.5; mean 1500
    assert abs(int(mask[:, 1:].sum()) - n / k) < 5 * sigma


def test_deterministic_across_calls():
    ids = _random_ids((3, 300), seed=1)
    first = goldfish_mask(ids, k=4, h=13, seed=9)
    for _ in range(3):
        assert torch.equal(goldfish_mask(ids.clone(), k=4, h=13, seed=9), first)


def test_deterministic_across_processes():
    ids = _random_ids((2, 200), seed=2)
    here = goldfish_mask(ids, k=4, h=13, seed=17).tolist()
    # Load the very same source file in a fresh interpreter (by path, so the subprocess only
    # pays for importing torch, not for the rest of the package).
    source = Path(goldfish_module.__file__).resolve()
    code = (
        "import importlib.util, json, sys, torch\n"
        "spec = importlib.util.spec_from_file_location('goldfish_fresh', sys.argv[1])\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "ids = torch.tensor(json.loads(sys.stdin.read()))\n"
        "print(json.dumps(mod.goldfish_mask(ids, k=4, h=13, seed=17).tolist()))\n"
    )
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = "987"  # Python's str hash randomisation must not matter
    result = subprocess.run(
        [sys.executable, "-c", code, str(source)],
        input=json.dumps(ids.tolist()),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert json.loads(result.stdout) == here


def test_order_of_the_window_matters():
    # A product (or any symmetric function) of the window would give identical decisions for a
    # window and its permutation; the ordered hash must not.
    n, h = 400, 13
    windows = _random_ids((n, h), seed=3, vocab=1000)
    targets = _random_ids((n, 1), seed=4, vocab=1000)
    forward = torch.cat([windows, targets], dim=1)
    reversed_ = torch.cat([windows.flip(1), targets], dim=1)
    swapped = forward.clone()
    swapped[:, [0, 1]] = forward[:, [1, 0]]  # swap only the two oldest tokens
    ids = torch.cat([forward, reversed_, swapped])
    hashes, _ = _goldfish_hash(ids, h, 0, None)
    last = hashes[:, h]
    assert (last[:n] != last[n : 2 * n]).all() and (last[:n] != last[2 * n :]).all()
    mask = goldfish_mask(ids, k=4, h=h)[:, h]
    for other in (mask[n : 2 * n], mask[2 * n :]):
        changed = int((mask[:n] != other).sum())
        # independent 1/4 decisions differ with probability 2 * 1/4 * 3/4 = 0.375:
        # mean 150 of 400, sigma sqrt(400 * 0.375 * 0.625) = 9.7
        assert 100 < changed < 200, changed


def test_decision_depends_only_on_the_h_preceding_tokens():
    h = 13
    ids = _random_ids((1, 300), seed=6)
    base = goldfish_mask(ids, k=4, h=h)
    total_changed = 0
    for j in (40, 150, 260):
        edited = ids.clone()
        edited[0, j] = (edited[0, j] + 1) % 50_257
        mask = goldfish_mask(edited, k=4, h=h)
        diff = (mask != base)[0].nonzero().flatten().tolist()
        assert all(j + 1 <= i <= j + h for i in diff), (j, diff)
        total_changed += len(diff)
    assert total_changed > 0
    # Prefix invariance: the decision at i never looks at tokens after i.
    assert torch.equal(goldfish_mask(ids[:, :123], k=4, h=h), base[:, :123])


# ---------------------------------------------------------------------------------------------
# Batch composition, padding, exempt ids
# ---------------------------------------------------------------------------------------------


def test_independent_of_batch_composition():
    row = _random_ids((1, 64), seed=7)
    alone = goldfish_mask(row, k=4, h=13)
    others = _random_ids((4, 64), seed=8)
    batch = torch.cat([others[:2], row, others[2:]])
    assert torch.equal(goldfish_mask(batch, k=4, h=13)[2:3], alone)
    assert torch.equal(goldfish_mask(row[0], k=4, h=13), alone[0])  # 1-D == 2-D row


@pytest.mark.parametrize("pad_id", [0, 123])
def test_left_and_right_padding_do_not_change_the_mask(pad_id):
    real = _random_ids((1, 50), seed=9)
    expected = goldfish_mask(real, k=3, h=7)
    pad = torch.full((1, 17), pad_id)
    ones, zeros = torch.ones(1, 50, dtype=torch.long), torch.zeros(1, 17, dtype=torch.long)

    left_attn = torch.cat([zeros, ones], 1)
    left = goldfish_mask(torch.cat([pad, real], 1), k=3, h=7, attention_mask=left_attn)
    assert torch.equal(left[:, 17:], expected)
    assert not left[:, :17].any()

    right_attn = torch.cat([ones, zeros], 1)
    right = goldfish_mask(torch.cat([real, pad], 1), k=3, h=7, attention_mask=right_attn)
    assert torch.equal(right[:, :50], expected)
    assert not right[:, 50:].any()
    assert expected.any()  # non-vacuous


def test_padded_batch_of_different_lengths_equals_each_row_alone():
    lengths = [30, 12, 45, 1]
    rows = [_random_ids((1, n), seed=20 + n) for n in lengths]
    t = max(lengths)
    ids = torch.full((len(rows), t), 7)
    attn = torch.zeros(len(rows), t, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, t - row.shape[1] :] = row[0]  # left padding
        attn[r, t - row.shape[1] :] = True
    mask = goldfish_mask(ids, k=4, h=13, attention_mask=attn)
    for r, row in enumerate(rows):
        assert torch.equal(mask[r, t - row.shape[1] :], goldfish_mask(row, k=4, h=13)[0])
        assert not mask[r, : t - row.shape[1]].any()


def test_exempt_ids_are_never_dropped_and_nothing_else_changes():
    ids = _random_ids((2, 400), seed=10, vocab=40)
    plain = goldfish_mask(ids, k=4, h=13)
    exempt = (3, 17, 39)
    with_exempt = goldfish_mask(ids, k=4, h=13, exempt_token_ids=exempt)
    is_exempt = torch.isin(ids, torch.tensor(exempt))
    assert not with_exempt[is_exempt].any()
    assert torch.equal(with_exempt, plain & ~is_exempt)
    assert (plain & is_exempt).any()  # the exemption removed some drops (non-vacuous)
    # A tensor of ids works the same as a tuple.
    as_tensor = goldfish_mask(ids, k=4, h=13, exempt_token_ids=torch.tensor(exempt))
    assert torch.equal(as_tensor, with_exempt)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def test_seed_changes_the_mask_and_is_taken_modulo_2_64():
    ids = _random_ids((1, 500), seed=11)
    a, b = goldfish_mask(ids, seed=0), goldfish_mask(ids, seed=1)
    assert not torch.equal(a, b)
    assert torch.equal(goldfish_mask(ids, seed=-1), goldfish_mask(ids, seed=2**64 - 1))


def test_k_and_h_change_the_mask_and_k_masks_are_nested():
    ids = _random_ids((1, 2000), seed=12)
    k2, k4, k8 = (goldfish_mask(ids, k=k, h=13) for k in (2, 4, 8))
    # hash % 8 == 0  =>  hash % 4 == 0  =>  hash % 2 == 0
    assert torch.equal(k4 & k2, k4) and torch.equal(k8 & k4, k8)
    assert not torch.equal(k2, k4) and not torch.equal(k4, k8)
    assert not torch.equal(goldfish_mask(ids, k=4, h=13), goldfish_mask(ids, k=4, h=14))


def test_integer_dtypes_shapes_and_empty_input():
    ids = _random_ids((2, 100), seed=13, vocab=250)
    expected = goldfish_mask(ids)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert torch.equal(goldfish_mask(ids.to(dtype)), expected)
    assert goldfish_mask(torch.zeros(3, 0, dtype=torch.long)).shape == (3, 0)
    out = goldfish_mask(torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and out.dtype == torch.bool


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"k": 1}, ValueError, "k must be an integer >= 2, got 1"),
        ({"k": 2.5}, ValueError, "k must be an integer >= 2"),
        ({"k": True}, ValueError, "k must be an integer >= 2"),
        ({"h": 0}, ValueError, "h must be an integer >= 1, got 0"),
        ({"h": 3.0}, ValueError, "h must be an integer >= 1"),
        ({"seed": 0.5}, TypeError, "seed must be an integer"),
        ({"exempt_token_ids": 5}, TypeError, "exempt_token_ids must be an iterable"),
        ({"exempt_token_ids": (1, "a")}, TypeError, "exempt_token_ids must contain only integer"),
        ({"input_ids": torch.ones(2, 3)}, TypeError, "input_ids must have an integer dtype"),
        (
            {"input_ids": torch.ones(2, 3, dtype=torch.bool)},
            TypeError,
            "input_ids must have an integer dtype",
        ),
        ({"input_ids": torch.ones(1, 2, 3, dtype=torch.long)}, ValueError, "input_ids must be 1-D"),
        ({"input_ids": [[1, 2, 3]]}, TypeError, "input_ids must be a torch.Tensor"),
        ({"attention_mask": torch.ones(2, 4)}, ValueError, "attention_mask must have the same"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, needle):
    call = {"input_ids": torch.ones(2, 3, dtype=torch.long), **kwargs}
    with pytest.raises(error, match=re.escape(needle)):
        goldfish_mask(**call)


def test_negative_token_ids_are_refused_unless_they_are_padding():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [1, 2, 3, 4, 5]])  # labels with a masked prompt
    with pytest.raises(ValueError, match=re.escape(
        "input_ids must hold token ids >= 0, got -100 at position [0, 0]; -100 is the ignore_index of labels: "
        "it looks like labels were passed as input_ids"
    )):
        goldfish_mask(labels)
    with pytest.raises(ValueError, match=r"got -3 at position \[2\]; token ids index the vocabulary"):
        goldfish_mask(torch.tensor([4, 5, -3, 6]))
    # negative values where attention_mask is 0 are padding: allowed, and they change nothing
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    padded_with_zero = labels.masked_fill(attn == 0, 0)
    assert torch.equal(
        goldfish_mask(labels, k=2, h=2, attention_mask=attn),
        goldfish_mask(padded_with_zero, k=2, h=2, attention_mask=attn),
    )
    with pytest.raises(ValueError, match=r"got -100 at position \[0, 1\]"):
        goldfish_mask(labels, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    assert goldfish_mask(torch.zeros(0, dtype=torch.long)).shape == (0,)
