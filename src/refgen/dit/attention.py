"""Exact cross-attention over padded keys without a mask in the fused kernel (NanoDiT's "zpad" / "split").

`cross_attention` is the entry point; the two autograd Functions behind it call SDPA's aten ops directly to
get the kernel's log-sum-exp, so they carry their own backward. `check_compiled_gradients` compares their
gradients under torch.compile with eager ones: a torch release that traces a custom autograd.Function
differently shows up there first, as a named mismatch, instead of as a model that silently stops learning.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

CROSS_ATTENTION_IMPLS = ("mask", "zpad", "split")
LSE_KERNELS = ("auto", "cudnn", "flash", "math")


def _no_autocast(t: torch.Tensor):
    # the by-hand parts below choose their own dtypes (fp32); autocast must not push them back to bf16
    if t.device.type in ("cuda", "cpu"):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def _in_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)`, but x itself (no op at all) when x already has that dtype.

    The Functions below return their forward's output through this. Dynamo traces a no-op `.to()` /
    `.float()` as a new tensor aliasing its input; torch 2.11 then also lifts that input as an extra output of
    the traced forward, the two share one TensorImpl, and the output's gradient is routed to the wrong slot:
    under torch.compile every gradient through the Function was 0 (the fp32 math kernel on the CPU; the real
    bf16 cast on CUDA is a copy and was not affected). `check_compiled_gradients` tests for this class."""
    return x if x.dtype == dtype else x.to(dtype)


def _attn_fwd(q, k, v, scale: float, kernel: str):
    """Unmasked attention (B, H, N, hd) and its natural log-sum-exp (B, H, N) fp32, through the fused kernel
    SDPA itself would run (the aten op), plus what that kernel's backward needs: (out, lse, tensors, ints)."""
    if kernel == "math":
        with _no_autocast(q):
            s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
            lse = torch.logsumexp(s, -1)
            out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.float()).to(q.dtype)
        return out, lse, (), ()
    if kernel == "cudnn":
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
        lse = r[1].reshape(q.shape[:3])                      # cuDNN's is (B, H, N, 1)
        return r[0], lse, (r[6], r[7]), (r[4], r[5])          # philox seed/offset; max_q, max_k
    if kernel == "flash":
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return r[0], r[1], (r[6], r[7]), (r[4], r[5])          # rng_state, unused; max_q, max_k
    raise ValueError(f"unknown attention kernel {kernel!r}")


def _attn_bwd(dout, q, k, v, out, lse, aux_t, aux_i, scale: float, kernel: str):
    """The kernel's backward fed with the FINAL output and log-sum-exp of a larger attention that this one
    is a part of (ring attention's trick): it then computes P = exp(s - lse) as the true probabilities and
    D = rowsum(dout * out) as the true softmax-gradient term, so dq, dk, dv are exactly this part's share."""
    if kernel == "math":
        with _no_autocast(q):
            s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
            p = torch.exp(s - lse.unsqueeze(-1))
            do = dout.float()
            dv = torch.matmul(p.transpose(-1, -2), do)
            ds = p * (torch.matmul(do, v.float().transpose(-1, -2)) - (do * out.float()).sum(-1, keepdim=True))
            dq = torch.matmul(ds, k.float()) * scale
            dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    if kernel == "cudnn":
        g = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.contiguous().unsqueeze(-1), aux_t[0], aux_t[1], None, None, None,
            aux_i[0], aux_i[1], 0.0, False, scale=scale)
    elif kernel == "flash":
        g = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), None, None, aux_i[0], aux_i[1], 0.0, False, aux_t[0], aux_t[1],
            scale=scale)
    else:
        raise ValueError(f"unknown attention kernel {kernel!r}")
    return g[0], g[1], g[2]


