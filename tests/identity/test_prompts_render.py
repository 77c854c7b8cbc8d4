import json

import numpy as np
import pytest
import torch
from PIL import Image

from refgen.cli import main
from refgen.identity.inject import residual_metadata, save_residual
from refgen.identity.prompts import encode_prompts
from refgen.identity.render import RenderConfig, render_grid


def test_encoding_matches_the_pipeline_bit_for_bit(pipe):
    prompts = ["a dog on a beach", "two cats, one red, sitting in a forest at sunset"]
    ref, ref_mask = pipe.encode_prompt(prompts, device="cpu")
    enc = encode_prompts(pipe, prompts)
    assert torch.equal(enc.embeds, ref)
    assert enc.mask[0].sum() < enc.mask[1].sum() and enc.mask.shape == enc.embeds.shape[:2]
    assert enc.embeds.dtype == pipe.transformer.dtype


def test_slot_embeddings_depend_on_position_not_on_neighbour_merges(pipe):
    # The placeholder's ids are identical at every occurrence; the embeddings of the same prefix
    # before the slot are identical whatever follows it (causal text encoder).
    a = encode_prompts(pipe, "a photo of ~ID~, studio lighting", n_identities=1)
    b = encode_prompts(pipe, "a photo of ~ID~. studio lighting", n_identities=1)
    s = a.slots[0][0]
    assert s == b.slots[0][0]
    assert torch.equal(a.embeds[0, :s.start + s.length], b.embeds[0, :s.start + s.length])


def test_render_grid_is_deterministic_and_documented(pipe, tmp_path):
    cfg = RenderConfig(prompt="a portrait photo of ~ID~, studio lighting", alphas=[0.0, 2.0], seeds=[3, 4],
                       steps=2, true_cfg=2.0, height=32, width=32, batch_size=3)
    L = encode_prompts(pipe, cfg.prompt).slots[0][0].length
    r = torch.randn(L, pipe.transformer.config.joint_attention_dim) * 5
    rec = render_grid(pipe, cfg, [r], tmp_path / "a", progress=False)
    render_grid(pipe, cfg, [r], tmp_path / "b", progress=False)
    for f in rec["images"]:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / f)), np.asarray(Image.open(tmp_path / "b" / f)))
    g = json.loads((tmp_path / "a" / "grid.json").read_text())
    for k in ("alphas", "seeds", "steps", "true_cfg", "height", "width", "dtype", "model", "versions", "git_commit"):
        assert k in g, k
    assert g["alphas"] == [0.0, 2.0] and g["seeds"] == [3, 4] and g["layout"].startswith("rows=alphas")
    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.width > 2 * 32 and grid.height > 2 * 32
    im = lambda a, s: np.asarray(Image.open(tmp_path / "a" / "images" / f"a{a:g}_s{s}.png")).astype(int)  # noqa
    assert (im(0, 3) != im(0, 4)).any()  # seeds differ
    assert (im(0, 3) != im(2, 3)).any()  # alpha changes the image


def test_render_grid_without_a_residual_renders_each_seed_once(pipe, tmp_path, capsys):
    cfg = RenderConfig(prompt="a portrait photo of ~ID~, studio lighting", alphas=[0.5, 1.0, 2.0], seeds=[3, 4],
                       steps=2, true_cfg=2.0, height=32, width=32)
    rec = render_grid(pipe, cfg, [], tmp_path / "a", progress=False)
    assert rec["images"] == ["images/s3.png", "images/s4.png"] and rec["alphas"] == []
    assert "alpha changes nothing" in capsys.readouterr().out
    with_r = render_grid(pipe, RenderConfig(**{**cfg.__dict__, "alphas": [0.0]}),
                         [torch.zeros(encode_prompts(pipe, cfg.prompt).slots[0][0].length,
                                      pipe.transformer.config.joint_attention_dim)], tmp_path / "b", progress=False)
    a = np.asarray(Image.open(tmp_path / "a" / "images" / "s3.png"))
    b = np.asarray(Image.open(tmp_path / "b" / with_r["images"][0]))
    assert np.array_equal(a, b)  # the one row is the plain prompt: what every alpha row would have shown


