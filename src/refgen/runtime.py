"""Device and dtype policy.

Real models run on CUDA only. The CPU is allowed when the caller asks for it explicitly
(`--device cpu`) and only for small models (tiny test models, the toy world), so tests and the
demo run anywhere while nobody waits an hour for a 20B model on a laptop by mistake.
"""

from __future__ import annotations

import json
import os
import platform
import random
from collections.abc import Mapping

import numpy as np
import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Above this many parameters a model is "real" and must run on CUDA (the tiny and toy models are
# well under 50M; Qwen-Image's transformer alone is 20B).
CPU_MAX_PARAMS = 200_000_000
# The H100 SXM's dense bf16 peak, FLOP/s: the denominator of every MFU figure the benchmarks quote.
H100_BF16_DENSE = 989e12


class PolicyError(RuntimeError):
    """A policy violation: wrong device, wrong dtype, model too large for the CPU."""


class DeviceMismatchError(PolicyError):
    pass


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {name}; use one of {sorted(DTYPES)}")
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str | None) -> torch.device:
    """`None`/"cuda" -> CUDA or a clear abort; "cpu" only when asked for by name."""
    if device in (None, "cuda") or str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise PolicyError(
                "CUDA is not available (torch.cuda.is_available() is False). refgen runs real models on an "
                "NVIDIA GPU only. For tiny/toy models pass --device cpu explicitly."
            )
        return torch.device(device or "cuda")
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {device!r}; use 'cuda', 'cuda:N' or 'cpu'")


def diffusers_dtype_kwargs(dtype: torch.dtype) -> dict:
    """The dtype keyword of diffusers' `from_pretrained`: newer releases renamed `torch_dtype` to `dtype` and warn
    on the old name; older ones (refgen supports diffusers >= 0.38) know only `torch_dtype` and would ignore
    `dtype`, silently loading fp32."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def check_dtype_for_model(dtype: torch.dtype, family: str) -> None:
    """Refuse dtypes a model family is known not to survive.

    Qwen-Image (its Qwen2.5-VL text encoder and its MMDiT) is trained and shipped in bf16; its
    activations exceed fp16's range (max 65504) in the residual stream, which turns into inf/NaN
    images. The diffusers docs and the model card run it in bf16. We refuse fp16 instead of
    silently upcasting, so the user knows why.
    """
    if family == "qwen-image" and dtype == torch.float16:
        raise PolicyError(
            "fp16 is refused for Qwen-Image: its text encoder and transformer produce activations beyond fp16's "
            "range (65504), which end as NaN/black images. Use bf16 (default) or fp32."
        )


def check_cpu_size(model: torch.nn.Module | int, device: torch.device, what: str = "model") -> None:
    n = model if isinstance(model, int) else sum(p.numel() for p in model.parameters())
    if device.type == "cpu" and n > CPU_MAX_PARAMS:
        raise PolicyError(
            f"{what} has {n / 1e6:.0f}M parameters; the CPU is only allowed for tiny/toy models "
            f"(<= {CPU_MAX_PARAMS / 1e6:.0f}M). Run it on CUDA."
        )


def check_tensors(tensors: Mapping[str, torch.Tensor | None], device: torch.device | str,
                  dtype: torch.dtype | None = None, where: str = "") -> None:
    """Fail hard, naming the culprit, if any named tensor is not on `device` (and `dtype`).

    Floating tensors must match `dtype`; integer tensors (masks, ids) are only checked for device.
    `None` entries are skipped (optional inputs).
    """
    device = torch.device(device)
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}{name}: expected a torch.Tensor, got {type(t).__name__}")
        # CPU tensors carry no index: "cpu:0" (diffusers' execution device under CPU offload) is the CPU
        same_device = t.device.type == device.type and (device.type == "cpu" or device.index is None
                                                        or t.device.index == device.index)
        bad_dtype = dtype is not None and t.is_floating_point() and t.dtype != dtype
        if not same_device or bad_dtype:
            want = f"{device}" + (f"/{dtype}" if dtype is not None else "")
            raise DeviceMismatchError(
                f"{where}tensor '{name}' shape={tuple(t.shape)} dtype={t.dtype} device={t.device} "
                f"does not match the expected {want}"
            )


def pick_cpu_threads(limit: int | None = None) -> int:
    """torch threads for small models on the CPU: the cores no other process is using (1-minute load average).
    Torch's default takes every core; on a shared machine its threads then wait at each barrier for cores
    other processes hold, and a small model runs several times slower than on one thread."""
    n = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):  # not every platform has a load average
        busy = 0.0
    free = max(1, min(n, round(n - busy)))
    return min(free, limit) if limit else free


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def doctor() -> dict:
    """What a user needs before VRAM planning: torch, CUDA runtime, driver, every GPU."""
    report: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "driver": None,
        "gpus": [],
    }
    for mod in ("diffusers", "transformers", "accelerate", "safetensors", "webdataset"):
        try:
            report[mod] = __import__(mod).__version__
        except Exception as e:  # a broken install is exactly what doctor should show
            report[mod] = f"unavailable: {e}"
    if torch.cuda.is_available():
        try:
            import subprocess

            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            report["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except Exception:
            report["driver"] = None
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            report["gpus"].append({
                "index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                "memory_total_gib": round(total / 2**30, 2), "memory_free_gib": round(free / 2**30, 2),
                "bf16_supported": bool(p.major >= 8),
            })
    return report


def doctor_json() -> str:
    return json.dumps(doctor(), indent=2)


def init_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, this rank's device) under torchrun, (0, 1, device) otherwise. Joins the process group
    (NCCL on CUDA, gloo on the CPU) and gives each rank its own GPU (LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(torch.device(device))
    return rank, world, device
