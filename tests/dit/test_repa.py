"""REPA (refgen.dit.repa, TrainConfig.repa): off leaves training exactly as it was, the gradient reaches the
projector and exactly the blocks up to `depth`, the alignment loss falls, and a checkpoint carries the projector."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from refgen.artifacts import read_jsonl
from refgen.dit.config import RepaConfig, model_preset
from refgen.dit.model import Cond, NanoDiT
from refgen.dit.repa import RepaDiT, build_projector, repa_loss
from refgen.dit.train import load_checkpoint, train

from test_train_loop import synthetic_batches, tiny_cfg   # tests/dit is on sys.path (rootdir-relative import)

ON = RepaConfig(enabled=True, depth=1, weight=0.5, proj_hidden=32)


def _weights(ckpt: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(ckpt)["model"]


def test_off_is_the_old_training_and_weight_zero_changes_no_dit_weight(tmp_path):
    data = synthetic_batches(2)
    off = train(tiny_cfg(tmp_path / "off", steps=3, ckpt_every=3), data)
    ck = load_checkpoint(off["checkpoint"])
    assert "repa" not in ck and "repa_loss" not in read_jsonl(tmp_path / "off" / "metrics.jsonl")[-1]
    # REPA on with weight 0: the projector is built (after the DiT) and trained on nothing; the DiT's steps are
    # the same as without REPA, to the bit (its init, noise and data draws do not depend on REPA)
    zero = train(tiny_cfg(tmp_path / "zero", steps=3, ckpt_every=3, repa=dataclasses.replace(ON, weight=0.0)), data)
    a, b = _weights(off["checkpoint"]), _weights(zero["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])]
    assert "repa" in load_checkpoint(zero["checkpoint"])
    # and with weight > 0 the DiT does change: the test above can fail
    half = train(tiny_cfg(tmp_path / "half", steps=3, ckpt_every=3, repa=ON), data)
    c = _weights(half["checkpoint"])
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


def test_gradient_reaches_the_projector_and_only_the_blocks_up_to_depth():
    cfg = dataclasses.replace(model_preset("tiny"), depth=3)
    torch.manual_seed(0)
    dit = NanoDiT(cfg)
    for blk in dit.blocks:   # adaLN-Zero starts every block as the identity; open the gates so grads flow
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.1)
    repa = RepaDiT(dit, build_projector(dataclasses.replace(ON, depth=2), cfg.hidden_size, cfg.dino_dim), depth=2)
    b = synthetic_batches(1)[0]
    cond = Cond.from_batch(b)
    _, projected = repa(b["latent"], torch.full((4,), 0.5), cond)
    repa_loss(projected, b["dino_patches"], None).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in repa.projector.parameters())
    g = {n: (p.grad.abs().sum() if p.grad is not None else torch.tensor(0.0)) for n, p in dit.named_parameters()}
    assert g["blocks.0.mlp.0.weight"] > 0 and g["blocks.1.mlp.0.weight"] > 0 and g["x_embed.weight"] > 0
    assert g["blocks.2.mlp.0.weight"] == 0 and g["final.linear.weight"] == 0     # after depth: untouched


def test_dino_dropped_selects_samples_and_an_empty_selection_is_zero():
    p = torch.randn(3, 5, 8, requires_grad=True)
    t = torch.randn(3, 5, 8)
    per = (1 - torch.nn.functional.cosine_similarity(p, t, dim=-1)).mean(1)
    assert torch.allclose(repa_loss(p, t, torch.tensor([True, False, True])), (per[0] + per[2]) / 2)
    zero = repa_loss(p, t, torch.zeros(3, dtype=torch.bool))
    zero.backward()
    assert float(zero.detach()) == 0 and p.grad is not None     # still in the graph (DDP needs every rank's projector)


def test_alignment_loss_falls_when_the_target_is_learnable(tmp_path):
    """DINO patches that are a fixed function of the latent patches: a few dozen steps must align with them."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 16, generator=g)   # (C * p * p = 4 * 2 * 2) -> 16-d DINO
    data = synthetic_batches(4)
    for b in data:
        lat = b["latent"]
        B, C, h, w = lat.shape
        patches = lat.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * 4)
        b["dino_patches"] = patches @ W
    cfg = tiny_cfg(tmp_path, steps=60, ckpt_every=60, log_every=10, lr=3e-3,
                   repa=dataclasses.replace(ON, samples="all", weight=1.0))
    train(cfg, data)
    losses = [r["repa_loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert losses[-1] < 0.6 * losses[0], losses


def test_resume_keeps_the_projector_and_refuses_a_repa_mismatch(tmp_path):
    data = synthetic_batches(2)
    train(tiny_cfg(tmp_path, steps=2, ckpt_every=2, repa=ON), data)
    first = load_checkpoint(tmp_path / "checkpoints" / "step_0000002.pt")["repa"]
    train(tiny_cfg(tmp_path, steps=4, ckpt_every=2, repa=ON), data)              # resumes from step 2
    second = load_checkpoint(tmp_path / "checkpoints" / "step_0000004.pt")["repa"]
    assert not all(torch.equal(first[k], second[k]) for k in first)             # it kept training
    with pytest.raises(ValueError, match="trained with repa.enabled True and the config says False"):
        train(tiny_cfg(tmp_path, steps=6, ckpt_every=2), data)


def test_repa_config_is_validated_against_the_model():
    with pytest.raises(ValueError, match=r"repa.depth must be in 1..2"):
        tiny_cfg(Path("/tmp/x"), repa=dataclasses.replace(ON, depth=3)).validate()
    with pytest.raises(ValueError, match="repa.samples"):
        tiny_cfg(Path("/tmp/x"), repa=dataclasses.replace(ON, samples="some")).validate()
    tiny_cfg(Path("/tmp/x"), repa=RepaConfig(depth=99)).validate()               # off: not checked
