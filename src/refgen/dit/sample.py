"""Sampling NanoDiT: Euler integration of the flow (refgen.flow) with dual classifier-free guidance.

Guidance, with three predictions at the same (x, sigma):

    v_uncond = v(x | null text, null DINO)
    v_text   = v(x | text,      null DINO)       Δv_text = v_text - v_uncond
    v_dino   = v(x | null text, DINO)            Δv_dino = v_dino - v_uncond
    v        = v_uncond + s_text * Δv_text + s_dino * Δv_dino              (refgen.flow.dual_cfg)

Both directions are measured from the unconditional point, the way the model was trained (text-only and
DINO-only are training modes of their own: 30% / 5%). "DINO" means CLS and patches together. The three
predictions run as one forward of batch 3B. `guidance="none"` makes one prediction with `cond` as given (its
drop flags respected: none set = fully conditioned).

Latents are in the dataset's normalised space; `decode` undoes the normalisation with the dataset's
per-channel statistics (`load_latent_stats`) and runs the VAE decoder.
"""

from __future__ import annotations

import itertools

import torch

from refgen import flow
from refgen.dit.model import Cond, NanoDiT


def velocity_fn(model: NanoDiT, cond: Cond, s_text: float, s_dino: float, guidance: str = "dual",
                autocast_dtype: torch.dtype | None = None):
    """A `velocity(x, sigma)` closure for refgen.flow.euler_sample."""
    B = cond.batch_size
    if guidance == "dual":
        # [uncond | text-only | DINO-only]: drop flags per third of the 3B batch
        three = Cond.cat([cond.with_drop(True, True), cond.with_drop(False, True), cond.with_drop(True, False)])
    elif guidance == "none":
        three = cond
    else:
        raise ValueError(f"guidance must be 'dual' or 'none', got {guidance!r}")
    dev = cond.t5.device

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            if guidance == "none":
                return model(x, sigma, three).float()
            v = model(x.repeat(3, 1, 1, 1), sigma.repeat(3), three).float()
        v_uncond, v_text, v_dino = v[:B], v[B:2 * B], v[2 * B:]
        return flow.dual_cfg(v_uncond, v_text, v_dino, s_text, s_dino)

    return velocity


@torch.no_grad()
def sample(model: NanoDiT, cond: Cond, latent_hw: tuple[int, int], *, steps: int = 30, shift: float = 1.0,
           s_text: float = 4.0, s_dino: float = 2.0, guidance: str = "dual", seed: int = 0,
           noise: torch.Tensor | None = None, autocast_dtype: torch.dtype | None = None,
           progress: bool = False) -> torch.Tensor:
    """Normalised latents (B, C, h, w) float32 for the conditions in `cond` (one bucket: h*w/p^2 patches)."""
    device = cond.t5.device
    B = cond.batch_size
    h, w = latent_hw
    if noise is None:
        g = torch.Generator(device=device).manual_seed(seed)
        noise = torch.randn(B, model.cfg.latent_channels, h, w, generator=g, device=device)
    sigmas = flow.sigma_schedule(steps, shift)
    v = velocity_fn(model, cond, s_text, s_dino, guidance, autocast_dtype)
    return flow.euler_sample(v, noise, sigmas, progress=progress)


def denormalise(latents: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised latents -> the VAE's raw latent space: z = x * std + mean (per channel)."""
    mean = torch.as_tensor(mean, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
    return latents * std + mean


@torch.no_grad()
def decode(latents: torch.Tensor, vae, mean, std) -> torch.Tensor:
    """Normalised latents -> images (B, 3, H, W) float in [0, 1] through the VAE (refgen.dit.encoders.VAE_CLASSES).

    The shards hold raw posterior means normalised by the dataset's own statistics (no scaling/shift
    factor), so the statistics alone map back to what the decoder expects."""
    from refgen.dit.encoders import vae_decode

    p = next(itertools.chain(vae.parameters(), vae.buffers()))
    z = denormalise(latents.float(), mean, std).to(p.device, p.dtype)
    img = vae_decode(vae, z).float()
    return ((img.clamp(-1, 1) + 1) / 2).cpu()


def to_pil(images: torch.Tensor):
    """(B, 3, H, W) in [0, 1] -> list of PIL images."""
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]
