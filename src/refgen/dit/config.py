"""Typed configuration for NanoDiT: the model, its training run, named presets, YAML round trip.

Every checkpoint carries `dataclasses.asdict(TrainConfig)`, so a checkpoint alone rebuilds its model.
The YAML files in `configs/dit_*.yaml` mirror these dataclasses field for field; unknown keys are an
error (a typo in a config must not be silently ignored).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refgen.config import from_dict, read_yaml


@dataclass
class NanoDiTConfig:
    """NanoDiT architecture. Dimensions of the conditioning come from the encoders the shards were made with:
    T5-Large is 1024-d, T5-XXL 4096-d; DINOv3 ViT-L is 1024-d."""

    latent_channels: int = 16      # FLUX VAE: 16
    patch_size: int = 2            # 2 keeps the VAE's high frequencies
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    t5_dim: int = 1024
    dino_dim: int = 1024
    qk_norm: bool = True           # RMSNorm on q, k per head (SD3): keeps bf16 attention logits bounded
    # DINOv3 uses RoPE, so its patch features carry little absolute position. Adding the same fixed 2D sin-cos
    # as the image tokens lets the query at (i, j) find the DINO patch at (i, j) by dot product.
    dino_patch_pos: bool = True

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head dim must be even")
        if self.hidden_size % 4:
            raise ValueError("hidden_size must be divisible by 4 (2D sin-cos position embedding)")
        for name in ("latent_channels", "patch_size", "hidden_size", "depth", "num_heads", "t5_dim", "dino_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1")
        if self.mlp_ratio <= 0:
            raise ValueError("model.mlp_ratio must be > 0")


MODEL_PRESETS: dict[str, NanoDiTConfig] = {
    # the model `refgen dit validate` trains
    "nano": NanoDiTConfig(hidden_size=384, depth=12, num_heads=6),
    # ~400-600M, shape free. A block is 22 d^2 (self-attn 4, cross-attn 4, MLP 8, adaLN 6): 10 blocks at
    # d=1536 = 532M. Wide and shallow on purpose: at a fixed size the GEMM FLOPs stay put while the activation
    # bytes (norms, modulation, GELU, attention at a given head dim) go as depth x d ~ 1/d, so the wider shapes
    # reach a higher MFU, and head dim 128 gets cuDNN's fastest attention (the shape sweep: docs/dit.md). At equal
    # FLOPs DiT's FID tracks GFLOPs, not shape (Peebles & Xie 2023), and LM loss barely moves over aspect ratios
    # d/depth of ~20-200 (Kaplan et al. 2020).
    "base": NanoDiTConfig(hidden_size=1536, depth=10, num_heads=12),
    # CPU tests: 2 layers, width 32, tiny latents / encoders
    "tiny": NanoDiTConfig(latent_channels=4, hidden_size=32, depth=2, num_heads=2, t5_dim=16, dino_dim=16),
}


def model_preset(name: str, **overrides) -> NanoDiTConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(MODEL_PRESETS)}")
    cfg = dataclasses.replace(MODEL_PRESETS[name], **overrides)
    cfg.validate()
    return cfg


@dataclass
class CFGDropout:
    """Per-sample conditioning mode during training.

    text_only drops DINO (CLS and patches together), dino_only drops the text, uncond drops both."""

    uncond: float = 0.10
    text_only: float = 0.30
    dino_only: float = 0.05
    both: float = 0.55

    def validate(self) -> None:
        p = [self.uncond, self.text_only, self.dino_only, self.both]
        if any(x < 0 for x in p) or abs(sum(p) - 1.0) > 1e-6:
            raise ValueError(f"cfg_dropout probabilities must be >= 0 and sum to 1, got {p}")


@dataclass
class RepaConfig:
    """REPA, representation alignment (Yu et al. 2024, "Representation Alignment for Generation"): an MLP projector
    maps the hidden states after block `depth` to the DINOv3 patch features the shards already store, and
    `weight` x (1 - cosine similarity), averaged over tokens, is added to the flow loss. Off by default: kept only
    if the yardstick shows it helps (docs/dit.md).

    NanoDiT also SEES those patch features (cross-attention) unless DINO is dropped, and a model that sees its
    target can copy it instead of learning it. So by default the loss is taken only on samples whose DINO was
    dropped by the CFG dropout (text-only and unconditional: 40 % with the default cfg_dropout), where aligning
    means predicting DINO's view of the image from the noisy latent and the caption, as in REPA."""

    enabled: bool = False
    depth: int = 4                 # align the output of this block (1-based); REPA: 8 of SiT-XL's 28
    weight: float = 0.5            # lambda (REPA: 0.5)
    proj_hidden: int = 2048        # projector MLP width (REPA: 3 linear layers, SiLU, 2048 wide)
    samples: str = "dino_dropped"  # "dino_dropped" (see above) or "all"

    def validate(self, depth: int) -> None:
        if not self.enabled:
            return
        if not 1 <= self.depth <= depth:
            raise ValueError(f"repa.depth must be in 1..{depth} (the model's depth), got {self.depth}")
        if self.weight < 0 or self.proj_hidden < 1:
            raise ValueError(f"repa.weight must be >= 0 and repa.proj_hidden >= 1, got {self.weight}, "
                             f"{self.proj_hidden}")
        if self.samples not in ("dino_dropped", "all"):
            raise ValueError(f"repa.samples must be dino_dropped or all, got {self.samples!r}")


