"""refgen moe eval: calibration, hypervolume / modes, the config matrix (dry-run, skipping, abort), reports."""

import json
import time

import numpy as np
import pytest
import torch

from refgen.moe.calibration import ece_mce, fit_temperature, reliability_bins, uncertainty
from refgen.moe.evaluate import EvalAborted, EvalConfig, jobs, run_matrix, stages
from refgen.moe.monitor import EnergyUnavailable
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
    assert [s[0] for s in stages(cfg)] == ["export", "compress"]



class _Watts:
    """A stand-in energy counter (NVML needs a GPU): a constant 100 W, so every joule is idle power."""
    name = "stand-in 100 W"

    def __init__(self):
        self.t0 = time.perf_counter()

    def read_mj(self):
        return (time.perf_counter() - self.t0) * 100 * 1e3


def test_device_job_gives_accuracy_per_ms_and_per_joule_and_skips_onnx(trained_digits, exported_digits, tmp_path):
    cfg = _cfg(trained_digits[0], exported_digits[0], seeds=(17,), corruptions=("contrast",), severities=(3,),
               device="cpu", energy_seconds=5.0, energy_idle_seconds=0.2, energy_batch=32, device_latency_iters=20)
    assert ("float", 17, "device") in jobs(cfg) and len(jobs(cfg)) == 2 * (1 + 1 + 1 + 1)
    res = run_matrix(cfg, tmp_path, progress=False, energy_counter=_Watts())
    assert res["failed"] == []
    rec = next(json.loads(ln) for ln in (tmp_path / "eval_raw.jsonl").read_text().splitlines()
               if '"device"' in ln and '"float"' in ln)
    w = rec["energy"]
    assert w["seconds"] >= 5 and w["images"] == 32 * w["calls"] and w["counter"] == "stand-in 100 W"
    assert w["j_per_image_total"] == pytest.approx(100 * w["seconds"] / w["images"], rel=1e-3)
    assert abs(w["j_per_image_marginal"]) < 0.01 * w["j_per_image_total"]   # nothing above idle
    s = res["summary"]["setups"]
    d = s["float"]["device"]
    assert d["acc_per_ms"] == pytest.approx(s["float"]["acc"] / rec["device_latency_ms_median"])
    assert d["acc_pct_per_j_total"] == pytest.approx(100 * s["float"]["acc"] / w["j_per_image_total"])
    assert "not_measured" in s["int8"]["device"] and "ONNX" in s["int8"]["device"]["not_measured"]
    md = (tmp_path / "eval_matrix.md").read_text()
    assert "acc %/J total" in md and "| int8 | cpu | an ONNX setup" in md
    assert "CUDA graphs need a CUDA GPU" in rec["graph_not_measured"] and "graph_latency_ms_median" not in rec
    assert "not measured: CUDA graphs need a CUDA GPU" in md          # no eager number stands in for the graph's
    assert run_matrix(cfg, tmp_path, dry_run=True)["to_run"] == 0      # the device jobs count as done


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_device_job_times_the_model_as_a_cuda_graph_on_a_gpu(trained_digits):
    from refgen.moe.evaluate import _graph_latency
    from refgen.moe.export import deployable_from_info
    from refgen.moe.train import load_model

    model, info = load_model(trained_digits[0])
    module = deployable_from_info(model, info).cuda().eval()
    with torch.no_grad():
        r = _graph_latency(module, torch.rand(1, 1, 8, 8, device="cuda"), iters=20)
    assert r["graph_max_abs_diff"] <= 1e-4 and 0 < r["graph_latency_ms_median"] <= r["graph_latency_ms_p95"]


