"""Reading images and scanning identity folders. Never crashes on a bad file; every skipped file has a reason.

`load_rgb` is refgen's one image loader (identity features, inversion, references, DiT shards). Every PIL mode
becomes 8-bit RGB the same way:

    RGB, L, 1, P, YCbCr, HSV, LAB    PIL's own conversion
    I;16 (16-bit greyscale)          v * 255 / 65535, rounded (PIL alone clips it to 255: an almost white image)
    I (32-bit integer, TIFF)         as 16-bit when every value is in 0..65535, else refused
    F (32-bit float)                 refused: the file does not say what range its values have
    16-bit RGB / RGBA PNG            PIL decodes the high byte of each sample (v // 256, within 1 of v / 257)
    CMYK                             R = (255 - C)(255 - K) / 255 (an embedded ICC profile is not applied)
    RGBA, LA, PA, RGBa, La, and      composited over WHITE: a transparent pixel's colour is arbitrary (often
    P / L / RGB / I;16 with a        black), white is what a page shows behind it
    transparent colour (tRNS)

EXIF orientation is applied. Embedded ICC profiles are not: RGB values are used as stored (read as sRGB).
Images above MAX_PIXELS are refused with refgen's own message (not PIL's decompression-bomb warning).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MIN_IMAGES = 2
# Every consumer resizes to at most a few megapixels; 150 MP still takes a 200 MP phone's binned output and
# stays below PIL's own hard stop (2 x Image.MAX_IMAGE_PIXELS = 179 MP), so one rule decides and one message says it.
MAX_PIXELS = 150_000_000
BACKGROUND = (255, 255, 255)

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# warnings.catch_warnings swaps a process-wide filter list: two threads (prepare decodes on a pool) must not
# interleave their save/restore, or a filter is lost or left behind.
_WARN_LOCK = threading.Lock()


class ImageReadError(ValueError):
    """A file that is not an image refgen can use; the message names the file and the reason."""


def is_image_name(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _too_large(path: Path, size: tuple[int, int] | None) -> ImageReadError:
    what = f"{size[0]}x{size[1]} px ({size[0] * size[1] / 1e6:.1f} MP) is " if size else "is "
    return ImageReadError(f"{path}: {what}more than refgen's limit of {MAX_PIXELS / 1e6:g} megapixels "
                          f"(refgen.images.MAX_PIXELS); downscale it")


@contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """`Image.open` under refgen's pixel limit: PIL's decompression-bomb warning is replaced by refgen's check."""
    path = Path(path)
    with _WARN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError:
            raise _too_large(path, None) from None
    with im:
        if im.width * im.height > MAX_PIXELS:
            raise _too_large(path, im.size)
        yield im


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as displayed (after EXIF rotation), from the header; verify() catches most corrupt files."""
    with open_image(path) as im:
        im.verify()  # must come straight after open, and leaves the file unusable: reopen for size and EXIF
    with open_image(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _transparent_mask(a: np.ndarray, key) -> np.ndarray:
    """Pixels equal to the tRNS colour key (a scalar for grey, a tuple for RGB)."""
    if a.ndim == 2:
        return a == key
    return np.all(a == np.asarray(key).reshape(1, 1, -1), axis=-1)


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> Image.Image:
    """uint8 (H, W, 3) over BACKGROUND with uint8 alpha (H, W), rounded to nearest."""
    a = alpha.astype(np.uint32)[..., None]
    bg = np.asarray(BACKGROUND, dtype=np.uint32).reshape(1, 1, 3)
    out = (rgb.astype(np.uint32) * a + bg * (255 - a) + 127) // 255
    return Image.fromarray(out.astype(np.uint8), "RGB")


def to_rgb(im: Image.Image, name: str = "image") -> Image.Image:
    """Any PIL mode -> 8-bit RGB by the rules in the module docstring. `name` goes into error messages."""
    mode = im.mode
    trns = im.info.get("transparency")
    if mode in _SIXTEEN_BIT or mode == "I":
        a = np.asarray(im).astype(np.int64)
        if mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageReadError(f"{name}: 32-bit integer pixels in {a.min()}..{a.max()}, outside the 16-bit range "
                                 f"refgen reads; save it as 8- or 16-bit")
        grey = ((a * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        if isinstance(trns, int):
            return _composite(rgb, np.where(_transparent_mask(a, trns), 0, 255))
        return Image.fromarray(rgb, "RGB")
    if mode == "F":
        raise ImageReadError(f"{name}: 32-bit float pixels have no defined range; save it as 8- or 16-bit")
    if mode == "CMYK":
        c = np.asarray(im).astype(np.uint32)
        k = 255 - c[..., 3:4]
        rgb = ((255 - c[..., :3]) * k + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    if mode in ("RGB", "L") and isinstance(trns, (int, tuple)):
        a = np.asarray(im)
        if np.max(trns) > 255:  # a 16-bit PNG's key; PIL kept each sample's high byte, so compare those
            trns = tuple(v >> 8 for v in trns) if isinstance(trns, tuple) else trns >> 8
        rgb = np.asarray(im.convert("RGB"))
        return _composite(rgb, np.where(_transparent_mask(a, trns), 0, 255))
    if mode in _ALPHA_MODES or (mode == "P" and trns is not None):
        rgba = np.asarray(im.convert("LA").convert("RGBA") if mode == "La" else im.convert("RGBA"))
        return _composite(rgba[..., :3], rgba[..., 3])
    return im.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode fully (a truncated file fails here, named), apply EXIF rotation, convert to 8-bit RGB (`to_rgb`)."""
    path = Path(path)
    try:
        with open_image(path) as im:
            im.load()
            return to_rgb(ImageOps.exif_transpose(im), str(path))
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: unreadable or corrupt ({type(e).__name__}: {e})") from e


