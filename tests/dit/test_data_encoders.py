"""Encoders on tiny random models of the real classes: DINOv3 patch-grid alignment, T5 trimming, VAE, inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from refgen.dit.encoders import (dino_input, encode_dino, encode_latents, encode_text, load_dino,
                                 load_text_encoder, load_vae, resolve_source, to_uint8_tensor, vae_downsample)
from refgen.dit.tiny_encoders import tiny_dino
from refgen.images import load_rgb


CPU = torch.device("cpu")


def _pixels(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, h, w), generator=g, dtype=torch.uint8)


def test_dino_patch_on_a_crop_equals_the_full_image_patch_at_that_grid_position():
    """Alignment proof. Attention makes every token depend on the whole image, so a crop can only match exactly
    in a DINOv3 without transformer layers: there each patch token is LayerNorm(conv(its own 16x16 block)), and
    the test checks exactly what the pipeline can get wrong - which output token is which image block (register
    tokens excluded, row-major order, patch 16). Same class, same code path, 4 register tokens."""
    torch.manual_seed(0)
    dino = tiny_dino(num_hidden_layers=0).eval()
    x = dino_input(_pixels(64, 128), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # (1, 3, 64, 128)
    cls, patches = encode_dino(dino, x)
    gh, gw = 64 // 16, 128 // 16
    assert patches.shape == (1, gh * gw, 32) and cls.shape == (1, 32)
    for r, c in [(0, 0), (0, 7), (1, 3), (3, 0), (3, 7)]:
        _, one = encode_dino(dino, x[:, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16])  # one-patch crop
        torch.testing.assert_close(patches[0, r * gw + c], one[0, 0], atol=1e-5, rtol=1e-5)
    # A multi-patch crop: its grid must be the matching sub-grid, row-major.
    _, sub = encode_dino(dino, x[:, :, 16:48, 32:80])  # rows 1-2, cols 2-4
    full_grid = patches[0].view(gh, gw, -1)
    torch.testing.assert_close(sub[0].view(2, 3, -1), full_grid[1:3, 2:5], atol=1e-5, rtol=1e-5)


def test_the_seeds_dinov2_slice_fails_the_same_check():
    """The seed's `[:, 1:num_patches+1]` takes the 4 register tokens as patches: the alignment check above
    catches exactly that mistake."""
    dino = tiny_dino(num_hidden_layers=0).eval()
    x = dino_input(_pixels(32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    hs = dino(pixel_values=x).last_hidden_state
    seed_patches = hs[0, 1:4 + 1]
    _, one = encode_dino(dino, x[:, :, :16, :16])
    assert not torch.allclose(seed_patches[0], one[0, 0], atol=1e-3)
    assert dino.config.num_register_tokens == 4 and dino.config.patch_size == 16


def test_dino_grid_matches_the_dit_token_grid_on_vae_latents(data_tiny_models):
    vae = load_vae(data_tiny_models["vae"], "vae", CPU, torch.float32)
    dino, (mean, std) = load_dino(data_tiny_models["dino"], None, CPU, torch.float32)
    px = _pixels(64, 128)
    lat = encode_latents(vae, px)
    cls, patches = encode_dino(dino, dino_input(px, mean, std))
    assert vae_downsample(vae) == 8 and lat.shape == (1, 16, 8, 16)
    # One DiT token = a 2x2 latent patch = 16x16 px = one DINOv3 patch.
    assert patches.shape[1] == (lat.shape[2] // 2) * (lat.shape[3] // 2)
    # The real (2-layer) model: CLS is token 0, patches start after the registers.
    hs = dino(pixel_values=dino_input(px, mean, std)).last_hidden_state
    assert hs.shape[1] == 1 + 4 + patches.shape[1]
    torch.testing.assert_close(patches[0], hs[0, 5:])
    torch.testing.assert_close(cls[0], hs[0, 0])


def test_t5_states_of_valid_tokens_do_not_depend_on_padding_length(data_tiny_models):
    """Justifies storing only the valid tokens: padding to 512 (the seed) gives the same states for them."""
    tok, t5 = load_text_encoder(data_tiny_models["text_encoder"], None, None, None, CPU, torch.float32)
    caps = ["a red cat", "a portrait of a woman looking left with a blue dog", ""]
    trimmed, d = encode_text(tok, t5, caps, max_length=512)
    assert d == 32
    full_tok = tok(caps, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    with torch.no_grad():
        full = t5(input_ids=full_tok.input_ids, attention_mask=full_tok.attention_mask).last_hidden_state
    for i, arr in enumerate(trimmed):
        n = int(full_tok.attention_mask[i].sum())
        assert arr.shape == (n, 32)
        np.testing.assert_allclose(arr, full[i, :n].numpy(), atol=1e-5, rtol=1e-4)
    assert trimmed[2].shape[0] == 1  # the empty caption is just </s>


def test_t5_truncates_at_max_length(data_tiny_models):
    tok, t5 = load_text_encoder(data_tiny_models["text_encoder"], None, None, None, CPU, torch.float32)
    out, _ = encode_text(tok, t5, ["a red cat " * 50], max_length=16)
    assert out[0].shape == (16, 32)


def test_vae_latents_are_the_deterministic_posterior_mean(data_tiny_models):
    vae = load_vae(data_tiny_models["vae"], "vae", CPU, torch.float32)
    px = _pixels(64, 64, seed=3)
    a, b = encode_latents(vae, px), encode_latents(vae, px)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with torch.no_grad():
        ref = vae.encode(px.float() / 127.5 - 1).latent_dist.mean
    torch.testing.assert_close(a, ref)
    assert vae.config.latent_channels == 16


def test_dino_input_is_rescale_then_imagenet_normalise():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    px = torch.tensor([255, 0, 128], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    x = dino_input(px, mean, std)
    expect = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor(expect))


def test_dino_mean_std_come_from_the_preprocessor_config(data_tiny_models):
    _, (mean, std) = load_dino(data_tiny_models["dino"], None, CPU, torch.float32)
    assert mean == (0.485, 0.456, 0.406) and std == (0.229, 0.224, 0.225)


def test_resolve_source_for_folders_subfolders_and_hub_ids(tmp_path, data_tiny_models, monkeypatch):
    root = str(tmp_path)
    from pathlib import Path

    vae_dir = Path(data_tiny_models["vae"])
    # A model folder itself: the default subfolder 'vae' does not exist there and is ignored.
    assert resolve_source(str(vae_dir), "vae") == (str(vae_dir), None)
    # The parent holds 'vae/': use it as subfolder (FLUX repo layout).
    assert resolve_source(str(vae_dir.parent), "vae") == (str(vae_dir.parent), "vae")
    # A hub id: kept with its subfolder once it is known to be loadable (here: in a local cache) ...
    from huggingface_hub import constants

    cache = tmp_path / "cache" / "models--black-forest-labs--FLUX.1-dev"
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text("0" * 40)
    (cache / "snapshots" / ("0" * 40)).mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_source("black-forest-labs/FLUX.1-dev", "vae") == ("black-forest-labs/FLUX.1-dev", "vae")
    # ... and named, with how to get it, when it is not
    with pytest.raises(FileNotFoundError, match="VAE 'black-forest-labs/FLUX.2' is neither a local folder"):
        resolve_source("black-forest-labs/FLUX.2", "vae", "VAE")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        resolve_source(root, None)
    f = tmp_path / "x.bin"
    f.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="x.bin"):
        resolve_source(str(f), None)


def test_load_rgb_flattens_alpha_on_white_and_applies_exif_rotation(tmp_path):
    rgba = Image.new("RGBA", (8, 4), (10, 20, 30, 0))
    rgba.save(tmp_path / "a.png")
    im = load_rgb(tmp_path / "a.png")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (40, 20), (200, 0, 0)).save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").size == (20, 40)
    from refgen.dit.prepare import _image_size

    assert _image_size(tmp_path / "r.jpg") == (20, 40)  # the scan buckets the displayed orientation


def test_to_uint8_tensor_layout():
    im = Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))  # H=2, W=3
    t = to_uint8_tensor([im, im])
    assert t.shape == (2, 3, 2, 3) and t.dtype == torch.uint8
    assert t[0, :, 1, 2].tolist() == [15, 16, 17]
