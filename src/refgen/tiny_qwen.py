"""Tiny random-weight Qwen-Image and Qwen3-VL models of the real classes, built offline.

`refgen tiny-model OUT` writes
    OUT/qwen-image/   a QwenImagePipeline folder (transformer, vae, text_encoder, tokenizer, scheduler)
    OUT/qwen3-vl/     a Qwen3VLForConditionalGeneration folder with its processor
in the standard diffusers/transformers layouts, so every command that takes --model / --vl-model runs
the real code path on them. No hub access is needed: the tokenizer is a byte-level BPE trained here
with Qwen2's own pre-tokenizer regex, so it shows the same context-sensitive merges (`' ~', 'ID', '~,'`)
the real Qwen tokenizer does.
"""

from __future__ import annotations

from pathlib import Path

import torch

# The chat template prefix of QwenImagePipeline is 34 tokens with the real Qwen tokenizer, and the
# pipeline drops exactly 34. Training our BPE on a corpus that repeats the template makes it learn the
# same whole-word tokens, so the tiny tokenizer drops the same prefix (checked in identity.prompts).
_TEMPLATE_TEXT = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:\nuser\n"
)
_CAPTION_WORDS = (
    "a portrait photo of person man woman child with red green blue yellow black white brown blond hair "
    "glasses shirt hat smiling standing sitting on the beach in a forest city street at sunset studio lighting "
    "and two people friends riding bike dog cat mountain river night day close up wide shot 85mm soft light "
    "cinematic painting drawing sketch old young happy sad walking running next to behind in front of"
).split()


def _corpus() -> list[str]:
    import random

    rng = random.Random(0)
    lines = [_TEMPLATE_TEXT] * 200
    for _ in range(3000):
        words = rng.choices(_CAPTION_WORDS, k=rng.randint(4, 14))
        # Placeholders next to punctuation, so the BPE learns merges like '~,' that straddle the
        # placeholder's boundary: the case the slot finder must survive.
        if rng.random() < 0.6:
            words.insert(rng.randint(0, len(words)), rng.choice(["~ID~", "~ID~,", "(~ID~)", "~ID~.", "~ID~~ID~"]))
        sep = rng.choice([" ", ", "])
        lines.append(sep.join(words) + rng.choice(["", ".", ",", "!"]))
    return lines


QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_qwen_bpe(corpus: list[str], vocab_size: int, min_frequency: int = 2,
                   special_tokens: list[str] = QWEN_SPECIAL_TOKENS):
    """A byte-level BPE with Qwen2's own pre-tokenizer regex trained on `corpus`, as a transformers Qwen2
    tokenizer with Qwen's special tokens (pad/unk <|endoftext|>, eos <|im_end|>, <|im_start|>, no bos).
    Shared by the tiny test models and the toy world."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  min_frequency=min_frequency, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token="<|endoftext|>", bos_token=None)


def build_tokenizer(vocab_size: int = 1000):
    """The tiny models' tokenizer: `train_qwen_bpe` on caption-like text with placeholders."""
    qtok = train_qwen_bpe(_corpus(), vocab_size)
    qtok.model_max_length = 32768
    return qtok


def build_qwen_image(tokenizer, *, text_hidden: int = 32, num_layers: int = 2, seed: int = 0):
    """A random tiny QwenImagePipeline (same classes as Qwen/Qwen-Image, configs as in diffusers' tests)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    z_dim = 4
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_hidden, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=z_dim * 6, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * z_dim,
                                 latents_std=[1.0] * z_dim)
    # The real scheduler config of Qwen/Qwen-Image (dynamic shifting, exponential time shift).
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential", num_train_timesteps=1000)
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    config = Qwen2_5_VLConfig(
        # the token ids also in text_config: its defaults are the real vocabulary's (151643...), outside this one
        text_config={"bos_token_id": ids[1], "eos_token_id": ids[2], "pad_token_id": ids[0],
                     "hidden_size": text_hidden, "intermediate_size": 2 * text_hidden, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0, "max_position_embeddings": 2048},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": text_hidden},
        hidden_size=text_hidden, vocab_size=len(tokenizer), bos_token_id=ids[1], eos_token_id=ids[2],
        pad_token_id=ids[0], vision_start_token_id=len(tokenizer) - 1, vision_end_token_id=len(tokenizer) - 1,
        vision_token_id=len(tokenizer) - 1, image_token_id=len(tokenizer) - 1, video_token_id=len(tokenizer) - 1)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return QwenImagePipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                             tokenizer=tokenizer)


def build_qwen3_vl(tokenizer, *, seed: int = 0):
    """A random tiny Qwen3-VL (vision depth 2, hidden 32) and its processor (PIL backend, patch 16, merge 2)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    bos, eos = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    config = Qwen3VLConfig(
        text_config={"bos_token_id": bos, "eos_token_id": eos, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "head_dim": 16, "vocab_size": len(tokenizer),
                     "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "mrope_interleaved": True}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
                       "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "num_position_embeddings": 64, "deepstack_visual_indexes": [1]},
    )
    return Qwen3VLForConditionalGeneration(config).eval()


def build_qwen3_vl_image_processor():
    """Qwen3-VL's image processor settings (patch 16, merge 2, mean/std 0.5). refgen uses only the image
    processor: the full Qwen3VLProcessor also wants a video processor, which needs torchvision."""
    import transformers

    # transformers >= 5 splits the processor by backend: the plain name is the torchvision one (which falls back
    # to PIL with a warning when torchvision is missing), "...Pil" the PIL one; before 5 the plain name is PIL.
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    return cls(patch_size=16, merge_size=2, temporal_patch_size=2,
                                 min_pixels=32 * 32, max_pixels=1536 * 1536,
                                 image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def write_tiny_models(out: str | Path, seed: int = 0) -> dict[str, str]:
    """Write both tiny models; returns the two folder paths."""
    out = Path(out)
    tok = build_tokenizer()
    pipe = build_qwen_image(tok, seed=seed)
    qi = out / "qwen-image"
    pipe.save_pretrained(qi, safe_serialization=True)
    vl_dir = out / "qwen3-vl"
    build_qwen3_vl(tok, seed=seed).save_pretrained(vl_dir, safe_serialization=True)
    build_qwen3_vl_image_processor().save_pretrained(vl_dir)
    tok.save_pretrained(vl_dir)
    return {"qwen_image": str(qi), "qwen3_vl": str(vl_dir)}
