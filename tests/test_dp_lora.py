"""DP fine-tuning of LoRA adapters (issue 19): ``LoRACausalLMModule`` / ``apply_lora`` under ``DifferentialPrivacy``.

Per-sample gradients and noise reach the adapters only; the frozen base weights get neither and do
not move; unfreezing a base weight mid-training is refused; epsilon is the same as full DP at the
same sample rate, noise and steps; the loss chain still finds the Hugging Face causal LM (injected
adapters and a ``peft.get_peft_model`` wrapper); checkpoints hold and restore the adapters.
"""

from __future__ import annotations

import logging
import sys

import lightning.pytorch as pl
import pytest
import torch
import transformers
from _builders import quiet_trainer_kwargs, tiny_llama, token_rows
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from antimemo.callbacks._seams import existing_loss_seam
from antimemo.callbacks.dp import DifferentialPrivacy
from antimemo.dp import find_causal_lms
from antimemo.lm.lora import DEFAULT_TARGET_MODULES, LoRACausalLMModule, apply_lora, check_lora, load_base_weights
from antimemo.lm.module import CausalLMModule
from antimemo.lm.splits import OffsetTextDataModule

transformers.logging.set_verbosity_error()
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)

SIZES = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_position_embeddings": 32}
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _module(lora=LORA, **kw) -> LoRACausalLMModule:
    return LoRACausalLMModule(lora=lora, **{**SIZES, "lr": 1e-3, "min_lr_ratio": 1.0, **kw})


def _loader(n=64, batch_size=8, seed=0) -> DataLoader:
    return DataLoader(token_rows(n, 256, 16, seed), batch_size=batch_size)


def _fit(model, dp, steps=3, callbacks=(), **kw) -> pl.Trainer:
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", callbacks=[dp, *callbacks], **quiet_trainer_kwargs(max_steps=steps, **kw))
    trainer.fit(model, _loader())
    return trainer


