"""Identity system at full size with random weights: refgen vs plain diffusers, on one GPU.

Builds the real architectures directly on the GPU in bf16 (same FLOPs as the trained models, no download):
QwenImageTransformer2DModel (20.4B, defaults = Qwen/Qwen-Image), AutoencoderKLQwenImage, a Qwen2.5-VL-7B
text encoder, and the Qwen3-VL-8B vision tower. The tokenizer is refgen's offline byte-level BPE (the real
one cannot be downloaded here), so prompt lengths differ slightly from the real tokenizer's.

    python bench/identity_bench.py --out bench_out.json            # full size, CUDA
    python bench/identity_bench.py --tiny --out /tmp/b.json        # tiny models on CPU: checks the code runs

Prints a table and writes all numbers as JSON. Timings are medians of repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def sync():
    if torch.cuda.is_available():
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
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


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
    pipe.refgen_model_id = "random-full-size"
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


class Rows(list):
    """Table rows, also printed as they are measured (a crash later keeps what was measured)."""

    def append(self, row):
        print(f"| {row[0]} | {row[1]} |", flush=True)
        super().append(row)


def make_identities(root: Path, n: int, size=(512, 768)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(n):
        d = root / f"seed_{k}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"{j}.png")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny models on CPU, 1 step: checks the code runs")
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: plain,grid,invert,features")
    args = ap.parse_args()
    skip = set(args.skip.split(","))

    from refgen.identity.features import FeatureConfig, budget_sizes
    from refgen.identity.head import LinearHead
    from refgen.identity.inject import inject
    from refgen.identity.invert import InvertConfig, Inverter
    from refgen.identity.prompts import encode_prompts
    from refgen.identity.render import RenderConfig, render_grid, render_images
    from refgen.images import scan
    from refgen.tiny import build_qwen_image, build_qwen3_vl_image_processor, build_tokenizer

    tok = build_tokenizer()
    if args.tiny:
        pipe = build_qwen_image(tok)
        pipe.set_progress_bar_config(disable=True)
        pipe.refgen_model_id = "tiny"
        H_img, W_img, steps, grid_seeds, reps = 32, 32, 2, 2, 1
    else:
        t = time.perf_counter()
        pipe = build_full_pipeline(tok)
        build_s = time.perf_counter() - t
        H_img, W_img, steps, grid_seeds, reps = 768, 512, 28, 8, 2
    res: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "torch": torch.__version__, "size": f"{W_img}x{H_img}", "steps": steps, "true_cfg": 4.0}
    if not args.tiny:
        res["build_s"] = build_s
        res["params_transformer_B"] = sum(p.numel() for p in pipe.transformer.parameters()) / 1e9
        res["params_text_encoder_B"] = sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e9
    dev, dt = pipe._execution_device, pipe.transformer.dtype
    prompt = "a portrait photo of ~ID~, studio lighting"
    plain_prompt = "a portrait photo of a person, studio lighting"
    L = encode_prompts(pipe, prompt).slots[0][0].length
    Hd = pipe.transformer.config.joint_attention_dim
    R = torch.randn(L, Hd, device=dev, dtype=dt) * 0.5
    rows = Rows()

    # 1. plain diffusers, one image per call (the seed's way of rendering a grid)
    if "plain" not in skip:
        peak_reset()
        gen = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
        f = lambda: pipe(prompt=plain_prompt, negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=steps,  # noqa
                         height=H_img, width=W_img, generator=gen())
        res["plain_per_image_s"] = timed(f, repeat=reps, warmup=1)
        res["plain_peak_gib"] = peak_gib()
        rows.append(("plain QwenImagePipeline, 1 image/call", f"{res['plain_per_image_s']:.2f} s/image"))

    # 2. refgen single render and two-slot generate (encode once, inject, prompt_embeds)
    rc = RenderConfig(prompt=prompt, alphas=[1.0], seeds=[0], steps=steps, height=H_img, width=W_img, batch_size=1)
    neg = encode_prompts(pipe, " ")

    def one(prompt_, residuals, alphas):
        enc = encode_prompts(pipe, prompt_, n_identities=len(residuals))
        E = inject(enc.embeds, enc.slots[0], residuals, alphas)
        return render_images(pipe, E, enc.mask, [0], rc, (neg.embeds, neg.mask), progress=False)

    peak_reset()
    res["refgen_single_s"] = timed(lambda: one(prompt, [R], [1.0]), repeat=reps)
    res["refgen_two_slot_s"] = timed(lambda: one("~ID~ and ~ID~ on a beach", [R, R], [1.2, 0.9]), repeat=reps)
    res["refgen_render_peak_gib"] = peak_gib()
    rows.append(("refgen render, 1 image", f"{res['refgen_single_s']:.2f} s"))
    rows.append(("refgen generate, two slots, 1 image", f"{res['refgen_two_slot_s']:.2f} s"))

    # 3. injection overhead: encode + inject vs encode alone (the render dominates both)
    enc = encode_prompts(pipe, prompt, n_identities=1)
    t_enc = timed(lambda: encode_prompts(pipe, prompt, n_identities=1), repeat=5)
    t_inj = timed(lambda: inject(enc.embeds, enc.slots[0], [R], [1.0]), repeat=20)
    res["encode_s"], res["inject_s"] = t_enc, t_inj
    res["inject_overhead_pct_of_render"] = 100 * t_inj / res["refgen_single_s"]
    rows.append(("inject (1 slot)", f"{t_inj * 1e3:.3f} ms = {res['inject_overhead_pct_of_render']:.4f}% of a render"))

    # 4. alpha grid 4 x grid_seeds, batched (8 images per pipeline call)
    if "grid" not in skip:
        for bs in ([2] if args.tiny else [8]):
            gc = RenderConfig(prompt=prompt, alphas=[0.5, 1.0, 1.5, 2.0], seeds=list(range(grid_seeds)), steps=steps,
                              height=H_img, width=W_img, batch_size=bs)
            peak_reset()
            with tempfile.TemporaryDirectory() as td:
                sync()
                t = time.perf_counter()
                render_grid(pipe, gc, [R], td, progress=False)
                sync()
                res[f"grid_bs{bs}_s"] = time.perf_counter() - t
            res[f"grid_bs{bs}_peak_gib"] = peak_gib()
            n = 4 * grid_seeds
            rows.append((f"alpha grid 4x{grid_seeds}, {bs} images/call",
                         f"{res[f'grid_bs{bs}_s']:.1f} s ({res[f'grid_bs{bs}_s'] / n:.2f} s/image), "
                         f"peak {res[f'grid_bs{bs}_peak_gib']:.1f} GiB"))
        if "plain_per_image_s" in res:
            res["plain_grid_extrapolated_s"] = res["plain_per_image_s"] * 4 * grid_seeds
            rows.append((f"plain grid 4x{grid_seeds} (= {4 * grid_seeds} x measured per-image)",
                         f"{res['plain_grid_extrapolated_s']:.1f} s"))

    # 5. teacher inversion: steps/s and peak memory vs identities per batch and checkpointing
    if "invert" not in skip:
        with tempfile.TemporaryDirectory() as td:
            root = Path(td)
            make_identities(root, 4, size=(W_img + 64, H_img + 64))
            idents = scan(root).identities
            grid = [(1, False), (2, False), (2, True), (4, True)] if not args.tiny else [(1, False), (2, True)]
            for K, ckpt in grid:
                cfg = InvertConfig(height=H_img, width=W_img, identities_per_batch=K, steps=10 ** 6, qa=False,
                                   gradient_checkpointing=ckpt, checkpoint_every=10 ** 6)
                if not ckpt:
                    pipe.transformer.disable_gradient_checkpointing()
                pipe.text_encoder.to(dev)  # the last Inverter offloaded it; encoding an 8B model on the CPU is slow
                peak_reset()
                try:
                    inv = Inverter(pipe, cfg, root / "out", progress=False)
                    states = [inv._new_state(i) for i in idents[:K]]
                    opt = torch.optim.AdamW([{"params": [s.P, s.log_scale], "lr": cfg.lr} for s in states])
                    n_rep = 1 if args.tiny else 5
                    step_s = timed(lambda: inv._step(states, opt), repeat=n_rep, warmup=1)
                    key = f"invert_K{K}{'_ckpt' if ckpt else ''}"
                    res[key] = {"step_s": step_s, "peak_gib": peak_gib(), "rows": K * cfg.images_per_step,
                                "identities_per_gpu_hour_at_600_steps": 3600 * K / (600 * step_s)}
                    rows.append((f"inversion K={K} ({K * cfg.images_per_step} rows){' +ckpt' if ckpt else ''}",
                                 f"{step_s * 1e3:.0f} ms/step, peak {peak_gib():.1f} GiB, "
                                 f"{res[key]['identities_per_gpu_hour_at_600_steps']:.1f} id/GPU-h @600 steps"))
                except torch.OutOfMemoryError:
                    rows.append((f"inversion K={K}{' +ckpt' if ckpt else ''}", "out of memory"))
                    res[f"invert_K{K}{'_ckpt' if ckpt else ''}"] = "OOM"
                finally:
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()

    # 6. features: Qwen3-VL-8B vision tower, 3 photos under a 2 MP budget; then the head
    if "features" not in skip:
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        from PIL import Image

        vis, D = build_vision_tower(args.tiny)
        proc = build_qwen3_vl_image_processor()
        proc.size["shortest_edge"] = 32 * 32
        fc = FeatureConfig(pixel_budget=0.05e6 if args.tiny else 2.0e6)
        proc.size["longest_edge"] = max(proc.size["longest_edge"], int(fc.pixel_budget))
        photos = [Image.new("RGB", (1200, 1600), (i * 60, 90, 30)) for i in range(3)]
        sizes = budget_sizes([p.size for p in photos], fc)
        inp = proc(images=[p.resize(s) for p, s in zip(photos, sizes)], return_tensors="pt")
        vdev = next(vis.parameters()).device
        pv, thw = inp["pixel_values"].to(vdev, next(vis.parameters()).dtype), inp["image_grid_thw"].to(vdev)
        peak_reset()
        with torch.no_grad():
            t_feat = timed(lambda: vis(pv, grid_thw=thw), repeat=3 if not args.tiny else 1)
            head = LinearHead(D, L, Hd).to(vdev, pv.dtype)
            z = torch.randn(1, D, device=vdev, dtype=pv.dtype)
            t_head = timed(lambda: head(z), repeat=20)
        res["features_s_per_identity"] = t_feat
        res["features_images_per_s"] = 3 / t_feat
        res["features_patches"] = int(pv.shape[0])
        res["features_peak_gib"] = peak_gib()
        res["head_s"] = t_head
        rows.append(("Qwen3-VL-8B vision tower, 3 photos @2 MP budget",
                     f"{t_feat * 1e3:.0f} ms ({3 / t_feat:.1f} images/s, {pv.shape[0]} patches), "
                     f"peak {res['features_peak_gib']:.1f} GiB"))
        rows.append(("linear head z -> (L, H)", f"{t_head * 1e3:.3f} ms"))
        rows.append(("new identity: features + head", f"{(t_feat + t_head):.3f} s"))

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"\n## identity bench ({res['device']}, torch {res['torch']}, {res['size']}, {steps} steps, true CFG 4)")
    print("| what | measured |\n|---|---|")
    for a, b in rows:
        print(f"| {a} | {b} |")


if __name__ == "__main__":
    main()
