"""The whole `prepare` pipeline on generated images with tiny VAE / T5 / DINOv3 models (CPU, explicit)."""

import argparse
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from refgen.artifacts import read_jsonl
from refgen.dit.prepare import PrepareConfig, make_key, prepare
from refgen.runtime import PolicyError


TEST_BUCKETS = "64x64,64x128,128x64"


def _members(tar_path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            key, field = m.name.split(".", 1)
            out.setdefault(key, {})[field] = tf.extractfile(m).read()
    return out


def _npy(b: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(b), allow_pickle=False)


def _all_samples(out, index):
    samples = {}
    for b in index["buckets"].values():
        for s in b["shards"]:
            samples.update(_members(out / s["path"]))
    return samples


def test_counts_buckets_and_skip_reports(data_prepared):
    out, index, expect, _ = data_prepared
    good = expect["good"]
    assert index["samples"] == len(good)
    for bname, b in index["buckets"].items():
        assert b["count"] == sum(1 for v in good.values() if v[2] == bname)
    skipped = {s["file"]: s for s in json.loads((out / "skipped.json").read_text())}
    assert set(skipped) == expect["skipped_scan"] | expect["skipped_encode"]
    assert "unreadable image" in skipped["sub/not_an_image.jpg"]["reason"]
    assert "too small" in skipped["sub/too_small.png"]["reason"]
    assert "aspect ratio" in skipped["sub/panorama.png"]["reason"]
    assert "bad_caption.json" in skipped["sub/bad_caption.png"]["reason"]
    assert skipped["sub/truncated.jpg"]["stage"] == "encode" and "truncated" in skipped["sub/truncated.jpg"]["reason"]
    events = read_jsonl(out / "report.jsonl")
    assert {e["file"] for e in events if e["event"] == "skip"} == set(skipped)
    assert events[-1]["event"] == "done"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["buckets"] == TEST_BUCKETS.split(",") and "versions" in cfg and "git_commit" in cfg


def test_shard_contents_follow_the_format(data_prepared):
    out, index, expect, _ = data_prepared
    samples = _all_samples(out, index)
    assert len(samples) == index["samples"]
    by_source = {}
    for key, s in samples.items():
        assert set(s) == {"latent.npy", "t5.npy", "t5_mask.npy", "dino_cls.npy", "dino_patches.npy",
                          "caption.txt", "meta.json"}
        meta = json.loads(s["meta.json"])
        by_source[meta["source"]] = (key, s, meta)
        W, H = meta["width"], meta["height"]
        assert meta["bucket"] == expect["good"][meta["source"]][2] == f"{W}x{H}"
        lat, t5, mask = _npy(s["latent.npy"]), _npy(s["t5.npy"]), _npy(s["t5_mask.npy"])
        cls, patches = _npy(s["dino_cls.npy"]), _npy(s["dino_patches.npy"])
        assert lat.dtype == np.float16 and lat.shape == (16, H // 8, W // 8)
        assert patches.dtype == np.float16 and patches.shape == ((H // 16) * (W // 16), 32)
        assert meta["dino_grid"] == [H // 16, W // 16]
        assert cls.shape == (32,)
        assert mask.dtype == bool and mask.shape == (32,) and mask.sum() == t5.shape[0] == meta["t5_tokens"]
        assert mask[: t5.shape[0]].all() and t5.shape[1] == 32
    assert by_source["a_square.png"][1]["caption.txt"].decode() == "a red cat"
    assert by_source["b_tall.png"][1]["caption.txt"].decode() == "a portrait of a woman looking left"
    assert by_source["b_tall.png"][2]["source_meta"]["score"] == 7
    assert by_source["c_wide.png"][2]["caption_source"] == "json:text"
    assert by_source["e_tall.jpg"][1]["caption.txt"] == b"" and by_source["e_tall.jpg"][2]["caption_source"] == "none"
    assert by_source["sub/g_square.png"][2]["aspect_distortion"] == pytest.approx(70 / 64 - 1, abs=1e-4)
    assert by_source["d_small_square.png"][2]["upscale"] == pytest.approx(1.6)
    assert by_source["a_square.png"][0] == make_key("a_square.png") and "." not in make_key("x.y/z.png")


def test_stored_features_equal_a_fresh_encode_of_the_resized_image(data_prepared):
    """Latents / DINO / T5 in the shard are what the models give for the bucket-resized image (fp16 storage)."""
    from refgen.dit.encoders import (dino_input, encode_dino, encode_latents, encode_text, load_dino,
                                     load_text_encoder, load_vae, resize_to_bucket, to_uint8_tensor)
    from refgen.images import load_rgb

    out, index, expect, models = data_prepared
    cfg = json.loads((out / "config.json").read_text())["config"]
    samples = _all_samples(out, index)
    cpu = torch.device("cpu")
    vae = load_vae(models["vae"], "vae", cpu, torch.float32)
    dino, (mean, std) = load_dino(models["dino"], None, cpu, torch.float32)
    tok, t5 = load_text_encoder(models["text_encoder"], None, None, None, cpu, torch.float32)
    for rel in ("b_tall.png", "sub/h_rgba.png"):
        key = make_key(rel)
        s = samples[key]
        meta = json.loads(s["meta.json"])
        img = resize_to_bucket(load_rgb(f"{cfg['src']}/{rel}"), meta["width"], meta["height"])
        px = to_uint8_tensor([img])
        lat = encode_latents(vae, px)[0].numpy()
        cls, patches = encode_dino(dino, dino_input(px, mean, std))
        emb, _ = encode_text(tok, t5, [s["caption.txt"].decode()], 32)
        np.testing.assert_allclose(_npy(s["latent.npy"]).astype(np.float32), lat, atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(_npy(s["dino_patches.npy"]).astype(np.float32), patches[0].numpy(),
                                   atol=5e-3, rtol=2e-3)
        np.testing.assert_allclose(_npy(s["dino_cls.npy"]).astype(np.float32), cls[0].numpy(), atol=5e-3, rtol=2e-3)
        np.testing.assert_allclose(_npy(s["t5.npy"]).astype(np.float32), emb[0], atol=5e-3, rtol=2e-3)


def test_latent_stats_are_per_channel_over_every_stored_value(data_prepared):
    out, index, _, _ = data_prepared
    lats = [_npy(s["latent.npy"]).astype(np.float64) for s in _all_samples(out, index).values()]
    flat = np.concatenate([x.reshape(16, -1) for x in lats], axis=1)
    stats = json.loads((out / "latent_stats.json").read_text())
    np.testing.assert_allclose(stats["mean"], flat.mean(1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["std"], flat.std(1), rtol=1e-7)
    assert stats["values_per_channel"] == flat.shape[1] and stats["samples"] == index["samples"]
    assert stats["vae"]["scaling_factor"] == pytest.approx(0.3611)


def test_rerun_is_idempotent_and_resume_redoes_only_missing_shards(data_prepared, data_config, tmp_path):
    prepare_config = data_config
    out0, index0, _, models = data_prepared
    out = tmp_path / "shards"
    shutil.copytree(out0, out)
    cfg = json.loads((out / "config.json").read_text())["config"]
    tars = sorted(out.glob("buckets/*/*.tar"))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tars}

    # A finished OUT: nothing is encoded again, nothing rewritten.
    index = prepare(prepare_config(cfg["src"], out, models), progress=False)
    assert index == index0
    assert all(p.stat().st_mtime_ns == before[p][1] for p in tars)
    start = [e for e in read_jsonl(out / "report.jsonl") if e["event"] == "start"][-1]
    assert start["shards_todo"] == 0

    # An interrupted run: one shard lost its sidecar (died between tar and sidecar), one is gone, and a temp
    # file was left behind. Only those two shards are redone, byte-identical to the first run.
    victim_a, victim_b = tars[0], tars[-1]
    victim_a.with_suffix(".json").unlink()
    victim_b.unlink()
    (victim_b.parent / f".{victim_b.name}.123.tmp").write_bytes(b"partial")
    prepare(prepare_config(cfg["src"], out, models), progress=False)
    start = [e for e in read_jsonl(out / "report.jsonl") if e["event"] == "start"][-1]
    assert start["shards_todo"] == 2
    for p in tars:
        assert p.read_bytes() == before[p][0], p
    for p in tars[1:-1]:
        assert p.stat().st_mtime_ns == before[p][1]
    assert json.loads((out / "latent_stats.json").read_text())["mean"] == \
        json.loads((out0 / "latent_stats.json").read_text())["mean"]


def test_changed_settings_or_sources_are_refused_unless_overwrite(data_prepared, data_config, tmp_path):
    prepare_config = data_config
    out0, _, _, models = data_prepared
    out = tmp_path / "shards"
    shutil.copytree(out0, out)
    src = json.loads((out / "config.json").read_text())["config"]["src"]
    with pytest.raises(ValueError, match="t5_max_length"):
        prepare(prepare_config(src, out, models, t5_max_length=16), progress=False)
    src2 = tmp_path / "fewer"
    src2.mkdir()
    for name in ("a_square.png", "a_square.txt", "d_small_square.png"):
        shutil.copy(f"{src}/{name}", src2 / name)
    with pytest.raises(ValueError, match="changed since OUT was planned"):
        prepare(prepare_config(src2, out, models), progress=False)
    (out / "user_notes.txt").write_text("keep me")
    index = prepare(prepare_config(src2, out, models, overwrite=True, shard_size=100), progress=False)
    assert index["samples"] == 2 and list(index["buckets"]) == ["64x64"]
    assert not (out / "buckets" / "128x64").exists()
    assert (out / "user_notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (out / "buckets" / "64x64").iterdir()) == ["shard-000000.json",
                                                                                "shard-000000.tar"]


def test_config_validation_names_the_problem(tmp_path):
    with pytest.raises(PolicyError, match="fp16"):
        PrepareConfig(src=str(tmp_path), out=str(tmp_path / "o"), dtype="fp16")
    with pytest.raises(ValueError, match="bfloat16"):
        PrepareConfig(src=str(tmp_path), out=str(tmp_path / "o"), store_dtype="bf16")
    with pytest.raises(ValueError, match="multiples of 16"):
        PrepareConfig(src=str(tmp_path), out=str(tmp_path / "o"), buckets="64x72")
    with pytest.raises(FileNotFoundError, match="nope"):
        PrepareConfig(src=str(tmp_path / "nope"), out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="shard_size"):
        PrepareConfig(src=str(tmp_path), out=str(tmp_path / "o"), shard_size=0)


def test_real_models_need_cuda(data_images, data_tiny_models, data_config, tmp_path):
    prepare_config = data_config
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    src, _ = data_images
    with pytest.raises(PolicyError, match="CUDA"):
        prepare(prepare_config(src, tmp_path / "o", data_tiny_models, device="cuda"), progress=False)


def test_cli_prepare_and_tiny_models(tmp_path, data_images, capsys):
    from refgen.dit.cli_data import register

    parser = argparse.ArgumentParser(prog="refgen dit")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["tiny-models", str(tmp_path / "tiny")])
    assert args.func(args) == 0
    capsys.readouterr()
    for sub, f in [("vae", "config.json"), ("text_encoder", "tokenizer.json"), ("dino", "preprocessor_config.json")]:
        assert (tmp_path / "tiny" / sub / f).is_file()
    src, expect = data_images
    small = tmp_path / "small"
    small.mkdir()
    for name in ("a_square.png", "a_square.txt", "b_tall.png", "b_tall.json"):
        shutil.copy(src / name, small / name)
    (small / "broken.png").write_bytes(b"\x89PNG broken")
    args = parser.parse_args(["prepare", str(small), str(tmp_path / "out"), "--vae", str(tmp_path / "tiny" / "vae"),
                              "--text-encoder", str(tmp_path / "tiny" / "text_encoder"),
                              "--dino", str(tmp_path / "tiny" / "dino"), "--device", "cpu", "--dtype", "fp32",
                              "--buckets", TEST_BUCKETS, "--t5-max-length", "8", "--no-progress"])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["samples"] == 2 and summary["skipped"] == 1
    assert summary["buckets"] == {"64x128": 1, "64x64": 1}
    assert "skipped.json" in captured.err
    bad = parser.parse_args(["prepare", str(src), str(tmp_path / "o2"), "--buckets", "64x70", "--device", "cpu"])
    assert bad.func(bad) == 2


def test_disk_full_while_writing_a_shard_names_it_and_a_rerun_completes(data_prepared, data_config, tmp_path,
                                                                        monkeypatch):
    """ENOSPC in the middle of a shard (the kernel's own error, from /dev/full): the error names the shard and
    the cause, nothing half-written is left, and once there is space again a re-run writes the same shards."""
    import errno
    import os

    import refgen.artifacts as artifacts
    from refgen.artifacts import ArtifactWriteError

    out0, index0, _, models = data_prepared
    src = json.loads((out0 / "config.json").read_text())["config"]["src"]
    out = tmp_path / "shards"
    budget = {"left": 20_000}

    def write(fd, data):
        if budget["left"] <= 0:
            full = os.open("/dev/full", os.O_WRONLY) if os.path.exists("/dev/full") else None
            if full is None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            try:
                return os.write(full, data)
            finally:
                os.close(full)
        n = os.write(fd, bytes(data[:budget["left"]]))
        budget["left"] -= n
        return n

    monkeypatch.setattr(artifacts, "_os_write", write)
    with pytest.raises(ArtifactWriteError, match=r"cannot write .*shard-\d+\.tar: No space left on device") as e:
        prepare(data_config(src, out, models), progress=False)
    assert e.value.errno == errno.ENOSPC
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(artifacts, "_os_write", os.write)
    assert prepare(data_config(src, out, models), progress=False) == index0
    for tar in out0.rglob("*.tar"):
        assert (out / tar.relative_to(out0)).read_bytes() == tar.read_bytes()
