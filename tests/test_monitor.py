"""MemorizationMonitor in real (single-process, CPU) Lightning fits of a tiny Llama."""

import posixpath
import random
import re
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import transformers
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, IterableDataset

from antimemo import ExtractableMemorization, MemorizationMonitor
from antimemo.functional import greedy_generate

pytestmark = pytest.mark.filterwarnings(
    "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)

VOCAB = 32
P = S = 8  # prefix and suffix length of every test
L = P + S
EXTRACTION_KEYS = ("exact_match", "token_match", "near_verbatim")
MIA_SCORES = ("loss", "zlib", "min_k", "min_k_plus_plus")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models: intra-op threads only add OpenMP overhead (and stall on a busy 2-core CI box)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyLM(pl.LightningModule):
    """A 2-layer Llama (vocab 32) trained on next-token loss; the HF model is ``self.model``."""

    def __init__(self, lr: float = 1e-2, seed: int = 0, dropout: float = 0.0):
        super().__init__()
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            attention_dropout=dropout,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = transformers.LlamaForCausalLM(config)
        self.lr = lr

    def forward(self, **kwargs):
        return self.model(**kwargs)

    def _loss(self, batch):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class NoValidationLM(TinyLM):
    validation_step = pl.LightningModule.validation_step


def _examples(n, seed, lengths=None):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [L] * n
    return [{"input_ids": torch.randint(0, VOCAB, (length,), generator=g)} for length in lengths]


TRAIN = _examples(4, seed=100)
VAL = _examples(4, seed=200)


def _trainer(callbacks, **kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        max_epochs=1,
    )
    return pl.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


def _fit(module, callbacks, train=TRAIN, val=VAL, batch_size=4, ckpt_path=None, **kwargs):
    trainer = _trainer(callbacks, **kwargs)
    trainer.fit(
        module,
        DataLoader(train, batch_size=batch_size),
        DataLoader(val, batch_size=batch_size) if val is not None else None,
        ckpt_path=ckpt_path,
    )
    return trainer


def _fake_trainer(train, val=None, world_size=1):
    """The attributes on_train_start reads, for fast unit tests of the probe draw."""
    return SimpleNamespace(
        enable_validation=True,
        limit_val_batches=1.0,
        train_dataloader=DataLoader(train),
        val_dataloaders=DataLoader(val) if val is not None else None,
        world_size=world_size,
        global_rank=0,
    )


def _direct_scores(model, probes):
    """What the monitor should log: greedy_generate + ExtractableMemorization, no Lightning."""
    model.eval()
    generated = greedy_generate(model, probes[:, :P], S)
    metric = ExtractableMemorization(prefix_length=P, suffix_length=S)
    metric.update(generated, probes[:, P:])
    return {k: float(v) for k, v in metric.compute().items()}


# ----------------------------------------------------------------------------- memorization


def test_trained_model_memorizes_its_probes_and_metrics_reach_callback_metrics():
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S)
    module = TinyLM()
    trainer = _fit(module, [monitor], max_epochs=60, check_val_every_n_epoch=60)  # 60 Adam steps
    # the 4 training sequences are the probes (all 4 of them, in the seeded order)
    assert sorted(monitor.probe_indices) == [0, 1, 2, 3]
    expected = torch.stack([TRAIN[i]["input_ids"] for i in monitor.probe_indices])
    assert torch.equal(monitor.probes, expected)
    for key in EXTRACTION_KEYS:
        assert float(trainer.callback_metrics[f"memorization/{key}"]) == 1.0
        assert monitor.last_results[key] == 1.0
    assert monitor.history == [(59, 60, monitor.last_results)]
    assert _direct_scores(module.model, monitor.probes) == {k: 1.0 for k in EXTRACTION_KEYS}


def test_untrained_model_memorizes_nothing():
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S)
    module = TinyLM(lr=0.0)  # one epoch at lr 0: weights stay random
    trainer = _fit(module, [monitor])
    logged = {k: float(trainer.callback_metrics[f"memorization/{k}"]) for k in EXTRACTION_KEYS}
    assert logged["exact_match"] == 0.0
    assert logged["token_match"] <= 0.25  # chance is 1/32 per position
    assert logged == monitor.last_results == _direct_scores(module.model, monitor.probes)


