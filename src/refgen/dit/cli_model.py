"""`refgen dit train | sample | validate`: argparse only translates flags into the plain functions."""

from __future__ import annotations

import json
from pathlib import Path


def _train(args) -> int:
    from refgen.dit.config import load_train_config
    from refgen.dit.train import train

    cfg = load_train_config(args.config, data_dir=args.data_dir, out_dir=args.out_dir, steps=args.steps,
                            device=args.device, init_from=args.init_from, resume=args.resume)
    summary = train(cfg, config_name=args.config)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def recorded_vae(shard_dir: str | Path) -> tuple[str, str | None, str]:
    """(source, subfolder, where it was read) of the VAE `refgen dit prepare` encoded SHARDS with."""
    shard_dir = Path(shard_dir)
    enc, cfg = shard_dir / "encoders.json", shard_dir / "config.json"
    if enc.is_file():
        v = json.loads(enc.read_text()).get("vae", {})
        if v.get("source"):
            return v["source"], v.get("subfolder"), str(enc)
    if cfg.is_file():
        c = json.loads(cfg.read_text()).get("config", {})
        if c.get("vae"):
            return c["vae"], c.get("vae_subfolder"), str(cfg)
    raise FileNotFoundError(f"{shard_dir} records no VAE (no encoders.json / config.json from `refgen dit prepare`); "
                            f"pass --vae, or --no-decode for latents only")


def sample_buckets(requested: list[str] | None, index: dict, shard_dir) -> list[str] | None:
    """The buckets `--bucket` names ('all' = every bucket with samples, in index.json's order); None when not
    given (then the first --n samples of the shard order give the conditions, whatever their bucket)."""
    if not requested:
        return None
    have = [b for b, v in index["buckets"].items() if v.get("count", 0) > 0]
    names = have if "all" in requested else list(dict.fromkeys(requested))
    unknown = [b for b in names if b not in have]
    if unknown:
        raise ValueError(f"--bucket {', '.join(unknown)}: not a bucket with samples in "
                         f"{Path(shard_dir) / 'index.json'} (it has {', '.join(have)})")
    return names


