import time

import numpy as np
import pytest
import torch

from refgen.artifacts import JsonlLogger, read_jsonl
from refgen.moe.monitor import (EnergyUnavailable, NvmlEnergy, Probe, energy_window, measure_latency, memory_mb,
                                percentiles)


def test_sleep_50ms_measures_50_plus_minus_10ms():
    probe = Probe("cpu", sample_every=1)
    for i in range(5):
        with probe.step(i):
            time.sleep(0.05)
    med = float(np.median([r["time_ms"] for r in probe.records]))
    assert 40 <= med <= 60, med


def test_only_every_nth_step_is_sampled_and_logged(tmp_path):
    log = JsonlLogger(tmp_path / "m.jsonl")
    probe = Probe("cpu", sample_every=3, logger=log)
    for i in range(10):
        with probe.step(i, flops=2e9, images=4):
            pass
    recs = read_jsonl(tmp_path / "m.jsonl")
    assert [r["step"] for r in recs] == [0, 3, 6, 9] == [r["step"] for r in probe.records]
    r = recs[0]
    assert r["kind"] == "monitor" and r["energy_proxy_mj"] == pytest.approx(2.0)
    assert r["energy_proxy_calibrated"] is False and r["mem_kind"] == "process_rss" and r["images"] == 4
    s = probe.summary()
    assert s["sampled_steps"] == 4 and s["median_ms"] >= 0
    with pytest.raises(ValueError, match="sample_every"):
        Probe("cpu", sample_every=0)


def test_a_big_allocation_raises_the_memory_reading():
    before = memory_mb("cpu")["mem_mb"]
    a = np.ones(60_000_000, dtype=np.float32)  # 240 MB, touched
    after = memory_mb("cpu")["mem_mb"]
    assert after - before > 200
    del a


def test_latency_percentiles():
    r = measure_latency(lambda: time.sleep(0.01), "cpu", warmup=1, iters=10)
    assert 9 <= r["median_ms"] <= 20 and r["min_ms"] <= r["median_ms"] <= r["p95_ms"] <= r["p99_ms"]
    assert r["clock"] == "perf_counter_ns" and r["n"] == 10
    assert percentiles([1, 2, 3, 4])["median_ms"] == 2.5
    with pytest.raises(ValueError, match="no timings"):
        percentiles([])


class _Counter:
    """A stand-in energy counter (NVML needs a GPU): 100 W idle, plus whatever work() adds."""

    def __init__(self):
        self.t0, self.extra_mj = time.perf_counter(), 0.0

    def read_mj(self):
        return (time.perf_counter() - self.t0) * 100 * 1e3 + self.extra_mj

    def work(self):
        time.sleep(0.02)
        self.extra_mj += 0.5 * 1e3  # 0.5 J per call


def test_energy_window_subtracts_idle_power():
    c = _Counter()
    r = energy_window(c.work, images_per_call=10, counter=c, min_seconds=5.0, min_calls=100, idle_seconds=0.3)
    assert r["seconds"] >= 5 and r["calls"] >= 100
    assert r["idle_w"] == pytest.approx(100, rel=1e-3)
    assert r["j_per_image_marginal"] == pytest.approx(0.05, rel=1e-3)
    assert r["j_per_image_total"] > r["j_per_image_marginal"]
    with pytest.raises(ValueError, match=">= 5.0 s"):
        energy_window(c.work, 1, c, min_seconds=1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine has an energy counter")
def test_no_gpu_means_no_energy_counter_and_says_so():
    with pytest.raises(EnergyUnavailable, match="no GPU energy counter.*FLOPs energy proxy"):
        NvmlEnergy(0)


def test_without_nvidia_ml_py_the_message_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # what an install without the moe extra looks like
    with pytest.raises(EnergyUnavailable, match=r"pynvml is not installed.*\[moe\]"):
        NvmlEnergy(0)


def test_bad_arguments_and_an_empty_probe():
    with pytest.raises(ValueError, match="iters >= 1"):
        measure_latency(lambda: None, "cpu", iters=0)
    assert Probe("cpu").summary() == {"sampled_steps": 0}
