"""FP8 training (TrainConfig.fp8, refgen.dit.fp8): refused off-CUDA and without FP8 tensor cores with one clear
line, before anything is written; the conversion swaps exactly the token GEMMs, keeps the Parameter objects and
the state-dict keys, and really computes in FP8 (torchao's float8 GEMM also runs, emulated, on this CPU: the
numbers move by FP8's rounding, not more). The speed comparison against bf16 is a GPU run (docs/dit.md)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from refgen.dit.config import model_preset
from refgen.dit.model import Cond, NanoDiT
from refgen.runtime import PolicyError

from test_train_loop import synthetic_batches, tiny_cfg   # tests/dit is on sys.path (rootdir-relative import)

REPO = Path(__file__).resolve().parents[2]


def test_fp8_off_cuda_is_refused_before_anything_is_written(tmp_path, capsys, data_prepared):
    from refgen.cli import main
    from refgen.dit.train import train

    with pytest.raises(PolicyError, match=r"fp8: true needs a CUDA GPU with FP8 tensor cores .* the device is cpu"):
        train(tiny_cfg(tmp_path / "run", dtype="bf16", fp8=True), synthetic_batches(1))
    assert not (tmp_path / "run").exists()
    cfg = yaml.safe_load((REPO / "configs" / "dit_tiny.yaml").read_text())
    cfg.update(fp8=True, dtype="bf16", out_dir=str(tmp_path / "cli"))
    (tmp_path / "fp8.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["dit", "train", "--config", str(tmp_path / "fp8.yaml"), "--data-dir", str(data_prepared[0])]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("refgen dit train: error: fp8: true needs a CUDA GPU") and "\n" not in err, err
    assert not (tmp_path / "cli").exists()
    with pytest.raises(ValueError, match="fp8: true runs the FP8 GEMMs inside bf16 autocast"):
        tiny_cfg(tmp_path, fp8=True, dtype="fp32").validate()


def test_a_gpu_without_fp8_tensor_cores_is_refused(monkeypatch):
    from refgen.dit import fp8

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    with pytest.raises(PolicyError, match=r"needs compute capability >= 8.9; NVIDIA A100 is 8.0"):
        fp8.check_fp8_device(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    pytest.importorskip("torchao")
    fp8.check_fp8_device(torch.device("cuda"))          # Hopper with torchao: accepted


def test_conversion_swaps_the_token_gemms_keeps_parameters_and_computes_in_fp8():
    pytest.importorskip("torchao")
    from refgen.dit.fp8 import convert_to_fp8

    cfg = dataclasses.replace(model_preset("tiny"), hidden_size=64, num_heads=2)
    torch.manual_seed(0)
    model = NanoDiT(cfg)
    for blk in model.blocks:   # open adaLN-Zero's gates and the zero-initialised outputs, so every GEMM counts
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.1)
        torch.nn.init.normal_(blk.cross_attn.proj.weight, std=0.1)
    torch.nn.init.normal_(model.final.linear.weight, std=0.1)
    ref = copy.deepcopy(model)
    before = {n: id(p) for n, p in model.named_parameters()}
    done = convert_to_fp8(model)
    per_block = ["attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.kv", "cross_attn.proj", "mlp.0", "mlp.2"]
    assert done == [f"blocks.{i}.{m}" for i in range(cfg.depth) for m in per_block]
    assert {n: id(p) for n, p in model.named_parameters()} == before          # the optimizer keeps its params
    assert [n for n, _ in model.named_parameters()] == list(before)            # in order: the EMA lerps by position
    plain = NanoDiT(cfg)
    plain.load_state_dict(model.state_dict())                                  # checkpoints load for sampling

    g = torch.Generator().manual_seed(1)
    b = synthetic_batches(1)[0]
    b["dino_patches"] = torch.randn(4, 16, 16, generator=g)
    x, sigma, cond = b["latent"], torch.rand(4, generator=g), Cond.from_batch(b)
    y, y_ref = model(x, sigma, cond), ref(x, sigma, cond)
    rel = float((y - y_ref).detach().norm() / y_ref.detach().norm())
    assert 1e-3 < rel < 0.1, rel                        # FP8 rounding (e4m3: 3 mantissa bits), and no more
    y.square().mean().backward()
    y_ref.square().mean().backward()
    gw = dict(model.named_parameters())["blocks.0.mlp.0.weight"].grad
    gw_ref = dict(ref.named_parameters())["blocks.0.mlp.0.weight"].grad
    assert float((gw - gw_ref).norm() / gw_ref.norm()) < 0.25


def test_the_recipe_reaches_torchao_and_a_bad_name_is_refused(tmp_path):
    pytest.importorskip("torchao")
    from refgen.dit.config import FP8_RECIPES, train_config_from_dict
    from refgen.dit.fp8 import convert_to_fp8

    from torchao.float8 import ScalingGranularity, ScalingType

    cfg = dataclasses.replace(model_preset("tiny"), hidden_size=32, num_heads=2)
    for recipe, granularity in (("tensorwise", ScalingGranularity.TENSORWISE),
                                ("rowwise", ScalingGranularity.AXISWISE),
                                ("rowwise_with_gw_hp", ScalingGranularity.AXISWISE)):
        model = NanoDiT(cfg)
        convert_to_fp8(model, recipe)
        c = model.blocks[0].mlp[0].config                     # what torchao's Float8Linear computes with
        assert c.cast_config_input.scaling_granularity is granularity, recipe
        assert c.round_scales_to_power_of_2 is (recipe != "tensorwise")
        # the one recipe that keeps the weight-gradient GEMM in high precision
        assert (c.cast_config_input_for_grad_weight.scaling_type is ScalingType.DISABLED) is (
            recipe == "rowwise_with_gw_hp")
    assert FP8_RECIPES[0] == "tensorwise"
    with pytest.raises(ValueError, match="fp8 recipe 'blockwise': choose one of tensorwise, rowwise, "
                                         "rowwise_with_gw_hp"):
        convert_to_fp8(NanoDiT(cfg), "blockwise")
    # the config refuses it before a run starts, from YAML as from code
    assert tiny_cfg(tmp_path, fp8_recipe="rowwise").fp8_recipe == "rowwise"
    with pytest.raises(ValueError, match="fp8_recipe must be one of tensorwise, rowwise, rowwise_with_gw_hp, "
                                         "got 'row_wise'"):
        tiny_cfg(tmp_path, fp8_recipe="row_wise").validate()
    d = yaml.safe_load((REPO / "configs" / "dit_tiny.yaml").read_text())
    assert d["fp8_recipe"] == "tensorwise"                  # bf16 stays the default; tensorwise with fp8: true
    with pytest.raises(ValueError, match="fp8_recipe must be one of"):
        train_config_from_dict({**d, "fp8_recipe": "mxfp8"})


def test_train_converts_with_the_configured_recipe_before_compiling(tmp_path, monkeypatch):
    """train() converts with cfg.fp8_recipe, and only then compiles the blocks (torchao: convert, then compile).
    The device check is lifted (this CPU has no FP8 tensor cores) and compile is recorded, not run."""
    pytest.importorskip("torchao")
    from refgen.dit import fp8
    from refgen.dit.model import NanoDiT as Model
    from refgen.dit.train import train

    events = []
    real = fp8.convert_to_fp8
    monkeypatch.setattr(fp8, "check_fp8_device", lambda device: None)
    monkeypatch.setattr(fp8, "convert_to_fp8", lambda m, recipe="tensorwise": events.append(("convert", recipe))
                        or real(m, recipe))

    def compile_blocks(self, **kw):
        events.append(("compile", {type(b.mlp[0]).__name__ for b in self.blocks}))
        return self

    monkeypatch.setattr(Model, "compile_blocks", compile_blocks)
    cfg = tiny_cfg(tmp_path / "run", steps=1, effective_batch=4, batch_size=4, fp8=True, fp8_recipe="rowwise",
                   dtype="bf16", compile=True)
    train(cfg, synthetic_batches(1))
    assert events == [("convert", "rowwise"), ("compile", {"Float8Linear"})]


def test_fp8_gemm_bench_tiny_writes_its_table_and_json(tmp_path, bench_module, capsys, monkeypatch):
    """bench/dit_fp8_gemm.py --tiny: the token GEMM shapes read from the model, every part for bf16 and each
    recipe (emulated FP8 on this CPU), the JSON with provenance; a recipe the CPU cannot run is skipped with its
    reason in --tiny mode, not fatal."""
    pytest.importorskip("torchao")
    mod = bench_module("dit_fp8_gemm")
    out = tmp_path / "g.json"
    assert mod.main(["--tiny", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["git_commit"] and res["torchao"] and res["settings"]["recipes"] == ["tensorwise", "rowwise"]
    (w,) = res["widths"]
    # the tiny preset's converted GEMMs: 7 per block, 2 blocks; M = batch 2 x 16 image tokens (25 for kv's context)
    shapes = {tuple(g["modules"]): (g["M"], g["K"], g["N"], g["count"]) for g in w["gemms"]}
    assert shapes == {("attn.qkv",): (32, 32, 96, 2),
                      ("attn.proj", "cross_attn.q", "cross_attn.proj"): (32, 32, 32, 6),
                      ("cross_attn.kv",): (50, 32, 64, 2), ("mlp.0",): (32, 32, 128, 2), ("mlp.2",): (32, 128, 32, 2)}
    for g in w["gemms"]:
        for part in ("linear", "kernel"):
            assert g[part]["bf16"]["ms"] > 0 and g[part]["rowwise"]["speedup"] > 0, (part, g)
    for part in ("block", "model"):
        assert all(w[part][v]["ms"] > 0 for v in ("bf16", "tensorwise", "rowwise")), part
    sm = w["summary"]["tensorwise"]
    share = sm["gemm_share_of_bf16_step"]  # two separate timings: on a loaded CPU the share can pass 1, no bound
    assert share > 0 and sm["ideal_speedup_2x_gemms"] == pytest.approx(1 / max(1 - share / 2, 1e-9))
    assert {"predicted_step_speedup", "measured_step_speedup"} <= set(sm)
    table = capsys.readouterr().out
    assert "attn.qkv" in table and "model fwd+bwd" in table and "converted GEMMs =" in table

    def no_rowwise(shape, recipe, s, device):
        if recipe == "rowwise":
            raise RuntimeError("no rowwise kernel here")
        return real(shape, recipe, s, device)

    real = mod.kernel_case
    monkeypatch.setattr(mod, "kernel_case", no_rowwise)
    assert mod.main(["--tiny", "--parts", "kernel", "--out", str(out)]) == 0
    g = json.loads(out.read_text())["widths"][0]["gemms"][0]
    assert g["kernel"]["rowwise"] == {"skipped": "RuntimeError: no rowwise kernel here"} and "linear" not in g
    assert ("skipped kernel ('attn.qkv',) rowwise on the CPU: RuntimeError: no rowwise kernel here"
            in capsys.readouterr().out)
    with pytest.raises(SystemExit):
        mod.main(["--tiny", "--recipes", "blockwise", "--out", str(out)])
