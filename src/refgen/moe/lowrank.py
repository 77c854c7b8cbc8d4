"""SVD low-rank factorisation of Linear and Conv layers, with the rank chosen automatically.

A Linear W [out, in] becomes Linear(in, r) then Linear(r, out) with W ~ (U sqrt(S))[:, :r] (sqrt(S) Vh)[:r]; a
Conv2d W [out, in, k, k] becomes Conv2d(in, r, k, same stride/padding) then a 1x1 Conv2d(r, out) from the SVD of W
reshaped to [out, in*k*k]. The bias goes to the second layer. A layer is factorised only when r (in' + out) <
in' out (in' = in*k*k): otherwise the two factors are bigger than the layer.

Rank rule: per layer, the smallest r keeping a share `energy` of sum(S^2). The automatic part (spec Phase 7:
«Sweep über r, Zielrank für ΔAcc ≥ −1 pp») sweeps `energy` from low to high and keeps the first (smallest) model
whose validation accuracy is within the allowed drop.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    e = (s.double() ** 2).cumsum(0)
    return int(torch.searchsorted(e / e[-1], torch.tensor(energy, dtype=torch.float64) - 1e-12)) + 1


def _factor(w2: torch.Tensor, r: int):
    u, s, vh = torch.linalg.svd(w2.double(), full_matrices=False)
    root = s[:r].sqrt()
    return (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float(), s


def factorize_layer(layer: nn.Module, energy: float) -> tuple[nn.Module, int] | None:
    """(replacement, rank), or None when the factorisation would not save parameters."""
    if isinstance(layer, nn.Linear):
        w2 = layer.weight.detach()
    elif isinstance(layer, nn.Conv2d) and layer.groups == 1:
        w2 = layer.weight.detach().flatten(1)
    else:
        return None
    out_f, in_f = w2.shape
    s = torch.linalg.svdvals(w2.double())
    r = rank_for_energy(s, energy)
    if r * (in_f + out_f) >= in_f * out_f:
        return None
    a, b, _ = _factor(w2, r)  # w2 ~ a @ b
    bias = layer.bias.detach().clone() if layer.bias is not None else None
    if isinstance(layer, nn.Linear):
        first, second = nn.Linear(in_f, r, bias=False), nn.Linear(r, out_f, bias=bias is not None)
        first.weight.data, second.weight.data = b, a
    else:
        first = nn.Conv2d(layer.in_channels, r, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                          bias=False, padding_mode=layer.padding_mode)
        second = nn.Conv2d(r, layer.out_channels, 1, bias=bias is not None)
        first.weight.data = b.view(r, *layer.weight.shape[1:])
        second.weight.data = a.view(layer.out_channels, r, 1, 1)
    if bias is not None:
        second.bias.data = bias
    return nn.Sequential(first, second), r


def factorize(module: nn.Module, energy: float, skip: tuple[str, ...] = ()) -> tuple[nn.Module, dict[str, int]]:
    """A copy of MODULE with every Linear / Conv2d that gets smaller replaced by its two factors (names starting
    with any of SKIP are left alone); returns (copy, {layer name: rank})."""
    new = copy.deepcopy(module)
    ranks = {}
    for name, layer in list(new.named_modules()):
        if not isinstance(layer, (nn.Linear, nn.Conv2d)) or any(name.startswith(s) for s in skip):
            continue
        got = factorize_layer(layer, energy)
        if got is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = new.get_submodule(parent_name) if parent_name else new
        setattr(parent, child, got[0])
        ranks[name] = got[1]
    return new, ranks


def within_drop(drop_pp: float, max_drop_pp: float) -> bool:
    """Is an accuracy change of DROP_PP (negative = a drop) within MAX_DROP_PP? Rounded to 9 decimals first: a drop
    of exactly the bound (8 of 800 images = 1 pp) is 100 * (0.975 - 0.985) = -1.0000000000000009 in floating point
    and would be refused."""
    return round(drop_pp, 9) >= -max_drop_pp


def auto_rank(module: nn.Module, energies, val_acc, max_drop_pp: float, skip: tuple[str, ...] = (),
              after=None) -> dict:
    """Sweep ENERGIES (ascending): factorise, run AFTER(model) (fine-tuning, optional), measure VAL_ACC(model);
    the first model whose accuracy is within MAX_DROP_PP of the unfactorised one is chosen. Returns {'model',
    'energy', 'ranks', 'sweep': [...], 'ref_val_acc'}; 'model' is None when no energy qualifies."""
    ref = val_acc(module)
    sweep, chosen = [], None
    for e in sorted(energies):
        m, ranks = factorize(module, e, skip)
        if after is not None:
            after(m)
        acc = val_acc(m)
        n = sum(p.numel() for p in m.parameters())
        rec = {"energy": e, "val_acc": acc, "drop_pp": 100 * (acc - ref), "params": n, "layers": len(ranks)}
        sweep.append(rec)
        if ranks and within_drop(rec["drop_pp"], max_drop_pp):
            chosen = {"model": m, "energy": e, "ranks": ranks}
            break
    return {"ref_val_acc": ref, "sweep": sweep, **(chosen or {"model": None, "energy": None, "ranks": {}})}
