"""`refgen moe bench`: the runtime measurements (time, memory, energy, cost, corruptions), one section at a time,
into bench.json.

    sleep        the monitor's own check: Probe timing time.sleep(0.05) must read 50 +- 10 ms
    flops        the static cost table: FLOPs total / per expert / static top-k, bytes, FLOPs linear in batch
    overhead     training steps/s with the monitor (sample_every) and without, interleaved blocks, median
    latency      batch 1 and batch 256, dense masked vs sparse dispatch path, team sizes 1..E; on a GPU also eager
                 vs CUDA graph (the gate's own team; the graph replay checked against eager, max |dlogit| kept)
    corruptions  SHA-256 of every corrupted test set (7 types x severity 3), computed twice: must be equal
    energy       GPU only: NVML windows >= 5 s, idle-subtracted J/image (dense, sparse, and the dense path as a
                 CUDA graph), the calibrated energy-proxy coefficient c_flop (written to energy_coefficients.json),
                 and accuracy per joule where the model's test accuracy is known (a --model RUN's moe.json)

CUDA graphs (`cuda_graphs`): None = on where the model is on a CUDA device; True on the CPU raises
GraphCaptureUnsupported (nothing else is measured in their place). Only the dense masked path can be captured: the
sparse dispatch path asks `nonzero()` which inputs chose each expert (a host sync, a row count that depends on the
data) and branches on it in Python, which a graph cannot record; asking for it raises GraphCaptureUnsupported.
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
from refgen.moe.model import PATHS, MoEClassifier, topk_mask
from refgen.moe.monitor import (CudaGraphCall, EnergyUnavailable, GraphCaptureUnsupported, NvmlEnergy, Probe,
                                energy_window, measure_latency)

SECTIONS = ("sleep", "flops", "overhead", "latency", "corruptions", "energy")
CAPTURABLE_PATHS = ("dense",)
UNCAPTURABLE = {"sparse": "each expert's inputs are found with nonzero() (a host sync, a row count that depends on "
                          "the data) and the expert runs only `if idx.numel()`: data-dependent shapes and Python "
                          "control flow, which a CUDA graph cannot record"}
ACC_PER_J_LABEL = ("accuracy per joule: test accuracy in % divided by measured J/image (NVML window, idle-subtracted "
                   "for 'marginal'); the accuracy is the model's recorded test accuracy (moe.json), the same for both "
                   "paths (they agree in eval mode), not re-measured here")


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


def _want_graphs(cuda_graphs: bool | None, dev: torch.device, graph_paths) -> bool:
    """Resolve the cuda_graphs option; refuses (before anything is measured) on the CPU or for a path that
    cannot be captured."""
    if cuda_graphs is None:
        cuda_graphs = dev.type == "cuda"
    if not cuda_graphs:
        return False
    for p in graph_paths:
        check_capturable(p)
    if dev.type != "cuda":
        raise GraphCaptureUnsupported(f"CUDA graphs need a CUDA GPU; the model is on {dev}: run with --device cuda "
                                      f"or without CUDA graphs (nothing is measured in their place)")
    return True


def check_capturable(path: str) -> None:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path not in CAPTURABLE_PATHS:
        raise GraphCaptureUnsupported(f"the {path} path cannot be captured in a CUDA graph: {UNCAPTURABLE[path]}; "
                                      f"only {', '.join(CAPTURABLE_PATHS)} can (path='dense')")


def graphed_forward(model: MoEClassifier, example: torch.Tensor, path: str = "dense",
                    warmup: int = 3) -> CudaGraphCall:
    """The model's logits through PATH (with the gate's own team) captured as one CUDA graph at EXAMPLE's shape.
    The model must be in eval mode (a captured training step would update BatchNorm statistics on every replay)."""
    check_capturable(path)
    if model.training:
        raise ValueError("capture the model in eval mode (model.eval())")
    return CudaGraphCall(lambda inp: model(inp, path=path).logits, example, warmup)


@torch.no_grad()
def check_replay(model: MoEClassifier, call: CudaGraphCall, x: torch.Tensor, path: str = "dense",
                 atol: float = 1e-4, rtol: float = 1e-4) -> dict:
    """Replay on X (a different input from the one captured) against the eager forward; AssertionError when
    not allclose."""
    eager = model(x, path=path).logits
    got = call(x).clone()
    diff = float((got - eager).abs().max())
    agree = float((got.argmax(1) == eager.argmax(1)).float().mean())
    if not torch.allclose(got, eager, atol=atol, rtol=rtol):
        raise AssertionError(f"CUDA-graph replay differs from eager on the {path} path at batch {len(x)}: "
                             f"max |dlogit| {diff:.3g} (atol {atol:g}, rtol {rtol:g}), top-1 agreement {agree:.4f}")
    return {"max_abs_diff": diff, "top1_agreement": agree, "atol": atol, "rtol": rtol}


@torch.no_grad()
def bench_latency(model: MoEClassifier, shape, batches=(1, 256), iters: int = 100, warmup: int = 10,
                  cuda_graphs: bool | None = None, graph_paths=CAPTURABLE_PATHS, accuracy: float | None = None) -> dict:
    """Rows: batch x team size 1..E x path, eager, with a forced team (mask). On a CUDA device (or cuda_graphs=True,
    which refuses on the CPU) also `cuda_graph.rows`: per batch and path, the gate's own team, eager and (for
    GRAPH_PATHS) replayed as a CUDA graph, each timed with CUDA events and with a sync after every call."""
    dev = next(model.parameters()).device
    graphs = _want_graphs(cuda_graphs, dev, graph_paths)
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
    res = {"rows": rows, "label": "measured wall time (not the FLOPs proxy)"}
    if graphs:
        res["cuda_graph"] = bench_cuda_graph_latency(model, shape, batches, iters, warmup, graph_paths, accuracy)
    return res


@torch.no_grad()
def bench_cuda_graph_latency(model: MoEClassifier, shape, batches=(1, 256), iters: int = 100, warmup: int = 10,
                             graph_paths=CAPTURABLE_PATHS, accuracy: float | None = None) -> dict:
    dev = next(model.parameters()).device
    _want_graphs(True, dev, graph_paths)
    model.eval()
    g = torch.Generator().manual_seed(1)
    rows = []
    for b in batches:
        x_capture = torch.randn(b, *shape, generator=g).to(dev)
        x = torch.randn(b, *shape, generator=g).to(dev)
        n = max(iters // (4 if b > 32 else 1), 10)
        for path in PATHS:
            fns = {"eager": (lambda p=path: model(x, path=p).logits)}
            check = None
            if path in graph_paths:
                call = graphed_forward(model, x_capture, path)
                check = check_replay(model, call, x, path)
                fns["cuda_graph"] = lambda c=call: c(x)
            for mode, fn in fns.items():
                ev = measure_latency(fn, dev, warmup=warmup, iters=n)
                wall = measure_latency(fn, dev, warmup=warmup, iters=n, sync_each=True)
                row = {"batch": b, "path": path, "mode": mode, "team": f"gate top-{model.cfg.top_k}", **ev,
                       "ms_per_image": ev["median_ms"] / b,
                       "sync_wall": {k: wall[k] for k in ("median_ms", "p95_ms", "p99_ms", "min_ms", "clock")}}
                if mode == "cuda_graph":
                    row["replay_check"] = check
                if accuracy is not None and b == 1:
                    row["acc_pct_per_ms"] = 100 * accuracy / wall["median_ms"]
                rows.append(row)
    return {"rows": rows, "graph_paths": list(graph_paths),
            "not_captured": {p: UNCAPTURABLE[p] for p in PATHS if p not in graph_paths and p in UNCAPTURABLE},
            "accuracy": accuracy,
            "label": "eager vs CUDA graph (torch.cuda.CUDAGraph: side-stream warm-up, static input, copy in + "
                     "replay); input already on the GPU; median_ms = CUDA events, sync_wall = host time of one call "
                     "+ synchronize; acc_pct_per_ms (batch 1) = accuracy % / sync_wall median"}


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


def accuracy_per_joule(accuracy: float, window: dict) -> dict:
    """Accuracy % per J/image of one energy window (total, and marginal = idle-subtracted)."""
    if not 0 <= accuracy <= 1:
        raise ValueError(f"accuracy must be a fraction in [0, 1], got {accuracy}")
    pct = 100 * accuracy
    out = {"acc_pct_per_j_total": pct / window["j_per_image_total"]}
    m = window["j_per_image_marginal"]
    out["acc_pct_per_j_marginal"] = pct / m if m > 0 else None  # idle power above the working power: no marginal
    return out


@torch.no_grad()
def bench_energy(model: MoEClassifier, shape, batch: int = 256, seconds: float = 10.0, idle: float = 5.0,
                 device_index: int = 0, cuda_graphs: bool | None = None, accuracy: float | None = None,
                 counter=None) -> dict:
    dev = next(model.parameters()).device
    if dev.type != "cuda":
        raise EnergyUnavailable("the energy section needs the model on a CUDA GPU (NVML); on this machine only the "
                                "FLOPs energy proxy exists")
    graphs = _want_graphs(cuda_graphs, dev, CAPTURABLE_PATHS)
    counter = counter or NvmlEnergy(device_index)
    model.eval()
    x = torch.randn(batch, *shape, device=dev)
    t = cost_table(model, shape)
    calls = {"dense": lambda: model(x, path="dense"), "sparse": lambda: model(x, path="sparse")}
    check = None
    if graphs:
        call = graphed_forward(model, torch.randn(batch, *shape, device=dev), "dense")
        check = check_replay(model, call, x, "dense")
        calls["dense_cuda_graph"] = lambda: call(x)
    out = {}
    for name, fn in calls.items():
        w = energy_window(fn, batch, counter, min_seconds=seconds, idle_seconds=idle, sync=torch.cuda.synchronize)
        flops = t.static_topk_flops(model.cfg.top_k) if name == "sparse" else t.total_flops
        w["flops_per_image"] = flops
        if accuracy is not None:
            w.update(accuracy_per_joule(accuracy, w))
        out[name] = w
    coeffs = calibrate(out["dense"]["j_per_image_marginal"], t.total_flops, counter.name,
                       f"NVML window {seconds:g} s, batch {batch}, dense path, idle-subtracted")
    res = {"windows": out, "coefficients": dataclasses.asdict(coeffs), "gpu": counter.name, "batch": batch,
           "accuracy": accuracy}
    if check is not None:
        res["cuda_graph_replay_check"] = check
    if accuracy is not None:
        res["acc_per_j_label"] = ACC_PER_J_LABEL
    return res


def run_bench(model: MoEClassifier, shape, sections, out: str | Path, *, images=None, batch: int = 128,
              steps: int = 100, blocks: int = 5, sample_every: int = 50, iters: int = 100, energy_seconds=10.0,
              config=None, cuda_graphs: bool | None = None, graph_paths=CAPTURABLE_PATHS, latency_batches=(1, 256),
              energy_batch: int = 256, accuracy: float | None = None, accuracy_source: str | None = None) -> dict:
    """ACCURACY (a fraction, e.g. moe.json's test accuracy) turns on accuracy/J (energy) and accuracy/ms (batch-1
    CUDA-graph rows); CUDA_GRAPHS / GRAPH_PATHS: see the module docstring."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown bench sections {unknown}; known: {list(SECTIONS)}")
    out = Path(out)
    dev = next(model.parameters()).device
    _want_graphs(cuda_graphs, dev, graph_paths)  # refuses (CPU, uncapturable path) before anything is measured
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
            res[s] = bench_latency(model, shape, latency_batches, iters=iters, cuda_graphs=cuda_graphs,
                                   graph_paths=graph_paths, accuracy=accuracy)
        elif s == "corruptions":
            if images is None:
                raise ValueError("the corruptions section needs images (a data set)")
            res[s] = bench_corruptions(images)
        elif s == "energy":
            res[s] = bench_energy(model, shape, energy_batch, seconds=energy_seconds, cuda_graphs=cuda_graphs,
                                  accuracy=accuracy)
            from refgen.moe.cost import EnergyCoefficients

            EnergyCoefficients(**res[s]["coefficients"]).save(out / "energy_coefficients.json")
        res[s]["seconds"] = time.perf_counter() - t0
    info = provenance(config, device=str(dev), threads=torch.get_num_threads(), input_shape=list(shape),
                      model_config=dataclasses.asdict(model.cfg), accuracy=accuracy,
                      accuracy_source=accuracy_source, results=res)
    atomic_write_json(out / "bench.json", info)
    return info
