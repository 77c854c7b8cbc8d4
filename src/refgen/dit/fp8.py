"""FP8 matmuls for NanoDiT training (opt-in: `TrainConfig.fp8`; bf16 stays the default until FP8 proves equal on the
yardstick): torchao's float8 training (`torchao.float8.convert_to_float8_training`, tensorwise scaling). Each
converted `nn.Linear` becomes a `Float8Linear` that casts its input, weight and output gradient to FP8 (e4m3
forward, e5m2 gradients) with dynamic per-tensor scales, runs the three GEMMs in FP8 on the tensor cores and keeps
fp32 master weights, so the optimizer, EMA and checkpoints see ordinary parameters and state-dict keys.

Why torchao and not Transformer Engine: torchao swaps plain `nn.Linear`s in place (no model rewrite) and composes
with torch.compile, which fuses the scaling casts into neighbouring kernels; NanoDiT's attention and norms stay
as they are. Transformer Engine would mean TE layers and its own wheels. The choice is to be confirmed by the
H200 measurement (docs/dit.md).

Recipes (`TrainConfig.fp8_recipe`, torchao's `Float8LinearConfig.from_recipe_name`), fastest first:
"tensorwise" (the default) scales each operand by one number (input, weight: e4m3; output gradient: e5m2);
"rowwise" scales every row of each operand separately (e4m3 throughout, power-of-two scales), so one outlier
token no longer coarsens the whole batch, at the price of a per-row reduction and CUTLASS's rowwise GEMM;
"rowwise_with_gw_hp" is rowwise with the weight-gradient GEMM left in bf16 (the most accurate, a third of the
GEMM FLOPs without the FP8 gain). bench/dit_fp8_gemm.py times all three per GEMM shape, per block and per step.

Only the token GEMMs are converted: every block's self-attention qkv/proj, cross-attention q/kv/proj and MLP.
They are all the model's matmul FLOPs but a few per-sample ones (timestep MLP, adaLN modulation: M = batch
rows, too small to gain), the conditioning projections, and the zero-initialised output layer, whose small
early values FP8's per-tensor scale would flush."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from refgen.dit.config import FP8_RECIPES
from refgen.runtime import PolicyError

if TYPE_CHECKING:
    from torchao.float8 import Float8LinearConfig

FP8_MIN_CAPABILITY = (8, 9)     # FP8 tensor cores: Ada (sm89), Hopper (sm90), Blackwell
H100_FP8_DENSE = 1979e12        # FLOP/s, dense FP8 of an H100 / H200 SXM (NVIDIA's data sheet); bf16: 989e12
_TOKEN_GEMM = re.compile(r"blocks\.\d+\.(attn|cross_attn|mlp)\.")


def fp8_module_filter(module: nn.Module, fqn: str) -> bool:
    """torchao's `module_filter_fn`: the token GEMMs of the blocks, with both sides multiples of 16 (the FP8
    GEMM's alignment)."""
    return (isinstance(module, nn.Linear) and bool(_TOKEN_GEMM.match(fqn + "."))
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def check_fp8_device(device: torch.device) -> None:
    """FP8 training needs a CUDA GPU with FP8 tensor cores and torchao; anything else is refused before a run
    starts, naming what is missing (on a CPU torchao would emulate the FP8 GEMMs: correct, slow, and not what
    `fp8: true` is for)."""
    if device.type != "cuda":
        raise PolicyError(f"fp8: true needs a CUDA GPU with FP8 tensor cores (compute capability >= "
                          f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}: L4, L40, H100, H200); the device is "
                          f"{device}. Set fp8: false (bf16 is the default)")
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        raise PolicyError(f"fp8: true needs compute capability >= {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}; "
                          f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}. Set fp8: false")
    _torchao()


def _torchao():
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise PolicyError(f"fp8: true trains through torchao's float8 training, which does not import here ({e}); "
                          f"pip install torchao (a wheel built for torch {torch.__version__.split('+')[0]})") from None
    return convert_to_float8_training


def fp8_linear_config(recipe: str = "tensorwise") -> "Float8LinearConfig":
    """torchao's `Float8LinearConfig` of a recipe in FP8_RECIPES; another name is refused, naming the valid ones
    (torchao's own check is an assert, which `python -O` drops)."""
    if recipe not in FP8_RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r}: choose one of {', '.join(FP8_RECIPES)}")
    _torchao()
    from torchao.float8 import Float8LinearConfig

    return Float8LinearConfig.from_recipe_name(recipe)


def convert_to_fp8(model: nn.Module, recipe: str = "tensorwise") -> list[str]:
    """Swap the token GEMMs of `model` for torchao Float8Linear in place (the same Parameter objects, so an
    optimizer built before keeps them), scaled by `recipe` (FP8_RECIPES). Returns the converted module names.
    Convert before the first compiled call: torch.compile traces, and caches, the modules it finds then."""
    config = fp8_linear_config(recipe)
    _torchao()(model, module_filter_fn=fp8_module_filter, config=config)
    done = [n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
    if not done:
        raise ValueError("fp8: no linear layer of the model qualifies for FP8 (token GEMMs with both sides "
                         "multiples of 16); the hidden size must be a multiple of 16")
    return done
