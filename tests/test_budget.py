"""MemorizationBudget: steps, bounds, relax patience, a real Trainer on a scripted metric, resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from antimemo import MemorizationBudget
from antimemo.callbacks import GoldfishTokenDropout, LossFloor

pytestmark = pytest.mark.filterwarnings("ignore")


# ------------------------------------------------------------------------------ unit


def test_goldfish_k_smaller_is_stronger_within_bounds():
    b = MemorizationBudget(control="goldfish.k", max_value=0.05, relax_below=0.5, relax_patience=1, bounds=(2, 32))
    assert (b.stronger, b.integer) == ("decrease", True)
    b.value = 8
    assert [b.decide(v) for v in (0.2, 0.2, 0.2)] == [4, 4, 4]  # decide() does not store the value
    seq, values = [0.2, 0.2, 0.2, 0.04, 0.0, 0.0, 0.0, 0.0], []
    for v in seq:
        b.value = b.decide(v)
        values.append(b.value)
    # over -> 4, 2, then the lower bound; within budget -> stays; well under -> 4, 8, 16, then 32 (bound)
    assert values == [4, 2, 2, 2, 4, 8, 16, 32]
    b.value = b.decide(0.0)
    assert b.value == 32
    assert b.next_value(3, stronger=True) == 2 and b.next_value(3, stronger=False) == 6


def test_relax_patience_and_hysteresis():
    b = MemorizationBudget(control="GoldfishTokenDropout.k", max_value=0.1, relax_below=0.5, relax_patience=2)
    b.value = 8
    out = []
    for v in (0.01, 0.07, 0.01, 0.01, 0.2):  # under, in band (resets), under, under -> relax, over
        b.value = b.decide(v)
        out.append(b.value)
    assert out == [8, 8, 8, 16, 8]
    never = MemorizationBudget(control="goldfish.k", max_value=0.1, relax_below=0.0, relax_patience=1)
    never.value = 8
    assert never.decide(0.0) == 8


def test_increasing_knob_additive_step_and_float():
    b = MemorizationBudget(control=("LossFloor", "floor"), max_value=0.01, step=0.25, bounds=(0.0, 1.0), relax_patience=1)
    assert b.stronger == "increase" and not b.integer
    b.value = 0.0
    vals = []
    for v in (0.5, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0):
        b.value = b.decide(v)
        vals.append(b.value)
    assert vals == [0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5]
    m = MemorizationBudget(control="spectral_norm.lam", factor=10.0)
    assert m.next_value(0.01, stronger=True) == pytest.approx(0.1) and m.next_value(0.01, stronger=False) == pytest.approx(0.001)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"control": "k"}, ["control must be '<callback>.<attribute>'", "'k'"]),
        ({"control": "MyCallback.strength"}, ["stronger is required", "'MyCallback.strength'", "goldfish"]),
        ({"control": "goldfish.k", "stronger": "up"}, ["stronger must be 'decrease' or 'increase', got 'up'"]),
        ({"max_value": -1}, ["max_value must be a finite number >= 0, got -1"]),
        ({"relax_below": 2}, ["relax_below must be a number in [0, 1], got 2"]),
        ({"factor": 1.0}, ["factor must be a number > 1, got 1.0"]),
        ({"step": 0}, ["step must be a number > 0"]),
        ({"bounds": (4, 2)}, ["bounds must be (low, high)", "(4, 2)"]),
        ({"relax_patience": 0}, ["relax_patience must be an integer >= 1, got 0"]),
    ],
)
def test_argument_errors_name_the_argument(kwargs, words):
    with pytest.raises(ValueError) as err:
        MemorizationBudget(**kwargs)
    for word in words:
        assert word in str(err.value)


# ---------------------------------------------------------------------- in a real Trainer


class Tokens(Dataset):
    def __init__(self, n=64, length=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, 50, (n, length), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i]}


class TinyLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 50)

    def _loss(self, batch):
        ids = batch["input_ids"]
        labels = batch.get("labels", ids)
        logits = self.out(self.emb(ids[:, :-1]))
        return nn.functional.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(Tokens(), batch_size=16)

    def val_dataloader(self):
        return DataLoader(Tokens(16, seed=1), batch_size=16)


class ScriptedMonitor(pl.Callback):
    """Logs a scripted memorization figure every `every` epochs, like MemorizationMonitor (same keys, history)."""

    log_prefix = "memorization"

    def __init__(self, figures, every=1):
        self.figures, self.every, self.history = list(figures), every, []

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every:
            return
        value = self.figures[len(self.history)]
        pl_module.log("memorization/exact_match", value)
        self.history.append((trainer.current_epoch, trainer.global_step, {"exact_match": value}))


def _trainer(tmp_path, callbacks, epochs, **kw):
    return pl.Trainer(
        max_epochs=epochs, callbacks=callbacks, default_root_dir=tmp_path, accelerator="cpu", devices=1,
        enable_progress_bar=False, enable_model_summary=False, logger=False, num_sanity_val_steps=1, **kw,
    )  # fmt: skip


def test_trainer_moves_goldfish_k_and_the_mask_follows(tmp_path):
    goldfish = GoldfishTokenDropout(k=16, h=2)
    # over, over, in band, under, under (relax), not evaluated in between (every=2)
    monitor = ScriptedMonitor([0.3, 0.2, 0.07, 0.0, 0.0], every=2)
    budget = MemorizationBudget(control="goldfish.k", max_value=0.1, relax_patience=2)
    trainer = _trainer(tmp_path, [budget, goldfish, monitor], epochs=11, enable_checkpointing=False)  # budget first
    trainer.fit(TinyLM())
    assert [h[2:] for h in budget.history] == [[16, 8], [8, 4], [4, 4], [4, 4], [4, 8]]
    assert [h[0] for h in budget.history] == [1, 3, 5, 7, 9]  # only epochs where the monitor evaluated
    assert [h[1] for h in budget.history] == pytest.approx([0.3, 0.2, 0.07, 0.0, 0.0])
    assert goldfish.k == 8 and budget.value == 8
    assert float(trainer.callback_metrics["budget/goldfish.k"]) == 8.0
    # the last epoch trained with k=8: about 1/8 of the targets were dropped
    assert float(trainer.callback_metrics["goldfish/dropped_fraction_epoch"]) == pytest.approx(1 / 8, abs=0.03)


def test_resume_restores_the_knob_before_goldfish_checks_it(tmp_path):
    monitor = ScriptedMonitor([0.5, 0.5, 0.5, 0.0, 0.0, 0.0], every=1)
    budget = MemorizationBudget(control="goldfish.k", max_value=0.1)
    goldfish = GoldfishTokenDropout(k=16, h=2)
    trainer = _trainer(tmp_path, [goldfish, monitor, budget], epochs=2, enable_checkpointing=False)
    trainer.fit(TinyLM())
    assert goldfish.k == 4
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["callbacks"][budget.state_key]
    assert state["value"] == 4 and state["control"] == "goldfish.k"

    # a fresh run configured as before (k=16): the budget puts k=4 back, so goldfish's own check passes
    monitor2 = ScriptedMonitor([0.5, 0.5, 0.5, 0.0, 0.0, 0.0], every=1)
    monitor2.history = list(monitor.history)  # the scripted sequence continues
    goldfish2, budget2 = GoldfishTokenDropout(k=16, h=2), MemorizationBudget(control="goldfish.k", max_value=0.1)
    trainer2 = _trainer(tmp_path, [goldfish2, monitor2, budget2], epochs=3, enable_checkpointing=False)
    trainer2.fit(TinyLM(), ckpt_path=ckpt)
    assert len(budget2.history) == 3 and budget2.history[:2] == budget.history
    assert budget2.history[2][2:] == [4, 2]  # third figure 0.5: stronger from the restored 4
    assert goldfish2.k == 2 and budget2.value == 2

    # without the budget the checkpoint's k=4 conflicts with k=16, as goldfish documents
    trainer3 = _trainer(tmp_path, [GoldfishTokenDropout(k=16, h=2)], epochs=3, enable_checkpointing=False)
    with pytest.raises(ValueError, match="k=4"):
        trainer3.fit(TinyLM(), ckpt_path=ckpt)


def test_setup_errors_name_the_control(tmp_path):
    with pytest.raises(ValueError, match=r"control='loss_floor.floor'.*no callback of class LossFloor"):
        _trainer(tmp_path, [GoldfishTokenDropout(), MemorizationBudget(control="loss_floor.floor")], 1).fit(TinyLM())
    with pytest.raises(ValueError, match="starts at 0.*pass step"):
        _trainer(tmp_path, [MemorizationBudget(control="loss_floor.floor"), LossFloor(floor=0.0, module_name="")], 1).fit(TinyLM())


# ------------------------------------------------------------------------------------- DDP


class RankSkewedMonitor(ScriptedMonitor):
    """Rank 0 logs the script, rank 1 logs 0.0 (unsynced): only a broadcast keeps the ranks in step."""

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every:
            return
        value = self.figures[len(self.history)] if trainer.global_rank == 0 else 0.0
        pl_module.log("memorization/exact_match", value, sync_dist=False)
        self.history.append((trainer.current_epoch, trainer.global_step, {"exact_match": value}))


class Recorder(pl.Callback):
    def __init__(self, out_dir, budget, goldfish):
        self.out_dir, self.budget, self.goldfish = str(out_dir), budget, goldfish

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {"history": self.budget.history, "k": self.goldfish.k, "state": self.budget.state_dict()},
            f"{self.out_dir}/rank{trainer.global_rank}.pt",
        )


@pytest.mark.ddp
def test_ddp_every_rank_applies_rank_zero_decision(tmp_path):
    goldfish = GoldfishTokenDropout(k=16, h=2)
    monitor = RankSkewedMonitor([0.5, 0.5, 0.0], every=1)
    budget = MemorizationBudget(control="goldfish.k", max_value=0.1, relax_patience=1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=3, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[goldfish, monitor, budget, Recorder(tmp_path, budget, goldfish)],
    )  # fmt: skip
    trainer.fit(TinyLM())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # rank 1 saw 0.0 every time (it alone would have relaxed to 32, 64, 128); both followed rank 0
    expected = [[0, 0.5, 16.0, 8.0], [1, 0.5, 8.0, 4.0], [2, 0.0, 4.0, 8.0]]
    assert ranks[0]["history"] == ranks[1]["history"] == expected
    assert ranks[0]["k"] == ranks[1]["k"] == 8
    assert ranks[0]["state"] == ranks[1]["state"]


def test_log_line_report_and_history_agree_on_the_epoch(tmp_path):
    """The log line and the report both say "after epoch N" (1-based); history stores N - 1."""
    import logging

    from antimemo.report import build_report, format_report

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Keep(logging.INFO)
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        goldfish = GoldfishTokenDropout(k=16, h=2)
        monitor = ScriptedMonitor([0.3, 0.07, 0.0], every=2)
        budget = MemorizationBudget(control="goldfish.k", max_value=0.1, relax_patience=2)
        trainer = _trainer(tmp_path, [goldfish, monitor, budget], epochs=6, enable_checkpointing=False)
        trainer.fit(TinyLM())
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    assert [h[0] for h in budget.history] == [1, 3, 5]  # 0-based trainer.current_epoch
    changes = [line for line in lines if line.startswith("MemorizationBudget:")]
    assert len(changes) == 1 and "after epoch 2: goldfish.k 16 -> 8 (stronger)" in changes[0], changes
    report = build_report(trainer)
    assert report["budget"]["history"] == budget.history and report["budget"]["control"] == "goldfish.k"
    text = format_report(report)
    table = text[text.index("MemorizationBudget: goldfish.k keeping memorization/exact_match <= 0.1"):].splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table if line.startswith("| ") and "after epoch" not in line]
    assert rows == [
        ["start", "16", ""],
        ["2", "8 (stronger)", "0.3000"],
        ["4", "8", "0.0700"],
        ["6", "8", "0.0000"],
    ]
