"""The toy Qwen3-VL: its preprocessing and batched training forward equal the real path, the shipped
folder loads through VisionFeatures and tells people apart, and a tiny training run writes a folder
that loads."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from refgen.tiny_qwen import build_tokenizer
from refgen.toyworld import vl, world

SHIPPED = (vl.DEFAULT_DIR / "model.safetensors").is_file()


def _uint8(images):
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("size", [64, 128])
def test_pixel_values_equal_the_image_processor(size):
    images = [world.render(world.scene_from_seed(s), size) for s in range(3)]
    ref = vl.build_image_processor()(images=images, return_tensors="pt")
    pv, thw = vl.pixel_values(_uint8(images))
    assert torch.equal(thw, ref["image_grid_thw"])
    assert pv.shape == ref["pixel_values"].shape
    assert (pv - ref["pixel_values"]).abs().max() <= 1e-6


def test_pixel_values_refuses_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        vl.pixel_values(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="multiples of 32"):
        vl.pixel_values(torch.zeros(1, 3, 48, 48, dtype=torch.uint8))


def test_batched_training_forward_equals_the_native_one():
    cfg = vl.VLConfig.tiny(vision_depth=2)
    torch.manual_seed(0)
    model = vl.build_model(cfg, build_tokenizer(cfg.vocab_size)).eval()
    x = _uint8([world.sample(s)[0] for s in range(5)])
    with torch.no_grad():
        ref = vl.image_means(model, x)
        with vl.batched_vision(model):
            fast = vl.image_means(model, x)
        again = vl.image_means(model, x)
    assert torch.allclose(fast, ref, atol=1e-5), (fast - ref).abs().max()
    assert torch.equal(again, ref)  # the patch is undone on exit
    assert "forward" not in vars(model.model.visual.blocks[0].attn)


def test_the_replaced_forwards_fit_the_installed_transformers(monkeypatch):
    """batched_vision replaces two transformers methods; check_vision_tower is the loud failure when an update of
    transformers changes what they assume (the equality itself: test_batched_training_forward_equals_the_native_one)."""
    cfg = vl.VLConfig.tiny(vision_depth=1)
    model = vl.build_model(cfg, build_tokenizer(cfg.vocab_size))
    visual = model.model.visual
    vl.check_vision_tower(visual)                                  # the installed version fits
    attn_cls = type(visual.blocks[0].attn)

    def renamed(self, hidden_states, cu_seqlens, rotary_pos_emb=None, **kwargs):
        raise AssertionError

    monkeypatch.setattr(attn_cls, "forward", renamed)
    with pytest.raises(RuntimeError, match=r"transformers .*forward takes .*rotary_pos_emb"):
        with vl.batched_vision(model):
            pass
    monkeypatch.undo()
    monkeypatch.setattr(visual.patch_embed, "proj", torch.nn.Conv3d(3, 4, kernel_size=(2, 16, 16), stride=8))
    with pytest.raises(RuntimeError, match="kernel == stride"):
        vl.check_vision_tower(visual)


def test_config_validation():
    with pytest.raises(ValueError, match="size"):
        vl.VLConfig(size=48)
    with pytest.raises(ValueError, match="steps"):
        vl.VLConfig(steps=0)
    with pytest.raises(ValueError, match="head dim"):
        vl.VLConfig(vision_hidden=96, vision_heads=5)
    with pytest.raises(ValueError, match="photos_per_id"):
        vl.VLConfig(photos_per_id=6)
    with pytest.raises(ValueError, match="square"):
        vl.VLConfig(num_position_embeddings=20)
    with pytest.raises(ValueError, match="save_dtype"):
        vl.VLConfig(save_dtype="fp16")
    with pytest.raises(ValueError, match="ids_per_batch"):
        vl.VLConfig(ids_per_batch=1)
    with pytest.raises(ValueError, match="lr"):
        vl.VLConfig(lr=0)
    assert vl.VLConfig().batch == 192


def test_supcon_prefers_grouped_features():
    key = torch.tensor([0, 0, 1, 1])
    good = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1]]), dim=1)
    bad = good[[0, 2, 1, 3]]
    assert vl.supcon_loss(good, key, 0.1) < vl.supcon_loss(bad, key, 0.1)


def test_tiny_training_run_writes_a_loadable_folder(tmp_path):
    from refgen.identity.features import VisionFeatures
    from refgen.cli import main

    out = tmp_path / "vl"
    assert main(["toyworld", "train-vl", "--tiny", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    meta = json.loads((out / vl.META_FILE).read_text())
    assert meta["steps_done"] == vl.VLConfig.tiny().steps
    assert meta["metrics"]["visionfeatures_check"]["max_abs_diff"] < 1e-5
    assert set(meta["metrics"]["probe_image"]["attribute"]) == set(world.ATTRIBUTES)
    assert meta["provenance"]["versions"]["transformers"]
    assert not list(tmp_path.glob(".vl.*"))  # the temp folder was renamed into place
    fx = VisionFeatures(str(out), device="cpu", dtype="fp32")
    z = fx([world.sample(1)[0], world.sample(2)[0]])
    assert z.shape == (vl.VLConfig.tiny().out_dim,) and abs(float(z.norm()) - 1) < 1e-5
    assert len(vl.read_attributes(z, vl.load_probe(out))) == 1


@pytest.mark.skipif(not SHIPPED, reason="no shipped toy Qwen3-VL")
def test_shipped_folder_loads_through_visionfeatures_and_tells_people_apart():
    from refgen.identity.features import VisionFeatures

    path = vl.load_path()
    meta = json.loads((path / vl.META_FILE).read_text())
    fx = VisionFeatures(str(path), device="cpu", dtype="fp32")
    assert fx.dim == meta["config"]["out_dim"]
    # 8 people (distinct attribute tuples) no training or evaluation run has used; 3 photos vs 3 others
    ids, photos, labels = vl.retrieval_identities(8, start=30_000_000)
    pil = [[Image.fromarray(p.permute(1, 2, 0).numpy()) for p in person] for person in photos]
    za = torch.stack([fx(person[:3]) for person in pil])
    zb = torch.stack([fx(person[3:]) for person in pil])
    assert torch.allclose(za.norm(dim=1), torch.ones(8), atol=1e-5)
    sims = za @ zb.t()
    same = sims.diagonal()
    other = sims.masked_fill(torch.eye(8, dtype=torch.bool), -2)
    # every person's two photo sets are closer to each other than to anyone else's
    assert (same > other.max(1).values).all(), sims
    assert (same > other.max(0).values).all(), sims
    # and the shipped probe reads the attributes from the 3-photo features
    read = vl.read_attributes(za, vl.load_probe(path))
    right = sum(all(r[a] == world.ATTRIBUTES[a][int(labels[i, j])] for j, a in enumerate(vl.ATTRS))
                for i, r in enumerate(read))
    assert right >= 7, read


def test_time_budget_anneals_and_stops_early():
    cfg = vl.VLConfig.tiny(steps=10_000, max_train_minutes=0.002)  # 0.12 s
    info = vl.train(cfg, None, device="cpu", progress=False)
    assert info["stopped_early"] and 1 <= info["steps_done"] < 10_000
