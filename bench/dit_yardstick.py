"""The DiT quality yardstick (issue 22 items 1-3): time-to-quality of NanoDiT on the toy world.

Renders toy-world scenes with captions, runs `refgen dit prepare` on them (tiny random-weight T5 and DINOv3; the toy
world's trained VAE), trains with `refgen dit train`'s `train()` and scores the EMA weights every `eval_every` steps
with the toy-world recognizer, on held-out captions (text check) and held-out images' DINO features (DINO check).
Reports training minutes until the caption attribute accuracy crosses each threshold: OUT/yardstick.json (every
scoring with 95 % Wilson intervals, ceilings, seed ranges, provenance), OUT/yardstick.png (the curves), and the
table on stdout. What it measures and what it does not: docs/dit.md, "Yardstick".

    python bench/dit_yardstick.py --config configs/dit_yardstick_nano.yaml --out runs/yard_nano
    python bench/dit_yardstick.py --config configs/dit_yardstick_base.yaml --out runs/yard_base
    python bench/dit_yardstick.py --config configs/dit_yardstick_nano.yaml --variants default,repa --out runs/yard_repa
    python bench/dit_yardstick.py --config configs/dit_yardstick_base.yaml --variants default,fp8 --compile --out runs/yard_fp8
    python bench/dit_yardstick.py --tiny --out /tmp/yard                  # CPU smoke run, ~10 s; judges nothing

Variants train from scratch on the same prepared data, one after the other, each with its own clock: `default`
(the config as is), `repa` (REPA on, refgen.dit.config.RepaConfig defaults), `fp8` (torchao float8 matmuls, CUDA).

`--resume` continues each variant from the checkpoint an earlier call left in OUT/runs/<variant>/ (one is written at
every scoring) instead of starting it again, keeps its earlier scorings and appends the new ones; `--steps` may be
larger than before. Any other setting that differs is refused, by name. One base run over two calls:

    python bench/dit_yardstick.py --config configs/dit_yardstick_base.yaml --compile --steps 4000 --out OUT
    python bench/dit_yardstick.py --config configs/dit_yardstick_base.yaml --compile --steps 8000 --resume --out OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from refgen.dit.yardstick import YardstickConfig, load_yardstick_config, run_yardstick, to_markdown

VARIANTS: dict[str, dict] = {
    "default": {},
    "repa": {"repa": {"enabled": True}},
    "fp8": {"fp8": True},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a configs/dit_yardstick_*.yaml (not with --tiny)")
    ap.add_argument("--out", required=True, help="output folder (images, shards, runs, yardstick.json / .png)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a handful of images and the tiny model")
    ap.add_argument("--variants", default="default", help=f"comma separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, help="training steps of every variant (overrides train.steps)")
    ap.add_argument("--lr", type=float, help="peak learning rate of every variant (overrides train.lr)")
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--n-train", type=int)
    ap.add_argument("--device")
    ap.add_argument("--resume", action="store_true", help="continue each variant from its checkpoint in OUT (same "
                                                          "settings; --steps may grow) instead of from scratch")
    ap.add_argument("--compile", action="store_true", help="train.compile: true for every variant (per-block "
                                                           "compile; FP8 needs it to be fast)")
    args = ap.parse_args(argv)

    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        ap.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    if args.tiny == bool(args.config):
        ap.error("give exactly one of --config and --tiny")
    over = {"out_dir": args.out, "eval_every": args.eval_every, "n_train": args.n_train, "device": args.device}
    over = {k: v for k, v in over.items() if v is not None}
    cfg = YardstickConfig.tiny(**over) if args.tiny else load_yardstick_config(args.config, **over)
    if args.steps:
        cfg.train.steps = args.steps
    if args.lr is not None:
        if not args.lr > 0:
            ap.error(f"--lr must be > 0, got {args.lr}")
        cfg.train.lr = args.lr
    if args.compile:
        cfg.train.compile = True
    try:
        report = run_yardstick(cfg, {v: VARIANTS[v] for v in names}, resume=args.resume)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"dit_yardstick: error: {e}", file=sys.stderr)
        return 1
    print(to_markdown(report))
    print(f"\n{Path(args.out) / 'yardstick.json'}, {Path(args.out) / 'yardstick.png'}; device: {report['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
