"""`refgen dit validate`: each preset states its time, a failed validation exits 1, the tiny smoke test judges
nothing (and says so) instead of reporting "passed: false" with exit 0."""

from __future__ import annotations

import dataclasses
import json

import refgen.dit.validate as validate
from refgen.cli import main


def test_validate_states_time_exits_1_on_failure_and_tiny_is_a_smoke_test(tmp_path, capsys, monkeypatch):
    argv = ["dit", "validate", "--preset", "tiny", "--device", "cpu", "--steps", "1"]
    assert main(argv + ["--out", str(tmp_path / "smoke")]) == 0
    err = capsys.readouterr().err
    assert f"preset tiny: {validate.TINY_PRESET_TIME} (at its 2 steps; --steps 1 given)" in err
    assert "is a smoke test: every step ran, nothing is judged" in err
    rep = json.loads((tmp_path / "smoke" / "validate.json").read_text())
    assert rep["passed"] is None and rep["smoke_test"] is True
    assert all(r["passed"] is None for r in rep["results"].values())

    # the same run judged by the thresholds: one training step fails them, and the command exits 1 saying which
    shipped = validate.presets
    monkeypatch.setattr(validate, "presets", lambda: {**shipped(), "tiny": dataclasses.replace(
        shipped()["tiny"], thresholds=True)})
    assert main(argv + ["--out", str(tmp_path / "judged")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    rep = json.loads((tmp_path / "judged" / "validate.json").read_text())
    failed = [k for k, r in rep["results"].items() if r["passed"] is False]
    assert rep["passed"] is False and failed
    assert err == (f"refgen dit validate: error: failed {', '.join(failed)} (thresholds: docs/dit.md; numbers and "
                   f"pictures: {tmp_path / 'judged' / 'validate.json'})")


def test_every_preset_states_its_expected_time():
    for name, p in validate.presets().items():
        assert "min" in p.expected_time or " s " in p.expected_time, name
