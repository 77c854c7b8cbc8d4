"""Who stands where: a localisation loss for two-person training steps.

Two people in one prompt blend: with the head's two outputs in their slots, a person's wrong attributes are the
other person's more often than chance (docs/head.md). FastComposer (Xiao et al. 2023) traced the same failure to each
subject's tokens being read by the whole image, and supervised every subject token's cross-attention map with that
subject's segmentation mask. Qwen-Image has no cross-attention: each block attends jointly over [text; image]. The
question is asked of the part of that attention which answers it: for an image token, the attention logits to the
two slots' windows (2 L text keys), softmaxed over those keys alone, give the share of the token's person-reading
that goes to each slot. In person A's region the loss is -log(share of A's slot), in B's -log(share of B's),
averaged over the tokens of each region, the two people and every block (the heads' shares averaged first). The
restricted softmax leaves the attention's total mass on the text to the flow loss; it only says whose slot it is.

The hooks keep references to what every block computes anyway (the image queries and text keys after QK-norm, and
the rotary tables); RoPE and the logits are computed after the forward, outside the blocks, so gradient
checkpointing recomputes the blocks as they were.

With the generator frozen, the only thing this loss can move is the slot tokens themselves; on the toy world that
localised the slots and cost identity (docs/head.md), so `E2EConfig.loc_weight` is off by default.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class SlotAttention:
    """`with SlotAttention(transformer) as cap: transformer(...)`, then `cap.shares(keys)`: for every double-stream
    block, what share of each image token's attention over the given text positions goes to each group of them."""

    def __init__(self, transformer):
        self.attn = [b.attn for b in transformer.transformer_blocks]
        for i, a in enumerate(self.attn):
            if a.norm_q is None or a.norm_added_k is None:
                raise ValueError(f"transformer_blocks[{i}].attn has no QK-norm (norm_q / norm_added_k): the slot "
                                 "attention is read after it, as Qwen-Image's blocks compute it")
        self._hooks = []

    def __enter__(self) -> "SlotAttention":
        self.seen = [{} for _ in self.attn]
        for i, a in enumerate(self.attn):
            self._hooks += [a.register_forward_pre_hook(self._rope_hook(i), with_kwargs=True),
                            a.norm_q.register_forward_hook(self._keep_hook(i, "q")),
                            a.norm_added_k.register_forward_hook(self._keep_hook(i, "k"))]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _keep(self, i: int, name: str, value) -> None:
        if name in self.seen[i]:
            raise RuntimeError(f"transformer_blocks[{i}] ran twice inside one SlotAttention: one forward per capture "
                               "(a true-CFG call runs two)")
        self.seen[i][name] = value

    def _rope_hook(self, i: int):
        def hook(module, args, kwargs):
            self._keep(i, "rope", kwargs.get("image_rotary_emb"))
        return hook

    def _keep_hook(self, i: int, name: str):
        def hook(module, args, out):
            self._keep(i, name, out)
        return hook

    def shares(self, keys: torch.Tensor) -> torch.Tensor:
        """keys (B, G, L) text positions (G groups of L, e.g. two slots' windows) -> (blocks, B, N, G) float32: per
        block and image token, the share of its attention over the G * L keys that falls on each group, the heads'
        shares averaged."""
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if not self.seen or any(len(s) != 3 for s in self.seen):
            raise RuntimeError("SlotAttention.shares: no complete forward was captured")
        B, G, L = keys.shape
        out = []
        for s in self.seen:
            q, k = s["q"], s["k"]  # (B, N, h, d), (B, S, h, d): after QK-norm, before RoPE
            if q.shape[0] != B:
                raise ValueError(f"SlotAttention.shares: keys for {B} items, the forward had {q.shape[0]}")
            if s["rope"] is not None:
                img_freqs, txt_freqs = s["rope"]
                q = apply_rotary_emb_qwen(q, img_freqs, use_real=False)
                k = apply_rotary_emb_qwen(k, txt_freqs, use_real=False)
            idx = keys.reshape(B, G * L).to(k.device)
            ks = k.gather(1, idx[:, :, None, None].expand(-1, -1, *k.shape[2:]))  # (B, G*L, h, d)
            logits = torch.einsum("bnhd,bkhd->bhnk", q.float(), ks.float()) / math.sqrt(q.shape[-1])
            out.append(logits.softmax(-1).unflatten(-1, (G, L)).sum(-1).mean(1))  # (B, N, G)
        return torch.stack(out)


def localization_loss(shares: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """(B,) loss from shares (blocks, B, N, G) and regions (B, G, N) bool (the image tokens of each group's
    person): -log share of the token's own group, averaged over each region's tokens, then over the groups with a
    region and the blocks. An item without any region scores 0."""
    if regions.shape != (shares.shape[1], shares.shape[3], shares.shape[2]):
        raise ValueError(f"localization_loss: regions {tuple(regions.shape)} do not match shares "
                         f"{tuple(shares.shape)} (want (B, G, N))")
    m = regions.transpose(1, 2).to(shares)[None]  # (1, B, N, G)
    nll = -shares.clamp_min(1e-6).log()
    per = (nll * m).sum(2) / m.sum(2).clamp_min(1)  # (blocks, B, G)
    has = (m.sum(2) > 0).to(shares)  # (1, B, G)
    return ((per * has).sum(-1) / has.sum(-1).clamp_min(1)).mean(0)


def token_regions(masks: np.ndarray, width: int, height: int, grid: tuple[int, int],
                  min_cover: float = 0.25) -> torch.Tensor:
    """(P, gh * gw) bool image-token regions from (P, S, S) pixel masks of a square render: each mask is prepared
    like the target photo (`center_crop_resize` to width x height), then a token (a cell of the gh x gw grid, in
    the transformer's row-major token order) is person p's when p covers >= min_cover of it and nobody else covers
    5 % of it (tokens two people share are left out; 5 %, not 0, for the bicubic resize's ringing)."""
    from PIL import Image

    from refgen.images import center_crop_resize

    gh, gw = grid
    if not 0.05 <= min_cover <= 1:
        raise ValueError(f"token_regions: min_cover must be in [0.05, 1], got {min_cover}")
    if height % gh or width % gw:
        raise ValueError(f"token_regions: a {width}x{height} image does not split into a {gw}x{gh} token grid")
    cover = []
    for m in masks:
        im = center_crop_resize(Image.fromarray(np.asarray(m, dtype=np.uint8) * 255), width, height)
        a = np.clip(np.asarray(im, dtype=np.float32) / 255, 0, 1)
        cover.append(a.reshape(gh, height // gh, gw, width // gw).mean((1, 3)).reshape(-1))
    cover = np.stack(cover)  # (P, gh * gw)
    touched = (cover >= 0.05).sum(0)
    return torch.from_numpy((cover >= min_cover) & (touched == 1))
