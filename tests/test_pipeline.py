"""refgen.IdentityPipeline and refgen.encode_identity on the tiny random Qwen-Image / Qwen3-VL and the embedded toy
model, on the CPU: the README's example verbatim, a stock QwenImagePipeline driven by encode_identity, the
inversion engine underneath `invert`, residual files, the head path, errors, and offload read from the pipeline."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refgen.cli import main
from refgen.identity.features import FeatureConfig, VisionFeatures, extract_features
from refgen.identity.head import HeadConfig, load_head, train_head
from refgen.identity.inject import ResidualMismatchError, residual_metadata, save_residual
from refgen.identity.invert import InvertConfig
from refgen.identity.slots import SlotError
from refgen.pipeline import IdentityPipeline, SlotResidual, SlotTokens, encode_identity, load_person, photos_id
from refgen.runtime import PolicyError
from refgen.toyworld.benchmark import default_model

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = InvertConfig(height=32, width=32, steps=6, lr=5e-2, init_scale=1.0, qa=False, checkpoint_every=4)
TWO = "~ID~ and ~ID~ on a beach"


def _photos(d: Path, n=3, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for j in range(n):
        a = np.zeros((40, 48, 3), np.uint8) + rng.integers(0, 255, 3).astype(np.uint8)
        a[8:30, 6 + 4 * j:24 + 4 * j] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(d / f"p{j}.png")
    return d


def _random_residual(pipe, seed=0, scale=3.0) -> SlotResidual:
    md = residual_metadata(pipe, "tiny")
    g = torch.Generator().manual_seed(seed)
    return SlotResidual(torch.randn(int(md["L"]), int(md["H"]), generator=g) * scale, md)


@pytest.fixture(scope="module")
def ip(pipe):
    return IdentityPipeline(pipe)


def test_readme_python_example_runs_verbatim(tmp_path, monkeypatch):
    usage = README.read_text().split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12, "the README promises a short example"
    monkeypatch.chdir(tmp_path)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    im = Image.open(tmp_path / "two_people.png")
    assert im.size == (64, 64) and np.asarray(im).std() > 10  # a picture, not a flat or NaN-black square
    ip = IdentityPipeline.from_pretrained(default_model(), device="cpu", dtype="fp32")
    anna = load_person(tmp_path / "anna_inverted.safetensors", ip)  # the saved identity fits the toy model
    # the default inversion learns the placeholder's token embeddings (measured best: docs/benchmarks.md)
    assert isinstance(anna, SlotTokens) and not torch.equal(anna.tensor, anna.placeholder)
    assert anna.metadata["identity"].startswith("ref_")


def test_encode_identity_drives_a_stock_qwen_image_pipeline(pipe, ip):
    a, b = _random_residual(pipe, 0), _random_residual(pipe, 1)
    E, M = encode_identity(pipe, TWO, [a, b], [1.5, 0.5])
    # the placeholder-free prompt is the pipeline's own encoding, bit for bit
    plain, _ = encode_identity(pipe, "a dog on a beach")
    assert torch.equal(plain, pipe.encode_prompt("a dog on a beach", device="cpu")[0])
    # person k lands in the k-th window and nowhere else
    base, _ = encode_identity(pipe, TWO)
    win = [(s["start"], s["start"] + s["length"]) for s in ip.slots_for(TWO, [a, b])]  # at these people's width
    assert ip.slots_for(TWO, [a, b]) == ip.slots(TWO, 2, slot_repeat=1)  # _random_residual's: one placeholder
    expected = base.clone()
    for (s, e), r, alpha in zip(win, (a, b), (1.5, 0.5)):
        expected[0, s:e] += alpha * r.tensor
    torch.testing.assert_close(E, expected, rtol=0, atol=1e-6)
    assert torch.equal(E[0, win[0][1]:win[1][0]], base[0, win[0][1]:win[1][0]])
    # a stock pipeline call with those embeddings is what IdentityPipeline renders (two CFG forwards in both)
    kw = dict(num_inference_steps=3, height=32, width=32, true_cfg_scale=4.0, output_type="np")
    stock = pipe(prompt_embeds=E, prompt_embeds_mask=M, negative_prompt=" ",
                 generator=torch.Generator("cpu").manual_seed(7), **kw).images[0]
    ours = ip(TWO, [a, b], [1.5, 0.5], seeds=[7], steps=3, height=32, width=32, cfg_batch=False)[0]
    assert np.abs(np.asarray(ours).astype(int) - np.round(stock * 255).astype(int)).max() <= 1
    # the batched-CFG default renders the same picture up to the float rounding of a larger batch
    batched = ip(TWO, [a, b], [1.5, 0.5], seeds=[7], steps=3, height=32, width=32)[0]
    assert np.abs(np.asarray(batched).astype(int) - np.asarray(ours).astype(int)).max() <= 2
    without = ip(TWO, seeds=[7], steps=3, height=32, width=32, cfg_batch=False)[0]
    assert not np.array_equal(np.asarray(without), np.asarray(ours))  # the people reach the picture


def test_call_encodes_a_prompt_once_and_gives_one_image_per_seed(pipe):
    ip = IdentityPipeline(pipe)
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda m, a, k, out: calls.append(1), with_kwargs=True)
    try:
        r = _random_residual(pipe)
        first = ip("a photo of ~ID~", [r], seeds=[0, 1, 2], steps=2, height=32, width=32, batch_size=2)
        assert len(calls) == 2  # prompt and negative prompt, once for three seeds
        again = ip("a photo of ~ID~", [r], alphas=2.0, seeds=[1], steps=2, height=32, width=32)
        assert len(calls) == 2  # the same prompt with other people/alphas/seeds: no text-encoder forward
    finally:
        hook.remove()
    assert len(first) == 3 and all(im.size == (32, 32) for im in first)
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))  # seeds differ
    alone = ip("a photo of ~ID~", [r], seeds=[1], steps=2, height=32, width=32)[0]
    assert np.array_equal(np.asarray(alone), np.asarray(first[1]))  # a seed's image does not depend on its batch
    assert not np.array_equal(np.asarray(again[0]), np.asarray(first[1]))  # alpha 2 is another picture


def test_slot_residual_file_roundtrip_and_refusals(pipe, ip, tmp_path):
    r = _random_residual(pipe)
    r.save(tmp_path / "r.safetensors")
    back = SlotResidual.load(tmp_path / "r.safetensors", pipe)
    assert torch.equal(back.tensor, r.tensor) and back.metadata == r.metadata
    assert torch.equal(ip.load_residual(tmp_path / "r.safetensors").tensor, r.tensor)
    # refgen render reads what SlotResidual.save wrote
    assert main(["render", "--model", pipe.name_or_path, "--prompt", "a photo of ~ID~", "--residual",
                 str(tmp_path / "r.safetensors"), "--alphas", "1", "--seeds", "0", "--steps", "2", "--height", "32",
                 "--width", "32", "--out", str(tmp_path / "grid"), "--device", "cpu", "--dtype", "fp32"]) == 0
    assert json.loads((tmp_path / "grid" / "grid.json").read_text())["model"] == pipe.name_or_path
    other = SlotResidual(r.tensor, {**r.metadata, "tokenizer_fingerprint": "0" * 16, "model": "elsewhere"})
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(ResidualMismatchError, match=r"other.safetensors does not fit.*tokenizer fingerprint"):
        SlotResidual.load(tmp_path / "other.safetensors", ip)
    with pytest.raises(ResidualMismatchError, match=r"person 2's residual.*'elsewhere'.*tokenizer fingerprint"):
        encode_identity(pipe, TWO, [r, other])
    with pytest.raises(ValueError, match=r"metadata says L=.* H="):
        SlotResidual(r.tensor[:, :-1], r.metadata)
    with pytest.raises(ValueError, match="float32 on the CPU"):
        SlotResidual(r.tensor.bfloat16(), r.metadata)
    with pytest.raises(TypeError, match="person 1: expected a SlotResidual"):
        encode_identity(pipe, "a photo of ~ID~", [r.tensor])


def test_api_errors_name_the_culprit_as_the_cli_does(pipe, ip, tmp_path, capsys):
    r = _random_residual(pipe)
    with pytest.raises(SlotError, match=r"prompt has 1 placeholder\(s\) '~ID~' but 2 identities were given"):
        ip("a photo of ~ID~", [r, r], steps=2, height=32, width=32)
    f = tmp_path / "r.safetensors"
    r.save(f)
    assert main(["render", "--model", pipe.name_or_path, "--prompt", "a photo of ~ID~", "--residual", str(f),
                 "--residual", str(f), "--out", str(tmp_path / "o"), "--device", "cpu", "--dtype", "fp32"]) == 1
    assert "prompt has 1 placeholder(s) '~ID~' but 2 identities were given" in capsys.readouterr().err
    with pytest.raises(SlotError, match="2 placeholder"):
        ip.slots(TWO, 0)  # people missing for the placeholders
    with pytest.raises(ValueError, match="3 alphas for 2 people"):
        ip.encode(TWO, [r, r], [1, 2, 3])
    with pytest.raises(ValueError, match="alphas must be finite"):
        ip.encode(TWO, [r, r], [1, float("nan")])
    with pytest.raises(ValueError, match="seeds must be in 0..2"):
        ip("a photo of ~ID~", [r], seeds=[-1], steps=2, height=32, width=32)
    photos = _photos(tmp_path / "refs")
    (photos / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken.png"):
        ip.invert(photos, config=FAST)
    with pytest.raises(ValueError, match=r"reference photos need a head"):
        ip.residual_from_refs(_photos(tmp_path / "ok"))
    with pytest.raises(ValueError, match="vl_model and head go together"):
        IdentityPipeline.from_pretrained(pipe.name_or_path, head="head.safetensors", device="cpu")
    with pytest.raises(PolicyError, match="fp16 is refused for Qwen-Image"):
        IdentityPipeline.from_pretrained(pipe.name_or_path, device="cpu", dtype="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(PolicyError, match="CUDA is not available"):
            IdentityPipeline.from_pretrained(pipe.name_or_path)  # the default device is CUDA


def test_invert_in_memory_is_refgen_invert(pipe, ip, tiny_models, tmp_path):
    root = tmp_path / "ids"
    _photos(root / "seed_0")
    cfg_file = tmp_path / "fast.yaml"
    cfg_file.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in FAST.__dict__.items()))
    assert main(["invert", str(root), "--model", tiny_models["qwen_image"], "--config", str(cfg_file),
                 "--device", "cpu", "--dtype", "fp32", "--out", str(tmp_path / "cli")]) == 0
    cli = load_person(tmp_path / "cli" / "seed_0" / "teacher_tokens.safetensors", pipe)  # the default mode
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("refgen_invert_*"))
    mem = ip.invert(root / "seed_0", config=FAST, identity="seed_0", progress=False)
    assert torch.equal(mem.tensor, cli.tensor)  # same photos, config and name: the same optimisation
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("refgen_invert_*")) == before  # nothing left behind
    # in-memory photos are the same photos; the default name comes from their pixels
    pil = [Image.open(p) for p in sorted((root / "seed_0").glob("*.png"))]
    kept = ip.invert(pil, config=FAST, out=tmp_path / "kept", progress=False)
    name = photos_id([im.convert("RGB") for im in pil])
    teacher = tmp_path / "kept" / name / "teacher.json"
    assert json.loads(teacher.read_text())["steps_run"] == FAST.steps and kept.metadata["identity"] == name
    stamp = teacher.stat().st_mtime_ns
    again = ip.invert(root / "seed_0", config=FAST, out=tmp_path / "kept", progress=False)
    assert teacher.stat().st_mtime_ns == stamp and torch.equal(again.tensor, kept.tensor)  # finished: reused
    longer = InvertConfig(**{**FAST.__dict__, "steps": FAST.steps + 1})
    with pytest.raises(ValueError, match=r"other settings.*steps 6 -> 7"):
        ip.invert(pil, config=longer, out=tmp_path / "kept", progress=False)
    with pytest.raises(ValueError, match="config.qa renders an alpha grid"):
        ip.invert(pil, config=InvertConfig(**{**FAST.__dict__, "qa": True}))
    E, _ = ip.encode("a photo of ~ID~", [mem])
    assert torch.isfinite(E).all()


def _tiny_head(pipe, vl_model, root: Path) -> Path:
    """A head trained (one epoch) on real tiny-VL features of four people and random teacher residuals."""
    cfg = FeatureConfig(pixel_budget=0.02e6, max_images=2)
    for k in range(4):
        _photos(root / f"seed_{k}", seed=k)
        save_residual(root / f"seed_{k}" / "teacher_residual.safetensors", _random_residual(pipe, k).tensor,
                      residual_metadata(pipe, "tiny"))
    extract_features(root, vl_model, "cpu", "fp32", cfg, progress=False)
    train_head(root, root / "head", HeadConfig(epochs=1, val_fraction=0), progress=False)
    return root / "head" / "head.safetensors"


def test_residual_from_refs_is_the_heads_map_of_the_features(pipe, tiny_models, tmp_path):
    head = _tiny_head(pipe, tiny_models["qwen3_vl"], tmp_path / "ids")
    ip = IdentityPipeline.from_pretrained(tiny_models["qwen_image"], vl_model=tiny_models["qwen3_vl"], head=str(head),
                                          device="cpu", dtype="fp32")
    photos = _photos(tmp_path / "anna", seed=9)
    r = ip.residual_from_refs(photos)
    # independently: the head's recorded feature settings, the vision tower, the head
    h, md = load_head(head, torch.device("cpu"), torch.float32)
    fx = VisionFeatures(tiny_models["qwen3_vl"], "cpu", "fp32", FeatureConfig(pixel_budget=0.02e6, max_images=2))
    with torch.no_grad():
        want = h(fx([Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))])[None])[0]
    torch.testing.assert_close(r.tensor, want)
    pil = [Image.open(p) for p in sorted(photos.glob("*.png"))]
    assert torch.equal(ip.residual_from_refs(pil).tensor, r.tensor)  # paths or PIL images: the same photos
    assert r.metadata["source"] == "head" and r.metadata["head"] == str(head)
    # photos as a person: through the head, in the slot
    a = ip("a photo of ~ID~", [photos], seeds=[0], steps=2, height=32, width=32)[0]
    b = ip("a photo of ~ID~", [r], seeds=[0], steps=2, height=32, width=32)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert "head=" in repr(ip) and "vl_model=" in repr(ip)


def test_offload_is_read_from_the_pipeline_not_stored_on_it(tiny_models, tmp_path):
    from diffusers import QwenImagePipeline

    plain = IdentityPipeline(QwenImagePipeline.from_pretrained(tiny_models["qwen_image"]))
    ref, _ = plain.encode("a red car")
    # a pipeline the user offloaded with diffusers' own call: refgen sees it and encodes through the hooks
    user = QwenImagePipeline.from_pretrained(tiny_models["qwen_image"])
    user.enable_model_cpu_offload(device="cpu")
    off = IdentityPipeline(user)
    assert off.offload == "model" and not any(k.startswith("refgen") for k in vars(user))
    assert torch.equal(off.encode("a red car")[0], ref)
    grouped = QwenImagePipeline.from_pretrained(tiny_models["qwen_image"])
    grouped.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                             offload_type="block_level", num_blocks_per_group=1)
    g = IdentityPipeline(grouped)
    assert g.offload == "group" and plain.offload == "none"
    with pytest.raises(ValueError, match="invert supports --offload none or model, not 'group'"):
        g.invert(_photos(tmp_path / "p"), config=FAST)


def _random_tokens(pipe, seed=0, scale=0.5) -> SlotTokens:
    from refgen.identity.tokens import placeholder_embeds, token_metadata

    ph = placeholder_embeds(pipe)
    g = torch.Generator().manual_seed(seed)
    return SlotTokens(ph + scale * torch.randn(ph.shape, generator=g), ph, token_metadata(pipe, "tiny"))


def test_token_people_and_residual_people_share_a_prompt(pipe, ip, tmp_path):
    from refgen.identity.render import RenderConfig
    from refgen.identity.tokens import TokensMismatchError

    a, b = _random_tokens(pipe), _random_residual(pipe, 1)
    win = [(s["start"], s["start"] + s["length"]) for s in ip.slots(TWO, 2, slot_repeat=1)]  # one placeholder wide
    base, _ = encode_identity(pipe, TWO)
    # alpha 0 for the token person is the placeholder as written: only the residual person changes the prompt
    E0, _ = ip.encode(TWO, [a, b], [0.0, 1.0])
    expected = base.clone()
    expected[0, win[1][0]:win[1][1]] += b.tensor
    torch.testing.assert_close(E0, expected, rtol=0, atol=1e-6)
    # at alpha 1 the text encoder reads the person: nothing before the slot changes, the words after it do
    E1, _ = encode_identity(pipe, TWO, [a, b], [1.0, 1.0])
    assert torch.equal(E1[0, :win[0][0]], base[0, :win[0][0]])
    assert (E1[0, win[0][1]:win[1][0]] - base[0, win[0][1]:win[1][0]]).abs().max() > 0
    # the file round trip, told apart from a residual file by its format
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    assert isinstance(load_person(tmp_path / "a.safetensors", ip), SlotTokens)
    assert isinstance(load_person(tmp_path / "b.safetensors", ip), SlotResidual)
    img = ip(TWO, [tmp_path / "a.safetensors", b], seeds=[3], steps=2, height=32, width=32)[0]
    # refgen render and generate read a token file like a residual file
    assert main(["render", "--model", pipe.name_or_path, "--prompt", TWO, "--residual", str(tmp_path / "a.safetensors"),
                 "--residual", str(tmp_path / "b.safetensors"), "--alphas", "1", "--seeds", "3", "--steps", "2",
                 "--height", "32", "--width", "32", "--out", str(tmp_path / "cli"), "--device", "cpu",
                 "--dtype", "fp32"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cli" / "images" / "a1_s3.png")), np.asarray(img))
    assert main(["generate", "--model", pipe.name_or_path, "--prompt", TWO, "--residual", str(tmp_path / "a.safetensors"),
                 "--residual", str(tmp_path / "b.safetensors"), "--seeds", "3", "--steps", "2", "--height", "32",
                 "--width", "32", "--out", str(tmp_path / "gen"), "--device", "cpu", "--dtype", "fp32"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "gen" / "seed3.png")), np.asarray(img))
    # an alpha grid: row alpha 0 is the prompt as written, the same picture as no people at all
    rc = RenderConfig(prompt=TWO, alphas=[0.0, 1.0], seeds=[3], steps=2, height=32, width=32)
    rec = ip.render_grid(rc, [a, b], tmp_path / "grid")
    plain = ip(TWO, seeds=[3], steps=2, height=32, width=32)[0]
    row0 = Image.open(tmp_path / "grid" / rec["images"][0])
    assert np.array_equal(np.asarray(row0), np.asarray(plain))
    row1 = Image.open(tmp_path / "grid" / rec["images"][1])
    assert np.array_equal(np.asarray(row1), np.asarray(img))  # alpha 1 row = the people at alpha 1
    other = SlotTokens(a.tensor, a.placeholder + 1.0, a.metadata)  # learnt against another embedding table
    with pytest.raises(TokensMismatchError, match="another text encoder"):
        ip.encode(TWO, [other, b])


def test_invert_with_each_photos_own_prompt(ip, tmp_path):
    from refgen.toyworld.identities import make_identities

    (folder,) = make_identities(tmp_path / "people", n=1, seed=5, size=32, progress=False)
    cfg = InvertConfig(**{**FAST.__dict__, "image_prompts": True})
    person = ip.invert(folder, config=cfg, out=tmp_path / "o", progress=False)  # prompts.json of the folder
    assert isinstance(person, SlotTokens)
    kept = json.loads((tmp_path / "o" / person.metadata["identity"] / "prompts.json").read_text())
    table = json.loads((Path(folder) / "prompts.json").read_text())
    assert sorted(kept.values()) == sorted(table.values())
    with pytest.raises(ValueError, match="one prompt per photo"):
        ip.invert(folder, config=cfg, prompts=["~ID~ on a beach"], progress=False)
    photos = [Image.open(p) for p in sorted(Path(folder).glob("*.png"))]
    with pytest.raises(ValueError, match="prompts="):
        ip.invert(photos, config=cfg, progress=False)
    # a head's guess (or any person of the right kind) as the start: the run begins there
    started = ip.invert(folder, config=cfg, out=tmp_path / "o2", start=person, progress=False)
    rec = json.loads((tmp_path / "o2" / started.metadata["identity"] / "teacher.json").read_text())
    assert rec["started_from"] == "given"
    with pytest.raises(TypeError, match="starts from a SlotTokens"):
        ip.invert(folder, config=cfg, start=_random_residual(ip.pipe), progress=False)


def test_identity_guidance_is_the_same_in_the_api_render_and_generate(pipe, ip, tmp_path):
    a, b = _random_tokens(pipe), _random_residual(pipe, 1)
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    kw = dict(seeds=[3], steps=2, height=32, width=32)
    img = np.asarray(ip(TWO, [a, b], id_guidance=8.0, **kw)[0]).astype(int)
    # the push is visible (random tiny people move a 2-step image little: 8 makes it plain)
    assert np.abs(img - np.asarray(ip(TWO, [a, b], **kw)[0]).astype(int)).max() > 8
    # the people at alpha 0 are the prompt as written: nothing to push
    no_people = np.asarray(ip(TWO, [a, b], alphas=[0.0, 0.0], **kw)[0]).astype(int)
    assert np.abs(np.asarray(ip(TWO, [a, b], alphas=[0.0, 0.0], id_guidance=8.0, **kw)[0]) - no_people).max() <= 1
    common = ["--model", pipe.name_or_path, "--prompt", TWO, "--residual", str(tmp_path / "a.safetensors"),
              "--residual", str(tmp_path / "b.safetensors"), "--seeds", "3", "--steps", "2", "--height", "32",
              "--width", "32", "--device", "cpu", "--dtype", "fp32", "--id-guidance", "8"]
    assert main(["render", *common, "--alphas", "1", "--out", str(tmp_path / "cli")]) == 0
    assert np.abs(np.asarray(Image.open(tmp_path / "cli" / "images" / "a1_s3.png")).astype(int) - img).max() <= 1
    assert main(["generate", *common, "--out", str(tmp_path / "gen")]) == 0
    assert np.abs(np.asarray(Image.open(tmp_path / "gen" / "seed3.png")).astype(int) - img).max() <= 1
