"""The localisation loss's pieces on the tiny Qwen-Image transformer and toy-world scenes."""

import math
import random

import numpy as np
import pytest
import torch

from refgen.identity.localize import SlotAttention, localization_loss, token_regions
from refgen.toyworld import world


def test_slot_shares_are_the_blocks_own_joint_attention(pipe, monkeypatch):
    """The shares from the hooks equal those computed from the very query and key tensors each block hands to
    diffusers' attention kernel (text first, then image, RoPE applied), restricted to the slot keys."""
    import diffusers.models.transformers.transformer_qwenimage as qi

    from refgen.identity.qwen_flow import QwenFlowModel

    seen = []
    real = qi.dispatch_attention_fn

    def recording(query, key, *args, **kwargs):
        seen.append((query.detach(), key.detach()))
        return real(query, key, *args, **kwargs)

    monkeypatch.setattr(qi, "dispatch_attention_fn", recording)
    tr = pipe.transformer
    g = torch.Generator().manual_seed(0)
    B, S, L, hw = 2, 9, 2, (8, 8)
    E = torch.randn(B, S, tr.config.joint_attention_dim, generator=g)
    x = torch.randn(B, (hw[0] // 2) * (hw[1] // 2), tr.config.in_channels, generator=g)
    keys = torch.tensor([[[1, 2], [5, 6]], [[3, 4], [6, 7]]])  # (B, 2 slots, L)
    fm = QwenFlowModel(tr, hw)
    with torch.no_grad(), SlotAttention(tr) as cap:
        fm(x, torch.full((B,), 0.6), (E, torch.ones(B, S, dtype=torch.long)))
    got = cap.shares(keys)  # (blocks, B, N, 2)
    assert got.shape == (len(tr.transformer_blocks), B, x.shape[1], 2) and len(seen) == len(tr.transformer_blocks)
    for blk, (q, k) in enumerate(seen):
        qi_, ks = q[:, S:], torch.stack([k[b, keys[b].reshape(-1)] for b in range(B)])  # image queries, slot keys
        logits = torch.einsum("bnhd,bkhd->bhnk", qi_.float(), ks.float()) / math.sqrt(q.shape[-1])
        ref = logits.softmax(-1).unflatten(-1, (2, L)).sum(-1).mean(1)
        torch.testing.assert_close(got[blk], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)))
    with pytest.raises(RuntimeError, match="ran twice inside one SlotAttention"), torch.no_grad(), SlotAttention(tr):
        fm(x, torch.full((B,), 0.6), (E, None))
        fm(x, torch.full((B,), 0.6), (E, None))
    assert not tr.transformer_blocks[0].attn._forward_pre_hooks  # the hooks leave with the context


def test_localization_loss_by_hand():
    shares = torch.tensor([[[[0.8, 0.2], [0.5, 0.5], [0.1, 0.9]],
                            [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]]])  # (1 block, B 2, N 3, G 2)
    regions = torch.tensor([[[1, 1, 0], [0, 0, 1]], [[0, 0, 0], [0, 0, 0]]], dtype=torch.bool)  # (B, G, N)
    got = localization_loss(shares, regions)
    want = ((-math.log(0.8) - math.log(0.5)) / 2 - math.log(0.9)) / 2
    assert got[0].item() == pytest.approx(want) and got[1].item() == 0  # no region, no loss
    one = regions.clone()
    one[0, 1] = False  # only the left person has a region: the mean over groups counts that one
    assert localization_loss(shares, one)[0].item() == pytest.approx((-math.log(0.8) - math.log(0.5)) / 2)
    with pytest.raises(ValueError, match=r"regions \(2, 3, 2\) do not match"):
        localization_loss(shares, regions.transpose(1, 2))


def test_person_masks_and_token_regions_of_a_two_person_scene():
    scene = world.sample_scene(random.Random(3), n_people=2)
    masks = world.person_masks(scene, 64)
    assert masks.shape == (2, 64, 64) and masks.sum((1, 2)).min() > 300
    assert (masks[0] & masks[1]).sum() < 0.05 * masks.sum() and masks[0].any(0).nonzero()[0].mean() < 32 < \
        masks[1].any(0).nonzero()[0].mean()
    full = np.asarray(world.render(scene, 64))
    alone = np.asarray(world._render(scene, 64, scene.people[1:]))  # the left person left out
    assert (np.abs(full.astype(int) - alone).max(-1) > 0).sum() == masks[0].sum()

    r = token_regions(masks, 64, 64, (8, 8))  # (2, 64) in row-major token order
    assert r.shape == (2, 64) and r[0].any() and r[1].any() and not (r[0] & r[1]).any()
    cols = torch.arange(64) % 8
    assert cols[r[0]].float().mean() < 3.5 < cols[r[1]].float().mean()
    # a landscape crop keeps the middle rows, and the people keep their side
    wide = token_regions(masks, 64, 32, (4, 8))
    assert wide.shape == (2, 32) and (torch.arange(32) % 8)[wide[0]].float().mean() < 3.5
    with pytest.raises(ValueError, match="does not split into a 7x8 token grid"):
        token_regions(masks, 64, 64, (8, 7))
    with pytest.raises(ValueError, match="min_cover must be in"):
        token_regions(masks, 64, 64, (8, 8), min_cover=0.01)
