"""Writing artifacts so nothing is lost: atomic writes, provenance beside every artifact, JSONL metrics."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

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


class ArtifactWriteError(OSError):
    """Writing an artifact failed (disk full, permissions, ...). The message names the file and the cause; the
    file at that path is as it was before (atomic writes) or ends at its last complete record (JSONL)."""

    def __init__(self, path: str | Path, cause: OSError, kept: str = "nothing was replaced or left half-written"):
        why = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(cause.errno, f"cannot write {path}: {why}" + (f" [Errno {cause.errno}]" if cause.errno
                                                                         else "") + f"; {kept}")
        self.path, self.cause = Path(path), cause

    def __str__(self) -> str:
        return self.strerror


# Every artifact byte goes through this one call: the place where the disk says "no space left".
_os_write = os.write


class _Sink(io.RawIOBase):
    """Unbuffered writes to one fd through `_os_write`, remembering the first OSError: torch.save reports a failed
    write as "RuntimeError: [enforce fail at inline_container.cc...]" and the errno is lost unless kept here."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd, self.error = fd, None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            return _os_write(self.fd, b)
        except OSError as e:
            self.error = self.error or e
            raise

    def seek(self, pos: int, whence: int = 0) -> int:
        return os.lseek(self.fd, pos, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def fileno(self) -> int:
        # PIL writes straight to a file descriptor when it can get one, which would bypass `write`.
        raise io.UnsupportedOperation("fileno")


def atomic_write_file(path: str | Path, fill: Callable[[BinaryIO], None]) -> None:
    """Write PATH atomically: `fill(f)` writes bytes to a temp file in the same folder, which then replaces PATH
    (readers see the old file or the new one, never half of one). Any failure removes the temp file; an OS
    failure of the write itself (ENOSPC, EACCES, EIO ...) becomes ArtifactWriteError naming PATH and the cause."""
    path = Path(path)
    tmp, sink, filling = None, None, False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactWriteError(path, e, f"its folder {path.parent} cannot be created") from e
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            sink, filling = _Sink(fd), True
            with io.BufferedWriter(sink, buffer_size=1 << 20) as f:
                fill(f)
            filling = False
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files owner-only; artifacts read like any file
        os.replace(tmp, path)  # atomic on POSIX
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        # an OSError that `fill` raises itself (reading some input) is not a write failure: only the sink's
        # errors and those of mkstemp / chmod / replace are
        cause = sink.error if sink is not None and sink.error is not None else None
        if cause is None and not filling and isinstance(e, OSError) and e.errno is not None:
            cause = e
        if cause is not None:
            raise ArtifactWriteError(path, cause) from e
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write_file(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    # serialised before the file is touched: an object json cannot encode leaves nothing behind
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write_file(path, lambda f: torch.save(obj, f))


def atomic_save_image(image, path: str | Path) -> None:
    fmt = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    atomic_write_file(path, lambda f: image.save(f, format=fmt))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class JsonlLogger:
    """Append-only metrics, one JSON object per line, written per record so a killed job keeps them. A record
    that cannot be written completely is cut off again: the file always ends with a whole line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArtifactWriteError(self.path.parent, e, "nothing was written") from e

    def log(self, **record) -> None:
        data = memoryview((json.dumps(record, default=_json_default) + "\n").encode())
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise ArtifactWriteError(self.path, e, "nothing was written") from e
        try:
            start = os.fstat(fd).st_size
            while data:
                data = data[_os_write(fd, data):]
        except OSError as e:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise ArtifactWriteError(self.path, e, "the record was not added (earlier lines are intact)") from e
        finally:
            os.close(fd)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def drop_metrics_after(path: str | Path, step: int) -> None:
    """Keep the JSONL lines of steps <= `step` (rewritten atomically): a run resumed from a checkpoint at `step`
    replays the later steps, and its log keeps each step once."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))
