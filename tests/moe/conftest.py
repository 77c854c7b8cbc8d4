"""Shared fixtures for the MoE tests: the digits set and one small trained graph-MoE (seconds on one CPU thread)."""

import pytest

from refgen.moe.data import load_digits
from refgen.moe.model import MoEModelConfig
from refgen.moe.train import MoETrainConfig, train

TINY_MODEL = dict(num_experts=4, top_k=2, stem_channels=16, expert_channels=24, expert_dim=48, pool=1)


def tiny_train_config(**over) -> MoETrainConfig:
    model = MoEModelConfig(**{**TINY_MODEL, **over.pop("model", {})})
    base = dict(dataset="digits", device="cpu", epochs=8, batch_size=64, lr=3e-3, shift_px=0, log_every=10,
                sample_every=5, model=model)
    return MoETrainConfig(**{**base, **over})


@pytest.fixture(scope="session")
def digits():
    return load_digits()


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory, digits):
    """(folder, moe.json) of a graph-MoE trained on digits."""
    out = tmp_path_factory.mktemp("moe_digits")
    info = train(tiny_train_config(), out, progress=False, data=digits)
    return out, info


@pytest.fixture(scope="session")
def exported_digits(tmp_path_factory, trained_digits, digits):
    """(folder, manifest) of `trained_digits` exported with the default ExportConfig (fp32 + int8 ONNX, .pt2)."""
    from refgen.moe.export import ExportConfig, export_run

    out = tmp_path_factory.mktemp("moe_export")
    return out, export_run(trained_digits[0], out, ExportConfig(), data=digits)
