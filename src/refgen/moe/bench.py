"""`refgen moe bench`: the runtime measurements (time, memory, energy, cost, corruptions), one section at a time,
into bench.json.

    sleep        the monitor's own check: Probe timing time.sleep(0.05) must read 50 +- 10 ms
    flops        the static cost table: FLOPs total / per expert / static top-k, bytes, FLOPs linear in batch
    overhead     training steps/s with the monitor (sample_every) and without, interleaved blocks, median
    latency      batch 1 and batch 256, dense masked vs sparse dispatch path, team sizes 1..E
    corruptions  SHA-256 of every corrupted test set (7 types x severity 3), computed twice: must be equal
    energy       GPU only: NVML windows >= 5 s, idle-subtracted J/image, and the calibrated energy-proxy
                 coefficient c_flop (written to energy_coefficients.json)
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from refgen.artifacts import atomic_write_json, provenance
from refgen.moe.cost import calibrate, cost_table
from refgen.moe.model import MoEClassifier, topk_mask
from refgen.moe.monitor import EnergyUnavailable, NvmlEnergy, Probe, energy_window, measure_latency

SECTIONS = ("sleep", "flops", "overhead", "latency", "corruptions", "energy")


def bench_sleep(repeats: int = 5, seconds: float = 0.05) -> dict:
    probe = Probe("cpu", sample_every=1)
    for i in range(repeats):
        with probe.step(i):
            time.sleep(seconds)
    ms = [r["time_ms"] for r in probe.records]
    med = statistics.median(ms)
    return {"target_ms": seconds * 1e3, "measured_ms": ms, "median_ms": med,
            "pass": abs(med - seconds * 1e3) <= 10.0, "tolerance_ms": 10.0}


def bench_flops(model: MoEClassifier, shape) -> dict:
    t = cost_table(model, shape)
    dev = next(model.parameters()).device
    from refgen.moe.cost import count_flops

    per_batch = {b: count_flops(lambda x: model(x, path="dense"), torch.zeros(b, *shape, device=dev))
                 for b in (1, 2, 8)}
    return {**t.to_json(), "fixed_flops": t.fixed_flops, "params": model.num_params(),
            "static_topk_flops": {k: t.static_topk_flops(k) for k in range(1, model.cfg.num_experts + 1)},
            "flops_by_batch": per_batch,
            "linear_in_batch": all(per_batch[b] == b * per_batch[1] for b in per_batch)}


def _train_steps(model, opt, x, y, steps: int, probe: Probe | None, flops: float, start: int, path: str) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        def step():
            out = model(x, path=path)
            loss = F.cross_entropy(out.logits, y) + 0.01 * out.balance_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        if probe is None:
            step()
        else:
            with probe.step(start + i, flops=flops, images=len(y)):
                step()
            if (start + i + 1) % probe.sample_every == 0:
                probe.flush()
    sync()
    return steps / (time.perf_counter() - t0)


def bench_overhead(model: MoEClassifier, shape, batch: int = 128, steps: int = 100, blocks: int = 5,
                   sample_every: int = 50, path: str = "sparse") -> dict:
    """Steps/s without and with the monitor, in alternating blocks (so drift and other load hit both)."""
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g).to(dev)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(dev)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    probe = Probe(dev, sample_every)
    flops = 3 * cost_table(model, shape).static_topk_flops(model.cfg.top_k) * batch
    model.train()
    _train_steps(model, opt, x, y, max(steps // 5, 2), None, flops, 0, path)  # warm-up
    off, on = [], []
    for b in range(blocks):
        off.append(_train_steps(model, opt, x, y, steps, None, flops, 0, path))
        on.append(_train_steps(model, opt, x, y, steps, probe, flops, b * steps, path))
    m_off, m_on = statistics.median(off), statistics.median(on)
    # the probe's own cost per step, timed directly: on a shared machine the block-to-block spread of steps/s
    # can exceed the effect being measured
    direct = Probe(dev, sample_every)
    n = 50 * sample_every
    t0 = time.perf_counter()
    for i in range(n):
        with direct.step(i, flops=flops, images=batch):
            pass
    direct.flush()
    per_step = (time.perf_counter() - t0) / n
    return {"steps_per_s_off": off, "steps_per_s_on": on, "median_off": m_off, "median_on": m_on,
            "overhead_pct": 100 * (m_off - m_on) / m_off, "sample_every": sample_every, "batch": batch,
            "steps_per_block": steps, "blocks": blocks, "device": str(dev), "sampled": len(probe.records),
            "probe_cost_us_per_step": per_step * 1e6, "overhead_pct_direct": 100 * per_step * m_off}


@torch.no_grad()
def bench_latency(model: MoEClassifier, shape, batches=(1, 256), iters: int = 100, warmup: int = 10) -> dict:
    dev = next(model.parameters()).device
    model.eval()
    E = model.cfg.num_experts
    rows = []
    g = torch.Generator().manual_seed(0)
    for b in batches:
        x = torch.randn(b, *shape, generator=g).to(dev)
        scores = torch.randn(b, E, generator=g).to(dev)
        for k in range(1, E + 1):
            mask = topk_mask(scores, k)
            for path in ("dense", "sparse"):
                r = measure_latency(lambda: model(x, path=path, mask=mask), dev, warmup=warmup,
                                    iters=max(iters // (4 if b > 32 else 1), 10))
                rows.append({"batch": b, "team": k, "path": path, **r, "ms_per_image": r["median_ms"] / b})
    return {"rows": rows, "label": "measured wall time (not the FLOPs proxy)"}


def bench_corruptions(images, seed: int = 0, severity: int = 3) -> dict:
    from refgen.moe.corruptions import CORRUPTIONS, corrupt_set
    from refgen.moe.data import sha256_array

    rows = {}
    for name in CORRUPTIONS:
        t0 = time.perf_counter()
        a = sha256_array(corrupt_set(images, name, severity, seed))
        s = time.perf_counter() - t0
        b = sha256_array(corrupt_set(images, name, severity, seed))
        rows[name] = {"sha256": a, "identical_on_rerun": a == b, "seconds": s}
    return {"severity": severity, "seed": seed, "n_images": len(images), "sets": rows,
            "all_identical": all(r["identical_on_rerun"] for r in rows.values())}


@torch.no_grad()
def bench_energy(model: MoEClassifier, shape, batch: int = 256, seconds: float = 10.0, idle: float = 5.0,
                 device_index: int = 0) -> dict:
    dev = next(model.parameters()).device
    if dev.type != "cuda":
        raise EnergyUnavailable("the energy section needs the model on a CUDA GPU (NVML); on this machine only the "
                                "FLOPs energy proxy exists")
    counter = NvmlEnergy(device_index)
    model.eval()
    x = torch.randn(batch, *shape, device=dev)
    t = cost_table(model, shape)
    out = {}
    for path in ("dense", "sparse"):
        w = energy_window(lambda: model(x, path=path), batch, counter, min_seconds=seconds, idle_seconds=idle,
                          sync=torch.cuda.synchronize)
        flops = t.total_flops if path == "dense" else t.static_topk_flops(model.cfg.top_k)
        w["flops_per_image"] = flops
        out[path] = w
    coeffs = calibrate(out["dense"]["j_per_image_marginal"], t.total_flops, counter.name,
                       f"NVML window {seconds:g} s, batch {batch}, dense path, idle-subtracted")
    return {"windows": out, "coefficients": dataclasses.asdict(coeffs), "gpu": counter.name}


def run_bench(model: MoEClassifier, shape, sections, out: str | Path, *, images=None, batch: int = 128,
              steps: int = 100, blocks: int = 5, sample_every: int = 50, iters: int = 100, energy_seconds=10.0,
              config=None) -> dict:
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown bench sections {unknown}; known: {list(SECTIONS)}")
    out = Path(out)
    dev = next(model.parameters()).device
    res: dict = {}
    for s in sections:
        t0 = time.perf_counter()
        if s == "sleep":
            res[s] = bench_sleep()
        elif s == "flops":
            res[s] = bench_flops(model, shape)
        elif s == "overhead":
            res[s] = bench_overhead(model, shape, batch, steps, blocks, sample_every)
        elif s == "latency":
            res[s] = bench_latency(model, shape, iters=iters)
        elif s == "corruptions":
            if images is None:
                raise ValueError("the corruptions section needs images (a data set)")
            res[s] = bench_corruptions(images)
        elif s == "energy":
            res[s] = bench_energy(model, shape, seconds=energy_seconds)
            from refgen.moe.cost import EnergyCoefficients

            EnergyCoefficients(**res[s]["coefficients"]).save(out / "energy_coefficients.json")
        res[s]["seconds"] = time.perf_counter() - t0
    info = provenance(config, device=str(dev), threads=torch.get_num_threads(), input_shape=list(shape),
                      model_config=dataclasses.asdict(model.cfg), results=res)
    atomic_write_json(out / "bench.json", info)
    return info
