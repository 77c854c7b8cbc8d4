import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from refgen.artifacts import atomic_save_safetensors
from refgen.cli import main
from refgen.identity.features import (FEATURE_SETTING_KEYS, FeatureConfig, VisionFeatures, budget_sizes,
                                      extract_features, feature_settings, per_image_embeds)
from refgen.identity.head import HeadConfig, LinearHead, head_loss, load_head, train_head
from refgen.identity.inject import residual_metadata, save_residual
from refgen.identity.prompts import encode_prompts
from refgen.identity.report import build_report
from refgen.model_identity import identify_model


def _photos(d, n=3, size=(96, 64)):
    d.mkdir(parents=True, exist_ok=True)
    for j in range(n):
        Image.new("RGB", size, (40 * j, 200 - 30 * j, 90)).save(d / f"p{j}.png")
    return d


@pytest.fixture(scope="module")
def fx(tiny_models):
    return VisionFeatures(tiny_models["qwen3_vl"], "cpu", "fp32", FeatureConfig(pixel_budget=0.05e6))


def test_pixel_budget_limits_what_reaches_the_vision_tower(fx):
    seen = []
    hook = fx.model.model.visual.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        big = [Image.new("RGB", (1024, 768), (i * 50, 0, 0)) for i in range(4)]
        z = fx(big)
        few = fx(big[:1])
    finally:
        hook.remove()
    assert seen[0] <= 0.05e6 / 256 and seen[1] <= 0.05e6 / 256  # patches of 16x16 px
    assert seen[0] >= 0.5 * 0.05e6 / 256  # the budget is used, not wasted
    assert abs(z.norm().item() - 1) < 1e-5 and abs(few.norm().item() - 1) < 1e-5
    sizes = budget_sizes([(4000, 3000), (1000, 1000)], FeatureConfig(pixel_budget=2e6, max_side=1536))
    assert sum(w * h for w, h in sizes) <= 2e6 and all(w % 32 == 0 and h % 32 == 0 for w, h in sizes)
    assert max(max(s) for s in budget_sizes([(8000, 100)], FeatureConfig(max_side=1536))) <= 1536


def test_per_image_embeds_accepts_the_457_tuple(fx):
    inp = fx.prepare([Image.new("RGB", (64, 64)), Image.new("RGB", (96, 64))])
    out = fx.model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
    new = per_image_embeds(out, inp["image_grid_thw"], 2)
    old = per_image_embeds((torch.cat(out.pooler_output), out.deepstack_features), inp["image_grid_thw"], 2)
    assert [e.shape[0] for e in new] == [4, 6] and all(torch.equal(a, b) for a, b in zip(new, old))


def test_features_are_unit_norm_and_cached(tiny_models, tmp_path, monkeypatch):
    for k in range(2):
        _photos(tmp_path / f"seed_{k}", n=2 + k)
    cfg = FeatureConfig(pixel_budget=0.02e6)
    r = extract_features(tmp_path, tiny_models["qwen3_vl"], "cpu", "fp32", cfg, progress=False)
    assert r == {"identities": 2, "skipped_cached": 0, "extracted": 2}
    from safetensors import safe_open
    with safe_open(str(tmp_path / "seed_1" / "vl_features.safetensors"), "pt") as f:
        z, md = f.get_tensor("z"), f.metadata()
    assert abs(z.norm().item() - 1) < 1e-5 and md["D"] == str(z.shape[0]) and len(json.loads(md["images"])) == 3
    again = extract_features(tmp_path, tiny_models["qwen3_vl"], "cpu", "fp32", cfg, progress=False)
    assert again["extracted"] == 0 and again["skipped_cached"] == 2
    assert {k: md[k] for k in FEATURE_SETTING_KEYS} == feature_settings(identify_model(tiny_models["qwen3_vl"]), cfg,
                                                                           "fp32")
    assert md["vl_model_location"] == str(Path(tiny_models["qwen3_vl"]).resolve()) and md["max_images"] == "8"
    monkeypatch.chdir(Path(tiny_models["qwen3_vl"]).parent)
    respelled = extract_features(tmp_path, "./" + Path(tiny_models["qwen3_vl"]).name, "cpu", "fp32", cfg,
                                 progress=False)
    assert respelled["skipped_cached"] == 2  # the same folder spelled another way is the same model
    other = extract_features(tmp_path, tiny_models["qwen3_vl"], "cpu", "fp32", FeatureConfig(pixel_budget=0.03e6),
                             progress=False)
    assert other["extracted"] == 2  # changed settings are not served from the cache


