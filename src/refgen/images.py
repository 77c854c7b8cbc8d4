"""Reading images and scanning identity folders (seed 000, phase 0.3). Never crashes on a bad file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MIN_IMAGES = 2


def is_image_name(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def check_image(path: Path) -> str | None:
    """None if the file decodes fully, else the reason. verify() alone misses truncated data, so we load."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
            if im.width < 1 or im.height < 1:
                return "empty image"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"unreadable or corrupt ({type(e).__name__}: {e})"
    return None


def load_rgb(path: str | Path) -> Image.Image:
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


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

    def to_json(self) -> dict:
        return {"identities": [{"id": i.id, "path": str(i.path), "images": [str(p) for p in i.images]}
                               for i in self.identities],
                "skipped": self.skipped}


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
    """Every `seed_*` folder under ROOT with >= 2 readable images; every skipped folder with its reason."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"identity root is not a folder: {root}")
    res = ScanResult()
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("seed_")):
        ident, note = scan_identity(folder)
        if ident:
            res.identities.append(ident)
        if note:
            res.skipped.append(note) if ident is None else res.skipped.append({**note, "kept": True})
    return res


def resolve_refs(ref: str | Path | list) -> list[Path]:
    """A --ref: a folder (all readable images in it) or image files. Errors name the culprit."""
    items = [Path(r) for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
    out: list[Path] = []
    for item in items:
        if item.is_dir():
            files = [p for p in image_files(item) if check_image(p) is None]
            if not files:
                raise ValueError(f"reference folder {item} has no readable image")
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
    """Centre crop to the target aspect, then resize (seed phase 2 preprocessing)."""
    W, H = im.size
    target = width / height
    if W / H > target:
        nw = round(H * target)
        im = im.crop(((W - nw) // 2, 0, (W - nw) // 2 + nw, H))
    elif W / H < target:
        nh = round(W / target)
        im = im.crop((0, (H - nh) // 2, W, (H - nh) // 2 + nh))
    return im.resize((width, height), Image.BICUBIC)
