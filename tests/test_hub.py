"""A model argument that is neither a local folder nor cached ends in one line naming it and how to get it."""

import pytest
from huggingface_hub import constants

from refgen.cli import main
from refgen.hub import ModelNotFoundError, require_model


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_snapshot(cache, repo_id):
    """The layout huggingface_hub writes: models--ns--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")


def test_offline_hub_id_not_in_cache(empty_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as e:
        require_model("Qwen/Qwen-Image", "Qwen-Image model")
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("Qwen-Image model 'Qwen/Qwen-Image' is neither a local folder nor in the local Hugging Face cache",
                 str(empty_cache), "HF_HUB_OFFLINE", "hf download Qwen/Qwen-Image"):
        assert part in msg, part
    _cache_snapshot(empty_cache, "Qwen/Qwen-Image")
    assert require_model("Qwen/Qwen-Image") == "Qwen/Qwen-Image"


def test_unreachable_hub(empty_cache, monkeypatch):
    """A real request to a closed local port: what an air-gapped machine sees, without waiting for DNS."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ModelNotFoundError, match=r"'org/model' is neither .* cannot be reached \(.*hf download "
                                                 r"org/model"):
        require_model("org/model")


def test_paths_and_folders(tmp_path, empty_cache):
    assert require_model(str(tmp_path)) == str(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        require_model(str(tmp_path / "w.bin"))
    with pytest.raises(ModelNotFoundError, match="not a hub id .* check the path"):
        require_model(str(tmp_path / "no" / "such" / "folder"))


def test_cli_commands_name_the_missing_model(tmp_path, empty_cache, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cases = [
        ["slots", "--model", "Qwen/Qwen-Image", "--prompt", "~ID~ at sunset"],
        ["render", "--model", "Qwen/Qwen-Image", "--prompt", "x", "--out", str(tmp_path / "o"), "--device", "cpu",
         "--dtype", "fp32"],
        ["features", str(tmp_path), "--vl-model", "Qwen/Qwen3-VL-8B-Instruct", "--device", "cpu"],
        ["dit", "prepare", str(tmp_path), str(tmp_path / "shards"), "--device", "cpu", "--dtype", "fp32",
         "--buckets", "64x64"],
    ]
    from PIL import Image

    (tmp_path / "seed_1").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "seed_1" / name)
    for argv in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is neither a local folder nor in the local Hugging Face cache" in err, \
            (argv, err)
