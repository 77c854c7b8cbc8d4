"""The DiT quality yardstick (issue 22 item 1): time-to-quality of NanoDiT on the toy world.

    render   toy-world scenes with captions: training scenes and held-out scenes from disjoint seed ranges
    prepare  the real `refgen dit prepare` path on those folders (buckets, VAE latents + stats, T5, DINOv3, shards)
    train    `refgen dit train`'s own `train()`; every `eval_every` steps its EMA weights are scored (that time
             is excluded from the training clock)
    score    sample from the held-out captions (text only: DINO dropped) and from the held-out images' DINO
             features (DINO only: text dropped), decode, read with the toy-world recognizer: every captioned
             attribute, whole person, scene, person count, each with its 95 % Wilson interval
    report   time-to-quality: training minutes until the caption attribute accuracy (and, separately, the DINO
             check's) crosses each threshold, a JSON table and a PNG curve

Resume (`run_yardstick(..., resume=True)`, `--resume`): a variant whose run folder holds a checkpoint from an earlier
call with the same settings continues from it, to the same weights, losses and scores as one longer run (`train`'s
resume is bit-exact and the LR schedule does not depend on `steps`, checked); the earlier scorings are read back.
A checkpoint is written at every scoring, so a call cut by its time limit loses at most one `eval_every`.

Encoders. The text encoder and DINOv3 are `refgen dit tiny-models`' tiny random-weight models (a T5 whose
tokenizer knows the toy world's words, a 2-layer DINOv3ViT): random features still carry the caption and the
image, but they are not what a real T5 / DINOv3 give. The VAE is the toy world's TRAINED VAE (the toy Qwen-Image
model's `AutoencoderKLQwenImage`, /4): a random-weight VAE would decode to pictures nobody can read, so no
sampler could score on the recognizer. /4 means DiT patch 4 for one DiT token per 16 px DINOv3 patch (a 64 px image
is 4 x 4 tokens). The VAE round trip of the held-out images is scored too: the ceiling any DiT can reach here.

Held-out: scene seeds TRAIN_SEED_BASE + seed * 1e7 + [0, n_train) for training and EVAL_SEED_BASE + seed * 1e7 +
[0, n_eval) for scoring, checked disjoint from every toy-world range the judge and the VAE were trained or
validated on (`seed_ranges`). Held-out captions name all 7 identity attributes of every person.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refgen.artifacts import JsonlLogger, atomic_save_image, atomic_write_json, atomic_write_text, provenance
from refgen.config import flatten
from refgen.dit.config import TrainConfig, train_config_from_dict
from refgen.toyworld import world

TRAIN_SEED_BASE = 5_000_000_000   # the yardstick's training scenes (toy world: 1e9 recognizer, 2e9 its held-out,
EVAL_SEED_BASE = 5_500_000_000    # 3e9 toy model, 4e9 its VAE check, 6e9 / 6.5e9 moe); seed_ranges checks them
SEED_STRIDE = 10_000_000          # `seed` moves both ranges, as the other toy-world sets do


@dataclass
class YardstickConfig:
    out_dir: str = "runs/dit_yardstick"
    n_train: int = 50_000            # training images (64 px toy-world scenes, captions with random subsets)
    n_eval: int = 256                # held-out scenes: one caption (all attributes named) and one image each
    size: int = 64                   # px; the toy VAE and the recognizer were trained at 64
    seed: int = 0                    # moves both seed ranges by seed * 1e7
    p_bare: float = 0.25             # training captions: share of people described as just "a person"
    p_full: float = 0.5              # ... and of the others, the share named with all 7 attributes
    vae: str | None = None           # None: the toy world's trained VAE
    t5_dim: int = 64                 # the tiny random encoders' widths
    dino_dim: int = 64
    t5_max_length: int = 96          # toy captions are <= 73 tokens with the toy-world vocabulary (tested)
    eval_every: int = 500            # training steps between scorings
    sample_steps: int = 20
    shift: float = 1.0
    s_text: float = 4.0              # text check: v_uncond + s_text * (v_text - v_uncond)
    s_dino: float = 2.0              # DINO check: v_uncond + s_dino * (v_dino - v_uncond)
    thresholds: list[float] = field(default_factory=lambda: [0.8, 0.9])
    device: str | None = None        # None: CUDA
    render_workers: int = 0          # processes rendering the images (0: this process)
    prepare_batch_size: int = 64
    # True: the training shards are read once (through refgen.dit.shards) into device memory and batches are drawn
    # from there, so the curve measures the model, not the shard reader (a nano step on 16-token images outruns
    # webdataset's ~1 ms per sample per worker). False: `refgen dit train`'s shard loader, as a real run reads.
    data_in_memory: bool = True
    progress: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        for k in ("n_train", "n_eval", "eval_every", "sample_steps", "t5_dim", "dino_dim", "t5_max_length",
                  "prepare_batch_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"yardstick {k} must be >= 1, got {getattr(self, k)}")
        if self.size < world.MIN_SIZE or self.size % 16:
            raise ValueError(f"yardstick size must be a multiple of 16 and >= {world.MIN_SIZE}, got {self.size}")
        if self.n_train > SEED_STRIDE // 2 or self.n_eval > SEED_STRIDE:
            raise ValueError(f"n_train must be <= {SEED_STRIDE // 2} and n_eval <= {SEED_STRIDE} (seed ranges)")
        if not all(0 < t <= 1 for t in self.thresholds) or not self.thresholds:
            raise ValueError(f"thresholds must be in (0, 1], got {self.thresholds}")
        if not 0 <= self.p_bare <= 1 or not 0 <= self.p_full <= 1:
            raise ValueError("p_bare and p_full must be in [0, 1]")
        self.train.validate()

    @classmethod
    def tiny(cls, out_dir: str, **overrides) -> YardstickConfig:
        """The CPU smoke run (~20 s on 2 cores): every stage on a handful of images; its numbers mean nothing."""
        train = train_config_from_dict({
            "model": {"preset": "tiny", "patch_size": 4}, "dims_from_data": True, "steps": 4, "batch_size": 4,
            "effective_batch": 4, "lr": 1e-3, "lr_warmup_steps": 1, "ema_decay": 0.9, "log_every": 2,
            "ckpt_every": 4, "num_workers": 0, "dtype": "fp32", "device": "cpu", "progress": False,
            "repa": {"depth": 1, "proj_hidden": 32}})   # a `repa` variant only sets enabled: true
        d = dict(out_dir=out_dir, n_train=12, n_eval=6, t5_dim=16, dino_dim=16, t5_max_length=64, eval_every=2,
                 sample_steps=2, device="cpu", prepare_batch_size=8, progress=False, train=train)
        d.update(overrides)
        return cls(**d)


def load_yardstick_config(path: str | Path, **overrides) -> YardstickConfig:
    """configs/dit_yardstick_*.yaml: YardstickConfig's fields, with `train:` a `refgen dit train` config."""
    from refgen.config import from_dict, read_yaml

    d = read_yaml(path)
    d.update({k: v for k, v in overrides.items() if v is not None})
    train = train_config_from_dict(d.pop("train", {}), source=path)
    cfg = from_dict(YardstickConfig, d, source=path)
    cfg.train = train
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------------------------------ data

