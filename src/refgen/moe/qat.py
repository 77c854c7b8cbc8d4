"""Quantisation-aware training with torchao's pt2e flow (prepare_qat_pt2e -> fine-tune -> convert_pt2e), the
flow PyTorch points to now that torch.ao.quantization is slated for removal (spec §7.12).

Two decisions, both measured on the digits model (docs/moe.md):
  - BatchNorm is folded into the convolutions *before* QAT. With BatchNorm in the graph, convert_pt2e (torchao
    0.18, torch 2.13) left every conv weight float and the BatchNorm nodes in place: the exported "int8" ONNX was
    larger than the fp32 one. Folded first, the conv weights become int8 constants.
  - The stem and the gate stay float and frozen (X86InductorQuantizer with no qconfig for them): fine-tuning or
    quantising the gate changed its top-k team for most inputs (agreement 44 % after one epoch), which the gate
    agreement check exists to catch.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
import torch.nn as nn

FLOAT_MODULES = ("model.stem", "model.gate")


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """In place: every (Conv2d, BatchNorm2d) pair inside an nn.Sequential becomes the folded Conv2d + Identity."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.children():
        if isinstance(child, nn.Sequential):
            for i in range(len(child) - 1):
                if isinstance(child[i], nn.Conv2d) and isinstance(child[i + 1], nn.BatchNorm2d):
                    child[i] = fuse_conv_bn_eval(child[i].eval(), child[i + 1].eval())
                    child[i + 1] = nn.Identity()
        fold_batchnorm(child)
    return module


def qat(deployable: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, batch: int = 64, seed: int = 0,
        float_modules: tuple[str, ...] = FLOAT_MODULES, max_batch: int = 32) -> tuple[torch.export.ExportedProgram, dict]:
    """QAT fine-tune a copy of DEPLOYABLE on uint8 images X; returns (the converted int8 program exported with a
    dynamic batch 1..MAX_BATCH, ready for torch.onnx.export; {'losses': [...]})."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    from refgen.moe import onnxrun
    from refgen.moe.finetune import finetune

    m = fold_batchnorm(copy.deepcopy(deployable).eval())
    for name in float_modules:
        for p in m.get_submodule(name).parameters():
            p.requires_grad_(False)
    q = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    for name in float_modules:
        q.set_module_name_qconfig(name, None)
    ex = (torch.from_numpy(onnxrun.to_input(x[:4])),)
    dim = torch.export.Dim("batch", min=1, max=max(batch, max_batch, len(x)))
    gm = torch.export.export(m, ex, dynamic_shapes={"image": {0: dim}}).module()
    prepared = prepare_qat_pt2e(gm, q)
    # an exported module refuses train()/eval(): with BatchNorm folded and no dropout its ops are the same in
    # both modes, and the switch to eval after convert is torchao's
    losses = finetune(prepared, x, y, epochs, lr, batch, seed, switch_mode=False)
    converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    ep = torch.export.export(converted, ex, dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1,
                                                                                        max=max_batch)}})
    return ep, {"losses": losses}
