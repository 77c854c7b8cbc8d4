"""`refgen dit prepare` and `refgen dit tiny-models`: argparse only translates flags into PrepareConfig."""

from __future__ import annotations

import argparse
import json
import sys


def _none_if_empty(s: str | None) -> str | None:
    return s or None


def _prepare(args) -> int:
    from refgen.dit.prepare import PrepareConfig, prepare

    try:
        cfg = PrepareConfig(
            src=args.src, out=args.out, vae=args.vae, vae_subfolder=_none_if_empty(args.vae_subfolder),
            text_encoder=args.text_encoder, text_encoder_subfolder=_none_if_empty(args.text_encoder_subfolder),
            tokenizer=args.tokenizer, tokenizer_subfolder=_none_if_empty(args.tokenizer_subfolder),
            dino=args.dino, dino_subfolder=_none_if_empty(args.dino_subfolder), buckets=args.buckets,
            t5_max_length=args.t5_max_length, shard_size=args.shard_size, batch_size=args.batch_size,
            num_workers=args.num_workers, device=args.device, dtype=args.dtype, store_dtype=args.store_dtype,
            dit_patch_size=args.dit_patch_size,
            max_upscale=args.max_upscale, max_aspect_distortion=args.max_aspect_distortion,
            overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        print(f"refgen dit prepare: {e}", file=sys.stderr)
        return 2
    index = prepare(cfg, progress=not args.no_progress)
    per_bucket = {b: v["count"] for b, v in index["buckets"].items()}
    print(json.dumps({"out": args.out, "samples": index["samples"], "skipped": index["skipped"],
                      "buckets": per_bucket}, indent=2))
    if index["skipped"]:
        print(f"{index['skipped']} file(s) skipped; reasons in {args.out}/skipped.json", file=sys.stderr)
    return 0


def _tiny_models(args) -> int:
    from refgen.dit.tiny_encoders import write_tiny_models

    paths = write_tiny_models(args.out)
    print(json.dumps(paths, indent=2))
    print(f"try: refgen dit prepare IMAGES SHARDS --vae {paths['vae']} --text-encoder {paths['text_encoder']} "
          f"--dino {paths['dino']} --device cpu --dtype fp32 --buckets 64x64,64x128,128x64", file=sys.stderr)
    return 0


def register(dit_subparsers) -> None:
    """Add `prepare` and `tiny-models` to the `refgen dit` subparsers."""
    from refgen.dit.hub_ids import DEFAULT_DINO, DEFAULT_T5, DEFAULT_VAE

    p = dit_subparsers.add_parser(
        "prepare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="images (+ .json/.txt captions) -> per-bucket WebDataset shards of VAE latents, T5 and DINOv3 "
             "features (resumable)")
    p.add_argument("src", help="folder of images; captions in NAME.json ('caption' field) or NAME.txt beside them")
    p.add_argument("out", help="output folder (shards, index.json, latent_stats.json, report.jsonl)")
    p.add_argument("--vae", default=DEFAULT_VAE, help="AutoencoderKL: hub id or local folder")
    p.add_argument("--vae-subfolder", default="vae", help="'' for none; ignored by a local folder without it")
    p.add_argument("--text-encoder", default=DEFAULT_T5,
                   help="T5EncoderModel: hub id or folder (t5-v1_1-xxl 4096-d, t5-v1_1-large 1024-d)")
    p.add_argument("--text-encoder-subfolder", default="")
    p.add_argument("--tokenizer", default=None, help="T5 tokenizer (default: the text encoder's folder)")
    p.add_argument("--tokenizer-subfolder", default="")
    p.add_argument("--dino", default=DEFAULT_DINO, help="DINOv3ViTModel: hub id or local folder")
    p.add_argument("--dino-subfolder", default="")
    p.add_argument("--buckets", default=None,
                   help="comma-separated WxH, sides multiples of 16 (default: ~1 MP set, sides multiples of 64)")
    p.add_argument("--t5-max-length", type=int, default=512)
    p.add_argument("--dit-patch-size", type=int, default=2,
                   help="the DiT's patch size; VAE factor x this must equal the DINOv3 patch (FLUX /8: 2; /4: 4)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--batch-size", type=int, default=8, help="images per encoder forward")
    p.add_argument("--num-workers", type=int, default=4, help="image decode threads")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (tiny models only)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="encoder compute dtype")
    p.add_argument("--store-dtype", default="fp16", choices=["fp16", "fp32"], help="dtype of the stored arrays")
    p.add_argument("--max-upscale", type=float, default=2.0,
                   help="skip images needing more enlargement than this per side")
    p.add_argument("--max-aspect-distortion", type=float, default=0.15,
                   help="skip images whose aspect ratio is further than this from every bucket")
    p.add_argument("--overwrite", action="store_true", help="delete what an earlier run wrote into OUT first")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_prepare)

    t = dit_subparsers.add_parser("tiny-models",
                                  help="write tiny random-weight VAE/T5/DINOv3 folders to try `prepare` offline")
    t.add_argument("out")
    t.set_defaults(func=_tiny_models)