def seed_ranges(cfg: YardstickConfig) -> dict[str, list[int]]:
    """Half-open scene-seed ranges of the yardstick's sets and of every toy-world set its judge (recognizer) and
    its VAE (toy model) saw; refused if any two overlap (refgen.toyworld.benchmark.check_disjoint)."""
    from refgen.toyworld import model_recipe as T
    from refgen.toyworld import recognizer as R
    from refgen.toyworld.benchmark import DEFAULT_MODEL, check_disjoint

    lo_t = TRAIN_SEED_BASE + cfg.seed * SEED_STRIDE
    lo_e = EVAL_SEED_BASE + cfg.seed * SEED_STRIDE
    ranges = {"yardstick training scenes": [lo_t, lo_t + cfg.n_train],
              "yardstick held-out scenes": [lo_e, lo_e + cfg.n_eval]}
    rec = json.loads((R.DEFAULT_DIR / "config.json").read_text())["config"]
    lo = R.TRAIN_SEED_BASE + rec["seed"] * SEED_STRIDE
    ranges["recognizer training scenes"] = [lo, lo + rec["n_train"]]
    ranges["recognizer held-out scenes"] = [R.EVAL_SEED_BASE, R.EVAL_SEED_BASE + rec["n_eval"]]
    meta = DEFAULT_MODEL / "refgen_toyworld.json"
    if cfg.vae is None and meta.is_file():
        mc = json.loads(meta.read_text())["config"]
        lo = T.DATA_SEED_BASE + mc["seed"] * SEED_STRIDE
        ranges["toy model (VAE) training scenes"] = [lo, lo + mc["n_images"]]
    check_disjoint(ranges)
    return ranges


def training_caption(scene: world.Scene, seed: int, p_bare: float, p_full: float) -> str:
    return world.caption(scene, random.Random(world.derive_seed("dit-yardstick-caption", seed)), p_bare=p_bare,
                         p_full=p_full)


def held_out_caption(scene: world.Scene, seed: int) -> str:
    """Every person with all 7 identity attributes in words (p_full = 1, never bare): each is scored."""
    return world.caption(scene, random.Random(world.derive_seed("dit-yardstick-caption", seed)), p_bare=0.0,
                         p_full=1.0)


def _render_one(job: tuple[int, int, str, str, float, float]) -> None:
    seed, size, folder, kind, p_bare, p_full = job
    png = Path(folder) / f"{seed}.png"
    if png.is_file() and png.with_suffix(".txt").is_file():
        return   # a re-run renders only what is missing
    scene = world.scene_from_seed(seed)
    text = held_out_caption(scene, seed) if kind == "eval" else training_caption(scene, seed, p_bare, p_full)
    atomic_save_image(world.render(scene, size), png)
    atomic_write_text(png.with_suffix(".txt"), text + "\n")


