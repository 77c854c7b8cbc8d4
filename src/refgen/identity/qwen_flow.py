"""Qwen-Image as a flow-matching model: VAE latents in, `model(x, sigma, cond)` out.

Mirrors what QwenImagePipeline and diffusers' train_dreambooth_lora_qwen_image.py do, so that
inversion optimises against exactly the function the pipeline samples from:
  * VAE input [B, 3, 1, H, W] in [-1, 1]; latents normalised (z - latents_mean) / latents_std;
  * latents packed 2x2 into tokens: (B, C, h, w) -> (B, h/2 * w/2, 4C);
  * the transformer gets timestep = sigma (the pipeline passes t / 1000) and img_shapes [(1, h/2, w/2)].
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from refgen.flow import true_cfg


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images of one size -> (N, 3, 1, H, W) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])  # (N, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).unsqueeze(2) / 127.5 - 1.0


@torch.no_grad()
def encode_qwen_latents(vae, images: list[Image.Image], batch: int = 4, device: torch.device | None = None) -> torch.Tensor:
    """Normalised VAE latents (N, C, h, w) in the VAE's dtype. Uses the posterior mode (mean), so
    the cache is deterministic; the noise of flow matching is added later, per step."""
    x = images_to_tensor(images)
    # `device`: where the VAE runs. Under model offload the VAE's weights sit on the CPU and its hook moves
    # them to the execution device, but not the input, so the caller names the device.
    dev, dt = device or vae.device, vae.dtype
    mean = torch.tensor(vae.config.latents_mean, dtype=dt).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=dt).view(1, -1, 1, 1, 1)
    out = []
    for i in range(0, x.shape[0], batch):
        z = vae.encode(x[i:i + batch].to(dev, dt)).latent_dist.mode()  # (b, C, 1, h, w)
        out.append(((z - mean.to(z.device)) / std.to(z.device))[:, :, 0])
    return torch.cat(out)


def decode_qwen_latents(vae, packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Packed normalised latents (B, h/2 * w/2, 4C) of an (h, w) latent -> images (B, 3, H, W) in [-1, 1] (about),
    in the VAE's dtype; differentiable (the ID loss of head training back-propagates through it)."""
    z = unpack(packed, h, w).to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
    return vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C), QwenImagePipeline._pack_latents."""
    B, C, h, w = z.shape
    return z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, 1, h, w): the inverse of `pack`, with the VAE's frame axis, as
    QwenImagePipeline._unpack_latents gives it for an image of (h, w) * vae_scale_factor pixels."""
    B, N, C4 = x.shape
    if N != (h // 2) * (w // 2) or h % 2 or w % 2:
        raise ValueError(f"unpack: {N} tokens do not tile an {h}x{w} latent in 2x2 patches")
    return x.view(B, h // 2, w // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C4 // 4, 1, h, w)


class QwenFlowModel:
    """`model(x, sigma, cond)` over packed latents; cond = (embeds (B,S,H), mask (B,S) or None).

    With `cfg_scale > 1` and `neg` = (embeds (1,S',H), mask), returns the true-CFG velocity (cond and
    uncond are two forwards, as in the pipeline).
    """

    def __init__(self, transformer, latent_hw: tuple[int, int], cfg_scale: float = 1.0, neg=None):
        self.transformer = transformer
        self.h, self.w = latent_hw
        self.cfg_scale = cfg_scale
        self.neg = neg

    def _forward(self, x, sigma, embeds, mask):
        B = x.shape[0]
        return self.transformer(hidden_states=x, timestep=sigma.to(x.dtype), encoder_hidden_states=embeds,
                                encoder_hidden_states_mask=mask, img_shapes=[[(1, self.h // 2, self.w // 2)]] * B,
                                return_dict=False)[0]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        embeds, mask = cond
        v = self._forward(x, sigma, embeds, mask)
        if self.cfg_scale <= 1 or self.neg is None:
            return v
        ne, nm = self.neg
        B = x.shape[0]
        v_neg = self._forward(x, sigma, ne.expand(B, -1, -1), None if nm is None else nm.expand(B, -1))
        return true_cfg(v, v_neg, self.cfg_scale)
