"""`refgen demo` at smoke-test settings: the real pieces (identities, inversion, grids, two-person image,
recognizer) on the embedded toy model, on the CPU."""

import json
from pathlib import Path

import pytest

from refgen.cli import main
from refgen.toyworld.demo import DemoConfig


def test_demo_writes_pictures_and_reuses_finished_inversions(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--invert-steps", "3", "--render-steps", "2", "--refine-steps", "2", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rec = json.loads((out / "demo.json").read_text())
    assert set(rec["identities"]) == {"seed_200003", "seed_200011"}
    for path in rec["pictures"].values():
        assert path in printed and Path(path).exists()
    grid = json.loads((out / "grids" / "seed_200003" / "grid.json").read_text())
    assert len(grid["images"]) == len(DemoConfig().alphas) * len(DemoConfig().seeds)
    assert rec["two_people"]["n_images"] == len(DemoConfig().seeds)
    # the same two people from the shipped toy head, read like the inverted ones
    assert rec["two_people_head"]["n_images"] == len(DemoConfig().seeds) and "from the toy head" in printed
    # and from the head's reading refined by anchored inversion steps, which started where the head put them
    assert rec["two_people_refined"]["n_images"] == len(DemoConfig().seeds) and "anchored inversion steps" in printed
    refined = json.loads((out / "teacher_from_head" / "seed_200003" / "teacher.json").read_text())
    assert refined["started_from"] == "given" and refined["steps_run"] == 2
    assert refined["config"]["start_weight"] == 1.0 and rec["config"]["refine_steps"] == 2
    teacher = out / "teacher" / "seed_200003" / "teacher.json"
    assert json.loads(teacher.read_text())["steps_run"] == 3
    before = teacher.stat().st_mtime_ns
    assert main(argv) == 0  # second run: inversions are complete and are not redone
    assert teacher.stat().st_mtime_ns == before
    other = ["demo", "--out", str(out), "--invert-steps", "4", "--render-steps", "2", "--threads", "1", "--quiet"]
    assert main(other) == 0  # other settings: inverted again, never a stale teacher under the new settings
    assert json.loads(teacher.read_text())["steps_run"] == 4
    rec = json.loads((out / "demo.json").read_text())
    assert rec["config"]["invert_steps"] == 4 and rec["threads"] == 1


def test_cpu_threads_leave_busy_cores_alone(monkeypatch):
    import os

    from refgen.runtime import pick_cpu_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for load, want in ((0.1, 2), (1.0, 1), (1.6, 1), (7.0, 1)):  # never 0, never more than the cores
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert pick_cpu_threads() == want, load
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert pick_cpu_threads(limit=1) == 1


def test_demo_config_validation():
    with pytest.raises(ValueError, match="two identities"):
        DemoConfig(identities=[1])
    with pytest.raises(ValueError, match="scene"):
        DemoConfig(scene="moon")
    with pytest.raises(ValueError, match="threads"):
        DemoConfig(threads=-1)
    with pytest.raises(ValueError, match="head_id_guidance"):
        DemoConfig(head_id_guidance=-0.5)
    with pytest.raises(ValueError, match="toy head was trained against the embedded toy model"):
        DemoConfig(model="some/other/model")
    with pytest.raises(ValueError, match="refine_steps"):
        DemoConfig(head=False)  # the refined row starts from the head's reading
    DemoConfig(model="some/other/model", head=False, refine_steps=0)
