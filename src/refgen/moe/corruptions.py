"""Seven CIFAR-10-C-style corruptions with the CIFAR-10-C severity constants (Hendrycks & Dietterich's
make_cifar_c.py), computed locally on uint8 images [H, W, C].

Why own code: CIFAR-10-C itself cannot be loaded here, and the `imagecorruptions` packages use the ImageNet-C
constants (Gaussian noise sigma 0.08-0.38 instead of 0.04-0.10: a 32 px image would be destroyed) and draw from
numpy's global random state (not reproducible for impulse noise). Every function here takes an explicit
`numpy.random.Generator`, so the same seed gives a bit-identical corrupted set.

Deviations from make_cifar_c.py, on purpose:
  - motion_blur: the original calls ImageMagick (Wand). Here it is a one-sided Gaussian-weighted line kernel of
    the same radius / sigma at an angle ~ U(-45, 45) degrees, applied with scipy.ndimage.
  - defocus_blur's disk kernel is smoothed with a 3x3 Gaussian of sigma `alias_blur` written in numpy (the
    original uses cv2.GaussianBlur with the same 3x3 size); borders reflect as cv2's default does.
  - fog's plasma fractal is sized to the next power of two >= the image side and cropped, so 28 px grey images
    work too.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

CORRUPTIONS = ("gaussian_noise", "impulse_noise", "defocus_blur", "motion_blur", "fog", "contrast",
               "jpeg_compression")

# severity 1..5 -> parameters (the CIFAR-10-C constants)
SEVERITY = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "jpeg_compression": (80, 65, 58, 50, 40),
}


def _params(name: str, severity: int):
    if name not in SEVERITY:
        raise ValueError(f"unknown corruption {name!r}; known: {list(CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be 1..5, got {severity!r}")
    return SEVERITY[name][severity - 1]


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


def gaussian_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    f = x / 255.0
    return _to_u8(f + rng.normal(0.0, sigma, size=f.shape))


def impulse_noise(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper per element, half salt, as skimage.util.random_noise(mode='s&p') draws it."""
    f = x / 255.0
    flip = rng.random(f.shape) < amount
    salt = rng.random(f.shape) < 0.5
    f = np.where(flip & salt, 1.0, np.where(flip & ~salt, 0.0, f))
    return _to_u8(f)


def _gauss3(sigma: float) -> np.ndarray:
    g = np.exp(-np.arange(-1, 2) ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    L = np.arange(-8, 9) if radius <= 8 else np.arange(-int(radius), int(radius) + 1)
    X, Y = np.meshgrid(L, L)
    k = ((X ** 2 + Y ** 2) <= radius ** 2).astype(np.float64)
    k /= k.sum()
    from scipy.ndimage import convolve1d

    g = _gauss3(alias_blur)
    k = convolve1d(convolve1d(k, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")
    return k / k.sum()


def _filter(x: np.ndarray, kernel: np.ndarray, mode: str) -> np.ndarray:
    from scipy.ndimage import correlate

    f = x / 255.0
    return np.stack([correlate(f[..., c], kernel, mode=mode) for c in range(f.shape[-1])], axis=-1)


def defocus_blur(x: np.ndarray, p, rng: np.random.Generator) -> np.ndarray:
    radius, alias = p
    return _to_u8(_filter(x, disk_kernel(radius, alias), mode="mirror"))


def motion_kernel(radius: int, sigma: float, angle_deg: float) -> np.ndarray:
    """One-sided line kernel: Gaussian weights exp(-t^2 / 2 sigma^2) at t = 0..radius along `angle`, each
    point splatted bilinearly onto the grid."""
    size = 2 * radius + 1
    k = np.zeros((size, size))
    a = np.deg2rad(angle_deg)
    for t in range(radius + 1):
        w = np.exp(-t * t / (2 * sigma * sigma))
        px, py = radius + t * np.cos(a), radius - t * np.sin(a)
        x0, y0 = int(np.floor(px)), int(np.floor(py))
        fx, fy = px - x0, py - y0
        for dx, dy, ww in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy),
                           (1, 1, fx * fy)):
            if 0 <= y0 + dy < size and 0 <= x0 + dx < size:
                k[y0 + dy, x0 + dx] += w * ww
    return k / k.sum()


def motion_blur(x: np.ndarray, p, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = p
    angle = rng.uniform(-45, 45)
    return _to_u8(_filter(x, motion_kernel(int(radius), sigma, angle), mode="nearest"))


def plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map in [0, 1], as make_cifar_c.py draws it, from `rng`."""
    if mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two, got {mapsize}")
    m = np.empty((mapsize, mapsize))
    m[0, 0] = 0
    step, wibble = mapsize, 100.0

    def wibbled(a):
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        corners = m[0:mapsize:step, 0:mapsize:step]
        sq = corners + np.roll(corners, -1, axis=0)
        sq = sq + np.roll(sq, -1, axis=1)
        m[step // 2:mapsize:step, step // 2:mapsize:step] = wibbled(sq)
        dr = m[step // 2:mapsize:step, step // 2:mapsize:step]
        ul = m[0:mapsize:step, 0:mapsize:step]
        m[0:mapsize:step, step // 2:mapsize:step] = wibbled(dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1))
        m[step // 2:mapsize:step, 0:mapsize:step] = wibbled(dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0))
        step //= 2
        wibble /= wibbledecay
    m -= m.min()
    return m / m.max()


def fog(x: np.ndarray, p, rng: np.random.Generator) -> np.ndarray:
    strength, decay = p
    h, w = x.shape[:2]
    size = 1 << (max(h, w) - 1).bit_length()
    f = x / 255.0
    mx = f.max()
    f = f + strength * plasma_fractal(size, decay, rng)[:h, :w, None]
    return _to_u8(np.clip(f * mx / (mx + strength), 0, 1))


def contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    f = x / 255.0
    m = f.mean(axis=(0, 1), keepdims=True)
    return _to_u8((f - m) * c + m)


def jpeg_compression(x: np.ndarray, quality: int, rng: np.random.Generator) -> np.ndarray:
    grey = x.shape[-1] == 1
    img = Image.fromarray(x[..., 0] if grey else x)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    out = np.asarray(Image.open(buf))
    return out[..., None] if grey else out


_FUNCS = {"gaussian_noise": gaussian_noise, "impulse_noise": impulse_noise, "defocus_blur": defocus_blur,
          "motion_blur": motion_blur, "fog": fog, "contrast": contrast, "jpeg_compression": jpeg_compression}


def corrupt(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 image [H, W, C] (C = 1 or 3) corrupted; same image, parameters and generator state -> same
    bytes."""
    p = _params(name, severity)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (explicit, reproducible), got {type(rng).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected a uint8 image [H, W, 1|3], got {image.dtype} {image.shape}")
    return _FUNCS[name](image, p, rng)


def corrupt_set(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """All images [N, H, W, C] with one generator seeded by (seed, corruption, severity), in order: the whole
    set is a pure function of its arguments (check with data.sha256_array)."""
    _params(name, severity)
    rng = np.random.default_rng([seed, CORRUPTIONS.index(name), severity])
    return np.stack([corrupt(im, name, severity, rng) for im in images])
