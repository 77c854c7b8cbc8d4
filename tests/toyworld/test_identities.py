"""make-identities: the seed_<id>/ layout, attributes that match the id, idempotent re-runs."""

import json

import numpy as np
from PIL import Image

from refgen.toyworld import world
from refgen.cli import main as refgen_main
from refgen.toyworld.identities import make_identities


def test_layout_and_content(tmp_path):
    folders = make_identities(tmp_path, n=4, seed=10, progress=False)
    assert [f.name for f in folders] == ["seed_10", "seed_11", "seed_12", "seed_13"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed_10", "seed_11", "seed_12", "seed_13"]  # no temp left
    for f in folders:
        rec = json.loads((f / "identity.json").read_text())
        assert rec["attributes"] == world.identity_from_seed(int(f.name.split("_")[1])).to_dict()
        assert 3 <= len(rec["images"]) <= 5
        assert sorted(p.name for p in f.glob("*.png")) == sorted(e["file"] for e in rec["images"])
        for e in rec["images"]:
            im = Image.open(f / e["file"])
            assert im.size == (64, 64) and im.mode == "RGB"
            sc = world.Scene.from_dict(e["scene"])
            assert len(sc.people) == 1 and sc.people[0].identity.to_dict() == rec["attributes"]
            assert np.array_equal(np.asarray(im), np.asarray(world.render(sc)))  # the PNG is lossless
            assert "~ID~" in e["prompt"]
        assert "provenance" in rec and "git_commit" in rec["provenance"]


def test_idempotent_and_repairs_incomplete(tmp_path):
    make_identities(tmp_path, n=3, progress=False)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}
    make_identities(tmp_path, n=3, progress=False)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}
    assert before == after  # complete folders are skipped, not rewritten

    victim = tmp_path / "seed_1"
    img0 = (victim / "img_0.png").read_bytes()
    (victim / "img_0.png").unlink()  # a damaged folder is rebuilt, identically
    make_identities(tmp_path, n=3, progress=False)
    assert (victim / "img_0.png").read_bytes() == img0


def test_cli(tmp_path, capsys):
    assert refgen_main(["toyworld", "make-identities", str(tmp_path / "ids"), "--n", "2", "--seed", "5", "--quiet"]) == 0
    assert (tmp_path / "ids" / "seed_6" / "identity.json").is_file()
    assert "2 identities" in capsys.readouterr().out
