"""refgen.moe.augment: opt-in corruption augmentation in training (B4): reproducible draws, the share p, the chosen
types only, clean evaluation, off by default."""

import numpy as np
import pytest
import torch

from refgen.moe import augment
from refgen.moe.corruptions import corrupt
from refgen.moe.train import MoETrainConfig, train

from .conftest import tiny_train_config


def _imgs(n=64, c=1, h=8, w=8, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8))


def test_corrupt_batch_is_reproducible_and_corrupts_about_p():
    x = _imgs(400)
    a = augment.corrupt_batch(x, 0.5, ("gaussian_noise", "contrast"), (1, 3, 5), augment.epoch_rng(3, 1))
    b = augment.corrupt_batch(x, 0.5, ("gaussian_noise", "contrast"), (1, 3, 5), augment.epoch_rng(3, 1))
    c = augment.corrupt_batch(x, 0.5, ("gaussian_noise", "contrast"), (1, 3, 5), augment.epoch_rng(3, 2))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = (a != x).flatten(1).any(1).float().mean().item()
    assert 0.4 < changed < 0.6
    assert torch.equal(augment.corrupt_batch(x, 0.0, ("fog",), (3,), augment.epoch_rng(0, 0)), x)


def test_only_the_chosen_types_and_severities_are_drawn():
    x = _imgs(40, c=1, h=28, w=28)
    out = augment.corrupt_batch(x, 1.0, ("contrast",), (3,), np.random.default_rng(0))
    # contrast draws nothing from the generator: every image equals its contrast@3 version
    for i in range(len(x)):
        want = corrupt(x[i].numpy().transpose(1, 2, 0), "contrast", 3, np.random.default_rng(0))
        assert np.array_equal(out[i].numpy().transpose(1, 2, 0), want)
    mixed = augment.corrupt_batch(x, 1.0, ("contrast",), (3,), np.random.default_rng(0), mix=True)
    assert mixed.dtype == torch.uint8 and not torch.equal(mixed, out)


def test_config_checks_and_default_off():
    assert MoETrainConfig().corrupt_p == 0.0
    with pytest.raises(ValueError, match="corrupt_p"):
        MoETrainConfig(corrupt_p=1.5)
    with pytest.raises(ValueError, match="corrupt_types"):
        MoETrainConfig(corrupt_p=0.5, corrupt_types=["snow"])
    with pytest.raises(ValueError, match="corrupt_severities"):
        MoETrainConfig(corrupt_p=0.5, corrupt_severities=[0])
    cfg = MoETrainConfig.from_yaml("configs/moe_digits_robust.yaml")
    assert cfg.corrupt_p == 0.5 and len(cfg.corrupt_types) == 7 and cfg.corrupt_severities == (1, 2, 3, 4, 5)


def test_training_with_augmentation_is_reproducible_and_differs_from_plain(tmp_path, digits):
    kw = dict(epochs=1, max_steps=6, monitor=False)
    a = train(tiny_train_config(corrupt_p=0.5, **kw), tmp_path / "a", progress=False, data=digits)
    b = train(tiny_train_config(corrupt_p=0.5, **kw), tmp_path / "b", progress=False, data=digits)
    c = train(tiny_train_config(**kw), tmp_path / "c", progress=False, data=digits)
    assert a["metrics"]["test"]["loss"] == b["metrics"]["test"]["loss"]
    assert a["metrics"]["test"]["loss"] != c["metrics"]["test"]["loss"]
    assert a["config"]["corrupt_p"] == 0.5 and c["config"]["corrupt_p"] == 0.0