SYNTH_FEATURES = FeatureConfig(pixel_budget=20000.0, max_images=1)


def _synthetic_set(root, pipe, vl_model, n=40, seed=0):
    """Identities whose teacher residual is a fixed (unknown) function of z: learnable by the head. Their
    feature files carry the metadata `refgen features` writes, for SYNTH_FEATURES in fp32."""
    g = torch.Generator().manual_seed(seed)
    L = encode_prompts(pipe, "~ID~").slots[0][0].length
    H, D = pipe.transformer.config.joint_attention_dim, 32
    teacher = LinearHead(D, L, H)
    with torch.no_grad():
        teacher.log_scale.fill_(-0.5)
    md = residual_metadata(pipe, "tiny")
    for i in range(n):
        d = root / f"seed_{i}"
        d.mkdir(parents=True)
        z = torch.randn(D, generator=g)
        z = z / z.norm()
        with torch.no_grad():
            save_residual(d / "teacher_residual.safetensors", teacher(z[None])[0], md)
        atomic_save_safetensors({"z": z}, d / "vl_features.safetensors", {
            "vl_model": vl_model, **feature_settings(identify_model(vl_model), SYNTH_FEATURES, "fp32"), "D": str(D)})
    return L, H, D


def test_head_training_learns_teacher_residuals(pipe, tiny_models, tmp_path):
    _synthetic_set(tmp_path / "ids", pipe, tiny_models["qwen3_vl"])
    summary = train_head(tmp_path / "ids", tmp_path / "head", HeadConfig(epochs=30, batch_size=8, lr=1e-2),
                         progress=False)
    log = [json.loads(x) for x in (tmp_path / "head" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert log[-1]["val_cos"] > log[0]["val_cos"] + 0.2 and summary["val_cos"] > 0.5
    meta = json.loads((tmp_path / "head" / "head.json").read_text())
    assert meta["L"] and meta["vl_model"] == tiny_models["qwen3_vl"] and meta["git_commit"] is not None
    assert json.loads(meta["feature_settings"]) == feature_settings(identify_model(tiny_models["qwen3_vl"]),
                                                                    SYNTH_FEATURES, "fp32")  # every setting
    assert len(meta["val_ids"]) == 4 and not set(meta["val_ids"]) & set(meta["train_ids"])  # split by identity
    assert (tmp_path / "head" / "head_epoch030.safetensors").exists()
    h, md = load_head(tmp_path / "head" / "head.safetensors", torch.device("cpu"), torch.float32)
    assert md["epoch"] == "30" and h(torch.randn(2, 32)).shape == (2, int(md["L"]), int(md["H"]))
    rep = build_report(tmp_path / "head" / "head.json")
    assert rep["head"]["val_cos"] == pytest.approx(summary["val_cos"])
    assert rep["head"]["L"] == int(md["L"]) and rep["head"]["slot_repeat"] == 1
    # the weights file `generate --head` takes reads its record beside it; anything else is named
    assert build_report(tmp_path / "head" / "head.safetensors")["head"] == rep["head"]
    (tmp_path / "weights.json").write_bytes(b"\xc1\x00 not text")
    with pytest.raises(ValueError, match="weights.json is not a head record"):
        build_report(tmp_path / "weights.json")
    with pytest.raises(FileNotFoundError, match="nohead/head.json not found"):
        build_report(tmp_path / "nohead" / "head.safetensors")


def test_head_training_refuses_incomplete_or_mixed_feature_settings(pipe, tiny_models, tmp_path):
    _synthetic_set(tmp_path / "ids", pipe, tiny_models["qwen3_vl"], n=3)
    f = tmp_path / "ids" / "seed_1" / "vl_features.safetensors"
    from safetensors.torch import load_file
    z = load_file(f)["z"]
    settings = feature_settings(identify_model(tiny_models["qwen3_vl"]), SYNTH_FEATURES, "fp32")
    atomic_save_safetensors({"z": z}, f, {**{k: v for k, v in settings.items() if k != "max_images"}, "D": "32"})
    with pytest.raises(ValueError, match=r"seed_1.*max_images.*refgen features"):
        train_head(tmp_path / "ids", tmp_path / "h", HeadConfig(epochs=1), progress=False)
    atomic_save_safetensors({"z": z}, f, {**settings, "max_images": "8", "D": "32"})
    with pytest.raises(ValueError, match=r"seed_1: teacher/feature settings"):
        train_head(tmp_path / "ids", tmp_path / "h", HeadConfig(epochs=1), progress=False)


def test_head_loss_is_zero_at_the_target():
    t = torch.randn(3, 2, 8)
    loss, m = head_loss(t, t)
    assert loss.item() < 1e-6 and m["cos"] == pytest.approx(1.0)


def test_head_trains_data_parallel_under_torchrun(pipe, tiny_models, tmp_path):
    """2 ranks (gloo), 7 identities in batches of 3: shares 2/1, 2/1 and 1/0 (one rank has nothing in the last
    batch and must still join the all-reduce). The result is the single-process run's: same weights, same loss."""
    _synthetic_set(tmp_path / "ids", pipe, tiny_models["qwen3_vl"], n=7)
    cfg = HeadConfig(epochs=2, batch_size=3, lr=1e-2, val_fraction=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "refgen.cli", "train-head", str(tmp_path / "ids"), "--out", str(tmp_path / "h"), "--epochs", "2",
           "--batch-size", "3", "--lr", "1e-2", "--val-fraction", "0", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[:3000] + "\n...\n" + r.stderr[-1500:]   # a rank's own error comes first
    train_head(tmp_path / "ids", tmp_path / "one", cfg, progress=False)
    ddp = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(ddp) == 2  # rank 0 logs once per epoch
    assert [d["loss"] for d in ddp] == pytest.approx([o["loss"] for o in one], rel=1e-5)
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "h" / "head.safetensors"), load_file(tmp_path / "one" / "head.safetensors")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_generate_two_people_ref_and_residual_and_errors(pipe, tiny_models, tmp_path, capsys, monkeypatch):
    _synthetic_set(tmp_path / "ids", pipe, tiny_models["qwen3_vl"], n=6)
    train_head(tmp_path / "ids", tmp_path / "head", HeadConfig(epochs=1, val_fraction=0), progress=False)
    ref = _photos(tmp_path / "person")
    res = tmp_path / "ids" / "seed_0" / "teacher_residual.safetensors"
    m, vl = tiny_models["qwen_image"], tiny_models["qwen3_vl"]
    head = str(tmp_path / "head" / "head.safetensors")
    common = ["--seeds", "0,1", "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--dtype", "fp32"]
    base = ["generate", "--model", m, "--vl-model", vl, "--head", head] + common
    out = tmp_path / "out"
    # the features were made with the absolute path; the same folder spelled relatively is the same model
    monkeypatch.chdir(Path(vl).parent)
    ok = ["generate", "--model", m, "--vl-model", "./" + Path(vl).name, "--head", head] + common + [
        "--prompt", "~ID~ and ~ID~ on a beach", "--ref", str(ref), "--residual", str(res),
        "--alpha", "1.2", "--alpha", "0.9", "--grid-alphas", "0.5,1", "--out", str(out)]
    patches = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda mod, a: patches.append(a[0].shape[0]) if type(mod).__name__ == "Qwen3VLVisionModel" else None)
    try:
        assert main(ok) == 0
    finally:
        hook.remove()
    # the head's features saw one photo (max_images=1), within its pixel budget: so do generate's
    expected = sum(w * h for w, h in budget_sizes([(96, 64)], SYNTH_FEATURES)) // 256
    assert patches == [expected] and expected < sum(w * h for w, h in budget_sizes([(96, 64)] * 3,
                                                                                   SYNTH_FEATURES)) // 256
    rec = json.loads((out / "generate.json").read_text())
    assert rec["alphas"] == [1.2, 0.9] and [p["kind"] for p in rec["config"]["people"]] == ["ref", "residual"]
    assert (out / "seed0.png").exists() and (out / "seed1.png").exists() and (out / "grid" / "grid.png").exists()
    assert len(rec["slots"]) == 2

    bad_dir = tmp_path / "empty_ref"
    bad_dir.mkdir()
    cases = [
        (["--prompt", "~ID~ on a beach", "--residual", str(res), "--residual", str(res)], "2 identities"),
        (["--prompt", "a beach", "--residual", str(res)], "no placeholder"),
        (["--prompt", "~ID~ and ~ID~", "--residual", str(res), "--ref", str(bad_dir)], "no readable image"),
        (["--prompt", "~ID~ and ~ID~", "--residual", str(res), "--residual", str(res), "--alpha", "1",
          "--alpha", "2", "--alpha", "3"], "3 alphas for 2 people"),
    ]
    for extra, msg in cases:
        assert main(base + extra + ["--out", str(out)]) == 1, extra
        assert msg in capsys.readouterr().err, msg

    other = tmp_path / "other-vl"                  # another model: same layout, another config
    other.mkdir()
    cfg = json.loads((Path(vl) / "config.json").read_text())
    cfg["vision_config"]["out_hidden_size"] += 1
    (other / "config.json").write_text(json.dumps(cfg))
    from safetensors import safe_open
    with safe_open(head, "pt") as f:               # a head from before the feature settings were recorded
        old_md = {k: v for k, v in f.metadata().items() if k != "feature_settings"}
        atomic_save_safetensors({k: f.get_tensor(k) for k in f.keys()}, tmp_path / "old_head.safetensors", old_md)
    vl_cases = [
        ("some/other-vl", head, ["does not fit", "hub:some/other-vl", "not found here"]),
        (str(other), head, ["does not fit", str(other), str(Path(vl).resolve())]),
        ("./missing-vl", head, ["--vl-model './missing-vl' not found"]),
        (vl, str(tmp_path / "old_head.safetensors"), ["does not record the feature setting", "max_images"]),
    ]
    for vl_arg, head_arg, msgs in vl_cases:
        cmd = ["generate", "--model", m, "--vl-model", vl_arg, "--head", head_arg, "--prompt", "~ID~", "--ref",
               str(ref)] + common + ["--out", str(out)]
        assert main(cmd) == 1, vl_arg
        err = capsys.readouterr().err
        assert all(x in err for x in msgs), (msgs, err)
    rep = build_report(None, [out])
    assert rep["generate"]["ok"] == 1 and rep["generate"]["errors_by_kind"] == {
        "bad_input": 2, "head_mismatch": 3, "missing_file": 1, "slot": 2}
    assert main(["report", "--runs", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert "head_mismatch | 3" in (tmp_path / "rep.md").read_text()


def test_regression_onto_token_teachers_is_refused_with_the_way_out(pipe, tmp_path):
    from refgen.identity.head import load_pairs
    from refgen.identity.tokens import placeholder_embeds, save_tokens, token_metadata

    d = tmp_path / "ids" / "seed_0"
    d.mkdir(parents=True)
    ph = placeholder_embeds(pipe)
    save_tokens(d / "teacher_tokens.safetensors", ph + 1, ph, token_metadata(pipe, "tiny"))  # the default mode's file
    with pytest.raises(ValueError, match=r"seed_0 has teacher_tokens.safetensors.*rms_scaled or free.*e2e"):
        load_pairs(tmp_path / "ids")
