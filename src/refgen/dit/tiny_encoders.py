"""Tiny random-weight encoders of the real classes, built offline, saved in from_pretrained folder layouts.

Nothing here can download weights, so tests and `refgen dit tiny-models OUT` use these to run the whole data
pipeline: a FLUX-style `AutoencoderKL` (16 latent channels, /8, no quant convs, FLUX scaling/shift), a
`T5EncoderModel` with a `T5TokenizerFast` whose Unigram vocabulary is written here, and a `DINOv3ViTModel` with
patch 16 and 4 register tokens like the released checkpoints. Same code paths as the real models, ~0.1 M params.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

TINY_WORDS = ("a an the of in on with and photo portrait picture person man woman cat dog red green blue "
              "yellow black white small large square wide tall looking left right image").split()


def tiny_tokenizer(words: tuple[str, ...] | list[str] = TINY_WORDS):
    """A T5 Unigram tokenizer whose whole words are `words` (anything else is spelled out in letters)."""
    from transformers import T5TokenizerFast

    # T5's layout: <pad>=0, </s>=1, <unk>=2; then pieces with Unigram log-probs (words beat letters).
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in dict.fromkeys(words)]
    vocab += [("▁" + c, -3.0) for c in string.ascii_lowercase + string.digits]
    vocab += [(c, -4.0) for c in string.ascii_lowercase + string.digits + ".,:;!?-'\""]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
        latent_channels=16, sample_size=64,
        # FLUX.1's VAE config values; they are recorded, not applied (the loader uses dataset statistics).
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )


def tiny_t5(vocab_size: int, d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False)
    return T5EncoderModel(cfg)


def tiny_dino(hidden_size: int = 32, num_hidden_layers: int = 2, seed: int = 0):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    cfg = DINOv3ViTConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=num_hidden_layers, num_attention_heads=2, patch_size=16,
                          num_register_tokens=4, image_size=64)
    model = DINOv3ViTModel(cfg)
    # The init draws register tokens with std 0.02, close to nothing; trained checkpoints' registers are large
    # outliers. Make them large here too, so that slicing registers in as patches shows up in tests.
    with torch.no_grad():
        model.embeddings.register_tokens.normal_(0, 1)
    return model


def save_dino_preprocessor(folder: Path) -> None:
    # What DINOv3ViTImageProcessorFast.save_pretrained writes, minus the torchvision dependency of creating one.
    cfg = {"image_processor_type": "DINOv3ViTImageProcessorFast", "do_resize": True,
           "size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
           "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def write_tiny_models(out: str | Path, t5_dim: int = 32, dino_dim: int = 32,
                      words: tuple[str, ...] | list[str] = TINY_WORDS) -> dict[str, str]:
    """Write `vae/`, `text_encoder/` (model + tokenizer with `words` as whole tokens), `dino/` under `out`;
    returns the folder paths."""
    out = Path(out)
    paths = {k: out / k for k in ("vae", "text_encoder", "dino")}
    tiny_vae().save_pretrained(paths["vae"])
    tok = tiny_tokenizer(words)
    tiny_t5(len(tok), d_model=t5_dim).save_pretrained(paths["text_encoder"])
    tok.save_pretrained(paths["text_encoder"])
    tiny_dino(hidden_size=dino_dim).save_pretrained(paths["dino"])
    save_dino_preprocessor(paths["dino"])
    return {k: str(v) for k, v in paths.items()}
