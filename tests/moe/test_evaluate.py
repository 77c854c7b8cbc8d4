"""refgen moe eval: calibration, hypervolume / modes, the config matrix (dry-run, skipping, abort), reports."""

import json

import numpy as np
import pytest

from refgen.moe.calibration import ece_mce, fit_temperature, reliability_bins, uncertainty
from refgen.moe.evaluate import EvalAborted, EvalConfig, jobs, run_matrix
from refgen.moe.pareto import hypervolume, non_dominated, operating_modes


def _overconfident(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    logits = rng.normal(0, 1, (n, 5))
    logits[np.arange(n), y] += 1.5          # right ~60 % of the time ...
    return 4.0 * logits, y                  # ... but confident as if always right


def test_temperature_scaling_cuts_ece_of_an_overconfident_model_and_keeps_accuracy():
    z, y = _overconfident()
    t = fit_temperature(z[:1000], y[:1000])                     # fitted on a holdout
    assert 2.5 < t < 6
    before, after = ece_mce(z[1000:], y[1000:]), ece_mce(z[1000:] / t, y[1000:])
    assert before["ece"] > 0.02 and after["ece"] <= 0.8 * before["ece"]   # B5: >= 20 % relative
    assert before["mce"] >= before["ece"]
    assert ((z / t).argmax(1) == z.argmax(1)).all()


def test_ece_matches_a_hand_computation_and_bins_count_everything():
    z, y = _overconfident(500, 1)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    conf, ok = p.max(1), p.argmax(1) == y
    b = np.clip((conf * 15).astype(int), 0, 14)
    hand = sum(abs(conf[b == i].mean() - ok[b == i].mean()) * (b == i).mean() for i in range(15) if (b == i).any())
    assert ece_mce(z, y)["ece"] == pytest.approx(hand, abs=1e-4)
    assert sum(reliability_bins(z, y)["count"]) == 500
    u = uncertainty(z)
    assert 0 <= u["variation_ratio"] <= 1 and 0 <= u["top2_gap"] <= 1


def test_hypervolume_against_the_rectangles_and_modes_by_rule():
    pts = np.array([[0.1, 0.5], [0.2, 0.2], [0.3, 0.6]])  # the third is dominated
    assert non_dominated(pts).tolist() == [True, True, False]
    # union of [0.1,1]x[0.5,1.1] and [0.2,1]x[0.2,1.1]
    assert hypervolume(pts) == pytest.approx(0.9 * 0.6 + 0.8 * 0.9 - 0.8 * 0.6)
    rows = [{"setup": "big", "acc": 0.99, "cost": 10.0}, {"setup": "mid", "acc": 0.985, "cost": 4.0},
            {"setup": "tiny", "acc": 0.90, "cost": 0.5}]
    assert operating_modes(rows) == {"quality_max": "big", "balanced": "tiny", "cost_saving": "mid"}


def _cfg(trained, exported, **over):
    base = dict(setups=[{"name": "float", "path": str(trained)}, {"name": "int8", "path": str(exported),
                                                                   "method": "float"}],
                seeds=(17, 42), corruptions=("gaussian_noise", "contrast"), severities=(1, 3), latency_iters=20,
                calib_n=300)
    return EvalConfig(**{**base, **over})


def test_matrix_runs_skips_done_triples_and_writes_every_report(trained_digits, exported_digits, tmp_path):
    cfg = _cfg(trained_digits[0], exported_digits[0])
    assert len(jobs(cfg)) == 2 * (2 * 5 + 1)
    plan = run_matrix(cfg, tmp_path, dry_run=True)
    assert plan["to_run"] == 22 and plan["skipped_done"] == 0 and not (tmp_path / "eval_raw.jsonl").exists()
    res = run_matrix(cfg, tmp_path, progress=False)
    assert res["failed"] == []
    recs = [json.loads(ln) for ln in (tmp_path / "eval_raw.jsonl").read_text().splitlines()]
    assert len(recs) == 22 and all(r["status"] == "ok" for r in recs)
    s = res["summary"]["setups"]
    assert s["float"]["acc"] == pytest.approx(s["int8"]["acc"], abs=0.01)
    assert s["float"]["acc_by_split"]["contrast@3"] < s["float"]["acc"]
    same = [r for r in recs if r["setup"] == "float" and r["split"] == "gaussian_noise@3"]
    assert len(same) == 2 and same[0]["seed"] != same[1]["seed"]
    for f in ("eval_matrix.md", "robustness_curves.png", "reliability_diagram.png", "hypervolume.csv", "eval.json"):
        assert (tmp_path / f).stat().st_size > 0
    assert (tmp_path / "robustness_curves.png").read_bytes()[:4] == b"\x89PNG"
    again = run_matrix(cfg, tmp_path, dry_run=True)
    assert again["to_run"] == 0 and again["skipped_done"] == 22
    # a new seed runs only its own triples; the same seed gives the same numbers (deterministic corruptions)
    cfg2 = _cfg(trained_digits[0], exported_digits[0], seeds=(17, 42, 5))
    assert run_matrix(cfg2, tmp_path, dry_run=True)["to_run"] == 2 * 5


def test_matrix_aborts_with_a_summary_past_5_percent_failures(trained_digits, tmp_path):
    cfg = EvalConfig(setups=[{"name": "ok", "path": str(trained_digits[0])},
                             {"name": "broken", "path": str(tmp_path / "missing")}],
                     seeds=(17,), corruptions=("contrast",), severities=(1,), latency=False, cost="bytes",
                     calib_n=100)
    with pytest.raises(EvalAborted, match=r"jobs failed .*broken seed=17 clean: FileNotFoundError"):
        run_matrix(cfg, tmp_path, progress=False)
    recs = [json.loads(ln) for ln in (tmp_path / "eval_raw.jsonl").read_text().splitlines()]
    assert any(r["status"] == "failed" for r in recs)


def test_config_checks():
    with pytest.raises(ValueError, match="unknown corruption"):
        EvalConfig(corruptions=("snow",))
    with pytest.raises(ValueError, match="severities"):
        EvalConfig(severities=(0,))
    with pytest.raises(ValueError, match="unique"):
        EvalConfig(setups=[{"name": "a", "path": "x"}, {"name": "a", "path": "y"}])
    cfg = EvalConfig.from_yaml("configs/moe_eval.yaml")
    assert len(jobs(cfg)) == 5 * (3 * 36 + 1)