def test_early_stopping_on_exact_match():
    """The documented use: stop before the model memorizes more than half of its probes."""
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S)
    stop = EarlyStopping(
        monitor="memorization/exact_match", mode="min", divergence_threshold=0.5, patience=1000
    )
    trainer = _fit(TinyLM(), [monitor, stop], max_epochs=300, check_val_every_n_epoch=5)
    exact = [r["exact_match"] for _, _, r in monitor.history]
    assert exact[-1] > 0.5 and all(e <= 0.5 for e in exact[:-1])
    assert trainer.current_epoch < 299 and trainer.should_stop


def test_logged_values_reach_the_logger():
    class Recorder(Logger):
        name, version = "recorder", 0
        experiment = None

        def __init__(self):
            super().__init__()
            self.metrics = []

        def log_metrics(self, metrics, step=None):
            self.metrics.append(dict(metrics))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    recorder = Recorder()
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S, log_prefix="mem")
    _fit(TinyLM(), [monitor], logger=recorder, max_epochs=2)
    logged = [m for m in recorder.metrics if "mem/exact_match" in m]
    assert len(logged) == 2
    assert {k: logged[-1][f"mem/{k}"] for k in EXTRACTION_KEYS} == monitor.last_results


# MLflow's rule for metric names (mlflow/utils/validation.py: _VALID_PARAM_AND_METRIC_NAMES and
# the path check): alphanumerics, underscores, dashes, periods, spaces and slashes only, and a
# name that is a normalized relative path (no leading "/", no "..", no "//").
MLFLOW_METRIC_NAME = re.compile(r"^[/\w.\- ]*$")


def _mlflow_accepts(name: str) -> bool:
    return (
        bool(MLFLOW_METRIC_NAME.match(name))
        and posixpath.normpath(name) == name
        and not name.startswith("/")
    )


def test_every_logged_key_is_a_valid_mlflow_metric_name():
    assert not _mlflow_accepts("memorization/mia/loss/tpr@1%fpr")  # the old names: rejected
    assert _mlflow_accepts("memorization/mia/loss/tpr_at_0.1pct_fpr")

    class Recorder(Logger):
        name, version = "recorder", 0
        experiment = None

        def __init__(self):
            super().__init__()
            self.keys = set()

        def log_metrics(self, metrics, step=None):
            self.keys.update(metrics)

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    recorder = Recorder()
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S, holdout="val")
    _fit(TinyLM(), [monitor], logger=recorder, max_epochs=1)
    ours = {k for k in recorder.keys if k.startswith("memorization/")}
    expected = {f"memorization/{k}" for k in EXTRACTION_KEYS} | {
        f"memorization/mia/{score}/{stat}"
        for score in MIA_SCORES
        for stat in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")
    }
    assert ours == expected
    bad = sorted(k for k in ours if not _mlflow_accepts(k))
    assert not bad, bad


def test_model_attr_none_generates_with_the_module_itself():
    common = dict(num_probes=4, prefix_length=P, suffix_length=S)
    by_attr = MemorizationMonitor(**common, log_prefix="a")
    by_module = MemorizationMonitor(**common, log_prefix="b", model_attr=None)
    trainer = _fit(TinyLM(), [by_attr, by_module], max_epochs=6, check_val_every_n_epoch=6)
    assert 0.0 < by_attr.last_results["token_match"] < 1.0  # part-way: a non-trivial comparison
    assert by_attr.last_results == by_module.last_results
    logged = trainer.callback_metrics
    assert float(logged["a/token_match"]) == float(logged["b/token_match"])


# ----------------------------------------------------------------------------- probes


def test_probes_are_reproducible_across_fits_and_change_with_the_seed():
    lengths = [L + (i % 5) - 2 for i in range(30)]  # i % 5 in {0, 1} are too short (14, 15 tokens)
    train = _examples(30, seed=7, lengths=lengths)
    drawn = []
    for seed in (0, 0, 1):
        monitor = MemorizationMonitor(num_probes=8, prefix_length=P, suffix_length=S, seed=seed)
        _fit(TinyLM(lr=0.0), [monitor], train=train, batch_size=1, limit_train_batches=1)
        drawn.append(monitor)
    first, again, other = drawn
    assert first.probe_indices == again.probe_indices and torch.equal(first.probes, again.probes)
    assert first.probe_indices != other.probe_indices
    for monitor in drawn:
        assert len(set(monitor.probe_indices)) == 8
        assert all(lengths[i] >= L for i in monitor.probe_indices)
        expected = torch.stack([train[i]["input_ids"][:L] for i in monitor.probe_indices])
        assert torch.equal(monitor.probes, expected)


