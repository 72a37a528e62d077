"""Tests for antimemo.callbacks.goldfish.GoldfishTokenDropout (unit and in a real Trainer)."""

from __future__ import annotations

import random
import re
from types import MappingProxyType, SimpleNamespace

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import Logger
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from antimemo.callbacks.goldfish import GOLDFISH_PRETRAINING_PRESET, GoldfishTokenDropout
from antimemo.functional.goldfish import goldfish_mask

VOCAB = 48
EOS = 1


class _LogRecorder:
    """Stands in for a LightningModule in unit tests: records ``log`` calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.Tensor, dict]] = []

    def log(self, name, value, **kwargs) -> None:
        self.calls.append((name, value, kwargs))


def _fake_trainer(global_step: int = 1, log_every_n_steps: int = 1) -> SimpleNamespace:
    """The trainer attributes the callback reads, on one process."""
    return SimpleNamespace(
        global_step=global_step, log_every_n_steps=log_every_n_steps, world_size=1, logger=object()
    )


def _batch(seed: int = 0, b: int = 4, t: int = 40, with_labels: bool = True) -> dict:
    """Left-padded token batch; labels mask the padding and a 5-token prompt with -100."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (b, t), generator=gen)
    lengths = torch.tensor([t, t - 3, t - 10, t - 1])[:b]
    pos = torch.arange(t).unsqueeze(0)
    attn = (pos >= (t - lengths).unsqueeze(1)).long()
    ids = ids.masked_fill(attn == 0, 0)  # pad id 0
    ids[:, -1] = EOS
    batch = {"input_ids": ids, "attention_mask": attn}
    if with_labels:
        prompt = pos < (t - lengths + 5).unsqueeze(1)
        batch["labels"] = ids.masked_fill((attn == 0) | prompt, -100)
    return batch


# ---------------------------------------------------------------------------------------------
# Unit tests (no Trainer)
# ---------------------------------------------------------------------------------------------


def test_existing_labels_are_masked_exactly_and_not_mutated_in_place():
    batch = _batch(seed=1)
    original_labels = batch["labels"]
    kept_copy = original_labels.clone()
    cb = GoldfishTokenDropout(k=3, h=6, seed=5, exempt_token_ids=(EOS,))
    module = _LogRecorder()
    cb.on_train_batch_start(None, module, batch, 0)

    mask = goldfish_mask(
        batch["input_ids"], k=3, h=6, seed=5, exempt_token_ids=(EOS,),
        attention_mask=batch["attention_mask"],
    )
    assert torch.equal(batch["labels"], kept_copy.masked_fill(mask, -100))
    assert torch.equal(original_labels, kept_copy)  # the caller's tensor is untouched
    assert batch["labels"] is not original_labels
    # Targets already ignored stay ignored; EOS targets (exempt) are never dropped.
    assert (batch["labels"][kept_copy == -100] == -100).all()
    eos = batch["input_ids"] == EOS
    assert torch.equal(batch["labels"][eos], kept_copy[eos])
    newly_dropped = (kept_copy != -100) & (batch["labels"] == -100)
    assert newly_dropped.any()

    supervised = kept_copy[:, 1:] != -100
    expected_fraction = float(newly_dropped[:, 1:].sum()) / float(supervised.sum())
    assert 0.15 < expected_fraction < 0.55  # about 1/3
    assert module.calls == []  # nothing is logged (or synced) at batch start
    cb.on_train_batch_end(_fake_trainer(), module, None, batch, 0)
    [(name, value, kwargs)] = module.calls
    assert name == "goldfish/dropped_fraction_step"
    assert value.item() == pytest.approx(expected_fraction)
    assert kwargs == {"on_step": True, "on_epoch": False, "batch_size": 1}


def test_labels_are_created_from_input_ids_when_absent():
    batch = _batch(seed=2, with_labels=False)
    batch["input_ids"] = batch["input_ids"].to(torch.int32)
    cb = GoldfishTokenDropout(k=4, h=13, ignore_index=-1)
    cb.on_train_batch_start(None, _LogRecorder(), batch, 0)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    mask = goldfish_mask(ids, k=4, h=13, attention_mask=attn)
    expected = ids.long().masked_fill(attn == 0, -1).masked_fill(mask, -1)
    assert batch["labels"].dtype == torch.int64
    assert torch.equal(batch["labels"], expected)
    assert batch["input_ids"].dtype == torch.int32  # input_ids untouched
    assert mask.any()


