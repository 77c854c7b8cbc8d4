"""`refgen toyworld ...` subcommands. `register(sub)` adds them to an argparse subparsers object;
each maps onto one plain function and returns an exit code."""

from __future__ import annotations

import json
from pathlib import Path


def _make_identities(args) -> int:
    from refgen.toyworld.identities import make_identities

    k = {"min_images": args.photos, "max_images": args.photos} if args.photos else {}
    folders = make_identities(args.out, n=args.n, seed=args.seed, size=args.size, pair_images=args.pair_images,
                              progress=not args.quiet, **k)
    print(f"{len(folders)} identities in {args.out} (seed_{args.seed} .. seed_{args.seed + args.n - 1})")
    return 0


def _train_recognizer(args) -> int:
    from refgen.toyworld import recognizer as R

    over = {k: v for k, v in {"steps": args.steps, "n_train": args.n_train, "batch": args.batch, "seed": args.seed,
                              "n_eval": args.n_eval, "size": args.size}.items() if v is not None}
    cfg = R.RecognizerConfig(**over)
    _, info = R.train(cfg, args.out, device=args.device, progress=not args.quiet)
    m = info["metrics"]
    print(json.dumps({"joint_identity": m["clean"]["joint_identity"],
                      "joint_identity_degraded": m["degraded"]["joint_identity"],
                      "attribute": m["clean"]["attribute"], "scene": m["clean"]["scene"],
                      "presence": m["clean"]["presence"], "train_s": round(info["train_s"], 1),
                      "render_s": round(info["render_s"], 1)}, indent=2))
    return 0


def _eval_recognizer(args) -> int:
    from refgen.runtime import resolve_device
    from refgen.toyworld import recognizer as R

    net = R.load(args.weights, device=str(resolve_device(args.device or "cpu")))
    m = R.evaluate(net, args.n, device=args.device or "cpu", degrade_images=args.degraded)
    print(json.dumps({k: v for k, v in m.items() if not k.startswith("acc/")}, indent=2))
    return 0


def _train_model(args) -> int:
    from refgen.toyworld.model_recipe import ToyModelConfig, train_model

    over = {"device": args.device, "seed": args.seed}
    if args.tiny:
        cfg = ToyModelConfig.tiny(**{k: v for k, v in over.items() if v is not None})
    else:
        if args.config is None:  # a usage error: exit 2 with argparse's message, like a missing argument
            args.parser.error("train-model needs --config (e.g. configs/toyworld_model.yaml) or --tiny")
        cfg = ToyModelConfig.from_yaml(args.config, **over)
    out = train_model(cfg, args.out, progress=not args.quiet)
    print(f"saved QwenImagePipeline to {out}")
    return 0


def _train_vl(args) -> int:
    from refgen.toyworld import vl

    over = {k: v for k, v in {"steps": args.steps, "n_train_ids": args.n_train_ids, "seed": args.seed,
                              "threads": args.threads, "save_dtype": args.save_dtype}.items() if v is not None}
    cfg = vl.VLConfig.tiny(**over) if args.tiny else vl.VLConfig(**over)
    info = vl.train(cfg, args.out, device=args.device, progress=not args.quiet)
    m = info["metrics"]
    print(json.dumps({"out": args.out, "joint_probe_image": m["probe_image"]["joint"],
                      "joint_probe_set3": m["probe_set3"]["joint"], "attribute": m["probe_image"]["attribute"],
                      "retrieval_top1": m["retrieval"]["top1"], "retrieval_n": m["retrieval"]["n_identities"],
                      "steps_done": info["steps_done"], "stopped_early": info["stopped_early"],
                      "weights_bytes": info["weights_bytes"], "timings": info["timings"]}, indent=2))
    return 0


def _benchmark(args) -> int:
    from refgen.toyworld.benchmark import BenchmarkConfig, run_benchmark

    over = {"device": args.device, "model": args.model, "vl_model": args.vl_model}
    if args.tiny:
        cfg = BenchmarkConfig.tiny(**{k: v for k, v in over.items() if v is not None})
    elif args.config:
        cfg = BenchmarkConfig.from_yaml(args.config, **over)
    else:
        cfg = BenchmarkConfig(**{k: v for k, v in over.items() if v is not None})
    run_benchmark(cfg, args.out, progress=not args.quiet)
    print((Path(args.out) / "benchmark.md").read_text())
    return 0  # a measurement: goals not met are results, not errors (benchmark.json says which)


def register(toyworld_subparsers) -> None:
    """Add make-identities, train-recognizer, eval-recognizer, train-model and train-vl."""
    s = toyworld_subparsers

    p = s.add_parser("make-identities", help="write OUT/seed_<id>/ folders of 3-5 reference photos each")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=50, help="number of identities (default 50)")
    p.add_argument("--seed", type=int, default=0, help="first identity id; ids are seed .. seed+n-1")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    p.add_argument("--pair-images", type=int, default=0,
                   help="photos per identity beside a random other person (captioned; default 0)")
    p.add_argument("--photos", type=int, default=0, help="exactly this many one-person photos each (default 0: 3-5)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_make_identities)

    p = s.add_parser("train-recognizer", help="train the attribute/scene recognizer and report held-out accuracy")
    p.add_argument("--out", required=True, help="folder for model.safetensors, config.json, metrics.jsonl")
    p.add_argument("--device", default=None, help="cuda (default) or cpu, explicitly")
    p.add_argument("--steps", type=int)
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-eval", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_train_recognizer)

    p = s.add_parser("eval-recognizer", help="held-out accuracy of a saved recognizer (default: the shipped one)")
    p.add_argument("--weights", default=None, help="recognizer folder (default: refgen/assets/toyworld/recognizer)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--degraded", action="store_true", help="blur + noise the images first")
    p.add_argument("--device", default=None, help="cpu (default here: the recognizer is tiny) or cuda")
    p.set_defaults(func=_eval_recognizer)

    p = s.add_parser("train-model", help="train the toy Qwen-Image pipeline from scratch (recipe)")
    p.add_argument("--config", default=None, help="YAML, e.g. configs/toyworld_model.yaml")
    p.add_argument("--out", required=True, help="QwenImagePipeline folder to write")
    p.add_argument("--tiny", action="store_true", help="CPU smoke-test settings (a few steps, 32 px)")
    p.add_argument("--device", default=None, help="override the config's device (cuda / cpu)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_train_model, parser=p)

    p = s.add_parser("benchmark", help="identity benchmark on the toy model: teacher alpha sweep, head on unseen "
                                      "identities, two-slot prompts (JSON + markdown)")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None, help="YAML, e.g. configs/toyworld_benchmark.yaml (default: built-in)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke settings")
    p.add_argument("--device", default=None)
    p.add_argument("--model", default=None, help="QwenImagePipeline folder (default: the embedded toy model)")
    p.add_argument("--vl-model", default=None, help="Qwen3-VL folder (default: the embedded toy vision encoder)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_benchmark)

    p = s.add_parser("train-vl", help="train the toy Qwen3-VL vision tower (identity features) and save the folder")
    p.add_argument("--out", required=True,
                   help="Qwen3-VL folder to write (model, processor, tokenizer, refgen_vl.json)")
    p.add_argument("--device", default=None, help="cuda (default) or cpu, explicitly")
    p.add_argument("--steps", type=int)
    p.add_argument("--n-train-ids", type=int, help="training identities (4 photos each)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch threads on the CPU (default 1)")
    p.add_argument("--save-dtype", choices=["bf16", "fp32"])
    p.add_argument("--tiny", action="store_true", help="smoke-test settings (a few seconds on a CPU)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_train_vl)
