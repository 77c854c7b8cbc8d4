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
