import json

import pytest
from PIL import Image

from refgen.cli import main
from refgen.images import resolve_refs, scan


def _img(path, color=(200, 10, 10)):
    Image.new("RGB", (16, 12), color).save(path)


def test_scan_reports_good_and_bad_folders(tmp_path, capsys):
    good = tmp_path / "seed_1"
    good.mkdir()
    _img(good / "a.PNG")
    _img(good / "weird name.JpEg")
    (good / "notes.txt").write_text("not an image")
    few = tmp_path / "seed_2"
    few.mkdir()
    _img(few / "only.png")
    corrupt = tmp_path / "seed_3"
    corrupt.mkdir()
    _img(corrupt / "x.webp")
    _img(corrupt / "y.bmp")
    (corrupt / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    data = (corrupt / "x.webp").read_bytes()
    (corrupt / "truncated.png").write_bytes(open(good / "a.PNG", "rb").read()[:40])
    broken = tmp_path / "seed_4"
    broken.mkdir()
    _img(broken / "ok.png")
    (broken / "bad.png").write_bytes(b"nope")
    (tmp_path / "other").mkdir()
    assert data

    res = scan(tmp_path)
    assert [i.id for i in res.identities] == ["seed_1", "seed_3"]
    assert len(res.identities[0].images) == 2 and len(res.identities[1].images) == 2
    by = {s["folder"].split("/")[-1]: s for s in res.skipped}
    assert "too few" in by["seed_2"]["reason"]
    assert "too few" in by["seed_4"]["reason"] and by["seed_4"]["bad_files"][0]["file"].endswith("bad.png")
    bad3 = sorted(b["file"].split("/")[-1] for b in by["seed_3"]["bad_files"])
    assert bad3 == ["broken.jpg", "truncated.png"] and by["seed_3"]["kept"]

    assert main(["scan", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [i["id"] for i in out["identities"]] == ["seed_1", "seed_3"]
    assert main(["scan", str(tmp_path)]) == 0
    assert "2 identities, 2 folders skipped" in capsys.readouterr().out


def test_resolve_refs_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no readable image"):
        resolve_refs(empty)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        resolve_refs(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="bad.png"):
        resolve_refs([tmp_path / "bad.png"])
