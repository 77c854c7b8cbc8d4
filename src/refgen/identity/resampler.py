"""The resampler head: all visual tokens of all reference photos of one person -> slot residual (L, H).

L learned queries, one per token of the `~ID~` window, cross-attend over every merged visual token of every
reference photo (Perceiver resampler / Q-Former style). A mean-pooled z (the linear head's input) averages away
where in the photo a detail sits and how many photos agree on it; the queries can weigh tokens, so several
photos add evidence instead of blurring into one mean. The keys are the photo tokens plus the queries themselves
(as in Flamingo's resampler), so the L window tokens can also agree with each other.

With `pooled_query` (off by default) the queries start from the person's pooled feature: the L2-normalised mean
of all real tokens (the linear head's z when the photos have equal token counts, as the toy world's do), projected
to the query width and added to every query. That vector is what the vision tower was trained to make
identity-discriminative, so the head would carry identity from its first step and the attention add what the mean
loses; on the toy world it has not yet been shown to help (docs/head.md).

The number of photos varies per person: a batch pads photos and tokens and passes a key mask; masked keys get no
attention weight, so padding changes nothing (tested). No positional code is added: the tokens come out of the
vision tower with their position inside the photo already mixed in, and the photos of a person are a set.

Output scale control is `LinearHead`'s: each of the L tokens is RMS-normalised, then multiplied by one learned
scale clamp(exp(log_scale), scale_min, scale_max), so the residual's size is one number the training can move and
the clamp bounds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ResamplerConfig:
    width: int = 256       # the queries' and attention's hidden size
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    pooled_query: bool = False  # add the projected mean of all real tokens to every query
    scale_min: float = 0.01
    scale_max: float = 1.5

    def __post_init__(self):
        if self.width < 1 or self.layers < 1 or self.heads < 1 or self.width % self.heads:
            raise ValueError(f"resampler: need width, layers, heads >= 1 and width divisible by heads, got "
                             f"width={self.width}, layers={self.layers}, heads={self.heads}")
        if self.mlp_ratio <= 0 or not (0 < self.scale_min <= self.scale_max):
            raise ValueError(f"resampler: need mlp_ratio > 0 and 0 < scale_min <= scale_max, got {self.mlp_ratio}, "
                             f"{self.scale_min}, {self.scale_max}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Block(nn.Module):
    """Pre-norm cross-attention (queries over [photo tokens; queries]) and MLP, each a residual branch."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, q: torch.Tensor, x: torch.Tensor, allow: torch.Tensor) -> torch.Tensor:
        """q (B, L, W) queries, x (B, N, W) photo tokens, allow (B, N + L) bool (True = attend) -> (B, L, W)."""
        B, L, W = q.shape
        hq = self.norm_q(q)
        kv = torch.cat([self.norm_kv(x), hq], 1)  # (B, N+L, W)
        k, v = self.kv(kv).chunk(2, -1)  # (B, N+L, W) each

        def split(t):  # (B, n, W) -> (B, heads, n, W/heads)
            return t.view(B, -1, self.heads, W // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(hq)), split(k), split(v),
                                           attn_mask=allow[:, None, None, :])  # (B, heads, L, W/heads)
        q = q + self.proj(a.transpose(1, 2).reshape(B, L, W))
        return q + self.mlp(self.norm_mlp(q))


class ResamplerHead(nn.Module):
    """tokens (B, N, D) + mask (B, N) -> slot residual R (B, L, H)."""

    kind = "resampler"

    def __init__(self, dim: int, L: int, H: int, cfg: ResamplerConfig | None = None):
        super().__init__()
        cfg = cfg or ResamplerConfig()
        self.dim, self.L, self.H, self.cfg = dim, L, H, cfg
        self.scale_min, self.scale_max = cfg.scale_min, cfg.scale_max
        self.inp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, cfg.width))  # vision tokens into the query width
        self.queries = nn.Parameter(torch.randn(L, cfg.width) * 0.02)  # one per window token
        self.summary = nn.Linear(dim, cfg.width) if cfg.pooled_query else None  # pooled z -> every query
        self.blocks = nn.ModuleList(_Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.out_norm = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, H)
        self.log_scale = nn.Parameter(torch.tensor(0.0))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, D): every visual token of every reference photo of one person, padded; mask (B, N) bool,
        True = a real token (each row needs at least one). Returns R (B, L, H)."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.dim or mask.shape != tokens.shape[:2]:
            raise ValueError(f"resampler: tokens must be (B, N, {self.dim}) with mask (B, N), got "
                             f"{tuple(tokens.shape)} and {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"resampler: mask must be bool (True = real token), got {mask.dtype}")
        if not mask.any(1).all():
            raise ValueError("resampler: a row has no real token (every person needs at least one photo)")
        B = tokens.shape[0]
        x = self.inp(tokens)  # (B, N, W)
        q = self.queries.unsqueeze(0).expand(B, -1, -1)  # (B, L, W)
        if self.summary is not None:
            m = mask.to(tokens.dtype).unsqueeze(-1)  # (B, N, 1)
            z = (tokens * m).sum(1) / m.sum(1)  # (B, D) mean of the real tokens; padding has weight 0
            q = q + self.summary(z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)).unsqueeze(1)
        allow = torch.cat([mask, mask.new_ones(B, self.L)], 1)  # (B, N+L): the queries always see each other
        for blk in self.blocks:
            q = blk(q, x, allow)
        raw = self.out(self.out_norm(q))  # (B, L, H)
        tok = raw / raw.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()  # per-token RMS 1
        return self.log_scale.exp().clamp(self.scale_min, self.scale_max) * tok


def photo_tokens(tokens: torch.Tensor, tok_mask: torch.Tensor, photo_mask: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    """Reference sets as the resampler's input: tokens (B, K, T, D) of up to K photos per person, tok_mask (B, K, T)
    (real tokens of each photo), photo_mask (B, K) (real photos) -> (B, K*T, D), key mask (B, K*T)."""
    B, K, T, D = tokens.shape
    return tokens.reshape(B, K * T, D), (tok_mask & photo_mask[:, :, None]).reshape(B, K * T)