def test_render_config_validation():
    with pytest.raises(ValueError, match="steps must be >= 2"):
        RenderConfig(prompt="x", steps=1)
    with pytest.raises(ValueError, match="multiples of 16"):
        RenderConfig(prompt="x", height=100)


def test_render_cli_with_residual_file(pipe, tiny_models, tmp_path, capsys):
    prompt = "~ID~ and ~ID~ on a beach"
    enc = encode_prompts(pipe, prompt, n_identities=2)
    L, H = enc.slots[0][0].length, enc.embeds.shape[2]
    f = tmp_path / "r.safetensors"
    save_residual(f, torch.randn(L, H), residual_metadata(pipe, tiny_models["qwen_image"]))
    args = ["render", "--model", tiny_models["qwen_image"], "--prompt", prompt, "--residual", str(f),
            "--residual", str(f), "--alphas", "1", "--seeds", "0-1", "--steps", "2", "--height", "32",
            "--width", "32", "--out", str(tmp_path / "out"), "--device", "cpu", "--dtype", "fp32"]
    assert main(args) == 0
    assert (tmp_path / "out" / "grid.png").exists()
    assert json.loads((tmp_path / "out" / "grid.json").read_text())["residuals"] == [str(f), str(f)]
    # one residual for two placeholders is refused before rendering
    bad = args.copy()
    bad.remove(str(f))
    bad.remove("--residual")
    assert main(bad) == 1
    assert "2 placeholder(s)" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA abort")
def test_render_without_cuda_aborts_before_loading(tmp_path, capsys):
    rc = main(["render", "--model", str(tmp_path / "does-not-exist"), "--prompt", "x", "--out", str(tmp_path)])
    assert rc == 1 and "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("neg_prompt", [" ", "blurry, low quality, cartoon, watermark, extra fingers, text"])
def test_batched_cfg_equals_the_pipeline(pipe, neg_prompt):
    # cfg_batch runs prompt and negative rows in one forward; the pipeline runs two. Same latents (seeded
    # generators), same schedule, same guidance: only float rounding of the larger batch may differ. Both a
    # negative shorter and one longer than the prompt (each gets padded with masked keys).
    from refgen.identity.render import render_images

    prompts = ["a portrait photo of a person, studio lighting", "a dog"]
    enc, ne = encode_prompts(pipe, prompts), encode_prompts(pipe, neg_prompt)
    assert ne.embeds.shape[1] != enc.embeds.shape[1]
    neg = (ne.embeds, ne.mask)
    outs = {}
    for batched in (False, True):
        cfg = RenderConfig(prompt="x", steps=3, true_cfg=4.0, height=32, width=32, batch_size=2, cfg_batch=batched)
        outs[batched] = torch.stack(render_images(pipe, enc.embeds, enc.mask, [5, 6], cfg, neg, progress=False,
                                                  output_type="latent"))
    ref = outs[False]
    assert ref.abs().mean() > 0.1 and torch.isfinite(outs[True]).all()
    assert (outs[True] - ref).norm() / ref.norm() < 1e-5
    # the guidance matters at all (else equality would be vacuous): scale 1 gives other latents
    cfg1 = RenderConfig(prompt="x", steps=3, true_cfg=1.5, height=32, width=32, batch_size=2)
    other = torch.stack(render_images(pipe, enc.embeds, enc.mask, [5, 6], cfg1, neg, progress=False,
                                      output_type="latent"))
    assert (other - ref).norm() / ref.norm() > 1e-3


def test_batched_cfg_images_equal_the_pipeline_images(pipe):
    from refgen.identity.render import render_images

    enc, ne = encode_prompts(pipe, "a red car"), encode_prompts(pipe, " ")
    ims = []
    for batched in (False, True):
        cfg = RenderConfig(prompt="x", steps=2, true_cfg=3.0, height=32, width=32, batch_size=1, cfg_batch=batched)
        ims.append(np.asarray(render_images(pipe, enc.embeds, enc.mask, [1], cfg, (ne.embeds, ne.mask),
                                            progress=False)[0]).astype(int))
    assert np.abs(ims[0] - ims[1]).max() <= 1  # uint8 rounding of float-equal images