def test_device_energy_refused_without_a_counter_before_any_job(trained_digits, tmp_path):
    cfg = EvalConfig(setups=[{"name": "float", "path": str(trained_digits[0])}], seeds=(17,),
                     exports=[{"model": str(trained_digits[0]), "out": str(tmp_path / "export")}],
                     corruptions=("contrast",), severities=(1,), device="cpu", latency=False, cost="bytes")
    with pytest.raises(EnergyUnavailable, match="energy: true needs a CUDA device"):
        run_matrix(cfg, tmp_path, progress=False)
    assert not (tmp_path / "eval_raw.jsonl").exists() and not (tmp_path / "export").exists()  # no stage ran either
    with pytest.raises(ValueError, match="energy_seconds >= 5"):
        EvalConfig(device="cuda", energy_seconds=2)
    with pytest.raises(ValueError, match="device must be"):
        EvalConfig(device="tpu")


def test_one_command_makes_the_missing_exports_and_compressions_then_skips_them(trained_digits, tmp_path):
    (tmp_path / "c.yaml").write_text("methods: [ptq]\n")
    exp, comp = tmp_path / "export", tmp_path / "comp"
    cfg = EvalConfig(setups=[{"name": "int8", "path": str(exp)}, {"name": "ptq", "path": str(comp / "baseline")}],
                     exports=[{"model": str(trained_digits[0]), "out": str(exp)}],
                     compressions=[{"model": str(trained_digits[0]), "out": str(comp),
                                    "config": str(tmp_path / "c.yaml")}],
                     seeds=(17,), corruptions=("contrast",), severities=(1,), latency=False, cost="bytes",
                     calib_n=100)
    plan = run_matrix(cfg, tmp_path / "v", dry_run=True)
    assert plan["stages_to_run"] == 2 and plan["todo"][0].startswith("export ")
    res = run_matrix(cfg, tmp_path / "v", progress=False)
    assert res["failed"] == [] and set(res["summary"]["setups"]) == {"int8", "ptq"}
    for f in ("manifest.json", "model_int8.onnx"):
        assert (exp / f).is_file()
    for f in ("compress.json", "compress.md", "compress_acc_vs_size.png"):
        assert (comp / f).stat().st_size > 0
    stamp = (exp / "manifest.json").stat().st_mtime_ns
    again = run_matrix(cfg, tmp_path / "v", dry_run=True)
    assert again["stages_to_run"] == 0 and again["to_run"] == 0
    run_matrix(cfg, tmp_path / "v", progress=False)
    assert (exp / "manifest.json").stat().st_mtime_ns == stamp           # a complete export is not redone
    (comp / "compress.md").unlink()                                        # an unfinished compression is redone
    assert run_matrix(cfg, tmp_path / "v", dry_run=True)["todo"] == [f"compress {trained_digits[0]} -> {comp}"]


def test_a_failing_stage_stops_the_run_and_names_the_command(tmp_path):
    cfg = EvalConfig(setups=[{"name": "x", "path": str(tmp_path / "e")}],
                     exports=[{"model": str(tmp_path / "no_such_run"), "out": str(tmp_path / "e")}],
                     seeds=(17,), corruptions=("contrast",), severities=(1,), latency=False, cost="bytes")
    with pytest.raises(ValueError, match=r"stage `refgen moe export --model .*no_such_run.*FileNotFoundError"):
        run_matrix(cfg, tmp_path / "v", progress=False)
    assert not (tmp_path / "v" / "eval_raw.jsonl").exists()
    # the CLI says it in one line, exit 1, no traceback
    from refgen.cli import main

    (tmp_path / "c.yaml").write_text(f"setups: [{{name: x, path: {tmp_path / 'e'}}}]\n"
                                     f"exports: [{{model: {tmp_path / 'no_such_run'}, out: {tmp_path / 'e'}}}]\n"
                                     "seeds: [17]\ncorruptions: [contrast]\nseverities: [1]\nlatency: false\n"
                                     "cost: bytes\n")
    assert main(["moe", "eval", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "v2"), "--quiet"]) == 1

# ---- the shift-aware temperature (fitted on a corrupted copy of the validation holdout) ----------------------

