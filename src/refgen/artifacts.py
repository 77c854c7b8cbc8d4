"""Writing artifacts so nothing is lost: atomic writes, provenance beside every artifact, JSONL metrics."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch


def git_commit() -> str | None:
    """The commit of the refgen checkout this code runs from (None for an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import refgen

    v = {"refgen": refgen.__version__, "torch": torch.__version__}
    for mod in ("diffusers", "transformers", "accelerate", "safetensors", "numpy"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return v


def provenance(config: Any = None, **extra) -> dict:
    """What every artifact's JSON carries: config, library versions, git commit, UTC time."""
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    d = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
         "git_commit": git_commit(), "versions": versions()}
    if config is not None:
        d["config"] = config
    d.update(extra)
    return d


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files owner-only; artifacts read like any file
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
    _atomic(Path(path), w)


def atomic_write_text(path: str | Path, text: str) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _atomic(Path(path), w)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_save_image(image, path: str | Path) -> None:
    fmt = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    _atomic(Path(path), lambda tmp: image.save(tmp, format=fmt))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    _atomic(Path(path), lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                              metadata=metadata))


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class JsonlLogger:
    """Append-only metrics, one JSON object per line, flushed per record so a killed job keeps them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