def test_qwen_flow_model_takes_the_pipelines_denoising_step(pipe):
    """QwenFlowModel (what inversion trains through) + one Euler step reproduces QwenImagePipeline's own
    denoising steps on the tiny model, true CFG included: the transformer is given sigma (the pipeline divides
    its 0-1000 timesteps by 1000), not 1000 * sigma, and the velocity has the pipeline's sign."""
    from refgen.identity.qwen_flow import QwenFlowModel

    enc, ne = encode_prompts(pipe, "a red car on a street"), encode_prompts(pipe, "blurry")
    latents = []

    def keep(p, i, t, kw):
        latents.append(kw["latents"].clone())
        return {}

    first = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: first.append(kw["hidden_states"].clone()) if not first else None, with_kwargs=True)
    try:
        pipe(prompt_embeds=enc.embeds, prompt_embeds_mask=enc.mask, negative_prompt_embeds=ne.embeds,
             negative_prompt_embeds_mask=ne.mask, true_cfg_scale=4.0, num_inference_steps=3, height=32, width=32,
             generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=keep,
             callback_on_step_end_tensor_inputs=["latents"])
    finally:
        hook.remove()
    sigmas = pipe.scheduler.sigmas                      # the schedule of that call (shifted by the pipeline)
    hw = 32 // pipe.vae_scale_factor
    model = QwenFlowModel(pipe.transformer, (hw, hw), cfg_scale=4.0, neg=(ne.embeds, ne.mask))
    x = first[0]
    with torch.no_grad():
        for i, want in enumerate(latents):
            s = sigmas[i].expand(x.shape[0])
            got = x + (sigmas[i + 1] - sigmas[i]) * model(x, s, (enc.embeds, enc.mask))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"step {i}: {m}")
            if i == 0:  # the other convention is far off, so the agreement above is not luck
                thousand = x + (sigmas[1] - sigmas[0]) * model(x, 1000 * s, (enc.embeds, enc.mask))
                assert (thousand - want).abs().max() > 100 * (got - want).abs().max() + 1e-3
            x = want


def test_true_cfg_keeps_the_conditional_per_token_norm():
    from refgen.flow import true_cfg

    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 7, 12, generator=g), torch.randn(2, 7, 12, generator=g)
    out = true_cfg(c, u, 4.0)
    torch.testing.assert_close(out.norm(dim=-1), c.norm(dim=-1))
    torch.testing.assert_close(true_cfg(c, u, 1.0), c)  # scale 1 is the conditional prediction


def test_offload_needs_cuda_and_invert_refuses_group(tiny_models, tmp_path, capsys):
    from refgen.identity.invert import invert

    args = ["render", "--model", tiny_models["qwen_image"], "--prompt", "a cat", "--alphas", "1", "--seeds", "0",
            "--steps", "2", "--height", "32", "--width", "32", "--out", str(tmp_path / "o"), "--device", "cpu",
            "--dtype", "fp32", "--offload", "model"]
    assert main(args) == 1
    assert "needs --device cuda" in capsys.readouterr().err
    with pytest.raises(ValueError, match="group offload sends"):
        invert(tmp_path, tiny_models["qwen_image"], device="cpu", dtype="fp32", offload="group")


def test_invert_yaml_mirrors_the_config():
    # configs/invert.yaml lists every InvertConfig field with its default (a new field must reach the YAML)
    import dataclasses
    from pathlib import Path

    import yaml

    from refgen.identity.invert import InvertConfig

    y = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "invert.yaml").read_text())
    assert y == dataclasses.asdict(InvertConfig())