def _sample(args) -> int:
    import torch

    from refgen.artifacts import atomic_save_image, atomic_torch_save, atomic_write_json, provenance
    from refgen.dit import shards
    from refgen.dit.config import model_mismatches, shard_dims
    from refgen.dit.model import Cond
    from refgen.dit.sample import decode, sample, to_pil
    from refgen.dit.train import latest_checkpoint, model_from_checkpoint
    from refgen.runtime import resolve_device

    device = resolve_device(args.device)
    ckpt = Path(args.ckpt)
    if ckpt.is_dir():   # a run's out_dir or its checkpoints/ folder: the latest checkpoint in it
        ckpt = latest_checkpoint(ckpt) or latest_checkpoint(ckpt.parent if ckpt.name == "checkpoints" else ckpt)
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoints/latest.json under {args.ckpt}")
    elif not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    index = shards.load_index(args.data_dir)
    dims = shard_dims(index, args.data_dir)
    buckets = sample_buckets(args.bucket, index, args.data_dir)
    vae_src = None if args.no_decode else ((args.vae, args.vae_subfolder, "--vae") if args.vae
                                           else recorded_vae(args.data_dir))
    model, cfg = model_from_checkpoint(ckpt, device)
    bad = model_mismatches(cfg.model, dims)
    if bad:
        raise ValueError(f"checkpoint {ckpt} does not fit the shards in {args.data_dir}: " + "; ".join(
            f"model.{k} {m} vs {d} in the shards" for k, m, d in bad))
    vae = None
    if vae_src is not None:
        from refgen.dit.encoders import load_vae

        vae = load_vae(vae_src[0], vae_src[1], device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        mean, std = shards.load_latent_stats(args.data_dir)
    amp = torch.bfloat16 if device.type == "cuda" else None
    out = Path(args.out)

    def one(batch: dict, folder: Path) -> dict:
        # the model's inputs are encoder features, so sampling "for an image" means sampling from that image's
        # stored features (T5 of its caption, DINO of its pixels)
        cond = Cond.from_batch(batch, device)
        h, w = batch["latent"].shape[-2:]
        lat = sample(model, cond, (h, w), steps=args.steps, shift=args.shift, s_text=args.s_text,
                     s_dino=args.s_dino, guidance=args.guidance, seed=args.seed, autocast_dtype=amp, progress=True)
        atomic_torch_save({"latents": lat.cpu(), "key": batch["key"], "caption": batch["caption"]},
                          folder / "latents.pt")
        written = []
        if vae is not None:
            for img, key in zip(to_pil(decode(lat, vae, mean, std)), batch["key"]):
                atomic_save_image(img, folder / f"{key}.png")
                written.append(f"{key}.png" if folder == out else f"{folder.name}/{key}.png")
        return {"keys": batch["key"], "captions": batch["caption"], "images": written,
                "latent_shape": list(lat.shape)}

    if buckets is None:   # the first --n samples of the shard order
        res = one(next(iter(shards.make_dataset(args.data_dir, args.n, shuffle=False, seed=args.seed))), out)
        per_bucket = None
    else:                 # --n samples of each bucket, in out/WxH/
        per_bucket = {b: one(next(iter(shards.make_dataset(args.data_dir, args.n, shuffle=False, seed=args.seed,
                                                           buckets=[b]))), out / b) for b in buckets}
        res = {k: [x for r in per_bucket.values() for x in r[k]] for k in ("keys", "captions", "images")}
    flags = {k: v for k, v in vars(args).items() if k != "func"}
    atomic_write_json(out / "sample.json", provenance(flags, checkpoint=str(ckpt), keys=res["keys"],
                                                      captions=res["captions"], images=res["images"],
                                                      buckets=per_bucket, vae=vae_src[0] if vae_src else None))
    written = res["images"]
    where = f" in {len(buckets)} bucket folders ({', '.join(buckets)})" if buckets else ""
    if written:
        print(f"wrote {len(written)} images ({', '.join(written[:2])}{', ...' if len(written) > 2 else ''}) decoded "
              f"with the VAE {vae_src[0]} (from {vae_src[2]}), latents.pt and sample.json to {out}{where}")
    else:
        shape = tuple(res['latent_shape']) if 'latent_shape' in res else 'one per bucket'
        print(f"wrote latents.pt ({shape}) and sample.json to {out}{where} "
              f"(--no-decode: no images)")
    return 0


def _validate(args) -> int:
    import sys

    from refgen.dit.validate import presets, run_validation

    p = presets()[args.preset]
    print(f"[dit validate] preset {args.preset}: {p.expected_time}"
          + (f" (at its {p.steps} steps; --steps {args.steps} given)" if args.steps else ""), file=sys.stderr)
    report = run_validation(args.preset, args.out, device=args.device, steps=args.steps)
    print(json.dumps({"results": report["results"], "seconds": report["seconds"], "passed": report["passed"]},
                     indent=2))
    if report["passed"] is None:
        print(f"[dit validate] preset {args.preset} is a smoke test: every step ran, nothing is judged (its numbers "
              f"mean nothing); --preset cpu or h100 validates", file=sys.stderr)
        return 0
    if not report["passed"]:
        failed = [k for k, r in report["results"].items() if not r["passed"]]
        print(f"refgen dit validate: error: failed {', '.join(failed)} (thresholds: docs/dit.md; numbers and "
              f"pictures: {Path(args.out) / 'validate.json'})", file=sys.stderr)
        return 1
    return 0


def register(dit_subparsers) -> None:
    from refgen.cli import parse_seed

    t = dit_subparsers.add_parser("train", help="train NanoDiT (rectified flow); torchrun for DDP")
    t.add_argument("--config", required=True, help="YAML mirroring refgen.dit.config.TrainConfig")
    t.add_argument("--data-dir", help="shard directory (overrides data_dir)")
    t.add_argument("--out-dir", help="run directory (overrides out_dir)")
    t.add_argument("--steps", type=int)
    t.add_argument("--device", help="cuda (default) or cpu for tiny models")
    t.add_argument("--init-from", help="warm start: checkpoint whose matching weights are loaded")
    t.add_argument("--resume", help="'auto' (default in the config), or a checkpoint path")
    t.set_defaults(func=_train)

    s = dit_subparsers.add_parser("sample", help="sample with the EMA weights, dual CFG, decode with the VAE")
    s.add_argument("--ckpt", required=True, help="checkpoint file, or a run's out_dir/checkpoints folder")
    s.add_argument("--data-dir", required=True, help="shards whose first --n samples give the conditions")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=4, help="samples (per bucket with --bucket)")
    s.add_argument("--bucket", action="append",
                   help="WxH: sample --n conditions of this bucket into OUT/WxH/ (repeatable; 'all' = every bucket)")
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--shift", type=float, default=1.0)
    s.add_argument("--s-text", type=float, default=4.0)
    s.add_argument("--s-dino", type=float, default=2.0)
    s.add_argument("--guidance", choices=["dual", "none"], default="dual")
    s.add_argument("--seed", type=parse_seed, default=0)
    s.add_argument("--vae", help="VAE id or folder (default: the one `dit prepare` recorded in the shards)")
    s.add_argument("--vae-subfolder", default="vae")
    s.add_argument("--no-decode", action="store_true", help="write latents.pt only, no images")
    s.add_argument("--device", help="cuda (default), or cpu for tiny models (< 200M parameters)")
    s.set_defaults(func=_sample)

    v = dit_subparsers.add_parser("validate", help="overfit, DINO swap and text control, judged on a toy world")
    v.add_argument("--preset", default="h100", choices=["h100", "cpu", "tiny"],
                   help="h100: the real run (~9 min on one H100); cpu: a CPU sanity check (~6-11 min on 2 idle "
                        "cores, longer under load); tiny: a smoke test (~5 s) that judges nothing")
    v.add_argument("--out", default="runs/dit_validate")
    v.add_argument("--device")
    v.add_argument("--steps", type=int, help="override the preset's training steps")
    v.set_defaults(func=_validate)
