"""NanoDiT training throughput and MFU (issue 8, item 5).

Builds `nano` and `base` with random weights on CUDA and times full training steps (forward + backward +
grad clipping + fused AdamW, fp32 master weights under bf16 autocast: exactly what `refgen dit train` runs) on
random latents and random conditioning, at 256^2 and 512^2 images (16-channel latents of 32^2 / 64^2; 256 / 1024
image tokens). Conditioning: no text padding, 10% of the samples with text and DINO dropped (as in training, so
the cross-attention carries a key mask; `--no-drop` measures the unmasked flash path).

MFU = images/s x training FLOPs per image / peak. Training FLOPs per image = 3 x the analytic forward count
(`refgen.dit.model.forward_flops`: every matmul and the attention products, 2 FLOPs per multiply-add). Peak =
989 TFLOP/s, the H100 SXM's dense bf16 figure.

Modes: `eager`, and `compile` = `torch.compile(model, dynamic=False)` (default inductor mode; every row compiles
afresh, its warm-up time is reported). `--sdpa cudnn` puts cuDNN attention first in SDPA's priority order (it
takes masks; the default order sends a masked attention to the memory-efficient kernel). `--profile` adds, per
row, the GPU time of 3 profiled steps split into GEMM / attention / optimizer / other kernels.

    python bench/dit_throughput.py --out bench_dit.json                   # the full grid, on an H100
    python bench/dit_throughput.py --preset sweep --profile --out s.json  # base: eager vs compile, batches (<8 min)
    python bench/dit_throughput.py --tiny --out /tmp/t.json               # CPU smoke test, seconds
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
from refgen.dit.config import model_preset
from refgen.dit.model import Cond, NanoDiT, count_params, forward_flops
from refgen import flow

H100_BF16_DENSE = 989e12
DEFAULT_BATCH = {("nano", 256): 128, ("nano", 512): 32, ("base", 256): 64, ("base", 512): 16}


class Run(NamedTuple):     # (a NamedTuple: the tests load this file without registering a module)
    model: str
    px: int
    batch: int
    mode: str = "eager"          # eager | compile
    sdpa: str = "default"        # default | cudnn
    drop: bool = True            # 10% CFG drop (a key mask in the cross-attention)


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


def profile_steps(step, n: int = 3, top: int = 8) -> dict:
    """GPU kernel time of `n` steps by class, and the top kernels (ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    by_class: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()
        by_class[_kernel_class(e.name)] = by_class.get(_kernel_class(e.name), 0.0) + us
        by_name[e.name] = by_name.get(e.name, 0.0) + us
    total = sum(by_class.values())
    return {"gpu_ms_per_step": total / n / 1e3,
            "by_class_ms": {k: v / n / 1e3 for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [(k[:90], v / n / 1e3) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]]}


def bench_one(run: Run, *, device: torch.device, text_len: int, steps: int, warmup: int, peak: float,
              profile: bool = False) -> dict:
    cfg = model_preset(run.model)
    batch, vae_down = run.batch, 8
    h = w = run.px // vae_down
    compile_model = run.mode == "compile"
    torch.manual_seed(0)
    if compile_model:
        torch._dynamo.reset()     # a fresh compile per row (no shape state carried over from the previous row)
    with torch.device(device):              # initialised on the device: seconds saved for `base`
        model = NanoDiT(cfg)
    train_model = torch.compile(model, dynamic=False) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
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
        sigma = flow.sample_sigmas(batch, "logit_normal", device=device)
        noise = torch.randn_like(x0)
        with _sdpa_ctx(run.sdpa), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = flow.loss(train_model, x0, cond, sigma=sigma, noise=noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

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
    ips = batch / dt
    rec = {"model": run.model, "params_M": round(count_params(model) / 1e6, 1), "image_px": run.px,
           "latent": [cfg.latent_channels, h, w], "tokens": N, "text_len": text_len, "batch": batch,
           "mode": run.mode, "compile": compile_model, "sdpa": run.sdpa, "cfg_drop": run.drop,
           "step_s": dt, "images_per_s": ips,
           "train_gflop_per_image": 3 * fwd / 1e9, "achieved_tflops": ips * 3 * fwd / 1e12,
           "mfu": ips * 3 * fwd / peak, "first_step_s": t_first, "warmup_s": t_warm,
           "loss": float(loss.detach())}
    if device.type == "cuda":
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if profile:
            rec["profile"] = profile_steps(step)
    del model, train_model, opt
    if compile_model:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def _fmt_row(r: dict) -> str:
    mode = r["mode"] + ("" if r.get("sdpa", "default") == "default" else "+" + r["sdpa"])
    mode += "" if r.get("cfg_drop", True) else " nodrop"
    if "error" in r:
        return f"{r['model']:6} {'':8} {r['image_px']:5} {'':5} {r['batch']:5} {mode:>20}  {r['error'][:60]}"
    mem = f"{r['peak_mem_gib']:7.1f}" if "peak_mem_gib" in r else f"{'-':>7}"
    return (f"{r['model']:6} {r['params_M']:7.1f}M {r['image_px']:5} {r['tokens']:5} {r['batch']:5} {mode:>20} "
            f"{r['images_per_s']:9.1f} {r['train_gflop_per_image']:10.1f} {r['achieved_tflops']:8.1f} "
            f"{100 * r['mfu']:5.1f}% {mem} {r['first_step_s']:8.1f}")


HEADER = (f"{'model':6} {'params':>8} {'px':>5} {'tok':>5} {'batch':>5} {'mode':>20} {'img/s':>9} "
          f"{'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>6} {'memGiB':>7} {'first_s':>8}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON results (rewritten after every row)")
    ap.add_argument("--preset", choices=["grid", "sweep"], default="grid",
                    help="grid: --models x --px x --modes; sweep: base, eager vs compile, batch sizes, SDPA "
                         "backends (fixed rows, priority order, stops at --budget-s)")
    ap.add_argument("--models", default="nano,base")
    ap.add_argument("--px", default="256,512", help="image sizes (latents are /8)")
    ap.add_argument("--batch", type=int, help="per-step batch for every run (default: per model/size table)")
    ap.add_argument("--text-len", type=int, default=128, help="T5 tokens (padded to the longest caption)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="steps before timing (the first one compiles)")
    ap.add_argument("--modes", default="eager,compile", help="eager and/or compile")
    ap.add_argument("--sdpa", default="default", choices=["default", "cudnn", "flash", "efficient"],
                    help="SDPA backend put first in the priority order (grid preset)")
    ap.add_argument("--no-drop", action="store_true", help="no CFG drop: no attention mask at all (grid preset)")
    ap.add_argument("--profile", action="store_true", help="per row: GPU time by kernel class over 3 steps")
    ap.add_argument("--budget-s", type=float, default=400.0,
                    help="do not start a row that would likely end after this many seconds (sweep preset)")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE / 1e12)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: the tiny model, one step")
    a = ap.parse_args(argv)

    t_start = time.perf_counter()
    budget = float("inf")
    if a.tiny:
        device = torch.device("cpu")
        runs = [Run("tiny", 64, a.batch or 2)]
        a.steps, a.warmup, a.text_len = 1, 1, 8
    else:
        from refgen.runtime import resolve_device

        device = resolve_device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if a.preset == "sweep":
            runs, budget = list(SWEEP), a.budget_s
        else:
            runs = [Run(m, px, a.batch or DEFAULT_BATCH.get((m, px), 16), mode, a.sdpa, not a.no_drop)
                    for mode in a.modes.split(",") for m in a.models.split(",")
                    for px in map(int, a.px.split(","))]
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results: list[dict] = []
    est = {"eager": 20.0, "compile": 120.0}          # seconds a row takes: a guess, then the longest measured
    seen: dict[str, float] = {}

    def save():
        atomic_write_json(a.out, provenance(None, device=dev_name, peak_tflops=a.peak_tflops, results=results,
                                            torch=torch.__version__, argv=sys.argv[1:] if argv is None else argv))

    print(HEADER, flush=True)
    for run in runs:
        elapsed = time.perf_counter() - t_start
        if elapsed + est[run.mode] > budget:
            print(f"skipped {run} (elapsed {elapsed:.0f}s + ~{est[run.mode]:.0f}s > budget {budget:.0f}s)",
                  flush=True)
            continue
        t_row = time.perf_counter()
        try:
            r = bench_one(run, device=device, text_len=a.text_len, steps=a.steps, warmup=a.warmup,
                          peak=a.peak_tflops * 1e12, profile=a.profile)
        except torch.OutOfMemoryError as e:
            r = {"model": run.model, "image_px": run.px, "batch": run.batch, "mode": run.mode, "sdpa": run.sdpa,
                 "cfg_drop": run.drop, "error": f"OOM: {e}"[:300]}
        except Exception as e:  # noqa: BLE001 - a failing backend/compile must not lose the other rows
            r = {"model": run.model, "image_px": run.px, "batch": run.batch, "mode": run.mode, "sdpa": run.sdpa,
                 "cfg_drop": run.drop, "error": f"{type(e).__name__}: {e}"[:300]}
        if "error" in r and device.type == "cuda":
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        seen[run.mode] = max(seen.get(run.mode, 0.0), time.perf_counter() - t_row)
        est[run.mode] = seen[run.mode] + 5
        results.append(r)
        print(_fmt_row(r), flush=True)
        if "profile" in r:
            p = r["profile"]
            cls = ", ".join(f"{k} {v:.1f}" for k, v in p["by_class_ms"].items())
            print(f"    GPU {p['gpu_ms_per_step']:.1f} ms/step (wall {1e3 * r['step_s']:.1f}): {cls}", flush=True)
            for name, ms in p["top_kernels_ms"]:
                print(f"      {ms:7.2f} ms  {name}", flush=True)
        save()
    save()
    print(f"total {time.perf_counter() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
