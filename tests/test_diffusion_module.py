"""DiffusionModule, DigitsDataModule and DigitsFeatures: shapes, determinism, errors, loss-term hook."""

from __future__ import annotations

import pytest
import torch

from antimemo.diffusion import DiffusionModule, DigitsDataModule, DigitsFeatures, load_digits_images


def tiny(**kw):
    args = dict(image_size=8, block_out_channels=(8, 16), norm_num_groups=4, num_train_timesteps=20, num_inference_steps=4)
    args.update(kw)
    return DiffusionModule(**args)


def _batch(n=4):
    x, y = load_digits_images(8)
    return {"image": x[:n], "label": y[:n]}


def test_training_step_is_the_ddpm_epsilon_mse():
    m = tiny()
    batch = _batch()
    torch.manual_seed(3)
    loss = m.training_step(batch, 0)
    torch.manual_seed(3)
    x0 = batch["image"] * 2 - 1
    noise = torch.randn(x0.shape)
    t = torch.randint(0, 20, (4,))
    noisy = m.scheduler.add_noise(x0, noise, t)
    expected = torch.mean((m.unet(noisy, t, class_labels=batch["label"]).sample - noise) ** 2)
    assert torch.equal(loss.detach(), expected.detach())
    # pred_x0 inverts the forward process: with the true noise it is x0
    step = m.last_step
    exact = type(step)(step.x0, step.noise, step.timesteps, step.noisy, step.noise, None, step.alphas_cumprod)
    assert torch.allclose(exact.pred_x0, step.x0, atol=1e-4)


def test_sample_is_seeded_and_batching_invariant_with_per_image_generators():
    m = tiny()
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(5)]  # noqa: E731
    a = m.sample(5, generator=gens(), batch_size=5)
    b = m.sample(5, generator=gens(), batch_size=2)
    assert a.shape == (5, 1, 8, 8) and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.allclose(a, b, atol=1e-5)
    # image 3 alone with its own generator is the same image
    c = m.sample(1, generator=[torch.Generator().manual_seed(103)], labels=[3])
    assert torch.allclose(c[0], a[3], atol=1e-5)
    m.train()
    m.sample(1, generator=torch.Generator().manual_seed(0))
    assert m.unet.training  # mode restored


def test_unconditional_and_label_errors():
    m = tiny(num_classes=None)
    assert m.unet.class_embedding is None
    assert m.sample(2, generator=torch.Generator().manual_seed(0)).shape == (2, 1, 8, 8)
    assert float(m.training_step({"image": _batch()["image"]}, 0)) > 0
    with pytest.raises(ValueError, match="unconditional"):
        m.sample(2, labels=[0, 1])
    c = tiny()
    with pytest.raises(ValueError, match="labels must be in"):
        c.sample(2, labels=[0, 10])
    with pytest.raises(ValueError, match="no labels"):
        c.training_step({"image": _batch()["image"]}, 0)
    with pytest.raises(ValueError, match="norm_num_groups"):
        tiny(block_out_channels=(6, 12))
    with pytest.raises(ValueError, match="num_inference_steps"):
        tiny(num_inference_steps=50)


def test_loss_terms_are_added_and_removable():
    m = tiny()
    batch = _batch()
    torch.manual_seed(0)
    plain = m.training_step(batch, 0)
    handle = m.add_loss_term("plus_one", lambda step: step.model_output.sum() * 0 + 1.0)
    none = m.add_loss_term("nothing", lambda step: None)
    torch.manual_seed(0)
    assert torch.equal(m.training_step(batch, 0).detach(), plain.detach() + 1.0)
    with pytest.raises(ValueError, match="already registered"):
        m.add_loss_term("plus_one", lambda step: None)
    handle.remove()
    none.remove()
    torch.manual_seed(0)
    assert torch.equal(m.training_step(batch, 0).detach(), plain.detach())


def test_digits_datamodule_duplicates_and_split():
    dm = DigitsDataModule(image_size=16, num_train=50, num_val=20, num_duplicated=3, copies=5, seed=1)
    dm.setup("fit")
    assert len(dm.train_set) == 50 + 3 * 4 and len(dm.val_set) == 20
    assert "seed" not in dm.hparams  # a module's own seed must not clash in Lightning's hparams merge
    rows = [int(dm.train_set[i]["index"]) for i in range(len(dm.train_set))]
    assert [rows.count(r) for r in range(3)] == [5, 5, 5] and rows.count(3) == 1
    item = dm.train_set[len(dm.train_set) - 1]
    assert torch.equal(item["image"], dm.train_images[2]) and item["image"].shape == (1, 16, 16)
    # val is disjoint from train (no identical image)
    tr = {dm.train_images[i].numpy().tobytes() for i in range(50)}
    assert not any(dm.val_set[i]["image"].numpy().tobytes() in tr for i in range(20))
    with pytest.raises(ValueError, match="num_duplicated"):
        DigitsDataModule(num_train=2, num_duplicated=3)
    with pytest.raises(ValueError, match="1797"):
        DigitsDataModule(num_train=1700, num_val=200)


def test_digits_features_train_without_touching_global_rng():
    state = torch.get_rng_state()
    f = DigitsFeatures(image_size=8, epochs=3, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert f.accuracy > 0.5  # learnt something in 3 epochs
    assert f(torch.rand(2, 1, 8, 8)).shape == (2, f.num_features)
    g = DigitsFeatures(image_size=8, epochs=3, seed=0)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(f(x), g(x))  # deterministic