# torchao float8 training recipes (`Float8LinearConfig.from_recipe_name`), fastest first; here and not in
# refgen.dit.fp8 so that validating a config needs no torch
FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


@dataclass
class TrainConfig:
    model: NanoDiTConfig = field(default_factory=NanoDiTConfig)
    model_preset: str | None = "nano"   # informational; `model` holds the actual dimensions
    data_dir: str | None = None          # shard directory (refgen dit prepare output)
    out_dir: str = "runs/dit"
    steps: int = 5000                    # optimizer steps
    batch_size: int = 16                 # per device, per micro step
    effective_batch: int = 16            # batch_size * world_size * grad_accum (configs/dit_nano.yaml: 256)
    lr: float = 1e-4
    lr_warmup_steps: int = 500
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    # decay_t = min(ema_decay, (1 + t) / (ema_warmup + t)): an EMA of 0.9999 needs ~10k steps to forget the
    # random init; the warm-up lets short runs (validation, tests) get a meaningful EMA.
    ema_warmup: float = 10.0
    sigma_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cfg_dropout: CFGDropout = field(default_factory=CFGDropout)
    dtype: str = "bf16"                  # autocast dtype on CUDA; fp16 is refused (validate() says why)
    device: str | None = None            # None = CUDA; "cpu" only for tiny models
    seed: int = 0
    ckpt_every: int = 5000
    log_every: int = 10
    resume: str | None = "auto"          # "auto": latest checkpoint in out_dir if any; a path; or None
    init_from: str | None = None         # warm start: weights only, missing/unexpected keys reported
    num_workers: int = 2
    compile: bool = False                # torch.compile (recompiles once per bucket shape)
    compile_regional: bool = True        # with compile: per block (one shared graph, ~1 block of compile time)
                                         # instead of the whole model: about the same MFU for a half of the
                                         # first step's compile time (docs/dit.md, Throughput)
    compile_tuning: bool = False         # with compile: inductor's coordinate-descent tuning of every Triton
                                         # kernel's block sizes (same math): half a point of MFU for ~8x the
                                         # first step's compile time, per bucket shape (docs/dit.md)
    cross_attention: str = "zpad"        # "mask" (SDPA + key-padding mask), "zpad" or "split": all exact; zpad
                                         # is the fastest on the GPU (docs/dit.md, Throughput)
    progress: bool = True
    # The shards fix latent_channels, t5_dim and dino_dim (the encoders `prepare` ran). False: the config's numbers
    # must match the shards' index.json, or training refuses to start, naming both. True: take them from the shards
    # (said on stdout and recorded in config.json and every checkpoint).
    dims_from_data: bool = False
    repa: RepaConfig = field(default_factory=RepaConfig)   # representation alignment, opt-in (RepaConfig)
    # FP8 matmuls in the blocks' token GEMMs (torchao float8 training, refgen.dit.fp8), under bf16 autocast; CUDA
    # with FP8 tensor cores only. Opt-in: bf16 stays the default until FP8 proves equal on the yardstick.
    fp8: bool = False
    # with fp8: torchao's scaling recipe, one of FP8_RECIPES (refgen.dit.fp8 says what each one scales how)
    fp8_recipe: str = "tensorwise"

    def validate(self) -> None:
        self.model.validate()
        self.cfg_dropout.validate()
        self.repa.validate(self.model.depth)
        if self.dtype == "fp16":
            raise ValueError("fp16 is refused for flow matching (the velocity field needs bf16's range); use bf16 "
                             "or fp32")
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"dtype must be bf16 or fp32, got {self.dtype!r}")
        if self.fp8 and self.dtype != "bf16":
            raise ValueError(f"fp8: true runs the FP8 GEMMs inside bf16 autocast; dtype is {self.dtype!r}, set "
                             f"dtype: bf16")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"fp8_recipe must be one of {', '.join(FP8_RECIPES)}, got {self.fp8_recipe!r}")
        if self.cross_attention not in ("mask", "zpad", "split"):
            raise ValueError(f"cross_attention must be mask, zpad or split, got {self.cross_attention!r}")
        if self.sigma_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"sigma_sampling must be logit_normal or uniform, got {self.sigma_sampling!r}")
        for name in ("steps", "batch_size", "effective_batch", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.lr <= 0 or not 0 <= self.ema_decay < 1:
            raise ValueError("lr must be > 0 and ema_decay in [0, 1)")

    def grad_accum(self, world_size: int = 1) -> int:
        per_step = self.batch_size * world_size
        if self.effective_batch % per_step:
            raise ValueError(f"effective_batch {self.effective_batch} is not a multiple of batch_size x world_size "
                             f"= {per_step}")
        return self.effective_batch // per_step


# --------------------------------------------------------------------------- dict / YAML round trip

def train_config_from_dict(d: dict[str, Any], source: str | Path | None = None) -> TrainConfig:
    """A dict (from YAML or a checkpoint) -> validated TrainConfig; `source` names where it came from in errors.

    `model` may be a preset name (str), a mapping, or a mapping with `preset:` plus overrides."""
    d = dict(d)
    m = d.get("model", {})
    if isinstance(m, str):
        d["model_preset"] = m
        d["model"] = model_preset(m)
    elif isinstance(m, dict) and "preset" in m:
        m = dict(m)
        name = m.pop("preset")
        d["model_preset"] = name
        from_dict(NanoDiTConfig, m, source=source, section="model")  # names an unknown override key
        d["model"] = model_preset(name, **m)
    cfg = from_dict(TrainConfig, d, source=source)
    cfg.validate()
    return cfg


def load_train_config(path: str | Path, **overrides) -> TrainConfig:
    d = read_yaml(path)
    d.update({k: v for k, v in overrides.items() if v is not None})
    return train_config_from_dict(d, source=path)


def to_dict(cfg) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    if "betas" in d:
        d["betas"] = list(d["betas"])
    return d


# --------------------------------------------------------------------------- the model against the shards

DATA_DIMS = ("latent_channels", "t5_dim", "dino_dim")


def shard_dims(index: dict, shard_dir: str | Path) -> dict[str, int]:
    """latent_channels, t5_dim, dino_dim and dit_patch_size of a `prepare` output (index.json, which carries the
    numbers of encoders.json)."""
    enc = {}
    if not all(k in index for k in DATA_DIMS):
        import json

        f = Path(shard_dir) / "encoders.json"
        if f.is_file():
            e = json.loads(f.read_text())
            enc = {"latent_channels": e["vae"]["latent_channels"], "t5_dim": e["text_encoder"]["d_model"],
                   "dino_dim": e["dino"]["hidden_size"]}
    out = {k: int(index[k]) if k in index else enc.get(k) for k in DATA_DIMS}
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise ValueError(f"{shard_dir}: index.json and encoders.json do not record {missing}; re-run "
                         f"`refgen dit prepare` to completion")
    out["dit_patch_size"] = int(index.get("dit_patch_size", 2))
    return out


def model_mismatches(model: NanoDiTConfig, dims: dict[str, int]) -> list[tuple[str, int, int]]:
    """(field, model value, shard value) for every dimension the shards fix that the model does not match."""
    pairs = [(k, getattr(model, k), dims[k]) for k in DATA_DIMS]
    pairs.append(("patch_size", model.patch_size, dims["dit_patch_size"]))
    return [(k, m, d) for k, m, d in pairs if m != d]


def fit_to_shards(cfg: TrainConfig, index: dict, shard_dir: str | Path,
                  config_name: str = "the config") -> tuple[TrainConfig, dict[str, tuple[int, int]]]:
    """The training config with the model's data dimensions checked against (or, with dims_from_data, taken
    from) the shards. Returns (config, {field: (config value, shard value)} of what was taken).

    The DiT patch size is never taken: the shards' DINO patch grid was cut for it, so a mismatch is an error."""
    dims = shard_dims(index, shard_dir)
    bad = model_mismatches(cfg.model, dims)
    where = f"{Path(shard_dir) / 'index.json'}"
    patch = [b for b in bad if b[0] == "patch_size"]
    if patch:
        raise ValueError(f"model.patch_size is {patch[0][1]} in {config_name} but the shards in {shard_dir} were "
                         f"prepared for DiT patch {patch[0][2]} ({where} dit_patch_size): their DINO patch grid "
                         f"only fits that patch size")
    if not bad:
        return cfg, {}
    if not cfg.dims_from_data:
        what = "; ".join(f"model.{k} is {m} in {config_name} but {d} in the shards ({where} {k})"
                         for k, m, d in bad)
        raise ValueError(f"the model does not fit the data: {what}. Set those numbers in the config's model: "
                         f"section, or dims_from_data: true to take them from the shards")
    model = dataclasses.replace(cfg.model, **{k: d for k, _, d in bad})
    model.validate()
    return dataclasses.replace(cfg, model=model), {k: (m, d) for k, m, d in bad}
