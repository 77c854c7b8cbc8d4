import json
import shutil

import pytest

from refgen.hub import ModelNotFoundError
from refgen.model_identity import ModelIdentity, identify_model


def _model_dir(path, **config):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "hidden_size": 8, **config}))
    return path


def _hub_cache(cache, repo_id, **config):
    """The layout huggingface_hub writes: models--ns--name/{refs/main, snapshots/<commit>/config.json}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    _model_dir(repo / "snapshots" / commit, **config)


def test_one_folder_spelled_two_ways_is_one_model(tmp_path, monkeypatch):
    d = _model_dir(tmp_path / "m" / "vl")
    monkeypatch.chdir(tmp_path / "m")
    a, b = identify_model("./vl"), identify_model(str(d))
    assert a == b and a.location == str(d.resolve()) and len(a.config_sha256) == 64
    monkeypatch.chdir(tmp_path)
    assert identify_model("m/../m/vl") == a


def test_the_config_is_part_of_the_identity_but_not_who_wrote_it(tmp_path):
    d = _model_dir(tmp_path / "vl")
    before = identify_model(str(d))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "transformers_version": "9.9.9"}, indent=4))
    assert identify_model(str(d)) == before  # re-saved by another library version: the same model
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 16}))
    assert identify_model(str(d)).config_sha256 != before.config_sha256
    assert identify_model(str(d)).location == before.location


def test_missing_models_are_not_found(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError, match=r"--vl-model '\./nope' not found: no such folder"):
        identify_model("./nope", "--vl-model")
    with pytest.raises(ModelNotFoundError, match=r"'/no/such/dir' not found"):
        identify_model("/no/such/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        identify_model(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="neither a local folder nor a hub id in the local Hugging Face cache"):
        identify_model("ns/uncached")
    later = identify_model("ns/uncached", allow_download=True)  # for a loader about to download it
    assert later.location == "hub:ns/uncached" and later.config_sha256 is None


def test_hub_ids_are_fingerprinted_from_the_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    _hub_cache(tmp_path / "cache", "ns/vl")
    folder = _model_dir(tmp_path / "copy")
    hub = identify_model("ns/vl")
    assert hub.location == "hub:ns/vl" and hub.config_sha256 == identify_model(str(folder)).config_sha256
    assert hub != identify_model(str(folder))  # equal configs, but another place: maybe other weights


def test_a_model_shipped_in_the_package_is_named_by_its_place_there(tmp_path):
    from refgen.toyworld.benchmark import default_vl_model

    vl = identify_model(default_vl_model())
    assert vl.location == "refgen:assets/toyworld/vl" and len(vl.config_sha256) == 64
    copy = tmp_path / "vl"  # the same files outside the package are another folder, named by its path
    shutil.copytree(default_vl_model(), copy)
    assert identify_model(str(copy)) == ModelIdentity(str(copy.resolve()), vl.config_sha256)
