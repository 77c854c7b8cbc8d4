"""Frozen encoders of the DiT data pipeline: FLUX-style VAE, T5 encoder, DINOv3. Loading and preprocessing.

Every model argument is a hub id or a local folder (`from_pretrained` layout), optionally with a subfolder
(the FLUX repo keeps its VAE under `vae/`). Real models run on CUDA only (`refgen.runtime`); `device="cpu"` is
accepted for the tiny test models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from refgen.runtime import check_cpu_size, diffusers_dtype_kwargs

# ImageNet statistics, which the released DINOv3 checkpoints' preprocessor_config.json also carries; used only
# when a model folder has no preprocessor_config.json.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_source(id_or_path: str, subfolder: str | None, what: str = "model") -> tuple[str, str | None]:
    """Where to load from: a local folder that is itself a model (has config.json, or a tokenizer file) ignores a
    default subfolder that it does not have, so `--vae ./tiny/vae` works as well as the FLUX repo + `vae/`."""
    p = Path(id_or_path).expanduser()
    if p.is_dir():
        if subfolder and (p / subfolder).is_dir():
            return str(p), subfolder
        if any((p / f).is_file() for f in ("config.json", "tokenizer.json", "tokenizer_config.json")):
            return str(p), None
        raise FileNotFoundError(
            f"{p}: not a model folder (no config.json / tokenizer files"
            + (f", and no '{subfolder}/' subfolder" if subfolder else "") + ")")
    if p.exists():
        raise NotADirectoryError(f"{p}: a model path must be a folder or a hub id, not a file")
    from refgen.hub import require_model

    require_model(id_or_path, what)
    return id_or_path, subfolder or None


def _kw(subfolder: str | None) -> dict:
    return {"subfolder": subfolder} if subfolder else {}


# Image VAEs `prepare` and `sample` take, by diffusers class name. AutoencoderKL is the FLUX VAE's class (/8).
# AutoencoderKLQwenImage is a video VAE run on one frame; the toy world's trained VAE is one (/4), which is what
# gives the DiT yardstick a decoder that reconstructs its images (refgen.dit.yardstick).
VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLQwenImage")


def load_vae(id_or_path: str, subfolder: str | None, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoModel

    src, sub = resolve_source(id_or_path, subfolder, "VAE")
    vae = AutoModel.from_pretrained(src, **diffusers_dtype_kwargs(dtype), **_kw(sub))
    if type(vae).__name__ not in VAE_CLASSES:
        raise ValueError(f"VAE {id_or_path}: {type(vae).__name__} is not an image VAE refgen encodes with "
                         f"({', '.join(VAE_CLASSES)})")
    check_cpu_size(vae, device, f"VAE {id_or_path}")
    return vae.to(device).eval().requires_grad_(False)


def _has_frames(vae) -> bool:
    """Video VAEs (AutoencoderKLQwenImage) take (B, C, T, H, W): an image is one frame."""
    return type(vae).__name__ == "AutoencoderKLQwenImage"


def vae_latent_channels(vae) -> int:
    return int(vae.config.z_dim if _has_frames(vae) else vae.config.latent_channels)


def vae_decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Raw latents (B, C, h, w) -> the decoder's images (B, 3, H, W) in about [-1, 1], for either VAE class."""
    if _has_frames(vae):
        return vae.decode(z.unsqueeze(2)).sample[:, :, 0]
    return vae.decode(z).sample


def load_text_encoder(id_or_path: str, subfolder: str | None, tokenizer_path: str | None,
                      tokenizer_subfolder: str | None, device: torch.device, dtype: torch.dtype):
    from transformers import T5EncoderModel, T5TokenizerFast

    src, sub = resolve_source(id_or_path, subfolder, "text encoder")
    tsrc, tsub = resolve_source(tokenizer_path or id_or_path,
                                tokenizer_subfolder if tokenizer_path else (tokenizer_subfolder or subfolder),
                                "tokenizer")
    tokenizer = T5TokenizerFast.from_pretrained(tsrc, **_kw(tsub))
    model = T5EncoderModel.from_pretrained(src, dtype=dtype, **_kw(sub))
    check_cpu_size(model, device, f"text encoder {id_or_path}")
    return tokenizer, model.to(device).eval().requires_grad_(False)


def load_dino(id_or_path: str, subfolder: str | None, device: torch.device, dtype: torch.dtype):
    """DINOv3ViTModel plus the (mean, std) its preprocessor expects."""
    from transformers import DINOv3ViTModel
    from transformers.utils import cached_file

    src, sub = resolve_source(id_or_path, subfolder, "DINOv3 model")
    model = DINOv3ViTModel.from_pretrained(src, dtype=dtype, **_kw(sub))
    check_cpu_size(model, device, f"DINOv3 {id_or_path}")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    cfg_file = cached_file(src, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                           **_kw(sub))
    if cfg_file:
        pc = json.loads(Path(cfg_file).read_text())
        mean, std = tuple(pc.get("image_mean", mean)), tuple(pc.get("image_std", std))
    return model.to(device).eval().requires_grad_(False), (mean, std)


