"""MemorizationMonitor under a real 2-process CPU DDP fit (ddp_spawn, gloo).

Everything the spawned processes unpickle (module, callbacks, data) is defined at the top level
of this file so that the children can import it.
"""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import transformers
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from antimemo import ExtractableMemorization, MembershipInference, MemorizationMonitor
from antimemo.functional import greedy_generate, token_logprob_stats

VOCAB = 32
P = S = 8
L = P + S
NUM_PROBES = 7  # odd on purpose: the shards are uneven (rank 0 gets 4 probes, rank 1 gets 3)
EPOCHS = 12


def _examples(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (L,), generator=g)} for _ in range(n)]


TRAIN = _examples(8, seed=100)
VAL = _examples(8, seed=200)


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config)


class TinyLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = _llama()

    def _loss(self, batch):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _memorization_metrics(trainer):
    return {
        k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("memorization/")
    }


class ShardRecorder(Callback):
    """Records, on each rank, the prefixes the monitor decoded from (the KV-cache prefill calls
    of the HF model), and saves them with the rank's logged values and final weights."""

    def __init__(self, out_dir, monitor):
        self.out_dir = str(out_dir)
        self.monitor = monitor

    def on_train_start(self, trainer, pl_module):
        self.prefixes = []

        def hook(module, args, kwargs):
            # greedy_generate's prefill: model(input_ids=prefix, use_cache=True), no cache yet
            if kwargs.get("use_cache") and kwargs.get("cache", kwargs.get("past_key_values")) is None:
                self.prefixes.append(kwargs["input_ids"].detach().cpu().clone())

        self.handle = pl_module.model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_end(self, trainer, pl_module):
        self.handle.remove()
        torch.save(
            {
                "world_size": trainer.world_size,
                "prefixes": torch.cat(self.prefixes),
                "probes": self.monitor.probes,
                "probe_indices": self.monitor.probe_indices,
                "mia_member_indices": self.monitor.mia_member_indices,
                "mia_non_member_indices": self.monitor.mia_non_member_indices,
                "history": self.monitor.history,
                "logged": _memorization_metrics(trainer),
                "weights": {k: v.detach().cpu() for k, v in pl_module.model.state_dict().items()},
            },
            Path(self.out_dir) / f"rank{trainer.global_rank}.pt",
        )


def _single_process_results(weights, probes, members, non_members):
    """The same evaluation in this process, on all probes at once, without Lightning."""
    model = _llama()
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        generated = greedy_generate(model, probes[:, :P], S, batch_size=32)
        extraction = ExtractableMemorization(prefix_length=P, suffix_length=S)
        extraction.update(generated, probes[:, P:])
        results = {f"memorization/{k}": float(v) for k, v in extraction.compute().items()}
        sequences = torch.cat([members, non_members])
        logits = model(input_ids=sequences).logits
        log_probs, mu, sigma, mask = token_logprob_stats(logits, sequences)
        texts = [row.to(torch.int32).numpy().astype("<i4").tobytes() for row in sequences]
        is_member = torch.arange(len(sequences)) < len(members)
        mia = MembershipInference()
        mia.update(log_probs, is_member, mask=mask, mu=mu, sigma=sigma, texts=texts)
        results.update({f"memorization/mia/{k}": float(v) for k, v in mia.compute().items()})
    return results


@pytest.mark.ddp
def test_ddp_logged_metrics_equal_single_process_evaluation(tmp_path):
    monitor = MemorizationMonitor(
        num_probes=NUM_PROBES, prefix_length=P, suffix_length=S, holdout="val"
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=EPOCHS,
        check_val_every_n_epoch=EPOCHS,  # a single evaluation, after the last epoch
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[monitor, ShardRecorder(tmp_path, monitor)],
    )
    trainer.fit(TinyLM(), DataLoader(TRAIN, batch_size=4), DataLoader(VAL, batch_size=4))

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # every rank drew the same probes and MIA sets, and ended with the same weights
    for key in ("probe_indices", "mia_member_indices", "mia_non_member_indices"):
        assert ranks[0][key] == ranks[1][key]
    assert torch.equal(ranks[0]["probes"], ranks[1]["probes"])
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name])
    probes = ranks[0]["probes"]
    assert probes.shape == (NUM_PROBES, L)

    # each rank decoded its own shard probes[rank::2]: disjoint, and together all probes
    assert torch.equal(ranks[0]["prefixes"], probes[0::2, :P])  # 4 probes
    assert torch.equal(ranks[1]["prefixes"], probes[1::2, :P])  # 3 probes

    # the values are synced: identical on both ranks, in the main process's callback_metrics,
    # and equal to a single-process evaluation of the final model on all probes
    logged = ranks[0]["logged"]
    assert logged == ranks[1]["logged"]
    assert logged == _memorization_metrics(trainer)  # the main process got rank 0's values
    members = torch.stack([TRAIN[i]["input_ids"] for i in ranks[0]["mia_member_indices"]])
    non_members = torch.stack([VAL[i]["input_ids"] for i in ranks[0]["mia_non_member_indices"]])
    assert len(members) == len(non_members) == NUM_PROBES
    expected = _single_process_results(ranks[0]["weights"], probes, members, non_members)
    assert set(logged) == set(expected)
    assert logged == pytest.approx(expected, abs=1e-6)
    # not a vacuous comparison: the model is part-way to memorizing its probes
    assert 0.0 < logged["memorization/token_match"] < 1.0
    unprefixed = {k.removeprefix("memorization/"): v for k, v in logged.items()}
    assert ranks[0]["history"][-1][2] == unprefixed
