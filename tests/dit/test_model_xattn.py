"""The MFU options of NanoDiT: the unmasked cross-attentions ("zpad", "split") equal the masked
SDPA reference, forward and backward, on CPU in fp32; regional compilation; the clip folded into fused AdamW."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from refgen.dit.config import model_preset
import refgen.dit.attention as attention
from refgen.dit.attention import check_compiled_gradients, cross_attention
from refgen.dit.model import Cond, NanoDiT


def _keys(B=5, H=2, N=6, T=5, hd=8, seed=0, logit_scale=1.0):
    """q (B,H,N,hd); k, v (B,H,L,hd) with L = T + 1 + N (text, CLS, patches) as strided views of one kv tensor,
    like the model's; valid (B, L): a short caption, no text at all, a dropped caption (one token), no
    padding, and every key of the text part padded but one in the middle."""
    g = torch.Generator().manual_seed(seed)
    L = T + 1 + N
    q = (torch.randn(B, N, H, hd, generator=g) * logit_scale).requires_grad_(True)
    kv = torch.randn(B, L, 2, H, hd, generator=g).requires_grad_(True)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[0, 2:T] = False
    valid[1, :T] = False
    valid[2, 1:T] = False
    valid[4, :T] = False
    valid[4, T // 2] = True
    return q, kv, valid, torch.randn(B, H, N, hd, generator=g)


def _run(impl, q, kv, valid, dout, kernel="auto"):
    k, v = kv.unbind(2)
    out = cross_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), valid, impl=impl,
                          kernel=kernel)
    return (out,) + torch.autograd.grad(out, (q, kv), dout)


@pytest.mark.parametrize("impl", ["zpad", "split"])
@pytest.mark.parametrize("logit_scale", [1.0, 4.0])
def test_cross_attention_equals_masked_sdpa(impl, logit_scale):
    q, kv, valid, dout = _keys(logit_scale=logit_scale)
    ref = _run("mask", q, kv, valid, dout)
    got = _run(impl, q, kv, valid, dout)
    for name, a, b in zip(("out", "dq", "dkv"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{impl} {name}: {m}")
    # padded keys get exactly zero gradient, as under the mask
    dkv = got[2]
    assert not dkv[~valid].any()


def test_split_with_every_text_key_padded():
    """split: a row with no valid key at all in the by-hand part (lse2 = -inf) is the DINO part alone."""
    q, kv, valid, dout = _keys()
    valid[:, :6] = False                               # text and CLS of every row
    ref = _run("mask", q, kv, valid, dout)
    got = _run("split", q, kv, valid, dout)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_zpad_stays_finite_when_padding_dominates():
    """Every real logit far below 0 and much padding: the correction is clamped, never inf/nan."""
    q, kv, valid, dout = _keys(N=2, T=40)
    with torch.no_grad():
        kv[:, :, 0] = -q.detach().mean(1, keepdim=True) * 20     # keys anti-aligned with every query
    got = _run("zpad", q, kv, valid, dout)
    assert all(torch.isfinite(x).all() for x in got)


@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
@pytest.mark.parametrize("impl", ["zpad", "split"])
def test_fused_kernel_paths_trace(kernel, impl):
    """The CUDA path (SDPA's aten ops with their log-sum-exp, fed the merged out/lse in backward) on meta
    tensors: argument lists, shapes and dtypes right, forward + backward, eager and traced by torch.compile."""
    B, H, N, T, hd = 2, 4, 16, 7, 64

    def f(q, kv, valid):
        k, v = kv.unbind(2)
        return cross_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), valid, impl=impl,
                               kernel=kernel)

    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=False)):
        torch._dynamo.reset()
        q = torch.empty(B, N, H, hd, device="meta", dtype=torch.bfloat16, requires_grad=True)
        kv = torch.empty(B, T + 1 + N, 2, H, hd, device="meta", dtype=torch.bfloat16, requires_grad=True)
        out = fn(q, kv, torch.ones(B, T + 1 + N, dtype=torch.bool, device="meta"))
        assert out.shape == (B, H, N, hd) and out.dtype == torch.bfloat16
        out.sum().backward()
        assert q.grad.shape == q.shape and kv.grad.shape == kv.shape and kv.grad.dtype == torch.bfloat16
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("impl", ["zpad", "split"])
def test_compiled_gradients_equal_eager(impl, backend):
    """The self-check passes on this torch (it failed on 2.11 before the Functions returned their last op's own
    result: dq, dk, dv all 0 under torch.compile)."""
    check_compiled_gradients(impl, backend=backend)


def test_compiled_gradient_check_reports_a_missing_gradient(monkeypatch):
    """A compiled function whose gradient does not reach v (what the 2.11 tracing bug did to all three) fails
    the check with torch's own mismatch report, naming the gradient."""
    real = torch.compile
    monkeypatch.setattr(attention.torch, "compile",
                        lambda f, **kw: real(lambda q, k, v, valid: f(q, k, v.detach(), valid), **kw))
    with pytest.raises(AssertionError, match=r"(?s)dv differs from eager.*Mismatched elements"):
        check_compiled_gradients("zpad", backend="eager")
    with pytest.raises(ValueError, match="mask"):
        check_compiled_gradients("mask")


# --------------------------------------------------------------------------- the model

def _model():
    torch.manual_seed(0)
    m = NanoDiT(model_preset("tiny"))
    with torch.no_grad():      # give the zero-initialised pieces values, so every input reaches the output
        for p in m.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.2)
    return m


