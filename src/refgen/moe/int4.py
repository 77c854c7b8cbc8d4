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
    its metadata 'refgen_moe_int4' (JSON): format version, model config, in_channels, num_classes, per tensor
    its precision and shape, and 'layers': every layer whose architecture differs from the one the model config
    builds (the channels a pruned model kept, the two factors a low-rank layer became), so a pruned or factorised
    model is stored the same way; nothing else is needed to rebuild the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

FILE = "model_int4.safetensors"
FORMAT = 2          # written when some layer differs from the config's architecture ('layers' in the header)
READABLE = (1, 2)   # format 1: the config's architecture, no 'layers' (still written for such a model, byte for byte
                    # as before)
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


def _layer_spec(module: nn.Module) -> dict:
    """What rebuilds MODULE without its weights: {'type': ...} plus its constructor arguments. A type this file
    cannot rebuild is recorded by name only, and save() refuses it when it differs from the config's layer (the
    arguments of a layer without weights, e.g. a pool size, are not compared: pruning and low-rank change none)."""
    from refgen.moe.model import GateNorm

    t = type(module).__name__
    if isinstance(module, nn.Conv2d) and t == "Conv2d":
        return {"type": t, "in": module.in_channels, "out": module.out_channels, "k": list(module.kernel_size),
                "stride": list(module.stride), "padding": list(module.padding), "dilation": list(module.dilation),
                "groups": module.groups, "bias": module.bias is not None, "padding_mode": module.padding_mode}
    if isinstance(module, nn.Linear) and t == "Linear":
        return {"type": t, "in": module.in_features, "out": module.out_features, "bias": module.bias is not None}
    if isinstance(module, GateNorm):
        return {"type": t, "n": module.num_features}
    if isinstance(module, nn.BatchNorm2d) and t == "BatchNorm2d":
        return {"type": t, "n": module.num_features, "eps": module.eps, "momentum": module.momentum,
                "affine": module.affine, "stats": module.track_running_stats}
    if isinstance(module, nn.GroupNorm) and t == "GroupNorm":
        return {"type": t, "groups": module.num_groups, "n": module.num_channels, "eps": module.eps,
                "affine": module.affine}
    return {"type": t}


# constructor defaults: a whole spec is stored without them (the header counts in the artifact's bytes)
_DEFAULTS = {"Conv2d": {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1, "bias": True,
                        "padding_mode": "zeros"},
             "Linear": {"bias": True},
             "BatchNorm2d": {"eps": 1e-5, "momentum": 0.1, "affine": True, "stats": True},
             "GroupNorm": {"eps": 1e-5, "affine": True}}


def _build_layer(spec: dict) -> nn.Module:
    from refgen.moe.model import GateNorm

    t = spec["type"]
    spec = {**_DEFAULTS.get(t, {}), **spec}
    if t == "Sequential":
        return nn.Sequential()
    if t == "Conv2d":
        return nn.Conv2d(spec["in"], spec["out"], tuple(spec["k"]), tuple(spec["stride"]), tuple(spec["padding"]),
                         tuple(spec["dilation"]), spec["groups"], spec["bias"], spec["padding_mode"])
    if t == "Linear":
        return nn.Linear(spec["in"], spec["out"], spec["bias"])
    if t == "GateNorm":
        return GateNorm(spec["n"])
    if t == "BatchNorm2d":
        return nn.BatchNorm2d(spec["n"], spec["eps"], spec["momentum"], spec["affine"], spec["stats"])
    if t == "GroupNorm":
        return nn.GroupNorm(spec["groups"], spec["n"], spec["eps"], spec["affine"])
    raise ValueError(f"int4 storage cannot rebuild a layer of type {t!r}")


_REBUILDABLE = ("Sequential", "Conv2d", "Linear", "GateNorm", "BatchNorm2d", "GroupNorm")


def _changed_layers(deployable: nn.Module, fresh: nn.Module) -> dict[str, dict]:
    """{path: spec} of every module of DEPLOYABLE that differs from FRESH's at that path: the fields that changed
    when the type is the same (a pruned layer: {'in': 10}), the whole spec less the constructor's defaults when
    FRESH has no such module or one of another type (the Sequential of two factors a low-rank layer became, and
    the factors). Only the changes are stored because the header is part of the artifact's bytes."""
    have = dict(fresh.named_modules())
    changed = {}
    for path, m in deployable.named_modules():
        spec = _layer_spec(m)
        old = _layer_spec(have[path]) if path in have else None
        if old == spec:
            continue
        if spec["type"] not in _REBUILDABLE:
            raise ValueError(f"int4 storage cannot store layer {path!r} ({spec['type']}): it differs from the "
                             f"layer the model config builds, and only {list(_REBUILDABLE)} can be rebuilt")
        same_type = old is not None and old["type"] == spec["type"]
        base = old if same_type else _DEFAULTS.get(spec["type"], {})
        changed[path] = {k: v for k, v in spec.items() if k not in base or base[k] != v}
    return changed


