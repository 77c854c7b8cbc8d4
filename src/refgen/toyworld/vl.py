"""A tiny Qwen3-VL whose vision tower knows who is in a toy-world photo: the toy stand-in for Qwen3-VL.

Why: refgen's head maps identity features z (`refgen.identity.features.VisionFeatures`) to a slot
residual. z is the L2-normalised mean over images of the mean over each image's merged visual tokens
of the Qwen3-VL vision tower. The real Qwen3-VL has learned semantic features; a random-weight tiny
Qwen3-VL pools a whole scene into a vector that barely depends on the person. This module trains the
vision tower of a small, standard `Qwen3VLForConditionalGeneration` on toy-world photos so that z
encodes the 7 identity attributes, and saves it as an ordinary Qwen3-VL folder that
`VisionFeatures(path, device="cpu", dtype="fp32")` loads like the real one.

Training goes through exactly the feature path VisionFeatures uses:
    the image processor's pixel_values (reproduced in torch by `pixel_values`, tested identical),
    `model.model.get_image_features(pv, grid_thw).pooler_output`, mean over each image's tokens,
    L2 normalisation (per image; per photo set for the set loss, as VisionFeatures pools a set).
Two exact speed-ups are applied only while training (`batched_vision`, tested to give the same
output): the Conv3d patch embedding (kernel = stride) runs as the equal Linear (CPU Conv3d backward
was half of each step), and attention runs batched over images instead of one image at a time
(all training images have the same size, so the per-image blocks are identical).

Losses (per batch: `ids_per_batch` random identities x `photos_per_id` photos in different scenes):
    - one linear classifier per attribute on s*z (cross-entropy; s = learnable scale, since z is
      unit-norm and logits of a unit vector are otherwise too small to get confident),
    - the same classifiers on the set feature of half of each identity's photos (the pooling the
      benchmark uses: several photos -> one z),
    - a supervised-contrastive term on per-photo z: photos of the same person (same attribute tuple)
      are positives. The attribute heads alone only need z to be linearly separable per attribute;
      the contrastive term also pulls all photos of one person together and pushes different
      people apart, i.e. it removes scene/pose/position variance from z, which is what the
      identity head and nearest-neighbour retrieval need: it leaves retrieval and the probe where
      they are and widens the margin between the same person and the nearest other one
      (docs/toyworld.md, "Why the contrastive term").

The folder holds the model (config.json, model.safetensors), the image processor and a tokenizer
(the language model is tiny and untrained: VisionFeatures drops it), plus
    refgen_vl.json      config, held-out probe accuracy per attribute and joint, identity retrieval
                        accuracy, timings, provenance
    probe.safetensors   the trained attribute classifiers (read attributes from z: `read_attributes`)
    metrics.jsonl       training losses
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from refgen.toyworld import world

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "toyworld" / "vl"
META_FILE = "refgen_vl.json"
PROBE_FILE = "probe.safetensors"
PATCH, MERGE, TEMPORAL = 16, 2, 2          # as Qwen3-VL
MEAN, STD = 0.5, 0.5                        # Qwen3-VL image processor normalisation
ATTRS = tuple(world.ATTRIBUTES)
N_CLASSES = tuple(len(v) for v in world.ATTRIBUTES.values())


@dataclass
class VLConfig:
    size: int = 64                   # training image size (the toy world's 64x64; 4 merged tokens/image)
    # vision tower (Qwen3VLVisionConfig)
    vision_hidden: int = 128
    vision_depth: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 256
    out_dim: int = 128               # out_hidden_size = dim of z (and the text model's hidden size)
    num_position_embeddings: int = 16  # learned position grid 4x4 (= the grid of a 64 px image)
    # language model: tiny and untrained, only there so the folder is a complete Qwen3-VL
    text_layers: int = 1
    text_intermediate: int = 128
    vocab_size: int = 1000
    # data
    n_train_ids: int = 16000         # random identities, photos_per_id photos each, rendered once (~50 s)
    photos_per_id: int = 4           # in different scenes (as make-identities); 2..5
    flip: bool = True                # random horizontal flips (identity attributes are symmetric)
    # training
    steps: int = 1600
    ids_per_batch: int = 48          # batch = ids_per_batch * photos_per_id photos
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 50
    init_scale: float = 10.0         # initial logit scale on unit-norm z (learnable)
    set_weight: float = 0.5          # attribute CE on set features (half the photos of each identity)
    supcon_weight: float = 0.5       # supervised contrastive term on per-photo z (0 = off)
    supcon_tau: float = 0.1
    seed: int = 0
    threads: int = 1                 # torch threads on CPU (two were several x slower on a shared 2-core box)
    max_train_minutes: float = 7.5   # time budget of the training loop: lr anneals by time if slower (stopped_early)
    log_every: int = 50
    # evaluation / saving
    n_eval_ids: int = 600            # held-out identities x 3 photos for the attribute probe
    n_retrieval: int = 200           # identities (distinct attribute tuples) for 3-vs-3 photo retrieval
    save_dtype: str = "bf16"         # bf16 halves the shipped size; loads as fp32 fine

    def __post_init__(self):
        if self.size < world.MIN_SIZE or self.size % (PATCH * MERGE):
            raise ValueError(f"size must be a multiple of {PATCH * MERGE} and >= {world.MIN_SIZE}, got {self.size}")
        pos = ("vision_hidden", "vision_depth", "vision_heads", "vision_intermediate", "out_dim", "text_layers",
               "text_intermediate", "n_train_ids", "steps", "ids_per_batch", "threads", "log_every", "n_eval_ids")
        for k in pos:
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.vision_hidden % self.vision_heads or (self.vision_hidden // self.vision_heads) % 4:
            raise ValueError(f"vision_hidden={self.vision_hidden} / vision_heads={self.vision_heads} must give a "
                             "head dim divisible by 4 (2-D rotary embedding)")
        if self.out_dim % 4:
            raise ValueError(f"out_dim must be a multiple of 4 (text heads), got {self.out_dim}")
        g = round(math.sqrt(self.num_position_embeddings))
        if self.num_position_embeddings < 1 or g * g != self.num_position_embeddings:
            raise ValueError(f"num_position_embeddings must be a square number, got {self.num_position_embeddings}")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 (byte alphabet + specials), got {self.vocab_size}")
        if not 2 <= self.photos_per_id <= len(world.SCENES):
            raise ValueError(f"photos_per_id must be in [2, {len(world.SCENES)}] (one scene each), "
                             f"got {self.photos_per_id}")
        if self.ids_per_batch < 2:
            raise ValueError(f"ids_per_batch must be >= 2 (contrastive negatives), got {self.ids_per_batch}")
        if self.ids_per_batch > self.n_train_ids:
            raise ValueError(f"ids_per_batch={self.ids_per_batch} > n_train_ids={self.n_train_ids}")
        if self.n_retrieval < 2:
            raise ValueError(f"n_retrieval must be >= 2, got {self.n_retrieval}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.init_scale > 0 and self.supcon_tau > 0):
            raise ValueError("lr, init_scale and supcon_tau must be > 0 and weight_decay >= 0")
        if self.set_weight < 0 or self.supcon_weight < 0 or self.warmup < 0:
            raise ValueError("set_weight, supcon_weight and warmup must be >= 0")
        if self.max_train_minutes <= 0:
            raise ValueError(f"max_train_minutes must be > 0, got {self.max_train_minutes}")
        if self.save_dtype not in ("bf16", "fp32"):
            raise ValueError(f"save_dtype must be 'bf16' or 'fp32', got {self.save_dtype!r}")

    @property
    def batch(self) -> int:
        return self.ids_per_batch * self.photos_per_id

    @classmethod
    def tiny(cls, **overrides) -> VLConfig:
        """A few seconds on a CPU: smoke tests and the CLI's --tiny."""
        d = dict(vision_hidden=32, vision_depth=1, vision_heads=2, vision_intermediate=64, out_dim=32,
                 text_intermediate=32, vocab_size=400, n_train_ids=16, photos_per_id=2, steps=3, ids_per_batch=4,
                 warmup=1, log_every=1, n_eval_ids=4, n_retrieval=4)
        d.update(overrides)
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# model, processor, tokenizer