def test_render_cli_compile_and_two_forward_flags_parse():
    from refgen.cli import build_parser

    a = build_parser().parse_args(["render", "--model", "m", "--prompt", "p", "--out", "o", "--compile",
                                   "--no-cfg-batch", "--offload", "group"])
    assert a.compile and a.no_cfg_batch and a.offload == "group"
    with pytest.raises(SystemExit):  # group offload is not offered for inversion
        build_parser().parse_args(["invert", "root", "--model", "m", "--offload", "group"])


def test_execution_device_is_read_through_one_wrapper(pipe):
    """refgen reads diffusers' private `_execution_device` in one place (render.execution_device); this fails
    loudly if diffusers renames it, instead of every caller breaking in its own way."""
    from diffusers import QwenImagePipeline

    from refgen.identity.render import execution_device

    assert isinstance(getattr(QwenImagePipeline, "_execution_device", None), property)
    assert execution_device(pipe) == torch.device("cpu")


def test_unpack_is_the_pipelines_own_layout():
    # sample_batched_cfg decodes with identity.qwen_flow.unpack, not diffusers' private _unpack_latents: same layout
    from diffusers import QwenImagePipeline

    from refgen.identity.qwen_flow import pack, unpack

    z = torch.randn(2, 16, 12, 8)  # (B, C, h, w) latents
    x = pack(z)
    for vsf in (8, 4):
        ref = QwenImagePipeline._unpack_latents(x, 12 * vsf, 8 * vsf, vsf)
        assert torch.equal(unpack(x, 12, 8), ref)
    assert torch.equal(unpack(x, 12, 8)[:, :, 0], z)  # and it inverts pack
    with pytest.raises(ValueError, match="do not tile"):
        unpack(x, 10, 8)


def test_identity_guidance_is_a_third_row_that_pushes_the_person(pipe):
    # id_guidance renders the prompt without the people as a third block of rows: with those rows equal to the
    # prompt it is plain true CFG (up to the rounding of a larger batch), with the placeholder's rows different it
    # moves the image further than alpha 1 does; a missing plain block or CFG off is refused by name.
    from refgen.identity.inject import inject
    from refgen.identity.render import render_images
    from refgen.identity.sampling import SamplingConfig

    enc, ne = encode_prompts(pipe, "a portrait photo of ~ID~, studio lighting", n_identities=1), encode_prompts(pipe, " ")
    neg = (ne.embeds, ne.mask)
    L = enc.slots[0][0].length
    r = torch.randn(L, pipe.transformer.config.joint_attention_dim, generator=torch.Generator().manual_seed(0)) * 3
    E = inject(enc.embeds.expand(2, -1, -1), enc.slots[0], [r.expand(2, -1, -1).to(enc.embeds.dtype)],
               [torch.ones(2)])
    M, P = enc.mask.expand(2, -1), enc.embeds.expand(2, -1, -1)

    def lat(g, plain):
        cfg = RenderConfig(prompt="x", steps=3, true_cfg=4.0, height=32, width=32, batch_size=2, id_guidance=g)
        return torch.stack(render_images(pipe, E, M, [5, 6], cfg, neg, progress=False, output_type="latent",
                                         plain=plain))

    base = lat(0.0, None)
    assert (lat(2.0, E) - base).norm() / base.norm() < 1e-5          # nothing to push: true CFG
    pushed = lat(2.0, P)
    assert torch.isfinite(pushed).all() and (pushed - base).norm() / base.norm() > 1e-2
    # a list of reference blocks: one block is the same as the tensor; the prompt itself as a second adds nothing
    assert (lat(2.0, [P]) - pushed).norm() / pushed.norm() < 1e-5
    assert (lat(2.0, [P, E]) - pushed).norm() / pushed.norm() < 1e-5
    with pytest.raises(ValueError, match="plain"):
        lat(2.0, None)
    with pytest.raises(ValueError, match="true_cfg"):
        SamplingConfig(id_guidance=1.0, true_cfg=1.0)
    with pytest.raises(ValueError, match="id_guidance"):
        SamplingConfig(id_guidance=-1.0)
