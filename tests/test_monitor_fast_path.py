"""The monitor's teacher-forced fast path on the LM recipe's model (``antimemo.lm``).

Greedy decoding reproduces a suffix iff the argmax at every suffix position, under the true
preceding tokens, is the true token; so one teacher-forced pass gives the greedy exact match.
These tests train the recipe's byte-level Llama briefly (part of its probes memorized, part not)
and check, probe for probe and evaluation for evaluation, that the fast path agrees with decoding.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from antimemo import MemorizationMonitor
from antimemo.functional import (
    discoverable_probability,
    greedy_generate,
    suffix_sampling_log_probability,
    teacher_forced_greedy_match,
)
from antimemo.functional.discoverable import suffix_logits
from antimemo.lm import CausalLMModule, TextDataModule

pytestmark = pytest.mark.filterwarnings(
    "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
    "ignore:MemorizationMonitor. one evaluation took:UserWarning",
)

P = S = 16
SAMPLING = {"ns": (1, 10, 100), "ps": (0.5, 0.9), "temperature": 1.0, "top_k": 8}
DISCOVERABLE_KEYS = {f"discoverable/n{n}_p{p}" for n in (1, 10, 100) for p in (0.5, 0.9)} | {
    "discoverable/median_log10_pz"
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # a small model: intra-op threads add more overhead than they save (and stall on a busy CI box)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _recipe_model() -> CausalLMModule:
    # recipes/lm_goldfish.yaml's model section
    return CausalLMModule(
        vocab_size=257, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
        max_position_embeddings=128, lr=0.002, warmup_steps=5, seed=0,
    )


def _data() -> TextDataModule:
    return TextDataModule(seq_len=P + S, num_train=32, num_holdout=16, batch_size=8, seed=0)


@pytest.fixture(scope="module")
def trained():
    """One fit, 30 epochs of 4 steps, with a decoding monitor and a fast one side by side
    (evaluating the same model at the same epochs), both with the probabilistic keys."""
    full = MemorizationMonitor(
        num_probes=32, prefix_length=P, suffix_length=S, decode_every_n_evaluations=1,
        discoverable=SAMPLING, log_prefix="full",
    )
    fast = MemorizationMonitor(
        num_probes=32, prefix_length=P, suffix_length=S, decode_every_n_evaluations=3,
        discoverable=SAMPLING, log_prefix="fast", holdout="val",
    )
    module = _recipe_model()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=30, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[full, fast],
        check_val_every_n_epoch=5,  # validation (and so both monitors) every 5th epoch
    )
    pl.seed_everything(0, verbose=False)
    trainer.fit(module, datamodule=_data())
    return trainer, module, full, fast


def test_fast_path_exact_match_equals_decoding_probe_for_probe(trained):
    _, module, full, _ = trained
    model = module.model.eval()
    probes = full.probes
    with torch.no_grad():
        logits = suffix_logits(model(input_ids=probes).logits, P)
    exact, reproduced = teacher_forced_greedy_match(logits, probes[:, P:])
    decoded = greedy_generate(model, probes[:, :P], S, batch_size=32)  # KV cache, as the monitor
    matches = decoded == probes[:, P:]
    assert torch.equal(exact, matches.all(-1))
    assert torch.equal(reproduced, matches.long().cumprod(-1).sum(-1))
    # not vacuous: part of the probes are memorized, part are not, and some partly
    assert 0 < int(exact.sum()) < len(probes)
    assert bool(((reproduced > 0) & (reproduced < S)).any())
    # the logged probabilistic keys are the functional's, on the final model
    log_pz = suffix_sampling_log_probability(logits, probes[:, P:], temperature=1.0, top_k=8)
    assert bool((log_pz[exact] > float("-inf")).all())  # the greedy byte is always in the top 8
    last = full.history[-1][2]
    for n in (1, 10, 100):
        for p in (0.5, 0.9):
            rate = float((discoverable_probability(log_pz, n) >= p).double().mean())
            assert last[f"discoverable/n{n}_p{p}"] == pytest.approx(rate, abs=1e-6)
    assert 0.0 < last["discoverable/n100_p0.5"] < 1.0


def test_every_evaluation_logs_teacher_forced_keys_and_decodes_on_its_cadence(trained):
    trainer, _, full, fast = trained
    assert [h[0] for h in full.history] == [h[0] for h in fast.history] == [4, 9, 14, 19, 24, 29]
    decoded_keys = {"exact_match", "token_match", "near_verbatim", "reproduced_length"} | DISCOVERABLE_KEYS
    for _, _, results in full.history:
        assert set(results) == decoded_keys
    mia = {k for k in fast.history[0][2] if k.startswith("mia/")}
    assert len(mia) == 12
    # decode at evaluations 0 and 3 (every 3rd) and 5 (the fit's last epoch); fast at 1, 2, 4
    for index, (_, _, results) in enumerate(fast.history):
        if index in (0, 3, 5):
            assert set(results) == decoded_keys | mia
        else:
            assert set(results) == decoded_keys - {"token_match", "near_verbatim"} | mia
    exact = []
    for (_, _, decoded), (_, _, teacher_forced) in zip(full.history, fast.history):
        # the same model at the same time: the teacher-forced exact match is the decoded one
        assert teacher_forced["exact_match"] == decoded["exact_match"]
        assert teacher_forced["reproduced_length"] == decoded["reproduced_length"]
        for key in DISCOVERABLE_KEYS - {"discoverable/median_log10_pz"}:
            assert teacher_forced[key] == decoded[key]
        assert teacher_forced["discoverable/median_log10_pz"] == pytest.approx(
            decoded["discoverable/median_log10_pz"], abs=1e-4
        )
        exact.append(decoded["exact_match"])
    assert len(set(exact)) >= 3  # memorization grew during the fit: not one repeated value
    # every key reached callback_metrics; token_match keeps the last decoded value
    for key in ("exact_match", "reproduced_length", "discoverable/n100_p0.9", "token_match"):
        assert float(trainer.callback_metrics[f"fast/{key}"]) == fast.last_results[key]


def test_defaults_log_the_old_keys_and_decode_every_fifth_evaluation_and_at_the_end():
    from antimemo.callbacks.monitor import DECODE_EVERY_N_EVALUATIONS

    monitor = MemorizationMonitor(num_probes=8, prefix_length=P, suffix_length=S)
    assert monitor.decode_every_n_evaluations == DECODE_EVERY_N_EVALUATIONS == 5
    assert monitor.discoverable is None
    module = _recipe_model()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=8, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[monitor],
        limit_train_batches=1,
    )
    trainer.fit(module, datamodule=_data())
    keys = [set(results) for _, _, results in monitor.history]
    full, fast = {"exact_match", "token_match", "near_verbatim"}, {"exact_match"}
    assert keys == [full, fast, fast, fast, fast, full, fast, full]  # 0, 5 and the last epoch decode
    assert set(monitor.state_dict()) == {"probe_indices", "mia_member_indices", "mia_non_member_indices", "history"}


def test_resumed_monitor_keeps_the_decode_cadence():
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S, decode_every_n_evaluations=4)
    monitor.load_state_dict({"probe_indices": None, "history": [(e, e, {"exact_match": 0.0}) for e in range(4)]})
    trainer = type("T", (), {"max_epochs": 100, "current_epoch": 4})()
    assert monitor._decode_due(trainer)  # the 5th evaluation: index 4
    monitor.history.append((4, 4, {"exact_match": 0.0}))
    trainer.current_epoch = 5
    assert not monitor._decode_due(trainer)
    trainer.current_epoch = 99  # the last epoch always decodes
    assert monitor._decode_due(trainer)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"decode_every_n_evaluations": 0}, ValueError, r"decode_every_n_evaluations must be an integer >= 1, got 0"),
        ({"discoverable": "yes"}, TypeError, r"discoverable must be a bool or a dict of sampling arguments, got str"),
        ({"discoverable": {"topk": 5}}, ValueError, r"discoverable has unknown keys \['topk'\]; the allowed keys"),
        (
            {"discoverable": {"top_k": 0}},
            ValueError,
            r"MemorizationMonitor\(discoverable=\{'top_k': 0\}\): top_k must be None .* got 0",
        ),
    ],
)
def test_new_arguments_are_checked_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        MemorizationMonitor(**kwargs)
