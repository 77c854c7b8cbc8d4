"""Identity system at full size with random weights: refgen vs plain diffusers, speed and memory, on one GPU.

Builds the real architectures directly on the GPU in bf16 (same FLOPs as the trained models, no download):
QwenImageTransformer2DModel (20.4B, defaults = Qwen/Qwen-Image), AutoencoderKLQwenImage, a Qwen2.5-VL-7B
text encoder, and the Qwen3-VL-8B vision tower. The tokenizer is refgen's offline byte-level BPE (the real
one cannot be downloaded here), so prompt lengths differ slightly from the real tokenizer's.

Two sections, each sized for one device call (< 10 min on an H100):

    python bench/identity_bench.py --section render --out render.json   # plain vs refgen, batched CFG, grid,
                                                                        # offload modes, features, head
    python bench/identity_bench.py --section invert --out invert.json   # inversion K/checkpointing/offload,
                                                                        # torch.compile (inversion and render);
                                                                        # --slot-repeat K: the wide-slot mode
    python bench/identity_bench.py --section head --out head.json       # one e2e head training step, K people
                                                                        # (--id-loss: also with the ID loss)
    python bench/identity_bench.py --tiny --section all --out /tmp/b.json   # tiny models on CPU: code runs

Every row records its time and the peak GPU memory of that row alone (torch's max_memory_allocated, and
max_memory_reserved: what the caching allocator held, the figure to compare with a card's size). Timings are
medians of repeats after a warm-up unless the row says otherwise. A row that fails (OOM, an error) is
recorded with the error and the run goes on. Prints a table and writes all numbers as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from refgen.identity.slots import SLOT_REPEAT  # noqa: E402
from refgen.runtime import H100_BF16_DENSE  # noqa: E402  (after the path insert)

CUDA = torch.cuda.is_available()


def sync():
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, repeat=3, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def peak_reset():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peaks(base: float = 0.0) -> dict:
    """Peak allocated/reserved GiB since the last peak_reset; `extra_gib` = peak over what was resident before."""
    if not CUDA:
        return {"peak_gib": 0.0, "reserved_gib": 0.0, "extra_gib": 0.0}
    p = torch.cuda.max_memory_allocated() / 2**30
    return {"peak_gib": p, "reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "extra_gib": p - base}


def resident_gib() -> float:
    return torch.cuda.memory_allocated() / 2**30 if CUDA else 0.0


class Bench:
    """Rows of (label, text), printed as measured (a crash later keeps what was measured), and a JSON dict."""

    def __init__(self, out: str, meta: dict):
        self.out, self.res, self.rows = Path(out), dict(meta), []

    def row(self, label: str, text: str):
        print(f"| {label} | {text} |", flush=True)
        self.rows.append((label, text))

    def save(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.res, indent=2))

    def measure(self, key: str, label: str, fn, repeat=2, warmup=1, per: int = 1):
        """Time fn (median of `repeat` after `warmup`), record time, time per item and the row's peaks."""
        peak_reset()
        base = resident_gib()
        try:
            t = timed(fn, repeat=repeat, warmup=warmup)
        except Exception as e:  # noqa: BLE001 -- a bench row's failure is a result, not the end of the run
            traceback.print_exc()
            msg = "out of memory" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {e}"[:300]
            self.res[key] = {"error": msg, **peaks(base)}
            self.row(label, f"FAILED: {msg}")
            peak_reset()
            return None
        r = {"s": t, "per_item_s": t / per, "n": per, "repeat": repeat, "warmup": warmup, **peaks(base)}
        self.res[key] = r
        each = f" ({t / per:.2f} s each)" if per > 1 else ""
        self.row(label, f"{t:.3f} s{each}, peak {r['peak_gib']:.1f} GiB (reserved {r['reserved_gib']:.1f}, "
                        f"{r['extra_gib']:.1f} over resident)")
        self.save()
        return r

    def table(self, title: str):
        print(f"\n## {title}\n| what | measured |\n|---|---|")
        for a, b in self.rows:
            print(f"| {a} | {b} |")


# --------------------------------------------------------------------------- models

