"""Runtime measurements: time, memory, GPU energy.

Time: CUDA events on a GPU (recorded without synchronising, read at `sample_every` boundaries: a
`cuda.synchronize()` per batch would itself cost more than the 5 % overhead budget), `time.perf_counter_ns` on
the CPU. Latency benchmarks warm up first and report median / P95 / P99.

Memory: `torch.cuda.max_memory_allocated` (reset after each read) on a GPU; the process RSS via psutil on the CPU,
a proxy that includes everything the process holds.

Energy: NVML's total-energy counter (mJ since the driver loaded) refreshes every 20-100 ms while one batch of a
model this size takes well under 1 ms, so energy is never measured per batch. `energy_window` measures windows of
>= 5 s of steady work (>= 100 calls), subtracts the idle power measured just before, and reports J/image total and
marginal. Per batch there is only the FLOPs proxy (cost.py). The 2-core CI/dev VMs have no energy counter at all
(no RAPL under /sys/class/powercap): there, energy is proxy-only.

CUDA graphs: `CudaGraphCall` captures fn(x) once at x's shape (PyTorch's recipe: a few warm-up calls on a side
stream, capture with `torch.cuda.graph` into a static input buffer, then copy each input in and replay). It needs a
CUDA device and a function without host synchronisation or data-dependent shapes; anything else raises
`GraphCaptureUnsupported` (nothing is measured in its place).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from refgen.runtime import PolicyError

MIN_ENERGY_WINDOW_S = 5.0


class EnergyUnavailable(PolicyError):
    """No energy counter on this machine; the message says why and what is reported instead."""


class GraphCaptureUnsupported(PolicyError):
    """A CUDA-graph capture asked for where it cannot work (no CUDA device, or a function whose shapes or control
    flow depend on the data); the message names the reason."""


def percentiles(ms: list[float] | np.ndarray) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no timings to summarise")
    return {"n": int(a.size), "mean_ms": float(a.mean()), "median_ms": float(np.median(a)),
            "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99)),
            "min_ms": float(a.min())}


def measure_latency(fn, device: torch.device | str = "cpu", warmup: int = 10, iters: int = 100,
                    sync_each: bool = False) -> dict:
    """Per-call wall time of fn() in ms: CUDA events on a GPU (one sync at the end), perf_counter_ns on the
    CPU, after WARMUP untimed calls. SYNC_EACH (GPU): host wall time of fn() + torch.cuda.synchronize() per call,
    the latency one request sees from launch to a finished result (CUDA events time the stream, where launches of
    the next call may already be queued)."""
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got {warmup}, {iters}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda" and not sync_each:
        torch.cuda.synchronize(device)
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for s, e in ev:
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        ms, clock = [s.elapsed_time(e) for s, e in ev], "cuda_event"
    else:
        gpu = device.type == "cuda"  # sync_each: one synchronize per call, inside the timed region
        if gpu:
            torch.cuda.synchronize(device)
        ms = []
        for _ in range(iters):
            t0 = time.perf_counter_ns()
            fn()
            if gpu:
                torch.cuda.synchronize(device)
            ms.append((time.perf_counter_ns() - t0) / 1e6)
        clock = "perf_counter_ns+cuda_sync" if gpu else "perf_counter_ns"
    return {**percentiles(ms), "warmup": warmup, "device": str(device), "clock": clock,
            "threads": torch.get_num_threads()}


class CudaGraphCall:
    """fn(x) captured into one torch.cuda.CUDAGraph at EXAMPLE's shape, dtype and device.

        call = CudaGraphCall(lambda x: model(x).logits, torch.zeros(1, 1, 28, 28, device="cuda"))
        y = call(x)      # copies x into the static input, replays, returns the static output

    The returned tensor is the graph's static output: the next call overwrites it (clone it to keep it). WARMUP
    calls run on a side stream first (cuDNN/cuBLAS handles, autotuning and the allocator settle outside the
    capture, as PyTorch's CUDA-graph notes prescribe). Raises GraphCaptureUnsupported without a CUDA device, and
    when the capture itself fails (a host sync or a data-dependent shape inside fn), with PyTorch's message."""

    def __init__(self, fn, example: torch.Tensor, warmup: int = 3):
        if example.device.type != "cuda" or not torch.cuda.is_available():
            raise GraphCaptureUnsupported(
                f"CUDA graphs need a CUDA GPU; the input is on {example.device} (torch.cuda.is_available() = "
                f"{torch.cuda.is_available()}): nothing is measured in their place")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (capture needs warmed-up kernels), got {warmup}")
        self.static_in = example.detach().clone()
        dev = example.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(self.static_in)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.static_out = fn(self.static_in)
        except RuntimeError as e:
            raise GraphCaptureUnsupported(f"CUDA-graph capture failed (a host sync or a data-dependent shape inside "
                                          f"the captured function?): {e}") from e
        if not isinstance(self.static_out, torch.Tensor):
            raise TypeError(f"the captured function must return a tensor, got {type(self.static_out).__name__}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_in.shape or x.dtype != self.static_in.dtype:
            raise ValueError(f"a CUDA graph replays one shape: captured {tuple(self.static_in.shape)} "
                             f"{self.static_in.dtype}, got {tuple(x.shape)} {x.dtype}")
        self.static_in.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_out


def memory_mb(device: torch.device | str) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1e6
        torch.cuda.reset_peak_memory_stats(device)
        return {"mem_mb": peak, "mem_kind": "cuda_max_allocated"}
    import psutil

    return {"mem_mb": psutil.Process().memory_info().rss / 1e6, "mem_kind": "process_rss"}


@dataclass
class Probe:
    """Samples one step in SAMPLE_EVERY: its time, the memory, and the energy proxy of its FLOPs.

    with probe.step(i, flops=...):   # flops: of this step (e.g. 3 x forward FLOPs for a training step)
        train_step()
    records = probe.flush()          # at a boundary: reads pending CUDA events, returns new records
    """
    device: torch.device | str = "cpu"
    sample_every: int = 50
    coeffs: object = None              # cost.EnergyCoefficients; None: the uncalibrated default
    logger: object = None              # a JsonlLogger: every record is also logged there
    records: list = field(default_factory=list)
    _pending: list = field(default_factory=list)

    def __post_init__(self):
        if self.sample_every < 1:
            raise ValueError(f"sample_every must be >= 1, got {self.sample_every}")
        self.device = torch.device(self.device)
        if self.coeffs is None:
            from refgen.moe.cost import EnergyCoefficients

            self.coeffs = EnergyCoefficients()

    @contextmanager
    def step(self, step: int, flops: float | None = None, images: int | None = None):
        if step % self.sample_every:
            yield
            return
        if self.device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            yield
            e.record()
            self._pending.append((step, flops, images, s, e))
        else:
            t0 = time.perf_counter_ns()
            yield
            self._add(step, flops, images, (time.perf_counter_ns() - t0) / 1e6)

    def _add(self, step, flops, images, ms):
        rec = {"kind": "monitor", "step": step, "time_ms": ms, **memory_mb(self.device)}
        if flops is not None:
            rec["flops"] = flops
            rec["energy_proxy_mj"] = self.coeffs.proxy_mj(flops)
            rec["energy_proxy_calibrated"] = self.coeffs.calibrated
        if images is not None:
            rec["images"] = images
        self.records.append(rec)
        if self.logger is not None:
            self.logger.log(**rec)
        return rec

    def flush(self) -> list[dict]:
        start = len(self.records)
        for step, flops, images, s, e in self._pending:
            e.synchronize()
            self._add(step, flops, images, s.elapsed_time(e))
        self._pending.clear()
        return self.records[start:]

    def summary(self) -> dict:
        self.flush()
        if not self.records:
            return {"sampled_steps": 0}
        return {"sampled_steps": len(self.records), **percentiles([r["time_ms"] for r in self.records]),
                "peak_mem_mb": max(r["mem_mb"] for r in self.records)}


# ---- GPU energy ---------------------------------------------------------------------------------------

class NvmlEnergy:
    """NVML's total-energy counter of one GPU (Volta or newer), in mJ."""

    def __init__(self, index: int = 0):
        try:
            import pynvml
        except ImportError as e:
            raise EnergyUnavailable("no GPU energy counter: pynvml is not installed (pip install -e '.[moe]' "
                                    "brings nvidia-ml-py); only the FLOPs energy proxy is reported") from e
        try:
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.name = pynvml.nvmlDeviceGetName(self.handle)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except pynvml.NVMLError as e:
            raise EnergyUnavailable(f"no GPU energy counter: NVML says {e} (no NVIDIA GPU or driver here; CPU "
                                    f"energy is not measurable on machines without RAPL): only the FLOPs energy "
                                    f"proxy is reported") from e
        self._nvml = pynvml

    def read_mj(self) -> float:
        return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))


