"""NanoDiT on the tiny configuration (2 layers, width 32): shapes, null tokens, gradients, guidance, sizes."""

from __future__ import annotations

import pytest
import torch

from refgen import flow
from refgen.dit.config import model_preset
from refgen.dit.model import Cond, NanoDiT, count_params, forward_flops
from refgen.dit.sample import sample, velocity_fn


def make_cond(B: int, h: int, w: int, T: int = 8, D: int = 16, seed: int = 0, pad: bool = True) -> Cond:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B, 1), generator=g) if pad else torch.full((B, 1), T)
    return Cond(t5=torch.randn(B, T, D, generator=g), t5_mask=torch.arange(T).expand(B, T) < lengths,
                dino_cls=torch.randn(B, D, generator=g),
                dino_patches=torch.randn(B, (h // 2) * (w // 2), D, generator=g))


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = NanoDiT(model_preset("tiny"))
    # give the zero-initialised pieces (adaLN, cross-attention output, final layer, nulls) values, so every
    # input actually reaches the output in these tests
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not p.abs().sum():
                p.normal_(0, 0.2)
    return m.eval()


@pytest.mark.parametrize("hw", [(8, 8), (8, 16), (16, 8)])
def test_shapes_variable_patch_counts(model, hw):
    h, w = hw
    x = torch.randn(3, 4, h, w)
    v = model(x, torch.rand(3), make_cond(3, h, w))
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_patch_count_must_match_token_grid(model):
    cond = make_cond(2, 8, 16)
    with pytest.raises(ValueError, match="token grid"):
        model(torch.randn(2, 4, 8, 8), torch.rand(2), cond)


def test_null_tokens_exactly_where_dropout_says(model):
    B, h, w = 4, 8, 16
    cond = make_cond(B, h, w)
    dt = torch.tensor([True, False, True, False])
    dd = torch.tensor([True, True, False, False])
    t5, mask, cls, patches = model.apply_null(cond.with_drop(dt, dd))
    for i in range(B):
        if dt[i]:   # one null token, everything else masked
            assert torch.equal(t5[i, 0], model.null_text) and not t5[i, 1:].any()
            assert mask[i].tolist() == [True] + [False] * 7
        else:
            assert torch.equal(t5[i], cond.t5[i]) and torch.equal(mask[i], cond.t5_mask[i])
        if dd[i]:   # CLS and every patch (any count) replaced by the nulls
            assert torch.equal(cls[i], model.null_cls)
            assert torch.equal(patches[i], model.null_patch.expand(patches.shape[1], -1))
        else:
            assert torch.equal(cls[i], cond.dino_cls[i]) and torch.equal(patches[i], cond.dino_patches[i])

    # the forward pass applies them per sample: batched with flags == one sample at a time with flags
    x, s = torch.randn(B, 4, h, w), torch.rand(B)
    v = model(x, s, cond.with_drop(dt, dd))
    for i in range(B):
        one = Cond(cond.t5[i:i + 1], cond.t5_mask[i:i + 1], cond.dino_cls[i:i + 1], cond.dino_patches[i:i + 1],
                   dt[i:i + 1], dd[i:i + 1])
        torch.testing.assert_close(v[i:i + 1], model(x[i:i + 1], s[i:i + 1], one), rtol=1e-5, atol=1e-5)
    # and a dropped input really is gone: changing it changes nothing, changing a kept one does
    other = make_cond(B, h, w, seed=1)
    mixed = Cond(other.t5, other.t5_mask, cond.dino_cls, cond.dino_patches, dt, dd)
    v2 = model(x, s, mixed)
    torch.testing.assert_close(v2[0], v[0])                 # text and DINO both dropped
    assert not torch.allclose(v2[1], v[1])                  # text kept -> new text changes the result


def test_null_text_independent_of_padding_length(model):
    x, s = torch.randn(2, 4, 8, 8), torch.rand(2)
    a = make_cond(2, 8, 8, T=4).with_drop(True, True)
    b = make_cond(2, 8, 8, T=12, seed=3).with_drop(True, True)
    torch.testing.assert_close(model(x, s, a), model(x, s, b), rtol=1e-5, atol=1e-5)


def test_gradient_reaches_patch_projection():
    torch.manual_seed(0)
    m = NanoDiT(model_preset("tiny"))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x0 = torch.randn(4, 4, 8, 8)
    cond = make_cond(4, 8, 8)
    dd = torch.tensor([True, False, False, False])
    g = torch.Generator().manual_seed(0)
    # adaLN-Zero: at init only the output layer gets gradient; after a few steps the path through the
    # zero-initialised cross-attention output is open and the DINO patch projection must learn
    for _ in range(4):
        opt.zero_grad()
        loss = flow.loss(m, x0, cond.with_drop(None, dd), sigma=flow.sample_sigmas(4, generator=g),
                         noise=torch.randn(x0.shape, generator=g))
        loss.backward()
        opt.step()
    for name in ("patch_proj.weight", "null_patch", "cls_proj.weight", "null_cls", "text_proj.weight",
                 "blocks.0.cross_attn.kv.weight", "x_embed.weight"):
        grad = dict(m.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_dual_guidance_matches_its_definition(model):
    B, h, w = 2, 8, 8
    cond = make_cond(B, h, w)
    x, s = torch.randn(B, 4, h, w), torch.rand(B)
    v_u = model(x, s, cond.with_drop(True, True))
    v_t = model(x, s, cond.with_drop(False, True))
    v_d = model(x, s, cond.with_drop(True, False))
    v = velocity_fn(model, cond, s_text=3.0, s_dino=1.5)(x, s)
    torch.testing.assert_close(v, v_u + 3.0 * (v_t - v_u) + 1.5 * (v_d - v_u), rtol=1e-4, atol=1e-5)
    # s_text = 1, s_dino = 0 is exactly the text-only prediction
    torch.testing.assert_close(velocity_fn(model, cond, 1.0, 0.0)(x, s), v_t, rtol=1e-4, atol=1e-5)
    lat = sample(model, cond, (h, w), steps=3, s_text=2.0, s_dino=1.0, seed=0)
    assert lat.shape == (B, 4, h, w) and torch.isfinite(lat).all()
    again = sample(model, cond, (h, w), steps=3, s_text=2.0, s_dino=1.0, seed=0)
    assert torch.equal(lat, again)


def test_named_configs_sizes():
    with torch.device("meta"):
        nano, base = NanoDiT(model_preset("nano")), NanoDiT(model_preset("base"))
    assert (nano.cfg.depth, nano.cfg.hidden_size, nano.cfg.num_heads) == (12, 384, 6)
    assert 400e6 <= count_params(base) <= 600e6
    assert base.cfg.hidden_size // base.cfg.num_heads == 128      # the shape docs/benchmarks.md measured
    # FLOPs grow with the token count; a 512^2 image (1024 tokens) costs > 4x a 256^2 one (attention is N^2)
    f256, f512 = forward_flops(base.cfg, 32, 32, 128), forward_flops(base.cfg, 64, 64, 128)
    assert f512 > 4 * f256
    # the matmul part dominates: ~2 FLOPs per parameter per token, plus the attention/context overhead; the
    # adaLN weights (6 d^2 of a block's 22 d^2) act once per sample, not per token
    n_tok = 32 * 32 // 4
    per_tok = count_params(base) - sum(p.numel() for n, p in base.named_parameters() if "adaLN" in n)
    assert 2 * per_tok * n_tok < f256 < 2 * per_tok * n_tok * 1.5


def test_t5_dim_is_configurable():
    m = NanoDiT(model_preset("tiny", t5_dim=40))
    cond = make_cond(2, 8, 8)
    cond.t5 = torch.randn(2, 8, 40)
    assert m(torch.randn(2, 4, 8, 8), torch.rand(2), cond).shape == (2, 4, 8, 8)


def test_no_mask_is_the_all_valid_mask(model):
    """t5_mask=None (no padding, decided by the caller) is exactly an all-True mask, with and without CFG drop,
    and Cond.cat fills a missing mask with True."""
    B, h, w = 3, 8, 8
    full = make_cond(B, h, w, pad=False)
    none = Cond(full.t5, None, full.dino_cls, full.dino_patches)
    x, s = torch.randn(B, 4, h, w), torch.rand(B)
    torch.testing.assert_close(model(x, s, none), model(x, s, full), rtol=0, atol=0)
    dt, dd = torch.tensor([True, False, False]), torch.tensor([False, True, False])
    torch.testing.assert_close(model(x, s, none.with_drop(dt, dd)), model(x, s, full.with_drop(dt, dd)),
                               rtol=0, atol=0)
    padded = make_cond(B, h, w)
    both = Cond.cat([none, padded])
    assert both.t5_mask.shape == (2 * B, 8) and both.t5_mask[:B].all()
    assert torch.equal(both.t5_mask[B:], padded.t5_mask)
    assert Cond.cat([none, none]).t5_mask is None


def test_compiles_as_one_graph(model):
    """No graph break under torch.compile (the padding check is skipped there: a given mask is used as is),
    and the compiled forward / backward equal eager ones."""
    B, h, w = 4, 8, 8
    cond = make_cond(B, h, w).with_drop(torch.tensor([True, False, False, False]), None)
    x, s = torch.randn(B, 4, h, w), torch.rand(B)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
        for c in (cond, Cond(cond.t5, None, cond.dino_cls, cond.dino_patches),
                  Cond(cond.t5, torch.ones_like(cond.t5_mask), cond.dino_cls, cond.dino_patches)):
            torch.testing.assert_close(compiled(x, s, c), model(x, s, c), rtol=1e-5, atol=1e-6)
        x.requires_grad_(True)
        compiled(x, s, cond).square().mean().backward()
        g = x.grad.clone()
        x.grad = None
        model(x, s, cond).square().mean().backward()
        torch.testing.assert_close(g, x.grad, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()
