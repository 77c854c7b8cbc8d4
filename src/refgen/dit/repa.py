"""REPA for NanoDiT training (refgen.dit.config.RepaConfig says what and why): the projector, the module DDP wraps,
and the loss. Training only: sampling and checkpoints' `model` / `ema` weights never contain the projector (it is
saved beside them as `repa`)."""

from __future__ import annotations

import torch
from torch import nn

from refgen.dit.config import RepaConfig


def build_projector(cfg: RepaConfig, hidden_size: int, dino_dim: int) -> nn.Sequential:
    """REPA's projector: 3 linear layers with SiLU, DiT width -> proj_hidden -> proj_hidden -> DINO width."""
    h = cfg.proj_hidden
    return nn.Sequential(nn.Linear(hidden_size, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, dino_dim))


class RepaDiT(nn.Module):
    """The DiT (plain, compiled or per-block compiled) and the projector as one module, so that DDP averages the
    projector's gradients too. forward -> (velocity, projected hidden states (B, N, D_dino))."""

    def __init__(self, dit: nn.Module, projector: nn.Module, depth: int):
        super().__init__()
        self.dit, self.projector, self.depth = dit, projector, depth

    def forward(self, x, sigma, cond):
        v, hidden = self.dit(x, sigma, cond, return_hidden=self.depth)
        return v, self.projector(hidden)


def repa_loss(projected: torch.Tensor, dino_patches: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens of 1 - cos(projected, DINO patch), averaged over the samples with weight 1 (`weights`
    (B,) in {0, 1}; None = all). A batch with no selected sample gives 0, still attached to the graph (DDP expects
    every rank's projector to take part in the backward)."""
    cos = nn.functional.cosine_similarity(projected.float(), dino_patches.float(), dim=-1)   # (B, N)
    per_sample = (1 - cos).mean(1)                                                           # (B,)
    if weights is None:
        return per_sample.mean()
    w = weights.to(per_sample.dtype)
    return (per_sample * w).sum() / w.sum().clamp_min(1.0)
