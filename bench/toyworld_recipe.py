"""Where the toy-world recipe's time goes: ms per training step of each stage, before choosing steps.

Builds the recipe's components from a ToyModelConfig (configs/toyworld_model.yaml by default) with random
weights, on random images of the configured size, and times (median of --repeats after --warmup):

  vae          one AutoencoderKLQwenImage training step (encode, sample, decode, loss, backward, AdamW)
               at several batch sizes
  text bank    encode_prompt of 2,048 real world captions (the bank is built once per run)
  transformer  one QwenImageTransformer2DModel step on bank-style embeddings (padded, masked), eager and
               with diffusers' compile_repeated_blocks, at several batch sizes

Usage (CUDA):  python bench/toyworld_recipe.py [--config configs/toyworld_model.yaml] [--out result.json]
CPU smoke:     python bench/toyworld_recipe.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, dev, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000


def main(argv=None) -> int:
    from diffusers import QwenImagePipeline

    from refgen.runtime import resolve_device
    from refgen.toyworld import model_recipe as T
    from refgen.toyworld import world

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/toyworld_model.yaml")
    ap.add_argument("--tiny", action="store_true", help="ToyModelConfig.tiny() (CPU smoke test)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--vae-batches", default="64,128,256")
    ap.add_argument("--tf-batches", default="256,512")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    over = {"device": a.device} if a.device else {}
    cfg = T.ToyModelConfig.tiny(**over) if a.tiny else T.ToyModelConfig.from_yaml(a.config, **over)
    dev = resolve_device(cfg.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = []
    S = cfg.size

    # vae
    vae = T.build_vae(cfg.vae).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    for b in [int(x) for x in a.vae_batches.split(",")]:
        imgs = torch.randint(0, 255, (b, 3, S, S), dtype=torch.uint8)

        def vae_step():
            x = T.to_vae_input(imgs, dev)
            with T._autocast(dev):
                post = vae.encode(x).latent_dist
                rec = vae.decode(post.mean + post.std * torch.randn_like(post.mean)).sample
            loss = F.mse_loss(rec.float(), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        ms = _time(vae_step, dev, a.warmup, a.repeats)
        rows.append({"stage": "vae", "batch": b, "ms_per_step": ms, "img_per_s": b / ms * 1000})

    # text bank
    rng = random.Random(0)
    scenes = [world.scene_from_seed(3_000_000_000 + i) for i in range(2048)]
    caps = [world.caption(s, rng) for s in scenes]
    tok = T.train_caption_tokenizer(caps, max(cfg.text.vocab_size, 1024))  # 2,048 captions need >400 to merge the template
    te = T.build_text_encoder(tok, cfg.text, 0).to(dev)
    pipe = QwenImagePipeline(scheduler=T.build_scheduler(1.0), vae=vae, text_encoder=te, tokenizer=tok,
                             transformer=None)
    ms = _time(lambda: pipe.encode_prompt(caps, device=dev), dev, 1, 3)
    rows.append({"stage": "text bank (encode_prompt)", "batch": len(caps), "ms_per_step": ms,
                 "img_per_s": len(caps) / ms * 1000})
    emb, mask = pipe.encode_prompt(caps, device=dev)
    mask = torch.ones(emb.shape[:2], dtype=torch.bool, device=dev) if mask is None else mask.bool()

    # transformer
    h = S // 2 ** (len(cfg.vae.dim_mult) - 1)
    for compiled in ([False] if a.no_compile or dev.type != "cuda" else [False, True]):
        torch.manual_seed(0)
        tf = T.build_transformer(cfg.transformer, cfg.vae.z_dim, cfg.text.hidden).to(dev).train()
        if compiled:
            tf.compile_repeated_blocks(fullgraph=True)
        topt = torch.optim.AdamW(tf.parameters(), lr=1e-4, fused=dev.type == "cuda")
        for b in [int(x) for x in a.tf_batches.split(",")]:
            sel = torch.arange(b, device=dev) % emb.shape[0]
            e, m = emb[sel].to(torch.bfloat16 if dev.type == "cuda" else torch.float32), mask[sel]
            x0 = torch.randn(b, (h // 2) ** 2, 4 * cfg.vae.z_dim, device=dev)
            shapes = [(1, h // 2, h // 2)] * b

            def tf_step():
                s = torch.rand(b, device=dev)
                n = torch.randn_like(x0)
                with T._autocast(dev):
                    v = tf(hidden_states=(1 - s[:, None, None]) * x0 + s[:, None, None] * n, encoder_hidden_states=e,
                           encoder_hidden_states_mask=m, timestep=s, img_shapes=shapes, return_dict=False)[0]
                loss = F.mse_loss(v.float(), n - x0)
                topt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(tf.parameters(), 1.0)
                topt.step()

            t = time.perf_counter()
            ms = _time(tf_step, dev, a.warmup, a.repeats)
            rows.append({"stage": f"transformer {'compiled' if compiled else 'eager'}", "batch": b, "ms_per_step": ms,
                         "img_per_s": b / ms * 1000, "text_len": e.shape[1],
                         "incl_warmup_s": time.perf_counter() - t})
    print(f"{'stage':32s} {'batch':>6s} {'ms/step':>9s} {'img/s':>9s}")
    for r in rows:
        print(f"{r['stage']:32s} {r['batch']:6d} {r['ms_per_step']:9.2f} {r['img_per_s']:9.0f}")
    if a.out:
        from refgen.artifacts import atomic_write_json, provenance

        atomic_write_json(a.out, provenance(vars(a), rows=rows, device=str(dev),
                                            gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