def build_model(cfg: VLConfig, tokenizer):
    """A random Qwen3VLForConditionalGeneration with a configurable small vision tower (patch 16,
    spatial merge 2, temporal patch 2, as Qwen3-VL; no deepstack mergers: z uses only the final
    merger) and a tiny language model of hidden size out_dim. Only the vision tower is trained; the
    language model stays random (its image-token ids are Qwen3VLConfig's defaults, as in
    refgen.tiny_qwen): it exists so the folder is a complete Qwen3-VL, and VisionFeatures drops it."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    bos, eos, pad = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    heads = 2
    hd = cfg.out_dim // heads
    mrope = [hd // 8, hd // 8 * 3 // 2]
    mrope.append(hd // 2 - sum(mrope))  # t, h, w sections of the text rope (sum = hd / 2)
    config = Qwen3VLConfig(
        text_config={"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "hidden_size": cfg.out_dim,
                     "intermediate_size": cfg.text_intermediate, "num_hidden_layers": cfg.text_layers,
                     "num_attention_heads": heads, "num_key_value_heads": 1, "head_dim": hd,
                     "vocab_size": len(tokenizer), "tie_word_embeddings": True,
                     "rope_scaling": {"mrope_section": mrope, "rope_type": "default", "mrope_interleaved": True}},
        vision_config={"depth": cfg.vision_depth, "hidden_size": cfg.vision_hidden,
                       "intermediate_size": cfg.vision_intermediate, "num_heads": cfg.vision_heads,
                       "out_hidden_size": cfg.out_dim, "patch_size": PATCH, "spatial_merge_size": MERGE,
                       "temporal_patch_size": TEMPORAL, "num_position_embeddings": cfg.num_position_embeddings,
                       "deepstack_visual_indexes": []},
        tie_word_embeddings=True,
    )
    return Qwen3VLForConditionalGeneration(config)


def build_image_processor():
    from refgen.tiny_qwen import build_qwen3_vl_image_processor

    return build_qwen3_vl_image_processor()


def pixel_values(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The image processor's output for uint8 images (N, 3, H, W) that need no resize (sides multiples
    of 32 within its pixel bounds): rescale 1/255, normalise with mean/std 0.5, repeat the frame for
    the temporal patch and patchify in merge-block order. Returns (pixel_values (N*gh*gw, 3*2*16*16),
    image_grid_thw (N, 3)). Identical to `Qwen2VLImageProcessor(...)(images)` (tests/toyworld/test_vl.py)."""
    from refgen.identity.features import patchify

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    return patchify((images.float() / 255 - MEAN) / STD, PATCH, MERGE, TEMPORAL)