def render_images(cfg: YardstickConfig, kind: str) -> tuple[Path, list[int]]:
    """out/images/{train,eval}/SEED.png + SEED.txt (the caption `prepare` reads). Returns (folder, seeds)."""
    lo = (TRAIN_SEED_BASE if kind == "train" else EVAL_SEED_BASE) + cfg.seed * SEED_STRIDE
    seeds = list(range(lo, lo + (cfg.n_train if kind == "train" else cfg.n_eval)))
    folder = Path(cfg.out_dir) / "images" / kind
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(s, cfg.size, str(folder), kind, cfg.p_bare, cfg.p_full) for s in seeds]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=f"render {kind}", disable=not cfg.progress)
    if cfg.render_workers > 0:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(cfg.render_workers) as pool:
            for _ in pool.imap_unordered(_render_one, jobs, chunksize=256):
                bar.update(1)
    else:
        for j in jobs:
            _render_one(j)
            bar.update(1)
    bar.close()
    return folder, seeds


def eval_rows(cfg: YardstickConfig, seeds: list[int]) -> dict[str, dict]:
    """prepare's sample key of each held-out image -> what its caption asks for {people: [attrs...], scene}."""
    from refgen.dit.prepare import make_key

    rows = {}
    for s in seeds:
        sc = world.scene_from_seed(s)
        rows[make_key(f"{s}.png")] = {"seed": s, "scene": sc.background,
                                      "people": [p.identity.to_dict() for p in sc.people]}
    return rows


def toy_vocabulary() -> list[str]:
    """Every word a toy-world caption uses, as the tiny T5 tokenizer's whole-word pieces (capitalised too: a
    caption starts with a capital)."""
    words = {w.strip(",.;:") for t in world.template_texts() for w in t.split()}
    words |= {"a", "an", "with", "and", "wearing", "people", "two", "on", "the", "left", "right", "next", "to",
              "of", "in", "at", "by", "under", "among", "front", "looking", "someone", "person", "photo"}
    words = sorted(w for w in words if w)
    return words + [w.capitalize() for w in words if not w[0].isupper()]


def write_encoders(cfg: YardstickConfig) -> dict[str, str]:
    """The tiny random T5 (toy-world vocabulary) and DINOv3 under out/encoders, plus the VAE to use."""
    from refgen.dit.tiny_encoders import write_tiny_models
    from refgen.toyworld.benchmark import DEFAULT_MODEL

    folder = Path(cfg.out_dir) / "encoders"
    done = folder / "encoders.json"
    if done.is_file():
        paths = json.loads(done.read_text())["paths"]
    else:
        paths = write_tiny_models(folder, t5_dim=cfg.t5_dim, dino_dim=cfg.dino_dim, words=toy_vocabulary())
        shutil.rmtree(paths.pop("vae"))   # the tiny VAE is random: it decodes to noise (module docstring)
        atomic_write_json(done, provenance(None, paths=paths, random_weights=["text_encoder", "dino"]))
    paths = dict(paths)
    paths["vae"] = cfg.vae or str(DEFAULT_MODEL / "vae")
    return paths


def vae_factor(vae_path: str) -> int:
    from refgen.dit.encoders import load_vae, vae_downsample

    return vae_downsample(load_vae(vae_path, None, torch.device("cpu"), torch.float32))


