"""``antimemo audit`` (issue 15, "Auditing a finished model"): every memorization measure on a
saved checkpoint or on any ``save_pretrained`` causal LM, with the report of ``fit``.

The measured values are checked against greedy decodes written here from scratch (a plain argmax
loop over the Hugging Face model, no antimemo generation code), on models whose memorization is
known: a recipe model trained until it reproduces part of its training set, and a random GPT-2
whose "training" rows are partly its own greedy continuations (reproduced by construction).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from antimemo.cli import main
from antimemo.report import format_report

# In-process calls pass args= while sys.argv holds pytest's own arguments; Lightning warns about that.
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "lm_goldfish.yaml")
TEMPLATE = str(ROOT / "recipes" / "audit_pretrained.yaml")
EPOCHS = 34  # one step per epoch; on the 2-core CI box the model reproduces some, not all, probes


def _greedy_suffixes(lm: torch.nn.Module, rows: torch.Tensor, prefix: int, suffix: int) -> torch.Tensor:
    """Greedy continuation of ``rows[:, :prefix]`` by a plain argmax loop (no cache, no antimemo code)."""
    lm.eval()
    ids = rows[:, :prefix].clone()
    with torch.no_grad():
        for _ in range(suffix):
            nxt = lm(input_ids=ids).logits[:, -1, :].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prefix:]


def _scores(lm: torch.nn.Module, rows: torch.Tensor, prefix: int, suffix: int) -> tuple[float, float]:
    """(exact match, token match) of greedy decoding on ``rows`` (prefix -> true suffix)."""
    generated = _greedy_suffixes(lm, rows, prefix, suffix)
    truth = rows[:, prefix : prefix + suffix]
    same = generated == truth
    return float(same.all(dim=1).float().mean()), float(same.float().mean())


# ----------------------------------------------------------------------------- a recipe checkpoint


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A recipe model fitted on 8 random-letter sequences (the fit's report, config and checkpoint)."""
    tmp = tmp_path_factory.mktemp("fit")
    rng = random.Random(0)
    corpus = tmp / "letters.txt"
    corpus.write_text("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(16 * 32)))
    args = [
        "--data.corpus", str(corpus), "--data.seq_len", "32", "--data.num_train", "8", "--data.num_holdout", "8",
        "--data.batch_size", "8",
        "--model.hidden_size", "64", "--model.num_layers", "2", "--model.intermediate_size", "128",
        "--model.max_position_embeddings", "32", "--model.lr", "3e-3", "--model.warmup_steps", "0",
        "--model.min_lr_ratio", "1.0",
        "--trainer.max_epochs", str(EPOCHS), "--trainer.check_val_every_n_epoch", str(EPOCHS),
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
        "--monitor.every_n_epochs", str(EPOCHS), "--monitor.num_probes", "8", "--monitor.prefix_length", "16",
        "--monitor.suffix_length", "16", "--monitor.batch_size", "8",
        "--goldfish", "null", "--trainer.default_root_dir", str(tmp / "run"),
    ]  # fmt: skip
    assert main(["fit", "--config", RECIPE, *args]) == 0
    (report,) = (tmp / "run").rglob("report.json")
    (config,) = (tmp / "run").rglob("config.yaml")
    (ckpt,) = (tmp / "run").rglob("*.ckpt")
    return {"report": json.loads(report.read_text()), "config": str(config), "ckpt": str(ckpt), "corpus": str(corpus)}


def test_audit_of_a_checkpoint_measures_every_key_and_matches_an_independent_decode(fitted, tmp_path, capsys):
    from antimemo.lm import CausalLMModule, TextDataModule

    target = tmp_path / "audit.json"
    # the config the fit saved, plus two training-time sections the audit must leave out
    args = ["audit", "--config", fitted["config"], "--ckpt_path", fitted["ckpt"], "--goldfish.k", "4",
            "--loss_floor.floor", "1.0", "--trainer.default_root_dir", str(tmp_path), "--report_path", str(target)]
    assert main(args) == 0
    out = capsys.readouterr().out
    report = json.loads(target.read_text())

    # every measure: full decode, discoverable extraction, MIA on the held-out split, untargeted
    metrics = report["metrics"]
    for key in ("exact_match", "token_match", "near_verbatim"):
        assert 0.0 <= report[key] <= 1.0
    assert 0.0 <= metrics["memorization/discoverable/n100_p0.9"] <= 1.0
    assert "memorization/discoverable/median_log10_pz" in metrics
    assert 0.0 <= metrics["memorization/reproduced_length"] <= 16.0
    for score in ("loss", "zlib", "min_k", "min_k_plus_plus"):
        assert 0.0 <= metrics[f"memorization/mia/{score}/auc"] <= 1.0
    assert "memorization/untargeted/extraction_rate" in metrics
    assert "memorization/untargeted/holdout_baseline/extraction_rate" in metrics
    assert {"memorization/untargeted/empty/extraction_rate", "memorization/untargeted/repeat/extraction_rate"} <= set(metrics)
    assert math.isfinite(report["val_loss"])

    # the audit-specific keys; the training-time sections were not run
    assert report["verb"] == "audit" and report["command"].startswith("antimemo audit --config")
    assert report["checkpoint"]["path"] == str(Path(fitted["ckpt"]).resolve())
    assert report["checkpoint"]["global_step"] == report["global_step"] == EPOCHS
    assert report["train_wall_time_s"] is None and report["audit_wall_time_s"] > 0
    assert sorted(report["training_sections"]) == ["goldfish", "loss_floor"]
    assert report["goldfish"] is None and report["sections"]["loss_floor"] is None
    forced = report["sections"]["monitor"]["init_args"]
    assert forced["decode_every_n_evaluations"] == 1 and forced["discoverable"] is True and forced["holdout"] == "val"
    assert forced["num_probes"] == 8 and forced["prefix_length"] == 16  # the config's own

    # the printed table shows the new rows
    for row in ("audited model", "training-time sections (not run)", "goldfish, loss_floor", "discoverable n100 p0.9",
                "reproduced length", "untargeted extraction rate", "held-out baseline", "MIA loss/auc", str(target)):
        assert row in out, row

    # the same final weights and probes as the fit's last (full) evaluation
    fit = fitted["report"]
    assert report["exact_match"] == fit["exact_match"] and report["token_match"] == fit["token_match"]
    assert metrics["memorization/mia/loss/auc"] == fit["metrics"]["memorization/mia/loss/auc"]

    # an independent greedy decode of the loaded checkpoint: num_probes = num_train = 8, so the
    # probes are every training sequence (the fractions do not depend on the draw's order)
    model = CausalLMModule.load_from_checkpoint(fitted["ckpt"], map_location="cpu")
    data = TextDataModule(corpus=fitted["corpus"], seq_len=32, num_train=8, num_holdout=8, batch_size=8, seed=0)
    data.setup("validate")
    exact, token = _scores(model.model, data.train_dataset.input_ids, 16, 16)
    assert report["exact_match"] == pytest.approx(exact, abs=1e-6)
    assert report["token_match"] == pytest.approx(token, abs=1e-6)
    assert token > 0.2  # the model learned its training set: the comparison is not between two zeros


# ----------------------------------------------------------------------------- any save_pretrained model


def _tiny_gpt2(path: Path) -> torch.nn.Module:
    import transformers

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                  eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(cfg).eval()
    lm.save_pretrained(path)
    return lm


def test_audit_of_a_save_pretrained_model_with_token_files(tmp_path, capsys):
    lm = _tiny_gpt2(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    # 8 training rows of 24 tokens: the first 4 are the model's own greedy continuations of random
    # 8-token prefixes (reproduced by construction), the last 4 random text (almost surely not)
    prefixes = torch.randint(1, 64, (8, 8), generator=g)
    own = torch.cat([prefixes[:4], _greedy_suffixes(lm, prefixes[:4], 8, 16)], dim=1)
    rand = torch.cat([prefixes[4:], torch.randint(1, 64, (4, 16), generator=g)], dim=1)
    train = torch.cat([own, rand])
    np.save(tmp_path / "train.npy", train.numpy())
    with (tmp_path / "val.jsonl").open("w") as f:  # held-out rows of several lengths
        for i in range(8):
            f.write(json.dumps({"input_ids": torch.randint(1, 64, (24 + i % 3,), generator=g).tolist()}) + "\n")

    target = tmp_path / "report.json"
    args = ["audit", "--config", TEMPLATE, "--model.init_args.path", str(tmp_path / "model"),
            "--data.init_args.train", str(tmp_path / "train.npy"), "--data.init_args.val", str(tmp_path / "val.jsonl"),
            "--monitor.num_probes", "8", "--monitor.prefix_length", "8", "--monitor.suffix_length", "16",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--report_path", str(target)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    report = json.loads(target.read_text())
    exact, token = _scores(lm, train, 8, 16)
    assert exact == 0.5  # the construction: 4 of 8 rows are the model's own continuations
    assert report["exact_match"] == pytest.approx(exact) and report["token_match"] == pytest.approx(token)
    assert report["checkpoint"] is None and report["model_class"] == "antimemo.lm.PretrainedCausalLM"
    assert report["model_path"] == str(tmp_path / "model") and report["num_probes"] == 8
    metrics = report["metrics"]
    assert 0.0 <= metrics["memorization/mia/loss/auc"] <= 1.0 and "memorization/discoverable/n1_p0.5" in metrics
    assert metrics["memorization/reproduced_length"] >= 8.0  # half the probes reproduce all 16 tokens
    assert metrics["memorization/untargeted/generations"] > 0
    assert math.isfinite(report["val_loss"])
    assert f"antimemo.lm.PretrainedCausalLM from {tmp_path / 'model'}" in out and "exact match" in out


# ----------------------------------------------------------------------------- bad inputs


def _tokens(tmp_path: Path) -> list[str]:
    _tiny_gpt2(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"input_ids": list(range(1, 33))}) + "\n" for _ in range(4)))
    (tmp_path / "val.jsonl").write_text(json.dumps({"input_ids": list(range(2, 34))}) + "\n")
    return ["--config", TEMPLATE, "--model.init_args.path", str(tmp_path / "model"),
            "--data.init_args.train", str(tmp_path / "train.jsonl"), "--data.init_args.val", str(tmp_path / "val.jsonl"),
            "--trainer.default_root_dir", str(tmp_path / "run")]  # fmt: skip