class Probe(pl.Callback):
    """Per step: which parameters carry a per-sample gradient, the adapters' noised gradient norm, the loss seam."""

    def __init__(self) -> None:
        self.with_grad_sample: list[set[str]] = []
        self.grad_sample_shapes: dict[str, tuple[int, ...]] = {}
        self.adapter_grad_norms: list[float] = []
        self.base_grads: list[str] = []
        self.seam_calls: list[int] = []
        self.per_sequence: list[tuple[int, ...]] = []
        self.batch_sizes: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_sizes.append(int(batch["input_ids"].shape[0]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        names = set()
        for n, p in pl_module.named_parameters():
            gs = getattr(p, "grad_sample", None)
            if gs is not None:
                names.add(n)
                self.grad_sample_shapes[n] = tuple(gs.shape)
        self.with_grad_sample.append(names)
        lm = find_causal_lms(pl_module)[0]
        seam = existing_loss_seam(lm)
        self.seam_calls.append(-1 if seam is None else seam.calls)
        if seam is not None and seam.last_per_sequence is not None:
            self.per_sequence.append(tuple(seam.last_per_sequence.shape))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # after the DP step: p.grad holds the clipped, noised mean gradient (no zero_grad before the next batch)
        grads = [p.grad.flatten() for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is not None]
        self.adapter_grad_norms.append(float(torch.cat(grads).norm()))
        self.base_grads += [n for n, p in pl_module.named_parameters() if not p.requires_grad and p.grad is not None]


# ---------------------------------------------------------------------------------------------- the module


def test_lora_module_freezes_the_base_and_keeps_the_hf_model_in_place():
    m = _module()
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert type(m.model).__name__ == "LlamaForCausalLM" and find_causal_lms(m) == [m.model]
    assert m.lora_layers == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj"]
    # 3 layers, rank 4: A [4, in] + B [out, 4]
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 4 * (32 + 32) * 2 + 4 * (64 + 32)
    # the optimizer holds only the adapters
    opt = m.configure_optimizers()["optimizer"]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    # lora_B starts at 0: the adapted model computes what the base model computes
    full = LoRACausalLMModule(lora=None, **{**SIZES})
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m(ids).logits, full(ids).logits)
    assert all(p.requires_grad for p in full.parameters())


def test_adapter_initialisation_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = _module(), _module()
    assert torch.equal(torch.random.get_rng_state(), before)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    c = _module(seed=1)
    a_lora = dict(a.named_parameters())["model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    c_lora = dict(c.named_parameters())["model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert not torch.equal(a_lora, c_lora)


@pytest.mark.parametrize(
    ("lora", "match"),
    [
        ({"rank": 4}, r"lora: unknown key 'rank'; the keys are r, alpha, dropout, target_modules"),
        ({"r": 0}, r"lora.r must be an integer >= 1 .*got 0"),
        ({"r": 2.5}, r"lora.r must be an integer >= 1 .*got 2.5"),
        ({"alpha": 0}, r"lora.alpha must be a number > 0 .*got 0"),
        ({"alpha": "16"}, r"lora.alpha must be a number > 0 .*got '16'"),
        ({"dropout": 1.0}, r"lora.dropout must be a number in \[0, 1\), got 1.0"),
        ({"target_modules": "q_proj"}, r"lora.target_modules must be a non-empty list of layer names, got 'q_proj'"),
        ({"target_modules": []}, r"lora.target_modules must be a non-empty list"),
        ({"target_modules": ["q_proj", 3]}, r"lora.target_modules must hold layer names \(strings\), got 3"),
        ([("r", 4)], r"lora must be a mapping such as"),
    ],
)
def test_bad_lora_arguments_name_the_key_the_value_and_the_fix(lora, match):
    with pytest.raises(ValueError, match=match):
        _module(lora=lora)


def test_unknown_target_lists_the_linear_layers_and_adapters_are_added_once():
    with pytest.raises(ValueError, match=r"lora.target_modules: \['query'\] name no nn.Linear layer .*'q_proj'"):
        _module(lora={"target_modules": ["q_proj", "query"]})
    model = tiny_llama()
    apply_lora(model, {"r": 2})
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, {"r": 2})
    assert check_lora({})["target_modules"] == list(DEFAULT_TARGET_MODULES)


def test_base_checkpoint_loads_the_pretrained_weights_and_refuses_other_sizes(tmp_path):
    base = CausalLMModule(**SIZES, seed=7)
    trainer = pl.Trainer(accelerator="cpu", **quiet_trainer_kwargs(max_steps=2, enable_checkpointing=True, default_root_dir=tmp_path))
    trainer.fit(base, _loader())
    ckpt = tmp_path / "base.ckpt"
    trainer.save_checkpoint(ckpt)
    m = _module(base_checkpoint=str(ckpt))  # seed 0: without the checkpoint the weights would differ
    lora_free = {n.replace(".base_layer", ""): p for n, p in m.named_parameters() if "lora_" not in n}
    for n, p in base.named_parameters():
        assert torch.equal(lora_free[n], p), n
    with pytest.raises(ValueError, match=r"base_checkpoint: the weights in .* do not fit this model .*hidden_size"):
        _module(base_checkpoint=str(ckpt), hidden_size=64, num_heads=2)
    with pytest.raises(FileNotFoundError, match=r"base_checkpoint: '.*nothing.ckpt' is not a file"):
        _module(base_checkpoint=str(tmp_path / "nothing.ckpt"))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"could not be read as a Lightning checkpoint with torch.load\(weights_only=True\)"):
        load_base_weights(m, tmp_path / "junk.ckpt")


def test_offset_split_is_disjoint_from_pretraining_and_shares_the_held_out_set():
    pre = OffsetTextDataModule(num_train=64, num_holdout=16, train_offset=0)
    ft = OffsetTextDataModule(num_train=32, num_holdout=16, train_offset=64)
    (pre_train, pre_held), (ft_train, ft_held) = pre.build_split(), ft.build_split()
    assert torch.equal(pre_held, ft_held) and ft_train.shape == (32, 64)
    assert not bool((pre_train[:, None] == ft_train[None]).all(-1).any())
    # the fine-tuning rows are the next rows of the same seeded order
    torch.testing.assert_close(ft_train, OffsetTextDataModule(num_train=96, num_holdout=16).build_split()[0][64:])
    with pytest.raises(ValueError, match=r"train_offset=\d+ \(added to num_train=32\): .*needs"):
        OffsetTextDataModule(num_train=32, num_holdout=16, train_offset=100_000).build_split()
    with pytest.raises(ValueError, match="train_offset must be"):
        OffsetTextDataModule(train_offset=-1)


# ---------------------------------------------------------------------------------------------- under DP