def test_probe_draw_follows_the_documented_permutation_and_spares_the_global_rng():
    lengths = [L - 1 if i % 3 == 0 else L + 3 for i in range(12)]
    examples = _examples(12, seed=3, lengths=lengths)

    class NoisyDataset(torch.utils.data.Dataset):
        """__getitem__ consumes the global RNGs, as random augmentation would."""

        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            torch.rand(1), random.random(), np.random.rand()
            return examples[i]

    monitor = MemorizationMonitor(num_probes=5, prefix_length=P, suffix_length=S, seed=11)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    monitor.on_train_start(_fake_trainer(NoisyDataset()), TinyLM())
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    # the documented rule: walk randperm(12, seed 11) and keep the first 5 long-enough examples
    order = torch.randperm(12, generator=torch.Generator().manual_seed(11)).tolist()
    assert monitor.probe_indices == [i for i in order if lengths[i] >= L][:5]
    assert all(i % 3 != 0 for i in monitor.probe_indices)


def test_explicit_probes_tensor_or_list():
    probes = torch.stack([e["input_ids"] for e in TRAIN[:3]])
    as_tensor = MemorizationMonitor(prefix_length=P, suffix_length=S, probes=probes, log_prefix="t")
    as_list = MemorizationMonitor(
        prefix_length=P, suffix_length=S, probes=list(probes), log_prefix="l"
    )
    module = TinyLM()
    _fit(module, [as_tensor, as_list], max_epochs=10, check_val_every_n_epoch=10)
    assert as_tensor.probe_indices is None and torch.equal(as_tensor.probes, probes)
    assert as_tensor.last_results == as_list.last_results == _direct_scores(module.model, probes)


# ----------------------------------------------------------------------------- side effects


class _Snapshot(Callback):
    """Placed before the monitor: puts the model in a mixed train/eval state and records it,
    together with every RNG state, right before the monitor's on_validation_epoch_end."""

    def __init__(self, monitor):
        self.monitor = monitor

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.model.train()
        pl_module.model.model.layers[1].eval()  # mixed: layer 0 (dropout 0.5) trains, layer 1 not
        self.modes = {name: m.training for name, m in pl_module.named_modules()}
        self.rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        self.calls = len(self.monitor.history)


class _Check(Callback):
    """Placed after the monitor: everything must be as the snapshot left it."""

    def __init__(self, snapshot):
        self.snapshot = snapshot
        self.checked = 0

    def on_validation_epoch_end(self, trainer, pl_module):
        assert {name: m.training for name, m in pl_module.named_modules()} == self.snapshot.modes
        torch_state, python_state, numpy_state = self.snapshot.rng
        assert torch.equal(torch.get_rng_state(), torch_state)
        assert random.getstate() == python_state
        assert np.array_equal(np.random.get_state()[1], numpy_state)
        assert len(self.snapshot.monitor.history) == self.snapshot.calls + 1  # the monitor did run
        self.checked += 1
        pl_module.eval()  # what Lightning's validation loop would have left


def test_hook_restores_train_mode_and_rng_and_generates_in_eval_mode():
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S)
    snapshot = _Snapshot(monitor)
    check = _Check(snapshot)
    module = TinyLM(dropout=0.5)
    _fit(module, [snapshot, monitor, check], max_epochs=15, check_val_every_n_epoch=5)
    assert check.checked == 3
    # generation ran with dropout off (eval mode), although layer 0 was in train mode
    assert monitor.last_results == _direct_scores(module.model, monitor.probes)


def test_every_n_epochs_and_sanity_check_are_respected():
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S, every_n_epochs=2)
    every = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S, log_prefix="every")
    _fit(TinyLM(), [monitor, every], max_epochs=5, num_sanity_val_steps=2)
    # validation ran in the sanity check (epoch 0, step 0) and after epochs 0..4 (one step each)
    assert [(epoch, step) for epoch, step, _ in every.history] == [(e, e + 1) for e in range(5)]
    assert [(epoch, step) for epoch, step, _ in monitor.history] == [(1, 2), (3, 4)]


