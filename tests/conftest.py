"""Shared fixtures: the tiny random Qwen-Image + Qwen3-VL models, built once per test session (offline)."""

import pytest


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