class _ZeroPadAttention(torch.autograd.Function):
    """Attention over keys where `n_pad` of them (per sample) are padding that was set to k = v = 0.

    A zero key has logit exactly 0 for every query, so it adds exactly exp(0) = 1 to the softmax denominator
    and nothing to the numerator: with Z the kernel's denominator (lse_k = log Z) and x = n_pad / Z,
        lse = lse_k + log(1 - x),      out = out_k / (1 - x)
    is exactly the attention over the real keys. The backward is the kernel's, fed with that (out, lse): the
    zero keys then contribute nothing to dq (k = 0), and their own dk, dv are discarded by the caller's
    masked_fill. Exact in exact arithmetic; in floating point the correction loses ~log2(1 + n_pad / Z_real)
    bits of the kernel's fp32 denominator (Z_real: the real keys' mass), i.e. nothing unless every real logit
    is far below 0; x is clamped below 1 so even that case stays finite."""

    @staticmethod
    def forward(ctx, q, k, v, n_pad, scale: float, kernel: str):
        out_k, lse_k, aux_t, aux_i = _attn_fwd(q, k, v, scale, kernel)
        with _no_autocast(q):
            x = (n_pad.float().view(-1, 1, 1) * torch.exp(-lse_k)).clamp(max=1.0 - 1e-6)
            corr = torch.log1p(-x)                                      # (B, H, N), <= 0
            lse = lse_k + corr
            out = _in_dtype(out_k.float() * torch.exp(-corr).unsqueeze(-1), out_k.dtype)
        ctx.save_for_backward(q, k, v, out, lse, *aux_t)
        ctx.aux_i, ctx.scale, ctx.kernel = aux_i, scale, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *aux_t = ctx.saved_tensors
        dq, dk, dv = _attn_bwd(dout, q, k, v, out, lse, aux_t, ctx.aux_i, ctx.scale, ctx.kernel)
        return dq, dk, dv, None, None, None


class _SplitAttention(torch.autograd.Function):
    """Attention over [masked keys k2 (small, by hand in fp32) ; always-valid keys k1 (fused kernel, no mask)],
    merged through the two log-sum-exps: lse = logaddexp(lse1, lse2), out = exp(lse1 - lse) out1 + P2 v2 with
    P2 = exp(s2 - lse). Backward: the kernel's with the merged (out, lse) for the k1 part (ring attention), the
    explicit softmax gradient for the k2 part; s2 is recomputed, not stored."""

    @staticmethod
    def forward(ctx, q, k1, v1, k2, v2, valid2, scale: float, kernel: str):
        out1, lse1, aux_t, aux_i = _attn_fwd(q, k1, v1, scale, kernel)
        with _no_autocast(q):
            s2 = _masked_scores(q, k2, valid2, scale)
            lse = torch.logaddexp(lse1, torch.logsumexp(s2, -1))      # an all-padded row: lse2 = -inf, lse = lse1
            p2 = torch.exp(s2 - lse.unsqueeze(-1))
            out = _in_dtype(out1.float() * torch.exp(lse1 - lse).unsqueeze(-1) + torch.matmul(p2, v2.float()),
                            q.dtype)
        ctx.save_for_backward(q, k1, v1, k2, v2, valid2, out, lse, *aux_t)
        ctx.aux_i, ctx.scale, ctx.kernel = aux_i, scale, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k1, v1, k2, v2, valid2, out, lse, *aux_t = ctx.saved_tensors
        scale = ctx.scale
        dq1, dk1, dv1 = _attn_bwd(dout, q, k1, v1, out, lse, aux_t, ctx.aux_i, scale, ctx.kernel)
        with _no_autocast(q):
            p2 = torch.exp(_masked_scores(q, k2, valid2, scale) - lse.unsqueeze(-1))
            do = dout.float()
            dv2 = torch.matmul(p2.transpose(-1, -2), do)
            ds2 = p2 * (torch.matmul(do, v2.float().transpose(-1, -2)) - (do * out.float()).sum(-1, keepdim=True))
            dq = dq1.float() + torch.matmul(ds2, k2.float()) * scale
            dk2 = torch.matmul(ds2.transpose(-1, -2), q.float()) * scale
        return dq.to(q.dtype), dk1, dv1, dk2.to(k2.dtype), dv2.to(v2.dtype), None, None, None