# ----------------------------------------------------------------------------- MIA


@pytest.mark.parametrize("holdout", ["val", "dataset", "dict"])
def test_mia_keys_are_logged(holdout):
    non_members = _examples(6, seed=300)
    arg = {
        "val": "val",
        "dataset": non_members,
        "dict": {"members": TRAIN, "non_members": non_members},
    }[holdout]
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S, holdout=arg)
    trainer = _fit(TinyLM(), [monitor], max_epochs=60, check_val_every_n_epoch=60)
    for score in MIA_SCORES:
        for stat in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"):
            key = f"mia/{score}/{stat}"
            logged = float(trainer.callback_metrics[f"memorization/{key}"])
            assert logged == monitor.last_results[key]
        # the memorized members have far lower loss than unseen sequences: a perfect attack
        assert monitor.last_results[f"mia/{score}/auc"] == 1.0
    # equally many members and non-members: min(4 eligible training examples, num_probes=4)
    assert sorted(monitor.mia_member_indices) == [0, 1, 2, 3]
    assert len(monitor.mia_non_member_indices) == 4
    if holdout != "dict":
        assert monitor.mia_member_indices == monitor.probe_indices  # same seed, same walk


def test_members_equal_to_probes_share_one_pass_and_match_separate_evaluation():
    # holdout="val": the MIA members are the probes. The monitor runs each probe prefix once:
    # prefill [B, P], the true suffix on its cache [B, S], then greedy steps [B, 1]; only the
    # non-members get a full [B, L] forward. The results equal greedy_generate plus separate
    # full forwards (what the monitor did before).
    from antimemo.functional.membership import token_logprob_stats
    from antimemo.metrics import MembershipInference

    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S, holdout="val")
    module = TinyLM()
    shapes = []

    class Spy(Callback):
        def on_validation_epoch_end(self, trainer, pl_module):  # runs before the monitor's
            shapes.clear()

    def hook(mod, args, kwargs):
        shapes.append((tuple(kwargs["input_ids"].shape), kwargs.get("cache", kwargs.get("past_key_values")) is not None))

    handle = module.model.register_forward_pre_hook(hook, with_kwargs=True)
    _fit(module, [Spy(), monitor], max_epochs=6, check_val_every_n_epoch=6)
    handle.remove()
    assert monitor.mia_member_indices == monitor.probe_indices
    assert shapes == [((4, P), False), ((4, S), True)] + [((4, 1), True)] * (S - 1) + [
        ((4, L), False)  # the non-members only
    ]
    expected = _direct_scores(module.model, monitor.probes)
    members = monitor.probes
    non_members = torch.stack([VAL[i]["input_ids"] for i in monitor.mia_non_member_indices])
    sequences = torch.cat([members, non_members])
    with torch.no_grad():
        log_probs, mu, sigma, mask = token_logprob_stats(module.model(input_ids=sequences).logits,
                                                         sequences)
    mia = MembershipInference()
    texts = [row.to(torch.int32).numpy().astype("<i4").tobytes() for row in sequences]
    mia.update(log_probs, torch.arange(8) < 4, mask=mask, mu=mu, sigma=sigma, texts=texts)
    expected.update({f"mia/{k}": float(v) for k, v in mia.compute().items()})
    assert monitor.last_results == pytest.approx(expected, abs=1e-6)
    assert 0.0 < monitor.last_results["token_match"] < 1.0  # part-way: not a vacuous comparison