def _cond(B=4, h=8, w=8, T=8, D=16):
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(T).expand(B, T) < torch.tensor([[3], [T], [1], [5]])
    mask[3] = False                                     # no text at all
    return Cond(t5=torch.randn(B, T, D, generator=g), t5_mask=mask, dino_cls=torch.randn(B, D, generator=g),
                dino_patches=torch.randn(B, (h // 2) * (w // 2), D, generator=g)
                ).with_drop(torch.tensor([False, True, False, False]), torch.tensor([False, False, True, False]))


def _loss_and_grads(model, x, s, cond):
    model.zero_grad(set_to_none=True)
    v = model(x, s, cond)
    v.square().mean().backward()
    return v.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("impl", ["zpad", "split"])
def test_model_options_equal_mask(impl):
    """Same weights, same batch: every option gives the reference's velocity and parameter gradients, and the
    option is not part of the state dict (a checkpoint loads under any choice)."""
    ref = _model()
    x, s, cond = torch.randn(4, 4, 8, 8), torch.rand(4), _cond()
    v0, g0 = _loss_and_grads(ref, x, s, cond)
    m = copy.deepcopy(ref).set_attention(impl)
    assert m.state_dict().keys() == ref.state_dict().keys()
    v1, g1 = _loss_and_grads(m, x, s, cond)
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    assert g1["blocks.0.cross_attn.kv.weight"].abs().sum() > 0 and g1["text_proj.weight"].abs().sum() > 0


def test_set_attention_rejects_unknown():
    m = _model()
    with pytest.raises(ValueError):
        m.set_attention("bogus")
    with pytest.raises(ValueError):
        m.set_attention("zpad", kernel="bogus")


@pytest.mark.parametrize("impl", ["zpad", "split"])
def test_options_compile_without_graph_break(impl):
    """Whole model (dynamo only) and per-block (regional) compilation through AOT autograd (the custom backward
    is traced), fullgraph: same velocity and gradients as eager, and all blocks share ONE graph (22 blocks of
    `base` compile once)."""
    from torch._dynamo.utils import counters

    ref = _model().set_attention(impl)
    x, s, cond = torch.randn(4, 4, 8, 8), torch.rand(4), _cond()
    v0, g0 = _loss_and_grads(ref, x, s, cond)
    torch._dynamo.reset()
    try:
        whole = torch.compile(ref, backend="eager", fullgraph=True, dynamic=False)
        blocks = copy.deepcopy(ref)
        blocks.check_padding = False
        blocks.compile_blocks(backend="aot_eager", fullgraph=True, dynamic=False)
        graphs = counters["stats"]["unique_graphs"]
        for m in (blocks, whole):
            v1, g1 = _loss_and_grads(m, x, s, cond)
            g1 = {n.removeprefix("_orig_mod."): g for n, g in g1.items()}
            torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-5)
            for n in g0:
                torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
            if m is blocks:
                assert counters["stats"]["unique_graphs"] - graphs == 1
        assert list(blocks.state_dict()) == list(ref.state_dict())       # no _orig_mod. prefix
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------- the bench's options

@pytest.mark.parametrize("max_norm", [1e-3, 1e3])           # clipping active / inactive
def test_clip_and_step_equals_clip_then_step(max_norm):
    """refgen.dit.train.clip_and_step (the clip folded into fused AdamW's grad_scale) = clip_grad_norm_ then
    step, with a fused AdamW (supported on the CPU too)."""
    from refgen.dit.train import clip_and_step

    a = _model()
    b = copy.deepcopy(a)
    x, s, cond = torch.randn(4, 4, 8, 8), torch.rand(4), _cond()
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, fused=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, fused=True)
    for _ in range(2):
        for m in (a, b):
            m.zero_grad(set_to_none=True)
            m(x, s, cond).square().mean().backward()
        na = torch.nn.utils.clip_grad_norm_(list(a.parameters()), max_norm)
        opt_a.step()
        nb = clip_and_step(opt_b, list(b.parameters()), max_norm)
        torch.testing.assert_close(nb, na)
        assert not hasattr(opt_b, "grad_scale")
        for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")     # fp32 rounding


