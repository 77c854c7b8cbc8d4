"""Toy model v2: train recipe variants side by side, one per GPU, and print what each one draws.

Each variant is configs/toyworld_model.yaml with a few keys changed. All of them run the real recipe
(`refgen.toyworld.model_recipe.train_model`) at once, one process per visible GPU, and end with the
recipe's own evaluation: VAE round trip and the caption ceiling (one and two people spelled out in
words, validation identities 300000.., never the benchmark's). The table below is read from each
model's refgen_toyworld.json.

Usage (CUDA):  python bench/toyworld_model_sweep.py --variants base,wide --out runs/sweep [--pack DIR]
  --pack DIR   also write each model folder as base.tar.part-00, ... (< 15 MiB each) into DIR
CPU smoke:     python bench/toyworld_model_sweep.py --variants tiny --out /tmp/sweep --device cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

VARIANTS: dict[str, dict] = {
    "base": {},                                                  # the YAML as it is
    "wide": {"transformer": {"heads": 8}},                       # 256 wide instead of 192
    "deep": {"transformer": {"layers": 8}},
    "long": {"transformer": {"steps": 9000}},
    # wide, a bigger batch (the step is launch-bound: samples are nearly free) and more fully described people
    "wide_b1280": {"max_minutes": 8.5, "vae": {"steps": 1000},
                   "transformer": {"heads": 8, "batch": 1280, "steps": 6000, "p_full": 0.6}},
    "tiny": "tiny",                                              # ToyModelConfig.tiny(): CPU smoke test
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def variant_config(name: str, config: str, **top):
    from refgen.config import from_dict, read_yaml
    from refgen.toyworld.model_recipe import ToyModelConfig

    if VARIANTS[name] == "tiny":
        return ToyModelConfig.tiny(eval_identities=4, eval_steps=2, **top)
    d = _merge(read_yaml(config), VARIANTS[name])
    d.update({k: v for k, v in top.items() if v is not None})
    return from_dict(ToyModelConfig, d, source=config)


def _run_one(args) -> int:
    from refgen.toyworld.model_recipe import train_model

    cfg = variant_config(args.run, args.config, device=args.device, workers=args.workers)
    train_model(cfg, Path(args.out) / args.run, progress=False)
    return 0


def _pack(model: Path, dest: Path, chunk: int = 15 * 2**20) -> list[Path]:
    """model folder -> NAME.tar.part-00, -01, ... of < chunk bytes (the device tool returns files < 16 MiB)."""
    dest.mkdir(parents=True, exist_ok=True)
    tar = dest / f"{model.name}.tar"
    with tarfile.open(tar, "w") as t:
        t.add(model, arcname=model.name)
    data, parts = tar.read_bytes(), []
    tar.unlink()
    for i in range(0, len(data), chunk):
        p = dest / f"{model.name}.tar.part-{i // chunk:02d}"
        p.write_bytes(data[i:i + chunk])
        parts.append(p)
    return parts


def _row(name: str, rep: dict) -> str:
    r = rep["report"]
    e = r.get("eval", {})
    c, v = e.get("ceiling", {}), e.get("vae_roundtrip", {})

    def pct(m, k):
        if not m:
            return "-"
        ci = m.get(k.replace("_acc", "_ci"))
        return f"{m[k]:.1%} [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else f"{m[k]:.1%}"

    s, p = c.get("single"), c.get("pair")
    if not (s and p):
        return f"| {name} | (no evaluation) |"
    c32 = e.get("fp32_compute", {}).get("ceiling", {})
    return (f"| {name} | {r['transformer_steps_done']} | {r['train_s']:.0f} | {r['total_s']:.0f} | "
            f"{r['weights_mb']:.1f} | {pct(v.get('original'), 'identity_acc')} | "
            f"{pct(v.get('reconstruction'), 'identity_acc')} | {pct(s, 'identity_acc')} | "
            f"{s['attribute_acc']:.1%} | {pct(s, 'scene_acc')} | {pct(p, 'all_people_acc')} | "
            f"{p['identity_acc']:.1%} | {pct(c32.get('single'), 'identity_acc')} | "
            f"{pct(c32.get('pair'), 'all_people_acc')} | {r['stopped_early']} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="base")
    ap.add_argument("--config", default="configs/toyworld_model.yaml")
    ap.add_argument("--out", required=True)
    ap.add_argument("--pack", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: train one variant here
    args = ap.parse_args(argv)
    if args.run:
        return _run_one(args)
    names = args.variants.split(",")
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; known: {sorted(VARIANTS)}")
    import torch

    n_gpu = torch.cuda.device_count() if args.device != "cpu" else 0
    if args.device != "cpu" and n_gpu < len(names):
        ap.error(f"{len(names)} variants need {len(names)} GPUs, {n_gpu} visible")
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) // max(1, len(names)) - 1)
    procs = []
    for i, n in enumerate(names):
        env = dict(os.environ)
        if n_gpu:
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        cmd = [sys.executable, __file__, "--run", n, "--config", args.config, "--out", args.out,
               "--workers", str(0 if args.device == "cpu" else workers)]
        if args.device:
            cmd += ["--device", args.device]
        log = open(Path(args.out).mkdir(parents=True, exist_ok=True) or Path(args.out) / f"{n}.log", "w")
        procs.append((n, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for n, p, log in procs:
        if p.wait():
            failed.append(n)
        log.close()
    print("| variant | steps | train s | total s | MB | recognizer on renders | on VAE round trips | "
          "ceiling, one person [95 % CI] | attributes | scene | ceiling, two people both right | per person | "
          "fp32 compute: one person | fp32 compute: two people | stopped early |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in names:
        meta = Path(args.out) / n / "refgen_toyworld.json"
        if meta.exists():
            print(_row(n, json.loads(meta.read_text())))
            if args.pack:
                _pack(Path(args.out) / n, Path(args.pack))
        else:
            print(f"| {n} | failed: see {Path(args.out) / n}.log |")
            print((Path(args.out) / f"{n}.log").read_text()[-3000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