def test_greedy_generate_with_logits_equals_generate_plus_forward_with_and_without_crop():
    from antimemo.functional.generation import greedy_generate_with_logits

    model = TinyLM(seed=3).model.eval()
    seqs = torch.randint(0, VOCAB, (5, L), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(input_ids=seqs).logits
    expected = greedy_generate(model, seqs[:, :P], S, batch_size=2)

    class NoCrop(torch.nn.Module):  # a cache without .crop(): the fallback full forward
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, past_key_values=None, use_cache=False):
            past = None if past_key_values is None else past_key_values.cache
            out = self.inner(input_ids=input_ids, past_key_values=past, use_cache=use_cache)
            if use_cache:
                return SimpleNamespace(
                    logits=out.logits, past_key_values=SimpleNamespace(cache=out.past_key_values)
                )
            return out.logits

    for candidate in (model, NoCrop(model)):
        chunks = list(greedy_generate_with_logits(candidate, seqs, P, batch_size=2))
        assert [start for start, _, _ in chunks] == [0, 2, 4]
        assert torch.equal(torch.cat([g for _, g, _ in chunks]), expected)
        assert torch.allclose(torch.cat([lg for _, _, lg in chunks]), full, atol=1e-5)
    assert torch.is_grad_enabled()  # the generator does not leak no_grad to its caller
    with pytest.raises(ValueError, match="prefix_length must be an integer in"):
        next(greedy_generate_with_logits(model, seqs, L))


def test_mia_zlib_text_defaults_to_int32_little_endian_bytes_and_decode_is_used():
    calls = []

    def as_int32_le(ids):
        calls.append(ids)
        return np.asarray(ids, dtype="<i4").tobytes()

    holdout = {"members": TRAIN, "non_members": VAL}
    common = dict(num_probes=4, prefix_length=P, suffix_length=S, holdout=holdout)
    default = MemorizationMonitor(**common, mia_scores=("zlib",))
    decoded = MemorizationMonitor(  # also: batches of 3 probes / 3 MIA sequences give the same
        **common, mia_scores=("zlib",), decode=as_int32_le, log_prefix="d", batch_size=3
    )
    trainer = _fit(TinyLM(), [default, decoded], max_epochs=3)
    zlib_keys = {f"mia/zlib/{stat}" for stat in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")}
    assert set(default.last_results) == set(EXTRACTION_KEYS) | zlib_keys
    assert default.last_results == decoded.last_results
    assert "memorization/mia/loss/auc" not in trainer.callback_metrics
    # decode got python lists of L ints: 4 members + 4 non-members per evaluation, 3 evaluations
    assert len(calls) == 24 and all(isinstance(c, list) and len(c) == L for c in calls)
    assert sorted(calls[:8]) == sorted(e["input_ids"].tolist() for e in TRAIN + VAL)


def test_mia_is_balanced_and_warns_when_holdout_is_small():
    members = _examples(6, seed=1)
    non_members = _examples(4, seed=2, lengths=[L, L - 1, L + 2, L])  # 3 eligible
    holdout = {"members": members, "non_members": non_members}
    monitor = MemorizationMonitor(num_probes=5, prefix_length=P, suffix_length=S, holdout=holdout)
    with pytest.warns(UserWarning, match="MIA uses 3 members and 3 non-members"):
        monitor.on_train_start(_fake_trainer(members), TinyLM())
    assert len(monitor.mia_member_indices) == len(monitor.mia_non_member_indices) == 3
    assert sorted(monitor.mia_non_member_indices) == [0, 2, 3]


# ----------------------------------------------------------------------------- state


def test_state_dict_roundtrip_and_restored_probes_are_used(tmp_path):
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S, holdout="val")
    _fit(TinyLM(), [monitor], max_epochs=2)
    path = tmp_path / "monitor.pt"
    torch.save(monitor.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["probe_indices"] == monitor.probe_indices and state["history"] == monitor.history

    # a resumed monitor re-reads the restored indices instead of drawing: prove it with indices
    # that the seeded draw would not give
    train = _examples(12, seed=5)
    state["probe_indices"] = [5, 3, 9, 0]
    state["mia_member_indices"], state["mia_non_member_indices"] = [7, 1], [2, 0]
    resumed = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S, holdout="val")
    resumed.load_state_dict(state)
    assert resumed.history == monitor.history and resumed.last_results == monitor.last_results
    resumed.on_train_start(_fake_trainer(train, val=VAL), TinyLM())
    assert resumed.probe_indices == [5, 3, 9, 0]
    assert torch.equal(resumed.probes, torch.stack([train[i]["input_ids"] for i in (5, 3, 9, 0)]))
    assert resumed.mia_member_indices == [7, 1] and resumed.mia_non_member_indices == [2, 0]


