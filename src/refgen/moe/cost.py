"""The static cost model: FLOPs and bytes per image, total and active, the energy proxy, and CostNormalizer.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (2 x MAC convention; counts matmul/conv/einsum, not
elementwise ops). They are deterministic, so the RL gate's state and reward use this table, never live
measurements (which differ between machines and runs). Per image:
    total   = FLOPs of the dense path (every expert runs)
    active  = total - sum of the experts' FLOPs + the FLOPs of the experts in the input's team
Bytes are the parameter and buffer bytes that must be stored (fp32 unless stated).

Energy proxy (labelled a *proxy* wherever it appears): E = FLOPs x c_flop + bytes x c_byte. The coefficients are
per device and come from `EnergyCoefficients`; `calibrate` fits c_flop from NVML window measurements on a GPU
(monitor.py). Until that has run, the default coefficients are an uncalibrated placeholder and say so.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from refgen.artifacts import atomic_write_json


def count_flops(fn, *args) -> int:
    """FLOPs of one call `fn(*args)` under FlopCounterMode, no grad."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn(*args)
    return int(fc.get_total_flops())


def module_bytes(m: torch.nn.Module | None, bytes_per_param: int = 4) -> int:
    if m is None:
        return 0
    return sum(p.numel() for p in m.parameters()) * bytes_per_param + sum(b.numel() * b.element_size()
                                                                          for b in m.buffers())


@dataclass
class CostTable:
    """Per-image static costs of one model at one input shape."""
    input_shape: tuple[int, int, int]
    total_flops: int
    expert_flops: list[int]
    total_bytes: int
    expert_bytes: list[int]

    @property
    def fixed_flops(self) -> int:
        """Stem, gate, graph, head: paid by every input whatever its team."""
        return self.total_flops - sum(self.expert_flops)

    @property
    def fixed_bytes(self) -> int:
        return self.total_bytes - sum(self.expert_bytes)

    def active_flops(self, mask: torch.Tensor) -> torch.Tensor:
        """Per-input active FLOPs [B] for team masks [B, E]."""
        e = torch.tensor(self.expert_flops, dtype=torch.float64, device=mask.device)
        return self.fixed_flops + (mask.to(torch.float64) * e).sum(-1)

    def active_bytes(self, mask: torch.Tensor) -> torch.Tensor:
        e = torch.tensor(self.expert_bytes, dtype=torch.float64, device=mask.device)
        return self.fixed_bytes + (mask.to(torch.float64) * e).sum(-1)

    def static_topk_flops(self, k: int) -> float:
        """Active FLOPs of a static top-k team (experts of equal size, as refgen's are)."""
        return self.fixed_flops + k * sum(self.expert_flops) / len(self.expert_flops)

    def to_json(self) -> dict:
        return asdict(self)


def cost_table(model, input_shape: tuple[int, int, int]) -> CostTable:
    """Count FLOPs with a batch of 1 on the model's device (FLOPs are linear in the batch, checked in tests)."""
    p = next(model.parameters())
    was = model.training
    model.eval()
    try:
        x = torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype)
        total = count_flops(lambda t: model(t, path="dense", mask=torch.ones(1, model.cfg.num_experts,
                                                                             device=p.device)), x)
        with torch.no_grad():
            z = model.features(x)
        ef = [count_flops(e, z) for e in model.experts]
    finally:
        model.train(was)
    eb = [module_bytes(e) for e in model.experts]
    return CostTable(tuple(input_shape), total, ef, module_bytes(model), eb)


# ---- energy proxy -------------------------------------------------------------------------------------

@dataclass
class EnergyCoefficients:
    device: str = "uncalibrated"
    c_flop_j: float = 1e-12     # placeholder 1 pJ/FLOP until `calibrate` has run on the device
    c_byte_j: float = 0.0
    calibrated: bool = False
    source: str = "placeholder: not measured; run `refgen moe bench --section energy` on the GPU"

    def __post_init__(self):
        if not (math.isfinite(self.c_flop_j) and self.c_flop_j >= 0 and math.isfinite(self.c_byte_j)
                and self.c_byte_j >= 0):
            raise ValueError(f"energy coefficients must be finite and >= 0, got c_flop_j={self.c_flop_j}, "
                             f"c_byte_j={self.c_byte_j}")

    def proxy_mj(self, flops: float, bytes_: float = 0.0) -> float:
        """Energy *proxy* in mJ: (FLOPs x c_flop + bytes x c_byte) x 1000."""
        return (flops * self.c_flop_j + bytes_ * self.c_byte_j) * 1e3

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> EnergyCoefficients:
        return cls(**json.loads(Path(path).read_text()))


