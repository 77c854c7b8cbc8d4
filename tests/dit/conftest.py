"""Shared fixtures of the DiT data-pipeline tests: tiny offline models, a folder of generated images, and one
prepared shard folder (built once per session; tests that modify it copy it first)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

TEST_BUCKETS = "64x64,64x128,128x64"


def _noise_image(rng, w, h, mode="RGB"):
    # Smooth structure plus noise, so the latents are not pure noise statistics.
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) % 64) * 4], -1)
    img = np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(img)
    if mode == "RGBA":
        a = np.full((h, w), 255, np.uint8)
        a[:, : w // 2] = 0
        im.putalpha(Image.fromarray(a))
    return im


def make_image_folder(root, rng_seed=0) -> dict:
    """Images of several sizes/aspects with .txt/.json captions, plus broken ones. Returns what to expect."""
    rng = np.random.default_rng(rng_seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    good = {  # relpath: (w, h, expected bucket)
        "a_square.png": (64, 64, "64x64"),
        "b_tall.png": (60, 120, "64x128"),
        "c_wide.png": (128, 64, "128x64"),
        "d_small_square.png": (40, 40, "64x64"),
        "e_tall.jpg": (64, 128, "64x128"),
        "f_wide.png": (130, 66, "128x64"),
        "sub/g_square.png": (70, 64, "64x64"),
        "sub/h_rgba.png": (64, 64, "64x64"),
    }
    for rel, (w, h, _) in good.items():
        _noise_image(rng, w, h, "RGBA" if "rgba" in rel else "RGB").save(root / rel)
    (root / "a_square.txt").write_text("a red cat\n")
    (root / "b_tall.json").write_text(json.dumps({"caption": "a portrait of a woman looking left", "score": 7}))
    (root / "c_wide.json").write_text(json.dumps({"text": "a wide photo of a dog"}))
    # Broken inputs: each must be skipped with a reason, never crash the run.
    (root / "sub" / "not_an_image.jpg").write_bytes(b"this is not a jpeg")
    _noise_image(rng, 16, 16).save(root / "sub" / "too_small.png")
    _noise_image(rng, 256, 32).save(root / "sub" / "panorama.png")
    _noise_image(rng, 64, 64).save(root / "sub" / "bad_caption.png")
    (root / "sub" / "bad_caption.json").write_text("{not json")
    buf = io.BytesIO()
    _noise_image(rng, 64, 64).save(buf, format="JPEG")
    (root / "sub" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return {"good": good, "skipped_scan": {"sub/not_an_image.jpg", "sub/too_small.png", "sub/panorama.png",
                                           "sub/bad_caption.png"},
            "skipped_encode": {"sub/truncated.jpg"}}


@pytest.fixture(scope="session")
def data_tiny_models(tmp_path_factory):
    from refgen.dit.tiny_encoders import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def data_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return root, make_image_folder(root)


def prepare_config(src, out, models, **kw):
    from refgen.dit.prepare import PrepareConfig

    args = dict(src=str(src), out=str(out), vae=models["vae"], text_encoder=models["text_encoder"],
                dino=models["dino"], buckets=TEST_BUCKETS, device="cpu", dtype="fp32", shard_size=2,
                batch_size=2, num_workers=2, t5_max_length=32)
    args.update(kw)
    return PrepareConfig(**args)


@pytest.fixture(scope="session")
def data_config():
    """The test defaults for PrepareConfig (tiny models, small buckets, CPU); keyword overrides."""
    return prepare_config


@pytest.fixture(scope="session")
def data_prepared(tmp_path_factory, data_tiny_models, data_images):
    """One finished `prepare` run: (out folder, index, expectations, models)."""
    from refgen.dit.prepare import prepare

    src, expect = data_images
    out = tmp_path_factory.mktemp("shards")
    index = prepare(prepare_config(src, out, data_tiny_models), progress=False)
    return out, index, expect, data_tiny_models
