"""The sampling settings `refgen render` and `refgen generate` share: one dataclass, its defaults in one place.

Kept free of torch so the command line can build its flags from it without importing the models.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


GRID_SEEDS = tuple(range(8))  # an alpha grid's columns (RenderConfig's default seeds)


@dataclass(kw_only=True)
class SamplingConfig:
    """How images are sampled, shared by `refgen render` (RenderConfig) and `refgen generate` (GenerateConfig): the
    defaults live here, and the commands' flags are made from these fields (cli._add_sampling)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 28
    true_cfg: float = 4.0
    negative_prompt: str = " "
    height: int = 768
    width: int = 512
    batch_size: int = 4  # images per pipeline call
    cfg_batch: bool = True  # true CFG's two forwards as one batched forward (see sample_batched_cfg)
    # > 0: a third forward per step, the prompt without the people (alpha 0), and the person's direction pushed
    # by this much (refgen.flow.identity_cfg); needs true CFG and cfg_batch
    id_guidance: float = 0.0

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("need at least one seed")
        # torch.Generator takes -2**63..2**64-1 and maps a negative seed s onto 2**64 + s: refuse it instead
        bad = [s for s in self.seeds if not 0 <= s < 2**64]
        if bad:
            raise ValueError(f"seeds must be in 0..2**64-1, got {bad[0]}")
        # Qwen-Image's scheduler stretches sigmas to shift_terminal; with one step that is 0/0 and the
        # image comes out NaN (diffusers 0.42), so one step is refused rather than rendered black.
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2 (got {self.steps}): one step gives NaN with Qwen-Image's "
                             "terminal-shift schedule")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {self.batch_size})")
        if not (self.id_guidance >= 0 and math.isfinite(self.id_guidance)):
            raise ValueError(f"id_guidance must be a finite number >= 0, got {self.id_guidance}")
        if self.id_guidance and (self.true_cfg <= 1 or not self.cfg_batch):
            raise ValueError(f"id_guidance {self.id_guidance} needs true CFG (true_cfg > 1, got {self.true_cfg}) and "
                             f"cfg_batch (got {self.cfg_batch}): it adds a third row to the batched CFG forward")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be multiples of 16 (VAE /8 x 2x2 packing), got "
                             f"{self.height}x{self.width}")

    def sampling(self) -> dict:
        """This config's SamplingConfig fields, as keywords for another config."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingConfig)}
