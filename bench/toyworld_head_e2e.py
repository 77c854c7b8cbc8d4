"""A head trained end to end through the frozen toy Qwen-Image, read on people it has never seen.

1. make-identities: N training identities (ids 100000...; with --stream rendered on the fly into the trainer's
   cache instead of written as folders), validation identities (ids 400000...: they choose
   alpha, so the test set tunes nothing) and test identities (ids 200000..., the benchmark's); seed ranges checked
   disjoint from each other and from everything the recognizer and the toy model were trained or validated on;
2. `refgen.identity.train_e2e.train_e2e` on the training identities (the `refgen train-head --objective e2e` path);
3. each validation/test person's photos -> `load_head` + `residual_from_photos` (the inference path of
   `IdentityPipeline.residual_from_refs`) -> residual, rendered into the benchmark's own prompt in every scene x
   seed x alpha, read by the shipped recognizer; two-slot prompts on the benchmark's test pairs;
4. the caption ceiling on the same test people, scenes and seeds.
Rendering, scoring, Wilson intervals, pairs and the ceiling are `refgen.toyworld.benchmark`'s own functions.

    python bench/toyworld_head_e2e.py --out /tmp/head_e2e             # CUDA: 1,200 training people, 202 s on an H200
    python bench/toyworld_head_e2e.py --out /tmp/head_e2e_tiny --tiny # CPU smoke, ~20 s
    python bench/toyworld_head_e2e.py --out /tmp/again --eval-head /tmp/head_e2e/head   # score a trained head again
    python bench/toyworld_head_e2e.py --out /tmp/h --stream --tables mapped --n-train 20000   # no training folders
    python bench/toyworld_head_e2e.py --out /tmp/h --device cpu --dtype fp32 --n-train 400 --n-val 12 --n-test 24 \
        --n-pairs 0 --steps 600 --batch-size 16 --lr 2e-3 --alphas 1,1.4 --threads 1   # the CPU rows of docs/head.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

VAL_SEED = 400_000


def _pct(m: dict, key: str) -> str:
    ci = m[key.replace("_acc", "_ci")]
    return f"{m[key]:.1%} [{ci[0]:.1%}, {ci[1]:.1%}]"


def _dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("seed_")),
                  key=lambda p: int(p.name.split("_")[1]))


def residuals(head, fx, dirs: list[Path]) -> tuple[str, list[torch.Tensor]]:
    """("residuals", (L, H) per person) or ("tokens", (L, H_in) per person) from all of each person's photos, as
    IdentityPipeline.residual_from_refs makes them; the kind names the render job key (`render_rows`)."""
    from refgen.identity.head import person_from_photos
    from refgen.images import image_files, load_rgb

    made = [person_from_photos(head, fx, [load_rgb(p) for p in image_files(d)]) for d in dirs]
    return ("tokens" if made[0][0] == "tokens" else "residuals"), [t for _, t in made]


def sweep(pipe, net, dev, attrs, res, alphas, bcfg, neg) -> dict:
    """One person per prompt ("A photo of ~ID~ {where}."): every person x scene x seed x alpha, scored per alpha."""
    from refgen.toyworld import recognizer as R
    from refgen.toyworld import world
    from refgen.toyworld.benchmark import SCENE_PROMPT, render_config, render_rows, score

    prompts = [SCENE_PROMPT.format(where=world.SCENE_PHRASES[s][0]) for s in bcfg.scenes]
    key, res = res
    jobs, rows = [], []
    for a in alphas:
        for k in range(len(res)):
            for si, s in enumerate(bcfg.scenes):
                for seed in bcfg.seeds:
                    jobs.append({"prompt": si, key: [res[k]], "alpha": a, "seed": seed})
                    rows.append({"people": [attrs[k]], "scene": s})
    preds = R.predict(net, render_rows(pipe, prompts, jobs, render_config(bcfg), neg), dev)
    return {f"{a:g}": score([p for p, j in zip(preds, jobs) if j["alpha"] == a],
                            [r for r, j in zip(rows, jobs) if j["alpha"] == a]) for a in alphas}


def two_slot(pipe, net, dev, attrs, res, pairs, alpha, bcfg, neg, isolate: bool = False, head=None) -> dict:
    """Two people per prompt (PAIR_PROMPT), left then right; ISOLATE as the head was trained (`isolate_slots`), and
    each person with HEAD's offset for their slot when it has `slot_roles` (`head.with_slot_role`)."""
    from refgen.identity.head import with_slot_role
    from refgen.toyworld import recognizer as R
    from refgen.toyworld import world
    from refgen.toyworld.benchmark import PAIR_PROMPT, render_config, render_rows, score

    prompts = [PAIR_PROMPT.format(where=world.SCENE_PHRASES[s][0]) for s in bcfg.scenes]
    key, res = res
    kind = "tokens" if key == "tokens" else "residual"
    jobs, rows = [], []
    for i, j in pairs:
        for si, s in enumerate(bcfg.scenes):
            for seed in bcfg.seeds:
                people = [res[p] if head is None else with_slot_role(head, kind, res[p], k, 2)
                          for k, p in enumerate((i, j))]
                jobs.append({"prompt": si, key: people, "alpha": alpha, "seed": seed,
                             **({"isolate": True} if isolate and key == "tokens" else {})})
                rows.append({"people": [attrs[i], attrs[j]], "scene": s})
    return score(R.predict(net, render_rows(pipe, prompts, jobs, render_config(bcfg), neg), dev), rows)


