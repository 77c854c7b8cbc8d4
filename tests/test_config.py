"""The one config loader (refgen.config.from_dict / from_yaml) behind every config class: nested sections built
recursively, unknown keys named with their section and file, None overrides ignored."""

from dataclasses import dataclass, field

import pytest

from refgen.config import from_dict, from_yaml
from refgen.dit.config import NanoDiTConfig, load_train_config
from refgen.identity.invert import InvertConfig
from refgen.moe.model import MoEModelConfig
from refgen.moe.routing import RLConfig
from refgen.moe.train import MoETrainConfig
from refgen.toyworld.benchmark import BenchmarkConfig
from refgen.toyworld.model_recipe import ToyModelConfig, VaeConfig


@pytest.mark.parametrize("cls,key", [(InvertConfig, "steps"), (BenchmarkConfig, "render_steps"), (ToyModelConfig, "seed"),
                                     (MoETrainConfig, "epochs"), (RLConfig, "steps")])
def test_from_yaml_names_unknown_keys_and_applies_overrides(tmp_path, cls, key):
    p = tmp_path / "c.yaml"
    p.write_text(f"{key}: 3\nlearnig_rate: 1\n")
    with pytest.raises(ValueError, match=rf"c\.yaml: unknown keys \['learnig_rate'\] for {cls.__name__}"):
        cls.from_yaml(p)
    p.write_text(f"{key}: 3\n")
    assert getattr(cls.from_yaml(p, **{key: None}), key) == 3  # a None override leaves the file's value
    assert getattr(cls.from_yaml(p, **{key: 5}), key) == 5


@dataclass
class _Inner:
    a: int = 1
    pair: tuple[float, float] = (0.0, 0.0)


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    maybe: _Inner | None = None
    plain: dict = field(default_factory=dict)
    name: str = "x"


def test_from_dict_builds_nested_dataclasses_and_tuples():
    cfg = from_dict(_Outer, {"inner": {"a": 2, "pair": [1, 2]}, "maybe": {"a": 3}, "plain": {"k": 1}})
    assert cfg == _Outer(_Inner(2, (1.0, 2.0)), _Inner(3), {"k": 1})
    assert isinstance(cfg.inner.pair, tuple) and isinstance(cfg.inner.pair[0], float)
    kept = _Inner(7)
    assert from_dict(_Outer, {"inner": kept}).inner is kept          # instances pass through
    assert from_dict(_Outer, {"maybe": None}).maybe is None


def test_unknown_nested_key_names_key_section_and_file(tmp_path):
    p = tmp_path / "n.yaml"
    p.write_text("inner:\n  a: 2\n  b: 3\n")
    with pytest.raises(ValueError, match=r"n\.yaml: unknown keys \['b'\] in section 'inner' for _Inner"):
        from_yaml(_Outer, p)
    p.write_text("inner: 3\n")
    with pytest.raises(ValueError, match=r"n\.yaml: section 'inner' must be a mapping"):
        from_yaml(_Outer, p)                          # a number where a section belongs
    p.write_text("- 1\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        from_yaml(_Outer, p)


def test_every_loader_uses_it_for_its_sections(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("vae:\n  zdim: 4\n")
    with pytest.raises(ValueError, match=r"t\.yaml: unknown keys \['zdim'\] in section 'vae' for VaeConfig"):
        ToyModelConfig.from_yaml(p)
    p.write_text("vae:\n  z_dim: 8\n")
    assert ToyModelConfig.from_yaml(p).vae == VaeConfig(z_dim=8)

    p.write_text("model:\n  num_experts: 8\n  top_k: 3\n  kind: flat\n")
    m = MoETrainConfig.from_yaml(p).model
    assert isinstance(m, MoEModelConfig) and (m.num_experts, m.top_k) == (8, 3)
    p.write_text("model:\n  experts: 8\n")
    with pytest.raises(ValueError, match=r"t\.yaml: unknown keys \['experts'\] in section 'model' for MoEModelConfig"):
        MoETrainConfig.from_yaml(p)

    p.write_text("model:\n  preset: tiny\n  depth: 3\nbetas: [0.9, 0.95]\n")
    c = load_train_config(p)
    assert isinstance(c.model, NanoDiTConfig) and c.model.depth == 3 and c.betas == (0.9, 0.95)
    for text, key in (("model:\n  preset: tiny\n  detph: 3\n", "detph"), ("model:\n  detph: 3\n", "detph"),
                      ("cfg_dropout:\n  uncnd: 1\n", "uncnd")):
        p.write_text(text)
        with pytest.raises(ValueError, match=rf"t\.yaml: unknown keys \['{key}'\] in section"):
            load_train_config(p)


def test_a_number_written_as_yaml_text_is_refused_with_the_key_and_file(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("graph_l1: 1e-3\n")  # YAML 1.1: a string, which used to fail later as "'<' not supported"
    with pytest.raises(ValueError, match=r"m\.yaml: graph_l1 must be a number, got the string '1e-3' \(YAML 1.1"):
        MoETrainConfig.from_yaml(p)
    p.write_text("graph_l1: none\n")
    with pytest.raises(ValueError, match=r"graph_l1 must be a number, got the string 'none'$"):
        MoETrainConfig.from_yaml(p)
    p.write_text("graph_l1: 1.0e-3\n")
    assert MoETrainConfig.from_yaml(p).graph_l1 == 1e-3
