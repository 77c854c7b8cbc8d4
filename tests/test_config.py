"""The shared YAML loader behind every config's from_yaml: unknown keys are named, None overrides ignored."""

import pytest

from refgen.identity.invert import InvertConfig
from refgen.toyworld.benchmark import BenchmarkConfig
from refgen.toyworld.train_model import ToyModelConfig


@pytest.mark.parametrize("cls,key", [(InvertConfig, "steps"), (BenchmarkConfig, "render_steps"), (ToyModelConfig, "seed")])
def test_from_yaml_names_unknown_keys_and_applies_overrides(tmp_path, cls, key):
    p = tmp_path / "c.yaml"
    p.write_text(f"{key}: 3\nlearnig_rate: 1\n")
    with pytest.raises(ValueError, match=rf"unknown keys \['learnig_rate'\] for {cls.__name__}"):
        cls.from_yaml(p)
    p.write_text(f"{key}: 3\n")
    assert getattr(cls.from_yaml(p, **{key: None}), key) == 3  # a None override leaves the file's value
    assert getattr(cls.from_yaml(p, **{key: 5}), key) == 5