def copy_paste(pipe, net, dev, head, fx, dirs: list[Path], attrs: list[dict], alpha: float, bcfg, neg) -> dict:
    """Does the picture follow the prompt or the reference photo? Each person's ONE reference photo (its first: one
    scene, one expression, one pose) goes through the head; the prompts ask for each of the other scenes and for an
    expression and pose the photo does not show ("smiling" or "looking surprised"; "waving" when the photo's arms
    are down). Scored: identity, scene / expression / pose as asked, and how often the reference's own scene and
    expression come back instead (copy-paste). The same prompts with the person in words ("words") show how often
    the model follows these words at all."""
    from refgen.identity.head import person_from_photos
    from refgen.images import load_rgb
    from refgen.toyworld import recognizer as R
    from refgen.toyworld import world
    from refgen.toyworld.benchmark import render_config, render_rows, score, wilson

    out: dict = {}
    for who in ("head", "words"):
        prompts, jobs, rows, asked = [], [], [], []
        for k, d in enumerate(dirs):
            ref = json.loads((d / "identity.json").read_text())["images"][0]
            s0, st0 = ref["scene"]["background"], ref["scene"]["people"][0]["state"]
            expr = "smiling" if st0["expression"] != "smiling" else "surprised"
            wave = st0["pose"] == "arms_down"
            words = world.EXPRESSION_WORDS[expr] + (" and waving" if wave else "")
            person = (world.full_description(world.IdentityAttributes.from_dict(attrs[k])) if who == "words"
                      else "~ID~")
            key, people = "residuals", []  # the words: a prompt without a slot
            if who == "head":
                kind, t = person_from_photos(head, fx, [load_rgb(d / ref["file"])])
                key, people = ("tokens" if kind == "tokens" else "residuals"), [t]
            for s in (x for x in bcfg.scenes if x != s0):
                prompts.append(f"A photo of {person}, {words} {world.SCENE_PHRASES[s][0]}.")
                for seed in bcfg.seeds:
                    jobs.append({"prompt": len(prompts) - 1, "alpha": alpha, "seed": seed, key: people})
                    rows.append({"people": [attrs[k]], "scene": s})
                    asked.append((s0, st0["expression"], expr, wave))
        preds = R.predict(net, render_rows(pipe, prompts, jobs, render_config(bcfg), neg), dev)
        m = score(preds, rows)
        first = [p["people"][0] if p["people"] else {} for p in preds]
        n, n_wave = len(preds), sum(a[3] for a in asked)
        counts = {
            "scene_is_reference_scene": sum(p["scene"] == a[0] for p, a in zip(preds, asked)),
            "expression_as_asked": sum(f.get("expression") == a[2] for f, a in zip(first, asked)),
            "expression_is_reference": sum(f.get("expression") == a[1] for f, a in zip(first, asked)),
        }
        m.update({k: v / max(1, n) for k, v in counts.items()})
        m.update({f"{k}_ci": wilson(v, n) for k, v in counts.items()})
        waved = sum(f.get("pose") == "waving" for f, a in zip(first, asked) if a[3])
        m.update(pose_waving_as_asked=waved / max(1, n_wave), pose_waving_as_asked_ci=wilson(waved, n_wave),
                 n_asked_waving=n_wave)
        out[who] = m
    return out