def test_custom_keys_and_zero_supervised_targets():
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(3))
    batch = {"tokens": tokens, "targets": torch.full((2, 30), -100)}
    module = _LogRecorder()
    GoldfishTokenDropout(input_ids_key="tokens", labels_key="targets").on_train_batch_start(
        None, module, batch, 0
    )
    assert (batch["targets"] == -100).all()
    GoldfishTokenDropout().on_train_batch_end(_fake_trainer(), module, None, batch, 0)
    assert module.calls == []  # this callback instance saw no batch: nothing to log
    cb = GoldfishTokenDropout(input_ids_key="tokens", labels_key="targets")
    cb.on_train_batch_start(None, module, batch, 0)
    cb.on_train_batch_end(_fake_trainer(), module, None, batch, 0)
    assert module.calls[0][1].item() == 0.0  # 0 dropped / 0 supervised, reported as 0


def test_counts_accumulate_on_device_and_log_only_on_the_cadence():
    batches = [_batch(seed=s) for s in (40, 41, 42, 43, 44)]
    cb = GoldfishTokenDropout(k=3, h=6)
    module = _LogRecorder()
    counts = []
    for step, batch in enumerate(batches, start=1):
        expected = GoldfishTokenDropout(k=3, h=6).apply(dict(batch))
        counts.append(tuple(int(c) for c in expected))
        cb.on_train_batch_start(None, module, batch, step - 1)
        cb.on_train_batch_end(_fake_trainer(step, log_every_n_steps=2), module, None, batch, 0)
        # an accumulation micro-batch (same global_step) never logs twice
        cb.on_train_batch_end(_fake_trainer(step, log_every_n_steps=2), module, None, batch, 0)
    assert [name for name, _, _ in module.calls] == ["goldfish/dropped_fraction_step"] * 2
    for (_, value, _), window in zip(module.calls, (counts[0:2], counts[2:4])):
        dropped, supervised = map(sum, zip(*window))
        assert value.item() == pytest.approx(dropped / supervised)  # pooled counts, not a mean
    cb.on_train_epoch_end(_fake_trainer(5), module)
    dropped, supervised = map(sum, zip(*counts))
    epoch = {name: (value, kwargs) for name, value, kwargs in module.calls[2:]}
    assert set(epoch) == {"goldfish/dropped_fraction_epoch", "goldfish/dropped_fraction"}
    value, kwargs = epoch["goldfish/dropped_fraction_epoch"]
    assert value.item() == pytest.approx(dropped / supervised)
    assert kwargs["on_epoch"] and not kwargs["on_step"] and kwargs["logger"]
    assert not epoch["goldfish/dropped_fraction"][1]["logger"]  # callback_metrics only
    cb.on_train_epoch_start(None, module)  # a new epoch starts from zero
    cb.on_train_batch_start(None, module, _batch(seed=40), 0)  # the unmasked first batch
    cb.on_train_epoch_end(_fake_trainer(6), module)
    assert module.calls[-1][1].item() == pytest.approx(counts[0][0] / counts[0][1])


def test_does_not_consume_global_rng():
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    np_state = np.random.get_state()
    GoldfishTokenDropout().on_train_batch_start(None, _LogRecorder(), _batch(seed=4), 0)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and after[2:] == np_state[2:]
    assert np.array_equal(after[1], np_state[1])


@pytest.mark.parametrize(
    "batch", [(torch.ones(2, 3, dtype=torch.long),), [torch.ones(2, 3)], torch.ones(2, 3)]
)
def test_non_dict_batch_raises_type_error_naming_keys(batch):
    with pytest.raises(TypeError, match=r"dict-like training batches with the key 'input_ids'"):
        GoldfishTokenDropout().on_train_batch_start(None, _LogRecorder(), batch, 0)


def test_immutable_mapping_batch_raises():
    batch = MappingProxyType({"input_ids": torch.ones(2, 3, dtype=torch.long)})
    with pytest.raises(TypeError, match="immutable mappingproxy"):
        GoldfishTokenDropout().on_train_batch_start(None, _LogRecorder(), batch, 0)


def test_missing_input_ids_raises_key_error_with_keys_present():
    ones = torch.ones(2, 3, dtype=torch.long)
    batch = {"tokens": ones, "labels": ones.clone()}
    with pytest.raises(KeyError, match=r"no key 'input_ids'.*keys present: \['labels', 'tokens'\]"):
        GoldfishTokenDropout().on_train_batch_start(None, _LogRecorder(), batch, 0)


