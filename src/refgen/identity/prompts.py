"""Prompt encoding for Qwen-Image with slot windows (seed 000, phases 1.2, 4.3).

This is QwenImagePipeline._get_qwen_prompt_embeds with one change: the token ids come from
`tokenize_with_slots`, so every `~ID~` has fixed ids and a known window. Everything else (chat template,
dropped prefix, last hidden layer, padding to the longest prompt of the batch, 0/1 mask) is read from
the pipeline object, and a test checks that placeholder-free prompts give bit-identical embeddings.

Padding is to the longest prompt in the batch, as the pipeline does. The seed asks for
padding="max_length" to make S constant; padding every prompt to 1024 would add up to 1024 masked
tokens to every joint-attention step of the transformer. What the method needs is a fixed L and a
window per slot; the portable artifact is the [L, H] slot residual, which does not depend on S.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refgen.identity.slots import Slot, TokenizedPrompt, tokenize_with_slots
from refgen.runtime import check_tensors


@dataclass
class Encoded:
    embeds: torch.Tensor  # (B, S, H) on the pipeline's device and dtype
    mask: torch.Tensor  # (B, S) int64, 1 = real token
    slots: list[list[Slot]]  # per prompt, left to right
    prompts: list[str]
    input_ids: list[list[int]]


def template_of(pipe) -> tuple[str, int, int]:
    """(chat template, number of dropped prefix tokens, tokenizer max length incl. prefix)."""
    drop = pipe.prompt_template_encode_start_idx
    return pipe.prompt_template_encode, drop, pipe.tokenizer_max_length + drop


def tokenize(pipe, prompt: str, n_identities: int | None = None) -> TokenizedPrompt:
    template, drop, max_len = template_of(pipe)
    return tokenize_with_slots(pipe.tokenizer, prompt, template, drop, max_len, n_identities)


@torch.no_grad()
def encode_prompts(pipe, prompts: str | list[str], n_identities: int | None = None,
                   device: torch.device | None = None, dtype: torch.dtype | None = None) -> Encoded:
    """Encode prompts to E (B, S, H) + mask (B, S) with each prompt's slot windows.

    `n_identities` (when given) is checked against each prompt's placeholder count.
    """
    from refgen.identity.render import execution_device, moved_by_hooks

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = device or execution_device(pipe)
    dtype = dtype or pipe.text_encoder.dtype
    _, drop, _ = template_of(pipe)
    tps = [tokenize(pipe, p, n_identities) for p in prompts]
    batch = pipe.tokenizer.pad({"input_ids": [tp.input_ids for tp in tps]}, padding=True, return_tensors="pt")
    # Run the text encoder where it lives (it may be offloaded to the CPU once embeddings exist, to
    # free ~16 GB for the transformer), and hand the embeddings to the pipeline's device.
    # Under offload hooks the weights sit on the CPU and the hooks bring them to the execution device, so the
    # inputs go there.

    te_device = device if moved_by_hooks(pipe.text_encoder) else next(pipe.text_encoder.parameters()).device
    input_ids = batch["input_ids"].to(te_device)
    attn = batch["attention_mask"].to(te_device)
    check_tensors({"input_ids": input_ids, "attention_mask": attn}, te_device, where="encode_prompts: ")
    out = pipe.text_encoder(input_ids=input_ids, attention_mask=attn, output_hidden_states=True)
    hidden = out.hidden_states[-1]  # (B, T, H)
    rows = [h[m.bool()][drop:] for h, m in zip(hidden, attn)]  # each (S_b, H), the pipeline's masking
    S = max(r.shape[0] for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(S - r.shape[0], r.shape[1])]) for r in rows])
    mask = torch.stack([torch.cat([torch.ones(r.shape[0], dtype=torch.long, device=device),
                                   torch.zeros(S - r.shape[0], dtype=torch.long, device=device)]) for r in rows])
    return Encoded(embeds.to(device=device, dtype=dtype), mask, [tp.slots for tp in tps], prompts,
                   [tp.input_ids for tp in tps])