def _patch_embed_linear(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # Conv3d with kernel == stride over a (C, T, P, P) patch is one Linear over the flattened patch
    w = self.proj.weight
    return F.linear(hidden_states.reshape(-1, w[0].numel()).to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


def _attention_batched(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
    # Qwen3VLVisionAttention without the per-image loop: all images have the same number of patches
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    S = hidden_states.shape[0]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    n = int(lengths[0])
    if not bool((lengths == n).all()):
        raise ValueError("batched_vision needs images of one size (equal patch counts)")
    q, k, v = self.qkv(hidden_states).reshape(S, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.reshape(S // n, n, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    return self.proj(o.transpose(1, 2).reshape(S, -1))


# What `_patch_embed_linear` and `_attention_batched` assume of transformers' Qwen3-VL vision tower: the
# attention's call signature and attributes, and a Conv3d patch embedding whose kernel equals its stride.
_ATTENTION_PARAMS = ("hidden_states", "cu_seqlens", "position_embeddings")
_ATTENTION_ATTRS = ("qkv", "proj", "num_heads", "scaling")


def check_vision_tower(visual) -> None:
    """Refuse, naming what changed, a vision tower the two replacement forwards no longer fit. This is the one
    place refgen depends on the internals of transformers' Qwen3-VL (tests/toyworld/test_vl.py runs it against
    the installed version and compares the replaced forwards with the native ones)."""
    import inspect

    import transformers
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qv

    problems = []
    if not hasattr(qv, "apply_rotary_pos_emb_vision"):
        problems.append("modeling_qwen3_vl.apply_rotary_pos_emb_vision is gone")
    proj = getattr(visual.patch_embed, "proj", None)
    if not isinstance(proj, nn.Conv3d) or proj.kernel_size != proj.stride or proj.padding != (0, 0, 0):
        problems.append(f"patch_embed.proj is no longer a Conv3d with kernel == stride: {proj!r}")
    for b in visual.blocks[:1]:
        params = list(inspect.signature(type(b.attn).forward).parameters)[1:]
        if tuple(params[:len(_ATTENTION_PARAMS)]) != _ATTENTION_PARAMS:
            problems.append(f"{type(b.attn).__name__}.forward takes {params}, expected {list(_ATTENTION_PARAMS)} first")
        missing = [a for a in _ATTENTION_ATTRS if not hasattr(b.attn, a)]
        if missing:
            problems.append(f"{type(b.attn).__name__} has no {missing}")
    if problems:
        raise RuntimeError(f"refgen.toyworld.vl.batched_vision does not fit transformers {transformers.__version__}'s "
                           f"Qwen3-VL vision tower: {'; '.join(problems)}. Train without it or update "
                           f"_patch_embed_linear / _attention_batched.")


@contextlib.contextmanager
def batched_vision(model):
    """Inside the block, the model's vision tower runs its patch embedding as a Linear and its
    attention batched over images (same weights, same maths; equal-size images only). The one place refgen
    replaces transformers methods; `check_vision_tower` refuses a tower they no longer fit."""
    visual = model.model.visual
    check_vision_tower(visual)
    swapped = [(visual.patch_embed, _patch_embed_linear)] + [(b.attn, _attention_batched) for b in visual.blocks]
    for mod, fn in swapped:
        mod.forward = types.MethodType(fn, mod)
    try:
        yield model
    finally:
        for mod, _ in swapped:
            del mod.forward


def image_means(model, images: torch.Tensor) -> torch.Tensor:
    """(N, D): per image, the mean over its merged visual tokens, through
    `model.model.get_image_features` on the processor's pixel values (as VisionFeatures)."""
    from refgen.identity.features import per_image_embeds

    dev = next(model.parameters()).device
    pv, thw = pixel_values(images)
    out = model.model.get_image_features(pv.to(dev, model.dtype), thw.to(dev))
    per = per_image_embeds(out, thw, model.model.visual.spatial_merge_size)
    return torch.stack([e.float().mean(0) for e in per])


def set_feature(means: torch.Tensor) -> torch.Tensor:
    """VisionFeatures' z of a photo set from its per-image means (..., K, D) -> (..., D), unit norm."""
    return F.normalize(means.mean(-2), dim=-1, eps=1e-12)


class AttributeProbe(nn.Module):
    """One linear classifier per attribute on s * z (s learnable, z unit-norm)."""

    def __init__(self, dim: int, init_scale: float = 10.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.heads = nn.ModuleDict({a: nn.Linear(dim, n) for a, n in zip(ATTRS, N_CLASSES)})

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        z = z * self.log_scale.exp()
        return {a: h(z) for a, h in self.heads.items()}


# ---------------------------------------------------------------------------------------------
# data


def attribute_labels(ident: world.IdentityAttributes) -> list[int]:
    return [world.ATTRIBUTES[a].index(getattr(ident, a)) for a in ATTRS]


def render_photos(ident: world.IdentityAttributes, k: int, rng: random.Random, size: int) -> np.ndarray:
    """k photos of one person alone, each in a different scene, as make-identities draws them."""
    backgrounds = rng.sample(world.SCENES, k)
    return np.stack([np.asarray(world.render(world.sample_scene(rng, [ident], background=b), size))
                     for b in backgrounds])


def render_identities(stream: str, seed: int, n: int, k: int, size: int, progress: bool = False):
    """(uint8 photos (n, k, 3, size, size), labels (n, 7)) of n random identities; a pure function of
    (stream, seed, n, k, size). Streams: 'vl-train', 'vl-eval' (disjoint rng streams)."""
    X = np.empty((n, k, size, size, 3), dtype=np.uint8)
    Y = np.empty((n, len(ATTRS)), dtype=np.int64)
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"render {n}x{k}", leave=False)
    for i in it:
        rng = random.Random(world.derive_seed(stream, seed, i))
        ident = world.sample_identity(rng)
        X[i] = render_photos(ident, k, rng, size)
        Y[i] = attribute_labels(ident)
    return torch.from_numpy(X).permute(0, 1, 4, 2, 3).contiguous(), torch.from_numpy(Y)


def combo_key(Y: torch.Tensor) -> torch.Tensor:
    """One integer per attribute tuple (mixed radix): equal keys = the same person."""
    key = torch.zeros(Y.shape[:-1], dtype=torch.long, device=Y.device)
    for j, n in enumerate(N_CLASSES):
        key = key * n + Y[..., j]
    return key


# ---------------------------------------------------------------------------------------------
# training


def supcon_loss(z: torch.Tensor, key: torch.Tensor, tau: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over unit-norm z with positives = same key."""
    sim = z @ z.t() / tau
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    logp = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (key[:, None] == key[None, :]) & ~eye
    has = pos.any(1)
    return -(logp.masked_fill(~pos, 0).sum(1)[has] / pos.sum(1)[has]).mean()


def _ce(logits: dict[str, torch.Tensor], Y: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(logits[a], Y[:, j]) for j, a in enumerate(ATTRS)) / len(ATTRS)


def _batch_losses(model, probe, x: torch.Tensor, y: torch.Tensor, cfg: VLConfig) -> dict[str, torch.Tensor]:
    """x: uint8 (P, K, 3, S, S), y: (P, 7)."""
    P, K = x.shape[:2]
    means = image_means(model, x.flatten(0, 1)).view(P, K, -1)
    z = F.normalize(means, dim=-1)                                   # per photo
    yk = y.repeat_interleave(K, 0)
    out = {"ce": _ce(probe(z.flatten(0, 1)), yk)}
    if cfg.set_weight > 0:
        h = K // 2                                                   # two disjoint photo sets per person
        zs = torch.cat([set_feature(means[:, :h]), set_feature(means[:, h:])])
        out["ce_set"] = _ce(probe(zs), torch.cat([y, y]))
    if cfg.supcon_weight > 0:
        out["supcon"] = supcon_loss(z.flatten(0, 1), combo_key(yk), cfg.supcon_tau)
    out["loss"] = (out["ce"] + cfg.set_weight * out.get("ce_set", 0.0)
                   + cfg.supcon_weight * out.get("supcon", 0.0))
    return out


def _build(cfg: VLConfig):
    from refgen.tiny_qwen import build_tokenizer

    torch.manual_seed(cfg.seed)
    tok = build_tokenizer(cfg.vocab_size)
    model = build_model(cfg, tok)
    probe = AttributeProbe(cfg.out_dim, cfg.init_scale)
    return tok, model, probe


def _lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up, then cosine to 0 over `progress` in [0, 1]."""
    return min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _sample_batch(X: torch.Tensor, cfg: VLConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(identity indices, their photos (ids_per_batch, photos_per_id, 3, H, W)) for one step."""
    idx = torch.randint(0, X.shape[0], (cfg.ids_per_batch,), generator=g)
    # the photos of each identity in a random order, so the two halves differ per step
    perm = torch.argsort(torch.rand(cfg.ids_per_batch, cfg.photos_per_id, generator=g), dim=1)
    x = X[idx[:, None], perm]
    if cfg.flip:  # every identity attribute is left-right symmetric (the waving arm is a state)
        f = torch.rand(x.shape[:2], generator=g) < 0.5
        x = torch.where(f[..., None, None, None], x.flip(-1), x)
    return idx, x


def _optimise(model, probe, X: torch.Tensor, Y: torch.Tensor, cfg: VLConfig, dev, logger, progress: bool):
    """The training loop over the rendered photos. Returns (losses, stopped_early, steps_done, train seconds)."""
    params = [p for p in model.model.visual.parameters()] + list(probe.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    it = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="vl")
    losses, stopped_early, steps_done = [], False, 0
    t_train0 = time.time()
    budget_s = 60 * cfg.max_train_minutes
    with batched_vision(model):
        for step in it:
            # The cosine follows whichever is further along, steps or the time budget: on a
            # slow or busy machine the run still anneals to lr 0 and ends inside the budget
            # (then `stopped_early`, fewer steps); otherwise it is a plain step schedule.
            frac = max(step / cfg.steps, (time.time() - t_train0) / budget_s)
            if frac >= 1.0:
                stopped_early = True
                break
            lr = cfg.lr * _lr_factor(step, frac, cfg.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            idx, x = _sample_batch(X, cfg, g)
            L = _batch_losses(model, probe, x.to(dev), Y[idx].to(dev), cfg)
            opt.zero_grad(set_to_none=True)
            L["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            rec = {k: float(v.detach()) for k, v in L.items()}
            losses.append(rec["loss"])
            steps_done = step + 1
            if logger and ((step + 1) % cfg.log_every == 0 or step == 0):
                logger.log(step=step + 1, lr=lr, scale=float(probe.log_scale.detach().exp()),
                           elapsed_s=round(time.time() - t_train0, 2), **rec)
            if progress:
                it.set_postfix(loss=f"{rec['loss']:.3f}")
    return losses, stopped_early, steps_done, time.time() - t_train0


def _save_and_evaluate(model, probe, tok, cfg: VLConfig, tmp: Path, meta: dict, train_keys: set, t0: float):
    """Write the folder into `tmp`, then evaluate what was saved (bf16 weights read back as fp32), on the CPU
    like VisionFeatures. Returns the loaded (model, probe); `meta` gains the metrics."""
    t_eval = time.time()
    _write_folder(model.cpu(), probe.cpu(), tok, cfg, tmp)
    model = load_model(tmp)
    probe = load_probe(tmp)
    meta["metrics"] = evaluate(model, probe, cfg, train_keys=train_keys)
    meta["metrics"]["visionfeatures_check"] = check_visionfeatures(tmp, model, cfg)
    meta["timings"]["eval_s"] = round(time.time() - t_eval, 1)
    meta["timings"]["total_s"] = round(time.time() - t0, 1)
    meta["weights_bytes"] = (tmp / "model.safetensors").stat().st_size
    _write_meta(tmp, meta)
    return model, probe


def train(cfg: VLConfig, out: str | Path | None = None, *, device: str = "cpu", progress: bool = True) -> dict:
    """Train the vision tower (and attribute probe) from scratch. With `out`, writes the folder
    atomically (temp folder + rename) and evaluates the saved weights. Returns the metadata dict
    (what refgen_vl.json holds) plus "model", "probe" and "losses"."""
    from refgen.artifacts import JsonlLogger
    from refgen.runtime import resolve_device, seed_everything

    dev = resolve_device(device)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(cfg.threads)
    try:
        t0 = time.time()
        seed_everything(cfg.seed)
        tok, model, probe = _build(cfg)
        model.model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
        model, probe = model.to(dev).train(), probe.to(dev).train()
        t_build = time.time() - t0
        X, Y = render_identities("vl-train", cfg.seed, cfg.n_train_ids, cfg.photos_per_id, cfg.size, progress)
        t_render = time.time() - t0 - t_build

        tmp = None
        if out is not None:
            out = Path(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            logger = JsonlLogger(tmp / "metrics.jsonl") if tmp is not None else None
            losses, stopped_early, steps_done, t_train = _optimise(model, probe, X, Y, cfg, dev, logger, progress)
            train_keys = set(combo_key(Y).tolist())
            del X, Y
            model.eval()
            probe.eval()
            meta = {"config": asdict(cfg), "steps_done": steps_done, "stopped_early": stopped_early,
                    "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
                    "n_params_vision": sum(p.numel() for p in model.model.visual.parameters()),
                    "n_params_total": sum(p.numel() for p in model.parameters()),
                    "timings": {"build_s": round(t_build, 1), "render_s": round(t_render, 1),
                                "train_s": round(t_train, 1),
                                "step_s": round(t_train / max(1, steps_done), 4),
                                "threads": torch.get_num_threads(), "device": str(dev)}}
            if tmp is None:
                return {**meta, "model": model, "probe": probe, "losses": losses}
            model, probe = _save_and_evaluate(model, probe, tok, cfg, tmp, meta, train_keys, t0)
            _publish(tmp, out)
            tmp = None
            return {**meta, "model": model, "probe": probe, "losses": losses}
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# saving / loading


def _write_folder(model, probe, tok, cfg: VLConfig, folder: Path) -> None:
    from refgen.artifacts import atomic_save_safetensors

    dtype = torch.bfloat16 if cfg.save_dtype == "bf16" else torch.float32
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    model.float()
    build_image_processor().save_pretrained(folder)
    tok.save_pretrained(folder)
    sd = {k: v.detach().float().contiguous() for k, v in probe.state_dict().items()}
    atomic_save_safetensors(sd, folder / PROBE_FILE, {"format": "pt", "kind": "toyworld-vl-probe",
                                                      "attributes": json.dumps(world.ATTRIBUTES)})


def _write_meta(folder: Path, meta: dict) -> None:
    from refgen.artifacts import atomic_write_json, provenance

    atomic_write_json(folder / META_FILE, {**meta, "attributes": world.ATTRIBUTES,
                                           "provenance": provenance(meta["config"])})


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder into place (an existing folder is replaced, not merged)."""
    from refgen.artifacts import _umask

    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp (and some writers) make things owner-only
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~_umask())
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def load_path() -> Path:
    """The shipped folder (src/refgen/assets/toyworld/vl): pass it wherever a --vl-model is taken."""
    if not (DEFAULT_DIR / "config.json").is_file() or not (DEFAULT_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"no toy Qwen3-VL in {DEFAULT_DIR}; train one with "
                                "`refgen toyworld train-vl --out DIR --device cpu`")
    return DEFAULT_DIR


def load_model(path: str | Path | None = None, device: str = "cpu"):
    """The full Qwen3VLForConditionalGeneration in fp32 (eval mode)."""
    from transformers import Qwen3VLForConditionalGeneration

    path = Path(path) if path is not None else load_path()
    return Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(device).eval()


def load_features(path: str | Path | None = None, device: str = "cpu", dtype: str = "fp32"):
    """`refgen.identity.features.VisionFeatures` on the toy Qwen3-VL (default: the shipped one)."""
    from refgen.identity.features import VisionFeatures

    return VisionFeatures(str(Path(path) if path is not None else load_path()), device=device, dtype=dtype)


def load_probe(path: str | Path | None = None) -> AttributeProbe:
    from safetensors.torch import load_file

    path = Path(path) if path is not None else load_path()
    sd = load_file(str(path / PROBE_FILE))
    probe = AttributeProbe(sd["heads.skin.weight"].shape[1])
    probe.load_state_dict(sd)
    return probe.eval()


@torch.no_grad()
def read_attributes(z: torch.Tensor, probe: AttributeProbe | None = None) -> list[dict[str, str]]:
    """Attribute names the probe reads from unit-norm features z (D,) or (N, D)."""
    probe = probe or load_probe()
    z = z.float().reshape(-1, z.shape[-1])
    logits = probe(z)
    return [{a: world.ATTRIBUTES[a][int(logits[a][i].argmax())] for a in ATTRS} for i in range(len(z))]


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def _means(model, X: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Per-image token means for uint8 photos (..., 3, S, S) -> (..., D), through the native forward."""
    flat = X.reshape(-1, *X.shape[-3:])
    out = torch.cat([image_means(model, flat[i:i + batch]) for i in range(0, len(flat), batch)])
    return out.view(*X.shape[:-3], -1)


def retrieval_identities(n: int, start: int = 10_000_000, k: int = 6, size: int = 64):
    """n make-identities style persons (ids start, start+1, ...; each a distinct attribute tuple, so
    retrieval is never ambiguous) with k photos each: (ids, uint8 photos (n, k, 3, S, S), labels (n, 7))."""
    from refgen.toyworld.identities import IdentitySetConfig, identity_record

    icfg = IdentitySetConfig(n=1, size=size, min_images=k, max_images=k)
    ids, photos, labels, seen = [], [], [], set()
    i = start
    while len(ids) < n:
        ident = world.identity_from_seed(i)
        key = tuple(attribute_labels(ident))
        if key not in seen:
            seen.add(key)
            _, imgs = identity_record(i, icfg)
            ids.append(i)
            photos.append(np.stack([np.asarray(im) for im in imgs]))
            labels.append(key)
        i += 1
    X = torch.from_numpy(np.stack(photos)).permute(0, 1, 4, 2, 3).contiguous()
    return ids, X, torch.tensor(labels)


def retrieval_accuracy(zq: torch.Tensor, zg: torch.Tensor) -> float:
    """Fraction of queries whose nearest gallery feature (cosine) is the same row index."""
    return float(((zq @ zg.t()).argmax(1) == torch.arange(len(zq))).float().mean())


def _probe_metrics(probe, z: torch.Tensor, Y: torch.Tensor) -> dict:
    logits = probe(z)
    ok = torch.stack([logits[a].argmax(-1) == Y[:, j] for j, a in enumerate(ATTRS)], 1)
    return {"attribute": {a: float(ok[:, j].float().mean()) for j, a in enumerate(ATTRS)},
            "joint": float(ok.all(1).float().mean()), "n": int(len(z))}


@torch.no_grad()
def evaluate(model, probe, cfg: VLConfig, *, train_keys: set | None = None) -> dict:
    """Held-out metrics on fresh identities and scenes (rng streams never used in training):
    probe  per attribute + joint (all 7 right), from the z of single photos and of 3-photo sets;
           with `train_keys` (attribute tuples seen in training) also split into seen/unseen tuples
    retrieval  z of photos 0-2 vs z of photos 3-5 of the same make-identities person among
               n_retrieval persons: nearest neighbour correct (and top-5)
    within/between  mean cosine of same-person sets vs different persons."""
    model.eval()
    probe.eval()
    X, Y = render_identities("vl-eval", cfg.seed, cfg.n_eval_ids, 3, cfg.size)
    means = _means(model, X)                                     # (n, 3, D)
    z_img = F.normalize(means, dim=-1).flatten(0, 1)
    m = {"probe_image": _probe_metrics(probe, z_img, Y.repeat_interleave(3, 0)),
         "probe_set3": _probe_metrics(probe, set_feature(means), Y)}
    if train_keys is not None:
        # the 8,100 attribute tuples are few: most held-out people share theirs with some training
        # person (in other photos). Those whose tuple never occurred in training, separately:
        unseen = torch.tensor([int(k) not in train_keys for k in combo_key(Y)])
        for name, mask in (("seen", ~unseen), ("unseen", unseen)):
            if mask.any():
                m[f"probe_image_{name}_combo"] = _probe_metrics(
                    probe, F.normalize(means[mask], dim=-1).flatten(0, 1), Y[mask].repeat_interleave(3, 0))
                m[f"probe_set3_{name}_combo"] = _probe_metrics(probe, set_feature(means[mask]), Y[mask])
    ids, R, RY = retrieval_identities(cfg.n_retrieval, size=cfg.size)
    rm = _means(model, R)                                        # (n, 6, D)
    zg, zq = set_feature(rm[:, :3]), set_feature(rm[:, 3:])
    sims = zq @ zg.t()
    top5 = sims.topk(min(5, len(zg)), dim=1).indices
    diag = sims.diagonal()
    off = sims[~torch.eye(len(sims), dtype=torch.bool)]
    m["retrieval"] = {"n_identities": len(ids), "photos_per_side": 3, "top1": retrieval_accuracy(zq, zg),
                      "top5": float((top5 == torch.arange(len(zq))[:, None]).any(1).float().mean()),
                      "cos_same_mean": float(diag.mean()), "cos_other_mean": float(off.mean()),
                      "cos_other_max_mean": float(sims.masked_fill(torch.eye(len(sims), dtype=torch.bool),
                                                                   -2).max(1).values.mean()),
                      "identity_ids": [ids[0], ids[-1]]}
    m["probe_retrieval_set3"] = _probe_metrics(probe, torch.cat([zg, zq]), torch.cat([RY, RY]))
    return m


@torch.no_grad()
def check_visionfeatures(folder: Path, model, cfg: VLConfig, n: int = 3) -> dict:
    """z from `VisionFeatures(folder, cpu, fp32)` on PIL photos vs this module's z on the same photos."""
    from PIL import Image

    fx = load_features(folder)
    _, R, _ = retrieval_identities(n, size=cfg.size)
    diffs = []
    for photos in R:
        pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in photos[:3]]
        diffs.append(float((fx(pil) - set_feature(_means(model, photos[:3]))).abs().max()))
    return {"max_abs_diff": max(diffs), "n_identities": n, "dim": fx.dim}


__all__ = ["VLConfig", "build_model", "build_image_processor", "pixel_values", "batched_vision",
           "image_means", "set_feature", "AttributeProbe", "render_identities", "retrieval_identities",
           "retrieval_accuracy", "supcon_loss", "train", "evaluate", "check_visionfeatures", "load_path",
           "load_model", "load_features", "load_probe", "read_attributes", "DEFAULT_DIR", "META_FILE"]
