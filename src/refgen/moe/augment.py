"""Corruption augmentation for MoE training (opt-in: `corrupt_p > 0` in MoETrainConfig; spec section 8, WP2 B4:
«robustness-augmented training allowed»).

Each training image is, with probability `corrupt_p`, replaced by one corruption of `refgen.moe.corruptions`
(type uniform over `corrupt_types`, severity uniform over `corrupt_severities`), optionally AugMix-style blended
with the clean image (`corrupt_mix`: x' = (1 - m) x + m c(x), m ~ U(0, 1)). Every draw comes from an explicit
`numpy.random.Generator` seeded by (training seed, epoch), so a run is reproducible; evaluation stays clean (only
the training batches pass through here).

Caveat that every number made with it must carry: the default types are the evaluation suite's own 7 corruption
families (new random draws, not the evaluation images). A drop measured after this training is robustness to
*seen* corruption families, not the ImageNet-C protocol's unseen ones; leave types out (`corrupt_types`) and
evaluate on them to measure transfer.
"""

from __future__ import annotations

import numpy as np
import torch

from refgen.moe.corruptions import CORRUPTIONS, corrupt


def check(p: float, types, severities) -> None:
    if not 0 <= p <= 1:
        raise ValueError(f"corrupt_p must be in [0, 1], got {p}")
    bad = [t for t in types if t not in CORRUPTIONS]
    if bad or not types:
        raise ValueError(f"corrupt_types must be a non-empty subset of {list(CORRUPTIONS)}, got {list(types)}")
    if not severities or any(s not in (1, 2, 3, 4, 5) for s in severities):
        raise ValueError(f"corrupt_severities must be a non-empty subset of 1..5, got {list(severities)}")


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The augmentation's generator for one epoch (independent of torch's training generator)."""
    return np.random.default_rng([int(seed), int(epoch), 0xC0AA])


def corrupt_batch(x: torch.Tensor, p: float, types, severities, rng: np.random.Generator,
                  mix: bool = False) -> torch.Tensor:
    """uint8 images [B, C, H, W] (any device) -> the same with a share ~p corrupted; returns uint8 on x's device."""
    if p <= 0:
        return x
    a = x.detach().cpu().numpy().transpose(0, 2, 3, 1)  # [B, H, W, C]
    out = a.copy()
    hit = rng.random(len(a)) < p
    kinds = rng.integers(0, len(types), len(a))
    sevs = rng.integers(0, len(severities), len(a))
    m = rng.random(len(a))
    for i in np.flatnonzero(hit):
        c = corrupt(a[i], types[kinds[i]], int(severities[sevs[i]]), rng)
        if mix:
            c = np.clip(np.rint((1 - m[i]) * a[i].astype(np.float64) + m[i] * c), 0, 255).astype(np.uint8)
        out[i] = c
    return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2))).to(x.device)
