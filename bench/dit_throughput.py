"""NanoDiT training throughput and MFU (issue 8, item 5).

Builds `nano` and `base` with random weights on CUDA and times full training steps (forward + backward +
AdamW, fp32 master weights under bf16 autocast: exactly what `refgen dit train` runs) on random latents and
random conditioning, at 256^2 and 512^2 images (16-channel latents of 32^2 / 64^2; 256 / 1024 image tokens).

MFU = images/s x training FLOPs per image / peak. Training FLOPs per image = 3 x the analytic forward count
(`refgen.dit.model.forward_flops`: every matmul and the attention products, 2 FLOPs per multiply-add). Peak =
989 TFLOP/s, the H100 SXM's dense bf16 figure.

    python bench/dit_throughput.py --out bench_dit.json                   # on an H100, ~5-8 minutes
    python bench/dit_throughput.py --tiny --out /tmp/t.json               # CPU smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from refgen.artifacts import atomic_write_json, provenance
from refgen.dit.config import model_preset
from refgen.dit.model import Cond, NanoDiT, count_params, forward_flops
from refgen import flow

H100_BF16_DENSE = 989e12
DEFAULT_BATCH = {("nano", 256): 128, ("nano", 512): 32, ("base", 256): 64, ("base", 512): 16}


def bench_one(name: str, image_px: int, batch: int, *, device: torch.device, text_len: int, steps: int,
              warmup: int, compile_model: bool, peak: float, tiny: bool) -> dict:
    cfg = model_preset(name)
    vae_down = 8
    h = w = image_px // vae_down
    torch.manual_seed(0)
    model = NanoDiT(cfg).to(device)
    train_model = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    N = (h // cfg.patch_size) * (w // cfg.patch_size)
    x0 = torch.randn(batch, cfg.latent_channels, h, w, device=device)
    # all text tokens valid: SDPA's flash kernel (a real batch with padding takes the memory-efficient kernel)
    cond = Cond(t5=torch.randn(batch, text_len, cfg.t5_dim, device=device),
                t5_mask=torch.ones(batch, text_len, dtype=torch.bool, device=device),
                dino_cls=torch.randn(batch, cfg.dino_dim, device=device),
                dino_patches=torch.randn(batch, N, cfg.dino_dim, device=device))
    drop = torch.rand(batch, device=device) < 0.1
    cond = cond.with_drop(drop, drop)
    amp = device.type == "cuda"

    def step():
        sigma = flow.sample_sigmas(batch, "logit_normal", device=device)
        noise = torch.randn_like(x0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = flow.loss(train_model, x0, cond, sigma=sigma, noise=noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t_compile = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_compile = time.perf_counter() - t_compile
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    fwd = forward_flops(cfg, h, w, text_len)
    ips = batch / dt
    rec = {"model": name, "params_M": round(count_params(model) / 1e6, 1), "image_px": image_px,
           "latent": [cfg.latent_channels, h, w], "tokens": N, "text_len": text_len, "batch": batch,
           "compile": compile_model, "step_s": dt, "images_per_s": ips,
           "train_gflop_per_image": 3 * fwd / 1e9, "achieved_tflops": ips * 3 * fwd / 1e12,
           "mfu": ips * 3 * fwd / peak, "warmup_s": t_compile, "loss": float(loss.detach())}
    if device.type == "cuda":
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, train_model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON results")
    ap.add_argument("--models", default="nano,base")
    ap.add_argument("--px", default="256,512", help="image sizes (latents are /8)")
    ap.add_argument("--batch", type=int, help="per-step batch for every run (default: per model/size table)")
    ap.add_argument("--text-len", type=int, default=128, help="T5 tokens (padded to the longest caption)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--modes", default="eager,compile", help="eager and/or compile")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE / 1e12)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: the tiny model, one step")
    a = ap.parse_args(argv)

    if a.tiny:
        device = torch.device("cpu")
        runs = [("tiny", 64, a.batch or 2, False)]
        a.steps, a.warmup, a.text_len = 1, 1, 8
    else:
        from refgen.runtime import resolve_device

        device = resolve_device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        runs = [(m, px, a.batch or DEFAULT_BATCH.get((m, px), 16), mode == "compile")
                for mode in a.modes.split(",") for m in a.models.split(",") for px in map(int, a.px.split(","))]
    results = []
    print(f"{'model':6} {'params':>8} {'px':>5} {'tok':>5} {'batch':>5} {'mode':>8} {'img/s':>9} "
          f"{'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for name, px, batch, comp in runs:
        try:
            r = bench_one(name, px, batch, device=device, text_len=a.text_len, steps=a.steps, warmup=a.warmup,
                          compile_model=comp, peak=a.peak_tflops * 1e12, tiny=a.tiny)
        except torch.OutOfMemoryError as e:
            r = {"model": name, "image_px": px, "batch": batch, "compile": comp, "error": f"OOM: {e}"[:200]}
            print(f"{name:6} {px:5} batch {batch}: OOM", flush=True)
            torch.cuda.empty_cache()
            results.append(r)
            continue
        results.append(r)
        print(f"{name:6} {r['params_M']:7.1f}M {px:5} {r['tokens']:5} {batch:5} "
              f"{'compile' if comp else 'eager':>8} {r['images_per_s']:9.1f} {r['train_gflop_per_image']:10.1f} "
              f"{r['achieved_tflops']:8.1f} {100 * r['mfu']:5.1f}%", flush=True)
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    atomic_write_json(a.out, provenance(None, device=dev_name, peak_tflops=a.peak_tflops, results=results,
                                        argv=sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
