"""NanoDiT training throughput and MFU (the tables of docs/benchmarks.md, *DiT system*).

Builds `nano` and `base` with random weights on CUDA and times full training steps (forward + backward +
grad clipping + fused AdamW, fp32 master weights under bf16 autocast; `--preset train`: also the EMA update and
clip folded into AdamW, i.e. exactly the step `refgen dit train --config configs/dit_base.yaml` runs) on
random latents and random conditioning, at 256^2 and 512^2 images (16-channel latents of 32^2 / 64^2; 256 / 1024
image tokens). Conditioning: no text padding, 10% of the samples with text and DINO dropped (as in training, so
the cross-attention carries a key mask; `--no-drop` measures the unmasked path).

MFU = images/s x training FLOPs per image / peak. Training FLOPs per image = 3 x the analytic forward count
(`refgen.dit.model.forward_flops`: every matmul and the attention products, 2 FLOPs per multiply-add). Peak =
989 TFLOP/s, the H100 SXM's dense bf16 figure. Every option below keeps the same model FLOPs and the same count.

Modes: `eager`; `compile` = `torch.compile(model, dynamic=False)` (default inductor mode; every row compiles
afresh, its warm-up time is reported); `compile-blocks` = regional compilation (`NanoDiT.compile_blocks`: each
DiT block compiled in place, all 22 share one graph, so it compiles in ~1/10 of the time);
`compile-blocks-max` = the same with mode="max-autotune-no-cudagraphs" (Triton GEMM templates with fused
epilogues; slow to compile). `--sdpa cudnn` puts cuDNN attention first in SDPA's priority order. `--profile`
adds, per row, the GPU time of 3 profiled steps split into GEMM / attention / optimizer / other kernels.

Options per row (preset `mfu40`): `xattn` = how the cross-attention handles padded text keys
(`refgen.dit.model.cross_attention`: "mask" = SDPA with a boolean mask, the reference; "zpad" = padded keys
zeroed, one unmasked kernel, exact softmax correction; "split" = text part by hand, DINO part unmasked, merged by
log-sum-exp), `kernel` = the fused kernel zpad/split call (cudnn | flash), `opt` = "clip" (clip_grad_norm_ then
fused AdamW) or "clip-in-adam" (the same clip folded into fused AdamW's grad_scale: one pass over the grads
less), `heads` = a num_heads override (an ARCHITECTURE change, not an exact option: 8 heads = head dim 128).
Before the rows, `mfu40` checks every exact option against an fp32 reference on one attention of `base`'s shape
(bf16; the masked SDPA's own error is the yardstick). A row that fails (compile error, OOM) is recorded with its
error and the run goes on; later rows of the same failing attention option are not retried.

    python bench/dit_throughput.py --preset train --out t.json            # the training-step table
    python bench/dit_throughput.py --out bench_dit.json                   # the full grid, on an H100
    python bench/dit_throughput.py --preset sweep --profile --out s.json  # base: eager vs compile, batches (<8 min)
    python bench/dit_throughput.py --preset mfu40 --profile --out m.json   # base 256^2 b128, < 4 min
    python bench/dit_throughput.py --tiny --out /tmp/t.json               # CPU smoke test, seconds
    python bench/dit_throughput.py --tiny --preset mfu40 --out /tmp/t.json   # every mfu40 option, tiny, CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import NamedTuple

import torch

from refgen.artifacts import atomic_write_json, provenance
from refgen.runtime import H100_BF16_DENSE
from refgen.dit.config import model_preset
from refgen.dit.model import Cond, NanoDiT, count_params, cross_attention, forward_flops
from refgen.dit.train import clip_and_step, ema_update
from refgen import flow

DEFAULT_BATCH = {("nano", 256): 128, ("nano", 512): 32, ("base", 256): 64, ("base", 512): 16}


class Run(NamedTuple):     # (a NamedTuple: the tests load this file without registering a module)
    model: str
    px: int
    batch: int
    mode: str = "eager"          # eager | compile | compile-blocks | compile-blocks-max
    sdpa: str = "default"        # default | cudnn
    drop: bool = True            # 10% CFG drop (a key mask in the cross-attention)
    xattn: str = "mask"          # mask | zpad | split (NanoDiT.set_attention)
    kernel: str = "auto"         # fused kernel of zpad / split: auto (cudnn on sm90+) | cudnn | flash
    opt: str = "clip"            # clip | clip-in-adam
    heads: int = 0               # num_heads override (0 = the preset's); an architecture change
    hidden: int = 0              # hidden_size override (0 = the preset's); an architecture change
    depth: int = 0               # depth override (0 = the preset's); an architecture change
    ema: bool = False            # + the EMA update of refgen.dit.train (one lerp over the fp32 weights per step)
    accum: int = 1               # micro batches per optimizer step (gradient accumulation; effective batch
                                 # = batch x accum, as TrainConfig.effective_batch / batch_size)
    ind: str = ""                # inductor knobs, comma separated (INDUCTOR_KNOBS); no effect on the math


# Rows in priority order: the sweep stops starting rows once its time budget would be exceeded.
SWEEP = [
    Run("base", 256, 64, "eager"),                      # the documented baseline (18.3%)
    Run("base", 256, 64, "eager", drop=False),          # unmasked cross-attention: flash instead of mem-efficient
    Run("base", 256, 128, "eager"),                     # batch effect alone
    Run("base", 512, 32, "eager"),
    Run("base", 256, 64, "eager", sdpa="cudnn"),        # cuDNN attention first (it takes the mask)
    Run("base", 256, 128, "compile"),
    Run("base", 512, 32, "compile"),
    Run("base", 256, 64, "compile"),                    # same batch as the eager baseline
    Run("base", 256, 256, "compile"),
    Run("base", 256, 128, "compile", sdpa="cudnn"),
    Run("base", 512, 64, "compile"),
]

# The MFU >= 40 % search for base on one H100: before (masked SDPA) vs each option, base 256^2 batch 128.
MFU40 = [
    Run("base", 256, 128, "compile-blocks"),                                        # before: masked SDPA
    Run("base", 256, 128, "compile-blocks", xattn="zpad"),                          # exact, no mask
    Run("base", 256, 128, "compile-blocks", xattn="zpad", opt="clip-in-adam"),      # + clip folded into AdamW
    Run("base", 256, 128, "compile-blocks", xattn="zpad", opt="clip-in-adam", heads=8),   # ARCH: head dim 128
    Run("base", 256, 128, "compile-blocks", xattn="split"),                         # exact, text part by hand
    Run("base", 256, 128, "compile-blocks", xattn="zpad", kernel="flash"),          # zpad through FA2
    Run("base", 256, 128, "compile-blocks", drop=False),                            # control: no mask at all
    Run("base", 256, 128, "compile", xattn="zpad", opt="clip-in-adam"),             # whole-model compile
    Run("base", 256, 128, "compile"),                                               # the documented 35.3%
    Run("base", 256, 128, "compile-blocks-max", xattn="zpad", opt="clip-in-adam"),  # GEMM epilogue fusion
]

# Second round of that search: the best exact row of the first (zpad + clip-in-adam) against each
# untried knob alone; cheap rows first (the blocks' graph is cached after the first row).
_B = Run("base", 256, 128, "compile-blocks", xattn="zpad", opt="clip-in-adam")
MFU40B = [
    _B,                                                  # reference (docs/benchmarks.md gives its MFU)
    _B._replace(accum=2),                                # effective batch 256 = 128 x 2 micro steps
    _B._replace(kernel="flash", sdpa="flash"),           # FA2 for both attentions instead of cuDNN
    _B._replace(ind="cdt"),                              # coordinate-descent tuning of the Triton kernels
    _B._replace(mode="compile-blocks-max"),              # Triton GEMM templates, epilogue fusion
    _B._replace(mode="compile"),                         # whole model: fuses what lies between the blocks
]

# Third round: mfu40b measured accum=2 (34.4 %) and FA2 (35.1 %) as losses, coordinate-descent tuning (37.1 %)
# and whole-model compile (37.1 %) as gains. Here: 512^2 with the best exact options, and the two gains combined.
MFU40C = [
    _B._replace(px=512, batch=32),                               # 512^2: 1024 tokens, same tokens per step
    _B._replace(mode="compile", ind="cdt"),                      # whole model + coordinate descent, 256^2
    _B._replace(px=512, batch=32, mode="compile"),               # whole model, 512^2
]

# Fourth round: the profile of mfu40b/c says the step is GEMMs (~104 ms, already ~740 TFLOP/s) plus work that
# scales with the activation bytes (fused elementwise/norm ~65 ms, attention at head dim 64 ~38 ms). At a fixed
# parameter count (22 d^2 per block), GEMM FLOPs stay put while those bytes go as depth x d ~ 1/d, so a wider,
# shallower `base` of the same size spends a larger share of its step in GEMMs. ARCHITECTURE rows, head dim 64.
MFU40D = [
    _B,                                                  # 1024 x 22 (the old `base`), today's machine
    _B._replace(hidden=1152, depth=18, heads=18),        # DiT-XL's width, 534M
    _B._replace(hidden=1280, depth=14, heads=20),        # 514M, the same size as 1024 x 22
    _B._replace(hidden=1536, depth=10, heads=24),        # 532M
    _B._replace(hidden=1280, depth=14, heads=10),        # 1280 x 14 at head dim 128
    _B._replace(hidden=1280, depth=14, heads=20, mode="compile"),
    _B._replace(hidden=1280, depth=14, heads=20, px=512, batch=32),
]

# Fifth round: mfu40d measured width as the lever (1024x22 35.9 %, 1280x14 38.4 %, 1536x10 41.8 %) and head dim
# 128 as a gain at 1280 (39.4 %; at 1024 in round one it had been a loss). Here: head dim 128 at each width, with
# the whole-model compile and coordinate descent that each gave ~0.5 point at the old shape, and 512^2.
_W = _B._replace(hidden=1280, depth=14, heads=10)
MFU40E = [
    _W._replace(mode="compile"),                         # 1280 x 14, head dim 128, whole model
    _B._replace(hidden=1536, depth=10, heads=12),        # 1536 x 10, head dim 128
    _B._replace(hidden=1408, depth=12, heads=11),        # 1408 x 12, head dim 128, 535M
    _W._replace(px=512, batch=32),
    _B._replace(hidden=1536, depth=10, heads=12, px=512, batch=32),
    _W._replace(ind="cdt"),                              # slow to compile: last
]

# mfu40e chose the new `base` (NanoDiTConfig preset): 1536 x 10, 12 heads of 128 (42.7 % per-block compile).
# Rounds one to five ran while `base` meant 1024 x 22 x 16 heads; their rows are pinned to that shape here, so
# re-running a preset measures what its results file (docs/results/dit_*_h100.json) reports.
OLD_BASE = {"hidden": 1024, "depth": 22, "heads": 16}


def _old(rows: list[Run]) -> list[Run]:
    return [r._replace(**{k: getattr(r, k) or v for k, v in OLD_BASE.items()}) if r.model == "base" else r
            for r in rows]


SWEEP, MFU40, MFU40B, MFU40C, MFU40D, MFU40E = map(_old, (SWEEP, MFU40, MFU40B, MFU40C, MFU40D, MFU40E))

# The throughput table: the step `refgen dit train` runs with configs/dit_base.yaml (per-block compile, zpad
# cross-attention, clip folded into fused AdamW, EMA update), nano and base at both sizes; then the same step
# eager, with a whole-model compile, and on the old 1024 x 22 base.
_T = Run("base", 256, 128, "compile-blocks", xattn="zpad", opt="clip-in-adam", ema=True)
TRAIN = [
    _T,
    _T._replace(px=512, batch=32),
    _T._replace(model="nano"),
    _T._replace(model="nano", px=512, batch=32),
    _T._replace(**OLD_BASE),
    _T._replace(mode="compile"),
    _T._replace(mode="eager"),
]

PRESETS = {"sweep": SWEEP, "mfu40": MFU40, "mfu40b": MFU40B, "mfu40c": MFU40C, "mfu40d": MFU40D,
           "mfu40e": MFU40E, "train": TRAIN}
DEFAULT_BUDGET_S = {"sweep": 400.0, "mfu40": 180.0, "mfu40b": 500.0, "mfu40c": 500.0, "mfu40d": 500.0,
                    "mfu40e": 500.0, "train": 500.0}
# the attention check before a preset's rows (exactness of zpad/split at the head dim the rows use)
CHECK = {"mfu40": {}, "mfu40e": {"H": 10, "hd": 128}}

# torch._inductor.config settings per knob name (Run.ind): code generation only, the model's math is unchanged
INDUCTOR_KNOBS = {
    "cdt": {"coordinate_descent_tuning": True},          # tune each Triton kernel's block sizes by benchmark
    "agg": {"aggressive_fusion": True},                  # fuse kernels even without shared reads
    "pw": {"max_autotune_pointwise": True},              # autotune pointwise/reduction configs
}


def _inductor_patch(ind: str) -> dict:
    out: dict = {}
    for k in filter(None, ind.split(",")):
        if k not in INDUCTOR_KNOBS:
            raise ValueError(f"unknown inductor knob {k!r}; choose from {sorted(INDUCTOR_KNOBS)}")
        out.update(INDUCTOR_KNOBS[k])
    return out
# seconds a row takes before one of its mode was measured (compile: cold caches)
EST_S = {"eager": 20.0, "compile": 150.0, "compile-blocks": 60.0, "compile-blocks-max": 240.0}


def _sdpa_ctx(sdpa: str):
    if sdpa == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[sdpa]
    order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                   SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != first]
    return sdpa_kernel(order, set_priority=True)


def _kernel_class(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "attn", "sdpa", "cudnn_generated")):
        return "attention"
    if any(k in n for k in ("adam", "multi_tensor", "foreach")):
        return "optimizer+clip"
    if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "sm80_", "splitk")):
        return "gemm"
    if n.startswith("triton"):
        return "triton (fused elementwise/norm)"
    return "other (aten elementwise/norm/copy)"


def profile_steps(step, n: int = 3, top: int = 8, top_per_class: int = 0) -> dict:
    """GPU kernel time of `n` steps by class, and the top kernels (ms per step); with top_per_class, also the
    top kernels of each class with their call counts per step (what the class is made of)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    by_class: dict[str, float] = {}
    by_name: dict[str, float] = {}
    calls: dict[str, int] = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if e.name.startswith(("Optimizer.", "ProfilerStep")):
            # a user annotation mirrored on the GPU timeline (it spans kernels counted on their own): up to
            # docs/results/dit_mfu40b_h100.json it was summed into optimizer+clip (+6.3 ms per step for base)
            continue
        us = e.time_range.elapsed_us()
        by_class[_kernel_class(e.name)] = by_class.get(_kernel_class(e.name), 0.0) + us
        by_name[e.name] = by_name.get(e.name, 0.0) + us
        calls[e.name] = calls.get(e.name, 0) + 1
    total = sum(by_class.values())
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])
    out = {"gpu_ms_per_step": total / n / 1e3,
           "by_class_ms": {k: v / n / 1e3 for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
           "top_kernels_ms": [(k[:90], v / n / 1e3) for k, v in ranked[:top]]}
    if top_per_class:
        out["top_by_class"] = {c: [(k[:110], round(v / n / 1e3, 3), calls[k] / n) for k, v in ranked
                                   if _kernel_class(k) == c][:top_per_class] for c in by_class}
    return out


def _label(run: Run) -> str:
    lab = run.mode + ("" if run.sdpa == "default" else "+" + run.sdpa)
    if run.xattn != "mask":
        lab += f" {run.xattn}" + ("" if run.kernel == "auto" else f"[{run.kernel}]")
    if run.opt != "clip":
        lab += f" {run.opt}"
    if run.hidden or run.depth:
        lab += f" d={run.hidden or '-'}xL={run.depth or '-'}"
    if run.heads:
        lab += f" heads={run.heads}"
    if run.accum != 1:
        lab += f" accum={run.accum}"
    if run.ind:
        lab += f" ind={run.ind}"
    if run.ema:
        lab += " +ema"
    if not run.drop:
        lab += " nodrop"
    return lab


def bench_one(run: Run, **kw) -> dict:
    """One row under its inductor knobs (`Run.ind`), see `_bench_one`."""
    patch = _inductor_patch(run.ind)
    if not patch:
        return _bench_one(run, **kw)
    import torch._inductor.config as inductor_config

    with inductor_config.patch(patch):
        return _bench_one(run, **kw)


def _bench_one(run: Run, *, device: torch.device, text_len: int, steps: int, warmup: int, peak: float,
               profile: bool = False, top_per_class: int = 0) -> dict:
    arch = {k: v for k, v in (("num_heads", run.heads), ("hidden_size", run.hidden), ("depth", run.depth)) if v}
    cfg = model_preset(run.model, **arch)
    batch, vae_down = run.batch, 8
    h = w = run.px // vae_down
    compiled = run.mode != "eager"
    torch.manual_seed(0)
    if compiled:
        torch._dynamo.reset()     # a fresh compile per row (no shape state carried over from the previous row)
    with torch.device(device):              # initialised on the device: seconds saved for `base`
        model = NanoDiT(cfg)
    model.set_attention(run.xattn, run.kernel)
    train_model = model
    if run.mode == "compile":
        train_model = torch.compile(model, dynamic=False)
    elif run.mode in ("compile-blocks", "compile-blocks-max"):
        model.check_padding = False         # as under a whole-model compile: no host sync on the mask
        kw = {"mode": "max-autotune-no-cudagraphs"} if run.mode == "compile-blocks-max" else {}
        model.compile_blocks(dynamic=False, **kw)
    elif run.mode != "eager":
        raise ValueError(f"unknown mode {run.mode!r}")
    if run.opt not in ("clip", "clip-in-adam"):
        raise ValueError(f"unknown optimizer option {run.opt!r}")
    if run.accum < 1:
        raise ValueError(f"accum must be >= 1, got {run.accum}")
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    ema = None
    if run.ema:
        with torch.device(device):
            ema = NanoDiT(cfg).requires_grad_(False)
    N = (h // cfg.patch_size) * (w // cfg.patch_size)
    x0 = torch.randn(batch, cfg.latent_channels, h, w, device=device)
    # no text padding: t5_mask None (decided here, on the host). The CFG drop still masks the dropped captions.
    cond = Cond(t5=torch.randn(batch, text_len, cfg.t5_dim, device=device), t5_mask=None,
                dino_cls=torch.randn(batch, cfg.dino_dim, device=device),
                dino_patches=torch.randn(batch, N, cfg.dino_dim, device=device))
    if run.drop:
        drop = torch.arange(batch, device=device) % 10 == 0      # 10%, and at least one sample
        cond = cond.with_drop(drop, drop)
    amp = device.type == "cuda"

    def step():
        # one optimizer step = `accum` micro batches of `batch` (as refgen.dit.train: loss / accum per micro)
        for _ in range(run.accum):
            sigma = flow.sample_sigmas(batch, "logit_normal", device=device)
            noise = torch.randn_like(x0)
            with _sdpa_ctx(run.sdpa), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = flow.loss(train_model, x0, cond, sigma=sigma, noise=noise)
            (loss / run.accum if run.accum > 1 else loss).backward()
        if run.opt == "clip-in-adam":
            clip_and_step(opt, params, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        if ema is not None:
            ema_update(ema, model, 0.9999)
        opt.zero_grad(set_to_none=True)
        return loss

    from torch._dynamo.utils import counters
    graphs0 = counters["stats"]["unique_graphs"]
    breaks0 = sum(counters["graph_break"].values())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_first = time.perf_counter()
    step()
    sync()
    t_first = time.perf_counter() - t_first           # compile (if any) + one step
    t_warm = time.perf_counter()
    for _ in range(max(0, warmup - 1)):
        step()
    sync()
    t_warm = t_first + time.perf_counter() - t_warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    fwd = forward_flops(cfg, h, w, text_len)
    ips = batch * run.accum / dt
    rec = {"model": run.model, "params_M": round(count_params(model) / 1e6, 1), "image_px": run.px,
           "latent": [cfg.latent_channels, h, w], "tokens": N, "text_len": text_len, "batch": batch,
           "mode": run.mode, "compile": compiled, "sdpa": run.sdpa, "cfg_drop": run.drop,
           "xattn": run.xattn, "kernel": run.kernel, "opt": run.opt, "num_heads": cfg.num_heads,
           "hidden_size": cfg.hidden_size, "depth": cfg.depth,
           "accum": run.accum, "ema": run.ema, "inductor": _inductor_patch(run.ind), "label": _label(run),
           "step_s": dt, "images_per_s": ips,
           "train_gflop_per_image": 3 * fwd / 1e9, "achieved_tflops": ips * 3 * fwd / 1e12,
           "mfu": ips * 3 * fwd / peak, "first_step_s": t_first, "warmup_s": t_warm,
           "loss": float(loss.detach())}
    if compiled:
        rec["dynamo_graphs"] = counters["stats"]["unique_graphs"] - graphs0
        rec["graph_breaks"] = sum(counters["graph_break"].values()) - breaks0
    if device.type == "cuda":
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if profile:
            rec["profile"] = profile_steps(step, top_per_class=top_per_class)
    del model, train_model, opt, params, ema
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def check_attention(device: torch.device, *, B: int = 4, H: int = 16, N: int = 256, T: int = 128, hd: int = 64,
                    dtype: torch.dtype = torch.bfloat16,
                    options=(("zpad", "cudnn"), ("zpad", "flash"), ("split", "cudnn"), ("split", "flash"))) -> list:
    """Each exact cross-attention option vs an fp32 reference (masked SDPA on the same rounded inputs), on one
    attention of NanoDiT's shape: keys [text (T), CLS, patches (N)], rows with some padding, no text at all,
    a dropped caption (one valid token) and no padding. Error = max |x - ref| / max |ref| for the output and
    dq, dk, dv (grads w.r.t. the keys/values BEFORE any zeroing, as in the model). The masked SDPA in `dtype`
    is the yardstick ("mask" row): an option is as exact as the reference when its errors are of that size."""
    g = torch.Generator(device=device).manual_seed(0)
    L = T + 1 + N
    q0 = torch.randn(B, N, H, hd, generator=g, device=device).to(dtype)
    kv0 = torch.randn(B, L, 2, H, hd, generator=g, device=device).to(dtype)
    dout = torch.randn(B, H, N, hd, generator=g, device=device).to(dtype)
    valid = torch.ones(B, L, dtype=torch.bool, device=device)
    valid[0, T // 6:T] = False           # a short caption
    valid[1, :T] = False                 # no text at all
    valid[2, 1:T] = False                # dropped caption: the null token only

    def run(impl, kernel, dt):
        q = q0.to(dt).requires_grad_(True)
        kv = kv0.to(dt).requires_grad_(True)
        k, v = kv.unbind(2)
        out = cross_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), valid, impl=impl,
                              kernel=kernel)
        dq, dkv = torch.autograd.grad(out, (q, kv), dout.to(dt))
        return {"out": out.detach().transpose(1, 2), "dq": dq, "dk": dkv[:, :, 0], "dv": dkv[:, :, 1]}

    ref = {k: v.float() for k, v in run("mask", "math", torch.float32).items()}
    rows = []
    for impl, kernel in (("mask", "sdpa"),) + tuple(options):
        r = {"xattn": impl, "kernel": kernel, "dtype": str(dtype).replace("torch.", "")}
        try:
            got = run(impl, kernel, dtype)
            for name, x in got.items():
                r[f"err_{name}"] = float((x.float() - ref[name]).abs().max() / ref[name].abs().max())
            r["finite"] = bool(all(torch.isfinite(x).all() for x in got.values()))
        except Exception as e:  # noqa: BLE001 - report, do not stop the benchmark
            r["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(r)
    base = max(v for k, v in rows[0].items() if k.startswith("err_")) if "error" not in rows[0] else None
    for r in rows[1:]:
        if "error" not in r and base is not None:
            worst = max(v for k, v in r.items() if k.startswith("err_"))
            r["ok"] = bool(r["finite"] and worst <= 2 * base + 1e-6)
    return rows


def _fmt_check(r: dict) -> str:
    if "error" in r:
        return f"  {r['xattn']:6} {r['kernel']:6} ERROR {r['error'][:90]}"
    errs = " ".join(f"{k[4:]} {r[k]:.1e}" for k in ("err_out", "err_dq", "err_dk", "err_dv"))
    return f"  {r['xattn']:6} {r['kernel']:6} {errs}" + ("" if "ok" not in r else ("  ok" if r["ok"] else "  CHECK"))


def _fmt_row(r: dict) -> str:
    lab = r.get("label") or (r["mode"] + ("" if r.get("sdpa", "default") == "default" else "+" + r["sdpa"])
                             + ("" if r.get("cfg_drop", True) else " nodrop"))
    if "error" in r:
        return f"{r['model']:6} {'':8} {r['image_px']:5} {'':5} {r['batch']:5} {lab:>40}  {r['error'][:90]}"
    mem = f"{r['peak_mem_gib']:7.1f}" if "peak_mem_gib" in r else f"{'-':>7}"
    return (f"{r['model']:6} {r['params_M']:7.1f}M {r['image_px']:5} {r['tokens']:5} {r['batch']:5} {lab:>40} "
            f"{r['images_per_s']:9.1f} {r['train_gflop_per_image']:10.1f} {r['achieved_tflops']:8.1f} "
            f"{100 * r['mfu']:5.1f}% {mem} {r['first_step_s']:8.1f} {r['loss']:8.4f}")


HEADER = (f"{'model':6} {'params':>8} {'px':>5} {'tok':>5} {'batch':>5} {'mode / options':>40} {'img/s':>9} "
          f"{'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>6} {'memGiB':>7} {'first_s':>8} {'loss':>8}")


def _tiny(run: Run, batch: int | None) -> Run:
    """A preset row on the tiny model, eager, CPU: the same options, seconds instead of minutes."""
    return run._replace(model="tiny", px=64, batch=batch or 2, mode="eager", heads=0, hidden=0, depth=0)


def _error_row(run: Run, msg: str) -> dict:
    return {"model": run.model, "image_px": run.px, "batch": run.batch, "mode": run.mode, "sdpa": run.sdpa,
            "cfg_drop": run.drop, "xattn": run.xattn, "kernel": run.kernel, "opt": run.opt,
            "num_heads": run.heads or None, "hidden_size": run.hidden or None,
            "depth": run.depth or None, "accum": run.accum, "ind": run.ind, "label": _label(run),
            "error": msg[:300]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON results (rewritten after every row)")
    ap.add_argument("--preset", choices=["grid", "sweep", *PRESETS], default="grid",
                    help="grid: --models x --px x --modes; sweep: base, eager vs compile, batch sizes, SDPA "
                         "backends; mfu40: base 256^2 b128, masked SDPA vs each MFU option; mfu40b: the best of mfu40 vs "
                         "each untried knob (fixed rows, priority order, stops at --budget-s)")
    ap.add_argument("--rows", help="sweep/mfu40: only these rows of the preset (1-based, comma separated)")
    ap.add_argument("--models", default="nano,base")
    ap.add_argument("--px", default="256,512", help="image sizes (latents are /8)")
    ap.add_argument("--batch", type=int, help="per-step batch for every run (default: per model/size table)")
    ap.add_argument("--text-len", type=int, default=128, help="T5 tokens (padded to the longest caption)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="steps before timing (the first one compiles)")
    ap.add_argument("--modes", default="eager,compile", help="grid preset: eager, compile, compile-blocks, "
                                                             "compile-blocks-max")
    ap.add_argument("--sdpa", default="default", choices=["default", "cudnn", "flash", "efficient"],
                    help="SDPA backend put first in the priority order (grid preset)")
    ap.add_argument("--xattn", default="mask", choices=["mask", "zpad", "split"],
                    help="cross-attention with padded keys (grid preset)")
    ap.add_argument("--opt", default="clip", choices=["clip", "clip-in-adam"], help="grid preset")
    ap.add_argument("--no-drop", action="store_true", help="no CFG drop: no attention mask at all (grid preset)")
    ap.add_argument("--profile", action="store_true", help="per row: GPU time by kernel class over 3 steps")
    ap.add_argument("--top-per-class", type=int, default=0,
                    help="with --profile: also list each class's top N kernels (name, ms/step, calls/step)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="do not start a row that would likely end after this many seconds from the start "
                         "(sweep: 400, mfu40: 180 by default)")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE / 1e12)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: the tiny model, one step (with "
                                                        "--preset mfu40: every option of the preset, eager)")
    a = ap.parse_args(argv)

    t_start = time.perf_counter()
    budget = float("inf")
    preset_rows = None
    if a.preset in PRESETS:
        preset_rows = list(PRESETS[a.preset])
        if a.rows:
            preset_rows = [preset_rows[int(i) - 1] for i in a.rows.split(",")]
    if a.tiny:
        device = torch.device("cpu")
        runs = ([_tiny(r, a.batch) for r in preset_rows] if a.preset not in ("grid", "sweep")
                else [Run("tiny", 64, a.batch or 2, xattn=a.xattn, opt=a.opt)])
        a.steps, a.warmup, a.text_len = 1, 1, 8
    else:
        from refgen.runtime import resolve_device

        device = resolve_device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if preset_rows is not None:
            runs = preset_rows
            budget = a.budget_s if a.budget_s is not None else DEFAULT_BUDGET_S[a.preset]
        else:
            runs = [Run(m, px, a.batch or DEFAULT_BATCH.get((m, px), 16), mode, a.sdpa, not a.no_drop,
                        xattn=a.xattn, opt=a.opt)
                    for mode in a.modes.split(",") for m in a.models.split(",")
                    for px in map(int, a.px.split(","))]
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results: list[dict] = []
    checks: list[dict] = []
    est = dict(EST_S)                      # seconds a row takes: a guess, then the last one measured
    failed: dict[tuple, str] = {}          # (xattn, kernel) -> error: later rows with it are not retried

    def save():
        atomic_write_json(a.out, provenance(None, device=dev_name, peak_tflops=a.peak_tflops, results=results,
                                            attention_check=checks, torch=torch.__version__,
                                            argv=sys.argv[1:] if argv is None else argv))

    if a.preset in CHECK:
        print("attention check (error vs fp32 reference, max|x - ref| / max|ref|):", flush=True)
        checks.extend(check_attention(device, **({"B": 3, "H": 2, "N": 16, "T": 8, "hd": 16, "dtype": torch.float32}
                                                 if a.tiny else CHECK[a.preset])))
        for r in checks:
            print(_fmt_check(r), flush=True)
        save()
    print(HEADER, flush=True)
    for run in runs:
        elapsed = time.perf_counter() - t_start
        guess = est.get(run.mode, 60.0)
        if elapsed + guess > budget:
            print(f"skipped {_label(run)} (elapsed {elapsed:.0f}s + ~{guess:.0f}s > budget {budget:.0f}s)",
                  flush=True)
            continue
        key = (run.xattn, run.kernel)
        t_row = time.perf_counter()
        if run.xattn != "mask" and key in failed:
            r = _error_row(run, f"not run: {run.xattn}[{run.kernel}] failed before: {failed[key]}")
        else:
            try:
                r = bench_one(run, device=device, text_len=a.text_len, steps=a.steps, warmup=a.warmup,
                              peak=a.peak_tflops * 1e12, profile=a.profile, top_per_class=a.top_per_class)
            except torch.OutOfMemoryError as e:
                r = _error_row(run, f"OOM: {e}")
            except Exception as e:  # noqa: BLE001 - a failing backend/compile must not lose the other rows
                r = _error_row(run, f"{type(e).__name__}: {e}")
                if run.xattn != "mask" and run.mode != "compile-blocks-max":
                    failed[key] = r["error"][:120]
            if "error" in r and device.type == "cuda":
                torch._dynamo.reset()
                torch.cuda.empty_cache()
            if "error" not in r:       # caches are warm after a row: the next one of its mode takes about as long
                est[run.mode] = time.perf_counter() - t_row + 10
        results.append(r)
        print(_fmt_row(r), flush=True)
        if "profile" in r:
            p = r["profile"]
            cls = ", ".join(f"{k} {v:.1f}" for k, v in p["by_class_ms"].items())
            print(f"    GPU {p['gpu_ms_per_step']:.1f} ms/step (wall {1e3 * r['step_s']:.1f}): {cls}", flush=True)
            for name, ms in p["top_kernels_ms"]:
                print(f"      {ms:7.2f} ms  {name}", flush=True)
            for c, rows in p.get("top_by_class", {}).items():
                print(f"    [{c}]", flush=True)
                for name, ms, ncall in rows:
                    print(f"      {ms:7.2f} ms {ncall:5.0f}x  {name}", flush=True)
        save()
    save()
    print(f"total {time.perf_counter() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
