"""Shared fixtures: the tiny random Qwen-Image + Qwen3-VL models, built once per test session (offline)."""

import importlib.util
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    # Every test runs tiny models: intra-op threads gain nothing, and on a shared 2-core box OpenMP barriers
    # between two threads made tiny ops ~100x slower (measured: a 32->64 Linear, 0.05 ms vs 16 ms under load).
    # Subprocesses the tests start (torchrun, the CLI) set their own.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from refgen.cli import main

    out = tmp_path_factory.mktemp("tiny")
    assert main(["tiny-model", str(out)]) == 0
    return {"qwen_image": str(out / "qwen-image"), "qwen3_vl": str(out / "qwen3-vl")}


@pytest.fixture(scope="session")
def pipe(tiny_models):
    from refgen.identity.render import load_pipeline

    return load_pipeline(tiny_models["qwen_image"], device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def bench_module():
    """bench/<name>.py loaded as a module (the bench scripts are not a package): `bench_module("dit_throughput")`."""
    root = Path(__file__).resolve().parents[1] / "bench"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
