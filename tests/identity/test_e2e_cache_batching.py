"""The e2e cache batches photos across people (the vision tower over several reference sets per call, the VAE over
a run of photos): every photo must still get the features and latent it gets alone with its own person, in its
own row. Shipped toy Qwen-Image and toy Qwen3-VL, CPU fp32."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from refgen.identity import e2e_cache
from refgen.identity.e2e_cache import ToySource, build_cache
from refgen.toyworld.benchmark import default_model, default_vl_model

# Photo sizes per person: with a budget of two 64 px photos, a person's sizes depend on all of that person's
# photos, so a set mixed with another person's photos would be sized, and tokenised, differently.
SIZES = [(64, 64), (96, 64), (48, 80), (64, 64), (128, 96), (64, 112)]


class Resized:
    """Toy people whose photos are stretched to a per-person size; `fail_at` stands in for a build killed there."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.toy, self.fail_at = ToySource(100_000, n), fail_at
        self.ids = self.toy.ids

    def person(self, j: int):
        if j == self.fail_at:
            raise KeyboardInterrupt("killed")
        ims, ps = self.toy.person(j)
        return [im.resize(SIZES[j % len(SIZES)]) for im in ims], ps


@pytest.fixture(scope="module")
def models():
    from refgen.identity.features import VisionFeatures
    from refgen.identity.render import load_pipeline

    pipe = load_pipeline(default_model(), "cpu", "fp32")
    fx = VisionFeatures(default_vl_model(), "cpu", "fp32")
    # 2 photos per reference set: people of 3-5 photos span 2-3 sets, and a set's sizes bind to the budget
    fx.cfg = dataclasses.replace(fx.cfg, pixel_budget=2 * 64 * 64, max_images=2)
    return pipe, fx


def per_person(source, fx, vae, n: int):
    """The unbatched reference: one tower call per reference set, one VAE call per person."""
    from refgen.identity.qwen_flow import encode_qwen_latents
    from refgen.images import center_crop_resize

    tokens, latents, prompts = [], [], []
    for j in range(n):
        ims, ps = source.person(j)
        for c in range(0, len(ims), fx.cfg.max_images):
            tokens += fx.per_image(ims[c:c + fx.cfg.max_images])
        latents.append(encode_qwen_latents(vae, [center_crop_resize(im, 64, 64) for im in ims], batch=64))
        prompts += ps
    return tokens, torch.cat(latents), prompts


def shard_rows(folder, man):
    rows = {"tokens": [], "means": [], "latents": [], "prompts": []}
    for s in man["shards"]:
        t = load_file(str(folder / s["file"]))
        n = t["tok_mask"].sum(1)
        assert torch.equal(t["tok_mask"], torch.arange(t["tok_mask"].shape[1]) < n.unsqueeze(1))  # real tokens first
        rows["tokens"] += [t["tokens"][i, :k] for i, k in enumerate(n.tolist())]
        rows["means"] += list(t["means"])
        rows["latents"].append(t["latents"])
    rows["latents"] = torch.cat(rows["latents"])
    return rows


def test_tower_takes_several_people_and_gives_each_its_own_features(models):
    """Sets of different sizes in one tower call give what each gives alone: attention, positions and the 2x2
    merge stay inside an image. Bit-identical here (CPU fp32); a tolerance of 1e-6 leaves room for BLAS kernels
    that depend on the row count."""
    _, fx = models
    src = Resized(4)
    sets = [src.person(j)[0][:2] for j in range(4)]
    alone = [fx.per_image(s) for s in sets]
    together = fx.tower([fx.prepare(s) for s in sets])
    assert [len(s) for s in together] == [len(s) for s in alone] == [2, 2, 2, 2]
    assert len({tuple(e.shape) for s in alone for e in s}) > 1  # the sets really differ in size
    # fp32, tolerance 1e-5: batched kernels sum in another order than per-set ones, and how far that moves a
    # feature depends on the CPU's kernels (1.8e-6 on an Intel Xeon, under 1e-6 on an AMD EPYC)
    for a, b in zip(alone, together):
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


def test_batched_cache_rows_are_the_per_person_rows_and_a_killed_build_resumes(models, tmp_path, monkeypatch):
    """Shards of 4 people, tower calls of 2-3 sets and VAE calls of 8 photos cut across people and sets: every
    photo's tokens, mean and latent sit in its own row, equal to the per-person encode (latents within float
    rounding: a conv kernel may depend on the batch size). A build killed in the second shard keeps the first and
    redoes only the rest."""
    pipe, fx = models
    n = 6
    monkeypatch.setattr(e2e_cache, "TOWER_PATCHES", 64)  # 2-3 sets per call (a set is <= 32 patches here)
    want_tok, want_lat, want_prompts = per_person(Resized(n), fx, pipe.vae, n)
    key = {"test": "batched cache"}
    calls = []

    def tower():
        calls.append(1)
        return fx

    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path, Resized(n, fail_at=5), key, pipe, tower, 64, 64, progress=False, shard_identities=4)
    first = tmp_path / "photos_00000.safetensors"
    assert first.is_file() and not (tmp_path / "photos_00001.safetensors").exists()
    assert not (tmp_path / "manifest.json").exists()
    mtime = first.stat().st_mtime_ns
    man = build_cache(tmp_path, Resized(n), key, pipe, tower, 64, 64, progress=False, shard_identities=4)
    assert man["identities_computed"] == 2 and first.stat().st_mtime_ns == mtime and len(calls) == 2
    got = shard_rows(tmp_path, man)
    assert len(got["tokens"]) == len(want_tok) == sum(man["counts"])
    for g, w in zip(got["tokens"], want_tok):  # 1e-5: summation order, as in the test above
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(got["means"]), torch.stack([w.mean(0) for w in want_tok]), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(got["latents"], want_lat, rtol=1e-5, atol=1e-5)
    assert [man["prompts"][r] for r in man["photo_rows"]] == want_prompts
    assert man["counts"] == [len(Resized(n).person(j)[0]) for j in range(n)]