def test_bad_labels_raise():
    batch = _batch(seed=5)
    batch["labels"] = batch["labels"][:, 1:]
    with pytest.raises(ValueError, match=r"batch\['labels'\] has shape \(4, 39\)"):
        GoldfishTokenDropout().on_train_batch_start(None, _LogRecorder(), batch, 0)
    batch["labels"] = torch.zeros(4, 40)
    with pytest.raises(TypeError, match="must have an integer dtype"):
        GoldfishTokenDropout().on_train_batch_start(None, _LogRecorder(), batch, 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"k": 1}, ValueError, "k must be an integer >= 2, got 1"),
        ({"h": 0}, ValueError, "h must be an integer >= 1, got 0"),
        ({"seed": "0"}, TypeError, "seed must be an integer"),
        ({"ignore_index": -100.0}, TypeError, "ignore_index must be an integer"),
        ({"exempt_token_ids": 2}, TypeError, "exempt_token_ids must be an iterable"),
        ({"input_ids_key": ""}, TypeError, "input_ids_key must be a non-empty string"),
    ],
)
def test_constructor_validates_arguments(kwargs, error, needle):
    with pytest.raises(error, match=re.escape(needle)):
        GoldfishTokenDropout(**kwargs)


def test_pretraining_preset():
    assert GOLDFISH_PRETRAINING_PRESET == {"k": 50, "h": 50}
    cb = GoldfishTokenDropout.pretraining()
    assert (cb.k, cb.h, cb.seed) == (50, 50, 0)
    cb = GoldfishTokenDropout.pretraining(h=64, exempt_token_ids=(EOS,))
    assert (cb.k, cb.h, cb.exempt_token_ids) == (50, 64, (EOS,))
    assert GOLDFISH_PRETRAINING_PRESET == {"k": 50, "h": 50}  # overrides do not leak


def test_state_dict_round_trip_and_mismatch(tmp_path):
    cb = GoldfishTokenDropout(k=4, h=13, seed=7)
    path = tmp_path / "state.pt"
    torch.save(cb.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state == {"k": 4, "h": 13, "seed": 7}
    GoldfishTokenDropout(k=4, h=13, seed=7).load_state_dict(state)  # same config: accepted
    for other in ({"k": 5}, {"h": 12}, {"seed": 8}):
        config = {"k": 4, "h": 13, "seed": 7, **other}
        expected = r"trained with GoldfishTokenDropout\(k=4, h=13, seed=7\)"
        with pytest.raises(ValueError, match=expected):
            GoldfishTokenDropout(**config).load_state_dict(state)
    with pytest.raises(ValueError, match=r"lacks \['seed'\]"):
        cb.load_state_dict({"k": 4, "h": 13})


# ---------------------------------------------------------------------------------------------
# In a real Trainer
# ---------------------------------------------------------------------------------------------


class _ListDataset(Dataset):
    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _rows(batch: dict) -> list[dict]:
    n = batch["input_ids"].shape[0]
    return [{key: value[i] for key, value in batch.items()} for i in range(n)]


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def _trainer(callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


class _HFModule(pl.LightningModule):
    """Passes ``labels`` to a Hugging Face causal LM and records what each step sees."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _tiny_llama()
        self.train_seen: list[dict] = []
        self.val_seen: list[dict] = []
        self.loss_checks: list[tuple[float, float]] = []

    def training_step(self, batch, batch_idx):
        self.train_seen.append({key: value.clone() for key, value in batch.items()})
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        logits = out.logits[:, :-1].reshape(-1, VOCAB).float()
        manual = F.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
        self.loss_checks.append((out.loss.item(), manual.item()))
        return out.loss

    def validation_step(self, batch, batch_idx):
        self.val_seen.append({key: value.clone() for key, value in batch.items()})
        out = self.model(**batch)
        self.log("val_loss", out.loss, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_hf_labels_masked_in_training_untouched_in_validation():
    train = [_batch(seed=10), _batch(seed=11)]  # 2 batches of 4 rows
    val = _batch(seed=12)
    cb = GoldfishTokenDropout(k=4, h=5, seed=3, exempt_token_ids=(EOS,))
    module = _HFModule()
    trainer = _trainer([cb], max_epochs=2, log_every_n_steps=1)
    trainer.fit(
        module,
        train_dataloaders=DataLoader(_ListDataset(_rows(train[0]) + _rows(train[1])), batch_size=4),
        val_dataloaders=DataLoader(_ListDataset(_rows(val)), batch_size=4),
    )
    assert trainer.global_step == 4 and len(module.train_seen) == 4
    fractions, counts = [], []
    for step, seen in enumerate(module.train_seen):
        source = train[step % 2]  # shuffle=False: batches repeat in order every epoch
        assert torch.equal(seen["input_ids"], source["input_ids"])
        mask = goldfish_mask(
            source["input_ids"], k=4, h=5, seed=3, exempt_token_ids=(EOS,),
            attention_mask=source["attention_mask"],
        )
        assert torch.equal(seen["labels"], source["labels"].masked_fill(mask, -100))
        supervised = source["labels"][:, 1:] != -100
        counts.append((int((mask[:, 1:] & supervised).sum()), int(supervised.sum())))
        fractions.append(counts[-1][0] / counts[-1][1])
    # Same targets dropped on every exposure of the same batch (epoch 2 == epoch 1).
    assert torch.equal(module.train_seen[0]["labels"], module.train_seen[2]["labels"])
    assert any(f > 0 for f in fractions)
    # The HF loss skips exactly the dropped targets (it equals CE over the kept targets).
    for hf_loss, manual in module.loss_checks:
        assert hf_loss == pytest.approx(manual, rel=1e-5)
    # Validation batches are never touched.
    assert len(module.val_seen) == 2
    for seen in module.val_seen:
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(seen[key], val[key])
    # Logged through Lightning: last step value (log_every_n_steps=1) and the epoch's pooled
    # fraction (dropped / supervised over both batches of the last epoch).
    metrics = trainer.callback_metrics
    assert metrics["goldfish/dropped_fraction_step"].item() == pytest.approx(fractions[-1])
    epoch = (counts[2][0] + counts[3][0]) / (counts[2][1] + counts[3][1])
    assert metrics["goldfish/dropped_fraction_epoch"].item() == pytest.approx(epoch)
    assert metrics["goldfish/dropped_fraction"].item() == pytest.approx(epoch)


class _MemoryLogger(Logger):
    """Records every ``log_metrics`` call: ``(step, {key: value})``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))