def energy_window(fn, images_per_call: int, counter, min_seconds: float = MIN_ENERGY_WINDOW_S,
                  min_calls: int = 100, idle_seconds: float = 3.0, sync=None) -> dict:
    """Energy of steady work: idle power over IDLE_SECONDS, then fn() repeated for >= MIN_SECONDS and
    >= MIN_CALLS. COUNTER has read_mj() (NvmlEnergy). SYNC (e.g. torch.cuda.synchronize) runs before each
    reading so queued GPU work is inside the window. Returns J/image total and marginal (idle-subtracted)."""
    if min_seconds < MIN_ENERGY_WINDOW_S:
        raise ValueError(f"energy windows must be >= {MIN_ENERGY_WINDOW_S} s (NVML's counter refreshes every "
                         f"20-100 ms), got {min_seconds}")
    sync = sync or (lambda: None)
    sync()
    e0, t0 = counter.read_mj(), time.perf_counter()
    time.sleep(idle_seconds)
    e1, t1 = counter.read_mj(), time.perf_counter()
    idle_w = (e1 - e0) / 1e3 / (t1 - t0)
    calls = 0
    t_start, e_start = time.perf_counter(), counter.read_mj()
    while True:
        fn()
        calls += 1
        if calls >= min_calls and time.perf_counter() - t_start >= min_seconds:
            sync()
            if time.perf_counter() - t_start >= min_seconds:
                break
    e_end, t_end = counter.read_mj(), time.perf_counter()
    dt, joules = t_end - t_start, (e_end - e_start) / 1e3
    images = calls * images_per_call
    marginal = joules - idle_w * dt
    return {"seconds": dt, "calls": calls, "images": images, "joules": joules, "idle_w": idle_w,
            "avg_w": joules / dt, "j_per_image_total": joules / images, "j_per_image_marginal": marginal / images,
            "idle_seconds": t1 - t0}