def test_restored_indices_that_no_longer_fit_the_dataset_raise():
    monitor = MemorizationMonitor(num_probes=2, prefix_length=P, suffix_length=S)
    monitor.load_state_dict({"probe_indices": [1, 4], "history": []})
    with pytest.raises(ValueError, match="training dataset index 4 is out of range.*of 4 examples"):
        monitor.on_train_start(_fake_trainer(TRAIN), TinyLM())
    monitor.load_state_dict({"probe_indices": [1, 0], "history": []})
    short = [TRAIN[0], {"input_ids": torch.zeros(L - 3, dtype=torch.long)}]
    with pytest.raises(ValueError, match="index 1 now has 13 tokens, fewer than the 16 needed"):
        monitor.on_train_start(_fake_trainer(short), TinyLM())


def test_resume_from_checkpoint_keeps_probes_and_history(tmp_path):
    train = _examples(10, seed=9)
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S, seed=3)
    trainer = _fit(TinyLM(), [monitor], train=train, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    resumed = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S, seed=3)
    _fit(TinyLM(), [resumed], train=train, max_epochs=2, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.probe_indices == monitor.probe_indices
    assert [h[:2] for h in resumed.history] == [(0, 3), (1, 6)]  # restored epoch 0, new epoch 1
    assert resumed.history[0] == monitor.history[0]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_probes": 0}, ValueError, "num_probes must be an integer >= 1, got 0"),
        ({"prefix_length": -1}, ValueError, "prefix_length must be an integer >= 1, got -1"),
        ({"suffix_length": 1.5}, ValueError, "suffix_length must be an integer >= 1, got 1.5"),
        ({"every_n_epochs": 0}, ValueError, "every_n_epochs must be an integer >= 1, got 0"),
        ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1, got 0"),
        ({"seed": "0"}, ValueError, "seed must be an integer, got '0'"),
        (
            {"near_verbatim_threshold": 1.5},
            ValueError,
            r"near_verbatim_threshold must be a number in \[0, 1\], got 1.5",
        ),
        ({"holdout": "train"}, ValueError, "holdout must be None, 'val'.*got the string 'train'"),
        ({"holdout": {"members": TRAIN}}, ValueError, "exactly the keys 'members' and 'non_"),
        ({"holdout": 5}, TypeError, "holdout must be None, 'val', a map-style dataset.*got int"),
        ({"mia_scores": ("loss", "ppl")}, ValueError, r"distinct names.*unknown: \['ppl'\]"),
        ({"mia_scores": ("loss", "loss")}, ValueError, r"distinct names.*\(duplicates\)"),
        ({"mia_scores": "loss"}, ValueError, "mia_scores must be a non-empty sequence"),
        ({"decode": "utf-8"}, TypeError, "decode must be a callable"),
        ({"log_prefix": "mem/"}, ValueError, "log_prefix must be a non-empty string not ending"),
        ({"model_attr": ""}, ValueError, "model_attr must be a non-empty attribute name or None"),
        (
            {"probes": torch.zeros(2, L - 1, dtype=torch.long)},
            ValueError,
            r"\[N >= 1, 16\], got \(2, 15\).*8 \+ 8 = 16",
        ),
        ({"probes": torch.zeros(L, dtype=torch.long)}, ValueError, r"\[N >= 1, 16\], got \(16,\)"),
        ({"probes": torch.zeros(2, L)}, TypeError, "probes must hold integer token ids"),
        (
            {"probes": [torch.zeros(L, dtype=torch.long), torch.zeros(L + 1, dtype=torch.long)]},
            ValueError,
            r"probes\[1\] has 17 tokens",
        ),
        ({"probes": []}, TypeError, "non-empty list of 1-D tensors"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MemorizationMonitor(**{"prefix_length": P, "suffix_length": S, **kwargs})


def test_error_when_too_few_examples_are_long_enough():
    lengths = [L, 5, L + 1, 9, 3, 15, L, 2, 7, 1]  # 3 examples have >= 16 tokens
    train = _examples(10, seed=4, lengths=lengths)
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S)
    match = r"needs 4 training examples with at least .* 8 \+ 8 = 16 tokens, but only 3 of the 10"
    with pytest.raises(ValueError, match=match):
        monitor.on_train_start(_fake_trainer(train), TinyLM())


def test_error_without_a_validation_loop():
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S)
    with pytest.raises(RuntimeError, match="end of validation.*does not override validation_step"):
        _fit(NoValidationLM(), [monitor])
    with pytest.raises(RuntimeError, match="end of validation.*no val_dataloader"):
        _fit(TinyLM(), [monitor], val=None)
    with pytest.raises(RuntimeError, match="end of validation.*limit_val_batches=0"):
        _fit(TinyLM(), [monitor], limit_val_batches=0)