def test_trainer_logger_receives_step_values_on_lightnings_cadence_with_accumulation():
    # 4 batches per epoch, accumulate_grad_batches=2: 2 optimizer steps per epoch, 2 epochs.
    batches = [_batch(seed=50 + i) for i in range(4)]
    rows = [row for batch in batches for row in _rows(batch)]
    logger = _MemoryLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=[GoldfishTokenDropout(k=4, h=5, seed=3)],
        enable_progress_bar=False,
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        max_epochs=2,
        log_every_n_steps=2,
        accumulate_grad_batches=2,
    )
    trainer.fit(_HFModule(), train_dataloaders=DataLoader(_ListDataset(rows), batch_size=4))
    assert trainer.global_step == 4
    counts = []
    for batch in batches:
        mask = goldfish_mask(batch["input_ids"], k=4, h=5, seed=3,
                             attention_mask=batch["attention_mask"])
        supervised = batch["labels"][:, 1:] != -100
        counts.append((int((mask[:, 1:] & supervised).sum()), int(supervised.sum())))
    pooled = sum(c[0] for c in counts) / sum(c[1] for c in counts)
    step_logs = [(step, m["goldfish/dropped_fraction_step"]) for step, m in logger.records
                 if "goldfish/dropped_fraction_step" in m]
    epoch_logs = [m["goldfish/dropped_fraction_epoch"] for _, m in logger.records
                  if "goldfish/dropped_fraction_epoch" in m]
    # optimizer steps 2 and 4 are logged; each covers the 4 micro-batches since the last log
    # (= one epoch of data here), pooled over counts
    assert len(step_logs) == 2 and all(v == pytest.approx(pooled) for _, v in step_logs)
    assert len(epoch_logs) == 2 and all(v == pytest.approx(pooled) for v in epoch_logs)
    assert not any("goldfish/dropped_fraction" in m for _, m in logger.records)  # no alias


