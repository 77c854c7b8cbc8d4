"""NanoDiT: a DiT (Peebles & Xie, adaLN-Zero) on FLUX-VAE latents, conditioned on T5 text and DINOv3 image
features. Design notes and where each choice comes from: docs/dit.md.

Shapes (B batch, C latent channels, h x w latent, p patch size, gh = h/p, gw = w/p, N = gh*gw image tokens,
T text tokens, d hidden size):

    x             (B, C, h, w)       normalised latents (one aspect bucket per batch: N varies between batches)
    sigma         (B,)               flow time in [0, 1], 1 = pure noise (see refgen.flow)
    t5            (B, T, D_t5)       T5 last hidden state; D_t5 = 1024 (Large) or 4096 (XXL)
    t5_mask       (B, T) bool        True = real token; None = every token real (no padding: no mask at all)
    dino_cls      (B, D_dino)        DINOv3 CLS
    dino_patches  (B, N, D_dino)     DINOv3 patches, row-major; FLUX /8 latents at p=2 -> one token = 16x16 px =
                                     exactly one DINOv3 patch, so the DINO grid IS the token grid
    -> v          (B, C, h, w)       velocity (noise - x0)

Per block (6-parameter adaLN-Zero, one cross-attention):

    c   = t_embed(sigma) + cls_proj(dino_cls)                       (B, d)       drives the adaLN modulation
    ctx = [text_proj(t5), cls_proj(dino_cls), patch_proj(patches)]  (B, T+1+N, d), mask [t5_mask, 1, 1...1]
    x  += gate_msa * SelfAttn(modulate(LN(x), shift_msa, scale_msa))
    x  += CrossAttn(LN'(x), ctx, mask)            unmodulated, output projection zero-init (PixArt-alpha)
    x  += gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))

Classifier-free guidance needs the unconditional inputs inside the model: a learned null text token, a learned
null CLS and one learned null patch token broadcast to any patch count. `Cond.drop_text` / `Cond.drop_dino`
(per sample) say where they replace the real inputs; dropping DINO drops CLS (adaLN and cross-attention) and
patches together.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from refgen.dit.attention import CROSS_ATTENTION_IMPLS, LSE_KERNELS, cross_attention
from refgen.dit.config import NanoDiTConfig


# --------------------------------------------------------------------------- conditioning container

@dataclass
class Cond:
    t5: torch.Tensor                         # (B, T, D_t5)
    t5_mask: torch.Tensor | None             # (B, T) bool; None = no padding (lets SDPA take the flash kernel)
    dino_cls: torch.Tensor                   # (B, D_dino)
    dino_patches: torch.Tensor               # (B, N, D_dino)
    drop_text: torch.Tensor | None = None    # (B,) bool: replace text by the null token
    drop_dino: torch.Tensor | None = None    # (B,) bool: replace CLS and all patches by the null tokens

    @classmethod
    def from_batch(cls, batch: dict, device: torch.device | str | None = None) -> "Cond":
        """The data loader's batch dict (see refgen.dit.shards) -> Cond, moved to `device`."""
        c = cls(t5=batch["t5"], t5_mask=batch["t5_mask"], dino_cls=batch["dino_cls"],
                dino_patches=batch["dino_patches"])
        return c.to(device) if device is not None else c

    @property
    def batch_size(self) -> int:
        return self.t5.shape[0]

    def to(self, device, dtype: torch.dtype | None = None) -> "Cond":
        def mv(t):
            if t is None:
                return None
            t = t.to(device, non_blocking=True)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return Cond(*(mv(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def with_drop(self, drop_text: torch.Tensor | bool | None, drop_dino: torch.Tensor | bool | None) -> "Cond":
        def flag(v):
            if v is None or isinstance(v, torch.Tensor):
                return v
            return torch.full((self.batch_size,), bool(v), dtype=torch.bool, device=self.t5.device)
        return dataclasses.replace(self, drop_text=flag(drop_text), drop_dino=flag(drop_dino))

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        """Concatenate along the batch (same bucket, same T); missing drop flags count as False."""
        out = {}
        for f in dataclasses.fields(Cond):
            vals = [getattr(c, f.name) for c in conds]
            if f.name.startswith("drop_"):
                if all(v is None for v in vals):
                    out[f.name] = None
                    continue
                vals = [v if v is not None else torch.zeros(c.batch_size, dtype=torch.bool, device=c.t5.device)
                        for v, c in zip(vals, conds)]
            elif f.name == "t5_mask":
                if all(v is None for v in vals):
                    out[f.name] = None
                    continue
                vals = [v if v is not None else torch.ones(c.t5.shape[:2], dtype=torch.bool, device=c.t5.device)
                        for v, c in zip(vals, conds)]
            out[f.name] = torch.cat(vals, 0)
        return Cond(**out)


# --------------------------------------------------------------------------- embeddings

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x (B, N, d); shift, scale (B, d). `1 + scale` so a zero-init modulation is the identity.
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_2d(gh: int, gw: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (MAE / DiT), (gh*gw, dim) row-major, in token units.

    Computed per grid rather than stored, so every aspect bucket gets positions without interpolation."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float64, device=device),
                          torch.arange(gw, dtype=torch.float64, device=device), indexing="ij")
    oy = y.reshape(-1, 1) * omega          # (N, dim/4)
    ox = x.reshape(-1, 1) * omega
    return torch.cat([oy.sin(), oy.cos(), ox.sin(), ox.cos()], 1).float()   # (N, dim)


class TimestepEmbedder(nn.Module):
    """sigma in [0, 1] -> (B, d). Scaled by 1000 so the sinusoid frequencies match DiT's integer timesteps."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        t = sigma.float() * 1000.0
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], -1)           # (B, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


# --------------------------------------------------------------------------- attention

class RMSNorm(nn.Module):
    """RMSNorm whose fp32 weight is cast to the activation dtype, so under bf16 autocast the fused kernel runs
    (nn.RMSNorm with a bf16 input and an fp32 weight falls back to the slow composite path)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention (flash / cuDNN kernels on CUDA).

    Self-attention when `context` is None, cross-attention otherwise. q/k RMSNorm (SD3) bounds the logits.
    A cross-attention with a key-padding mask runs `cross_attention(..., impl=self.impl, kernel=self.kernel)`
    (see there; `NanoDiT.set_attention` sets both)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, cross: bool):
        super().__init__()
        self.heads, self.cross = heads, cross
        self.impl, self.kernel = "mask", "auto"
        head_dim = dim // heads
        if cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        # x (B, N, d); context (B, L, d); valid (B, L) bool, True = a real key (None = every key)
        B, N, d = x.shape
        H = self.heads
        if self.cross:
            q = self.q(x).view(B, N, H, d // H)
            k, v = self.kv(context).view(B, context.shape[1], 2, H, d // H).unbind(2)
        else:
            q, k, v = self.qkv(x).view(B, N, 3, H, d // H).unbind(2)
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)  # (B, H, *, hd)
        if valid is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = cross_attention(q, k, v, valid, impl=self.impl, kernel=self.kernel)
        return self.proj(out.transpose(1, 2).reshape(B, N, d))


class DiTBlock(nn.Module):
    def __init__(self, cfg: NanoDiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads, cfg.qk_norm, cross=False)
        # The cross-attention input is not modulated (6 adaLN parameters per block), so it keeps a learned affine.
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.cross_attn = Attention(d, cfg.num_heads, cfg.qk_norm, cross=True)
        self.norm3 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c, ctx, ctx_valid):
        # x (B, N, d); c (B, d); ctx (B, L, d); ctx_valid (B, L) bool or None (every key valid)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(self.norm2(x), ctx, ctx_valid)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, d: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


# --------------------------------------------------------------------------- the model

class NanoDiT(nn.Module):
    def __init__(self, cfg: NanoDiTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, p, C = cfg.hidden_size, cfg.patch_size, cfg.latent_channels
        self.x_embed = nn.Conv2d(C, d, kernel_size=p, stride=p)           # (B,C,h,w) -> (B,d,gh,gw)
        self.t_embed = TimestepEmbedder(d)
        self.text_proj = nn.Linear(cfg.t5_dim, d)
        self.cls_proj = nn.Linear(cfg.dino_dim, d)                         # used twice: adaLN and a ctx token
        self.patch_proj = nn.Linear(cfg.dino_dim, d)
        self.null_text = nn.Parameter(torch.zeros(cfg.t5_dim))            # one token; the rest of T is masked
        self.null_cls = nn.Parameter(torch.zeros(cfg.dino_dim))
        self.null_patch = nn.Parameter(torch.zeros(cfg.dino_dim))         # broadcast to any patch count
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(d, p * p * C)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.cross_attention = "mask"     # see set_attention
        self.check_padding = True         # eager "mask" path: detect an all-True t5_mask (one host sync)
        self.initialize_weights()

    def set_attention(self, cross: str = "mask", kernel: str = "auto") -> "NanoDiT":
        """How a cross-attention with padded text keys runs (`cross_attention`); no parameter changes, so any
        checkpoint loads under any choice. cross: "mask" (SDPA with a boolean mask, the reference), "zpad"
        (padded keys zeroed, one unmasked kernel, exact softmax correction) or "split" (text part by hand, DINO
        part unmasked, merged by log-sum-exp). kernel, for zpad/split on CUDA: "cudnn", "flash" or "auto"
        (cuDNN on sm90+, else flash); on CPU both run the fp32 "math" kernel."""
        if cross not in CROSS_ATTENTION_IMPLS:
            raise ValueError(f"cross attention {cross!r}: choose from {CROSS_ATTENTION_IMPLS}")
        if kernel not in LSE_KERNELS:
            raise ValueError(f"kernel {kernel!r}: choose from {LSE_KERNELS}")
        if kernel == "auto":
            kernel = "flash"
            if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0):
                kernel = "cudnn"
        self.cross_attention = cross
        for blk in self.blocks:
            blk.cross_attn.impl, blk.cross_attn.kernel = cross, kernel
        return self

    def compile_blocks(self, **compile_kwargs) -> "NanoDiT":
        """Regional compilation: `torch.compile` each DiT block in place (the embeddings and final layer stay
        eager). The blocks share one compiled graph, so compiling costs about one block instead of 22 (~2 min
        for `base` as a whole), and the state dict keeps its plain keys (no `_orig_mod.` prefix)."""
        for blk in self.blocks:
            blk.compile(**compile_kwargs)
        return self

    def initialize_weights(self) -> None:
        """DiT's scheme: xavier linears, normal(0.02) timestep MLP, zero adaLN and output layer, so every block
        starts as the identity; the cross-attention output is zeroed too (PixArt-alpha) for the same reason.
        Null tokens start at zero."""
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(_basic)
        w = self.x_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
            nn.init.zeros_(blk.cross_attn.proj.weight)
            nn.init.zeros_(blk.cross_attn.proj.bias)
        for m in (self.final.adaLN_modulation[-1], self.final.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- conditioning

    def apply_null(self, cond: Cond) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Replace dropped inputs by the learned null tokens, per sample. Returns (t5, t5_mask, cls, patches).

        A dropped text becomes [null_text, <masked>...]: exactly one valid token whatever T is, so the
        unconditional prediction does not depend on how long the batch's padding is. The mask stays None only
        when the input had none (no padding) and no text is dropped."""
        t5, cls, patches = cond.t5, cond.dino_cls, cond.dino_patches
        mask = cond.t5_mask.bool() if cond.t5_mask is not None else None
        B, T, _ = t5.shape
        if cond.drop_text is not None:
            dt = cond.drop_text.to(t5.device).bool()
            if mask is None:
                mask = torch.ones(B, T, dtype=torch.bool, device=t5.device)
            null_seq = torch.cat([self.null_text.to(t5.dtype).expand(B, 1, -1), t5.new_zeros(B, T - 1, t5.shape[2])], 1)
            null_mask = torch.arange(T, device=mask.device).expand(B, T) == 0
            t5 = torch.where(dt[:, None, None], null_seq, t5)
            mask = torch.where(dt[:, None], null_mask, mask)
        if cond.drop_dino is not None:
            dd = cond.drop_dino.to(cls.device).bool()
            cls = torch.where(dd[:, None], self.null_cls.to(cls.dtype).expand_as(cls), cls)
            patches = torch.where(dd[:, None, None], self.null_patch.to(patches.dtype).expand_as(patches), patches)
        return t5, mask, cls, patches

    def pos_embed(self, gh: int, gw: int, device, dtype) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # inside torch.compile: computed in the graph (a constant of the shape), no cache mutation to guard on
            return sincos_2d(gh, gw, self.cfg.hidden_size, device=device).to(dtype)
        key = (gh, gw, str(device), dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(gh, gw, self.cfg.hidden_size, device=device).to(dtype)
        return self._pos_cache[key]

    # ---- forward

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond,
                return_hidden: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Velocity (B, C, h, w); with return_hidden = k > 0 also the tokens after block k, (B, N, d) (REPA)."""
        B, C, h, w = x.shape
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent {h}x{w} not divisible by patch size {p}")
        gh, gw = h // p, w // p
        N = gh * gw
        if cond.dino_patches.shape[:2] != (B, N):
            raise ValueError(f"dino_patches {tuple(cond.dino_patches.shape)} does not match the token grid "
                             f"{gh}x{gw} = {N} of latents {h}x{w} (expected ({B}, {N}, D))")
        t5, t5_mask, cls, patches = self.apply_null(cond)

        tok = self.x_embed(x).flatten(2).transpose(1, 2)                  # (B, N, d)
        pos = self.pos_embed(gh, gw, x.device, tok.dtype)                  # (N, d)
        tok = tok + pos
        cls_h = self.cls_proj(cls)                                         # (B, d)
        c = self.t_embed(sigma) + cls_h                                    # (B, d)
        patch_h = self.patch_proj(patches)                                 # (B, N, d)
        if self.cfg.dino_patch_pos:
            patch_h = patch_h + pos
        ctx = torch.cat([self.text_proj(t5), cls_h.unsqueeze(1), patch_h], 1)       # (B, T+1+N, d)
        # DINO tokens are always valid: key mask = [t5_mask, True x (1+N)]. With no padding anywhere,
        # pass no mask so SDPA takes its fastest kernel (a masked SDPA runs its kernel with an additive bias,
        # markedly slower; the "zpad" / "split" cross-attentions avoid the mask, see `cross_attention`). t5_mask None (decided by the
        # caller, on the host) = no padding, no check. With the default "mask" cross-attention, in eager mode an
        # all-True mask is also detected, at the price of one host sync (`check_padding = False` skips it);
        # under torch.compile that data-dependent branch would break the graph, so a given mask is used there.
        if t5_mask is None or (self.cross_attention == "mask" and self.check_padding
                               and not torch.compiler.is_compiling() and bool(t5_mask.all())):
            ctx_valid = None
        else:
            ones = torch.ones(B, 1 + N, dtype=torch.bool, device=t5_mask.device)
            ctx_valid = torch.cat([t5_mask, ones], 1)                      # (B, L)

        hidden = None
        for i, blk in enumerate(self.blocks):
            tok = blk(tok, c, ctx, ctx_valid)
            if i + 1 == return_hidden:
                hidden = tok
        out = self.final(tok, c)                                           # (B, N, p*p*C)
        v = self.unpatchify(out, gh, gw)
        return (v, hidden) if return_hidden else v

    def unpatchify(self, t: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        # (B, N, p*p*C) -> (B, C, gh*p, gw*p); token channel order (p, p, C) as in DiT
        B = t.shape[0]
        p, C = self.cfg.patch_size, self.cfg.latent_channels
        t = t.view(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return t.reshape(B, C, gh * p, gw * p)


# --------------------------------------------------------------------------- counting

def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(cfg: NanoDiTConfig, h: int, w: int, text_len: int) -> int:
    """Analytic matmul FLOPs of one forward pass for ONE sample (2 per multiply-add), latents h x w.

    Counts every Linear/conv and the attention products (QK^T and AV); ignores norms, activations, softmax.
    A training step costs 3x this (forward + backward), the convention MFU is quoted in (PaLM, nanoGPT)."""
    d, p, C = cfg.hidden_size, cfg.patch_size, cfg.latent_channels
    N = (h // p) * (w // p)
    L = text_len + 1 + N
    m = int(d * cfg.mlp_ratio)
    per_block = (
        2 * N * d * 3 * d + 2 * N * d * d + 4 * N * N * d            # self-attention: qkv, proj, QK^T + AV
        + 2 * N * d * d + 2 * L * d * 2 * d + 2 * N * d * d + 4 * N * L * d   # cross: q, kv, proj, QK^T + AV
        + 2 * 2 * N * d * m                                          # MLP
        + 2 * d * 6 * d                                              # adaLN (once per sample)
    )
    outside = (
        2 * N * C * p * p * d                                        # patch embedding
        + 2 * (256 * d + d * d)                                      # timestep MLP
        + 2 * text_len * cfg.t5_dim * d + 2 * cfg.dino_dim * d + 2 * N * cfg.dino_dim * d   # projections
        + 2 * d * 2 * d + 2 * N * d * p * p * C                      # final layer
    )
    return cfg.depth * per_block + outside
