import json
import os
import stat

from refgen.artifacts import JsonlLogger, atomic_write_json, provenance, read_jsonl


def test_atomic_write_replaces_whole_file_with_normal_permissions(tmp_path):
    f = tmp_path / "a" / "x.json"
    atomic_write_json(f, {"v": 1})
    atomic_write_json(f, {"v": 2})
    assert json.loads(f.read_text()) == {"v": 2}
    assert [p.name for p in f.parent.iterdir()] == ["x.json"]  # no temp files left behind
    mode = stat.S_IMODE(os.stat(f).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_provenance_and_jsonl(tmp_path):
    p = provenance({"a": 1}, kind="k")
    assert p["config"] == {"a": 1} and p["kind"] == "k" and "torch" in p["versions"] and "created" in p
    log = JsonlLogger(tmp_path / "m.jsonl")
    log.log(step=1, loss=0.5)
    log.log(step=2, loss=0.25)
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl")] == [1, 2]


# --------------------------------------------------------------------------- disk full at the write layer

import errno

import numpy as np
import pytest
import torch
from PIL import Image

import refgen.artifacts as artifacts
from refgen.artifacts import (ArtifactWriteError, atomic_save_image, atomic_save_safetensors, atomic_torch_save,
                              atomic_write_text)


@pytest.fixture
def disk_full_after(monkeypatch):
    """Every artifact byte goes through artifacts._os_write; past `n` bytes the writes go to /dev/full, where the
    kernel itself answers ENOSPC (a raised OSError(ENOSPC) where there is no /dev/full)."""
    state = {"left": None}

    def write(fd, data):
        if state["left"] is None or state["left"] >= len(data):
            if state["left"] is not None:
                state["left"] -= len(data)
            return os.write(fd, data)
        if state["left"] > 0:
            n = os.write(fd, bytes(data[:state["left"]]))
            state["left"] -= n
            return n
        if os.path.exists("/dev/full"):
            full = os.open("/dev/full", os.O_WRONLY)
            try:
                return os.write(full, data)
            finally:
                os.close(full)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(artifacts, "_os_write", write)

    def arm(n):
        state["left"] = n
    return arm


WRITERS = {
    "json": lambda p: atomic_write_json(p, {"v": list(range(5000))}),
    "text": lambda p: atomic_write_text(p, "x" * 100_000),
    "torch": lambda p: atomic_torch_save({"w": torch.randn(64, 1024)}, p),
    "image": lambda p: atomic_save_image(Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3),
                                                                                            np.uint8)), p),
    "safetensors": lambda p: atomic_save_safetensors({"r": torch.randn(64, 1024)}, p, {"k": "v"}),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
@pytest.mark.parametrize("after", [0, 3000])
def test_disk_full_names_the_file_and_the_cause_and_keeps_the_old_file(tmp_path, disk_full_after, kind, after):
    path = tmp_path / f"artifact.{ {'image': 'png', 'torch': 'pt'}.get(kind, kind)}"
    path.write_bytes(b"previous version")
    disk_full_after(after)
    with pytest.raises(ArtifactWriteError) as e:
        WRITERS[kind](path)
    msg = str(e.value)
    assert msg.startswith(f"cannot write {path}: No space left on device [Errno 28]") and "\n" not in msg, msg
    assert e.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"previous version"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]          # no temp file left
    disk_full_after(None)
    WRITERS[kind](path)                                                          # space again: the write succeeds
    assert path.stat().st_size > 1000


def test_disk_full_mid_record_leaves_whole_jsonl_lines(tmp_path, disk_full_after):
    log = JsonlLogger(tmp_path / "m.jsonl")
    log.log(step=1, loss=0.5)
    disk_full_after(10)                                                          # half of the next line fits
    with pytest.raises(ArtifactWriteError, match=r"m\.jsonl: No space left on device.*earlier lines are intact"):
        log.log(step=2, loss=0.25, note="x" * 100)
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 1, "loss": 0.5}]
    disk_full_after(None)
    log.log(step=3)
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl")] == [1, 3]


def test_other_os_failures_name_the_path(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ArtifactWriteError, match=r"cannot write .*file/x\.json: File exists .*its folder .*file cannot be created"):
        atomic_write_json(tmp_path / "file" / "x.json", {})


def test_render_on_a_full_disk_is_one_line_and_exit_1(tmp_path, tiny_models, disk_full_after, capsys):
    from refgen.cli import main

    disk_full_after(0)
    argv = ["render", "--model", tiny_models["qwen_image"], "--prompt", "a photo", "--alphas", "1", "--seeds", "0",
            "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--dtype", "fp32",
            "--out", str(tmp_path / "grid")]
    assert main(argv) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]   # above it: the loaders' progress bars
    assert last.startswith(f"refgen render: error: cannot write {tmp_path / 'grid' / 'images'}") and \
        "No space left on device [Errno 28]; nothing was replaced or left half-written" in last, last
    assert not any(p.is_file() for p in (tmp_path / "grid").rglob("*"))


def test_an_os_error_of_the_writer_itself_is_not_called_a_write_failure(tmp_path):
    def fill(f):
        f.write(b"partial")
        open(tmp_path / "missing-input.bin", "rb")    # the writer failing to read its own input

    with pytest.raises(FileNotFoundError, match="missing-input.bin") as e:
        artifacts.atomic_write_file(tmp_path / "out.bin", fill)
    assert not isinstance(e.value, ArtifactWriteError)
    assert list(tmp_path.iterdir()) == []


def test_drop_metrics_after_keeps_each_step_once(tmp_path):
    from refgen.artifacts import drop_metrics_after

    f = tmp_path / "m.jsonl"
    f.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)))
    drop_metrics_after(f, 4)  # a run resumed from step 4's checkpoint replays 5..7
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [1, 2, 3, 4]
    before = f.stat().st_mtime_ns
    drop_metrics_after(f, 9)  # nothing after 9: the file is left as it is
    assert f.stat().st_mtime_ns == before
    drop_metrics_after(tmp_path / "none.jsonl", 1)  # no log yet: nothing to do
    assert not (tmp_path / "none.jsonl").exists()