def _masked_scores(q, k, valid, scale: float) -> torch.Tensor:
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale           # (B, H, N, P)
    return s.masked_fill(~valid[:, None, None, :], float("-inf"))


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, *,
                    impl: str = "mask", kernel: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over the keys where `valid` is True. q (B, H, N, hd); k, v (B, H, L, hd);
    valid (B, L) bool. Three exact implementations:

    "mask"  SDPA with the boolean mask (the reference). On the GPU the mask becomes an additive bias inside the
            kernel, and the masked cross-attention runs markedly slower than an unmasked one (docs/dit.md).
    "zpad"  padded keys and values set to 0, ONE unmasked kernel call, then an exact per-row correction of the
            softmax denominator (each zero key adds exp(0) = 1): the speed of an unpadded batch
            (`_ZeroPadAttention`). Needs the kernel's log-sum-exp, so it calls SDPA's aten op directly.
    "split" NanoDiT's context is [text (T), CLS, DINO patches (N)] and only the text is ever padded: the last
            N = q.shape[2] keys (always valid; NOT checked) go through the unmasked kernel, the first L - N by
            hand in fp32, merged by log-sum-exp (`_SplitAttention`). Exact, but the by-hand part writes
            (B, H, N, T+1) fp32 scores forward and backward: by estimate about the mask's own cost (the
            bench's preset mfu40 measures it).

    kernel (zpad/split on CUDA): "cudnn" / "flash" (SDPA's aten ops), "auto" = cudnn; on CPU always "math"
    (the same algorithm in fp32 torch ops, which the tests compare with the reference)."""
    if impl == "mask":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
    if q.device.type == "cpu" or kernel == "math":
        kernel = "math"
    elif kernel == "auto":
        kernel = "cudnn"
    scale = q.shape[-1] ** -0.5
    if impl == "zpad":
        pad = ~valid[:, None, :, None]
        k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
        n_pad = (~valid).sum(1)
        return _ZeroPadAttention.apply(q, k, v, n_pad, scale, kernel)
    if impl == "split":
        P = k.shape[2] - q.shape[2]
        return _SplitAttention.apply(q, k[:, :, P:], v[:, :, P:], k[:, :, :P], v[:, :, :P], valid[:, :P],
                                     scale, kernel)
    raise ValueError(f"unknown cross-attention implementation {impl!r}; choose from {CROSS_ATTENTION_IMPLS}")


def check_compiled_gradients(impl: str, *, backend: str = "aot_eager", kernel: str = "math", device="cpu",
                             dtype: torch.dtype = torch.float32, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Compare `cross_attention(impl, kernel)` compiled by `backend` with eager: output and dq, dk, dv on a
    small batch with a short, an empty and an unpadded text row. Raises AssertionError with torch.testing's
    own mismatch report, prefixed with what differs; returns None when everything matches."""
    if impl not in CROSS_ATTENTION_IMPLS[1:]:
        raise ValueError(f"impl {impl!r}: the self-check is for the custom Functions {CROSS_ATTENTION_IMPLS[1:]}")
    B, H, N, T, hd = 3, 2, 4, 5, 8
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    q, k, v, dout = rnd(B, H, N, hd), rnd(B, H, T + 1 + N, hd), rnd(B, H, T + 1 + N, hd), rnd(B, H, N, hd)
    valid = torch.ones(B, T + 1 + N, dtype=torch.bool)
    valid[0, 2:T] = False
    valid[1, :T] = False
    valid = valid.to(device)

    def f(q, k, v, valid):
        return cross_attention(q, k, v, valid, impl=impl, kernel=kernel)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves, valid)
        grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
        # a gradient that never arrives is a mismatch like any other, not a crash of the check
        return [out.detach()] + [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, grads)]

    eager = run(f)
    compiled = run(torch.compile(f, backend=backend, fullgraph=True, dynamic=False))
    for name, got, want in zip(("out", "dq", "dk", "dv"), compiled, eager):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m, name=name: (
            f"cross_attention(impl={impl!r}, kernel={kernel!r}) under torch.compile(backend={backend!r}) on "
            f"torch {torch.__version__}: {name} differs from eager\n{m}"))