def prepare_set(cfg: YardstickConfig, kind: str, src: Path, enc: dict[str, str]) -> Path:
    """`refgen dit prepare` on one rendered folder (idempotent: a finished shard folder costs a scan)."""
    from refgen.dit.prepare import PrepareConfig, prepare

    device = _device(cfg)
    out = Path(cfg.out_dir) / "shards" / kind
    pc = PrepareConfig(src=str(src), out=str(out), vae=enc["vae"], vae_subfolder=None,
                       text_encoder=enc["text_encoder"], dino=enc["dino"], buckets=f"{cfg.size}x{cfg.size}",
                       t5_max_length=cfg.t5_max_length, shard_size=5000, batch_size=cfg.prepare_batch_size,
                       num_workers=2, device=str(device),
                       dtype="bf16" if device.type == "cuda" else "fp32", dit_patch_size=16 // vae_factor(enc["vae"]))
    prepare(pc, progress=cfg.progress)
    return out


class MemoryBatches:
    """Every training sample of a shard folder in device memory, read once through the shard reader (so the
    batches are exactly what the loader yields: normalised latents, padded T5 + mask); re-iterating gives the next
    epoch in a new order (seeded by seed and epoch), so a run is reproducible."""

    def __init__(self, shard_dir: Path, batch_size: int, seed: int, device: torch.device, num_workers: int = 0):
        from refgen.dit import shards

        parts: dict[str, list[torch.Tensor]] = {}
        # decoding is ~1 ms a sample: the loader's workers read the shards in parallel (the order does not matter,
        # every epoch is drawn from a seeded permutation below)
        for b in shards.make_loader(shard_dir, 256, num_workers=num_workers, shuffle=False):
            for k in ("latent", "t5", "t5_mask", "dino_cls", "dino_patches"):
                parts.setdefault(k, []).append(b[k])
        self.data = {k: torch.cat(v).to(device) for k, v in parts.items()}
        self.n, self.batch_size, self.seed, self.epoch = len(self.data["latent"]), batch_size, seed, 0
        if self.n < batch_size:
            raise ValueError(f"{shard_dir} holds {self.n} samples, fewer than one batch of {batch_size}")

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(self.n, generator=g).to(self.data["latent"].device)
        for i in range(0, self.n - self.batch_size + 1, self.batch_size):   # whole batches only
            idx = order[i:i + self.batch_size]
            yield {k: v[idx] for k, v in self.data.items()}


def _device(cfg: YardstickConfig) -> torch.device:
    from refgen.runtime import resolve_device

    return resolve_device(cfg.device)


# ------------------------------------------------------------------------------------------------ scoring

def proportion(k: int, n: int) -> dict:
    """{acc, k, n, ci}: a proportion with its 95 % Wilson interval (the toy-world benchmark's `wilson`)."""
    from refgen.toyworld.benchmark import wilson

    return {"acc": k / n if n else None, "k": int(k), "n": int(n), "ci": wilson(int(k), int(n))}


def _proportions(s: dict) -> dict:
    n_img, n_p = s["n_images"], s["n_people"]
    n_attr = n_p * len(world.ATTRIBUTES)
    return {"attribute": proportion(round(s["attribute_acc"] * n_attr), n_attr),
            "person": proportion(round(s["identity_acc"] * n_p), n_p),
            "scene": proportion(round(s["scene_acc"] * n_img), n_img),
            "person_count": proportion(round(s["people_count_acc"] * n_img), n_img),
            "all_people": proportion(round(s["all_people_acc"] * n_img), n_img)}


def score_images(net, images: list, rows: list[dict]) -> dict:
    """Recognizer reading of `images` against `rows` ({people: [attrs], scene}): the benchmark's `score`, with
    counts and Wilson intervals for each proportion. `attribute` pools every (person, attribute) judgement, so its
    interval treats the 7 attributes of a person as independent: narrower than the truth.

    `by_people` repeats the proportions for the images of one and of two captioned people, and for two also the
    benchmark's `leak` (of a person's wrong attributes where the two differ, the share drawn with the other
    person's value) against its chance level: a caption accuracy that stalls with one-person images near the
    ceiling and a high leak says the words are bound to the wrong person, not unlearnt."""
    from refgen.toyworld import recognizer as R
    from refgen.toyworld.benchmark import score

    preds = R.predict(net, images)
    s = score(preds, rows)
    out = {**_proportions(s), "per_attribute": s["per_attribute"], "by_people": {}}
    for k in sorted({len(r["people"]) for r in rows}):
        idx = [i for i, r in enumerate(rows) if len(r["people"]) == k]
        s = score([preds[i] for i in idx], [rows[i] for i in idx])
        out["by_people"][str(k)] = {**_proportions(s), **{x: s[x] for x in ("leak", "leak_chance", "leak_n") if x in s}}
    return out


class Scorer:
    """Held-out conditions (T5 of the captions, DINO of the images) loaded once; `__call__(model)` samples both
    checks, decodes with the VAE and the training set's latent statistics, and scores."""

    def __init__(self, cfg: YardstickConfig, train_dir: Path, eval_dir: Path, vae_path: str, rows: dict[str, dict]):
        from refgen.dit import shards
        from refgen.dit.encoders import load_vae
        from refgen.toyworld import recognizer as R

        self.cfg, self.device = cfg, _device(cfg)
        self.batches = list(shards.make_dataset(eval_dir, 64, shuffle=False))
        self.rows = [rows[k] for b in self.batches for k in b["key"]]
        self.mean, self.std = shards.load_latent_stats(train_dir)   # the space the DiT was trained in
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.vae = load_vae(vae_path, None, self.device, dtype)
        self.net = R.load(device="cpu")   # a small CNN; it reads the decoded PIL images where they are
        self.eval_dir = eval_dir

    def decode(self, latents: torch.Tensor) -> list:
        from refgen.dit.sample import decode, to_pil

        return to_pil(decode(latents, self.vae, self.mean, self.std))

    def ceilings(self) -> dict:
        """The recognizer on the held-out renders themselves (the judge's own accuracy) and on their VAE round trip
        (stored latents decoded: the best a DiT can reach through this VAE)."""
        from refgen.dit import shards
        from refgen.dit.sample import decode, to_pil

        renders = [world.render(world.scene_from_seed(r["seed"]), self.cfg.size) for r in self.rows]
        emean, estd = shards.load_latent_stats(self.eval_dir)   # the held-out latents' own normalisation
        trips = [im for b in self.batches for im in to_pil(decode(b["latent"], self.vae, emean, estd))]
        return {"renders": score_images(self.net, renders, self.rows),
                "vae_round_trip": score_images(self.net, trips, self.rows)}

    @torch.no_grad()
    def __call__(self, model) -> tuple[dict, dict[str, list]]:
        from refgen.dit.model import Cond
        from refgen.dit.sample import sample

        amp = torch.bfloat16 if self.device.type == "cuda" else None
        checks = {"text": (self.cfg.s_text, 0.0), "dino": (0.0, self.cfg.s_dino)}
        out, images = {}, {}
        for name, (s_text, s_dino) in checks.items():
            ims = []
            for i, b in enumerate(self.batches):
                cond = Cond.from_batch(b, self.device)
                lat = sample(model, cond, tuple(b["latent"].shape[-2:]), steps=self.cfg.sample_steps,
                             shift=self.cfg.shift, s_text=s_text, s_dino=s_dino, seed=i, autocast_dtype=amp)
                ims += self.decode(lat)
            out[name] = score_images(self.net, ims, self.rows)
            images[name] = ims
        return out, images


def time_to_quality(records: list[dict], thresholds: list[float], key: str = "attribute",
                    check: str = "text") -> dict[str, dict | None]:
    """For each threshold, the first scoring whose `check` ("text": from the caption, "dino": from the held-out
    image's DINO features) `key` accuracy reached it: {step, train_min, images_seen, acc, ci}; None if none did.
    Resolution: one `eval_every` (the crossing happened at or before)."""
    if check not in ("text", "dino"):
        raise ValueError(f"time_to_quality check must be 'text' or 'dino', got {check!r}")
    out = {}
    for t in thresholds:
        hit = next((r for r in records if r[check][key]["acc"] is not None and r[check][key]["acc"] >= t), None)
        out[f"{t:.0%}"] = None if hit is None else {
            "step": hit["step"], "train_min": hit["train_s"] / 60, "images_seen": hit["images_seen"],
            "acc": hit[check][key]["acc"], "ci": hit[check][key]["ci"]}
    return out


# ------------------------------------------------------------------------------------------------ driver

def run_yardstick(cfg: YardstickConfig, variants: dict[str, dict] | None = None, resume: bool = False) -> dict:
    """Render, prepare, then for each variant (name -> TrainConfig overrides; default {"default": {}}) train with
    scorings every `eval_every` steps: from scratch, or with `resume` from the checkpoint an earlier call with the
    same settings left in runs/<name>/ (`resume_point`: refused before anything is rendered if the settings differ),
    to `cfg.train.steps`. Writes out/yardstick.json (after every scoring too, so a call cut by its time limit leaves
    the curve so far), yardstick.png, per-variant runs/<name>/ (the train run, scores.jsonl, sample grids) and
    returns the report."""
    from refgen.toyworld.benchmark import DEFAULT_MODEL

    cfg.validate()
    variants = variants or {"default": {}}
    out = Path(cfg.out_dir)
    device_name = _device_name(_device(cfg))
    if resume:   # a mismatch is named now, not after minutes of rendering and preparing
        for name, overrides in variants.items():
            resume_point(cfg, name, overrides, device_name)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    ranges = seed_ranges(cfg)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    train_src, _ = render_images(cfg, "train")
    eval_src, eval_seeds = render_images(cfg, "eval")
    timings["render_s"] = time.perf_counter() - t
    t = time.perf_counter()
    enc = write_encoders(cfg)
    train_dir = prepare_set(cfg, "train", train_src, enc)
    eval_dir = prepare_set(cfg, "eval", eval_src, enc)
    timings["prepare_s"] = time.perf_counter() - t

    scorer = Scorer(cfg, train_dir, eval_dir, enc["vae"], eval_rows(cfg, eval_seeds))
    ceilings = scorer.ceilings()
    report = {"config": _config_dict(cfg), "variants": {}, "seed_ranges": ranges, "ceilings": ceilings,
              "encoders": {"vae": enc["vae"] + (" (the toy world's trained VAE)" if cfg.vae is None else ""),
                           "text_encoder": "tiny random-weight T5 (refgen dit tiny-models, toy-world vocabulary)",
                           "dino": "tiny random-weight DINOv3ViT (refgen dit tiny-models)"},
              "device": device_name, "timings": timings,
              "prepare_command": _prepare_command(cfg, enc, train_src, train_dir)}
    report["toy_model"] = str(DEFAULT_MODEL) if cfg.vae is None else None
    report["variants"].update(earlier_variants(out / "yardstick.json", cfg, skip=list(variants)))
    for name, overrides in variants.items():
        def publish(entry: dict, name: str = name) -> None:
            report["variants"][name] = entry
            _write_report(out, report, plot=False)

        report["variants"][name] = _run_variant(cfg, name, overrides, train_dir, scorer, resume, device_name,
                                                publish)
        first_name = next(iter(report["variants"]))
        first = report["variants"][first_name]
        if name != first_name:
            report["variants"][name]["loss_vs_first_variant"] = loss_agreement(first["loss_curve"],
                                                                              report["variants"][name]["loss_curve"])
        _write_report(out, report)
    timings["total_s"] = time.perf_counter() - t_all
    _write_report(out, report)
    return report


# settings that do not change what a variant's scores mean: an earlier call's variants are kept when all else matches
_RUN_ONLY = ("out_dir", "progress", "render_workers", "prepare_batch_size", "device")
# ... and those of a variant's `train` run (out_dir, data_dir and ckpt_every are the yardstick's own; steps is
# where a run stands, each variant reports its own)
_TRAIN_RUN_ONLY = ("out_dir", "data_dir", "resume", "progress", "device", "ckpt_every", "steps")


def _comparable(config: dict) -> dict:
    d = {k: v for k, v in json.loads(json.dumps(config, default=str)).items() if k not in _RUN_ONLY}
    d["train"] = {k: v for k, v in d.get("train", {}).items() if k not in _TRAIN_RUN_ONLY}
    return d


def earlier_variants(path: Path, cfg: YardstickConfig, skip: list[str]) -> dict:
    """Variants an earlier call with the same settings scored into this OUT (a GPU session can run one variant per
    call on the same prepared data); those being re-run now are dropped. `train.steps` may differ: each variant
    reports its own."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    same = _comparable(old.get("config", {})) == _comparable(_config_dict(cfg))
    return {k: v for k, v in old.get("variants", {}).items() if k not in skip} if same else {}


# ------------------------------------------------------------------------------------------------ resume

VARIANT_FILE = "variant.json"   # runs/<name>/: the settings the run was started with, and one line per call


def _variant_train_dict(cfg: YardstickConfig, name: str, overrides: dict, train_dir: Path | None = None) -> dict:
    """The variant's `train` config as a dict: the yardstick's, with its run keys, then the variant's overrides."""
    from refgen.dit.config import to_dict

    d = to_dict(cfg.train)
    d.update(data_dir=str(train_dir) if train_dir else None, out_dir=str(Path(cfg.out_dir) / "runs" / name),
             resume=None, device=cfg.device, ckpt_every=cfg.eval_every, progress=cfg.progress)
    for k, v in overrides.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return d


def _variant_settings(cfg: YardstickConfig, name: str, overrides: dict, device_name: str) -> dict:
    """What a continued run must share with the call that started it: the yardstick config with the variant's train
    config, and the device (train_s is wall-clock time: a curve timed on two kinds of device reads as neither)."""
    return {**_config_dict(cfg), "train": _variant_train_dict(cfg, name, overrides), "device_name": device_name}


def resume_point(cfg: YardstickConfig, name: str, overrides: dict, device_name: str) -> int | None:
    """The step runs/<name>/ can continue from (its latest checkpoint), or None when it holds none (the variant then
    trains from scratch). Refused, naming why, when the run was started with other settings (anything but steps and
    run-only settings), is already past `cfg.train.steps`, or when extending it would not give what one longer run
    gives."""
    from refgen.dit.train import CKPT_DIR, LATEST

    run = Path(cfg.out_dir) / "runs" / name
    latest = run / CKPT_DIR / LATEST
    if not latest.is_file():
        return None
    step = int(json.loads(latest.read_text())["step"])
    vfile = run / VARIANT_FILE
    if not vfile.is_file():
        raise ValueError(f"cannot resume yardstick variant {name}: {run} holds a checkpoint but no {VARIANT_FILE} (it "
                         f"was written before --resume existed, or by something else); run without --resume to "
                         f"train it from scratch")
    earlier = json.loads(vfile.read_text())
    old, new = (flatten(_comparable(s)) for s in (earlier["settings"], _variant_settings(cfg, name, overrides,
                                                                                       device_name)))
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))
    if differ:
        what = "; ".join(f"{k}: {old.get(k, '<absent>')!r} then, {new.get(k, '<absent>')!r} now" for k in differ)
        raise ValueError(f"cannot resume yardstick variant {name} from {run}: its settings differ in {what}. Give the "
                         f"same settings (only steps and run-only settings {list(_RUN_ONLY)} may change), or run "
                         f"without --resume to train it from scratch")
    if step > cfg.train.steps:
        raise ValueError(f"cannot resume yardstick variant {name}: {run} is at step {step}, past the {cfg.train.steps} "
                         f"steps asked for (give --steps >= {step})")
    _check_schedule_ignores_steps(_variant_train_dict(cfg, name, overrides), earlier["calls"], step, name)
    return step