def _bad_npy(t: Path) -> str:
    np.save(t / "flat.npy", np.arange(10))
    return str(t / "flat.npy")


def _bad_jsonl(t: Path) -> str:
    (t / "bad.jsonl").write_text('{"input_ids": [1, 2, 3]}\n{"ids": [4, 5]}\n')
    return str(t / "bad.jsonl")


def _not_a_ckpt(t: Path) -> str:
    (t / "x.ckpt").write_text("not a checkpoint")
    return str(t / "x.ckpt")


BAD = [
    ("recipe-without-ckpt", lambda t: ["--config", RECIPE], r"--ckpt_path: required to audit .*CausalLMModule"),
    ("missing-ckpt", lambda t: ["--config", RECIPE, "--ckpt_path", str(t / "nope.ckpt")],
     r"--ckpt_path: '.*nope\.ckpt' does not exist"),
    ("not-a-ckpt", lambda t: ["--config", RECIPE, "--ckpt_path", _not_a_ckpt(t)], r"--ckpt_path: '.*x\.ckpt' cannot be read"),
    ("npy-wrong-shape", lambda t: [*_tokens(t), "--data.init_args.train", _bad_npy(t)],
     r"train: '.*flat\.npy' holds an array of shape \(10,\), expected 2-D"),
    ("jsonl-without-input-ids", lambda t: [*_tokens(t), "--data.init_args.val", _bad_jsonl(t)],
     r"val: '.*bad\.jsonl' line 2 has no 'input_ids' \(keys \['ids'\]\)"),
    ("pickle-suffix", lambda t: [*_tokens(t), "--data.init_args.train", str(t / "train.pt")],
     r"train: '.*train\.pt' is neither a \.jsonl nor a \.npy file"),
    ("missing-model-dir", lambda t: [*_tokens(t), "--model.init_args.path", str(t / "nodir")],
     r"path: '.*nodir' does not exist; pass a directory written by model\.save_pretrained"),
    ("monitor-null", lambda t: [*_tokens(t), "--monitor", "null"], r"--monitor: an audit measures with the monitor section"),
]  # fmt: skip