def test_corrupted_validation_is_seeded_balanced_and_refuses_test_images(digits):
    from refgen.moe.calibration import corrupted_validation, refuse_test_images, severity_mix
    from refgen.moe.data import stratified_split

    _, va = stratified_split(digits.y_train, 0.1, seed=0)
    x, y = digits.x_train[va], digits.y_train[va]
    a, ya, ma = corrupted_validation(x, y, ("contrast", "gaussian_noise"), "mild", copies=2, seed=3)
    b, yb, mb = corrupted_validation(x, y, ("contrast", "gaussian_noise"), (1, 2), copies=2, seed=3)
    c, _, mc = corrupted_validation(x, y, ("contrast", "gaussian_noise"), (1, 2), copies=2, seed=4)
    assert np.array_equal(a, b) and np.array_equal(ya, yb) and ma["sha256"] == mb["sha256"]
    assert mc["sha256"] != ma["sha256"] and ma["seed"] == 3 and ma["n"] == 2 * len(x) == len(a)
    assert np.array_equal(ya, np.tile(y, 2)) and ma["val_sha256"] == mc["val_sha256"]
    assert not np.array_equal(a[:len(x)], x)                    # every copy is corrupted (no severity 0 asked)
    clean_share = (a.reshape(len(a), -1) == np.tile(x, (2, 1, 1, 1)).reshape(len(a), -1)).all(1).mean()
    assert clean_share < 0.05
    m, _, _ = corrupted_validation(x, y, ("contrast",), (0, 5), copies=2, seed=3)   # 0 = an uncorrupted copy
    same = (m.reshape(len(m), -1) == np.tile(x, (2, 1, 1, 1)).reshape(len(m), -1)).all(1).mean()
    assert same == pytest.approx(0.5, abs=0.01)                # balanced: half clean, half contrast@5
    assert severity_mix("severe") == (3, 4, 5) and severity_mix([2, 1, 2]) == (1, 2)
    for bad in ("medium", [6], [0], []):
        with pytest.raises(ValueError):
            severity_mix(bad)
    assert refuse_test_images(x, digits.x_test) == 0
    with pytest.raises(ValueError, match="share memory"):
        refuse_test_images(digits.x_test[:50], digits.x_test)
    with pytest.raises(ValueError, match="byte-identical"):
        refuse_test_images(digits.x_test[:50].copy(), digits.x_test)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupted_validation(x, y, ("snow",), "all", copies=1, seed=0)