def test_fused_adamw_honours_grad_scale():
    """The private hook fused_step_dividing_grads relies on: torch's fused AdamW divides every grad by
    `opt.grad_scale`. eps = 1 makes Adam's update depend on the grads' scale, so an ignored grad_scale shows."""
    from refgen.dit.train import fused_step_dividing_grads

    g = torch.randn(50, generator=torch.Generator().manual_seed(0))
    ps = [torch.nn.Parameter(torch.ones(50)) for _ in range(3)]
    opts = [torch.optim.AdamW([p], lr=0.1, eps=1.0, weight_decay=0.0, fused=True) for p in ps]
    for p, grad in zip(ps, (g, g / 4, g)):
        p.grad = grad.clone()
    fused_step_dividing_grads(opts[0], torch.tensor(4.0))
    opts[1].step()                       # the reference: grads divided by hand
    opts[2].step()                       # not divided
    assert not hasattr(opts[0], "grad_scale")
    assert not torch.allclose(ps[2], ps[1]), "the test cannot tell a divided grad from an undivided one"
    torch.testing.assert_close(ps[0].detach(), ps[1].detach(), msg=lambda m: (
        f"torch {torch.__version__}'s fused AdamW no longer divides the grads by opt.grad_scale; "
        f"refgen.dit.train.fused_step_dividing_grads (clip_and_step) must change: {m}"))
    torch.testing.assert_close(ps[0].grad, g / 4)                   # unscaled in place, as GradScaler's grads
    with pytest.raises(ValueError, match="fused"):
        fused_step_dividing_grads(torch.optim.AdamW([ps[0]], fused=False), torch.tensor(2.0))


def test_bench_mfu40_tiny(tmp_path, monkeypatch, bench_module):
    """The preset's rows on the tiny model (CPU, eager): the attention check passes, every exact option trains
    to the same loss as the masked reference, and a failing row is recorded without stopping the run."""
    bench = bench_module("dit_throughput")
    bad = bench.Run("base", 256, 128, "compile-blocks", xattn="bogus")
    monkeypatch.setitem(bench.PRESETS, "mfu40", list(bench.MFU40[:3]) + [bad, bench.MFU40[4]])
    out = tmp_path / "m.json"
    assert bench.main(["--tiny", "--preset", "mfu40", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert all(c.get("ok", True) and "error" not in c for c in d["attention_check"])
    rows = d["results"]
    assert [r["xattn"] for r in rows] == ["mask", "zpad", "zpad", "bogus", "split"]
    assert "error" in rows[3] and "bogus" in rows[3]["error"]
    good = [r for r in rows if "error" not in r]
    assert len(good) == 4 and all(r["mfu"] > 0 for r in good)
    for r in good[1:]:
        assert abs(r["loss"] - good[0]["loss"]) < 1e-5, r["label"]


def test_bench_presets_pin_the_old_base_and_train_runs_tiny(tmp_path, bench_module):
    """Rows measured while `base` was 1024 x 22 keep that shape (their results files say so); the `train`
    preset (the training step with EMA) runs on the tiny model."""
    bench = bench_module("dit_throughput")
    for name in ("sweep", "mfu40", "mfu40b", "mfu40c", "mfu40d", "mfu40e"):
        for r in bench.PRESETS[name]:
            if r.model == "base":
                assert r.hidden and r.depth and r.heads, (name, r)
    assert (1024, 22, 16) in {(r.hidden, r.depth, r.heads) for r in bench.MFU40B}
    assert all(r.ema for r in bench.TRAIN) and {r.model for r in bench.TRAIN} == {"nano", "base"}
    out = tmp_path / "t.json"
    assert bench.main(["--tiny", "--preset", "train", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == len(bench.TRAIN) and all("error" not in r and r["ema"] for r in rows)