def _rebuild(fresh: nn.Module, layers: dict[str, dict]) -> nn.Module:
    """FRESH (built from the model config) with every layer of LAYERS put in place, parents before children; an
    entry without 'type' changes fields of the layer already there."""
    for path in sorted(layers, key=lambda p: p.count(".")):
        parent_path, _, child = path.rpartition(".")
        parent = fresh.get_submodule(parent_path) if parent_path else fresh
        spec = layers[path] if "type" in layers[path] else {**_layer_spec(getattr(parent, child)), **layers[path]}
        setattr(parent, child, _build_layer(spec))
    return fresh


def _empty_deployable(header: dict, mean, std, source) -> nn.Module:
    from refgen.config import from_dict
    from refgen.moe.export import Deployable
    from refgen.moe.model import MoEClassifier, MoEModelConfig

    cfg = from_dict(MoEModelConfig, header["model_config"], source=source)
    with torch.random.fork_rng(devices=[]):  # the weights are overwritten: leave the caller's generator alone
        model = MoEClassifier(cfg, int(header["in_channels"]), int(header["num_classes"]))
    return _rebuild(Deployable(model, mean, std), header.get("layers", {}))


def save(deployable: nn.Module, path: str | Path, rules: dict[str, str], other: str = "fp32") -> dict:
    """Write DEPLOYABLE (a refgen.moe.export.Deployable, possibly pruned or factorised) to PATH in this format.
    Returns {'precisions': {precision: number of values}, 'bytes': file size, 'layers': number of layers stored
    with their own architecture}."""
    from refgen.artifacts import atomic_save_safetensors

    for p in (*rules.values(), other):
        if p not in PRECISIONS:
            raise ValueError(f"unknown storage precision {p!r}; known: {list(PRECISIONS)}")
    model = deployable.model
    header = {"format": 1, "model_config": dataclasses.asdict(model.cfg), "in_channels": model.in_channels,
              "num_classes": model.num_classes}
    base = _empty_deployable(header, deployable.mean.flatten().tolist(), deployable.std.flatten().tolist(), path)
    layers = _changed_layers(deployable, base)
    # the reader rebuilds exactly this, so a layer the specs miss fails here, not at load on another machine
    rebuilt = _rebuild(base, layers)
    for a, b in ((rebuilt, deployable), (rebuilt.state_dict(), deployable.state_dict())):
        got, want = (({n: _layer_spec(m) for n, m in x.named_modules()} if isinstance(x, nn.Module)
                      else {n: tuple(t.shape) for n, t in x.items()}) for x in (a, b))
        if got != want:
            bad = sorted(n for n in got.keys() | want.keys() if got.get(n) != want.get(n))[:6]
            raise ValueError(f"int4 storage would not rebuild this model's architecture (entries that differ: "
                             f"{bad})")
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
    if layers:
        header.update(format=FORMAT, layers=layers)
    header["tensors"] = meta
    path = Path(path)
    atomic_save_safetensors(tensors, path, metadata={"refgen_moe_int4": json.dumps(header)})
    return {"precisions": count, "bytes": path.stat().st_size, "layers": len(layers)}


def load(path: str | Path) -> nn.Module:
    """The float Deployable (eval mode) stored in PATH: every quantised tensor dequantised."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    with safe_open(str(path), "pt") as so:
        raw = (so.metadata() or {}).get("refgen_moe_int4")
    if raw is None:
        raise ValueError(f"{path} has no 'refgen_moe_int4' metadata: not an int4 storage file")
    h = json.loads(raw)
    if h.get("format") not in READABLE:
        raise ValueError(f"{path}: int4 storage format {h.get('format')!r}, this reader knows {list(READABLE)}")
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
    dep = _empty_deployable(h, state["mean"].flatten().tolist(), state["std"].flatten().tolist(), path)
    dep.load_state_dict(state)
    return dep.eval()


__all__ = ["FILE", "PRECISIONS", "pack_int4", "unpack_int4", "quantize", "dequantize", "precision_of", "save",
           "load"]
