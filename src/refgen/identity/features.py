"""Qwen3-VL identity features under a pixel budget.

z = L2-normalise( mean over images ( mean over that image's visual tokens ) ), with the visual tokens of
the frozen vision tower after its 2x2 merge (`get_image_features(...).pooler_output`).

The pixel budget is what keeps VRAM flat: all images of one identity are scaled down by one common
factor until their total area is <= `pixel_budget` and no side exceeds `max_side`, then snapped to
multiples of 32 (patch 16 x merge 2) so the processor does not resize them again. The number of
patches reaching the tower is therefore <= pixel_budget / 256, however many or large the photos are.
Only the vision tower is kept: the language model of Qwen3-VL-8B (~16 GB) is dropped after loading.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from refgen.hub import require_model
from refgen.images import load_rgb
from refgen.model_identity import ModelIdentity, identify_model
from refgen.runtime import check_cpu_size, parse_dtype, resolve_device

MULTIPLE = 32  # patch 16 x spatial merge 2


@dataclass
class FeatureConfig:
    pixel_budget: float = 2.0e6  # total pixels over all images of one identity
    max_side: int = 1536
    max_images: int = 8

    def __post_init__(self):
        if self.pixel_budget < MULTIPLE * MULTIPLE:
            raise ValueError(f"pixel_budget must be >= {MULTIPLE * MULTIPLE}, got {self.pixel_budget}")
        if self.max_side < MULTIPLE or self.max_images < 1:
            raise ValueError(f"max_side >= {MULTIPLE} and max_images >= 1 required")


def feature_settings(vl: ModelIdentity, cfg: FeatureConfig, dtype: str) -> dict[str, str]:
    """Everything besides the photos that decides z: recorded in every feature file, compared by the cache,
    carried into the head's metadata and used again by `generate`, so an identity is pooled alike in both."""
    return {"vl_model_location": vl.location, "vl_model_config_sha256": str(vl.config_sha256),
            **{k: str(v) for k, v in dataclasses.asdict(cfg).items()}, "dtype": dtype}


FEATURE_SETTING_KEYS = ("vl_model_location", "vl_model_config_sha256",
                        *(f.name for f in dataclasses.fields(FeatureConfig)), "dtype")


def feature_config_from_settings(settings: dict[str, str]) -> FeatureConfig:
    """The FeatureConfig that `feature_settings` recorded (each value parsed as its field's default's type)."""
    default = FeatureConfig()
    return FeatureConfig(**{f.name: type(getattr(default, f.name))(settings[f.name])
                            for f in dataclasses.fields(FeatureConfig)})


