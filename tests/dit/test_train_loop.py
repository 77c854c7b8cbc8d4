"""Training NanoDiT on the tiny configuration: loss falls, bit-exact resume, warm start, CFG dropout, EMA,
metrics, configs, and the validate / benchmark entry points in their tiny forms."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from refgen import flow
from refgen.artifacts import read_jsonl
from refgen.dit.config import (CFGDropout, TrainConfig, load_train_config, model_preset, to_dict,
                               train_config_from_dict)
from refgen.dit.model import Cond, NanoDiT
from refgen.dit.train import (load_checkpoint, load_weights_report, model_from_checkpoint, sample_cfg_drop,
                              train)

REPO = Path(__file__).resolve().parents[2]


def synthetic_batches(n: int = 4, B: int = 4, seed: int = 0) -> list[dict]:
    """Batches in the data contract's format, alternating two buckets (8x8 and 8x16 latents)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        h, w = (8, 8) if i % 2 == 0 else (8, 16)
        out.append({"latent": torch.randn(B, 4, h, w, generator=g), "t5": torch.randn(B, 8, 16, generator=g),
                    "t5_mask": torch.arange(8).expand(B, 8) < torch.randint(2, 9, (B, 1), generator=g),
                    "dino_cls": torch.randn(B, 16, generator=g),
                    "dino_patches": torch.randn(B, (h // 2) * (w // 2), 16, generator=g),
                    "caption": [f"c{i}"] * B, "key": [f"k{i}_{j}" for j in range(B)]})
    return out


def tiny_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(model=model_preset("tiny"), model_preset="tiny", out_dir=str(out), steps=6, batch_size=4,
                effective_batch=4, lr=3e-3, lr_warmup_steps=2, ema_decay=0.999, device="cpu", dtype="fp32",
                ckpt_every=3, log_every=1, resume="auto", progress=False, num_workers=0)
    base.update(kw)
    return TrainConfig(**base)


@torch.no_grad()
def eval_loss(model: NanoDiT, batches: list[dict]) -> float:
    """Flow loss at fixed noise levels and noise, conditions as given: comparable before / after training."""
    g = torch.Generator().manual_seed(123)
    total = 0.0
    for b in batches:
        x0 = b["latent"]
        sig = torch.linspace(0.1, 0.9, x0.shape[0])
        total += float(flow.loss(model, x0, Cond.from_batch(b), sigma=sig, noise=torch.randn(x0.shape, generator=g)))
    return total / len(batches)


def test_loss_falls_on_tiny_overfit(tmp_path):
    data = synthetic_batches(2)
    cfg = tiny_cfg(tmp_path, steps=150, ckpt_every=150, log_every=50, lr=5e-3, lr_warmup_steps=10,
                   cfg_dropout=CFGDropout(uncond=0.0, text_only=0.0, dino_only=0.0, both=1.0))
    init = NanoDiT(cfg.model)
    before = eval_loss(init, data)
    summary = train(cfg, data)
    ema, _ = model_from_checkpoint(summary["checkpoint"], "cpu")
    trained, _ = model_from_checkpoint(summary["checkpoint"], "cpu", use_ema=False)
    after, after_ema = eval_loss(trained, data), eval_loss(ema, data)
    assert after < 0.75 * before, (before, after)
    assert after_ema < 0.9 * before, (before, after_ema)    # the warmed-up EMA follows, it is not stuck at init
    rec = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rec] == [50, 100, 150]
    for key in ("loss", "grad_norm", "velocity_norm", "lr", "images_per_s", "ema_decay"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rec), key
    assert rec[-1]["loss"] < rec[0]["loss"]


def _states(path) -> dict:
    ck = load_checkpoint(path)
    return {"model": ck["model"], "ema": ck["ema"], "opt": ck["optimizer"]["state"], "step": ck["step"],
            "consumed": ck["batches_consumed"]}


def _assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_resume_continues_bit_exactly(tmp_path):
    data = synthetic_batches(3)     # 3 batches: resume lands mid-epoch
    # grad accumulation 2 (effective batch 8 from micro batches of 4)
    straight = train(tiny_cfg(tmp_path / "a", steps=6, effective_batch=8), data)
    first = train(tiny_cfg(tmp_path / "b", steps=3, effective_batch=8), data)
    assert first["step"] == 3
    # as if the first run had been killed after logging a step past its checkpoint: the resumed run replays it
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n")
    resumed = train(tiny_cfg(tmp_path / "b", steps=6, effective_batch=8), data)
    assert resumed["resumed_from"].endswith("step_0000003.pt") and resumed["grad_accum"] == 2
    a, b = _states(straight["checkpoint"]), _states(resumed["checkpoint"])
    assert a["step"] == b["step"] == 6 and a["consumed"] == b["consumed"] == 12
    _assert_same(a, b)
    steps = [r["step"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == steps and 4 in steps
    assert 9.0 not in [r["loss"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")]
    ck = load_checkpoint(resumed["checkpoint"])
    assert train_config_from_dict(ck["config"]).model == model_preset("tiny")   # config travels with it
    assert "rng" in ck and "provenance" in ck


def test_warm_start_reports_missing_and_unexpected_keys(tmp_path):
    data = synthetic_batches(2)
    src = train(tiny_cfg(tmp_path / "src", steps=2, ckpt_every=2), data)
    ck = load_checkpoint(src["checkpoint"])
    # an "old" checkpoint: no DINO-patch parameters (a text+CLS model grown into one with patches), one
    # parameter the model does not have, and one with another shape
    old = {k: v for k, v in ck["ema"].items() if not k.startswith(("patch_proj.", "null_patch"))}
    old["old_head.weight"] = torch.zeros(3)
    old["text_proj.bias"] = torch.zeros(7)
    path = tmp_path / "old.pt"
    torch.save({"model": old}, path)

    summary = train(tiny_cfg(tmp_path / "warm", steps=1, init_from=str(path), resume=None), data)
    rep = summary["warm_start"]
    assert rep["missing"] == ["null_patch", "patch_proj.bias", "patch_proj.weight", "text_proj.bias"]
    assert rep["unexpected"] == ["old_head.weight"]
    assert len(rep["shape_mismatch"]) == 1 and rep["shape_mismatch"][0].startswith("text_proj.bias")
    assert json.loads((tmp_path / "warm" / "warm_start.json").read_text())["missing"] == rep["missing"]
    # the weights that match were loaded
    m = NanoDiT(model_preset("tiny"))
    load_weights_report(m, old)
    torch.testing.assert_close(m.blocks[1].mlp[0].weight, ck["ema"]["blocks.1.mlp.0.weight"])


def test_cfg_dropout_frequencies():
    g = torch.Generator().manual_seed(0)
    dt, dd = sample_cfg_drop(40000, CFGDropout(), g, "cpu")
    uncond = (dt & dd).float().mean()
    text_only = (~dt & dd).float().mean()
    dino_only = (dt & ~dd).float().mean()
    both = (~dt & ~dd).float().mean()
    for got, want in ((uncond, 0.10), (text_only, 0.30), (dino_only, 0.05), (both, 0.55)):
        assert abs(float(got) - want) < 0.01
    with pytest.raises(ValueError, match="sum to 1"):
        CFGDropout(uncond=0.5, text_only=0.5, dino_only=0.5, both=0.0).validate()


def test_ema_follows_diffusers_ema_model(tmp_path):
    """The EMA that train() keeps, step by step, against diffusers' EMAModel with the same warm-up
    ((1 + t) / (10 + t), capped at ema_decay) fed the same weights. The two differ only at the first update
    (diffusers copies the weights, train() keeps 1/10 of the initialisation), so the reference starts from
    train()'s EMA after step 1. ema_decay 0.3 makes the cap take over at step 4."""
    from diffusers.training_utils import EMAModel

    steps = 6
    train(tiny_cfg(tmp_path, steps=steps, ckpt_every=1, log_every=1, ema_decay=0.3, ema_warmup=10.0),
          synthetic_batches(2))
    names = [n for n, _ in NanoDiT(model_preset("tiny")).named_parameters()]
    cks = [load_checkpoint(tmp_path / "checkpoints" / f"step_{k:07d}.pt") for k in range(1, steps + 1)]
    logged = [r["ema_decay"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    ref = EMAModel([torch.nn.Parameter(cks[0]["ema"][n].clone()) for n in names], decay=0.3,
                   use_ema_warmup=False)
    ref.optimization_step = 1
    for k in range(1, steps):
        ref.step([torch.nn.Parameter(cks[k]["model"][n]) for n in names])
        assert logged[k] == pytest.approx(ref.cur_decay_value), k
        for n, shadow in zip(names, ref.shadow_params):
            torch.testing.assert_close(cks[k]["ema"][n], shadow, msg=lambda m, n=n, k=k: f"step {k + 1} {n}: {m}")
    assert logged[-1] == 0.3 and logged[1] < 0.3
    assert not torch.equal(cks[-1]["ema"][names[-1]], cks[-1]["model"][names[-1]])


def test_configs_load_and_validate(tmp_path):
    nano = load_train_config(REPO / "configs" / "dit_nano.yaml")
    assert (nano.model.depth, nano.model.hidden_size, nano.model.num_heads) == (12, 384, 6)
    assert nano.effective_batch == 256 and nano.grad_accum(1) == 16 and nano.dtype == "bf16"
    tiny = load_train_config(REPO / "configs" / "dit_tiny.yaml")
    assert tiny.model == model_preset("tiny")
    base = load_train_config(REPO / "configs" / "dit_base.yaml")
    assert base.model == model_preset("base") and base.compile and base.cross_attention == "zpad"
    assert base.grad_accum(1) == 2 and base.grad_accum(2) == 1
    assert train_config_from_dict(to_dict(nano)) == nano                         # the checkpoint round trip
    with pytest.raises(ValueError, match="fp16"):
        dataclasses.replace(nano, dtype="fp16").validate()
    with pytest.raises(ValueError, match="unknown keys"):
        train_config_from_dict({"model": "nano", "stpes": 3})
    with pytest.raises(ValueError, match="multiple"):
        dataclasses.replace(nano, batch_size=24).grad_accum(1)


def test_validate_tiny_runs(tmp_path):
    from refgen.dit.validate import ToySet, presets, run_validation, segment

    rep = run_validation("tiny", tmp_path, device="cpu", progress=False)
    res = rep["results"]
    assert set(res) == {"overfit", "dino_swap", "text_control"}
    assert res["overfit"]["n"] == res["dino_swap"]["n"] == 2
    for f in ("validate.json", "overfit.png", "dino_swap.png", "text_control.png"):
        assert (tmp_path / f).is_file()
    # the measurements themselves, on ground truth: segmentation finds the drawn object and its colours
    data = ToySet(presets()["tiny"])
    img = (data.images[0] + 1) / 2
    m, bg, obj = segment(img)
    gt = data.masks[0] > 0.5
    assert (m & gt).sum() / (m | gt).sum() > 0.8
    # the toy latents round-trip through the toy "VAE" and the dataset statistics
    torch.testing.assert_close(data.decode(data.latents[:2]), (data.images[:2] + 1) / 2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("offset", [0, 1])
def test_validate_measures_an_oracle_against_the_ground_truth(tmp_path, monkeypatch, offset):
    """The overfit test's identification and PSNR with a generator that returns the ground-truth latents of the
    image whose DINO features it is given (offset 0), or of the next image (offset 1): identification 1 and a
    PSNR at the clamp, or identification 0 and the PSNR of two different images."""
    import refgen.dit.validate as validate

    data = validate.ToySet(validate.presets()["tiny"])
    keys = torch.cat([data.cls, data.patches.flatten(1)], 1)         # layout (patches) + look (CLS): unique

    def oracle(model, cond, hw, **kw):
        k = torch.cdist(torch.cat([cond.dino_cls, cond.dino_patches.flatten(1)], 1).cpu(), keys).argmin(1)
        return data.latents[(k + offset) % len(data.latents)]

    monkeypatch.setattr(validate, "sample", oracle)
    res = validate.run_validation("tiny", tmp_path, device="cpu", progress=False)["results"]["overfit"]
    gt = (data.images + 1) / 2
    if offset == 0:
        assert res["identification_acc"] == 1.0 and res["psnr_own_db"] > 60
    else:
        assert res["identification_acc"] == 0.0
        other = validate.psnr(gt[1:3], gt[0:2]).mean().item()
        assert res["psnr_own_db"] == pytest.approx(other, abs=0.1)


def test_throughput_bench_tiny(tmp_path, bench_module):
    mod = bench_module("dit_throughput")
    out = tmp_path / "bench.json"
    assert mod.main(["--tiny", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["results"][0]
    assert r["images_per_s"] > 0 and r["train_gflop_per_image"] > 0 and 0 < r["mfu"] < 1


def test_cross_attention_choice_trains_the_same_model(tmp_path):
    """The training config's cross_attention only changes how padded text keys are skipped: the masked
    reference and the unmasked exact paths give the same losses and weights (fp32 on the CPU)."""
    data = synthetic_batches()
    runs = {c: train(tiny_cfg(tmp_path / c, steps=3, effective_batch=8, cross_attention=c), data)
            for c in ("mask", "zpad")}
    la = [r["loss"] for r in read_jsonl(tmp_path / "mask" / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_jsonl(tmp_path / "zpad" / "metrics.jsonl") if "loss" in r]
    assert len(la) == 3 and la == pytest.approx(lb, rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="cross_attention"):
        tiny_cfg(tmp_path / "bad", cross_attention="flex").validate()


def test_yaml_configs_mirror_every_train_config_field():
    """configs/dit_*.yaml list every TrainConfig field (new options such as compile_tuning included), so a
    config file shows every knob a run used."""
    import yaml

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model_preset"}
    for name in ("dit_nano.yaml", "dit_tiny.yaml", "dit_base.yaml"):
        keys = set(yaml.safe_load((REPO / "configs" / name).read_text()))
        assert fields <= keys, f"{name} lacks {sorted(fields - keys)}"


def test_compile_tuning_sets_coordinate_descent(tmp_path, monkeypatch):
    """compile_tuning turns on inductor's coordinate-descent tuning (code generation only) before the first
    compile; without compile it leaves inductor alone. The compile itself is stubbed: this checks the wiring."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "coordinate_descent_tuning", False)
    monkeypatch.setattr(NanoDiT, "compile_blocks", lambda self, **kw: self)
    data = synthetic_batches()
    train(tiny_cfg(tmp_path / "a", steps=1, effective_batch=8, compile_tuning=True), data)
    assert inductor_config.coordinate_descent_tuning is False          # compile off: untouched
    train(tiny_cfg(tmp_path / "b", steps=1, effective_batch=8, compile=True, compile_tuning=True), data)
    assert inductor_config.coordinate_descent_tuning is True


def test_train_e2e_bench_tiny(tmp_path, bench_module):
    """bench/dit_train_e2e.py drives refgen.dit.train.train itself (with and without grad accumulation) and
    reads images/s back from the run's metrics."""
    mod = bench_module("dit_train_e2e")
    out = tmp_path / "e2e.json"
    assert mod.main(["--tiny", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["grad_accum"] for r in rows] == [1, 2]
    assert all(r["images_per_s"] > 0 and 0 < r["mfu"] < 1 and len(r["windows_images_per_s"]) == 2 for r in rows)


def test_coordinate_descent_tuning_is_set_on_torchs_own_config():
    # the one private inductor knob refgen sets: this torch must have it (asked in a fresh process: other tests
    # patch the config module), and a config without it fails loudly
    import subprocess
    import sys
    import types

    from refgen.dit.train import enable_coordinate_descent_tuning

    r = subprocess.run([sys.executable, "-c", "import torch._inductor.config as c; "
                        "assert c.coordinate_descent_tuning is False, c.coordinate_descent_tuning"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = types.SimpleNamespace(coordinate_descent_tuning=False)
    enable_coordinate_descent_tuning(cfg)
    assert cfg.coordinate_descent_tuning is True
    with pytest.raises(RuntimeError, match="no torch._inductor.config.coordinate_descent_tuning"):
        enable_coordinate_descent_tuning(types.SimpleNamespace())  # a torch whose config lacks the knob
