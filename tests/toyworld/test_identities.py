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
    assert refgen_main(["toyworld", "make-identities", str(tmp_path / "k7"), "--n", "1", "--photos", "7", "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "k7" / "seed_0").glob("img_*.png")) == [f"img_{i}.png" for i in range(7)]


def test_pair_photos_put_the_person_beside_someone_and_say_where(tmp_path):
    solo = make_identities(tmp_path / "solo", n=2, seed=20, progress=False)
    pairs = make_identities(tmp_path / "pairs", n=2, seed=20, pair_images=3, progress=False)
    for s, p in zip(solo, pairs):
        rec = json.loads((p / "identity.json").read_text())
        prompts = json.loads((p / "prompts.json").read_text())
        solo_files = sorted(x.name for x in s.glob("img_*.png"))
        for f in solo_files:  # the one-person photos are the same with or without pair photos
            assert (s / f).read_bytes() == (p / f).read_bytes() and prompts[f] == json.loads(
                (s / "prompts.json").read_text())[f]
        pair = [e for e in rec["images"] if e["file"].startswith("pair_")]
        assert len(pair) == 3
        for e in pair:
            sc = world.Scene.from_dict(e["scene"])
            k = 0 if e["side"] == "left" else 1
            assert len(sc.people) == 2 and sc.people[k].identity.to_dict() == rec["attributes"]
            text = prompts[e["file"]].lower()
            assert text.count("~id~") == 1 and "a person" in text
            # the placeholder stands where the person is: the first-named person is the one on the left
            assert (text.index("~id~") < text.index("a person")) == (k == 0)
    # a folder made with other photo settings is rebuilt, not reused
    again = make_identities(tmp_path / "solo", n=2, seed=20, pair_images=3, progress=False)
    assert len(list(again[0].glob("pair_*.png"))) == 3