def budget_sizes(sizes: list[tuple[int, int]], cfg: FeatureConfig) -> list[tuple[int, int]]:
    """One common scale factor for all images, then each side floored to a multiple of 32 (min 32)."""
    area = sum(w * h for w, h in sizes)
    s = min(1.0, math.sqrt(cfg.pixel_budget / area), cfg.max_side / max(max(w, h) for w, h in sizes))
    return [(max(MULTIPLE, int(w * s) // MULTIPLE * MULTIPLE), max(MULTIPLE, int(h * s) // MULTIPLE * MULTIPLE))
            for w, h in sizes]


class VisionFeatures:
    """The frozen Qwen3-VL vision tower and its image processor."""

    def __init__(self, model: str, device: str | None = None, dtype: str = "bf16", cfg: FeatureConfig | None = None):
        from transformers import AutoImageProcessor, Qwen3VLForConditionalGeneration

        self.device = resolve_device(device)
        self.dtype = parse_dtype(dtype)
        self.cfg = cfg or FeatureConfig()
        self.model_id = str(model)
        require_model(model, "Qwen3-VL model")
        m = Qwen3VLForConditionalGeneration.from_pretrained(model, dtype=self.dtype)
        m.model.language_model = None  # get_image_features uses only the vision tower
        m.lm_head = None
        check_cpu_size(m, self.device, what=f"Qwen3-VL vision tower {model!r}")
        self.model = m.to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(model)
        # Our sizes are final (multiples of 32, within the budget). The processor's own bounds would
        # otherwise upscale small images (Qwen3-VL ships min 65536 px per image) and break the budget.
        self.processor.size["shortest_edge"] = MULTIPLE * MULTIPLE
        self.processor.size["longest_edge"] = max(self.processor.size["longest_edge"], int(self.cfg.pixel_budget))
        self.dim = m.config.vision_config.out_hidden_size

    def prepare(self, images: list[Image.Image]) -> dict:
        images = images[: self.cfg.max_images]
        sizes = budget_sizes([im.size for im in images], self.cfg)
        images = [im.resize(sz, Image.BICUBIC) for im, sz in zip(images, sizes)]
        return self.processor(images=images, return_tensors="pt")

    @torch.no_grad()
    def per_image(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """Each photo's merged visual tokens, [(T_i, D)] float32 (the first `max_images` photos, sized together
        under the pixel budget): the one path from photos to the tower that every feature goes through."""
        if not images:
            raise ValueError("no images given for feature extraction")
        return self.tower([self.prepare(images)])[0]

    @torch.no_grad()
    def tower(self, prepared: list[dict]) -> list[list[torch.Tensor]]:
        """Reference sets already sized and processed by `prepare`, through the tower in one call: per set, each
        photo's merged visual tokens [(T_i, D)] float32, as `per_image` gives them set by set.

        Why several sets may share a call: a set's sizes come from `prepare` alone, and inside the tower every
        image is on its own: attention runs per image (cu_seqlens from image_grid_thw), rotary positions and the
        position-embedding resampling are computed from each image's own grid, and the 2x2 merge never crosses
        an image (its tokens come in whole merge blocks). What batching changes is only the kernels' shapes:
        bit-identical on a CPU in fp32 where measured (tests/identity/test_e2e_cache_batching.py allows 1e-6),
        within rounding on a GPU, where a GEMM's kernel may depend on its row count."""
        pv = torch.cat([p["pixel_values"] for p in prepared]).to(self.device, self.dtype)  # (patches, 3*2*16*16)
        thw = torch.cat([p["image_grid_thw"] for p in prepared]).to(self.device)  # (images, 3)
        out = self.model.model.get_image_features(pv, thw)
        flat = iter([e.float() for e in per_image_embeds(out, thw, self.model.model.visual.spatial_merge_size)])
        return [[next(flat) for _ in range(len(p["image_grid_thw"]))] for p in prepared]

    def pixel_means(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) float32: each image's mean merged visual token, as `per_image(...)[i].mean(0)` gives it for the
        same picture, from a float tensor (N, 3, H, W) in [0, 1] with sides multiples of 32, and differentiable:
        the ID loss of head training reads a generated image's features through it. The images are taken at
        their own size (no pixel budget: that is for reference sets, several photos at once)."""
        return self.pixel_tokens(images).mean(1)

    def pixel_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(N, T, D) float32: `pixel_means` before the mean, token t at the same place in every image."""
        get = self.model.model.get_image_features
        return pixel_tokens(images, lambda pv, thw: get(pv.to(self.device, self.dtype), thw.to(self.device)),
                            self.processor, self.model.model.visual.spatial_merge_size)

    def tokens(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-photo token features for token-reading heads (the resampler): tokens (B_photos, T, D) float32,
        zero-padded to the longest photo, and mask (B_photos, T) bool, True = a real token."""
        return pad_tokens(self.per_image(images))

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """z (D,) float32, ||z|| = 1."""
        return pool_photos(torch.stack([e.mean(0) for e in self.per_image(images)]))


def pool_photos(photo_means: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-photo token means (..., n, D) -> z (..., D): the mean over photos (only those `mask` (..., n) marks
    real), L2-normalised. Shared by VisionFeatures and the end-to-end trainer, which caches per-photo means once
    and pools each step's reference subsets, a batch of them at a time."""
    if mask is None:
        z = photo_means.mean(-2)
    else:
        m = mask.to(photo_means.dtype).unsqueeze(-1)  # (..., n, 1)
        z = (photo_means * m).sum(-2) / m.sum(-2).clamp_min(1)
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    norm = z.norm(dim=-1)
    if not torch.isfinite(z).all() or (norm - 1).abs().max().item() > 1e-4:
        raise ValueError(f"feature vector is not unit-norm/finite (norm {norm.min().item()}..{norm.max().item()}): "
                         "a person without any photo?")
    return z


def pad_tokens(per_image: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(T_i, D)] -> tokens (n, T, D) zero-padded, mask (n, T) bool (True = real token)."""
    T = max(e.shape[0] for e in per_image)
    tok = per_image[0].new_zeros(len(per_image), T, per_image[0].shape[1])
    mask = torch.zeros(len(per_image), T, dtype=torch.bool, device=per_image[0].device)
    for i, e in enumerate(per_image):
        tok[i, :e.shape[0]] = e
        mask[i, :e.shape[0]] = True
    return tok, mask


def patchify(x: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images (N, C, H, W) -> (pixel_values (N*gh*gw, C*temporal*patch*patch), image_grid_thw (N, 3)),
    the Qwen2-VL/Qwen3-VL image processor's layout for images it does not resize: the frame repeated for the
    temporal patch, patches in merge-block order. Differentiable (a reshape and a permute)."""
    N, C, H, W = x.shape
    if H % (patch * merge) or W % (patch * merge):
        raise ValueError(f"image sides must be multiples of {patch * merge}, got {H}x{W}")
    gh, gw = H // patch, W // patch
    p = x.unsqueeze(1).expand(N, temporal, C, H, W).reshape(N, 1, temporal, C, gh // merge, merge, patch,
                                                            gw // merge, merge, patch)
    p = p.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(N * gh * gw, C * temporal * patch * patch)
    thw = torch.tensor([[1, gh, gw]], dtype=torch.long).expand(N, 3).contiguous()
    return p.contiguous(), thw


def pixel_tokens(images: torch.Tensor, tower, processor, merge: int) -> torch.Tensor:
    """(N, T, D) float32 merged visual tokens of `images` (N, 3, H, W) in [0, 1], one size, differentiable:
    normalised with the processor's mean/std and laid out as it lays out images it does not resize;
    `tower(pixel_values, grid_thw)` is a Qwen3-VL vision tower call (`get_image_features`, or the vision model
    itself) that moves its inputs where it computes. Token t of every image is the same place in it."""
    ip = processor
    mean = torch.tensor(ip.image_mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(ip.image_std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    pv, thw = patchify((images.float() - mean) / std, ip.patch_size, ip.merge_size, ip.temporal_patch_size)
    return torch.stack([e.float() for e in per_image_embeds(tower(pv, thw), thw, merge)])


def pixel_means(images: torch.Tensor, tower, processor, merge: int) -> torch.Tensor:
    """(N, D): `pixel_tokens` averaged over each image's tokens, as VisionFeatures pools a photo."""
    return pixel_tokens(images, tower, processor, merge).mean(1)


def per_image_embeds(out, grid_thw: torch.Tensor, merge: int) -> list[torch.Tensor]:
    """Per-image visual tokens from get_image_features: transformers 5.x returns an output object with
    `pooler_output` (tuple per image); 4.57 returned a tuple (embeds, deepstack) with embeds split per image."""
    emb = out.pooler_output if hasattr(out, "pooler_output") else out[0]
    if isinstance(emb, torch.Tensor):
        emb = torch.split(emb, (grid_thw.prod(-1) // merge**2).tolist())
    return list(emb)


def features_path(identity_dir: Path) -> Path:
    return Path(identity_dir) / "vl_features.safetensors"


def extract_features(root: str | Path, vl_model: str, device: str | None = None, dtype: str = "bf16",
                     cfg: FeatureConfig | None = None, out: str | Path | None = None, progress: bool = True) -> dict:
    """`refgen features`: cache z per identity as OUT/seed_<id>/vl_features.safetensors (skips cached ones
    whose settings match)."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    from refgen.artifacts import atomic_save_safetensors, git_commit
    from refgen.images import scan

    cfg = cfg or FeatureConfig()
    idents = scan(root).identities
    out_root = Path(out or root)
    # a hub id not downloaded yet has no fingerprint: nothing cached can match, and it is taken after loading
    vl = identify_model(vl_model, "--vl-model", allow_download=True)
    settings = feature_settings(vl, cfg, dtype)
    todo = []
    for ident in idents:
        f = features_path(out_root / ident.id)
        if f.exists():
            with safe_open(str(f), framework="pt") as h:
                md = h.metadata() or {}
            if all(md.get(k) == v for k, v in settings.items()):
                continue
        todo.append(ident)
    done = {"identities": len(idents), "skipped_cached": len(idents) - len(todo), "extracted": 0}
    if not todo:
        return done
    fx = VisionFeatures(vl_model, device, dtype, cfg)
    if vl.config_sha256 is None:
        settings = feature_settings(identify_model(vl_model, "--vl-model"), cfg, dtype)
    for ident in tqdm(todo, desc="features", disable=not progress):
        z = fx([load_rgb(p) for p in ident.images])
        md = {"vl_model": str(vl_model), **settings, "D": str(z.shape[0]), "identity": ident.id,
              "git_commit": str(git_commit()), "images": json.dumps([str(p) for p in ident.images[: cfg.max_images]])}
        atomic_save_safetensors({"z": z.cpu()}, features_path(out_root / ident.id), md)
        done["extracted"] += 1
    return done
