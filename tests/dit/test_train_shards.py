"""End to end on real shards: `refgen dit prepare` output (tiny VAE / T5 / DINOv3, conftest's `data_prepared`)
-> `dit train` from the config's data_dir -> `dit sample` decoding with the tiny VAE and the latent statistics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from refgen.dit.cli_model import register



def _cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_train_from_shards_then_sample(tmp_path, data_prepared):
    shard_dir, index, _, models = data_prepared
    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "dit_tiny.yaml").read_text())
    # the tiny encoders: 16 latent channels, 32-d T5 and DINO
    cfg["model"] = {"preset": "tiny", "latent_channels": 16, "t5_dim": 32, "dino_dim": 32}
    cfg.update(data_dir=str(shard_dir), out_dir=str(tmp_path / "run"), steps=3, batch_size=2, effective_batch=2,
               ckpt_every=3, log_every=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert _cli(["train", "--config", str(tmp_path / "cfg.yaml")]) == 0
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert (ckpt_dir / "step_0000003.pt").is_file()

    out = tmp_path / "samples"
    assert _cli(["sample", "--ckpt", str(ckpt_dir), "--data-dir", str(shard_dir), "--out", str(out), "--n", "2",
                 "--steps", "2", "--vae", models["vae"], "--device", "cpu"]) == 0
    saved = torch.load(out / "latents.pt")
    assert saved["latents"].shape[1] == 16 and len(saved["key"]) == saved["latents"].shape[0]
    assert len(list(out.glob("*.png"))) == saved["latents"].shape[0]


REPO = Path(__file__).resolve().parents[2]


def test_tiny_config_trains_on_tiny_models_shards_as_the_readme_shows(tmp_path, data_prepared, capsys):
    """configs/dit_tiny.yaml as shipped (4 channels, 16-d) on `dit tiny-models` shards (16 channels, 32-d): the
    config takes the shards' numbers (dims_from_data) and says so; the run records them."""
    from refgen.cli import main
    from refgen.dit.train import load_checkpoint

    shard_dir = data_prepared[0]
    run = tmp_path / "run"
    assert main(["dit", "train", "--config", str(REPO / "configs" / "dit_tiny.yaml"), "--data-dir", str(shard_dir),
                 "--out-dir", str(run), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "dims_from_data: model.latent_channels 4 -> 16, model.t5_dim 16 -> 32, model.dino_dim 16 -> 32" in out
    ck = load_checkpoint(run / "checkpoints" / "step_0000002.pt")
    m = ck["config"]["model"]
    assert (m["latent_channels"], m["t5_dim"], m["dino_dim"]) == (16, 32, 32)
    rec = json.loads((run / "config.json").read_text())
    assert rec["dims_taken_from_data"] == {"latent_channels": [4, 16], "t5_dim": [16, 32], "dino_dim": [16, 32]}


def test_a_config_that_does_not_fit_the_shards_is_refused_naming_both_numbers(tmp_path, data_prepared, capsys):
    from refgen.cli import main

    shard_dir = data_prepared[0]
    cfg = yaml.safe_load((REPO / "configs" / "dit_tiny.yaml").read_text())
    cfg.update(dims_from_data=False, out_dir=str(tmp_path / "run"), steps=1)
    cfg["model"] = {"preset": "tiny", "latent_channels": 16, "t5_dim": 32, "dino_dim": 64}
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["dit", "train", "--config", str(tmp_path / "strict.yaml"), "--data-dir", str(shard_dir)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("refgen dit train: error: the model does not fit the data: model.dino_dim is 64 in "
                          f"{tmp_path / 'strict.yaml'} but 32 in the shards ({shard_dir / 'index.json'} dino_dim)")
    assert "t5_dim" not in err and "\n" not in err
    assert not (tmp_path / "run").exists()                       # refused before anything was written
    cfg["model"] = {"preset": "tiny", "latent_channels": 16, "t5_dim": 32, "dino_dim": 32, "patch_size": 1}
    cfg["dims_from_data"] = True                                 # dims_from_data never changes the patch size
    (tmp_path / "patch.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["dit", "train", "--config", str(tmp_path / "patch.yaml"), "--data-dir", str(shard_dir)]) == 1
    assert "model.patch_size is 1" in capsys.readouterr().err


def test_sample_decodes_with_the_vae_recorded_at_prepare_time(tmp_path, data_prepared, capsys):
    from refgen.cli import main

    shard_dir, _, _, models = data_prepared
    run = tmp_path / "run"
    assert main(["dit", "train", "--config", str(REPO / "configs" / "dit_tiny.yaml"), "--data-dir", str(shard_dir),
                 "--out-dir", str(run), "--steps", "1"]) == 0
    capsys.readouterr()
    enc = json.loads((shard_dir / "encoders.json").read_text())
    assert enc["vae"]["source"] == str(Path(models["vae"]).resolve())
    out = tmp_path / "samples"
    base = ["dit", "sample", "--ckpt", str(run), "--data-dir", str(shard_dir), "--n", "2", "--steps", "2",
            "--device", "cpu"]
    assert main(base + ["--out", str(out)]) == 0                 # no --vae
    msg = capsys.readouterr().out.strip().splitlines()[-1]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 2 and msg.startswith(f"wrote 2 images ({pngs[0]}, {pngs[1]}) decoded with the VAE "
                                             f"{enc['vae']['source']} (from {shard_dir / 'encoders.json'})"), msg
    assert json.loads((out / "sample.json").read_text())["images"] == pngs
    assert main(base + ["--out", str(tmp_path / "lat"), "--no-decode"]) == 0
    assert not list((tmp_path / "lat").glob("*.png")) and (tmp_path / "lat" / "latents.pt").is_file()
    assert "--no-decode" in capsys.readouterr().out
    # a checkpoint trained on other shards does not fit these
    cfg = yaml.safe_load((REPO / "configs" / "dit_tiny.yaml").read_text())
    cfg.update(dims_from_data=False, out_dir=str(tmp_path / "other"), steps=1, ckpt_every=1)
    from refgen.dit.config import train_config_from_dict
    from refgen.dit.train import train

    g = torch.Generator().manual_seed(0)
    batch = {"latent": torch.randn(2, 4, 8, 8, generator=g), "t5": torch.randn(2, 8, 16, generator=g),
             "t5_mask": torch.ones(2, 8, dtype=torch.bool), "dino_cls": torch.randn(2, 16, generator=g),
             "dino_patches": torch.randn(2, 16, 16, generator=g), "caption": ["a", "b"], "key": ["k0", "k1"]}
    cfg.update(batch_size=2, effective_batch=2, progress=False)
    train(train_config_from_dict(cfg), [batch])                # the tiny preset's own 4 channels / 16-d
    assert main(base + ["--out", str(tmp_path / "x"), "--ckpt", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert "does not fit the shards" in err and "model.latent_channels 4 vs 16 in the shards" in err, err