def vae_downsample(vae) -> int:
    if _has_frames(vae):
        return int(vae.spatial_compression_ratio)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def dino_patch_size(dino) -> int:
    ps = dino.config.patch_size
    if isinstance(ps, (list, tuple)):
        if ps[0] != ps[1]:
            raise ValueError(f"DINOv3 patch size {ps} is not square; the patch grid cannot align with latents")
        ps = ps[0]
    return int(ps)


# --------------------------------------------------------------------------------------------- preprocessing

def resize_to_bucket(img: Image.Image, width: int, height: int) -> Image.Image:
    # No crop, no pad: the small aspect mismatch is absorbed by a slight stretch (see refgen.dit.buckets).
    if img.size == (width, height):
        return img
    return img.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)


def to_uint8_tensor(images: list[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) uint8; all images must already have the same (bucket) size."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2)


def vae_input(pixels: torch.Tensor) -> torch.Tensor:
    # diffusers' VaeImageProcessor convention: [0, 255] -> [-1, 1].
    return pixels.float() / 127.5 - 1.0


def dino_input(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    # transformers' DINOv3ViTImageProcessor(Fast) needs torchvision, which does not import beside the CPU torch
    # here; this is its pipeline minus resize/crop: rescale 1/255, normalise with the checkpoint's mean/std. The
    # resize to the bucket size was done once for both VAE and DINO, and there is deliberately no centre crop.
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - m) / s


# ------------------------------------------------------------------------------------------------ encoding

@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> raw posterior mean (B, C, H/f, W/f) float32 (f = 8 for the FLUX VAE).

    The posterior mean rather than a sample, so a re-run writes identical shards. No scaling_factor /
    shift_factor: the dataset's own per-channel mean/std (latent_stats.json) replace them in the loader.
    """
    p = next(vae.parameters())
    x = vae_input(pixels).to(p.device, p.dtype)
    if _has_frames(vae):
        return vae.encode(x.unsqueeze(2)).latent_dist.mean[:, :, 0].float()
    return vae.encode(x).latent_dist.mean.float()


@torch.no_grad()
def encode_text(tokenizer, text_encoder, captions: list[str], max_length: int) -> tuple[list[np.ndarray], int]:
    """captions -> per caption last_hidden_state of its valid tokens, (n_i, D) float32; and D.

    Padding is to the longest caption, not to max_length: T5 masks padded keys, so the valid tokens' states are
    the same (tested), and the stored arrays hold only valid tokens; the loader pads back to max_length with zeros
    and a False mask. That keeps a 4096-d T5-XXL entry at ~n_i x 8 KB instead of 4 MB.
    """
    p = next(text_encoder.parameters())
    tok = tokenizer(captions, padding="longest", max_length=max_length, truncation=True, return_tensors="pt")
    ids = tok.input_ids.to(p.device)
    mask = tok.attention_mask.to(p.device)
    hidden = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (B, T', D)
    lengths = mask.sum(1).tolist()
    # T5 tokenizers pad on the right, so the valid tokens are a prefix.
    return [hidden[i, : int(n)].cpu().numpy() for i, n in enumerate(lengths)], hidden.shape[-1]


@torch.no_grad()
def encode_dino(dino, pixels_normalised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) normalised -> CLS (B, D), patches (B, (H/16)*(W/16), D) row-major, registers excluded.

    last_hidden_state = [CLS, num_register_tokens registers, patches]; the patch tokens come from a flattened
    (H/16, W/16) conv grid, so index r * (W/16) + c is the patch at row r, column c.
    """
    p = next(dino.parameters())
    x = pixels_normalised.to(p.device, p.dtype)
    ps = dino_patch_size(dino)
    gh, gw = x.shape[-2] // ps, x.shape[-1] // ps
    hs = dino(pixel_values=x).last_hidden_state.float()  # (B, 1 + R + gh*gw, D)
    first = 1 + int(dino.config.num_register_tokens)
    patches = hs[:, first:]
    if patches.shape[1] != gh * gw:
        raise RuntimeError(f"DINOv3 returned {hs.shape[1]} tokens for a {gh}x{gw} grid with "
                           f"{first - 1} registers; expected {first + gh * gw}")
    return hs[:, 0], patches


@dataclass
class Encoders:
    vae: object
    tokenizer: object
    text_encoder: object
    dino: object
    dino_mean: tuple
    dino_std: tuple
    device: torch.device

    @property
    def latent_channels(self) -> int:
        return vae_latent_channels(self.vae)

    def describe(self) -> dict:
        return {
            "vae": {"class": type(self.vae).__name__, "latent_channels": self.latent_channels,
                    "downsample": vae_downsample(self.vae),
                    "scaling_factor": self.vae.config.get("scaling_factor"),
                    "shift_factor": self.vae.config.get("shift_factor")},
            "text_encoder": {"class": type(self.text_encoder).__name__,
                             "d_model": int(self.text_encoder.config.d_model)},
            "dino": {"class": type(self.dino).__name__, "hidden_size": int(self.dino.config.hidden_size),
                     "patch_size": dino_patch_size(self.dino),
                     "num_register_tokens": int(self.dino.config.num_register_tokens),
                     "image_mean": list(self.dino_mean), "image_std": list(self.dino_std)},
        }
