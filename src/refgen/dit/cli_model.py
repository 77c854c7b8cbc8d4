"""`refgen dit train | sample | validate`: argparse only translates flags into the plain functions."""

from __future__ import annotations

import argparse
import json


def _train(args) -> int:
    from refgen.dit.config import load_train_config
    from refgen.dit.train import train

    cfg = load_train_config(args.config, data_dir=args.data_dir, out_dir=args.out_dir, steps=args.steps,
                            device=args.device, init_from=args.init_from, resume=args.resume)
    summary = train(cfg)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _sample(args) -> int:
    import torch

    from refgen.artifacts import atomic_save_image, atomic_torch_save, atomic_write_json, provenance
    from refgen.dit.model import Cond
    from refgen.dit.sample import decode, sample, to_pil
    from refgen.dit.train import latest_checkpoint, model_from_checkpoint
    from refgen.runtime import resolve_device
    from pathlib import Path

    device = resolve_device(args.device)
    ckpt = Path(args.ckpt)
    if ckpt.is_dir():   # a run's out_dir or its checkpoints/ folder: the latest checkpoint in it
        ckpt = latest_checkpoint(ckpt) or latest_checkpoint(ckpt.parent if ckpt.name == "checkpoints" else ckpt)
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoints/latest.json under {args.ckpt}")
    model, cfg = model_from_checkpoint(ckpt, device)
    from refgen.dit import shards

    # conditions (T5, DINO) of the first --n samples of the shard directory: the model's inputs are
    # encoder features, so sampling "for an image" means sampling from that image's stored features
    batch = next(iter(shards.make_dataset(args.data_dir, args.n, shuffle=False, seed=args.seed)))
    cond = Cond.from_batch(batch, device)
    h, w = batch["latent"].shape[-2:]
    amp = torch.bfloat16 if device.type == "cuda" else None
    lat = sample(model, cond, (h, w), steps=args.steps, shift=args.shift, s_text=args.s_text, s_dino=args.s_dino,
                 guidance=args.guidance, seed=args.seed, autocast_dtype=amp, progress=True)
    out = Path(args.out)
    atomic_torch_save({"latents": lat.cpu(), "key": batch["key"], "caption": batch["caption"]}, out / "latents.pt")
    if args.vae:
        from refgen.dit.encoders import load_vae

        vae = load_vae(args.vae, args.vae_subfolder, device, torch.bfloat16 if device.type == "cuda" else
                       torch.float32)
        mean, std = shards.load_latent_stats(args.data_dir)
        for img, key in zip(to_pil(decode(lat, vae, mean, std)), batch["key"]):
            atomic_save_image(img, out / f"{key}.png")
    flags = {k: v for k, v in vars(args).items() if k != "func"}
    atomic_write_json(out / "sample.json", provenance(flags, checkpoint=str(ckpt), keys=batch["key"],
                                                      captions=batch["caption"]))
    print(f"wrote {out}")
    return 0


def _validate(args) -> int:
    from refgen.dit.validate import run_validation

    report = run_validation(args.preset, args.out, device=args.device, steps=args.steps)
    print(json.dumps({"results": report["results"], "seconds": report["seconds"], "passed": report["passed"]},
                     indent=2))
    return 0 if report["passed"] or args.preset == "tiny" else 1


def register(dit_subparsers) -> None:
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
    s.add_argument("--n", type=int, default=4)
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--shift", type=float, default=1.0)
    s.add_argument("--s-text", type=float, default=4.0)
    s.add_argument("--s-dino", type=float, default=2.0)
    s.add_argument("--guidance", choices=["dual", "none"], default="dual")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--vae", help="VAE id or folder; without it only latents are written")
    s.add_argument("--vae-subfolder", default="vae")
    s.add_argument("--device")
    s.set_defaults(func=_sample)

    v = dit_subparsers.add_parser("validate", help="seed 002 part B on a toy world: overfit, DINO swap, text")
    v.add_argument("--preset", default="h100", choices=["h100", "cpu", "tiny"])
    v.add_argument("--out", default="runs/dit_validate")
    v.add_argument("--device")
    v.add_argument("--steps", type=int, help="override the preset's training steps")
    v.set_defaults(func=_validate)


def _standalone(argv=None) -> int:
    """`python -m refgen.dit.cli_model ...` until the lead wires `register` into `refgen dit`."""
    p = argparse.ArgumentParser(prog="refgen dit")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(_standalone())