def scoring_setup(model: str, vl: str, head_dir: Path, device: str, dtype: str):
    """(pipe, head, fx, recognizer, neg) to render and score a trained head's people: the toy pipeline, the head
    in fp32, the VisionFeatures with the head's recorded feature settings, the recognizer and the negative prompt."""
    from refgen.identity.features import VisionFeatures, feature_config_from_settings
    from refgen.identity.generate import head_feature_settings
    from refgen.identity.head import load_head
    from refgen.identity.prompts import encode_prompts
    from refgen.identity.render import load_pipeline
    from refgen.toyworld import recognizer as R

    pipe = load_pipeline(model, device, dtype)
    head, md = load_head(head_dir, pipe.transformer.device, torch.float32)
    fs = head_feature_settings(md, head_dir)
    fx = VisionFeatures(vl, device, fs["dtype"], feature_config_from_settings(fs))
    ne = encode_prompts(pipe, " ")
    return pipe, head, fx, R.load(device=device), (ne.embeds, ne.mask)


# The bench's own settings where neither a flag nor the --config YAML says otherwise (the YAML's keys win over
# these, a flag given wins over the YAML): a flag's argparse default must never mask a key of the YAML.
BENCH_DEFAULTS = {"objective": "e2e", "head": "resampler", "output": "tokens", "steps": 3000, "batch_size": 64,
                  "lr": 1e-3, "two_person_fraction": 0.0, "tables": "device"}


def resolve_e2e_flags(a) -> dict:
    """Fill the E2EConfig flags left unset (None) from the --config YAML, then from BENCH_DEFAULTS, in place;
    returns the YAML's mapping ({} without --config)."""
    from refgen.config import read_yaml

    yaml = read_yaml(a.config) if a.config else {}
    for key, default in BENCH_DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, yaml.get(key, default))
    return yaml


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke settings: every stage, a few identities/steps")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--n-train", type=int, default=1200)
    ap.add_argument("--n-val", type=int, default=24, help="validation identities (ids 400000...): choose alpha")
    ap.add_argument("--n-test", type=int, default=48)
    ap.add_argument("--n-pairs", type=int, default=24)
    # E2EConfig's keys: None = not given, so a --config YAML's value stands (BENCH_DEFAULTS fill the rest)
    ap.add_argument("--head", default=None, choices=["linear", "resampler"])
    ap.add_argument("--output", default=None, choices=["residual", "tokens"],
                    help="the head's output: a slot residual, or the placeholder's token embeddings")
    ap.add_argument("--objective", default=None, choices=["e2e"], help="the toy identities have no teachers")
    ap.add_argument("--steps", type=int, default=None, help=f"default {BENCH_DEFAULTS['steps']}")
    ap.add_argument("--batch-size", type=int, default=None, help=f"default {BENCH_DEFAULTS['batch_size']}")
    ap.add_argument("--lr", type=float, default=None, help=f"default {BENCH_DEFAULTS['lr']}")
    ap.add_argument("--two-person-fraction", type=float, default=None, help="default 0")
    ap.add_argument("--alphas", default="0.8,1,1.4,1.8", help="head alphas to render (chosen on validation people)")
    ap.add_argument("--config", default=None, help="E2EConfig YAML: its keys override the bench's defaults, the "
                                                   "flags given override both")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--stream", action="store_true",
                    help="render the training people on the fly into the trainer's cache instead of writing "
                         "OUT/train/seed_<id>/ folders first (same people, same photos and prompts)")
    ap.add_argument("--cache-dir", default=None, help="the trainer's data cache (default OUT/head/cache); a cache "
                                                      "made from the same people and settings is reused")
    ap.add_argument("--init-head", default=None, help="a head folder whose weights start the training (E2EConfig."
                                                      "init_head): e.g. two-person steps on top of a one-person head")
    ap.add_argument("--eval-head", default=None, help="score this trained head folder instead of training one "
                                                      "(refused if it was trained on the test or validation people)")
    ap.add_argument("--id-guidance", type=float, default=0.0,
                    help="render every scored image with this identity guidance (SamplingConfig.id_guidance)")
    ap.add_argument("--tables", default=None, choices=["device", "mapped"],
                    help="the cache on the device, or memory-mapped with a step's rows moved to it")
    return ap


