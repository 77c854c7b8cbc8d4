"""FP8 training (TrainConfig.fp8, refgen.dit.fp8): refused off-CUDA and without FP8 tensor cores with one clear
line, before anything is written; the conversion swaps exactly the token GEMMs, keeps the Parameter objects and
the state-dict keys, and really computes in FP8 (torchao's float8 GEMM also runs, emulated, on this CPU: the
numbers move by FP8's rounding, not more). The speed comparison against bf16 is a GPU run (docs/dit.md)."""

from __future__ import annotations

import copy
import dataclasses
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
