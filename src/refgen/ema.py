"""Exponential moving average of a model's weights: the weights that ship from every refgen training loop
(NanoDiT, the toy Qwen-Image recipe). Smoother samples than the raw weights for the same steps."""

from __future__ import annotations

import torch
from torch import nn


def ema_decay_at(step: int, decay: float, warmup: float) -> float:
    """min(decay, (1 + step) / (warmup + step)): 0.1 at step 0 with warmup 10, 0.9 at step 80, 0.99 at ~900.
    Early on the average follows the model closely, so it is not dominated by the random initial weights."""
    return min(decay, (1 + step) / (warmup + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """W_ema <- decay * W_ema + (1 - decay) * W, one fused lerp over all parameters."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
