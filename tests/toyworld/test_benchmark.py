"""The identity benchmark and the demo on the embedded toy model, at smoke-test sizes (CPU)."""

import json

import pytest

from refgen.toyworld import benchmark as B
from refgen.toyworld import world

A = {"skin": "pale", "hair_color": "red", "hair_style": "long", "face_shape": "round", "glasses": "none",
     "shirt_color": "blue", "shirt_pattern": "plain"}
C = {**A, "skin": "dark", "glasses": "sunglasses"}


def test_score_counts_people_in_left_to_right_order():
    rows = [{"people": [A], "scene": "beach"}, {"people": [A, C], "scene": "city"}, {"people": [A, C], "scene": "city"}]
    preds = [{"scene": "beach", "people": [dict(A)]},
             {"scene": "forest", "people": [dict(C), dict(A)]},  # both there, swapped: no identity right
             {"scene": "city", "people": [dict(A), dict(C)]}]
    m = B.score(preds, rows)
    assert m["identity_acc"] == pytest.approx(3 / 5)  # A; (swapped: 0 of 2); A and C
    assert m["all_people_acc"] == pytest.approx(2 / 3)
    assert m["scene_acc"] == pytest.approx(2 / 3)
    assert m["per_attribute"]["skin"] == pytest.approx(3 / 5)
    assert m["per_attribute"]["hair_color"] == 1.0  # red for everyone: order does not matter for it
    missing = B.score([{"scene": "beach", "people": []}], rows[:1])
    assert missing["identity_acc"] == 0 and missing["people_count_acc"] == 0


def test_best_alpha_skips_alphas_that_lose_the_scene():
    pa = {"0": {"identity_acc": 0.0, "attribute_acc": 0.3, "scene_acc": 1.0},
          "1": {"identity_acc": 0.5, "attribute_acc": 0.8, "scene_acc": 0.95},
          "2": {"identity_acc": 0.9, "attribute_acc": 0.9, "scene_acc": 0.4}}
    assert B._best_alpha(pa) == "1"
    assert B._best_alpha({"0": pa["0"], "2": pa["2"]}) is None


def test_yaml_mirrors_the_dataclass_defaults():
    import dataclasses
    from pathlib import Path

    y = B.BenchmarkConfig.from_yaml(Path(__file__).resolve().parents[2] / "configs" / "toyworld_benchmark.yaml")
    d = B.BenchmarkConfig()
    assert dataclasses.asdict(y) | {"invert": None} == dataclasses.asdict(d) | {"invert": None}
    assert y.invert_config() == d.invert_config()  # the YAML spells out what the code defaults to


def test_config_validation():
    with pytest.raises(ValueError, match="overlap"):
        B.BenchmarkConfig(n_train=10, n_test=5, train_seed=0, test_seed=5)
    with pytest.raises(ValueError, match="scenes"):
        B.BenchmarkConfig(scenes=["moon"])
    with pytest.raises(ValueError, match="steps"):
        B.BenchmarkConfig(invert={"steps": 0})


def test_benchmark_runs_every_stage_and_is_idempotent(tmp_path):
    cfg = B.BenchmarkConfig.tiny()
    r = B.run_benchmark(cfg, tmp_path, progress=False)
    per = r["teacher"]["per_alpha"]
    assert set(per) == {"0", "1"}
    n = cfg.n_test * len(cfg.scenes) * len(cfg.seeds)
    assert all(m["n_images"] == n for m in per.values())
    assert r["two_slot"]["teacher"]["n_images"] == cfg.n_pairs * len(cfg.scenes) * len(cfg.seeds)
    assert r["head"]["n_train_identities"] == cfg.n_train  # the head saw training identities only
    head_ids = json.loads((tmp_path / "head" / "head.json").read_text())["train_ids"]
    assert all(cfg.train_seed <= int(i.split("_")[1]) < cfg.train_seed + cfg.n_train for i in head_ids)
    assert len(head_ids) == cfg.n_train
    assert r["inversion"]["all"]["identities"] == cfg.n_test + cfg.n_train
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["teacher"]["per_alpha"] == json.loads(json.dumps(per))
    md = (tmp_path / "benchmark.md").read_text()
    assert "alpha 0 (floor" in md and "Two-slot" in md
    assert (tmp_path / "grids" / "teacher_alpha.png").exists() and (tmp_path / "grids" / "two_slot.png").exists()
    again = B.run_benchmark(cfg, tmp_path, progress=False)
    assert again["inversion"] == {}  # every teacher was complete: nothing re-inverted
    assert again["teacher"]["per_alpha"] == per  # renders are seeded: same pictures, same scores
