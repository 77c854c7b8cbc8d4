"""Recipe smoke test: two steps of each stage on the CPU give a QwenImagePipeline folder that loads
with from_pretrained and generates."""

import json

import pytest
import torch

from refgen.toyworld import model_recipe as T
from refgen.toyworld import world
from refgen.cli import main as refgen_main


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tm") / "model"
    assert refgen_main(["toyworld", "train-model", "--tiny", "--out", str(out), "--quiet"]) == 0
    return out


def test_folder_is_a_qwen_image_pipeline(tiny_model):
    idx = json.loads((tiny_model / "model_index.json").read_text())
    assert idx["_class_name"] == "QwenImagePipeline"
    assert idx["transformer"][1] == "QwenImageTransformer2DModel"
    assert idx["vae"][1] == "AutoencoderKLQwenImage"
    assert idx["text_encoder"][1] == "Qwen2_5_VLForConditionalGeneration"
    assert list(tiny_model.rglob("*.safetensors")) and not list(tiny_model.rglob("*.bin"))
    rep = json.loads((tiny_model / "refgen_toyworld.json").read_text())
    assert rep["report"]["transformer_steps_done"] == 2 and rep["report"]["vae_steps_done"] == 2
    assert rep["config"]["size"] == 32
    rows = [json.loads(line) for line in (tiny_model / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} >= {"vae", "transformer"}
    assert not list(tiny_model.parent.glob(".*"))  # no temp/work folders left behind


def test_pipeline_loads_and_generates(tiny_model):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(tiny_model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    vc = pipe.vae.config
    assert vc.latents_std != [1.0] * vc.z_dim  # measured on data, not the placeholder
    # the template prefix is exactly the 34 tokens the pipeline drops
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    emb, _ = pipe.encode_prompt(["A person with glasses on a beach."], device="cpu")
    assert emb.shape[-1] == pipe.transformer.config.joint_attention_dim
    img = pipe("A person with glasses on a beach.", negative_prompt=" ", true_cfg_scale=2.0, height=32, width=32,
               num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (32, 32)


def test_tokenizer_keeps_template_at_34_tokens():
    caps = [world.sample(s)[2] for s in range(50)]
    tok = T.train_caption_tokenizer(caps, 600)
    prefix, _ = T._template_parts()
    assert len(tok(prefix).input_ids) == 34
    assert tok.decode(tok(caps[0]).input_ids) == caps[0]  # byte-level: lossless
    with pytest.raises(RuntimeError, match="34"):
        T.train_caption_tokenizer(caps, 300)  # too small a vocabulary to merge the template words


def test_config_validation_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="axes_dims_rope"):
        T.ToyModelConfig(transformer={"head_dim": 32, "axes_dims_rope": [8, 8, 8]})
    with pytest.raises(ValueError, match="unknown keys"):
        T.ToyModelConfig(vae={"zdim": 4})
    p = tmp_path / "c.yaml"
    p.write_text("size: 64\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        T.ToyModelConfig.from_yaml(p)
    from pathlib import Path

    cfg = T.ToyModelConfig.from_yaml(Path(__file__).resolve().parents[2] / "configs" / "toyworld_model.yaml")
    assert cfg.size == 64 and cfg.transformer.head_dim == sum(cfg.transformer.axes_dims_rope)


def test_text_bank_rows_are_the_pipelines_own_embeddings(tiny_model):
    """The bank must hold exactly what encode_prompt gives for each caption (padding only adds masked
    zeros), and its last two rows must be the unconditional prompts '' and ' '."""
    import random

    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(tiny_model, torch_dtype=torch.float32)
    cfg = T.ToyModelConfig.tiny(transformer=T.TransformerConfig(layers=1, heads=2, head_dim=16, axes_dims_rope=[4, 6, 6],
                                                             captions_per_image=2, p_bare=0.5, p_full=0.5))
    scenes = [world.scene_from_seed(s) for s in range(3)]
    emb, mask = T.build_text_bank(pipe, scenes, cfg, torch.device("cpu"), progress=False)
    assert emb.shape[0] == 3 * 2 + 2 and mask.dtype == torch.bool
    rng = random.Random(cfg.seed + 3)
    caps = [world.caption(scenes[i], rng, p_bare=0.5, p_full=0.5) for i in range(3) for _ in range(2)] + ["", " "]
    for r, c in enumerate(caps):
        e, m = pipe.encode_prompt([c], device="cpu")
        n = e.shape[1]
        assert int(mask[r].sum()) == n and bool(mask[r, :n].all())
        torch.testing.assert_close(emb[r, :n], e[0], rtol=1e-5, atol=1e-5)
        assert not emb[r, n:].any()


def test_shipped_model_is_the_yaml_recipe_run_as_is():
    """configs/toyworld_model.yaml is what made the shipped model (only the render worker count, which does not
    change a pixel, may differ), and that run stopped on its steps, not on the safety clock."""
    from dataclasses import asdict
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    yaml_cfg = asdict(T.ToyModelConfig.from_yaml(root / "configs" / "toyworld_model.yaml"))
    rec = json.loads((root / "src/refgen/assets/toyworld/model/refgen_toyworld.json").read_text())
    shipped = rec["config"]
    assert {k: v for k, v in yaml_cfg.items() if k != "workers"} == {k: v for k, v in shipped.items() if k != "workers"}
    rep = rec["report"]
    assert not rep["stopped_early"] and rep["transformer_steps_done"] == shipped["transformer"]["steps"]
    assert rep["weights_mb"] <= 40


def test_training_packs_latents_as_the_pipeline_does():
    """The toy transformer trains on identity.qwen_flow.pack; QwenImagePipeline samples with its own (private) packing.
    If diffusers changes its layout, the shipped model would be trained on a different token order: fail here."""
    from diffusers import QwenImagePipeline

    from refgen.identity.qwen_flow import pack

    z = torch.randn(2, 16, 8, 6)
    torch.testing.assert_close(pack(z), QwenImagePipeline._pack_latents(z, 2, 16, 8, 6), rtol=0, atol=0)
