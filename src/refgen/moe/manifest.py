"""The deployable artifact's manifest and byte budget: which files belong to an ONNX model, what they weigh, their
SHA-256, and the check that refuses a tampered or incomplete folder.

An ONNX model is more than its `.onnx` file: torch's dynamo exporter writes the weights to an external-data file
beside it (`model.onnx.data`), and the graph names it by a relative path. The budget (spec §3: <= 1,000,000 B)
counts every file the model needs, found by reading the graph's external-data references, never the graph file
alone.

This module imports no torch (the serving image has none): hashlib, json and onnx's protobuf reader only.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

MANIFEST = "manifest.json"
BUDGET_BYTES = 1_000_000
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


class BudgetError(ValueError):
    """The deployable artifact is over its byte budget (the message lists every file and its size)."""


class TamperedArtifactError(ValueError):
    """A file of an exported folder is missing, or its SHA-256 differs from the manifest's."""


def check_semver(version: str) -> str:
    if not SEMVER.match(str(version)):
        raise ValueError(f"version {version!r} is not SemVer (MAJOR.MINOR.PATCH[-pre][+build], e.g. 0.1.0)")
    return str(version)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def onnx_files(model: str | Path) -> list[Path]:
    """MODEL and every external-data file its initializers point to, in that order (the set a deployment must
    copy). Read without loading the weights."""
    import onnx

    model = Path(model)
    if not model.is_file():
        raise FileNotFoundError(f"{model} does not exist")
    proto = onnx.load(str(model), load_external_data=False)
    files = [model]
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:  # Constant nodes may hold external tensors too
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc is None:
                raise ValueError(f"{model}: tensor {t.name!r} is external but names no file")
            p = (model.parent / loc)
            if not p.is_file():
                raise FileNotFoundError(f"{model} needs its external-data file {p}, which does not exist")
            if p not in files:
                files.append(p)
    return files


def artifact_bytes(model: str | Path) -> dict:
    """{'files': {name: bytes}, 'total': bytes} of MODEL and its external data."""
    files = {p.name: p.stat().st_size for p in onnx_files(model)}
    return {"files": files, "total": sum(files.values())}


def check_budget(model: str | Path, budget: int = BUDGET_BYTES) -> dict:
    """artifact_bytes(MODEL), or BudgetError when all its files together exceed BUDGET bytes."""
    b = artifact_bytes(model)
    if b["total"] > budget:
        parts = " + ".join(f"{n} {s:,} B" for n, s in b["files"].items())
        raise BudgetError(f"{Path(model)}: deployable artifact is {b['total']:,} B ({parts}), over the budget of "
                          f"{budget:,} B")
    return b


def file_entries(folder: str | Path, names: list[str]) -> dict[str, dict]:
    folder = Path(folder)
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in sorted(names)}


def read_manifest(folder: str | Path) -> dict:
    p = Path(folder) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist: not a `refgen moe export` folder (or an unfinished one: the "
                                f"manifest is written last)")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise TamperedArtifactError(f"{p} is not valid JSON ({e})") from e
    if not isinstance(m.get("files"), dict) or not m["files"]:
        raise TamperedArtifactError(f"{p} lists no files")
    check_semver(m.get("version", ""))
    return m


def verify(folder: str | Path, model: str | None = None) -> dict:
    """Check every file the manifest lists (size, then SHA-256) and, for MODEL (a file name in FOLDER), that every
    file it needs is listed. Returns the manifest; raises TamperedArtifactError naming the first bad file."""
    folder = Path(folder)
    m = read_manifest(folder)
    for name, e in m["files"].items():
        p = folder / name
        if Path(name).name != name:
            raise TamperedArtifactError(f"{folder / MANIFEST}: file entry {name!r} is not a plain file name")
        if not p.is_file():
            raise TamperedArtifactError(f"{p} is listed in the manifest but missing")
        size = p.stat().st_size
        if size != e["bytes"]:
            raise TamperedArtifactError(f"{p}: {size:,} B, the manifest says {e['bytes']:,} B (modified?)")
        got = sha256_file(p)
        if got != e["sha256"]:
            raise TamperedArtifactError(f"{p}: SHA-256 {got[:16]}…, the manifest says {e['sha256'][:16]}… (modified)")
    if model is not None:
        if model not in m["files"]:
            raise TamperedArtifactError(f"{folder / model} is not listed in {folder / MANIFEST}")
        for p in onnx_files(folder / model):
            if p.name not in m["files"]:
                raise TamperedArtifactError(f"{p} (needed by {model}) is not listed in the manifest")
    return m