def test_dp_gives_per_sample_gradients_and_noise_to_the_adapters_only():
    m = _module()
    base_before = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    probe = Probe()
    dp = DifferentialPrivacy(noise_multiplier=1000.0, max_grad_norm=1.0, reproducible_noise=True)
    _fit(m, dp, steps=3, callbacks=[probe])
    assert dp.steps == 3
    adapters = set(lora_before)
    assert probe.with_grad_sample == [adapters] * 3  # per-sample gradients: the adapters, every step, nothing else
    assert min(probe.batch_sizes) > 0  # 64 rows at q = 1/8: an empty draw would make the shape check vacuous
    for n in adapters:
        assert probe.grad_sample_shapes[n][1:] == tuple(lora_before[n].shape)
    assert probe.base_grads == []  # the frozen weights never get a gradient (so no noise either)
    for n, p in m.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), f"frozen {n} changed"
            assert not hasattr(p, "grad_sample") or p.grad_sample is None
        else:
            assert not torch.equal(p, lora_before[n]), f"adapter {n} did not move"
    # the adapters' gradient after the DP step is the clipped mean (norm <= C = 1) plus noise of std
    # sigma * C / B per coordinate: with sigma = 1000 its norm is in the hundreds
    assert min(probe.adapter_grad_norms) > 100


def test_without_noise_the_adapters_get_the_clipped_mean_only():
    probe = Probe()
    with pytest.warns(UserWarning, match="adds no noise"):
        dp = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=1.0, reproducible_noise=True)
    _fit(_module(), dp, steps=2, callbacks=[probe])
    assert max(probe.adapter_grad_norms) <= 1.0 + 1e-5  # clipped per sample to 1, then averaged


def test_unfreezing_a_base_weight_during_dp_lora_training_is_refused():
    class Unfreeze(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                pl_module.model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)

    m = _module()
    base = m.model.model.layers[0].self_attn.q_proj.base_layer.weight
    before = base.detach().clone()
    dp = DifferentialPrivacy(noise_multiplier=1.0, reproducible_noise=True)
    with pytest.raises(RuntimeError, match=r"parameter model\.model\.layers\.0\.self_attn\.q_proj\.base_layer\.weight became trainable after DP started"):
        _fit(m, dp, steps=3, callbacks=[Unfreeze()])
    assert dp.steps == 1 and torch.equal(base, before)


def test_epsilon_is_the_same_as_full_dp_at_the_same_rate_noise_and_steps():
    lora_dp = DifferentialPrivacy(noise_multiplier=0.8, max_grad_norm=1.0, reproducible_noise=True)
    full_dp = DifferentialPrivacy(noise_multiplier=0.8, max_grad_norm=1.0, reproducible_noise=True)
    _fit(_module(), lora_dp, steps=4)
    _fit(_module(lora=None), full_dp, steps=4)
    assert lora_dp.history == full_dp.history == [(0.8, 0.125, 4)]
    assert lora_dp.epsilon == full_dp.epsilon and 0 < lora_dp.epsilon < float("inf")
    assert lora_dp.guarantee()["statement"] == full_dp.guarantee()["statement"]


def test_the_loss_chain_finds_the_causal_lm_inside_the_adapters():
    probe = Probe()
    dp = DifferentialPrivacy(noise_multiplier=1.0, reproducible_noise=True)
    _fit(_module(), dp, steps=2, callbacks=[probe])
    assert probe.seam_calls == [1, 1]  # DP's per-sequence reduction ran on the model's labels= loss, once per step
    assert probe.per_sequence == [(b,) for b in probe.batch_sizes]
    assert not dp._warned_loss


class PeftWrapped(pl.LightningModule):
    """A user module holding ``peft.get_peft_model(...)`` (a ``PeftModelForCausalLM`` wrapper)."""

    def __init__(self) -> None:
        super().__init__()
        import peft

        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.model = peft.get_peft_model(
                tiny_llama(vocab=257, hidden=32, layers=1, heads=2, max_positions=32),
                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
            )

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_dp_on_a_peft_get_peft_model_wrapper():
    m = PeftWrapped()
    assert [type(lm).__name__ for lm in find_causal_lms(m)] == ["LlamaForCausalLM"]
    base_before = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    adapters = {n for n, p in m.named_parameters() if p.requires_grad}
    probe = Probe()
    dp = DifferentialPrivacy(noise_multiplier=1.0, reproducible_noise=True)
    _fit(m, dp, steps=2, callbacks=[probe])
    assert dp.steps == 2 and probe.seam_calls == [1, 1]  # the hook on the inner LlamaForCausalLM fires through peft
    assert probe.with_grad_sample == [adapters] * 2
    for n, p in m.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