def main(argv=None) -> int:
    from refgen.artifacts import atomic_write_json, provenance
    from refgen.identity.train_e2e import E2EConfig, train_e2e
    from refgen.toyworld.benchmark import (BenchmarkConfig, attributes_of, caption_ceiling, check_disjoint,
                                           default_model, default_vl_model, held_out_ranges, render_config,
                                           test_pairs)
    from refgen.toyworld.identities import make_identities

    a = build_parser().parse_args(argv)
    yaml = resolve_e2e_flags(a)
    if a.tiny:
        a.device, a.dtype, a.n_train, a.n_val, a.n_test, a.n_pairs = "cpu", "fp32", 6, 2, 2, 1
        a.steps, a.batch_size, a.alphas = 4, 4, "1"
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    alphas = [float(x) for x in a.alphas.split(",")]
    t0 = time.time()
    times: dict = {}
    model, vl = default_model(), default_vl_model()
    tiny = {"render_steps": 2, "seeds": [0], "scenes": ["beach", "city"]} if a.tiny else {}
    bcfg = BenchmarkConfig(device=a.device, dtype=a.dtype, n_train=a.n_train, n_test=a.n_test, n_pairs=a.n_pairs,
                           head_alphas=alphas, id_guidance=a.id_guidance, **tiny)
    ranges = held_out_ranges(bcfg, model)
    if a.n_val:
        ranges["validation identities (alpha)"] = [VAL_SEED, VAL_SEED + a.n_val]
        check_disjoint(ranges)
    if not a.stream and not a.eval_head:
        make_identities(out / "train", n=a.n_train, seed=bcfg.train_seed, progress=False)
    make_identities(out / "test", n=a.n_test, seed=bcfg.test_seed, progress=False)
    if a.n_val:
        make_identities(out / "val", n=a.n_val, seed=VAL_SEED, progress=False)
    times["identities_s"] = time.time() - t0

    over = {"objective": a.objective, "head": a.head, "output": a.output, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
            "two_person_fraction": a.two_person_fraction,
            **{k: max(1, a.steps // 4) for k in ("eval_every", "checkpoint_every") if k not in yaml}, "tables": a.tables,
            **({"cache_dir": a.cache_dir} if a.cache_dir else {}),
            **({"init_head": a.init_head} if a.init_head else {}),
            **({"toyworld_identities": a.n_train, "toyworld_first_id": bcfg.train_seed} if a.stream else {})}
    if a.tiny:
        over.update(eval_identities=2, warmup_steps=1, two_person_images=8,
                    two_person_fraction=a.two_person_fraction or 0.5)
    ecfg = E2EConfig.from_yaml(a.config, **over) if a.config else E2EConfig(**over)
    t = time.time()
    head_dir = Path(a.eval_head) if a.eval_head else out / "head"
    if a.eval_head:  # score a trained head again (new measures, other alphas): its people must not be these
        rec = json.loads((head_dir / "head.json").read_text())
        scored = {f"seed_{i}" for key in ("test identities", "validation identities (alpha)")
                  for i in range(*ranges.get(key, [0, 0]))}
        seen = scored & set(rec.get("train_ids", []) + rec.get("val_ids", []))
        if seen:
            raise ValueError(f"--eval-head {head_dir} was trained on {len(seen)} of the people it would be scored "
                             f"on (e.g. {sorted(seen)[0]})")
        summary = rec.get("metrics", {})
    else:
        summary = train_e2e(None if a.stream else out / "train", head_dir, model, vl, ecfg, device=a.device,
                            dtype=a.dtype, progress=not a.tiny)
        rec = json.loads((head_dir / "head.json").read_text())
    times["train_total_s"] = time.time() - t
    times.update({f"train_{k}": v for k, v in rec.get("timings", {}).items()})

    t = time.time()
    dev = a.device
    pipe, head, fx, net, neg = scoring_setup(model, vl, head_dir, dev, a.dtype)
    test_dirs = _dirs(out / "test")
    test_attrs = [attributes_of(d) for d in test_dirs]
    pairs = test_pairs(len(test_dirs), a.n_pairs)
    result: dict = {"config": vars(a), "e2e_config": rec["config"], "train_summary": summary,
                    "held_out_ranges": ranges, "model": model, "vl_model": vl}
    pair_alpha = None
    iso = bool(rec["config"].get("isolate_slots"))  # two people are encoded as the head was trained
    if a.n_val:
        val_dirs = _dirs(out / "val")
        val_attrs, val_res = [attributes_of(d) for d in val_dirs], residuals(head, fx, val_dirs)
        val = sweep(pipe, net, dev, val_attrs, val_res, alphas, bcfg, neg)
        ok = {k: m for k, m in val.items() if m["scene_acc"] >= 0.9} or val
        alpha = max(ok, key=lambda k: (ok[k]["identity_acc"], ok[k]["attribute_acc"]))
        result["val"] = {"per_alpha": val, "chosen_alpha": alpha}
        val_pairs = test_pairs(len(val_dirs), min(a.n_pairs, len(val_dirs) * (len(val_dirs) - 1) // 2))
        if pairs and val_pairs:  # two people may want another alpha than one: chosen on validation pairs too
            vp = {f"{x:g}": two_slot(pipe, net, dev, val_attrs, val_res, val_pairs, x, bcfg, neg, iso, head)
                  for x in alphas}
            pair_alpha = max(vp, key=lambda k: (vp[k]["all_people_acc"], vp[k]["identity_acc"]))
            result["val"].update(pairs_per_alpha=vp, chosen_pair_alpha=pair_alpha)
    else:
        alpha = f"{alphas[0]:g}"
    test_res = residuals(head, fx, test_dirs)
    result["test"] = {"per_alpha": sweep(pipe, net, dev, test_attrs, test_res, alphas, bcfg, neg), "alpha": alpha}
    times["eval_head_s"] = time.time() - t
    t = time.time()
    result["ceiling"] = caption_ceiling(pipe, net, test_attrs, pairs, bcfg.scenes, bcfg.seeds, render_config(bcfg),
                                        neg, dev)
    if pairs:
        result["two_slot"] = two_slot(pipe, net, dev, test_attrs, test_res, pairs, float(alpha), bcfg, neg, iso,
                                      head)
        if pair_alpha is not None and pair_alpha != alpha:
            result["two_slot_pair_alpha"] = {"alpha": pair_alpha, **two_slot(pipe, net, dev, test_attrs, test_res,
                                                                              pairs, float(pair_alpha), bcfg, neg,
                                                                              iso, head)}
    times["eval_ceiling_two_slot_s"] = time.time() - t
    t = time.time()
    result["copy_paste"] = copy_paste(pipe, net, dev, head, fx, test_dirs, test_attrs, float(alpha), bcfg, neg)
    times["eval_copy_paste_s"] = time.time() - t
    times["total_s"] = time.time() - t0
    result["timings"] = times
    result["device"] = torch.cuda.get_device_name() if str(dev).startswith("cuda") else "cpu"
    atomic_write_json(out / "result.json", provenance(**result))

    c1 = result["ceiling"]["single"]
    print(f"head {a.head} ({a.output}), objective {a.objective}: {a.n_train} training people, {a.steps} steps x {a.batch_size}; "
          f"{len(test_dirs)} unseen test people x {len(bcfg.scenes)} scenes x {len(bcfg.seeds)} seeds, "
          f"{bcfg.render_steps} steps, true CFG {bcfg.true_cfg}; intervals 95 % Wilson on images, and by person "
          f"(clustered: a person's images are not independent)")
    if "val" in result:
        per = result["val"]["per_alpha"].items()
        print(f"alpha chosen on {a.n_val} validation people: {alpha} (" + ", ".join(
            f"{k}: id {m['identity_acc']:.1%}, scene {m['scene_acc']:.1%}" for k, m in per) + ")")
    print(f"{'':24s} {'identity (all 7)':28s} {'by person':18s} {'of ceiling':10s} {'attributes':10s} {'scene':28s} n")
    for name, m in [("caption ceiling", c1)] + [(f"head alpha {k}" + (" (chosen)" if k == alpha else ""), m)
                                                 for k, m in result["test"]["per_alpha"].items()]:
        of = "" if m is c1 else f"{m['identity_acc'] / max(c1['identity_acc'], 1e-9):.0%}"
        cp = m.get("identity_ci_people")
        print(f"{name:24s} {_pct(m, 'identity_acc'):28s} {f'[{cp[0]:.1%}, {cp[1]:.1%}]' if cp else '':18s} "
              f"{of:10s} {m['attribute_acc']:<10.1%} {_pct(m, 'scene_acc'):28s} {m['n_people']}")
    if pairs:
        c2, m = result["ceiling"]["pair"], result["two_slot"]
        print(f"two people, both right in order: ceiling {_pct(c2, 'all_people_acc')}, head (alpha {alpha}) "
              f"{_pct(m, 'all_people_acc')}, n = {m['n_images']} images; person count {m['people_count_acc']:.1%}, "
              f"each person {m['identity_acc']:.1%}" + (f", wrong attributes that are the other person's "
                                                        f"{m['leak']:.1%} (chance {m['leak_chance']:.1%}, n = "
                                                        f"{m['leak_n']})" if "leak" in m else ""))
        if "two_slot_pair_alpha" in result:
            m = result["two_slot_pair_alpha"]
            print(f"two people at the alpha chosen on validation pairs ({m['alpha']}): both right "
                  f"{_pct(m, 'all_people_acc')}, each person {m['identity_acc']:.1%}")
        elif "val" in result and "chosen_pair_alpha" in result["val"]:
            print(f"validation pairs chose the same alpha ({result['val']['chosen_pair_alpha']})")
    for who, m in result["copy_paste"].items():
        print(f"copy-paste, one reference photo, prompt asks another scene/expression/pose ({who}): identity "
              f"{_pct(m, 'identity_acc')}, scene as asked {_pct(m, 'scene_acc')} (reference's scene "
              f"{m['scene_is_reference_scene']:.1%}), expression as asked {m['expression_as_asked']:.1%} "
              f"(reference's {m['expression_is_reference']:.1%}), waving as asked {m['pose_waving_as_asked']:.1%} "
              f"(n = {m['n_images']} images, {m['n_asked_waving']} asked to wave)")
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    print(f"record: {out / 'result.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
