import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from refgen.artifacts import atomic_save_safetensors
from refgen.cli import main
from refgen.identity.features import FeatureConfig, VisionFeatures, budget_sizes, extract_features, per_image_embeds
from refgen.identity.head import HeadConfig, LinearHead, head_loss, load_head, train_head
from refgen.identity.inject import residual_metadata, save_residual
from refgen.identity.prompts import encode_prompts
from refgen.identity.report import build_report


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


def test_features_are_unit_norm_and_cached(tiny_models, tmp_path):
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
    other = extract_features(tmp_path, tiny_models["qwen3_vl"], "cpu", "fp32", FeatureConfig(pixel_budget=0.03e6),
                             progress=False)
    assert other["extracted"] == 2  # changed settings are not served from the cache


def _synthetic_set(root, pipe, vl_model, n=40, seed=0):
    """Identities whose teacher residual is a fixed (unknown) function of z: learnable by the head."""
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
        atomic_save_safetensors({"z": z}, d / "vl_features.safetensors",
                                {"vl_model": vl_model, "pixel_budget": "20000.0", "max_side": "1536", "D": str(D)})
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
    assert len(meta["val_ids"]) == 4 and not set(meta["val_ids"]) & set(meta["train_ids"])  # split by identity
    assert (tmp_path / "head" / "head_epoch030.safetensors").exists()
    h, md = load_head(tmp_path / "head" / "head.safetensors", torch.device("cpu"), torch.float32)
    assert md["epoch"] == "30" and h(torch.randn(2, 32)).shape == (2, int(md["L"]), int(md["H"]))
    rep = build_report(tmp_path / "head" / "head.json")
    assert rep["head"]["val_cos"] == pytest.approx(summary["val_cos"])


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
    assert r.returncode == 0, r.stderr[-2000:]
    train_head(tmp_path / "ids", tmp_path / "one", cfg, progress=False)
    ddp = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(ddp) == 2  # rank 0 logs once per epoch
    assert [d["loss"] for d in ddp] == pytest.approx([o["loss"] for o in one], rel=1e-5)
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "h" / "head.safetensors"), load_file(tmp_path / "one" / "head.safetensors")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_generate_two_people_ref_and_residual_and_errors(pipe, tiny_models, tmp_path, capsys):
    _synthetic_set(tmp_path / "ids", pipe, tiny_models["qwen3_vl"], n=6)
    train_head(tmp_path / "ids", tmp_path / "head", HeadConfig(epochs=1, val_fraction=0), progress=False)
    ref = _photos(tmp_path / "person")
    res = tmp_path / "ids" / "seed_0" / "teacher_residual.safetensors"
    m, vl = tiny_models["qwen_image"], tiny_models["qwen3_vl"]
    base = ["generate", "--model", m, "--vl-model", vl, "--head", str(tmp_path / "head" / "head.safetensors"),
            "--seeds", "0,1", "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--dtype", "fp32"]
    out = tmp_path / "out"
    ok = base + ["--prompt", "~ID~ and ~ID~ on a beach", "--ref", str(ref), "--residual", str(res),
                 "--alpha", "1.2", "--alpha", "0.9", "--grid-alphas", "0.5,1", "--out", str(out)]
    assert main(ok) == 0
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
    wrong_vl = ["generate", "--model", m, "--vl-model", "some/other-vl", "--head",
                str(tmp_path / "head" / "head.safetensors"), "--prompt", "~ID~", "--ref", str(ref), "--steps", "2",
                "--height", "32", "--width", "32", "--device", "cpu", "--dtype", "fp32", "--out", str(out)]
    assert main(wrong_vl) == 1 and "does not fit" in capsys.readouterr().err
    rep = build_report(None, [out])
    assert rep["generate"]["ok"] == 1 and rep["generate"]["errors_by_kind"] == {
        "bad_input": 2, "head_mismatch": 1, "slot": 2}
    assert main(["report", "--runs", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert "head_mismatch | 1" in (tmp_path / "rep.md").read_text()
