"""Rectified flow / flow matching: the one method module shared by teacher inversion, toy-model
training and NanoDiT.

Convention (the one Qwen-Image and FLUX are trained with, see diffusers'
`FlowMatchEulerDiscreteScheduler` and `train_dreambooth_lora_qwen_image.py`):

    x_sigma = (1 - sigma) * x0 + sigma * noise        sigma in [0, 1], 1 = pure noise
    v       = noise - x0                              the regression target, d x_sigma / d sigma

A network is called as `model(x, sigma, cond)` and returns v with the shape of x. Sampling integrates
from sigma = 1 down to 0 with Euler steps x <- x + (sigma_next - sigma) * v.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Model = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def _expand(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1), explicitly; a shape mismatch is an error, not a broadcast."""
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def check_tail(tail: float, tail_low: float) -> None:
    """The sigma tail's bounds, for sample_sigmas and for the configs that pass it on (refused at construction)."""
    if not 0.0 <= tail <= 1.0 or not 0.0 <= tail_low < 1.0:
        raise ValueError(f"need 0 <= sigma_tail <= 1 and 0 <= sigma_tail_low < 1, got {tail}, {tail_low}")


def sample_sigmas(n: int, mode: str = "logit_normal", *, mean: float = 0.0, std: float = 1.0,
                  tail: float = 0.0, tail_low: float = 0.95,
                  generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Training noise levels, (n,) float32 in (0, 1].

    logit_normal is SD3's choice (more weight on the middle of the path); uniform is plain rectified flow.
    TAIL > 0 replaces that share of the draws by uniform ones on [TAIL_LOW, 1]: logit-normal(0, 1) almost never
    draws sigma > 0.99 (about 2 in a million), yet a sampler's first step is at sigma = 1, where the prediction is
    the condition's mean image (its colours and layout). With TAIL = 0 the draws are exactly those without it.
    """
    check_tail(tail, tail_low)
    if mode == "uniform":
        s = torch.rand(n, generator=generator, device=device)
    elif mode == "logit_normal":
        s = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"unknown sigma sampling mode {mode!r}; use 'uniform' or 'logit_normal'")
    if tail > 0:
        pick = torch.rand(n, generator=generator, device=device) < tail
        top = tail_low + (1.0 - tail_low) * (1.0 - torch.rand(n, generator=generator, device=device))  # (low, 1]
        s = torch.where(pick, top, s)
    return s


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    s = _expand(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def predict_x0(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The one-step estimate of the clean sample from a velocity: x_t - sigma * v (exact when v is exact)."""
    return x_t - _expand(sigma, x_t) * v


def loss_and_prediction(model: Model, x0: torch.Tensor, cond, *, sigma: torch.Tensor,
                        noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-sample MSE (B,), x_sigma, v): `loss` with the noised input and the prediction kept, for objectives
    that also read the model's estimate of the clean sample (`predict_x0`)."""
    x_t = add_noise(x0, noise, sigma)
    v = model(x_t, sigma, cond)
    err = (v.float() - velocity_target(x0, noise).float()).pow(2)
    return err.flatten(1).mean(1), x_t, v


def loss(model: Model, x0: torch.Tensor, cond, *, sigma: torch.Tensor, noise: torch.Tensor,
         reduction: str = "mean") -> torch.Tensor:
    """MSE between model(x_sigma, sigma, cond) and noise - x0.

    reduction="none" returns one value per sample (B,), which batched inversion needs to keep
    identities independent.
    """
    per_sample = loss_and_prediction(model, x0, cond, sigma=sigma, noise=noise)[0]
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"unknown reduction {reduction!r}")


def cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_uncond + scale * (v_cond - v_uncond)."""
    return v_uncond + scale * (v_cond - v_uncond)


def true_cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's "true CFG" (as `QwenImagePipeline` computes it): `cfg`, then every token's prediction
    rescaled to the norm of the conditional one (norm over the last, channel axis). Large scales then move
    the direction of v but not its per-token magnitude, which keeps scale 4 from over-saturating.
    Written with the pipeline's exact operations, so the same inputs give bit-identical results."""
    comb = cfg(v_cond, v_uncond, scale)
    return comb * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def identity_cfg(v_id: torch.Tensor, v_plain: torch.Tensor | Sequence[torch.Tensor], v_uncond: torch.Tensor,
                 scale: float, id_scale: float) -> torch.Tensor:
    """True CFG with the person's own direction pushed further: the conditional prediction is first moved
    away from the same prompt without the person (v_plain: the placeholder as written, alpha 0),

        v_c = v_id + id_scale * (v_id - v_plain)      or, with several references, id_scale * sum_k (v_id - v_plain_k)

    then guided from v_uncond as `true_cfg` does, and rescaled to the norm of v_id (not of v_c: the push must
    change what is drawn, not how strongly). id_scale = 0 is `true_cfg(v_id, v_uncond, scale)` exactly. The same
    idea as InstructPix2Pix's two guidance scales, here with the prompt as written as the second reference;
    unlike a larger alpha it leaves the text encoder's input where the person was learnt."""
    plains = [v_plain] if isinstance(v_plain, torch.Tensor) else list(v_plain)
    v_c = v_id + id_scale * sum(v_id - p for p in plains) if id_scale else v_id
    comb = cfg(v_c, v_uncond, scale)
    return comb * (torch.norm(v_id, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def dual_cfg(v_uncond: torch.Tensor, v_text: torch.Tensor, v_dino: torch.Tensor,
             s_text: float, s_dino: float) -> torch.Tensor:
    """Two independent guidance directions, each taken from the unconditional point:

        v = v_uncond + s_text * (v_text - v_uncond) + s_dino * (v_dino - v_uncond)

    v_text is the prediction with text only (DINO nulled), v_dino with DINO only (text nulled).
    With s_text = s_dino = 1 this is v_text + v_dino - v_uncond (an additive composition of both).
    """
    return v_uncond + s_text * (v_text - v_uncond) + s_dino * (v_dino - v_uncond)


def sigma_schedule(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """steps+1 noise levels from 1 to 0. shift > 1 spends more steps at high noise (SD3 / FLUX shift)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift * s / (1 + (shift - 1) * s)


@torch.no_grad()
def euler_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                 sigmas: Sequence[float] | torch.Tensor, progress: bool = False) -> torch.Tensor:
    """Integrate dx/dsigma = v from sigmas[0] (=1) to sigmas[-1] (=0).

    `velocity(x, sigma_batch)` wraps the model and any guidance (see `cfg`, `dual_cfg`), so one
    sampler serves every conditioning scheme.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    x = noise
    it = range(len(sigmas) - 1)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", leave=False)
    for i in it:
        s, s_next = sigmas[i], sigmas[i + 1]
        v = velocity(x, torch.full((x.shape[0],), float(s), device=x.device))
        x = x + (s_next - s).to(x.dtype) * v
    return x