def check_image(path: Path) -> str | None:
    """None if `load_rgb` can use the file, else the reason. verify() checks what a plain decode does not (PNG
    chunk CRCs), the full decode what verify() does not (truncated data)."""
    try:
        with open_image(path) as im:
            im.verify()
        im = load_rgb(path)
        if im.width < 1 or im.height < 1:
            return "empty image"
    except ImageReadError as e:
        return str(e).removeprefix(f"{path}: ")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"unreadable or corrupt ({type(e).__name__}: {e})"
    return None


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if is_image_name(p))


@dataclass
class Identity:
    id: str  # folder name, e.g. seed_123
    path: Path
    images: list[Path]


@dataclass
class ScanResult:
    identities: list[Identity] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {folder, reason, bad_files}
    ignored: list[str] = field(default_factory=list)   # entries of ROOT that are not seed_* folders

    def to_json(self) -> dict:
        return {"identities": [{"id": i.id, "path": str(i.path), "images": [str(p) for p in i.images]}
                               for i in self.identities],
                "skipped": self.skipped, "ignored": self.ignored}


def scan_identity(folder: Path) -> tuple[Identity | None, dict | None]:
    good, bad = [], []
    for p in image_files(folder):
        reason = check_image(p)
        (bad.append({"file": str(p), "reason": reason}) if reason else good.append(p))
    if len(good) < MIN_IMAGES:
        why = f"too few readable images: {len(good)} (need >= {MIN_IMAGES})"
        return None, {"folder": str(folder), "reason": why, "bad_files": bad}
    ident = Identity(folder.name, folder, good)
    return ident, ({"folder": str(folder), "reason": "some files unreadable (identity kept)", "bad_files": bad}
                   if bad else None)


def scan(root: str | Path) -> ScanResult:
    """Every `seed_*` folder under ROOT with >= 2 readable images; every skipped folder with its reason; the
    names of other entries (not `seed_*` folders), which are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"identity root is not a folder: {root}")
    res = ScanResult()
    for entry in sorted(root.iterdir()):
        if not (entry.is_dir() and entry.name.startswith("seed_")):
            if not entry.name.startswith("."):
                res.ignored.append(entry.name + ("/" if entry.is_dir() else ""))
            continue
        ident, note = scan_identity(entry)
        if ident:
            res.identities.append(ident)
        if note:
            res.skipped.append(note) if ident is None else res.skipped.append({**note, "kept": True})
    return res


def no_identities_message(res: ScanResult, root: str | Path, limit: int = 4) -> str:
    """One line: why ROOT has no usable identity (what was skipped and why, what was ignored, what to do)."""
    root = Path(root)
    parts = []
    skipped = [s for s in res.skipped if not s.get("kept")]
    if skipped:
        def one(s):
            bad = s["bad_files"]
            extra = ("; unreadable: " + ", ".join(f"{Path(b['file']).name} ({b['reason']})" for b in bad[:2])
                     + (f" and {len(bad) - 2} more" if len(bad) > 2 else "")) if bad else ""
            return f"{Path(s['folder']).name}: {s['reason']}{extra}"
        parts.append(f"{len(skipped)} seed_* folder(s) skipped (" + "; ".join(one(s) for s in skipped[:limit])
                     + (f"; and {len(skipped) - limit} more" if len(skipped) > limit else "") + ")")
    else:
        parts.append("no seed_* folder")
    dirs = [n for n in res.ignored if n.endswith("/")]
    if dirs:
        parts.append(f"{len(dirs)} folder(s) ignored because their names do not start with 'seed_' ("
                     + ", ".join(dirs[:limit]) + (", ..." if len(dirs) > limit else "") + ")")
    if any(is_image_name(root / n) for n in res.ignored):
        parts.append("ROOT itself holds images: pass the folder above it, whose seed_* folders hold the images")
    return (f"no usable identity under {root}: " + "; ".join(parts) + f". An identity is a folder seed_<id>/ "
            f"with >= {MIN_IMAGES} readable images (`refgen scan {root}` lists them)")


def resolve_refs(ref: str | Path | list) -> list[Path]:
    """A --ref: a folder (every image in it) or image files. A file that cannot be read is an error naming it,
    also inside a folder: a reference set with a silently missing photo is a different person's features."""
    items = [Path(r) for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
    out: list[Path] = []
    for item in items:
        if item.is_dir():
            files = image_files(item)
            if not files:
                raise ValueError(f"reference folder {item} has no readable image (no {'/'.join(sorted(IMAGE_SUFFIXES))} "
                                 f"file in it)")
            for p in files:
                reason = check_image(p)
                if reason:
                    raise ValueError(f"reference image {p} (in --ref folder {item}): {reason}; remove or replace it")
            out += files
        elif item.is_file():
            reason = check_image(item)
            if reason:
                raise ValueError(f"reference image {item}: {reason}")
            out.append(item)
        else:
            raise FileNotFoundError(f"reference not found: {item}")
    return out


def center_crop_resize(im: Image.Image, width: int, height: int) -> Image.Image:
    """Centre crop to the target aspect, then resize (how identity photos are prepared for the VAE)."""
    W, H = im.size
    target = width / height
    if W / H > target:
        nw = round(H * target)
        im = im.crop(((W - nw) // 2, 0, (W - nw) // 2 + nw, H))
    elif W / H < target:
        nh = round(W / target)
        im = im.crop((0, (H - nh) // 2, W, (H - nh) // 2 + nh))
    return im.resize((width, height), Image.BICUBIC)
