"""Where a model comes from: a local folder, or a Hugging Face hub id that is cached or can be downloaded.

Checked before any library loads the model: otherwise a missing model ends, after up to a minute of
network retries, in a long library traceback whose last line does not name refgen's flag or the way out.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# What the Hub accepts as a repo id: "name" or "namespace/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# One metadata request, not a download: enough to tell "offline" from "no such model".
PROBE_TIMEOUT_S = 10.0


class ModelNotFoundError(FileNotFoundError):
    """A model argument that is neither a local folder nor a hub id we can get."""


def _offline() -> bool:
    from huggingface_hub import constants

    env = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
              for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or env


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def in_local_cache(repo_id: str) -> bool:
    """True when the local Hugging Face cache holds a snapshot of `repo_id` (no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, cache_dir=hub_cache_dir(), local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError):
        return False
    return True


def require_model(model: str | os.PathLike, what: str = "model") -> str:
    """`model` as given, once it is known to be loadable: a folder, a cached hub id, or a hub id the Hub has.

    Raises ModelNotFoundError with one line that names the model, says where it was looked for and how to get
    it. A hub id that is not cached is checked with one metadata request (the download itself is left to the
    library that loads it)."""
    s = str(model)
    p = Path(s).expanduser()
    if p.is_dir():
        return s
    if p.exists():
        raise ModelNotFoundError(f"{what} {s!r} is a file; a model is a folder (from_pretrained layout) or a "
                                 f"Hugging Face hub id")
    head = (f"{what} {s!r} is neither a local folder nor in the local Hugging Face cache "
            f"({hub_cache_dir()})")
    if not _HUB_ID.match(s):
        raise ModelNotFoundError(f"{head}, and it is not a hub id (namespace/name) either: check the path")
    if in_local_cache(s):
        return s
    get = f"get it with `hf download {s}` (needs access to the Hub; it goes into that cache) or pass a local folder"
    if _offline():
        raise ModelNotFoundError(f"{head}, and downloads are off (HF_HUB_OFFLINE): {get}")
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi(endpoint=constants.ENDPOINT).model_info(s, timeout=PROBE_TIMEOUT_S)
    except GatedRepoError:
        return s   # exists; the download will ask for the token it needs
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{head}, and {constants.ENDPOINT} has no such model (a private or gated one "
                                 f"needs `hf auth login`): check the id or pass a local folder") from None
    except Exception as e:  # connection refused, DNS failure, timeout, proxy errors: all mean "cannot download"
        raise ModelNotFoundError(f"{head}, and {constants.ENDPOINT} cannot be reached ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else 'no detail'}): {get}") from None
    return s