@pytest.mark.parametrize("argv, pattern", [pytest.param(a, p, id=i) for i, a, p in BAD])
def test_bad_audit_inputs_are_one_line_and_exit_2(tmp_path, capsys, argv, pattern):
    import re

    assert main(["audit", *argv(tmp_path)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("antimemo audit: error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "report.json").exists()


# ----------------------------------------------------------------------------- pieces


def test_token_files_read_both_formats_truncate_and_pad(tmp_path):
    from antimemo.lm import TokenFileDataModule

    np.save(tmp_path / "t.npy", np.arange(12, dtype=np.int32).reshape(3, 4))
    (tmp_path / "v.jsonl").write_text('{"input_ids": [1, 2, 3], "text": "x"}\n\n{"input_ids": [4]}\n')
    dm = TokenFileDataModule(train=str(tmp_path / "t.npy"), val=str(tmp_path / "v.jsonl"), seq_len=3, batch_size=2, pad_id=9)
    assert [dm.train_dataset[i]["input_ids"].tolist() for i in range(3)] == [[0, 1, 2], [4, 5, 6], [8, 9, 10]]
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    for name, content, match in [
        ("neg.jsonl", '{"input_ids": [1, -2]}\n', "negative token id -2"),
        ("float.jsonl", '{"input_ids": [1.5]}\n', "must be a non-empty list of integers"),
        ("empty.jsonl", "\n", "holds no sequence"),
        ("broken.jsonl", "{input_ids: [1]}\n", "line 1 is not valid JSON"),
    ]:
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=match):
            TokenFileDataModule(train=str(tmp_path / name), val=str(tmp_path / "v.jsonl"))
    np.save(tmp_path / "f.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"val: .*float32 values, expected integer token ids"):
        TokenFileDataModule(train=str(tmp_path / "t.npy"), val=str(tmp_path / "f.npy"))
    np.save(tmp_path / "o.npy", np.array([[1], ["a"]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"train: .*cannot be read without pickle"):
        TokenFileDataModule(train=str(tmp_path / "o.npy"), val=str(tmp_path / "v.jsonl"))


def test_pretrained_val_loss_masks_padding_and_refuses_out_of_vocab_ids(tmp_path):
    from antimemo.lm import PretrainedCausalLM

    _tiny_gpt2(tmp_path / "model")
    lm = PretrainedCausalLM(str(tmp_path / "model"))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    lm.log = lambda *a, **k: None  # no trainer attached
    loss = lm.validation_step({"input_ids": ids, "attention_mask": mask}, 0)
    with torch.no_grad():
        logp = lm.model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    nll = [-logp[0, t, ids[0, t + 1]] for t in range(3)] + [-logp[1, 0, ids[1, 1]]]  # padding targets excluded
    assert float(loss.detach()) == pytest.approx(float(torch.stack(nll).mean()), rel=1e-5)
    with pytest.raises(ValueError, match=r"token id 64, but the model .* vocabulary of 64"):
        lm.validation_step({"input_ids": torch.tensor([[1, 64]])}, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        PretrainedCausalLM(str(tmp_path / "empty"))


def test_format_report_audit_rows():
    report = {
        "verb": "audit",
        "goldfish": None,
        "checkpoint": {"path": "/runs/x/last.ckpt", "epoch": 9, "global_step": 160},
        "training_sections": {"goldfish": {"init_args": {"k": 4}}, "dp": {}},
        "exact_match": 0.25,
        "metrics": {
            "memorization/reproduced_length": 7.5,
            "memorization/discoverable/n10_p0.9": 0.5,
            "memorization/discoverable/n1_p0.5": 0.25,
            "memorization/discoverable/median_log10_pz": -3.25,
            "memorization/untargeted/extraction_rate": 0.125,
            "memorization/untargeted/holdout_baseline/extraction_rate": 0.0,
            "memorization/untargeted/repeat/extraction_rate": 0.0625,
        },
        "audit_wall_time_s": 3.0,
    }
    lines = format_report(report).splitlines()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in lines[3:-1]}
    assert rows["audited model"] == "/runs/x/last.ckpt (global step 160, epoch index 9)"
    assert rows["training-time sections (not run)"] == "dp, goldfish"
    assert "goldfish" not in rows  # an audit ran no goldfish: the fit-time row would mislead
    assert rows["reproduced length (greedy, tokens)"] == "7.50"
    names = [name for name in rows if name.startswith("discoverable")]
    assert names == ["discoverable n1 p0.5", "discoverable n10 p0.9", "discoverable median log10 p_z"]
    assert rows["untargeted extraction rate"] == "0.1250 (held-out baseline 0.0000)"
    assert rows["untargeted extraction rate, repeat prompts"] == "0.0625"
    assert rows["audit wall time (s)"] == "3.0"
    # a fit report is unchanged: no audit rows, the goldfish row stays
    fit_rows = format_report({"goldfish": None, "exact_match": 0.5})
    assert "audited model" not in fit_rows and "| goldfish" in fit_rows
