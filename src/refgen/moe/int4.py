"""int4 *storage* of a Deployable MoE (spec §7.10 Low-bit: «Gate int8, Experten int4 per Config»).

int4 has no fast convolution kernels in PyTorch-CPU or ONNX Runtime (spec, "vague / implausible"), so this is a
storage format, not int4 inference: the weights are written packed and dequantised at load into the normal float
model, which then runs as any float Deployable.

    model_int4.safetensors   one file: every tensor of the Deployable's state dict, each in its precision
        int4   conv / linear weights of the chosen modules: symmetric, one scale per output channel
               (scale = max|w| / 7, q = round(w / scale) in [-7, 7]), two signed 4-bit values per byte (low nibble
               first, two's complement), stored as uint8 '<name>' + float32 '<name>.__scale'
        int8   the same with q in [-127, 127], one int8 per value
        fp32   everything else (biases, BatchNorm, the graph's edges, buffers) as written
    its metadata 'refgen_moe_int4' (JSON): format version, model config, in_channels, num_classes, and per tensor
    its precision and shape; nothing else is needed to rebuild the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

FILE = "model_int4.safetensors"
FORMAT = 1
PRECISIONS = ("int4", "int8", "fp32")
_QMAX = {"int4": 7, "int8": 127}
_SCALE = ".__scale"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed values in [-8, 7] (any shape) -> uint8 [ceil(n / 2)], two per byte, the first in the low nibble."""
    q = q.reshape(-1).to(torch.int16)
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"int4 values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    u = (q & 0xF).to(torch.uint8)
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_int4: the first N signed values, int8."""
    p = packed.reshape(-1).to(torch.int16)
    u = torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)[:n]
    return torch.where(u >= 8, u - 16, u).to(torch.int8)


def quantize(w: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel (dim 0) quantisation: (q int8 with w's shape, scale float32 [out]).
    |w - q * scale| <= scale / 2 for every element."""
    qmax = _QMAX[precision]
    w = w.detach().float()
    amax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.round(w / scale.view(-1, *([1] * (w.ndim - 1)))).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.view(-1, *([1] * (q.ndim - 1)))


def precision_of(name: str, tensor: torch.Tensor, rules: dict[str, str], other: str = "fp32") -> str:
    """The storage precision of state-dict entry NAME: only float conv / linear weights (name '*.weight', >= 2
    dims) are quantised; RULES maps a module prefix ('model.experts') to a precision, the first match wins,
    OTHER for weights under no prefix."""
    if not (name.endswith(".weight") and tensor.ndim >= 2 and tensor.is_floating_point()):
        return "fp32"
    for prefix, p in rules.items():
        if name == prefix or name.startswith(prefix + "."):
            return p
    return other


def save(deployable: nn.Module, path: str | Path, rules: dict[str, str], other: str = "fp32") -> dict:
    """Write DEPLOYABLE (a refgen.moe.export.Deployable) to PATH in this format. Returns {'precisions':
    {precision: number of values}, 'bytes': file size}."""
    from refgen.artifacts import atomic_save_safetensors

    for p in (*rules.values(), other):
        if p not in PRECISIONS:
            raise ValueError(f"unknown storage precision {p!r}; known: {list(PRECISIONS)}")
    model = deployable.model
    tensors, meta, count = {}, {}, {p: 0 for p in PRECISIONS}
    for name, t in deployable.state_dict().items():
        t = t.detach().cpu()
        p = precision_of(name, t, rules, other)
        meta[name] = {"precision": p, "shape": list(t.shape)}
        count[p] += t.numel()
        if p == "fp32":
            tensors[name] = t.contiguous()
            continue
        q, scale = quantize(t, p)
        tensors[name] = pack_int4(q) if p == "int4" else q.contiguous()
        tensors[name + _SCALE] = scale.contiguous()
    header = {"format": FORMAT, "model_config": dataclasses.asdict(model.cfg), "in_channels": model.in_channels,
              "num_classes": model.num_classes, "tensors": meta}
    path = Path(path)
    atomic_save_safetensors(tensors, path, metadata={"refgen_moe_int4": json.dumps(header)})
    return {"precisions": count, "bytes": path.stat().st_size}


def load(path: str | Path) -> nn.Module:
    """The float Deployable (eval mode) stored in PATH: every quantised tensor dequantised."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from refgen.config import from_dict
    from refgen.moe.export import Deployable
    from refgen.moe.model import MoEClassifier, MoEModelConfig

    path = Path(path)
    with safe_open(str(path), "pt") as so:
        raw = (so.metadata() or {}).get("refgen_moe_int4")
    if raw is None:
        raise ValueError(f"{path} has no 'refgen_moe_int4' metadata: not an int4 storage file")
    h = json.loads(raw)
    if h.get("format") != FORMAT:
        raise ValueError(f"{path}: int4 storage format {h.get('format')!r}, this reader knows {FORMAT}")
    stored = load_file(str(path))
    state = {}
    for name, m in h["tensors"].items():
        p, shape = m["precision"], tuple(m["shape"])
        if p == "fp32":
            state[name] = stored[name]
            continue
        n = math.prod(shape)
        q = unpack_int4(stored[name], n) if p == "int4" else stored[name].reshape(-1)
        state[name] = dequantize(q.reshape(shape), stored[name + _SCALE])
    cfg = from_dict(MoEModelConfig, h["model_config"], source=path)
    model = MoEClassifier(cfg, int(h["in_channels"]), int(h["num_classes"]))
    dep = Deployable(model, state["mean"].flatten().tolist(), state["std"].flatten().tolist())
    dep.load_state_dict(state)
    return dep.eval()


__all__ = ["FILE", "PRECISIONS", "pack_int4", "unpack_int4", "quantize", "dequantize", "precision_of", "save",
           "load"]
