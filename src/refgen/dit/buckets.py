"""Aspect-ratio buckets: every image goes to the bucket with the nearest aspect ratio and is
resized to exactly that size, without cropping and without padding.

Residual mismatch: an image's aspect ratio rarely equals its bucket's, so the resize stretches it slightly
(anisotropically). We accept that, because a crop loses framing and padding puts
non-image borders into both the latents and the DINO patches, which the DiT would learn to draw. The stretch is
bounded by the bucket spacing (default set: at most ~7.2% between 1:2.4 and 2.4:1), recorded per sample as
`aspect_distortion`, and images beyond `max_aspect_distortion` (extreme panoramas) are skipped and reported
rather than squashed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Sides must be multiples of this so that one DiT token (patch 2 on the FLUX VAE's /8 latents) covers exactly one
# DINOv3 patch (16 px): VAE factor 8 x DiT patch 2 = 16 = DINOv3 patch size.
ALIGN = 16

# ~1 MP, sides multiples of 64 (SDXL-style list plus 1280x768 / 1344x704 and 2:1 steps).
DEFAULT_BUCKETS: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (1088, 960), (960, 1088),
    (1152, 896), (896, 1152),
    (1216, 832), (832, 1216),
    (1280, 768), (768, 1280),
    (1344, 768), (768, 1344),
    (1344, 704), (704, 1344),
    (1408, 704), (704, 1408),
    (1472, 704), (704, 1472),
    (1536, 640), (640, 1536),
)


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def aspect(self) -> float:
        return self.width / self.height


def parse_buckets(spec: str | Iterable[str | Sequence[int]] | None) -> list[Bucket]:
    """'1024x1024,832x1216' or [(W, H), ...] or ['WxH', ...] -> validated buckets; None -> the default set."""
    if spec is None:
        items: list = list(DEFAULT_BUCKETS)
    elif isinstance(spec, str):
        items = [s for s in spec.replace(" ", "").split(",") if s]
    else:
        items = list(spec)
    out: list[Bucket] = []
    for it in items:
        if isinstance(it, str):
            try:
                w, h = (int(x) for x in it.lower().split("x"))
            except ValueError:
                raise ValueError(f"bucket {it!r}: expected WIDTHxHEIGHT, e.g. 1216x832") from None
        else:
            w, h = (int(x) for x in it)
        if w <= 0 or h <= 0 or w % ALIGN or h % ALIGN:
            raise ValueError(
                f"bucket {w}x{h}: both sides must be positive multiples of {ALIGN} (VAE /8 x DiT patch 2 = DINOv3 "
                f"patch 16), otherwise DINO patches and DiT tokens do not line up")
        b = Bucket(w, h)
        if b in out:
            raise ValueError(f"bucket {b.name} is listed twice")
        out.append(b)
    if not out:
        raise ValueError("no buckets given")
    return out


def aspect_distortion(width: int, height: int, bucket: Bucket) -> float:
    """How much the no-crop resize stretches the image: max ratio of the two aspect ratios, minus 1 (0 = exact)."""
    r = (width / height) / bucket.aspect
    return max(r, 1 / r) - 1


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    # Compare in log space so that 2:1 and 1:2 are equally far from 1:1; ties go to the larger bucket.
    la = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - la), -b.width * b.height))


def upscale_factor(width: int, height: int, bucket: Bucket) -> float:
    """The largest per-side enlargement the resize needs (>1 means the image is blown up)."""
    return max(bucket.width / width, bucket.height / height)