def _check_schedule_ignores_steps(train: dict, calls: list[dict], done: int, name: str) -> None:
    """A run whose steps [0, done) were trained by calls aiming at other totals (`calls`: from_step, steps) equals
    one run of train["steps"] only if the LR of each of those steps does not depend on the total (a decay to the
    end would). Today's `lr_at` is warm-up then constant and the EMA decay depends on the step alone; this checks
    the former, so a schedule that starts to depend on `steps` is refused here instead of giving another curve."""
    from refgen.dit.config import train_config_from_dict
    from refgen.dit.train import lr_at

    new = train_config_from_dict(train, source=f"yardstick variant {name}")
    ends = [c["from_step"] for c in calls[1:]] + [done]
    for c, end in zip(calls, ends):
        if c["steps"] == new.steps:
            continue
        then = train_config_from_dict({**train, "steps": c["steps"]}, source=f"yardstick variant {name}")
        bad = next((s for s in range(c["from_step"], end) if lr_at(s, then) != lr_at(s, new)), None)
        if bad is not None:
            raise ValueError(f"cannot continue yardstick variant {name} to {new.steps} steps: its LR schedule depends "
                             f"on the total (step {bad} had {lr_at(bad, then)} in a run of {c['steps']}, a run of "
                             f"{new.steps} gives {lr_at(bad, new)}), so it would not be one longer run; run without "
                             f"--resume")


