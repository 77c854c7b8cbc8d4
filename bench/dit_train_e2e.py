"""End-to-end check of the DiT throughput table: `refgen.dit.train.train` itself (the function behind
`refgen dit train --config configs/dit_base.yaml`), not a re-creation of its step, on random batches.

The batches follow the data contract (refgen.dit.shards) and sit on the GPU already, so this measures the
training step and its bookkeeping (CFG-drop sampling, velocity norm, EMA, logging, grad accumulation), not the
shard reader (docs/dit_data.md measures that). Captions have random lengths, so the text keys carry padding as
in real data. images/s comes from the run's own metrics.jsonl, skipping the first `log_every` window (compile);
MFU = images/s x 3 x forward_flops / peak, the convention of bench/dit_throughput.py.

    python bench/dit_train_e2e.py --out e2e.json                      # base 256^2 b128, accum 1 and 2 (H100)
    python bench/dit_train_e2e.py --tiny --out /tmp/e.json            # CPU smoke test

FP8 against bf16 in the same call (issue 22 item 2; `fp8: true`, refgen.dit.fp8; CUDA with FP8 tensor cores):

    python bench/dit_train_e2e.py --precisions bf16,fp8 --compile --runs 256:128:1,512:32:1 --steps 60 --out fp8.json

`fp8` is torchao's tensorwise recipe; `fp8_<recipe>` picks another (`fp8_rowwise`, `fp8_rowwise_with_gw_hp`:
TrainConfig.fp8_recipe), so one call compares them: `--precisions bf16,fp8,fp8_rowwise`.

Each row is run once per precision; MFU is quoted against the dense bf16 peak (`--peak-tflops`) and, for every
row, against the dense FP8 peak (`--peak-fp8-tflops`), with the FLOP count of the same model either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from refgen.artifacts import atomic_write_json, provenance
from refgen.dit.fp8 import H100_FP8_DENSE
from refgen.runtime import H100_BF16_DENSE
from refgen.dit.config import FP8_RECIPES, load_train_config, model_preset
from refgen.dit.model import forward_flops
from refgen.dit.train import train

REPO = Path(__file__).resolve().parents[1]


def batches(cfg, px: int, batch: int, text_len: int, n: int, device) -> list[dict]:
    m, g = cfg.model, torch.Generator(device=device).manual_seed(0)
    h = w = px // 8
    N = (h // m.patch_size) * (w // m.patch_size)
    out = []
    for _ in range(n):
        lens = torch.randint(8, text_len + 1, (batch, 1), generator=g, device=device)
        out.append({"latent": torch.randn(batch, m.latent_channels, h, w, generator=g, device=device),
                    "t5": torch.randn(batch, text_len, m.t5_dim, generator=g, device=device),
                    "t5_mask": torch.arange(text_len, device=device).expand(batch, text_len) < lens,
                    "dino_cls": torch.randn(batch, m.dino_dim, generator=g, device=device),
                    "dino_patches": torch.randn(batch, N, m.dino_dim, generator=g, device=device)})
    return out


def run_one(config: str, *, px: int, batch: int, accum: int, steps: int, log_every: int, text_len: int,
            peak: float, tiny: bool, fp8: bool = False, compile: bool | None = None,
            peak_fp8: float | None = None, fp8_recipe: str = "tensorwise") -> dict:
    over = dict(steps=steps, batch_size=batch, effective_batch=batch * accum, log_every=log_every,
                ckpt_every=10**9, resume=None, progress=False, lr_warmup_steps=1, fp8=fp8, fp8_recipe=fp8_recipe)
    if compile is not None:
        over["compile"] = compile
    if tiny:
        over.update(device="cpu", dtype="fp32", compile=False)
    cfg = load_train_config(config)
    cfg = dataclasses.replace(cfg, **over, **({"model": model_preset("tiny"), "model_preset": "tiny"} if tiny
                                              else {}))
    device = torch.device("cpu" if tiny else "cuda")
    data = batches(cfg, px, batch, text_len, 4, device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(cfg, out_dir=tmp)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        summary = train(cfg, data)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "images_per_s" in r]
    timed = rows[1:] or rows                      # the first window holds the compile
    ips = sum(r["images_per_s"] for r in timed) / len(timed)
    fwd = forward_flops(cfg.model, px // 8, px // 8, text_len)
    rec = {"model": cfg.model_preset, "image_px": px, "batch": batch, "grad_accum": summary["grad_accum"],
           "steps": steps, "compile": cfg.compile, "cross_attention": cfg.cross_attention,
           "precision": "fp8" if cfg.fp8 else ("bf16" if device.type == "cuda" else "fp32"),
           **({"fp8_recipe": cfg.fp8_recipe} if cfg.fp8 else {}),
           "images_per_s": ips, "mfu": ips * 3 * fwd / peak, "train_gflop_per_image": 3 * fwd / 1e9,
           **({"mfu_vs_fp8_peak": ips * 3 * fwd / peak_fp8} if peak_fp8 else {}),
           "losses": [r["loss"] for r in rows],
           "windows_images_per_s": [r["images_per_s"] for r in rows], "final_loss": rows[-1]["loss"],
           "wall_s": wall, "n_params": summary["n_params"]}
    if device.type == "cuda":
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default=str(REPO / "configs" / "dit_base.yaml"))
    ap.add_argument("--runs", default="256:128:1,256:128:2", help="px:batch:accum, comma separated")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE / 1e12)
    ap.add_argument("--peak-fp8-tflops", type=float, default=H100_FP8_DENSE / 1e12,
                    help="dense FP8 peak (H100/H200 SXM: 1979) for the second MFU column")
    ap.add_argument("--precisions", default="bf16",
                    help="bf16, fp8 (tensorwise) and/or fp8_<recipe> (fp8_rowwise, fp8_rowwise_with_gw_hp; CUDA "
                         "sm89+), comma separated")
    ap.add_argument("--compile", action="store_true", help="compile: true for every row (FP8 needs it for speed)")
    ap.add_argument("--tiny", action="store_true", help="the tiny model on the CPU, a few steps")
    a = ap.parse_args(argv)
    if a.tiny:
        a.runs, a.steps, a.log_every, a.text_len = "64:2:1,64:2:2", 4, 2, 8
    results = []
    print(f"{'model':6} {'px':>4} {'batch':>5} {'accum':>5} {'img/s':>8} {'MFU':>6} {'memGiB':>7} {'wall_s':>7}")
    precisions = [p for p in a.precisions.split(",") if p]
    known = ["bf16", "fp8"] + [f"fp8_{r}" for r in FP8_RECIPES]
    if not set(precisions) <= set(known) or (a.tiny and precisions != ["bf16"]):
        ap.error(f"--precisions: any of {', '.join(known)}; the fp8 ones need CUDA (not --tiny)")
    for spec in a.runs.split(","):
        px, batch, accum = map(int, spec.split(":"))
        for prec in precisions:
            r = run_one(a.config, px=px, batch=batch, accum=accum, steps=a.steps, log_every=a.log_every,
                        text_len=a.text_len, peak=a.peak_tflops * 1e12, tiny=a.tiny, fp8=prec.startswith("fp8"),
                        compile=True if a.compile else None, peak_fp8=a.peak_fp8_tflops * 1e12,
                        fp8_recipe=prec[4:] if prec.startswith("fp8_") else "tensorwise")
            results.append(r)
            mem = f"{r['peak_mem_gib']:7.1f}" if "peak_mem_gib" in r else f"{'-':>7}"
            print(f"{r['model']:6} {px:4} {batch:5} {r['grad_accum']:5} {r['images_per_s']:8.1f} "
                  f"{100 * r['mfu']:5.1f}% {mem} {r['wall_s']:7.1f} {prec} "
                  f"(MFU vs FP8 peak {100 * r['mfu_vs_fp8_peak']:.1f}%)", flush=True)
        atomic_write_json(a.out, provenance(None, results=results, peak_tflops=a.peak_tflops,
                                            device=torch.cuda.get_device_name() if not a.tiny else "cpu",
                                            torch=torch.__version__, argv=sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
