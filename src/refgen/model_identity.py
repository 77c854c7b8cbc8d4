"""What identifies a `from_pretrained` model across spellings and machines: where it is (a resolved local folder
or a hub id) and a fingerprint of its config.

Two spellings of one folder (`./tiny/qwen3-vl`, its absolute path) are one model; two folders, or a folder and
a hub id, are two, even with equal configs (equal configs do not mean equal weights). A folder shipped inside the
refgen package (the toy models in `assets/`) is named by its place in the package, `refgen:assets/...`, as a hub
model is by its id: the same model wherever refgen is installed, so a toy head trained on one machine fits
another. The fingerprint catches the other direction: the same folder or hub id now holding another
architecture. Nothing here loads weights or touches the network: a hub id is looked up in the local Hugging Face
cache only (one that a loader is about to download can be identified by location now and fingerprinted once it
is there).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from refgen.hub import _HUB_ID, ModelNotFoundError
# Keys that describe the writer of config.json, not the model: a re-save by a newer library changes only these.
_WRITER_KEYS = {"transformers_version", "_name_or_path", "_commit_hash", "_diffusers_version"}


@dataclass(frozen=True)
class ModelIdentity:
    location: str       # resolved absolute folder, "hub:<id>", or "refgen:assets/..." (shipped in the package)
    config_sha256: str | None  # of config.json without the writer's keys, canonical JSON; None: not downloaded yet

    def describe(self) -> str:
        return f"{self.location} (config {(self.config_sha256 or 'not downloaded yet')[:12]})"


def config_fingerprint(config_file: str | Path) -> str:
    cfg = json.loads(Path(config_file).read_text())
    cfg = {k: v for k, v in cfg.items() if k not in _WRITER_KEYS}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def identify_model(model: str, what: str = "model", *, allow_download: bool = False) -> ModelIdentity:
    """The identity of `model` (a folder or a hub id). ModelNotFoundError, naming `what` and `model`, when it is
    neither an existing folder with a config.json nor a hub id in the local cache; with `allow_download`, a hub
    id that is not cached yet is identified by its id alone (config_sha256 None) for the loader to fetch."""
    s = str(model)
    p = Path(s).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise ModelNotFoundError(f"{what} {s!r}: no config.json in that folder (not a from_pretrained model)")
        where = p.resolve()
        package = Path(__file__).resolve().parent
        if where.is_relative_to(package / "assets"):
            return ModelIdentity(f"refgen:{where.relative_to(package).as_posix()}", config_fingerprint(cfg))
        return ModelIdentity(str(where), config_fingerprint(cfg))
    looks_like_path = p.is_absolute() or s.startswith((".", "~")) or not _HUB_ID.match(s)
    if looks_like_path:
        raise ModelNotFoundError(f"{what} {s!r} not found: no such folder ({p.resolve()})")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(s, "config.json")
    if not isinstance(cached, str):
        if allow_download:
            return ModelIdentity(f"hub:{s}", None)
        raise ModelNotFoundError(f"{what} {s!r} not found: neither a local folder nor a hub id in the local Hugging "
                                f"Face cache")
    return ModelIdentity(f"hub:{s}", config_fingerprint(cached))