def calibrate(marginal_j_per_image: float, flops_per_image: float, device: str, source: str) -> EnergyCoefficients:
    """c_flop from one NVML window: marginal (idle-subtracted) joules per image / FLOPs per image."""
    if flops_per_image <= 0 or marginal_j_per_image <= 0:
        raise ValueError(f"need positive J/image and FLOPs/image, got {marginal_j_per_image}, {flops_per_image}")
    return EnergyCoefficients(device, marginal_j_per_image / flops_per_image, 0.0, True, source)


# ---- normalisation ------------------------------------------------------------------------------------

class CostNormalizer:
    """Running normalisation of one or more cost components.

    mode 'z': (x - EMA mean) / max(EMA std, std_floor), clipped to [-clip, clip]. "No values beyond +-3 sigma"
    holds only *because* of the clip, so the share of clipped values is counted and reported. A std floor handles
    constant inputs (adding jitter instead would break determinism).
    mode 'minmax': (x - running min) / (running max - running min) in [0, 1].
    The first update initialises the statistics from that batch; later ones move them with EMA weight beta.
    """

    def __init__(self, beta: float = 0.9, mode: str = "z", clip: float = 3.0, std_floor: float = 1e-6):
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if mode not in ("z", "minmax"):
            raise ValueError(f"mode must be 'z' or 'minmax', got {mode!r}")
        if clip <= 0 or std_floor <= 0:
            raise ValueError(f"clip and std_floor must be > 0, got {clip}, {std_floor}")
        self.beta, self.mode, self.clip, self.std_floor = beta, mode, clip, std_floor
        self.mean = self.var = self.lo = self.hi = None
        self.n_seen = self.n_clipped = 0

    def update(self, x: torch.Tensor) -> None:
        """X [N] or [N, C] (C components)."""
        x = x.detach().to(torch.float64)
        x = x.unsqueeze(1) if x.ndim == 1 else x
        m, v = x.mean(0), x.var(0, unbiased=False)
        lo, hi = x.min(0).values, x.max(0).values
        if self.mean is None:
            self.mean, self.var, self.lo, self.hi = m, v, lo, hi
        else:
            b = self.beta
            d = m - self.mean
            self.mean = b * self.mean + (1 - b) * m
            self.var = b * self.var + (1 - b) * (v + b * d * d)
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def normalize(self, x: torch.Tensor, count: bool = True) -> torch.Tensor:
        if self.mean is None:
            raise RuntimeError("CostNormalizer.normalize before any update()")
        squeeze = x.ndim == 1
        x64 = x.detach().to(torch.float64)
        x64 = x64.unsqueeze(1) if squeeze else x64
        if self.mode == "z":
            z = (x64 - self.mean) / self.var.sqrt().clamp_min(self.std_floor)
            out = z.clamp(-self.clip, self.clip)
            if count:
                self.n_seen += z.numel()
                self.n_clipped += int((z.abs() > self.clip).sum())
        else:
            out = ((x64 - self.lo) / (self.hi - self.lo).clamp_min(self.std_floor)).clamp(0, 1)
        out = out.to(x.dtype if x.is_floating_point() else torch.float32)
        return out.squeeze(1) if squeeze else out

    @property
    def clipped_share(self) -> float:
        return self.n_clipped / self.n_seen if self.n_seen else 0.0

    def state_dict(self) -> dict:
        return {"beta": self.beta, "mode": self.mode, "clip": self.clip, "std_floor": self.std_floor,
                "mean": self.mean, "var": self.var, "lo": self.lo, "hi": self.hi, "n_seen": self.n_seen,
                "n_clipped": self.n_clipped}

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


# ---- dense baselines of equal cost --------------------------------------------------------------------

def match_dense_width(base_cfg, in_channels: int, num_classes: int, input_shape, target: float, metric: str,
                      lo: int = 4, hi: int = 1024):
    """The dense baseline (kind='dense', same stem, head and recipe) whose single expert's width makes METRIC
    ('flops': FLOPs per image, or 'bytes': stored bytes) closest to TARGET. Both metrics grow with the width,
    so a bisection finds it."""
    import dataclasses

    from refgen.moe.model import MoEClassifier, MoEModelConfig

    if metric not in ("flops", "bytes"):
        raise ValueError(f"metric must be 'flops' or 'bytes', got {metric!r}")

    def build(w):
        c = MoEModelConfig(**{**dataclasses.asdict(base_cfg), "kind": "dense", "expert_channels": w})
        return MoEClassifier(c, in_channels, num_classes)

    def value(w):
        t = cost_table(build(w), input_shape)
        return t.total_flops if metric == "flops" else t.total_bytes

    while hi - lo > 1:
        mid = (lo + hi) // 2
        if value(mid) < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda w: abs(value(w) - target))
    return build(best), value(best)
