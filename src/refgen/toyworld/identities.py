"""`refgen toyworld make-identities OUT --n 50`: reference photos of toy-world people.

Layout (the one the identity commands consume):

    OUT/seed_<id>/img_0.png ... img_<k-1>.png     3-5 photos of one person, alone, 64x64 by default
    OUT/seed_<id>/pair_0.png ...                    with pair_images > 0: the person beside someone else
    OUT/seed_<id>/identity.json                    attributes, per-image scene + captions, provenance
    OUT/seed_<id>/prompts.json                     each photo's own prompt, the person as ~ID~

`<id>` is the identity's integer seed: `world.identity_from_seed(id)` gives its attributes, so the
folder name alone pins the person. Ids are `seed, seed+1, ..., seed+n-1`.

Each folder is written into a hidden temporary folder and renamed into place, so a folder that
exists is complete; a re-run skips complete folders (idempotent) and rebuilds anything else.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from refgen.artifacts import atomic_save_image, atomic_write_json, provenance
from refgen.toyworld import world

PLACEHOLDER = "~ID~"


@dataclass(frozen=True)
class IdentitySetConfig:
    n: int = 50
    seed: int = 0
    size: int = 64
    min_images: int = 3
    max_images: int = 5
    # Photos of the person beside a random other person (left or right), captioned with the other as "a person"
    # in one of the pair phrasings: identities fitted on one-person photos alone take over two-person prompts.
    pair_images: int = 0

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.size < world.MIN_SIZE or self.size % 16:
            raise ValueError(f"size must be a multiple of 16 and >= {world.MIN_SIZE}, got {self.size}")
        if not 1 <= self.min_images <= self.max_images:
            raise ValueError(f"need 1 <= min_images <= max_images, got {self.min_images}, {self.max_images}")
        if self.pair_images < 0:
            raise ValueError(f"pair_images must be >= 0, got {self.pair_images}")


PROMPTS_FILE = "prompts.json"  # {image file name: prompt with one ~ID~}; refgen.identity.invert reads it


def identity_record(ident_id: int, cfg: IdentitySetConfig) -> tuple[dict, list]:
    """(identity.json content without provenance, [PIL images]) for one id; pure function of (id, cfg)."""
    ident = world.identity_from_seed(ident_id)
    rng = random.Random(world.derive_seed("identity-photos", ident_id))
    k = rng.randint(cfg.min_images, cfg.max_images)
    backgrounds = rng.sample(world.SCENES, min(k, len(world.SCENES)))  # different scenes per photo
    images, entries = [], []
    for i in range(k):
        scene = world.sample_scene(rng, [ident], background=backgrounds[i % len(backgrounds)])
        where = rng.choice(world.SCENE_PHRASES[scene.background])
        images.append(world.render(scene, cfg.size))
        entries.append({
            "file": f"img_{i}.png",
            "caption": world.caption(scene, rng, p_bare=0.0),
            "prompt": f"A photo of {PLACEHOLDER} {where}.",
            "scene": scene.to_dict(),
        })
    # its own generator: the one-person photos are the same with or without pair photos
    prng = random.Random(world.derive_seed("identity-pair-photos", ident_id))
    for i in range(cfg.pair_images):
        other = world.sample_identity(prng)
        left = prng.random() < 0.5
        scene = world.sample_scene(prng, [ident, other] if left else [other, ident])
        where = prng.choice(world.SCENE_PHRASES[scene.background])
        a, b = (PLACEHOLDER, "a person") if left else ("a person", PLACEHOLDER)
        body = prng.choice(world.PAIR_FORMS).format(a=a, b=b, where=where)
        images.append(world.render(scene, cfg.size))
        entries.append({"file": f"pair_{i}.png", "caption": world.caption(scene, prng, p_bare=0.0),
                        "prompt": body[0].upper() + body[1:] + ".", "scene": scene.to_dict(),
                        "side": "left" if left else "right"})
    rec = {"id": ident_id, "name": f"seed_{ident_id}", "attributes": ident.to_dict(),
           "description": world.full_description(ident),
           "size": cfg.size, "images": entries}
    return rec, images


def is_complete(folder: Path, cfg: IdentitySetConfig | None = None) -> bool:
    """Every file there, and (with `cfg`) made with the same photo settings: a folder from other settings is
    rebuilt, not passed off as these."""
    import json

    meta = folder / "identity.json"
    if not meta.is_file():
        return False
    try:
        rec = json.loads(meta.read_text())
        if cfg is not None:
            made = rec["provenance"]["config"]
            if any(made.get(k, 0 if k == "pair_images" else None) != getattr(cfg, k) for k in _PHOTO_KEYS):
                return False
        return all((folder / e["file"]).is_file() for e in rec["images"]) and (folder / PROMPTS_FILE).is_file()
    except (ValueError, KeyError, TypeError):
        return False


_PHOTO_KEYS = ("size", "min_images", "max_images", "pair_images")  # what a folder's photos depend on besides its id


def make_identities(out: str | Path, n: int = 50, seed: int = 0, *, size: int = 64, min_images: int = 3,
                    max_images: int = 5, pair_images: int = 0, progress: bool = True) -> list[Path]:
    """Write n identity folders under `out`; returns their paths (complete ones made with the same settings are
    skipped, others rebuilt)."""
    cfg = IdentitySetConfig(n=n, seed=seed, size=size, min_images=min_images, max_images=max_images,
                            pair_images=pair_images)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = range(cfg.seed, cfg.seed + cfg.n)
    if progress:
        from tqdm.auto import tqdm

        ids = tqdm(ids, desc="identities")
    folders = []
    for i in ids:
        final = out / f"seed_{i}"
        folders.append(final)
        if is_complete(final, cfg):
            continue
        rec, images = identity_record(i, cfg)
        tmp = Path(tempfile.mkdtemp(prefix=f".seed_{i}.", suffix=".tmp", dir=out))
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the final folder should read like any other
        try:
            for e, im in zip(rec["images"], images):
                atomic_save_image(im, tmp / e["file"])
            atomic_write_json(tmp / "identity.json", {**rec, "provenance": provenance(asdict(cfg))})
            # what `refgen invert` reads with image_prompts: each photo's own sentence, the person as ~ID~
            atomic_write_json(tmp / PROMPTS_FILE, {e["file"]: e["prompt"] for e in rec["images"]})
            if final.exists():  # an incomplete folder from an older/killed run: replaced, not merged
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folders