class _CustomLossModule(pl.LightningModule):
    """Own cross-entropy with ignore_index=-1; records the gradient reaching the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _tiny_llama()
        self.seen: list[dict] = []
        self.logit_grads: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append({key: value.clone() for key, value in batch.items()})
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits
        logits.register_hook(lambda grad: self.logit_grads.append(grad.detach().clone()))
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-1
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_custom_loss_with_created_labels_gets_no_gradient_from_dropped_targets():
    source = _batch(seed=20, with_labels=False)  # no labels: the callback creates them
    cb = GoldfishTokenDropout(k=3, h=13, seed=1, ignore_index=-1)
    module = _CustomLossModule()
    trainer = _trainer([cb], max_steps=1)
    trainer.fit(module, train_dataloaders=DataLoader(_ListDataset(_rows(source)), batch_size=4))
    [seen] = module.seen
    ids, attn = source["input_ids"], source["attention_mask"]
    mask = goldfish_mask(ids, k=3, h=13, seed=1, attention_mask=attn)
    expected = ids.masked_fill(attn == 0, -1).masked_fill(mask, -1)
    assert torch.equal(seen["labels"], expected)
    assert mask.any()
    # The target at position i is predicted by the logits at i - 1: a dropped or padded target
    # sends no gradient there; a kept target does.
    [grad] = module.logit_grads
    per_position = grad[:, :-1].abs().sum(-1)  # [B, T-1], position i-1 predicts target i
    ignored = expected[:, 1:] == -1
    assert (per_position[ignored] == 0).all()
    assert (per_position[~ignored] > 0).all()


def test_trainer_resume_checks_goldfish_config(tmp_path):
    data = DataLoader(_ListDataset(_rows(_batch(seed=30))), batch_size=4)
    trainer = _trainer([GoldfishTokenDropout(k=4, h=13, seed=0)], max_steps=1)
    trainer.fit(_HFModule(), train_dataloaders=data)
    ckpt = tmp_path / "goldfish.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["GoldfishTokenDropout"]
    assert saved == {"k": 4, "h": 13, "seed": 0}

    expected = r"trained with GoldfishTokenDropout\(k=4, h=13, seed=0\).*\(k=8"
    with pytest.raises(ValueError, match=expected):
        _trainer([GoldfishTokenDropout(k=8, h=13, seed=0)], max_steps=2).fit(
            _HFModule(), train_dataloaders=data, ckpt_path=ckpt
        )
    resumed = _trainer([GoldfishTokenDropout(k=4, h=13, seed=0)], max_steps=2)
    resumed.fit(_HFModule(), train_dataloaders=data, ckpt_path=ckpt)
    assert resumed.global_step == 2


class _GoldfishMetricsRecorder(pl.Callback):
    """Saves each rank's goldfish values from ``callback_metrics`` at the end of training."""

    def __init__(self, out_dir) -> None:
        self.out_dir = str(out_dir)

    def on_train_end(self, trainer, pl_module):
        values = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("goldfish/")
        }
        torch.save(values, f"{self.out_dir}/rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_ddp_logs_the_global_fraction_on_every_rank(tmp_path):
    # 16 rows, 2 ranks x 2 batches of 4: rank r trains on rows r, r+2, ... (DistributedSampler,
    # no shuffle). The logged epoch value must be the pooled fraction over all 16 rows.
    batches = [_batch(seed=60 + i) for i in range(4)]
    rows = [row for batch in batches for row in _rows(batch)]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        log_every_n_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[GoldfishTokenDropout(k=3, h=5, seed=1), _GoldfishMetricsRecorder(tmp_path)],
    )
    trainer.fit(_HFModule(), train_dataloaders=DataLoader(_ListDataset(rows), batch_size=4))

    def pooled(selected):
        dropped = supervised = 0
        for row in selected:
            mask = goldfish_mask(row["input_ids"], k=3, h=5, seed=1,
                                 attention_mask=row["attention_mask"])
            kept = row["labels"][1:] != -100
            dropped += int((mask[1:] & kept).sum())
            supervised += int(kept.sum())
        return dropped / supervised

    everything = pooled(rows)
    rank0_only = pooled(rows[0::2])
    assert abs(rank0_only - everything) > 1e-4  # a rank-local value would be detectably wrong
    logged = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert logged[0] == logged[1]  # identical on both ranks
    for key in ("goldfish/dropped_fraction_epoch", "goldfish/dropped_fraction",
                "goldfish/dropped_fraction_step"):  # step 2 = the whole epoch here
        assert logged[0][key] == pytest.approx(everything), key
