"""`refgen <command>`: each command maps onto one plain function; argparse only translates flags.

Exit codes: 0 ok, 1 bad input or policy violation (the message names the culprit), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from refgen.identity.slots import SLOT_REPEAT


SEED_MAX = 2**64 - 1  # torch.Generator's range; it maps a negative seed s onto 2**64 + s, so -1 == SEED_MAX


def parse_float(s: str) -> float:
    try:
        x = float(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from e
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return x


def parse_floats(s: str) -> list[float]:
    try:
        return [parse_float(x) for x in s.split(",") if x.strip()]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {s!r}") from e


def parse_seed(s: str) -> int:
    """A seed in 0..2**64-1. Negative seeds are refused: torch would silently use 2**64 + s instead."""
    try:
        x = int(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from e
    if not 0 <= x <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"seeds are 0..2**64-1, got {x} (torch maps a negative seed onto a "
                                         f"large positive one, so it would not be the seed you wrote)")
    return x


def parse_seeds(s: str) -> list[int]:
    """'0-7' -> 0..7, '1,5,9' -> [1, 5, 9], '0-3,10' -> [0, 1, 2, 3, 10]; each in 0..2**64-1."""
    out: list[int] = []
    try:
        for part in s.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                if int(b) < int(a):
                    raise ValueError
                out += list(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected seeds like '0-7' or '1,5,9', got {s!r}") from e
    bad = [x for x in out if not 0 <= x <= SEED_MAX]
    if bad:
        raise argparse.ArgumentTypeError(f"seeds are 0..2**64-1, got {bad[0]} in {s!r} (torch maps a negative seed "
                                         f"onto a large positive one, so it would not be the seed you wrote)")
    return out


def warn_negative_alphas(command: str, alphas, flag: str) -> None:
    """alpha < 0 is allowed (it subtracts the identity: an "anti-identity" image) but is rarely meant."""
    neg = [a for a in alphas or [] if a < 0]
    if neg:
        print(f"refgen {command}: warning: {flag} {', '.join(f'{a:g}' for a in neg)} < 0 subtracts the identity "
              f"residual (pushes the image away from the person); use a positive alpha to inject it",
              file=sys.stderr)


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="cuda (default) or cuda:N; 'cpu' only for tiny/toy models (< 200M parameters)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"],
                   help="bf16 (default); fp16 is refused for Qwen-Image (overflows)")


def _add_speed(p: argparse.ArgumentParser, offload_modes=("none", "model", "group"), render: bool = True) -> None:
    what = {"none": "none: all on the GPU", "model": "model: one component at a time (48 GB cards)",
            "group": "group: layer by layer (24 GB cards, slow)"}
    p.add_argument("--offload", default="none", choices=offload_modes,
                   help="; ".join(what[m] for m in offload_modes) + ". Peaks per mode: docs/benchmarks.md")
    if render:
        p.add_argument("--compile", action="store_true", help="torch.compile the transformer's blocks")
        p.add_argument("--no-cfg-batch", action="store_true",
                       help="true CFG as two forwards per step (the pipeline's way) instead of one batched forward")


_SAMPLING_HELP = {"seeds": "e.g. 0-7 or 1,5,9; seeds are >= 0", "batch_size": "images per pipeline call",
                  "true_cfg": "true classifier-free guidance scale (1: off)",
                  "id_guidance": "push the people further from the prompt without them (0: off; a third "
                                 "forward per step; needs --true-cfg > 1)"}


def _add_sampling(p: argparse.ArgumentParser, **defaults) -> None:
    """--seeds, --steps, --true-cfg, --negative-prompt, --height, --width, --batch-size made from SamplingConfig's
    fields and defaults (`defaults` overrides some, as RenderConfig does); --no-cfg-batch is _add_speed's. The
    sampling module imports no torch, so `refgen --help` stays fast."""
    import dataclasses

    from refgen.identity.sampling import SamplingConfig

    parse = {"int": int, "float": float, "str": str, "list[int]": parse_seeds}
    for f in dataclasses.fields(SamplingConfig):
        if f.name == "cfg_batch":
            continue
        default = defaults.get(f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING
                               else f.default)
        p.add_argument("--" + f.name.replace("_", "-"), type=parse[f.type], default=default,
                       help=_SAMPLING_HELP.get(f.name, f"default {default!r}"))


def _sampling_args(args) -> dict:
    """The SamplingConfig keywords of parsed flags (_add_sampling + _add_speed)."""
    import dataclasses

    from refgen.identity.sampling import SamplingConfig

    return {f.name: (not args.no_cfg_batch) if f.name == "cfg_batch" else getattr(args, f.name)
            for f in dataclasses.fields(SamplingConfig)}


# ---- commands: each a thin wrapper over a library function --------------------------------------------

def cmd_doctor(args) -> int:
    from refgen.runtime import doctor_json

    print(doctor_json())
    return 0


def cmd_tiny_model(args) -> int:
    from refgen.tiny_qwen import write_tiny_models

    paths = write_tiny_models(args.out, seed=args.seed)
    print(json.dumps(paths, indent=2))
    return 0


def cmd_scan(args) -> int:
    from refgen.images import no_identities_message, scan

    res = scan(args.root)
    if args.json:
        print(json.dumps(res.to_json(), indent=2))
    else:
        for ident in res.identities:
            print(f"ok       {ident.id}: {len(ident.images)} images")
        for s in res.skipped:
            tag = "partial " if s.get("kept") else "skipped "
            print(f"{tag} {Path(s['folder']).name}: {s['reason']}")
            for b in s["bad_files"]:
                print(f"           {b['file']}: {b['reason']}")
        for name in res.ignored:
            print(f"ignored  {name}: not a seed_* folder")
        print(f"{len(res.identities)} identities, {sum(1 for s in res.skipped if not s.get('kept'))} folders "
              f"skipped, {len(res.ignored)} ignored")
    if not res.identities:
        raise ValueError(no_identities_message(res, args.root))
    return 0


def cmd_slots(args) -> int:
    from refgen.identity.prompts import template_of, tokenize
    from refgen.identity.render import load_tokenizer_only
    from refgen.identity.slots import describe_slots

    pipe = load_tokenizer_only(args.model)
    tp = tokenize(pipe, args.prompt, n_identities=args.identities, repeat=args.slot_repeat)
    rows = describe_slots(pipe.tokenizer, tp, template_of(pipe)[1])
    if args.json:
        print(json.dumps({"prompt": args.prompt, "slots": rows, "tokens_after_prefix":
                          len(tp.input_ids) - template_of(pipe)[1]}, indent=2))
    else:
        print(f"prompt: {args.prompt!r}")
        for r in rows:
            print(f"slot {r['slot']}: start={r['start']} L={r['length']} ids={r['token_ids']} tokens={r['tokens']}")
        if not rows:
            print("no ~ID~ placeholder in this prompt")
    return 0


def cmd_render(args) -> int:
    from refgen.identity.render import RenderConfig
    from refgen.pipeline import IdentityPipeline

    warn_negative_alphas("render", args.alphas, "--alphas")

    cfg = RenderConfig(prompt=args.prompt, alphas=args.alphas, **_sampling_args(args))
    # one-shot: the text encoder leaves the GPU once the prompts are encoded
    ip = IdentityPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, offload=args.offload,
                                          compile=args.compile, free_text_encoder=True)
    rec = ip.render_grid(cfg, [ip.load_residual(f) for f in args.residual], args.out, residual_files=args.residual)
    rows = f"{len(rec['alphas'])} alphas" if rec["alphas"] else "no residual: 1 row"
    print(f"wrote {Path(args.out) / rec['grid']} ({rows} x {len(cfg.seeds)} seeds) and grid.json")
    return 0


def cmd_invert(args) -> int:
    from refgen.identity.invert import InvertConfig, invert
    from refgen.images import no_identities_message, scan

    # invert() finds nothing to do in a root without identities and returns quietly; scanning here first makes
    # that an error that says why, before any model loads. (invert() scans again: cheap next to an inversion.)
    found = scan(args.root)
    if not found.identities:
        raise ValueError(no_identities_message(found, args.root))

    overrides = {"steps": args.steps, "identities_per_batch": args.identities_per_batch,
                 "height": args.height, "width": args.width,
                 "gradient_checkpointing": args.gradient_checkpointing or None, "compile": args.compile or None,
                 "checkpoint_every": args.checkpoint_every, "qa": False if args.no_qa else None,
                 "parametrisation": args.parametrisation, "image_prompts": args.image_prompts or None,
                 "start_weight": args.start_weight, "id_weight": args.id_weight, "slot_repeat": args.slot_repeat}
    cfg = InvertConfig.from_yaml(args.config, **overrides) if args.config else InvertConfig(
        **{k: v for k, v in overrides.items() if v is not None})
    try:
        i, n = (int(x) for x in args.shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {args.shard!r}") from None
    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    recs = invert(args.root, args.model, out=args.out, only=only, shard=(i, n), cfg=cfg, device=args.device,
                  dtype=args.dtype, offload=args.offload, start_head=args.start_head, vl_model=args.vl_model)
    for r in recs:
        print(f"{r['identity']}: {r['stop_reason']} after {r['steps_run']} steps, loss {r['first_loss']:.4f} -> "
              f"{r['final_loss']:.4f}, eval loss {r['eval_loss_base']:.4f} -> {r['eval_loss_teacher'] or float('nan'):.4f}"
              if r["final_loss"] is not None else
              f"{r['identity']}: {r['stop_reason']} ({r['message']})")
    failed = [r for r in recs if r["stop_reason"] in ("nan", "diverged")]
    return 1 if failed else 0


def cmd_soup_heads(args) -> int:
    from refgen.identity.soup import soup_heads

    weights = [float(x) for x in args.weights.split(",")] if args.weights else None
    rec = soup_heads(args.heads, weights, args.out)
    print(json.dumps({"out": args.out, **rec["soup"], "train_ids": len(rec["train_ids"])}))
    return 0


def cmd_features(args) -> int:
    from refgen.identity.features import FeatureConfig, extract_features

    cfg = FeatureConfig(pixel_budget=args.pixel_budget * 1e6, max_side=args.max_side, max_images=args.max_images)
    done = extract_features(args.root, args.vl_model, args.device, args.dtype, cfg, out=args.out)
    if not done["identities"]:
        from refgen.images import no_identities_message, scan

        raise ValueError(no_identities_message(scan(args.root), args.root))
    print(json.dumps(done))
    return 0


def cmd_train_head(args) -> int:
    from refgen.runtime import resolve_device

    device = str(resolve_device(args.device))
    if (args.objective == "teacher" and args.head == "linear" and args.model is None and args.config is None
            and args.output in (None, "residual")):
        # the regression of cached features (`refgen features`) onto teacher residuals: no model to load
        from refgen.identity.head import HeadConfig, train_head

        if args.root is None:
            raise ValueError("train-head: give the identity root (seed_<id>/ folders with cached features)")
        cfg = HeadConfig(epochs=args.epochs, batch_size=args.batch_size or 32, lr=args.lr or 1e-3,
                         val_fraction=args.val_fraction, seed=args.seed)
        print(json.dumps(train_head(args.root, args.out, cfg, device=device)))
        return 0
    from refgen.identity.train_e2e import E2EConfig, train_e2e

    if args.model is None or args.vl_model is None:
        raise ValueError(f"--objective {args.objective} --head {args.head} trains through the photos: it needs "
                         "--model (Qwen-Image) and --vl-model (Qwen3-VL)")
    over = {"objective": args.objective, "head": args.head, "output": args.output, "steps": args.steps,
            "batch_size": args.batch_size, "lr": args.lr, "teacher_weight": args.teacher_weight, "teacher_root": args.teacher_root,
            "two_person_fraction": args.two_person_fraction, "val_identities": args.val_identities,
            "seed": args.seed, "gradient_checkpointing": args.gradient_checkpointing or None,
            "cache_dir": args.cache_dir, "tables": args.tables, "toyworld_identities": args.toyworld_identities,
            "toyworld_first_id": args.toyworld_first_id, "init_head": args.init_head, "slot_repeat": args.slot_repeat}
    over = {k: v for k, v in over.items() if v is not None}
    cfg = E2EConfig.from_yaml(args.config, **over) if args.config else E2EConfig(**over)
    summary = train_e2e(args.root, args.out, args.model, args.vl_model, cfg, device=device, dtype=args.dtype)
    print(json.dumps(summary))
    return 0


class _PersonAction(argparse.Action):
    """--ref and --residual append to one ordered list: the n-th person fills the n-th ~ID~."""

    def __call__(self, parser, ns, values, option_string=None):
        people = getattr(ns, "people", None) or []
        kind = "ref" if self.dest == "ref" else "residual"
        people.append((kind, values if isinstance(values, list) else [values]))
        ns.people = people


def cmd_generate(args) -> int:
    from refgen.identity.generate import GenerateConfig, Person, assign_alphas, generate, generate_log

    warn_negative_alphas("generate", args.alpha, "--alpha")
    warn_negative_alphas("generate", args.grid_alphas, "--grid-alphas")
    with generate_log(args.out, args.prompt) as run:
        people = getattr(args, "people", None) or []
        alphas = assign_alphas(len(people), args.alpha)
        cfg = GenerateConfig(prompt=args.prompt, people=[Person(k, v, a) for (k, v), a in zip(people, alphas)],
                             grid_alphas=args.grid_alphas, **_sampling_args(args))
        run.update(generate(cfg, args.model, args.out, vl_model=args.vl_model, head=args.head, device=args.device,
                            dtype=args.dtype, offload=args.offload, compile=args.compile))
    print(f"wrote {len(run['images'])} images and generate.json to {args.out}")
    return 0


def cmd_app(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("refgen app: error: the app needs Gradio, which refgen installs as an extra: "
              "pip install 'refgen[app]' (in a checkout: pip install -e '.[app]')", file=sys.stderr)
        return 1
    from refgen.app import AppConfig, serve

    cfg = AppConfig(model=args.model, vl_model=args.vl_model, head=args.head, device=args.device, dtype=args.dtype,
                    offload=args.offload, compile=args.compile, host=args.host, port=args.port, people=args.people,
                    invert_steps=args.invert_steps, threads=args.threads, work_dir=args.work_dir)
    serve(cfg)
    return 0


def cmd_report(args) -> int:
    from refgen.artifacts import atomic_write_text
    from refgen.identity.report import build_report, to_markdown

    rep = build_report(args.head, args.runs, args.toyworld)
    if args.out:
        atomic_write_text(Path(args.out).with_suffix(".md"), to_markdown(rep))
        atomic_write_text(Path(args.out).with_suffix(".json"), json.dumps(rep, indent=2))
    print(json.dumps(rep, indent=2) if args.json else to_markdown(rep))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refgen", description="Identity injection for Qwen-Image; DiT training.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_tools(sub)
    _add_render(sub)
    _add_invert(sub)
    _add_head(sub)
    _add_generate(sub)
    _add_report(sub)
    _add_systems(sub)
    _add_demo(sub)
    return p


def _add_tools(sub) -> None:
    """doctor, tiny-model, scan, slots"""
    d = sub.add_parser("doctor", help="JSON report: torch, CUDA runtime, driver, GPUs, bf16 support")
    d.set_defaults(func=cmd_doctor)

    t = sub.add_parser("tiny-model", help="write a tiny random Qwen-Image pipeline and Qwen3-VL model (offline)")
    t.add_argument("out")
    t.add_argument("--seed", type=parse_seed, default=0)
    t.set_defaults(func=cmd_tiny_model)

    s = sub.add_parser("scan", help="list seed_* identity folders with >= 2 readable images, and skipped ones")
    s.add_argument("root")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_scan)

    sl = sub.add_parser("slots", help="show the token window of every ~ID~ in a prompt")
    sl.add_argument("--model", required=True, help="Qwen-Image hub id or folder (only its tokenizer is read)")
    sl.add_argument("--prompt", required=True)
    sl.add_argument("--identities", type=int, default=None, help="check the prompt has this many placeholders")
    sl.add_argument("--slot-repeat", type=int, default=SLOT_REPEAT,
                    help=f"the windows of people made with --slot-repeat K (default {SLOT_REPEAT}, as they are made)")
    sl.add_argument("--json", action="store_true")
    sl.set_defaults(func=cmd_slots)


def _add_render(sub) -> None:
    """render"""
    from refgen.identity.sampling import GRID_SEEDS

    r = sub.add_parser("render", help="alpha x seed grid through QwenImagePipeline with injected residuals")
    r.add_argument("--model", required=True)
    r.add_argument("--prompt", required=True)
    r.add_argument("--residual", action="append", default=[], help="slot residual or token file (.safetensors from refgen invert), one per ~ID~")
    r.add_argument("--alphas", type=parse_floats, default=[0.5, 1.0, 1.5, 2.0],
                   help="comma-separated, finite; a list starting with a negative value is written --alphas=-1,1 "
                        "(alpha < 0 subtracts the identity, with a warning)")
    _add_sampling(r, seeds=list(GRID_SEEDS))
    r.add_argument("--out", required=True)
    _add_runtime(r)
    _add_speed(r)
    r.set_defaults(func=cmd_render)


def _add_invert(sub) -> None:
    """invert"""
    v = sub.add_parser("invert", help="teacher inversion: one identity file (learnt tokens or a slot residual) per identity folder (resumable)")
    v.add_argument("root", help="folder of seed_<id>/ identity folders")
    v.add_argument("--model", required=True)
    v.add_argument("--out", default=None, help="output root (default: ROOT, next to the images)")
    v.add_argument("--only", default=None, help="comma-separated identity folder names")
    v.add_argument("--shard", default="0/1", help="i/n: this worker's share of the identities")
    v.add_argument("--config", default=None, help="YAML mirroring InvertConfig (configs/invert.yaml)")
    v.add_argument("--steps", type=int, default=None)
    v.add_argument("--identities-per-batch", type=int, default=None, help="K identities per forward")
    v.add_argument("--height", type=int, default=None)
    v.add_argument("--width", type=int, default=None)
    v.add_argument("--gradient-checkpointing", action="store_true")
    v.add_argument("--checkpoint-every", type=int, default=None, help="steps between resumable checkpoints")
    v.add_argument("--no-qa", action="store_true", help="skip the alpha-grid QA render after each identity")
    v.add_argument("--parametrisation", default=None, choices=["tokens", "rms_scaled", "free"],
                   help="where the person lives: tokens (default: learnt input embeddings of ~ID~), or a residual "
                        "on the encoder output's window (rms_scaled, the seed's; free). docs/benchmarks.md")
    v.add_argument("--image-prompts", action="store_true",
                   help="each photo in its own sentence from seed_<id>/prompts.json")
    v.add_argument("--slot-repeat", type=int, default=None,
                   help=f"each ~ID~ is the placeholder's tokens this many times over (default {SLOT_REPEAT}; 1: the "
                        "seed's one placeholder): more room for the person; files record it and render/generate read "
                        "it back. docs/benchmarks.md")
    v.add_argument("--start-head", default=None,
                   help="a head folder (`refgen train-head`): each identity starts from its prediction, not noise "
                        "(needs --vl-model; its output must be the parametrisation's kind)")
    v.add_argument("--vl-model", default=None, help="the Qwen3-VL model the start head's features come from, and "
                   "that reads the estimates of --id-weight")
    v.add_argument("--start-weight", type=float, default=None,
                   help="from a head's start: weight of mean((P - P_start)^2) keeping the inversion near it "
                        "(default 1; 0 lets it drift)")
    v.add_argument("--id-weight", type=float, default=None,
                   help="weight of the ID loss (1 - cos of the vision tower's features, estimate vs photo; needs "
                        "--vl-model); 0 = off")
    _add_runtime(v)
    _add_speed(v, offload_modes=("none", "model"), render=False)
    v.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer's blocks (InvertConfig.compile)")
    v.set_defaults(func=cmd_invert)


def _add_head(sub) -> None:
    """features, train-head, soup-heads"""
    f = sub.add_parser("features", help="Qwen3-VL features z per identity under a pixel budget (cached)")
    f.add_argument("root")
    f.add_argument("--vl-model", default="Qwen/Qwen3-VL-8B-Instruct")
    f.add_argument("--out", default=None, help="output root (default: ROOT)")
    f.add_argument("--pixel-budget", type=float, default=2.0, help="total megapixels per identity")
    f.add_argument("--max-side", type=int, default=1536)
    f.add_argument("--max-images", type=int, default=8)
    _add_runtime(f)
    f.set_defaults(func=cmd_features)

    h = sub.add_parser("train-head", help="train a head (photos -> slot residual): by regression onto teacher "
                                          "residuals, or end to end through the frozen Qwen-Image")
    h.add_argument("root", nargs="?", default=None,
                   help="identity root: seed_<id>/ folders (>= 2 photos each); for --objective teacher with the "
                        "linear head and no --model, the cached vl_features + teacher residuals; left out with "
                        "--toyworld-identities")
    h.add_argument("--out", required=True)
    h.add_argument("--objective", default="teacher", choices=["e2e", "teacher", "mixed"],
                   help="e2e: flow matching through the frozen transformer on another photo of the person; "
                        "teacher: regression onto the teachers of `refgen invert` (default; without --model, the "
                        "linear head on cached features and teacher residuals); mixed: e2e + weight x teacher")
    h.add_argument("--head", default="linear", choices=["linear", "resampler"],
                   help="linear: pooled z -> residual (default); resampler: learned queries over every visual "
                        "token of every reference photo")
    h.add_argument("--output", default=None, choices=["residual", "tokens"],
                   help="what the head makes: the placeholder's input token embeddings, read by the text encoder "
                        "(default; teacher/mixed regress teacher_tokens.safetensors), or a slot residual on the "
                        "encoder output (teacher/mixed regress teacher_residual.safetensors)")
    h.add_argument("--model", default=None, help="Qwen-Image (e2e/mixed, or any resampler)")
    h.add_argument("--vl-model", default=None, help="Qwen3-VL the features come from (with --model)")
    h.add_argument("--config", default=None, help="E2EConfig YAML (configs/train_head_e2e.yaml); flags override it")
    h.add_argument("--steps", type=int, default=None, help="optimisation steps (with --model)")
    h.add_argument("--teacher-weight", type=float, default=None, help="mixed: weight of the teacher regression")
    h.add_argument("--teacher-root", default=None, help="seed_<id>/teacher_residual.safetensors (default: ROOT)")
    h.add_argument("--two-person-fraction", type=float, default=None,
                   help="share of steps on two-person toy-world images (toy identities only)")
    h.add_argument("--val-identities", type=int, default=None, help="identities held out for the logged val loss")
    h.add_argument("--slot-repeat", type=int, default=None,
                   help=f"each ~ID~ is the placeholder's tokens this many times over (default {SLOT_REPEAT}): the "
                        "head's window grows with it")
    h.add_argument("--gradient-checkpointing", action="store_true")
    h.add_argument("--cache-dir", default=None, help="with --model: the data cache (features, latents, prompt rows), "
                                                     "written once, reused by every rank and re-run (default OUT/cache)")
    h.add_argument("--tables", default=None, choices=["device", "mapped"],
                   help="with --model: the cache on each rank's device (default), or memory-mapped with only a "
                        "step's rows moved to the device (thousands of identities)")
    h.add_argument("--toyworld-identities", type=int, default=None,
                   help="with --model: train on this many toy-world people rendered on the fly (no ROOT)")
    h.add_argument("--toyworld-first-id", type=int, default=None, help="the first toy-world id (100000)")
    h.add_argument("--init-head", default=None, help="with --model: a head folder whose weights start this run "
                                                     "(same architecture, output and placeholder; fresh optimiser)")
    h.add_argument("--epochs", type=int, default=20, help="regression of cached features: passes over the data")
    h.add_argument("--batch-size", type=int, default=None, help="identities (regression, 32) or target photos "
                                                               "(with --model, 16) per step, over all ranks")
    h.add_argument("--lr", type=float, default=None, help="1e-3 by default")
    h.add_argument("--val-fraction", type=float, default=0.1, help="regression of cached features only")
    h.add_argument("--seed", type=parse_seed, default=0)
    h.add_argument("--device", default=None, help="cuda (default) or cpu (tiny/toy models)")
    h.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="with --model: bf16 (default) or fp32")
    h.set_defaults(func=cmd_train_head)

    so = sub.add_parser("soup-heads", help="average heads fine-tuned from one start (e.g. a one-person head and "
                                           "the same head continued with two-person steps) into one head folder")
    so.add_argument("heads", nargs="+", help="head folders (head.safetensors + head.json)")
    so.add_argument("--weights", default=None, help="comma separated, >= 0, summing to 1 (default: equal)")
    so.add_argument("--out", required=True)
    so.set_defaults(func=cmd_soup_heads)


def _add_generate(sub) -> None:
    """generate, app"""
    g = sub.add_parser("generate", help="render 1-n people into a prompt with ~ID~ slots")
    g.add_argument("--model", required=True)
    g.add_argument("--vl-model", default=None)
    g.add_argument("--head", default=None, help="head checkpoint (head.safetensors) for --ref people")
    g.add_argument("--prompt", required=True)
    g.add_argument("--ref", nargs="+", action=_PersonAction, help="a folder or image files: the next person")
    g.add_argument("--residual", action=_PersonAction, help="a slot residual or token file (from refgen invert): the next person")
    g.add_argument("--alpha", type=parse_float, action="append", default=[],
                   help="one per person, or one for all (default 1; < 0 subtracts the identity, with a warning)")
    _add_sampling(g)
    g.add_argument("--grid-alphas", type=parse_floats, default=None, help="also write an alpha x seed QA grid")
    g.add_argument("--out", required=True)
    _add_runtime(g)
    _add_speed(g)
    g.set_defaults(func=cmd_generate)

    ap = sub.add_parser("app", help="web page: people from photos or residual files into a prompt (needs refgen[app])")
    ap.add_argument("--model", default=None, help="Qwen-Image hub id or folder (default: the toy model refgen ships)")
    ap.add_argument("--vl-model", default=None, help="with --head: the Qwen3-VL model the head's features came from "
                                                     "(toy model: the shipped toy VL)")
    ap.add_argument("--head", default=None, help="head checkpoint: photos through the head (default: inverted)")
    ap.add_argument("--device", default=None, help="default: cpu for the toy model, cuda for any other")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32", "fp16"],
                    help="default: fp32 on the CPU, bf16 on CUDA (fp16 is refused for Qwen-Image)")
    ap.add_argument("--host", default="127.0.0.1", help="address to serve on (default: loopback only)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--people", type=int, default=3, help="person panels on the page (1-6)")
    ap.add_argument("--invert-steps", type=int, default=None,
                    help="the page's default inversion steps (toy model: 100; else InvertConfig's)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the cores other processes "
                                                          "leave free)")
    ap.add_argument("--work-dir", default=None, help="inversions and downloads (default: a temporary folder)")
    _add_speed(ap, render=False)
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer's blocks")
    ap.set_defaults(func=cmd_app)


def _add_report(sub) -> None:
    """report"""
    rp = sub.add_parser("report", help="monitoring: a head's offline metrics and toy-world KPIs, generate error "
                                       "counts")
    rp.add_argument("--head", default=None, help="a head folder from train-head, its head.json or head.safetensors")
    rp.add_argument("--toyworld", default=None, help="result.json of bench/toyworld_head_e2e.py: identity, scene, "
                                                     "two people, copy-paste on unseen people against the ceiling")
    rp.add_argument("--runs", nargs="*", default=[], help="generate output folders or generate_log.jsonl files")
    rp.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=cmd_report)


def _add_systems(sub) -> None:
    """the dit, toyworld and moe command groups"""
    from refgen.dit.cli_data import register as register_dit_data
    from refgen.dit.cli_model import register as register_dit_model

    dit = sub.add_parser("dit", help="DiT system: prepare shards, train/sample/validate NanoDiT")
    dit_sub = dit.add_subparsers(dest="dit_command", required=True)
    register_dit_data(dit_sub)
    register_dit_model(dit_sub)

    from refgen.toyworld.cli import register as register_toyworld

    tw = sub.add_parser("toyworld", help="toy identity world: identities, recognizer, toy Qwen-Image recipe")
    register_toyworld(tw.add_subparsers(dest="toyworld_command", required=True))

    from refgen.moe.cli import register as register_moe

    moe = sub.add_parser("moe", help="energy-aware MoE image classifier: fetch-data, train, rl, bench")
    register_moe(moe.add_subparsers(dest="moe_command", required=True))


def _add_demo(sub) -> None:
    """demo"""
    dm = sub.add_parser("demo", help="the identity path end to end on the embedded toy model (CPU, minutes)")
    dm.add_argument("--out", default="refgen_demo", help="output folder (default ./refgen_demo)")
    dm.add_argument("--device", default="cpu", help="cpu (default: the toy model is small) or cuda")
    dm.add_argument("--invert-steps", type=int, default=None)
    dm.add_argument("--render-steps", type=int, default=None)
    dm.add_argument("--refine-steps", type=int, default=None,
                    help="anchored inversion steps from the toy head's reading (default 50; 0: no such row)")
    dm.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores other processes leave free)")
    dm.add_argument("--quiet", action="store_true")
    dm.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from refgen.toyworld.demo import DemoConfig, run_demo

    over = {"invert_steps": args.invert_steps, "render_steps": args.render_steps, "threads": args.threads,
            "refine_steps": args.refine_steps}
    cfg = DemoConfig(device=args.device, **{k: v for k, v in over.items() if v is not None})
    s = run_demo(cfg, args.out, progress=not args.quiet)
    for ident, d in s["identities"].items():
        line = ", ".join(f"alpha {a}: {m['identity_acc']:.0%} identity / {m['attribute_acc']:.0%} attributes"
                         for a, m in d["per_alpha"].items())
        print(f"{ident} ({', '.join(f'{v}' for v in d['attributes'].values())}): {line}")
    g = f" (identity guidance {cfg.head_id_guidance:g})" if cfg.head_id_guidance else ""
    for key, how in (("two_people", "inverted"), ("two_people_head", f"from the toy head{g}"),
                     ("two_people_refined", f"from the toy head + {cfg.refine_steps} anchored inversion steps")):
        if key in s:
            t = s[key]
            print(f"two people (left, right), {how}: both recognised in {t['all_people_acc']:.0%} of "
                  f"{t['n_images']} images, {t['attribute_acc']:.0%} of attributes right")
    print("pictures:")
    for k, v in s["pictures"].items():
        print(f"  {k}: {v}")
    print(f"done in {s['seconds']['total']:.0f} s (record: {Path(args.out) / 'demo.json'})")
    return 0


def _is_user_error(e: BaseException) -> bool:
    """Bad input or a policy refusal: one line, exit 1. The classes are looked up only in modules already
    imported (a PolicyError cannot come from an unimported refgen.runtime), so `refgen --help` imports no torch."""
    if isinstance(e, (FileNotFoundError, ValueError)):
        return True
    for mod, name in (("refgen.runtime", "PolicyError"), ("refgen.artifacts", "ArtifactWriteError")):
        cls = getattr(sys.modules.get(mod), name, None)
        if cls is not None and isinstance(e, cls):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if not _is_user_error(e):
            raise
        name = " ".join(c for c in (args.command, getattr(args, "dit_command", None),
                                    getattr(args, "toyworld_command", None),
                                    getattr(args, "moe_command", None)) if c)
        print(f"refgen {name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
