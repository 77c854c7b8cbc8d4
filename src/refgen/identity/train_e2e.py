"""`refgen train-head --objective e2e|teacher|mixed`: a head trained end to end through the frozen Qwen-Image.

Why. A head regressed onto teacher residuals can be no better than the teachers, and it learns from one pooled
vector per person. Trained through the frozen generator instead (as PhotoMaker, InstantID, IP-Adapter and
FastComposer are), the head is asked the question that matters: do its residuals, put into a prompt, make the
model draw this person? And the person must be drawn in a DIFFERENT photo than the references show (another scene,
another pose), so the head learns who it is, not how the reference photo looked.

One step, for a batch of target photos (each of a person with >= 2 photos):
  refs    1..refs_max other photos of the same person (never the target): their Qwen3-VL features, cached once
          per photo (the vision tower is frozen), go through the head -> residual R (L, H)
  prompt  the target photo's own sentence with `~ID~` (seed_<id>/prompts.json, else `default_prompt`), from a bank
          encoded once (the text encoder is frozen, so this is exact); R is added in its slot window.
          With output "tokens" the head's output is instead the placeholder's input token embeddings, and the
          sentence is encoded again every step with them in the slot (as token inversion does)
  loss    e2e:     flow matching on the target's VAE latent (cached once) through the frozen transformer: the
                   one path `refgen invert` optimises (QwenFlowModel + flow.loss), with R in place of a teacher
          teacher: the regression head_loss on the person's teacher residual (no transformer)
          mixed:   e2e + teacher_weight * teacher
Two-person steps (toy-world identities only, `two_person_fraction`): a two-person image of two training people
rendered by the toy world, in a prompt with two `~ID~` slots, each filled with its own person's head output.
With `loc_weight` these steps also ask each person's image tokens to read their own slot (`localize`: the renders
know where each person is drawn).

Data parallel under torchrun: every rank reads the same data cache and draws the same global batch from the same
generator, then takes its share (items rank, rank + world, ...). Gradients are summed over ranks by one
all-reduce per step that EVERY rank joins, also when the share is empty (the last batch of an epoch can be
smaller than the number of ranks): an empty share contributes zeros. Each rank scales its loss by 1 / global
batch, so the summed gradient is the mean over the global batch, as in one process (tested on 2 gloo ranks).

Everything a step draws (targets, references, sigma, noise, two-person or not) comes from a generator seeded by
(seed, step), and the epoch order by (seed, epoch): a resumed run continues exactly where it stopped.

Data: every photo's features, latent and prompt row are computed once into a disk cache (`e2e_cache`: rank 0
writes it, the others wait; reused when made from the same key). With tables "device" each rank loads all of it
onto its device (~20 KB a photo at 64 px); with tables "mapped" it stays memory-mapped and a step moves only the
rows it drew (B targets, their references) to the device, which is what 20,000 real identities need.
Features of a person's photos are taken together, as `VisionFeatures` takes a reference set (in chunks of
`max_images`, one pixel budget per chunk); a step's subset is then pooled from these per-photo features. Under a
pixel budget that scales photos down, a subset alone would be scaled less than the full set: the features would
differ slightly from inference on that subset (not at all for photos within the budget, e.g. the toy world's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refgen import flow
from refgen.artifacts import (JsonlLogger, atomic_save_safetensors, atomic_torch_save, atomic_write_json,
                             drop_metrics_after, provenance)
from refgen.identity.head import PLACEHOLDER_KEY
from refgen.identity.slots import SLOT_REPEAT

OBJECTIVES = ("e2e", "teacher", "mixed")
OUTPUTS = ("residual", "tokens")
# A token head's output is in units of the embedding table's RMS; token teachers move the placeholder by 1.3-1.5
# of that per token within 300 steps (docs/head.md), so the residual heads' clamp at 1.5 would bind.
TOKEN_SCALE_MAX = 4.0


@dataclass
class E2EConfig:
    objective: str = "e2e"            # e2e | teacher | mixed
    head: str = "resampler"           # linear | resampler
    # What the head's output is (the two modes of teacher inversion):
    #   residual  a slot residual R (L, H) added to the encoder output in the ~ID~ window
    #   tokens    the placeholder's input token embeddings T = T_ph + e * out (L, H_in), e the RMS of the text
    #             encoder's embedding table, read by the frozen text encoder every step (it stays on the GPU and is
    #             back-propagated through), so the words after ~ID~ read the person too. The default: on the
    #             toy world it doubles what a head gets right on unseen people (docs/head.md)
    output: str = "tokens"
    resampler: dict = field(default_factory=dict)  # ResamplerConfig overrides (width, layers, heads, ...)
    features: dict = field(default_factory=dict)   # FeatureConfig overrides (pixel_budget, max_side, max_images)
    steps: int = 2000
    batch_size: int = 16              # target photos per step, over all ranks together
    refs_min: int = 1                 # reference photos per person and step: uniform in [refs_min, refs_max],
    refs_max: int = 3                 # never more than the person's other photos
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50            # linear warm-up, then cosine down to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    sigma_sampling: str = "logit_normal"
    sigma_tail: float = 0.0           # share of sigmas drawn uniform on [sigma_tail_low, 1] instead (flow.sample_sigmas):
    sigma_tail_low: float = 0.95      # logit-normal never trains the sampler's first step, sigma = 1
    height: int = 64                  # target photos are centre-cropped and resized to this before the VAE
    width: int = 64
    default_prompt: str = "A photo of ~ID~."   # for photos without a prompts.json entry
    teacher_weight: float = 1.0       # mixed: e2e + teacher_weight * teacher
    teacher_root: str = ""            # folder with seed_<id>/teacher_residual.safetensors ("" = the data root)
    # ID loss (refgen.identity.id_loss): + id_weight * (1 - cos) between the Qwen3-VL mean feature of the model's
    # clean-image estimate x_t - sigma * v and the target's, both decoded by the VAE from their latents. The flow
    # loss weighs every pixel alike; this one weighs what the vision tower sees of the person. One- and two-person
    # steps; the tower and the VAE decoder stay on the device and are back-propagated through.
    # 0 = off (the steps are then unchanged).
    id_weight: float = 0.0
    # The ID loss token by token against the target's own latent, decoded alike (id_loss.spatial_id_loss), on one-
    # and two-person steps: a mean feature cannot say who stands where in a two-person image.
    id_spatial: bool = False
    two_person_fraction: float = 0.0  # share of steps on two-person toy-world images (toy identities only)
    two_person_images: int = 2000     # how many two-person images are rendered once for those steps
    # Localisation loss on the two-person steps (refgen.identity.localize): + loc_weight * -log(share of an image
    # token's slot-reading that goes to the slot of the person drawn there), every block, tokens of each person's
    # rendered silhouette. It does localise the slots, but with the generator frozen only the slot tokens can move,
    # and on the toy world that cost each person's identity (docs/head.md): 0 = off (the steps are then unchanged).
    loc_weight: float = 0.0
    # Two or more token people: each person reaches only its own segment of the prompt (its window and the words up
    # to the next slot; `prompts.encode_tokenized`), in training and, from the head's metadata, at inference.
    isolate_slots: bool = False
    # A learned offset per slot of a two-person prompt (first / second person, i.e. left / right in the toy world's
    # phrasings), zero at the start, added to the head's output there in training and at inference (`slot_roles` in
    # the head file): the window of a person's tokens carries almost nothing of the words around it (docs/head.md),
    # so it cannot tell the transformer which of the two people it is; the offset can.
    slot_roles: bool = False
    # Each ~ID~ is the placeholder's tokens this many times over (identity/slots.py): the head's window L grows with
    # it, and a person gets that much more room (what it bought the head and per-person inversion: docs/head.md,
    # docs/benchmarks.md). An init_head must be as wide.
    slot_repeat: int = SLOT_REPEAT
    val_identities: int = 0           # held out of training; their fixed-noise flow loss is logged
    eval_identities: int = 16         # training identities whose fixed-noise flow loss is logged (0 = none)
    eval_every: int = 200
    checkpoint_every: int = 200
    gradient_checkpointing: bool = False
    seed: int = 0
    # Data (docs/head.md, "Data at scale"). The photos' features, latents and prompt rows are computed once into a
    # disk cache (rank 0 writes it, every rank reads it; reused when made from the same identities, models and
    # settings, refused otherwise). tables: "device" loads all of it onto each rank's device (small sets, fastest
    # steps); "mapped" memory-maps it and moves only a step's rows to the device (thousands of identities).
    cache_dir: str = ""               # "" = OUT/cache
    tables: str = "device"            # device | mapped
    # > 0: train on toy-world identities toyworld_first_id ... + toyworld_identities - 1, rendered on the fly
    # (the photos and prompts `refgen toyworld make-identities` would write), instead of an identity root
    toyworld_identities: int = 0
    toyworld_first_id: int = 100_000
    # A head folder from an earlier run (`refgen train-head`) whose weights start this one: more targets, other
    # people, or two-person steps on top of a one-person head. Its architecture, output, placeholder and feature
    # settings must be this run's (refused otherwise); the optimiser and lr schedule start fresh. A checkpoint in
    # OUT wins over it (a resumed run continues its own weights).
    init_head: str = ""

    def __post_init__(self):
        from refgen.identity.features import FeatureConfig
        from refgen.identity.resampler import ResamplerConfig

        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.head not in ("linear", "resampler"):
            raise ValueError(f"head must be 'linear' or 'resampler', got {self.head!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        ResamplerConfig(**self.resampler)
        fc = FeatureConfig(**self.features)
        for name in ("steps", "batch_size", "refs_min", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.refs_min <= self.refs_max <= fc.max_images:
            raise ValueError(f"need 1 <= refs_min <= refs_max <= features.max_images ({fc.max_images}), got "
                             f"refs_min={self.refs_min}, refs_max={self.refs_max}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("need lr > 0, weight_decay >= 0, grad_clip > 0 and 0 <= min_lr_ratio <= 1")
        if self.warmup_steps < 0 or self.val_identities < 0 or self.eval_identities < 0:
            raise ValueError("warmup_steps, val_identities and eval_identities must be >= 0")
        if self.sigma_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"sigma_sampling must be 'uniform' or 'logit_normal', got {self.sigma_sampling!r}")
        flow.check_tail(self.sigma_tail, self.sigma_tail_low)
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height/width must be multiples of 16, got {self.height}x{self.width}")
        if self.default_prompt.count("~ID~") != 1:
            raise ValueError(f"default_prompt must contain exactly one ~ID~: {self.default_prompt!r}")
        if self.teacher_weight < 0:
            raise ValueError(f"teacher_weight must be >= 0, got {self.teacher_weight}")
        if self.id_weight < 0:
            raise ValueError(f"id_weight must be >= 0, got {self.id_weight}")
        if self.id_spatial and not self.id_weight:
            raise ValueError("id_spatial is a form of the ID loss: set id_weight > 0 too")
        if self.id_weight and self.objective == "teacher":
            raise ValueError("id_weight needs the e2e or mixed objective (it reads the flow model's estimate)")
        if self.id_weight and (self.height % 32 or self.width % 32):
            raise ValueError(f"id_weight needs height/width multiples of 32 (the vision tower's patch 16 x merge 2), "
                             f"got {self.height}x{self.width}")
        if not 0 <= self.two_person_fraction <= 1 or self.two_person_images < 1:
            raise ValueError("need 0 <= two_person_fraction <= 1 and two_person_images >= 1")
        if self.loc_weight < 0:
            raise ValueError(f"loc_weight must be >= 0, got {self.loc_weight}")
        if self.loc_weight and not self.two_person_fraction:
            raise ValueError("loc_weight acts on two-person steps: set two_person_fraction > 0 too")
        if self.tables not in ("device", "mapped"):
            raise ValueError(f"tables must be 'device' or 'mapped', got {self.tables!r}")
        if self.toyworld_identities < 0 or self.toyworld_first_id < 0:
            raise ValueError("toyworld_identities and toyworld_first_id must be >= 0")
        if self.isolate_slots and self.output != "tokens":
            raise ValueError("isolate_slots is for output: tokens (a residual is added after the text encoder, where "
                             "no word reads it)")
        from refgen.identity.slots import check_repeat

        check_repeat(self.slot_repeat)  # SlotError, a ValueError
        if self.slot_roles and not self.two_person_fraction:
            raise ValueError("slot_roles are learnt on two-person steps: set two_person_fraction > 0 too")
        if self.two_person_fraction and self.objective == "teacher":
            raise ValueError("two_person_fraction needs the e2e or mixed objective (two-person steps are "
                             "flow-matching steps)")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "E2EConfig":
        from refgen.config import from_yaml

        return from_yaml(cls, path, **overrides)


# Settings a run may resume under with other values: they do not change what a step computes.
_RESUMABLE = {"steps", "eval_every", "checkpoint_every", "gradient_checkpointing", "eval_identities", "cache_dir",
              "tables"}


def step_generator(seed: int, *parts) -> torch.Generator:
    """A CPU generator seeded by (seed, parts): the same on every rank and after a resume."""
    h = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).hexdigest()
    return torch.Generator("cpu").manual_seed(int(h[:15], 16))


# ---- data ------------------------------------------------------------------------------------------------------


@dataclass
class E2EData:
    """Everything the steps read. The row tables (tokens, tok_mask, means, latents, bank, bank_mask) are tensors
    on the training device (tables "device") or `Rows` over the memory-mapped cache (tables "mapped"), which
    index alike: `table[idx]` gives those rows on the device."""
    ids: list[str]                 # identity folder names, index = identity number
    photos: list[torch.Tensor]     # per identity: its photo numbers (n_i,) into the tables below
    tokens: torch.Tensor           # (P, T, D) float32 visual tokens of every photo, zero-padded
    tok_mask: torch.Tensor         # (P, T) bool, True = real token
    means: torch.Tensor            # (P, D) each photo's token mean (what the linear head's z pools)
    latents: torch.Tensor          # (P + P2, C, h, w) VAE latents: the photos, then the two-person images
    photo_row: torch.Tensor        # (P,) prompt-bank row of each photo's own sentence
    bank: torch.Tensor             # (Q, S, H) encoded prompts (as written: R = 0, or the placeholder's own tokens)
    bank_mask: torch.Tensor        # (Q, S) int64
    bank_starts: torch.Tensor      # (Q, 2) window start of each ~ID~ (left to right), -1 = no such slot
    L: int
    H: int                         # the head's output width: the encoder output's H, or H_in for tokens
    teachers: torch.Tensor | None  # (N, L, H) float32 teacher residuals (teacher / mixed objectives)
    pairs: torch.Tensor | None     # (P2, 4) two-person images: left id, right id, latent index, bank row
    # loc_weight > 0: (P2, 2, N) bool image-token regions of the left and right person of each two-person image
    pair_regions: torch.Tensor | None = None
    feature_settings: dict = field(default_factory=dict)
    residual_metadata: dict = field(default_factory=dict)
    output: str = "residual"
    # output "tokens": the pipeline whose text encoder reads them, each bank row's tokenized prompt, the
    # placeholder's own input embeddings T_ph (L, H_in) float32 and the embedding table's RMS e
    pipe: object = None
    tps: list = field(default_factory=list)
    T_ph: torch.Tensor | None = None
    e: float = 1.0
    # id_weight > 0: the frozen VAE (decodes the clean-image estimate) and VisionFeatures (reads it)
    vae: object = None
    vl: object = None


def _pair_scenes(ids: list[str], n: int, seed: int) -> list[tuple[int, int, object, str]]:
    """n two-person toy-world scenes of two different training people: (left, right, scene, prompt with two ~ID~,
    the left person's slot first). Toy identities only: the folder name seed_<id> pins the person's attributes."""
    from refgen.toyworld import world

    nums = []
    for name in ids:
        try:
            nums.append(int(name.split("_", 1)[1]))
        except (IndexError, ValueError):
            raise ValueError(f"two_person_fraction renders toy-world people, but {name!r} is not a toy identity "
                             "folder (seed_<integer id>)") from None
    rng = random.Random(world.derive_seed("e2e-pairs", seed))
    out = []
    for _ in range(n):
        a, b = rng.sample(range(len(ids)), 2)
        scene = world.sample_scene(rng, [world.identity_from_seed(nums[a]), world.identity_from_seed(nums[b])])
        where = rng.choice(world.SCENE_PHRASES[scene.background])
        body = rng.choice(world.PAIR_FORMS).format(a="~ID~", b="~ID~", where=where)
        out.append((a, b, scene, f"A photo of {body}."))
    return out


TEACHER_FILES = {"residual": "teacher_residual.safetensors", "tokens": "teacher_tokens.safetensors"}


def _teachers(troot: Path, ids: list[str], cfg: E2EConfig, L: int, H: int, pipe=None, e: float = 1.0) -> torch.Tensor:
    """(N, L, H) what the head should output for each identity, for the teacher and mixed objectives: the teacher
    residual (output "residual"), or the teacher tokens' step from the placeholder in units of e,
    (T - T_ph) / e (output "tokens", checked against `pipe`'s text encoder like any token file)."""
    from refgen.identity.inject import read_residual
    from refgen.identity.tokens import read_checked_tokens

    name, other = TEACHER_FILES[cfg.output], TEACHER_FILES["residual" if cfg.output == "tokens" else "tokens"]
    missing = [i for i in ids if not (troot / i / name).is_file()]
    if missing:
        has_other = (troot / missing[0] / other).is_file()
        raise ValueError(f"the {cfg.objective} objective with output {cfg.output!r} needs {name} for every training "
                         f"identity; {len(missing)} have none under {troot} (e.g. {missing[0]}/{name})"
                         + (f"; {missing[0]} has {other}: set output to "
                            f"{'residual' if cfg.output == 'tokens' else 'tokens'} to regress it" if has_other else
                            ": run `refgen invert` first (parametrisation tokens makes teacher tokens, rms_scaled "
                            "or free teacher residuals), or set teacher_root"))
    if cfg.output == "tokens":
        rs = [read_checked_tokens(troot / i / name, pipe)[0].float() for i in ids]
    else:
        rs = [read_residual(troot / i / name)[0].float() for i in ids]
    bad = [i for i, r in zip(ids, rs) if tuple(r.shape) != (L, H)]
    if bad:  # most often a teacher inverted at another slot_repeat (its window is another number of tokens)
        raise ValueError(f"teacher of {bad[0]} ({troot / bad[0] / name}) has shape "
                         f"{tuple(rs[ids.index(bad[0])].shape)}, this run's slot needs ({L}, {H}) (slot_repeat "
                         f"{cfg.slot_repeat}): invert the teachers at the head's slot_repeat")
    if cfg.output == "tokens":
        from refgen.identity.tokens import placeholder_embeds

        T_ph = placeholder_embeds(pipe, cfg.slot_repeat)
        rs = [(r - T_ph) / e for r in rs]
    return torch.stack(rs)


def identity_source(root: str | Path | None, cfg: E2EConfig):
    """Where the training identities come from: seed_<id>/ folders under ROOT, or toy-world ids rendered on the fly."""
    from refgen.identity.e2e_cache import FolderSource, ToySource

    if cfg.toyworld_identities:
        if root is not None:
            raise ValueError(f"give an identity root ({root}) or toyworld_identities "
                             f"({cfg.toyworld_identities}), not both")
        return ToySource(cfg.toyworld_first_id, cfg.toyworld_identities)
    if root is None:
        raise ValueError("no identities: give an identity root (seed_<id>/ folders) or toyworld_identities")
    return FolderSource(root, cfg.default_prompt)


def prepare_data(pipe, fx, root: str | Path | None, cfg: E2EConfig, progress: bool = True, *,
                 cache_dir: str | Path | None = None, model_id: str | None = None, rank: int = 0,
                 world: int = 1) -> E2EData:
    """The identities of ROOT (seed_<id>/ folders with >= 2 photos) or of the toy world (cfg.toyworld_identities):
    their features, latents and prompt rows from the disk cache (`refgen.identity.e2e_cache`, built by rank 0 when
    missing, reused when made with the same key), held on the device (tables "device") or memory-mapped (tables
    "mapped": a step's rows go to the device when drawn). `fx` is a VisionFeatures or a `LazyTower` (loaded only if
    the cache has to be built)."""
    from refgen.identity.e2e_cache import cache_key, ensure_cache, open_cache
    from refgen.identity.features import feature_settings
    from refgen.identity.inject import residual_metadata
    from refgen.identity.prompts import encode_prompts
    from refgen.identity.qwen_flow import encode_qwen_latents
    from refgen.identity.render import execution_device
    from refgen.images import center_crop_resize
    from refgen.model_identity import identify_model

    dev = execution_device(pipe)
    folder = cache_dir or cfg.cache_dir
    if not folder:
        raise ValueError("prepare_data needs a cache folder: cache_dir, or cfg.cache_dir")
    source = identity_source(root, cfg)
    model_id = str(model_id or getattr(pipe, "name_or_path", "") or "")
    settings = feature_settings(identify_model(fx.model_id, "--vl-model"), fx.cfg, _dtype_name(fx.dtype))
    key = cache_key(source, pipe, model_id, settings, cfg.height, cfg.width, cfg.slot_repeat)
    load = fx.load if hasattr(fx, "load") else (lambda: fx)
    man = ensure_cache(folder, source, key, pipe, load, cfg.height, cfg.width, rank, world, progress)
    t = open_cache(folder, man, dev)
    ids, texts = t.ids, list(t.prompts)
    latents, bank, bank_mask, starts = t.latents, t.bank, t.bank_mask, t.bank_starts
    pair_t = pair_regions = None
    if cfg.two_person_fraction > 0:  # rendered per rank (toy world only, a few thousand 64 px images), not cached
        from refgen.toyworld import world as toy

        if len(ids) < 2:
            raise ValueError("two-person steps need at least 2 training identities")
        scenes = _pair_scenes(ids, cfg.two_person_images, cfg.seed)
        ims = [toy.render(s, max(cfg.height, cfg.width)) for _, _, s, _ in scenes]
        latents = latents.extend(encode_qwen_latents(pipe.vae, [center_crop_resize(im, cfg.width, cfg.height)
                                                                for im in ims], batch=64, device=dev))
        uniq = sorted({text for _, _, _, text in scenes})
        enc = encode_prompts(pipe, uniq, repeat=cfg.slot_repeat)
        if {sl.length for slots in enc.slots for sl in slots} != {t.L}:
            raise ValueError("~ID~ has windows of different lengths in the two-person prompts: a residual has one "
                             "length L")
        bank, bank_mask = bank.extend(enc.embeds), bank_mask.extend(enc.mask)
        starts = torch.cat([starts, torch.tensor([[sl.start for sl in slots[:2]] + [-1] * (2 - len(slots[:2]))
                                                  for slots in enc.slots], device=starts.device)])
        row_of = {text: len(texts) + r for r, text in enumerate(uniq)}
        texts += uniq
        P = t.photo_row.shape[0]
        pair_t = torch.tensor([[a, b, P + j, row_of[text]] for j, (a, b, _, text) in enumerate(scenes)])
        if cfg.loc_weight > 0:
            from refgen.identity.localize import token_regions

            grid = (latents.shape[-2] // 2, latents.shape[-1] // 2)  # packed 2 x 2 latent patches, row-major
            pair_regions = torch.stack([token_regions(toy.person_masks(s, max(cfg.height, cfg.width)), cfg.width,
                                                      cfg.height, grid) for _, _, s, _ in scenes]).to(dev)
    tables = [t.tokens, t.tok_mask, t.means, latents, bank, bank_mask]
    if cfg.tables == "device":  # every row on the device: the fastest steps, for sets that fit
        tables = [r.materialise() for r in tables]
    tokens, tok_mask, means, latents, bank, bank_mask = tables
    data = E2EData(ids, t.photos, tokens, tok_mask, means, latents, t.photo_row, bank, bank_mask, starts, t.L, t.H,
                   None, pair_t, pair_regions, settings, residual_metadata(pipe, model_id, repeat=cfg.slot_repeat),
                   cfg.output)
    if cfg.output == "tokens":
        attach_text_encoder(data, pipe, texts, cfg.slot_repeat)
    if cfg.objective != "e2e":
        troot = cfg.teacher_root or root
        if not troot:
            raise ValueError(f"the {cfg.objective} objective needs teachers: set teacher_root")
        data.teachers = _teachers(Path(troot), ids, cfg, data.L, data.H, pipe, data.e).to(dev)
    if cfg.id_weight > 0:
        data.vae, data.vl = pipe.vae, load()
        data.vae.requires_grad_(False)
        data.vl.model.requires_grad_(False)
    return data


def attach_text_encoder(data: E2EData, pipe, texts: list[str], repeat: int = 1) -> None:
    """Token output: `data` reads the head's tokens through `pipe`'s text encoder, in each bank row's sentence
    (texts[r] is row r's), against the placeholder's own embeddings T_ph in units of the table's RMS e."""
    from refgen.identity.prompts import text_encoder_device, tokenize
    from refgen.identity.tokens import embed_rms, placeholder_embeds

    data.output, data.pipe, data.tps = "tokens", pipe, [tokenize(pipe, text, repeat=repeat) for text in texts]
    data.T_ph = placeholder_embeds(pipe, repeat).to(text_encoder_device(pipe))
    data.e, data.H = embed_rms(pipe), data.T_ph.shape[1]


def build_e2e_head(cfg: E2EConfig, dim: int, L: int, H: int):
    """A fresh head of cfg.head for features of width `dim` and an (L, H) output; a token head's clamp is
    TOKEN_SCALE_MAX unless the config sets one."""
    from refgen.identity.head import build_head

    arch = dict(cfg.resampler) if cfg.head == "resampler" else {}
    if cfg.output == "tokens":
        arch.setdefault("scale_max", TOKEN_SCALE_MAX)
    head = build_head(cfg.head, dim, L, H, arch)
    if cfg.slot_roles:
        head.slot_roles = torch.nn.Parameter(torch.zeros(2, L, H))  # (2, L, H): first, second of two people
    return head


def _dtype_name(dt: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dt]


# ---- one batch -------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A batch of targets (B items) with their slots (n slots in all; an item has 1 or 2)."""
    latent: torch.Tensor     # (B,) latent index of each target
    row: torch.Tensor        # (B,) prompt-bank row of each target's sentence
    sigma: torch.Tensor      # (B,)
    noise: torch.Tensor      # (B, C, h, w)
    slot_item: torch.Tensor  # (n,) the item each slot belongs to
    slot_k: torch.Tensor     # (n,) which ~ID~ of its item's prompt (0 = leftmost)
    slot_ident: torch.Tensor  # (n,) identity number
    refs: torch.Tensor       # (n, K) photo numbers of each slot's references, padded with 0
    ref_mask: torch.Tensor   # (n, K) bool, True = a real reference

    def select(self, items: list[int]) -> "Batch":
        """The sub-batch of `items` (this rank's share); slots follow their items, renumbered."""
        idx = torch.tensor(items, dtype=torch.long)
        keep = torch.isin(self.slot_item, idx)
        renum = torch.full((self.latent.shape[0],), -1, dtype=torch.long)
        renum[idx] = torch.arange(len(items))
        return Batch(self.latent[idx], self.row[idx], self.sigma[idx], self.noise[idx], renum[self.slot_item[keep]],
                     self.slot_k[keep], self.slot_ident[keep], self.refs[keep], self.ref_mask[keep])


def _pick_refs(photos: torch.Tensor, exclude: int | None, cfg: E2EConfig, g: torch.Generator) -> list[int]:
    """refs_min..refs_max of `photos` other than `exclude`, at random (all others if there are fewer)."""
    pool = [int(p) for p in photos if int(p) != exclude]
    hi = min(cfg.refs_max, len(pool))
    k = int(torch.randint(min(cfg.refs_min, hi), hi + 1, (1,), generator=g))
    return [pool[i] for i in torch.randperm(len(pool), generator=g)[:k].tolist()]


def single_batch(data: E2EData, idents: list[int], cfg: E2EConfig, g: torch.Generator) -> Batch:
    """One target photo per identity, its references among the person's OTHER photos."""
    latent, row, slots = [], [], []
    for i in idents:
        ph = data.photos[i]
        if len(ph) < 2:
            raise ValueError(f"{data.ids[i]} has {len(ph)} photo: a target and a reference need >= 2")
        t = int(ph[int(torch.randint(len(ph), (1,), generator=g))])
        latent.append(t)
        row.append(int(data.photo_row[t]))
        slots.append([(i, _pick_refs(ph, t, cfg, g))])
    return _finish(data, latent, row, slots, cfg, g)


def pair_batch(data: E2EData, n: int, cfg: E2EConfig, g: torch.Generator) -> Batch:
    """n two-person images; each slot's references are photos of its own person (none of them is the target)."""
    pick = torch.randint(data.pairs.shape[0], (n,), generator=g).tolist()
    latent, row, slots = [], [], []
    for j in pick:
        a, b, lat, r = data.pairs[j].tolist()
        latent.append(lat)
        row.append(r)
        slots.append([(a, _pick_refs(data.photos[a], None, cfg, g)), (b, _pick_refs(data.photos[b], None, cfg, g))])
    return _finish(data, latent, row, slots, cfg, g)


def _finish(data: E2EData, latent, row, slots, cfg: E2EConfig, g: torch.Generator) -> Batch:
    B = len(latent)
    K = max(len(r) for item in slots for _, r in item)
    s_item, s_k, s_id, refs, mask = [], [], [], [], []
    for b, item in enumerate(slots):
        for k, (i, r) in enumerate(item):
            s_item.append(b)
            s_k.append(k)
            s_id.append(i)
            refs.append(r + [0] * (K - len(r)))
            mask.append([True] * len(r) + [False] * (K - len(r)))
    shape = (B, *data.latents.shape[1:])
    sigma = flow.sample_sigmas(B, cfg.sigma_sampling, tail=cfg.sigma_tail, tail_low=cfg.sigma_tail_low, generator=g)
    noise = torch.randn(shape, generator=g)
    return Batch(torch.tensor(latent), torch.tensor(row), sigma, noise, torch.tensor(s_item), torch.tensor(s_k),
                 torch.tensor(s_id), torch.tensor(refs), torch.tensor(mask))


# ---- forward -----------------------------------------------------------------------------------------------------


def head_forward(head, data: E2EData, batch: Batch) -> torch.Tensor:
    """R (n, L, H) float32 for every slot of the batch, each kind of head fed as at inference: the linear head the
    pooled z of the references, the resampler every token of every reference photo."""
    from refgen.identity.features import pool_photos
    from refgen.identity.resampler import photo_tokens

    dev = data.means.device
    refs, rmask = batch.refs.to(dev), batch.ref_mask.to(dev)
    if head.kind == "resampler":
        tok, kmask = photo_tokens(data.tokens[refs], data.tok_mask[refs], rmask)  # (n, K*T, D), (n, K*T)
        R = head(tok, kmask)
    else:
        R = head(pool_photos(data.means[refs], rmask))  # z (n, D)
    roles = getattr(head, "slot_roles", None)
    if roles is not None and int(batch.slot_k.max()) == 1:  # a two-person step: every item has two slots
        R = R + roles[batch.slot_k.to(dev)]
    return R


def slot_windows(data: E2EData, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(item (n,), k (n,), pos (n, L)) of every slot of the batch: its item, which ~ID~ of the item's prompt it is,
    and that window's positions in the prompt's encoding."""
    dev = data.bank.device
    item, k = batch.slot_item.to(dev), batch.slot_k.to(dev)
    start = data.bank_starts[batch.row.to(dev)[item], k]  # (n,)
    if (start < 0).any():
        raise ValueError("a slot has no ~ID~ window in its prompt (one ~ID~ per person the prompt names)")
    return item, k, start[:, None] + torch.arange(data.L, device=dev)


def inject_slots(data: E2EData, batch: Batch, R: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(E (B, S, H), mask (B, S)): each target's own prompt from the bank with every slot's R added in its window
    (rows at different positions: index_put, as inversion does for per-image prompts)."""
    row = batch.row.to(data.bank.device)
    E0, M = data.bank[row], data.bank_mask[row]
    item, _, pos = slot_windows(data, batch)
    return E0.index_put((item[:, None].expand_as(pos), pos), R.to(dtype), accumulate=True), M


def condition(data: E2EData, batch: Batch, R: torch.Tensor, dtype: torch.dtype,
              isolate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(E (B, S, H), mask (B, S)) of every target's own prompt with each slot's head output in it: a residual added
    in its window (`inject_slots`), or tokens T_ph + e R read by the frozen text encoder in the slot's place (the
    path of token inversion, `encode_tokenized`; gradients reach R through the encoder)."""
    if data.output == "residual":
        return inject_slots(data, batch, R, dtype)
    from refgen.identity.prompts import encode_tokenized

    dev = data.T_ph.device
    B = batch.latent.shape[0]
    item, k = batch.slot_item.to(dev), batch.slot_k.to(dev)
    K = int(k.max()) + 1
    if any(int((k == j).sum()) != B for j in range(K)):
        raise ValueError("every target of a token batch needs the same number of slots (one- and two-person "
                         "targets come in separate steps)")
    T = (data.T_ph + data.e * R.to(dev, torch.float32)).to(data.pipe.text_encoder.dtype)  # (n, L, H_in)
    per_slot = [T.new_zeros(B, data.L, T.shape[2]).index_copy(0, item[k == j], T[k == j]) for j in range(K)]
    enc = encode_tokenized(data.pipe, [data.tps[r] for r in batch.row.tolist()], data.bank.device, dtype, per_slot,
                           isolate)
    return enc.embeds, enc.mask


def item_losses(head, data: E2EData, batch: Batch, model, cfg: E2EConfig, dtype: torch.dtype) -> dict:
    """Per item (B,) losses of the objective: {"loss", and "flow" and/or "teacher"}."""
    from refgen.identity.head import head_loss_terms
    from refgen.identity.qwen_flow import pack

    dev = data.means.device
    B = batch.latent.shape[0]
    R = head_forward(head, data, batch)  # (n, L, H)
    out = {}
    total = torch.zeros(B, device=dev)
    if cfg.objective in ("e2e", "mixed"):
        E, M = condition(data, batch, R, dtype, cfg.isolate_slots)
        x0 = pack(data.latents[batch.latent.to(dev)])
        noise = pack(batch.noise.to(x0))
        sigma = batch.sigma.to(dev)
        pair = cfg.loc_weight > 0 and int(batch.slot_k.max()) == 1  # a two-person step (its own step, never mixed)
        from refgen.identity.localize import SlotAttention, localization_loss

        with SlotAttention(model.transformer) if pair else contextlib.nullcontext() as cap:
            out["flow"], x_t, v = flow.loss_and_prediction(model, x0, (E, M), sigma=sigma, noise=noise)
        total = total + out["flow"]
        if pair:
            out["loc"] = localization_loss(cap.shares(_slot_keys(data, batch)),
                                           data.pair_regions[batch.latent.to(dev) - int(data.pairs[0, 2])])
            total = total + cfg.loc_weight * out["loc"]
        if cfg.id_weight > 0:
            from refgen.identity.id_loss import mean_id_loss, spatial_id_loss

            read = spatial_id_loss if cfg.id_spatial else mean_id_loss
            out["id"] = read(data.vae, data.vl, flow.predict_x0(x_t, v, sigma), x0, tuple(data.latents.shape[-2:]))
            total = total + cfg.id_weight * out["id"]
    if cfg.objective in ("teacher", "mixed"):
        per_slot, _ = head_loss_terms(R, data.teachers[batch.slot_ident.to(dev)])  # (n,)
        item = batch.slot_item.to(dev)
        t = torch.zeros(B, device=dev).index_add(0, item, per_slot)
        t = t / torch.zeros(B, device=dev).index_add(0, item, torch.ones_like(per_slot))
        out["teacher"] = t
        total = total + (cfg.teacher_weight if cfg.objective == "mixed" else 1.0) * t
    out["loss"] = total
    return out


def _slot_keys(data: E2EData, batch: Batch) -> torch.Tensor:
    """(B, 2, L) text positions of each two-person item's left and right ~ID~ window."""
    item, k, pos = slot_windows(data, batch)
    keys = torch.full((batch.latent.shape[0], 2, data.L), -1, dtype=torch.long, device=pos.device)
    keys[item, k] = pos
    if (keys < 0).any():
        raise ValueError("a two-person item lacks a slot window (two ~ID~ per two-person prompt)")
    return keys


@torch.no_grad()
def eval_flow_loss(head, data: E2EData, idents: list[int], model, cfg: E2EConfig, dtype: torch.dtype,
                   n_sigmas: int = 4, zero: bool = False) -> float:
    """Mean flow loss on a fixed set: every photo of `idents` as the target, the person's other photos (up to
    refs_max) as references, n_sigmas evenly spaced sigmas, noise from a fixed seed. `zero`: R = 0 (the bare
    placeholder: the prompt as written), the reference point any head must beat."""
    from refgen.identity.qwen_flow import pack

    g = step_generator(cfg.seed, "eval")
    dev = data.means.device
    tot, n = 0.0, 0
    for i in idents:  # one batch per person: each of its photos as the target x n_sigmas
        ph = data.photos[i].tolist()
        refs = [[p for p in ph if p != t][:cfg.refs_max] for t in ph]
        K = max(len(r) for r in refs)
        lat = torch.tensor(ph).repeat_interleave(n_sigmas)  # (B,)
        B = lat.shape[0]
        rr = [r + [0] * (K - len(r)) for r in refs for _ in range(n_sigmas)]
        mm = [[True] * len(r) + [False] * (K - len(r)) for r in refs for _ in range(n_sigmas)]
        b = Batch(lat, data.photo_row[lat.to(dev)].cpu(), torch.linspace(0.1, 0.9, n_sigmas).repeat(len(ph)),
                  torch.randn((B, *data.latents.shape[1:]), generator=g), torch.arange(B),
                  torch.zeros(B, dtype=torch.long), torch.full((B,), i), torch.tensor(rr), torch.tensor(mm))
        R = head_forward(head, data, b)
        if zero:
            R = torch.zeros_like(R)
        E, M = condition(data, b, R, dtype)
        x0 = pack(data.latents[lat.to(dev)])
        per = flow.loss(model, x0, (E, M), sigma=b.sigma.to(dev), noise=pack(b.noise.to(x0)), reduction="none")
        tot += per.sum().item()
        n += B
    return tot / max(1, n)


# ---- training ----------------------------------------------------------------------------------------------------


def _lr_at(step: int, cfg: E2EConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def split_identities(n: int, cfg: E2EConfig) -> tuple[list[int], list[int]]:
    """(train, val) identity numbers: val_identities held out at random (seeded), the rest trained on."""
    if cfg.val_identities >= n:
        raise ValueError(f"val_identities={cfg.val_identities} leaves no training identity out of {n}")
    order = torch.randperm(n, generator=step_generator(cfg.seed, "split")).tolist()
    return sorted(order[cfg.val_identities:]), sorted(order[:cfg.val_identities])


def epoch_order(train: list[int], epoch: int, seed: int) -> list[int]:
    return [train[i] for i in torch.randperm(len(train), generator=step_generator(seed, "epoch", epoch)).tolist()]


def _all_reduce_grads(params: list[torch.Tensor], world: int) -> None:
    """Sum every gradient over ranks in one collective (zeros stand in for a rank that had nothing to learn from)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    o = 0
    for p in params:
        p.grad.copy_(flat[o:o + p.numel()].view_as(p))
        o += p.numel()


def train_e2e(root: str | Path | None, out: str | Path, model: str, vl_model: str, cfg: E2EConfig | None = None,
              device: str | None = None, dtype: str = "bf16", progress: bool = True) -> dict:
    """Train a head on ROOT's identities (None with cfg.toyworld_identities: toy-world people rendered on the
    fly); writes OUT/head.safetensors + head.json (the folder `load_head` reads), metrics.jsonl, checkpoint.pt
    (resumed from when present and made with the same settings), and the data cache (cfg.cache_dir or OUT/cache)."""
    from refgen.identity.e2e_cache import LazyTower
    from refgen.identity.features import FeatureConfig
    from refgen.identity.render import load_pipeline
    from refgen.runtime import init_distributed, parse_dtype, resolve_device

    cfg = cfg or E2EConfig()
    rank, world, dev_name = init_distributed(str(resolve_device(device)))
    try:
        pipe = load_pipeline(model, dev_name, dtype)
        tower = LazyTower(str(vl_model), dev_name, parse_dtype(dtype), FeatureConfig(**cfg.features))
        t0 = time.time()
        data = prepare_data(pipe, tower, root, cfg, progress=progress and rank == 0,
                            cache_dir=cfg.cache_dir or Path(out) / "cache", model_id=model, rank=rank, world=world)
        cache_s = time.time() - t0
        return _train(pipe, data, Path(out), cfg, model, vl_model, rank, world, progress, {"cache_s": cache_s})
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(pipe, data: E2EData, out: Path, cfg: E2EConfig, model_id: str, vl_model: str, rank: int, world: int,
           progress: bool, timings: dict) -> dict:
    from tqdm.auto import tqdm

    from refgen.identity.render import execution_device

    dev = execution_device(pipe)
    dtype = pipe.transformer.dtype
    fm = _frozen_flow_model(pipe, cfg)
    train_ids, val_ids = split_identities(len(data.ids), cfg)
    if len(train_ids) < 1:
        raise ValueError("no training identity")
    torch.manual_seed(cfg.seed)
    head = build_e2e_head(cfg, data.means.shape[1], data.L, data.H).to(dev)
    params = [p for p in head.parameters()]
    if world > 1:  # one starting point on every rank
        for p in params:
            torch.distributed.broadcast(p.data, 0)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    meta = _metadata(head, data, cfg, model_id, vl_model)
    step, cursor = _resume(out / "checkpoint.pt", head, opt, cfg, data)  # cursor: (epoch, position in its order)
    if cfg.init_head and step == 0:  # every rank reads the same file: no broadcast needed
        _init_from(cfg.init_head, head, meta, data)
    log = JsonlLogger(out / "metrics.jsonl") if rank == 0 else None
    if rank == 0:
        drop_metrics_after(out / "metrics.jsonl", step)
    eval_sets = {"val": val_ids, "train": train_ids[:cfg.eval_identities]}
    base = {}
    if rank == 0 and cfg.objective != "teacher":  # the bare placeholder: what every head is read against
        base = {f"{k}_flow_zero": eval_flow_loss(head, data, v, fm, cfg, dtype, zero=True)
                for k, v in eval_sets.items() if v}

    def evaluate(s: int) -> dict:
        head.eval()
        rec = {"step": s, **base}
        if cfg.objective != "teacher":
            rec.update({f"{k}_flow": eval_flow_loss(head, data, v, fm, cfg, dtype) for k, v in eval_sets.items() if v})
        head.train()
        return rec

    summary: dict = {}
    if rank == 0 and step == 0:
        summary = evaluate(0)
        if len(summary) > 1:  # the untrained head's numbers, when there is something to evaluate
            log.log(**summary)
    B = cfg.batch_size
    t_train = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="train-head e2e", disable=not progress or rank != 0)
    head.train()
    while step < cfg.steps:
        g = step_generator(cfg.seed, "step", step)
        pair_step = data.pairs is not None and bool(torch.rand((), generator=g) < cfg.two_person_fraction)
        if pair_step:
            batch = pair_batch(data, B, cfg, g)
        else:
            order = epoch_order(train_ids, cursor[0], cfg.seed)
            chunk = order[cursor[1]:cursor[1] + B]  # the last chunk of an epoch may be short
            cursor = [cursor[0] + 1, 0] if cursor[1] + B >= len(order) else [cursor[0], cursor[1] + B]
            batch = single_batch(data, chunk, cfg, g)
        rec = _optimise(head, opt, params, data, batch, fm, cfg, dtype, step, rank, world, dev)
        rec["two_person"] = pair_step
        step += 1
        bar.update(1)
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"train-head: non-finite loss at step {step} ({rec}); try a lower lr or fp32")
        if rank == 0:
            if step % cfg.eval_every == 0 or step == cfg.steps:
                rec.update(evaluate(step))
                summary = rec
            log.log(**rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                timings["train_s"] = timings.get("train_s", 0.0) + time.time() - t_train
                t_train = time.time()
                _save(out, head, opt, step, cursor, cfg, data, meta, train_ids, val_ids, summary, timings)
    bar.close()
    summary = {**summary, "step": step}
    return summary


def _frozen_flow_model(pipe, cfg: E2EConfig):
    """The frozen transformer behind refgen.flow's `model(x, sigma, cond)`. With residual output the text encoder
    leaves the GPU (every prompt is in the bank); token output reads the head's tokens through it every step."""
    from refgen.identity.qwen_flow import QwenFlowModel
    from refgen.identity.render import release_text_encoder

    if cfg.output == "tokens":  # no checkpointing there: a prompt is tens of tokens, its activations are small
        pipe.text_encoder.requires_grad_(False)
        pipe.text_encoder.eval()
    else:
        release_text_encoder(pipe)
    tr = pipe.transformer
    tr.requires_grad_(False)
    tr.eval()
    if cfg.gradient_checkpointing:
        tr.enable_gradient_checkpointing()
    vae_scale = 2 ** len(pipe.vae.temperal_downsample)
    return QwenFlowModel(tr, (cfg.height // vae_scale, cfg.width // vae_scale))


def _resume(ck: Path, head, opt, cfg: E2EConfig, data: E2EData) -> tuple[int, list[int]]:
    """(step, cursor) from a checkpoint made with these settings (head and optimiser restored in place), (0, [0, 0])
    without one; a checkpoint made with other settings is refused."""
    if not ck.exists():
        return 0, [0, 0]
    st = torch.load(ck, map_location="cpu", weights_only=False)
    now = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k not in _RESUMABLE}
    # A setting added after the checkpoint was made reads as its default, which leaves the steps as they were.
    default = json.loads(json.dumps(dataclasses.asdict(E2EConfig())))
    was = {k: v for k, v in {**default, **st["config"]}.items() if k not in _RESUMABLE}
    if was != now or st["ids"] != data.ids:
        diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k)) or ["the identities"]
        raise ValueError(f"{ck} was made with other settings ({', '.join(diff)}): use another --out, or delete "
                         "the checkpoint to start over")
    head.load_state_dict(st["head"])
    opt.load_state_dict(st["opt"])
    return st["step"], list(st["cursor"])


def _init_from(path: str, head, meta: dict, data: E2EData) -> None:
    """Load a trained head's weights into `head` (in place), refused with HeadMismatchError naming the first
    setting that differs from this run's: architecture, L/H/D, output, placeholder, tokenizer, feature settings."""
    from refgen.identity.generate import HeadMismatchError
    from refgen.identity.head import RECORD_KEYS, canonical, load_head

    src, md = load_head(path, torch.device("cpu"), torch.float32)
    for key in RECORD_KEYS:
        if canonical(key, md.get(key)) != canonical(key, meta.get(key)):
            raise HeadMismatchError(f"init_head {path} has {key} {md.get(key)!r}, this run needs {meta.get(key)!r}")
    if data.output == "tokens" and not torch.allclose(src.token_base, data.T_ph.float().cpu(), atol=1e-5):
        raise HeadMismatchError(f"init_head {path} was trained against other placeholder embeddings than this "
                                "run's text encoder has")
    missing, unexpected = head.load_state_dict(src.state_dict(), strict=False)
    if unexpected or set(missing) - {"slot_roles"}:
        raise HeadMismatchError(f"init_head {path}: its weights do not fit this run's head (missing {missing}, "
                                f"unexpected {unexpected}; slot_roles must be on in both, or only in this run)")


def _optimise(head, opt, params, data: E2EData, batch, fm, cfg: E2EConfig, dtype, step: int, rank: int, world: int,
              dev) -> dict:
    """One step on `batch`: this rank's share of the items (maybe none: it still joins the all-reduce), gradients
    summed over ranks and divided by the global batch, clipped, applied. Returns the step's metrics."""
    n_items = batch.latent.shape[0]
    mine = list(range(rank, n_items, world))
    lr = _lr_at(step, cfg)
    for grp in opt.param_groups:
        grp["lr"] = lr
    opt.zero_grad(set_to_none=True)
    sums = torch.zeros(5, device=dev)  # loss, flow, teacher, id, loc: summed over this rank's items
    if mine:
        losses = item_losses(head, data, batch.select(mine), fm, cfg, dtype)
        (losses["loss"].sum() / n_items).backward()
        sums = torch.stack([losses[k].detach().sum() if k in losses else torch.zeros((), device=dev)
                            for k in ("loss", "flow", "teacher", "id", "loc")])
    _all_reduce_grads(params, world)
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    if world > 1:
        torch.distributed.all_reduce(sums)
    rec = {"step": step + 1, "lr": lr, "loss": sums[0].item() / n_items, "grad_norm": float(gnorm), "items": n_items,
           "scale": float(head.log_scale.detach().exp().clamp(head.scale_min, head.scale_max))}
    if cfg.objective != "teacher":
        rec["flow"] = sums[1].item() / n_items
    if cfg.objective != "e2e":
        rec["teacher"] = sums[2].item() / n_items
    if cfg.id_weight > 0:
        rec["id"] = sums[3].item() / n_items
    if cfg.loc_weight > 0:
        rec["loc"] = sums[4].item() / n_items  # 0 on one-person steps
    return rec


def _metadata(head, data: E2EData, cfg: E2EConfig, model_id: str, vl_model: str) -> dict[str, str]:
    """The head's record, as `train_head` writes it for the linear head: what `load_head` and `generate` check."""
    from refgen.identity.head import head_config

    rmd = data.residual_metadata
    return {"kind": head.kind, "head_config": json.dumps(head_config(head)), "L": str(data.L), "H": str(data.H),
            "D": str(data.means.shape[1]), "placeholder_token_ids": rmd["placeholder_token_ids"],
            "tokenizer_fingerprint": rmd["tokenizer_fingerprint"], "qwen_image_model": str(model_id),
            "vl_model": str(vl_model), "feature_settings": json.dumps(data.feature_settings),
            "objective": cfg.objective, "output": cfg.output,
            **({"token_scale": repr(data.e), "H_in": str(data.H)} if cfg.output == "tokens" else {})}


def _save(out: Path, head, opt, step: int, cursor, cfg: E2EConfig, data: E2EData, meta: dict, train_ids, val_ids,
          summary: dict, timings: dict) -> None:
    """head.safetensors, then head.json (its record), then the resumable checkpoint; each written atomically."""
    weights = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    sd = dict(weights)
    if data.output == "tokens":  # what the tokens are read against at inference (checked against the text encoder)
        sd[PLACEHOLDER_KEY] = data.T_ph.detach().float().cpu().contiguous()
    md = {**meta, "step": str(step), "metrics": json.dumps(summary), "git_commit": str(provenance()["git_commit"]),
          "config": json.dumps(dataclasses.asdict(cfg))}
    atomic_save_safetensors(sd, out / "head.safetensors", md)
    atomic_write_json(out / "head.json", provenance(cfg, **meta, step=step, metrics=summary, timings=timings,
                                                    train_ids=[data.ids[i] for i in train_ids],
                                                    val_ids=[data.ids[i] for i in val_ids]))
    atomic_torch_save({"step": step, "cursor": list(cursor), "head": weights, "opt": opt.state_dict(),
                       "config": json.loads(json.dumps(dataclasses.asdict(cfg))), "ids": data.ids},
                      out / "checkpoint.pt")


