"""ID loss: how far the person the model is drawing is from the person in the photo, as the vision tower sees it.

PuLID (Guo et al. 2024) adds a face-recognition loss on images sampled during training; here the image is the flow
model's one-step estimate of the clean sample, x0_hat = x_sigma - sigma * v (`refgen.flow.predict_x0`), decoded by
the frozen VAE and read by the frozen Qwen3-VL vision tower (`VisionFeatures.pixel_means`): 1 - cos between its mean
visual token and the target photo's. The flow loss weighs every pixel alike, and glasses or a face shape are few
pixels; this weighs what the tower sees of the person. Everything is differentiable back to the conditioning, which
head training (`train_e2e`) and teacher inversion (`invert`) both optimise.

`mean_id_loss` reads the target from its own latent, decoded alike (head training); `spatial_id_loss` compares
token by token against it: a mean feature cannot tell who stands left and who right in a two-person image, tokens
at the same place can.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decoded(vae, packed: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Packed normalised latents (B, h/2 * w/2, 4C) of an (h, w) = latent_hw latent -> float images (B, 3, H, W) in
    [0, 1] (about), as the vision tower's `pixel_means` / `pixel_tokens` read them; differentiable."""
    from refgen.identity.qwen_flow import decode_qwen_latents

    return (decode_qwen_latents(vae, packed, *latent_hw).float() + 1) / 2


def id_loss(vae, vl, x0_hat: torch.Tensor, latent_hw: tuple[int, int], target_means: torch.Tensor) -> torch.Tensor:
    """(B,) 1 - cos(vision-tower mean feature of decode(x0_hat), target_means).

    x0_hat: packed normalised latents (B, h/2 * w/2, 4C) of an (h, w) = latent_hw latent; target_means (B, D): each
    target photo's mean visual token as `vl.pixel_means` (or VisionFeatures' cache) gives it; vl: anything with
    `pixel_means(images (B, 3, H, W) in [0, 1]) -> (B, D)`, H and W multiples of 32."""
    if x0_hat.shape[0] != target_means.shape[0]:
        raise ValueError(f"id_loss: {x0_hat.shape[0]} estimates but {target_means.shape[0]} target features")
    feat = vl.pixel_means(decoded(vae, x0_hat, latent_hw))  # (B, D)
    return 1 - F.cosine_similarity(feat, target_means.to(feat.device, torch.float32), dim=-1)


def mean_id_loss(vae, vl, x0_hat: torch.Tensor, x0: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B,) `id_loss` against the target's own latent x0 (B, N, 4C), decoded alike and read without gradient: the
    target as the estimate is seen (the crop at the training size, through the same VAE decode), not a feature of
    the whole photo at the processor's resolution."""
    if x0_hat.shape != x0.shape:
        raise ValueError(f"mean_id_loss: estimates {tuple(x0_hat.shape)} and targets {tuple(x0.shape)} differ")
    with torch.no_grad():
        target = vl.pixel_means(decoded(vae, x0, latent_hw))  # (B, D)
    return id_loss(vae, vl, x0_hat, latent_hw, target)


def spatial_id_loss(vae, vl, x0_hat: torch.Tensor, x0: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B,) mean over visual tokens of 1 - cos(token t of decode(x0_hat), token t of decode(x0)): x0 (B, N, 4C) the
    packed target latents, read without gradient; vl: anything with `pixel_tokens(images) -> (B, T, D)`."""
    if x0_hat.shape != x0.shape:
        raise ValueError(f"spatial_id_loss: estimates {tuple(x0_hat.shape)} and targets {tuple(x0.shape)} differ")
    with torch.no_grad():
        target = vl.pixel_tokens(decoded(vae, x0, latent_hw))  # (B, T, D)
    feat = vl.pixel_tokens(decoded(vae, x0_hat, latent_hw))
    return (1 - F.cosine_similarity(feat, target, dim=-1)).mean(1)