def test_error_on_missing_model_attribute():
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S, model_attr="net")
    with pytest.raises(AttributeError, match="TinyLM has no attribute 'net'.*model_attr=None"):
        _fit(TinyLM(), [monitor])


def test_error_on_bad_training_data():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(TRAIN)

    monitor = MemorizationMonitor(num_probes=2, prefix_length=P, suffix_length=S)
    fake = _fake_trainer(TRAIN)
    fake.train_dataloader = DataLoader(Stream())
    with pytest.raises(TypeError, match="not a map-style dataset.*pass probes="):
        monitor.on_train_start(fake, TinyLM())
    with pytest.raises(KeyError, match="without the key input_ids_key='tokens'.*'input_ids'"):
        MemorizationMonitor(
            num_probes=2, prefix_length=P, suffix_length=S, input_ids_key="tokens"
        ).on_train_start(_fake_trainer(TRAIN), TinyLM())
    with pytest.raises(ValueError, match=r"1-D tensor of token ids.*shape \(2, 16\)"):
        monitor.on_train_start(_fake_trainer([torch.zeros(2, L, dtype=torch.long)] * 3), TinyLM())


def test_error_when_fewer_probes_than_processes():
    monitor = MemorizationMonitor(num_probes=2, prefix_length=P, suffix_length=S)
    with pytest.raises(ValueError, match="2 probes for 4 processes.*num_probes >= 4"):
        monitor.on_train_start(_fake_trainer(TRAIN, world_size=4), TinyLM())


def test_error_when_no_holdout_example_is_long_enough():
    short = _examples(3, seed=8, lengths=[4, 5, 6])
    monitor = MemorizationMonitor(num_probes=2, prefix_length=P, suffix_length=S, holdout=short)
    match = "found 2 member and 0 non-member examples with at least .* 16 tokens"
    with pytest.raises(ValueError, match=match):
        monitor.on_train_start(_fake_trainer(TRAIN), TinyLM())


# ----------------------------------------------------------------------------- cost report


class _SteppingClock:
    """Fake clock for the monitor's cost report: its first reading is the fit's start; after it
    readings alternate between an evaluation's start (``train`` seconds later) and its end
    (``evaluation`` seconds later), whatever the real durations."""

    def __init__(self, train, evaluation):
        self.now, self.calls, self.train, self.evaluation = 0.0, 0, train, evaluation

    def __call__(self):
        if self.calls:
            self.now += self.train if self.calls % 2 else self.evaluation
        self.calls += 1
        return self.now


@pytest.mark.parametrize("evaluation, warns", [(5.0, True), (0.5, False)])
def test_monitor_warns_once_when_evaluations_cost_more_than_a_tenth_of_the_fit(evaluation, warns):
    # every evaluation decodes (a cycle of one), so each is judged on its own
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S, every_n_epochs=2,
                                  decode_every_n_evaluations=1)  # fmt: skip
    monitor._cost.clock = _SteppingClock(train=10.0, evaluation=evaluation)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(TinyLM(), [monitor], max_epochs=6)
    messages = [str(w.message) for w in record if "one evaluation took" in str(w.message)]
    assert len(messages) == (1 if warns else 0)  # three evaluations, one report at most
    if warns:
        assert f"took {evaluation:.2f} s, 50% of the 10.00 s" in messages[0]
        assert "(every_n_epochs=2)" in messages[0] and "set every_n_epochs=10" in messages[0]
    assert monitor.evaluation_seconds == [evaluation] * 3


def test_evaluation_seconds_are_real_wall_times():
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S)
    _fit(TinyLM(), [monitor], max_epochs=2)
    assert len(monitor.evaluation_seconds) == 2
    assert all(0.0 < s < 60.0 for s in monitor.evaluation_seconds)