def build_full_pipeline(tokenizer):
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        transformer = QwenImageTransformer2DModel()
        vae = AutoencoderKLQwenImage()
        cfg = Qwen2_5_VLConfig(
            text_config={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                         "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                         "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
                         "rope_theta": 1000000.0, "max_position_embeddings": 128000},
            vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                           "out_hidden_size": 3584},
            vocab_size=152064)
        text_encoder = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    torch.set_default_dtype(torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential", num_train_timesteps=1000)
    pipe = QwenImagePipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_vision_tower(tiny: bool):
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    if tiny:
        vc = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
              "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
              "deepstack_visual_indexes": [1]}
    else:  # Qwen3-VL-8B-Instruct's vision tower
        vc = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096,
              "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
              "deepstack_visual_indexes": [8, 16, 24]}
    cfg = Qwen3VLConfig(vision_config=vc).vision_config
    dev = "cpu" if tiny else "cuda"
    dt = torch.float32 if tiny else torch.bfloat16
    return Qwen3VLVisionModel._from_config(cfg).to(dev, dt).eval(), vc["out_hidden_size"]


def make_identities(root: Path, n: int, size=(512, 768)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(n):
        d = root / f"seed_{k}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"{j}.png")


# --------------------------------------------------------------------------- sections

PROMPT = "a portrait photo of ~ID~, studio lighting"


def section_render(b: Bench, pipe, S: dict):
    """Plain pipeline vs refgen; batched CFG before/after; grid; text encoder release; offload modes."""
    from refgen.identity.inject import inject
    from refgen.identity.prompts import encode_prompts
    from refgen.identity.render import RenderConfig, place, release_text_encoder, render_grid

    H, W, steps, n_seeds, reps, big = S["H"], S["W"], S["steps"], S["grid_seeds"], S["reps"], S["grid_bs"]
    R = S["R"]
    rc = lambda **kw: RenderConfig(prompt=PROMPT, alphas=[1.0], seeds=[0], steps=steps, height=H, width=W,  # noqa
                                   **kw)

    # 1. plain diffusers, one image per call (the seed's way of rendering a grid)
    gen = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
    b.measure("plain_1", "plain QwenImagePipeline(prompt=...), 1 image/call",
              lambda: pipe(prompt="a portrait photo of a person, studio lighting", negative_prompt=" ",
                           true_cfg_scale=4.0, num_inference_steps=steps, height=H, width=W, generator=gen()),
              repeat=reps)

    # 2. refgen single render (encode, inject, render), CFG as two forwards (pipeline) vs one batched forward
    neg = encode_prompts(pipe, " ")
    negt = (neg.embeds, neg.mask)

    def one(prompt_, residuals, alphas, cfg_batch, **kw):  # encode (text encoder on the GPU), inject, render 1 image
        enc_ = encode_prompts(pipe, prompt_, n_identities=len(residuals))
        return one_pre(pipe, enc_, residuals, alphas, negt, rc(cfg_batch=cfg_batch, **kw), 1)

    for cb in (False, True):
        b.measure(f"refgen_1_cfgbatch{int(cb)}", f"refgen render, 1 image, CFG {'batched' if cb else '2 forwards'}",
                  lambda: one(PROMPT, [R], [1.0], cb), repeat=reps)
    b.measure("refgen_1_id_guidance", "refgen render, 1 image, identity guidance 0.5 (3 rows per forward)",
              lambda: one(PROMPT, [R], [1.0], True, id_guidance=0.5), repeat=reps)
    b.measure("refgen_two_slot", "refgen generate, two slots, 1 image, CFG batched",
              lambda: one("~ID~ and ~ID~ on a beach", [R, R], [1.2, 0.9], True), repeat=reps)

    # 3. injection overhead: encode + inject vs the render (the render dominates both)
    enc = encode_prompts(pipe, PROMPT, n_identities=1)
    t_enc = timed(lambda: encode_prompts(pipe, PROMPT, n_identities=1), repeat=5)
    t_inj = timed(lambda: inject(enc.embeds, enc.slots[0], [R], [1.0]), repeat=20)
    render_s = b.res.get("refgen_1_cfgbatch1", {}).get("s") or float("nan")
    b.res.update(encode_s=t_enc, inject_s=t_inj, inject_overhead_pct_of_render=100 * t_inj / render_s)
    b.row("prompt encode (text encoder on the GPU)", f"{t_enc * 1e3:.1f} ms")
    b.row("inject (1 slot)", f"{t_inj * 1e3:.3f} ms = {100 * t_inj / render_s:.4f}% of a render")

    # 4. the text encoder leaves the GPU once the prompts are encoded (refgen render / generate do this)
    release_text_encoder(pipe)
    b.res["text_encoder_released"] = True
    b.measure("refgen_1_te_off", "refgen render, 1 image, CFG batched, text encoder released",
              lambda: one_pre(pipe, enc, [R], [1.0], negt, rc(cfg_batch=True), 1), repeat=reps)

    # 5. one pipeline call of `big` images: CFG as two forwards vs one batched forward
    for cb in (False, True):
        b.measure(f"refgen_{big}_cfgbatch{int(cb)}",
                  f"refgen render, {big} images in one call, CFG {'batched' if cb else '2 forwards'}",
                  lambda: one_pre(pipe, enc, [R], [1.0], negt, rc(cfg_batch=cb, batch_size=big), big),
                  repeat=1, warmup=0, per=big)

    # 6. alpha grid 4 x n_seeds, `big` images per call, batched CFG, prompt encoded once (text encoder off)
    gc_ = RenderConfig(prompt=PROMPT, alphas=[0.5, 1.0, 1.5, 2.0], seeds=list(range(n_seeds)), steps=steps,
                       height=H, width=W, batch_size=big, cfg_batch=True)
    with tempfile.TemporaryDirectory() as td:
        b.measure("grid", f"alpha grid 4x{n_seeds}, {big} images/call, CFG batched (writes grid + PNGs)",
                  lambda: render_grid(pipe, gc_, [R], td, progress=False, encoded=(enc.embeds, enc.mask, enc.slots[0]),
                                      neg=negt), repeat=1, warmup=0, per=4 * n_seeds)
    if "plain_1" in b.res and "s" in b.res["plain_1"]:
        b.res["plain_grid_computed_s"] = b.res["plain_1"]["s"] * 4 * n_seeds
        b.row(f"plain grid 4x{n_seeds} = {4 * n_seeds} x plain per-image (computed, not run)",
              f"{b.res['plain_grid_computed_s']:.1f} s")

    # 7. features + head (their peak: `extra_gib`, over the pipeline still resident)
    section_features(b, S, tiny=not CUDA)
    if not CUDA:
        return
    # 8. offload modes (what 48 GB and 24 GB cards can run): model offload, then group offload (layer streaming)
    dev = torch.device("cuda")
    place(pipe, dev, "model")
    b.measure("offload_model_encode", "offload=model: encode a prompt (text encoder moves in)",
              lambda: encode_prompts(pipe, PROMPT, n_identities=1), repeat=reps)
    b.measure("offload_model_1", "offload=model: render 1 image, CFG batched (transformer moves in per call)",
              lambda: one_pre(pipe, enc, [R], [1.0], negt, rc(cfg_batch=True), 1), repeat=reps)
    b.measure(f"offload_model_{big}", f"offload=model: {big} images in one call, CFG batched",
              lambda: one_pre(pipe, enc, [R], [1.0], negt, rc(cfg_batch=True, batch_size=big), big),
              repeat=1, warmup=0, per=big)
    pipe.remove_all_hooks()


def one_pre(pipe, enc, residuals, alphas, negt, cfg, bs):
    """Render `bs` images of an already encoded prompt (no text encoder involved)."""
    from refgen.identity.inject import inject
    from refgen.identity.render import execution_device, render_images

    E = inject(enc.embeds.expand(bs, -1, -1), enc.slots[0], residuals, alphas)
    dev = execution_device(pipe)
    plain = enc.embeds.expand(bs, -1, -1).to(dev) if cfg.id_guidance else None  # the people at alpha 0
    return render_images(pipe, E.to(dev), enc.mask.expand(bs, -1).to(dev), list(range(bs)), cfg,
                         (negt[0].to(dev), negt[1].to(dev)), progress=False, plain=plain)


def section_group(b: Bench, pipe, S: dict):
    """offload=group (24 GB cards): the transformer streams in block by block; text encoder released."""
    from refgen.identity.prompts import encode_prompts
    from refgen.identity.render import RenderConfig, place, release_text_encoder

    H, W = S["H"], S["W"]
    dev = torch.device("cuda")
    pipe.remove_all_hooks()
    for m in pipe.transformer.modules():  # undo the invert section's compile: hooks must not run inside graphs
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    torch._dynamo.reset()
    pipe.to("cpu")
    peak_reset()
    t = time.perf_counter()
    place(pipe, dev, "group")
    b.res["offload_group_setup_s"] = time.perf_counter() - t
    b.row("offload=group: setup (pin the transformer, hooks)", f"{b.res['offload_group_setup_s']:.1f} s")
    b.save()
    b.measure("offload_group_encode", "offload=group: encode a prompt (text encoder on the GPU)",
              lambda: encode_prompts(pipe, PROMPT, n_identities=1), repeat=2)
    enc = encode_prompts(pipe, PROMPT, n_identities=1)
    neg = encode_prompts(pipe, " ")
    release_text_encoder(pipe)
    gsteps = S["group_steps"]
    for bs in (1, 4):
        cfg_g = RenderConfig(prompt=PROMPT, alphas=[1.0], seeds=[0], steps=gsteps, height=H, width=W,
                             batch_size=bs, cfg_batch=True)
        b.measure(f"offload_group_{bs}_{gsteps}steps",
                  f"offload=group: {bs} image(s) in one call, {gsteps} steps (not 28), CFG batched, text encoder "
                  "released", lambda: one_pre(pipe, enc, [S["R"]], [1.0], (neg.embeds, neg.mask), cfg_g, bs), repeat=1,
                  warmup=1 if bs == 1 else 0, per=bs)


def section_flops(b: Bench, S: dict):
    """Exact FLOPs of one inversion image-step (transformer forward + backward to the prompt embeddings only,
    the weights frozen), counted by torch's FlopCounterMode on meta tensors: runs on any CPU in seconds.
    Gives the ceiling on identities/GPU-hour at the seed's settings, whatever the implementation."""
    from diffusers import QwenImageTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        tr = QwenImageTransformer2DModel().to(torch.bfloat16)
    tr.requires_grad_(False)
    h, w, T = S["H"] // 16, S["W"] // 16, 30  # packed latent grid; ~30 prompt tokens
    x = torch.randn(1, h * w, tr.config.in_channels, device="meta", dtype=torch.bfloat16)
    E = torch.randn(1, T, tr.config.joint_attention_dim, device="meta", dtype=torch.bfloat16, requires_grad=True)
    t = torch.full((1,), 0.5, device="meta", dtype=torch.bfloat16)
    with FlopCounterMode(display=False) as fwd:
        out = tr(hidden_states=x, timestep=t, encoder_hidden_states=E, img_shapes=[[(1, h, w)]],
                 return_dict=False)[0]
    with FlopCounterMode(display=False) as bwd:
        out.float().pow(2).mean().backward()
    f, g = fwd.get_total_flops(), bwd.get_total_flops()
    per_identity = 600 * 2 * (f + g)  # the seed: 600 steps x 2 images
    b.res["flops"] = {"forward_tflop_per_image": f / 1e12, "backward_to_embeds_tflop_per_image": g / 1e12,
                      "seed_identity_pflop": per_identity / 1e15,
                      "identities_per_hour_at_989_tflops": 3600 * H100_BF16_DENSE / per_identity,
                      "identities_per_hour_at_798_tflops": 3600 * 798e12 / per_identity}
    b.row(f"FLOPs per image, {S['W']}x{S['H']}: forward / backward to the embeddings",
          f"{f / 1e12:.1f} / {g / 1e12:.1f} TFLOP")
    b.row("one identity at the seed's settings (600 steps x 2 images)",
          f"{per_identity / 1e15:.1f} PFLOP: at most {3600 * H100_BF16_DENSE / per_identity:.0f} identities/GPU-hour at "
          f"the H100's 989 TFLOP/s, {3600 * 798e12 / per_identity:.0f} at the 798 TFLOP/s a bf16 GEMM reaches")
    b.save()


INVERT_PARTS = ("eager", "sizes", "compile", "offload", "group")
SIZES = ((512, 512), (1024, 1024))  # (H, W) besides the default 768x512, for the resolution sweep


def section_invert(b: Bench, pipe, S: dict, tiny: bool, parts=INVERT_PARTS):
    """Inversion step time and peak memory vs K, checkpointing, torch.compile and model offload; then the
    compiled render and the group-offload render (`parts` picks which)."""
    from refgen.identity.invert import InvertConfig, Inverter
    from refgen.identity.render import RenderConfig, place
    from refgen.images import scan

    H, W, reps = S["H"], S["W"], S["reps"]
    td = tempfile.TemporaryDirectory()
    root = Path(td.name)
    make_identities(root, 4, size=(W + 64, H + 64))
    idents = scan(root).identities
    cfg = InvertConfig(height=H, width=W, identities_per_batch=4, steps=10 ** 6, qa=False, checkpoint_every=10 ** 6,
                       parametrisation=S["parametrisation"], slot_repeat=S["slot_repeat"])
    peak_reset()
    # encodes; a residual mode then moves the text encoder off the GPU, tokens keep it there (it runs every step)
    inv = Inverter(pipe, cfg, root / "out", progress=False)
    states = [inv._new_state(i) for i in idents]
    b.res["invert_setup"] = {**peaks(), "parametrisation": cfg.parametrisation, "slot_repeat": cfg.slot_repeat,
                             "L": int(states[0].P.shape[0])}  # the window each person's step moves
    b.row(f"inversion setup, parametrisation {cfg.parametrisation}, slot_repeat {cfg.slot_repeat} "
          f"(L = {b.res['invert_setup']['L']}; encode, 4 x 3 photos through the VAE)",
          f"peak {b.res['invert_setup']['peak_gib']:.1f} GiB")
    n_rep = 1 if tiny else 3

    def steps(key, label, K, ckpt, warmup=1, inverter=None, sts=None):
        """Time K identities' inversion step (of `inverter`/`sts`, default the 768x512 ones)."""
        inverter, sts = inverter or inv, sts or states
        tr = pipe.transformer
        tr.enable_gradient_checkpointing() if ckpt else tr.disable_gradient_checkpointing()
        opt = torch.optim.AdamW([{"params": [s.P, s.log_scale], "lr": cfg.lr} for s in sts[:K]])
        r = b.measure(key, f"{label}: K={K} ({K * cfg.images_per_step} rows){' +ckpt' if ckpt else ''}",
                      lambda: inverter._step(sts[:K], opt), repeat=n_rep, warmup=warmup)
        if r:
            r["identities_per_gpu_hour_at_600_steps"] = 3600 * K / (600 * r["s"])
            b.row(f"  -> {label} K={K}{' +ckpt' if ckpt else ''}",
                  f"{r['identities_per_gpu_hour_at_600_steps']:.1f} identities/GPU-hour at 600 steps")
            b.save()

    if "eager" in parts:
        for K, ckpt in ([(1, False), (2, False), (1, True), (2, True), (4, True)] if not tiny
                        else [(1, False), (2, True)]):
            steps(f"invert_K{K}{'_ckpt' if ckpt else ''}", "inversion step", K, ckpt)

    if "sizes" in parts:  # step time and memory vs resolution (its own photos, Inverter and states per size)
        for h, w in (SIZES if not tiny else ((32, 48),)):
            make_identities(root / f"{h}x{w}", 2, size=(w + 64, h + 64))
            cfg_s = dataclasses.replace(cfg, height=h, width=w, identities_per_batch=2)
            pipe.text_encoder.to(inv.device)  # the Inverter encodes its base prompt, then releases it again
            inv_s = Inverter(pipe, cfg_s, root / f"out_{h}x{w}", progress=False)
            st = [inv_s._new_state(i) for i in scan(root / f"{h}x{w}").identities]
            for K, ckpt in ((1, False), (2, False), (2, True)):
                steps(f"invert_{h}x{w}_K{K}{'_ckpt' if ckpt else ''}", f"inversion step {w}x{h} (WxH)", K, ckpt,
                      inverter=inv_s, sts=st)
            del inv_s, st
            peak_reset()

    if CUDA and "compile" in parts:
        # torch.compile of the 60 repeated blocks (regional), for inversion and then rendering
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
        t = time.perf_counter()
        steps("invert_K2_compile", "inversion step, compiled", 2, False, warmup=2)
        b.res["invert_compile_warmup_s"] = time.perf_counter() - t
        rc = RenderConfig(prompt=PROMPT, alphas=[1.0], seeds=[0], steps=S["steps"], height=H, width=W,
                          batch_size=1, cfg_batch=True)
        from refgen.identity.render import render_grid, render_images

        neg_e = torch.zeros(1, 4, inv.E_base.shape[2], device=inv.device, dtype=inv.dtype)
        neg_m = torch.ones(1, 4, dtype=torch.long, device=inv.device)
        mask = torch.ones(inv.E_base.shape[:2], dtype=torch.long, device=inv.device)
        big = S["grid_bs"]
        t = time.perf_counter()
        b.measure("render_1_compile", "render 1 image, CFG batched, compiled", lambda: render_images(
            pipe, inv.E_base, mask, [0], rc, (neg_e, neg_m), progress=False), repeat=reps, warmup=1)
        b.res["render_compile_warmup_and_runs_s"] = time.perf_counter() - t
        rcb = RenderConfig(prompt=PROMPT, alphas=[1.0], seeds=[0], steps=S["steps"], height=H, width=W,
                           batch_size=big, cfg_batch=True)
        b.measure(f"render_{big}_compile", f"render {big} images in one call, CFG batched, compiled (1st call "
                  "of this shape is the warm-up)", lambda: render_images(
            pipe, inv.E_base.expand(big, -1, -1), mask.expand(big, -1), list(range(big)), rcb, (neg_e, neg_m),
            progress=False), repeat=1, warmup=1, per=big)
        gcfg = RenderConfig(prompt=PROMPT, alphas=[0.5, 1.0, 1.5, 2.0], seeds=list(range(S["grid_seeds"])),
                            steps=S["steps"], height=H, width=W, batch_size=big, cfg_batch=True)
        with tempfile.TemporaryDirectory() as gd:
            b.measure("grid_compile", f"alpha grid 4x{S['grid_seeds']}, {big} images/call, CFG batched, compiled",
                      lambda: render_grid(pipe, gcfg, [S["R"]], gd, progress=False,
                                          encoded=(inv.E_base, mask, [inv.slot]), neg=(neg_e, neg_m)),
                      repeat=1, warmup=0, per=4 * S["grid_seeds"])

    if CUDA and "offload" in parts:
        # model offload: the transformer is the only resident component during inversion (48 GB cards)
        place(pipe, torch.device("cuda"), "model")
        peak_reset()
        try:
            # tokens refuse model offload (the text encoder is back-propagated through): a residual mode there
            cfg_o = cfg if cfg.parametrisation != "tokens" else dataclasses.replace(cfg, parametrisation="free")
            inv2 = Inverter(pipe, cfg_o, root / "out2", progress=False)
            states[:] = [inv2._new_state(i) for i in idents[:2]]
            inv = inv2
            # compiled only when the compile part ran first (it compiles the transformer's blocks in place)
            done = "compile" in parts
            b.res["invert_offload_model_setup"] = {**peaks(), "compiled": done}
            for K in (1, 2):
                steps(f"invert_offload_model_K{K}_ckpt", f"inversion step, offload=model ({cfg_o.parametrisation})"
                      + (", compiled" if done else ", eager"), K, True, warmup=2)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            b.res["invert_offload_model"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            b.row("inversion, offload=model", f"FAILED: {type(e).__name__}")
    if CUDA and "group" in parts:
        section_group(b, pipe, S)
    td.cleanup()


# Targets the toy-world head trained on (3,000 steps x 64 targets, docs/head.md), and a budget of 50 target photos
# per identity for 20,000 real ones: the two step counts the GPU-hour estimate of a head is stated at.
HEAD_TARGETS = {"toy_run_192k": 3000 * 64, "20k_ids_x50": 20_000 * 50}


def section_head(b: Bench, pipe, S: dict, tiny: bool, id_loss: bool = False):
    """One end-to-end head training step at full size: a resampler head with token output (the default) over
    cached Qwen3-VL-8B tokens of 3 reference photos per person, its tokens read by the 7B text encoder and the
    target's flow-matching loss through the 20B transformer, backward to the head (refgen.identity.train_e2e's own
    `_optimise`). K people per step, with and without gradient checkpointing. The vision tower is frozen and runs
    once per photo (the features row), so it is not part of the step. `id_loss`: the same steps with
    `id_weight` 0.2, which adds a VAE decode of each target's estimate and the vision tower's forward and backward
    on it (`id_loss.mean_id_loss`)."""
    from refgen.identity.prompts import encode_prompts
    from refgen.identity.render import execution_device
    from refgen.identity.train_e2e import (E2EConfig, E2EData, _frozen_flow_model, _optimise, attach_text_encoder,
                                           build_e2e_head, single_batch, step_generator)

    H, W = S["H"], S["W"]
    dev = execution_device(pipe)
    pipe.text_encoder.to(dev)
    D = 32 if tiny else 4096  # Qwen3-VL-8B's merged visual token width
    T = 16 if tiny else 1024  # merged tokens of one ~1 MP reference photo (32 x 32 pixels each)
    n_people, photos = 4, 4
    P = n_people * photos
    scale = 2 ** len(pipe.vae.temperal_downsample)
    g = torch.Generator().manual_seed(0)
    enc = encode_prompts(pipe, [PROMPT], repeat=S["slot_repeat"])  # the window the head writes (L tokens)
    data = E2EData(
        ids=[f"seed_{i}" for i in range(n_people)],
        photos=[torch.arange(i * photos, (i + 1) * photos) for i in range(n_people)],
        tokens=torch.randn(P, T, D, generator=g).to(dev), tok_mask=torch.ones(P, T, dtype=torch.bool, device=dev),
        means=torch.randn(P, D, generator=g).to(dev),
        latents=torch.randn(P, pipe.vae.config.z_dim, H // scale, W // scale, generator=g).to(dev, pipe.vae.dtype),
        photo_row=torch.zeros(P, dtype=torch.long, device=dev), bank=enc.embeds, bank_mask=enc.mask,
        bank_starts=torch.tensor([[enc.slots[0][0].start, -1]], device=dev), L=enc.slots[0][0].length, H=0,
        teachers=None, pairs=None)
    attach_text_encoder(data, pipe, [PROMPT], S["slot_repeat"])
    if id_loss:  # the ID loss reads the decoded estimate through the Qwen3-VL-8B vision tower (random weights)
        vis, Dv = build_vision_tower(tiny)
        if Dv != D:
            raise ValueError(f"vision tower width {Dv} != the features' {D}")
        data.vae, data.vl = pipe.vae, TowerReader(vis.requires_grad_(False))
    for ckpt in (False, True):
        cfg = E2EConfig(height=H, width=W, refs_min=3, refs_max=3, gradient_checkpointing=ckpt,
                        id_weight=0.2 if id_loss else 0.0, slot_repeat=S["slot_repeat"])
        fm = _frozen_flow_model(pipe, cfg)
        if not ckpt:
            pipe.transformer.disable_gradient_checkpointing()
        torch.manual_seed(0)
        head = build_e2e_head(cfg, D, data.L, data.H).to(dev)
        params = list(head.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3)
        tag = ("_ckpt" if ckpt else "") + ("_id" if id_loss else "")
        what = (" +ckpt" if ckpt else "") + (" +ID loss" if id_loss else "")
        for K in ((1, 2) if tiny else (1, 2, 4)):
            cfg.batch_size = K
            batch = single_batch(data, list(range(K)), cfg, step_generator(0, "step", K))
            r = b.measure(f"head_e2e_K{K}{tag}", f"e2e head step (resampler, token output): K={K} targets{what}",
                          lambda: _optimise(head, opt, params, data, batch, fm, cfg, pipe.transformer.dtype, 0, 0, 1,
                                            dev), repeat=1 if tiny else 3, warmup=1, per=K)
            if r:
                r["gpu_hours"] = {k: n * r["per_item_s"] / 3600 for k, n in HEAD_TARGETS.items()}
                b.row(f"  -> head K={K}{what}", ", ".join(
                    f"{k}: {h:.1f} GPU-hours" for k, h in r["gpu_hours"].items()))
                b.save()
        del head, opt, params
        peak_reset()


class TowerReader:
    """What the ID loss reads of a generated image (`VisionFeatures.pixel_means`), from the bench's vision tower."""

    def __init__(self, vis):
        from refgen.tiny_qwen import build_qwen3_vl_image_processor

        self.vis, self.processor = vis, build_qwen3_vl_image_processor()
        p = next(vis.parameters())
        self.device, self.dtype = p.device, p.dtype

    def pixel_means(self, images: torch.Tensor) -> torch.Tensor:
        from refgen.identity.features import pixel_means

        return pixel_means(images, lambda pv, thw: self.vis(pv.to(self.device, self.dtype),
                                                            grid_thw=thw.to(self.device)),
                           self.processor, self.vis.config.spatial_merge_size)


def section_features(b: Bench, S: dict, tiny: bool):
    """Qwen3-VL-8B vision tower, 3 photos under a 2 MP budget; head. The tower's own memory is `extra_gib`
    (peak over what was resident before it: the pipeline may still be on the GPU)."""
    from PIL import Image

    from refgen.identity.features import FeatureConfig, budget_sizes
    from refgen.identity.head import LinearHead
    from refgen.tiny_qwen import build_qwen3_vl_image_processor

    peak_reset()
    before = resident_gib()
    vis, D = build_vision_tower(tiny)
    b.res["features_weights_gib"] = resident_gib() - before
    proc = build_qwen3_vl_image_processor()
    proc.size["shortest_edge"] = 32 * 32
    fc = FeatureConfig(pixel_budget=0.05e6 if tiny else 2.0e6)
    proc.size["longest_edge"] = max(proc.size["longest_edge"], int(fc.pixel_budget))
    photos = [Image.new("RGB", (1200, 1600), (i * 60, 90, 30)) for i in range(3)]
    sizes = budget_sizes([p.size for p in photos], fc)
    inp = proc(images=[p.resize(s) for p, s in zip(photos, sizes)], return_tensors="pt")
    vdev = next(vis.parameters()).device
    pv, thw = inp["pixel_values"].to(vdev, next(vis.parameters()).dtype), inp["image_grid_thw"].to(vdev)
    with torch.no_grad():
        r = b.measure("features", f"Qwen3-VL-8B vision tower, 3 photos @2 MP budget ({pv.shape[0]} patches)",
                      lambda: vis(pv, grid_thw=thw), repeat=3 if not tiny else 1)
        head = LinearHead(D, S["L"], S["Hd"]).to(vdev, pv.dtype)
        z = torch.randn(1, D, device=vdev, dtype=pv.dtype)
        t_head = timed(lambda: head(z), repeat=20)
    b.res.update(head_s=t_head, features_patches=int(pv.shape[0]))
    b.row("linear head z -> (L, H)", f"{t_head * 1e3:.3f} ms")
    if r:
        b.res["new_identity_s"] = r["s"] + t_head
        b.row("new identity: features + head", f"{r['s'] + t_head:.3f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny models on CPU, 2 steps: checks the code runs")
    ap.add_argument("--section", choices=["render", "invert", "head", "flops", "all"], default="all")
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default=",".join(INVERT_PARTS), help=f"invert section: any of {INVERT_PARTS}")
    ap.add_argument("--parametrisation", default="tokens", help="invert section: InvertConfig.parametrisation "
                    "(tokens, free, rms_scaled); offload runs a residual mode")
    ap.add_argument("--slot-repeat", type=int, default=SLOT_REPEAT, help="invert and head sections: InvertConfig / "
                    f"E2EConfig.slot_repeat (each ~ID~ the placeholder K times over; default {SLOT_REPEAT})")
    ap.add_argument("--id-loss", action="store_true", help="head section: the same steps again with the ID loss "
                    "(id_weight 0.2: VAE decode + vision tower forward and backward per target)")
    args = ap.parse_args()
    if args.section == "all" and not args.tiny:
        raise SystemExit("--section all is for --tiny; with the real models run render and invert as two calls")
    if args.tiny:
        global CUDA
        CUDA = False  # the tiny pipeline lives on the CPU, with or without a GPU in the machine

    from refgen.identity.prompts import encode_prompts
    from refgen.identity.render import execution_device
    from refgen.tiny_qwen import build_qwen_image, build_tokenizer

    if args.section == "flops":  # full-size architecture on meta tensors: no GPU, no weights
        b = Bench(args.out, {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__})
        section_flops(b, dict(H=768, W=512))
        b.table("FLOPs of teacher inversion (QwenImageTransformer2DModel, counted on meta tensors)")
        return
    tok = build_tokenizer()
    t = time.perf_counter()
    if args.tiny:
        pipe = build_qwen_image(tok)
        pipe.set_progress_bar_config(disable=True)
        S = dict(H=32, W=32, steps=2, grid_seeds=2, reps=1, grid_bs=2, group_steps=2)
    else:
        pipe = build_full_pipeline(tok)
        S = dict(H=768, W=512, steps=28, grid_seeds=8, reps=2, grid_bs=8, group_steps=4)
    S["parametrisation"], S["slot_repeat"] = args.parametrisation, args.slot_repeat
    import diffusers
    import transformers

    meta = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d"), "size_WxH": f"{S['W']}x{S['H']}", "steps": S["steps"],
            "true_cfg": 4.0, "build_s": time.perf_counter() - t, "slot_repeat": args.slot_repeat,
            "params_transformer_B": sum(p.numel() for p in pipe.transformer.parameters()) / 1e9,
            "params_text_encoder_B": sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e9}
    b = Bench(args.out, meta)
    S["L"] = encode_prompts(pipe, PROMPT).slots[0][0].length
    S["Hd"] = pipe.transformer.config.joint_attention_dim
    S["R"] = torch.randn(S["L"], S["Hd"], device=execution_device(pipe), dtype=pipe.transformer.dtype) * 0.5
    if args.section in ("render", "all"):
        section_render(b, pipe, S)
    if args.section in ("invert", "all"):
        section_invert(b, pipe, S, args.tiny, parts=args.parts.split(","))
    if args.section in ("head", "all"):
        section_head(b, pipe, S, args.tiny)
        if args.id_loss:
            section_head(b, pipe, S, args.tiny, id_loss=True)
    b.save()
    b.table(f"identity bench, section {args.section} ({b.res['device']}, torch {b.res['torch']}, "
            f"{S['W']}x{S['H']} WxH, {S['steps']} steps, true CFG 4)")


if __name__ == "__main__":
    main()