def test_ghost_clipping_on_the_adapters():
    m = _module()
    base_before = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    dp = DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="ghost", reproducible_noise=True)
    _fit(m, dp, steps=2)
    assert dp.steps == 2
    for n, p in m.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_holds_the_adapters_and_resume_continues_training_and_epsilon(tmp_path):
    first = _module()
    dp1 = DifferentialPrivacy(noise_multiplier=1.0, reproducible_noise=True)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit(first, dp1, steps=2, callbacks=[ckpt_cb], enable_checkpointing=True)
    last = tmp_path / "last.ckpt"
    saved = {n: p.detach().clone() for n, p in first.named_parameters()}
    # the file holds base and adapter weights, loadable without unpickling
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert any(".lora_A." in k for k in state) and any(".base_layer." in k for k in state)

    loaded = LoRACausalLMModule.load_from_checkpoint(last)
    assert loaded.hparams.lora == LORA
    for n, p in loaded.named_parameters():
        assert torch.equal(p, saved[n]), n
        assert p.requires_grad == (".lora_" in n), n

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    at_start = AtStart()
    resumed = _module(seed=3)  # other initial adapters: the checkpoint must overwrite them
    dp2 = DifferentialPrivacy(noise_multiplier=1.0, reproducible_noise=True)
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", callbacks=[dp2, at_start], **quiet_trainer_kwargs(max_steps=4))
    trainer.fit(resumed, _loader(), ckpt_path=str(last))
    for n, w in at_start.weights.items():
        assert torch.equal(w, saved[n]), n
    assert dp2.steps == 4 and dp2.history == [(1.0, 0.125, 4)]
    assert dp2.epsilon > dp1.epsilon
    moved = [n for n, p in resumed.named_parameters() if not torch.equal(p, saved[n])]
    assert moved and all(".lora_" in n for n in moved)


def test_without_peft_lora_is_one_error_naming_the_extra_and_full_fine_tuning_still_works(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # importing peft now fails as if it were not installed
    with pytest.raises(ImportError, match=r"^LoRA fine-tuning \(lora=...\) needs peft, which is not installed: pip install 'antimemo\[lora\]'$"):
        _module()
    assert all(p.requires_grad for p in _module(lora=None).parameters())


def test_auto_route_picks_hooks_for_adapters_where_it_picks_ghost_for_the_full_model(monkeypatch):
    import antimemo.dp.bookkeeping as bk
    from antimemo.dp.routes import choose_route

    sizes = {"hidden_size": 384, "num_layers": 4, "num_heads": 6, "intermediate_size": 1536, "max_position_embeddings": 64}
    adapters = LoRACausalLMModule(lora={"r": 8}, **sizes)
    full = LoRACausalLMModule(lora=None, **sizes)
    # auto switches to ghost only when hooks' per-sample gradients would not fit (docs/dp.md "Gradient modes"):
    # the adapters' are tiny, so hooks stays (measured: ghost 1.92x, hooks 1.10x a LoRA step, docs/benchmarks.md
    # "DP with LoRA"), while the full model's (16 x 9.6M floats) would not fit in 64 MB
    # book-keeping, where valid, comes first for both (the adapters and the full model are nn.Linear / nn.Embedding)
    assert choose_route(adapters, None, 16, 64 * 2**20).route == "bookkeeping"
    assert choose_route(full, None, 16, 64 * 2**20).route == "bookkeeping"
    monkeypatch.setattr(bk, "bookkeeping_blocker", lambda module: "blocked by the test")
    assert choose_route(adapters, None, 16, 64 * 2**20).route == "hooks"
    assert choose_route(full, None, 16, 64 * 2**20).route == "ghost"


def test_the_recipe_parses_and_names_the_lora_module_and_the_offset_split():
    import subprocess
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "antimemo.cli", "fit", "--config", "recipes/lm_dp_lora.yaml", "--print_config"],
        capture_output=True, text=True, cwd=root, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["class_path"] == "antimemo.lm.lora.LoRACausalLMModule"
    assert cfg["model"]["init_args"]["lora"]["r"] == 8
    assert cfg["data"]["class_path"] == "antimemo.lm.splits.OffsetTextDataModule"
    assert cfg["data"]["init_args"]["train_offset"] == 1024 and cfg["dp"]["init_args"]["noise_multiplier"] == 1.0