def test_shift_temperature_fits_on_validation_only_is_reproducible_and_lowers_shifted_ece(trained_digits, tmp_path,
                                                                                           monkeypatch):
    import refgen.moe.evaluate as ev
    from refgen.moe.calibration import corrupted_validation
    from refgen.moe.data import sha256_array

    seen = []                                            # every image set the shift-aware fit is built from
    real = corrupted_validation
    monkeypatch.setattr(ev, "corrupted_validation", lambda x, *a, **k: seen.append(x.copy()) or real(x, *a, **k))
    setups = [{"name": "float", "path": str(trained_digits[0])}]
    base = dict(setups=setups, seeds=(17, 42), corruptions=("gaussian_noise", "contrast", "fog", "motion_blur"),
                severities=(3,), latency=False, cost="bytes", calib_n=450)
    first = tmp_path / "a"
    run_matrix(EvalConfig(**base), first, progress=False)                  # clean T only (the default)
    recs = [json.loads(ln) for ln in (first / "eval_raw.jsonl").read_text().splitlines()]
    assert all("temperature_shift" not in r for r in recs) and not seen
    cfg = EvalConfig(**base, shift_temperature=True)
    assert run_matrix(cfg, first, dry_run=True)["to_run"] == 2 * 5        # old records lack the shift T: rerun
    res = run_matrix(cfg, first, progress=False)
    assert res["failed"] == [] and len(seen) == 1                         # built once, shared by the seeds
    ld, _ = ev._load(cfg.setups[0], 17, cfg)
    assert np.array_equal(seen[0], ld.val[0])                             # the validation holdout, not the test split
    assert sha256_array(seen[0]) != sha256_array(ld.data.x_test[:len(seen[0])])
    recs = [json.loads(ln) for ln in (first / "eval_raw.jsonl").read_text().splitlines()][-10:]
    assert {r["temperature_shift"] for r in recs} == {recs[0]["temperature_shift"]}
    sh = recs[0]["shift"]
    assert sh["seed"] == 0 and sh["n"] == 5 * len(ld.val[1]) and sh["val_sha256"] == sha256_array(ld.val[0])
    assert sh["val_ece_fitted"] < sh["val_ece_t1"]
    # same seed -> the same corrupted bytes and the same T in a fresh run; another seed -> another set
    again = run_matrix(cfg, tmp_path / "b", progress=False)["summary"]["setups"]["float"]
    assert again["temperature_shift"] == recs[0]["temperature_shift"] and again["shift"]["sha256"] == sh["sha256"]
    other = run_matrix(EvalConfig(**base, shift_temperature=True, shift_seed=1), tmp_path / "c",
                       progress=False)["summary"]["setups"]["float"]
    assert other["shift"]["sha256"] != sh["sha256"] and other["shift"]["seed"] == 1
    # on corrupted *test* images (other draws, other images) the shift-aware T calibrates better than T = 1 and
    # than the clean-fitted T; the clean-fitted T stays the reported default
    row = res["summary"]["setups"]["float"]
    lv = row["calibration"]["levels"]["sev3"]
    assert lv["ece"] > 0.05 and lv["ece_shift"] < 0.8 * lv["ece"] and lv["ece_shift"] < lv["ece_ts"]
    assert row["temperature_shift"] > row["temperature"]
    b5 = row["calibration"]["b5"]
    assert "sev3" not in b5["shift_t"]["failing"] and "sev3" in b5["clean_t"]["failing"]
    md = (first / "eval_matrix.md").read_text()
    assert "B5 shift T" in md and "seed 0" in md and row["ece_ts"] == pytest.approx(
        np.mean([r["ece_ts"] for r in recs if r["split"] == "clean"]))


def test_shift_temperature_refuses_a_holdout_that_is_the_test_split(trained_digits, tmp_path, monkeypatch):
    import refgen.moe.evaluate as ev

    real = ev._load

    def leaky(setup, seed, cfg):                          # a bug that hands the test split over as "validation"
        ld, kind = real(setup, seed, cfg)
        ld.val = (ld.data.x_test, ld.data.y_test)
        return ld, kind
    monkeypatch.setattr(ev, "_load", leaky)
    cfg = EvalConfig(setups=[{"name": "float", "path": str(trained_digits[0])}], seeds=(17,),
                     corruptions=("contrast",), severities=(3,), latency=False, cost="bytes", calib_n=100,
                     shift_temperature=True, max_failed_fraction=1.0)
    res = run_matrix(cfg, tmp_path, progress=False)
    assert len(res["failed"]) == 2 and all("refusing to fit a temperature on the test split" in f
                                           for f in res["failed"])
    md = (tmp_path / "eval_matrix.md").read_text()                   # the report names what is missing
    assert "**2 job(s) failed**" in md and md.count("refusing to fit a temperature on the test split") == 2
    assert res["summary"]["failed"] == res["failed"]


def test_eval_cli_shift_flags(trained_digits, tmp_path):
    from refgen.cli import main

    cfg = tmp_path / "e.yaml"
    cfg.write_text(f"setups:\n  - {{name: float, path: {trained_digits[0]}}}\nseeds: [17]\ncorruptions: [contrast]\n"
                   "severities: [3]\nlatency: false\ncost: bytes\ncalib_n: 100\n")
    assert main(["moe", "eval", "--config", str(cfg), "--out", str(tmp_path / "o"), "--quiet", "--shift-temperature",
                 "--shift-severities", "2,3", "--shift-seed", "5"]) == 0
    rec = json.loads((tmp_path / "o" / "eval_raw.jsonl").read_text().splitlines()[0])
    assert rec["shift"]["severities"] == [2, 3] and rec["shift"]["seed"] == 5
    with pytest.raises(ValueError, match="severity mix"):
        EvalConfig(shift_severities="medium")
