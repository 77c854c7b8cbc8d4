"""End to end on real shards: `refgen dit prepare` output (tiny VAE / T5 / DINOv3, conftest's `data_prepared`)
-> `dit train` from the config's data_dir -> `dit sample` decoding with the tiny VAE and the latent statistics."""

from __future__ import annotations

import argparse
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
