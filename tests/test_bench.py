"""The benchmark scripts run end to end on tiny models (numbers are meaningless on CPU; see docs/benchmarks.md)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_identity_bench_runs_on_tiny_models(tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "identity_bench.py"), "--tiny", "--section", "all",
                        "--id-loss", "--slot-repeat", "2", "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    for k in ("plain_1", "refgen_1_cfgbatch0", "refgen_1_cfgbatch1", "refgen_1_id_guidance", "refgen_two_slot",
              "refgen_2_cfgbatch1", "grid", "features", "invert_K1", "invert_K2_ckpt", "head_e2e_K2", "head_e2e_K2_ckpt",
              "head_e2e_K2_id", "head_e2e_K2_ckpt_id"):
        assert "error" not in res[k] and res[k]["s"] > 0, (k, res[k])
    assert res["inject_s"] > 0 and res["head_s"] > 0
    from refgen.identity.slots import placeholder_ids
    from refgen.tiny_qwen import build_tokenizer

    # the inversion and head rows ran with each ~ID~ the placeholder twice over: each person's window is twice as long
    assert res["slot_repeat"] == 2 and res["invert_setup"]["slot_repeat"] == 2 and res["invert_setup"]["L"] == 2 * len(placeholder_ids(
        build_tokenizer()))
    assert res["grid"]["n"] == 8 and "| alpha grid 4x2" in r.stdout
    assert res["head_e2e_K2"]["n"] == 2 and res["head_e2e_K2"]["gpu_hours"]["20k_ids_x50"] > 0


def test_inversion_flops_section(tmp_path):
    # meta tensors: the full-size architecture's FLOPs without weights; forward of 768x512 is ~23 TFLOP
    out = tmp_path / "f.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "identity_bench.py"), "--section", "flops",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    f = json.loads(out.read_text())["flops"]
    assert 15 < f["forward_tflop_per_image"] < 40 and f["backward_to_embeds_tflop_per_image"] > 0.5 * f[
        "forward_tflop_per_image"]
    assert f["identities_per_hour_at_798_tflops"] < f["identities_per_hour_at_989_tflops"]


def test_identity_bench_section_all_needs_tiny(tmp_path):
    # decided by the flag, not by the machine: the same answer with or without a GPU, before any model is built
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "identity_bench.py"), "--section", "all",
                        "--out", str(tmp_path / "b.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--section all is for --tiny" in r.stderr
    assert not (tmp_path / "b.json").exists()


def test_toyworld_head_e2e_runs_tiny(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "toyworld_head_e2e.py"), "--tiny", "--threads", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["test"]["per_alpha"]["1"]["n_people"] == 4 and "pair" in res["ceiling"] and "two_slot" in res
    assert "caption ceiling" in r.stdout and "validation identities (alpha)" in res["held_out_ranges"]
    assert res["val"]["chosen_pair_alpha"] in res["val"]["pairs_per_alpha"]  # pairs choose their alpha on val too
    cp = res["copy_paste"]  # one reference photo, prompts asking another scene / expression / pose
    assert set(cp) == {"head", "words"} and cp["head"]["n_images"] == cp["words"]["n_images"] > 0
    assert 0 <= cp["head"]["scene_is_reference_scene"] <= 1 and "copy-paste" in r.stdout
    # `refgen report` reads the e2e head's own record and the bench's KPIs, each against its ceiling
    from refgen.identity.report import build_report, to_markdown

    rep = build_report(tmp_path / "head", toyworld=tmp_path / "result.json")
    assert rep["head"]["objective"] == "e2e" and rep["head"]["output"] == "tokens" and "val_flow" in rep["head"]
    t = rep["toyworld"]
    assert t["identity"] == res["test"]["per_alpha"]["1"]["identity_acc"] and t["ceiling"] == res["ceiling"][
        "single"]["identity_acc"] and t["n_images"] == 4 and "two_people_both_right" in t
    assert t["n_people_distinct"] == 2
    assert t["identity_ci_people"] == res["test"]["per_alpha"]["1"]["identity_ci_people"]
    assert "by person" in r.stdout
    assert "## Head on unseen toy-world people" in to_markdown(rep)
    if "leak" in res["two_slot"]:  # some wrong attribute where the two people differ (the tiny head gets most wrong)
        assert t["two_people_leak"] == res["two_slot"]["leak"] and "the other person's" in r.stdout
    # --eval-head scores that head again without training (same people, same renders: same numbers)
    again = tmp_path / "again"
    r2 = subprocess.run([sys.executable, str(ROOT / "bench" / "toyworld_head_e2e.py"), "--tiny", "--threads", "1",
                         "--out", str(again), "--eval-head", str(tmp_path / "head")], capture_output=True, text=True,
                        timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    res2 = json.loads((again / "result.json").read_text())
    assert not (again / "train").exists() and not (again / "head").exists()
    assert res2["test"]["per_alpha"] == res["test"]["per_alpha"]
    rec = json.loads((tmp_path / "head" / "head.json").read_text())
    rec["train_ids"].append(f"seed_{res['held_out_ranges']['test identities'][0]}")  # as if it had seen a test person
    (tmp_path / "head" / "head.json").write_text(json.dumps(rec))
    r3 = subprocess.run([sys.executable, str(ROOT / "bench" / "toyworld_head_e2e.py"), "--tiny", "--threads", "1",
                         "--out", str(tmp_path / "bad"), "--eval-head", str(tmp_path / "head")], capture_output=True,
                        text=True, timeout=600)
    assert r3.returncode != 0 and "was trained on 1 of the people it would be scored on" in r3.stderr


def test_toyworld_head_e2e_streams_training_people(tmp_path):
    """--stream: the training people are rendered into the trainer's cache (mapped tables), no training folders are
    written, and the rest of the bench runs as with folders."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "toyworld_head_e2e.py"), "--tiny", "--threads", "1",
                        "--stream", "--tables", "mapped", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "train").exists() and (tmp_path / "head" / "cache" / "manifest.json").is_file()
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["test"]["per_alpha"]["1"]["n_people"] == 4 and res["e2e_config"]["toyworld_identities"] == 6


def test_toyworld_head_e2e_config_keys_are_not_masked_by_flag_defaults(tmp_path):
    """A --config YAML's keys stand unless a flag is given: a flag's default must not overwrite them (the bench
    once trained without two-person steps although the YAML asked for them)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("toyworld_head_e2e", ROOT / "bench" / "toyworld_head_e2e.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("two_person_fraction: 0.3\nsteps: 7\nlr: 0.02\neval_every: 3\n")

    def resolved(*flags):
        a = bench.build_parser().parse_args(["--out", str(tmp_path), "--config", str(cfg), *flags])
        return a, bench.resolve_e2e_flags(a)

    a, yaml = resolved()
    assert (a.two_person_fraction, a.steps, a.lr) == (0.3, 7, 0.02) and yaml["eval_every"] == 3
    assert (a.batch_size, a.head, a.tables) == (bench.BENCH_DEFAULTS["batch_size"], "resampler", "device")
    a, _ = resolved("--steps", "5", "--two-person-fraction", "0")  # a flag given wins, 0 included
    assert (a.steps, a.two_person_fraction, a.lr) == (5, 0.0, 0.02)
    a = bench.build_parser().parse_args(["--out", str(tmp_path)])
    assert bench.resolve_e2e_flags(a) == {} and a.two_person_fraction == 0.0 and a.steps == 3000