def _prune_checkpoints(run: Path) -> None:
    """Keep only the checkpoint latest.json names: `train` keeps every one it writes, and the yardstick writes one
    per scoring (base: ~8.5 GB each with its optimizer state). Also removes the temp file of a write that a killed
    call left behind."""
    from refgen.dit.train import CKPT_DIR, LATEST, latest_checkpoint

    keep = latest_checkpoint(run)
    if keep is None:
        return
    for f in (run / CKPT_DIR).iterdir():
        if f.is_file() and f.name != LATEST and f.name != keep.name:
            f.unlink()


# ------------------------------------------------------------------------------------------------ one variant

def _run_variant(cfg: YardstickConfig, name: str, overrides: dict, train_dir: Path, scorer: Scorer, resume: bool,
                 device_name: str, publish: Callable[[dict], None]) -> dict:
    from refgen.artifacts import drop_metrics_after, read_jsonl
    from refgen.dit.config import fit_to_shards
    from refgen.dit.model import count_params
    from refgen.dit.shards import load_index
    from refgen.dit.train import latest_checkpoint, model_from_checkpoint, train

    run = Path(cfg.out_dir) / "runs" / name
    start = resume_point(cfg, name, overrides, device_name) if resume else None
    records: list[dict] = []
    calls: list[dict] = []
    if start is None:
        shutil.rmtree(run, ignore_errors=True)   # a fresh variant's curve starts at step 0
    else:
        _prune_checkpoints(run)
        # the steps after the checkpoint are scored again (train() cuts its own metrics.jsonl back the same way)
        drop_metrics_after(run / "scores.jsonl", start)
        if (run / "scores.jsonl").is_file():
            records = read_jsonl(run / "scores.jsonl")
        calls = json.loads((run / VARIANT_FILE).read_text())["calls"]
    if start != cfg.train.steps:   # a run already at its steps is only reported again
        calls.append({"from_step": start or 0, "steps": cfg.train.steps})
    atomic_write_json(run / VARIANT_FILE, {"settings": _variant_settings(cfg, name, overrides, device_name),
                                           "calls": calls})
    d = _variant_train_dict(cfg, name, overrides, train_dir)
    d["resume"] = "auto" if start is not None else None
    tcfg = train_config_from_dict(d, source=f"yardstick variant {name}")
    # what train() does for shard data, done here because in-memory batches are passed as `data`
    tcfg, _ = fit_to_shards(tcfg, load_index(train_dir), train_dir, f"yardstick variant {name}")
    log = JsonlLogger(run / "scores.jsonl")
    batch = tcfg.effective_batch

    def entry(n_params: int, step: int) -> dict:
        losses = {}
        if (run / "metrics.jsonl").is_file():
            for r in read_jsonl(run / "metrics.jsonl"):
                losses[r["step"]] = r["loss"]
        curve = [[s, v] for s, v in sorted(losses.items())]
        return {"overrides": overrides, "n_params": n_params, "steps": step,
                "final_loss": curve[-1][1] if curve else None, "loss_curve": curve, "scores": records,
                "time_to_quality": time_to_quality(records, cfg.thresholds),
                "time_to_quality_dino": time_to_quality(records, cfg.thresholds, check="dino"),
                "calls": calls}

    def score(step: int, ema, train_s: float) -> None:
        t = time.perf_counter()
        scores, images = scorer(ema)
        rec = {"step": step, "train_s": train_s, "images_seen": step * batch, **scores,
               "score_s": time.perf_counter() - t}
        records.append(rec)
        log.log(**rec)
        _save_grid(images, run / f"samples_step{step:07d}.png")

    def on_eval(step: int, ema, train_s: float) -> None:
        _prune_checkpoints(run)   # train wrote this step's checkpoint just before
        score(step, ema, train_s)
        publish(entry(count_params(ema), step))

    if start is not None and not any(r["step"] == start for r in records):
        # the earlier call was cut between the checkpoint and its scoring, which the resumed run does not repeat
        ck = latest_checkpoint(run)
        ema, _ = model_from_checkpoint(ck, _device(cfg))
        # mmap: one number, not the whole checkpoint read a second time
        score(start, ema, float(torch.load(ck, map_location="cpu", weights_only=False, mmap=True)["train_seconds"]))
        del ema
    data = (MemoryBatches(train_dir, tcfg.batch_size, tcfg.seed, _device(cfg), tcfg.num_workers)
            if cfg.data_in_memory else None)
    summary = train(tcfg, data, config_name=f"yardstick variant {name}", on_eval=on_eval,
                    eval_every=cfg.eval_every)
    return entry(summary["n_params"], summary["step"])


def loss_agreement(a: list[list[float]], b: list[list[float]]) -> dict | None:
    """Two variants' flow-loss curves at the steps both logged: mean and max |a - b| / a (the FP8-vs-bf16 check:
    the noise of one run against another is the scale to read it on)."""
    bb = dict((int(s), v) for s, v in b)
    pairs = [(v, bb[int(s)]) for s, v in a if int(s) in bb]
    if not pairs:
        return None
    rel = [abs(x - y) / abs(x) for x, y in pairs if x]
    return {"steps_compared": len(pairs), "mean_rel_diff": sum(rel) / len(rel), "max_rel_diff": max(rel)}


def _save_grid(images: dict[str, list], path: Path, n: int = 8) -> None:
    """First n text-check samples above the first n DINO-check samples."""
    from PIL import Image

    rows = [images[k][:n] for k in ("text", "dino")]
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for j, r in enumerate(rows):
        for i, im in enumerate(r):
            grid.paste(im, (i * w, j * h))
    atomic_save_image(grid, path)


def _config_dict(cfg: YardstickConfig) -> dict:
    from refgen.dit.config import to_dict

    d = dataclasses.asdict(cfg)
    d["train"] = to_dict(cfg.train)
    return d


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def _prepare_command(cfg: YardstickConfig, enc: dict, src: Path, out: Path) -> str:
    return (f"refgen dit prepare {src} {out} --vae {enc['vae']} --vae-subfolder '' --text-encoder "
            f"{enc['text_encoder']} --dino {enc['dino']} --buckets {cfg.size}x{cfg.size} --t5-max-length "
            f"{cfg.t5_max_length} --dit-patch-size {16 // vae_factor(enc['vae'])}")


def _write_report(out: Path, report: dict, plot: bool = True) -> None:
    atomic_write_json(out / "yardstick.json", provenance(report["config"], **{k: v for k, v in report.items()
                                                                             if k != "config"}))
    if plot:
        plot_curves(report, out / "yardstick.png")


def plot_curves(report: dict, path: Path) -> None:
    """Caption attribute accuracy (text check, with its Wilson band), whole person and the DINO check against
    training minutes, per variant; thresholds and the VAE round-trip ceiling as horizontal lines."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(f"the yardstick's curve {path} needs matplotlib (pip install matplotlib); the numbers are "
                           f"in {path.with_suffix('.json')}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, v) in enumerate(report["variants"].items()):
        recs = v["scores"]
        if not recs:
            continue
        c = colours[i % len(colours)]
        x = [r["train_s"] / 60 for r in recs]
        ax.plot(x, [r["text"]["attribute"]["acc"] for r in recs], "-o", color=c, label=f"{name}: caption attributes")
        ax.fill_between(x, [r["text"]["attribute"]["ci"][0] for r in recs],
                        [r["text"]["attribute"]["ci"][1] for r in recs], color=c, alpha=0.15)
        ax.plot(x, [r["text"]["person"]["acc"] for r in recs], "--", color=c, label=f"{name}: whole person")
        ax.plot(x, [r["dino"]["attribute"]["acc"] for r in recs], ":", color=c, label=f"{name}: DINO check attributes")
    for t in report["config"]["thresholds"]:
        ax.axhline(t, color="grey", lw=0.8)
    ceil = report["ceilings"]["vae_round_trip"]["attribute"]["acc"]
    ax.axhline(ceil, color="black", lw=1, ls="-.", label=f"VAE round trip ceiling ({ceil:.0%})")
    ax.set_xlabel(f"training minutes ({report['device']})")
    ax.set_ylabel("recognizer accuracy on held-out captions")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("NanoDiT yardstick: time to quality (tiny random T5 / DINOv3, toy-world VAE)", fontsize=9)
    fig.tight_layout()

    def save(f):
        fig.savefig(f, format="png")

    from refgen.artifacts import atomic_write_file

    atomic_write_file(path, save)
    plt.close(fig)


def to_markdown(report: dict) -> str:
    """The time-to-quality table: one row per variant."""
    ths = report["config"]["thresholds"]
    head = "| variant | params | steps | " + " | ".join(f"min to {t:.0%}" for t in ths) + " | " + \
           " | ".join(f"DINO min to {t:.0%}" for t in ths) + \
           " | last caption attrs | last person | last scene | last count | last DINO attrs |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, v in report["variants"].items():
        last = v["scores"][-1] if v["scores"] else None
        # reports written before the DINO entry existed: computed from their scorings
        dino = v.get("time_to_quality_dino") or time_to_quality(v["scores"], ths, check="dino")
        ttq = [v["time_to_quality"][f"{t:.0%}"] for t in ths] + [dino[f"{t:.0%}"] for t in ths]
        cells = [f"{x['train_min']:.2f} (step {x['step']})" if x else "not reached" for x in ttq]

        def pc(m):
            return f"{m['acc']:.1%} [{m['ci'][0]:.0%}, {m['ci'][1]:.0%}]" if m and m["acc"] is not None else "-"

        lines.append(f"| {name} | {v['n_params'] / 1e6:.1f} M | {v['steps']} | " + " | ".join(cells) + " | " + (
            " | ".join(pc(last[c][k]) for c, k in (("text", "attribute"), ("text", "person"), ("text", "scene"),
                                                   ("text", "person_count"), ("dino", "attribute")))
            if last else "- | - | - | - | -") + " |")
    c = report["ceilings"]
    lines.append(f"\nCeilings (recognizer): held-out renders {c['renders']['attribute']['acc']:.1%} attributes, "
                 f"VAE round trip {c['vae_round_trip']['attribute']['acc']:.1%} attributes, "
                 f"{c['vae_round_trip']['person']['acc']:.1%} whole person.")
    return "\n".join(lines)


__all__ = ["YardstickConfig", "load_yardstick_config", "run_yardstick", "seed_ranges", "score_images",
           "time_to_quality", "to_markdown", "plot_curves", "toy_vocabulary", "TRAIN_SEED_BASE", "EVAL_SEED_BASE"]
