"""Prompt encoding for Qwen-Image with slot windows.

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


def tokenize(pipe, prompt: str, n_identities: int | None = None, repeat: int = 1) -> TokenizedPrompt:
    template, drop, max_len = template_of(pipe)
    return tokenize_with_slots(pipe.tokenizer, prompt, template, drop, max_len, n_identities, repeat)


def text_encoder_device(pipe) -> torch.device:
    """Where the text encoder computes: the execution device under offload hooks (its weights sit on the CPU
    until it runs), else where its weights are. Token ids and learnt token embeddings go there."""
    from refgen.identity.render import execution_device, moved_by_hooks

    te = pipe.text_encoder
    return execution_device(pipe) if moved_by_hooks(te) else next(te.parameters()).device


def encode_prompts(pipe, prompts: str | list[str], n_identities: int | None = None,
                   device: torch.device | None = None, dtype: torch.dtype | None = None,
                   tokens: list[torch.Tensor] | None = None, isolate: bool = False, repeat: int = 1) -> Encoded:
    """Encode prompts to E (B, S, H) + mask (B, S) with each prompt's slot windows (`repeat`: slots.py).

    `n_identities` (when given) is checked against each prompt's placeholder count.
    `tokens` (input-level identities): tokens[k] (B, L, H_in) replaces the input token embeddings of slot k
    of every prompt before the text encoder, so the person is read by the encoder and every token after the
    slot sees it (the encoder is causal). Every prompt then needs len(tokens) slots. Gradients flow into
    `tokens` when they require grad (inversion); otherwise this runs without autograd. `isolate`: each
    person reaches only its own segment of the prompt (`encode_tokenized`).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    tps = [tokenize(pipe, p, n_identities if tokens is None else len(tokens), repeat) for p in prompts]
    return encode_tokenized(pipe, tps, device, dtype, tokens, isolate)


def encode_tokenized(pipe, tps: list[TokenizedPrompt], device: torch.device | None = None,
                     dtype: torch.dtype | None = None, tokens: list[torch.Tensor] | None = None,
                     isolate: bool = False) -> Encoded:
    """`encode_prompts` for prompts tokenized once (`tokenize`): inversion encodes the same prompts every step.

    `isolate` (two or more token people): the prompt is encoded once per person, the other slots holding the
    bare placeholder's embeddings, and position p of the output is taken from the pass of the last slot that
    starts at or before p (the words before the first slot from the first pass: they read no person). So a
    person's tokens reach their own window and the words up to the next slot, never the other person's words,
    which the causal encoder otherwise lets read every slot before them. One person: the same as joint."""
    from refgen.identity.render import execution_device

    device = device or execution_device(pipe)
    dtype = dtype or pipe.text_encoder.dtype
    _, drop, _ = template_of(pipe)
    batch = pipe.tokenizer.pad({"input_ids": [tp.input_ids for tp in tps]}, padding=True, return_tensors="pt")
    # Run the text encoder where it lives (it may be offloaded to the CPU once embeddings exist, to
    # free ~16 GB for the transformer), and hand the embeddings to the pipeline's device.
    # Under offload hooks the weights sit on the CPU and the hooks bring them to the execution device, so the
    # inputs go there.
    te_device = text_encoder_device(pipe)
    input_ids = batch["input_ids"].to(te_device)
    attn = batch["attention_mask"].to(te_device)
    check_tensors({"input_ids": input_ids, "attention_mask": attn}, te_device, where="encode_prompts: ")
    grad = tokens is not None and any(t.requires_grad for t in tokens)
    isolate = isolate and tokens is not None and len(tokens) >= 2  # one person: isolated is joint
    with torch.set_grad_enabled(grad):
        if tokens is None:
            out = pipe.text_encoder(input_ids=input_ids, attention_mask=attn, output_hidden_states=True)
        else:
            L = tps[0].slots[0].length
            bad = [k for k, t in enumerate(tokens) if t.ndim != 3 or t.shape[1] != L]
            if bad:
                raise ValueError(f"encode_prompts: tokens[{bad[0]}] has shape {tuple(tokens[bad[0]].shape)}; the "
                                 f"placeholder {tps[0].slots[0]} is {L} tokens long: (B, {L}, H_in)")
            starts = torch.tensor([[sl.start + drop for sl in tp.slots] for tp in tps], device=te_device)  # (B, K)
            x0 = pipe.text_encoder.get_input_embeddings()(input_ids)  # (B, T, H_in), the placeholder in every slot
            K = len(tokens)
            if not isolate:
                x = place_tokens(x0, starts, tokens)
                out = pipe.text_encoder(inputs_embeds=x, attention_mask=attn, output_hidden_states=True)
            else:  # K passes in one batch (K*B, T, H_in): pass k has person k alone
                x = torch.cat([place_tokens(x0, starts[:, k:k + 1], [tokens[k]]) for k in range(K)])
                out = pipe.text_encoder(inputs_embeds=x, attention_mask=attn.repeat(K, 1), output_hidden_states=True)
        hidden = out.hidden_states[-1]  # (B, T, H), or (K*B, T, H) isolated
        if isolate:
            B, T = input_ids.shape
            passes = hidden.view(K, B, T, -1)  # (K, B, T, H)
            pos = torch.arange(T, device=hidden.device)
            owner = ((pos[None, None, :] >= starts[:, :, None].to(hidden.device)).sum(1) - 1).clamp(min=0)  # (B, T)
            hidden = passes.gather(0, owner[None, :, :, None].expand(1, -1, -1, passes.shape[3]))[0]  # (B, T, H)
        # The pipeline's masking (each row's real tokens h[m.bool()], the template prefix dropped, zero-padded to
        # the longest) as one gather: no per-row boolean index, which costs a host sync per row.
        lengths = [len(tp.input_ids) for tp in tps]
        S = max(lengths) - drop
        order = torch.argsort((attn == 0).to(torch.int8), dim=1, stable=True)  # real tokens first, in order
        idx = order[:, drop:drop + S]  # (B, S)
        real = torch.tensor([[j < n - drop for j in range(S)] for n in lengths], device=hidden.device)  # (B, S)
        embeds = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[2])).masked_fill(~real[..., None], 0)
    mask = real.to(device=device, dtype=torch.long)
    return Encoded(embeds.to(device=device, dtype=dtype), mask, [tp.slots for tp in tps], [tp.prompt for tp in tps],
                   [tp.input_ids for tp in tps])


def place_tokens(x: torch.Tensor, starts: torch.Tensor, tokens: list[torch.Tensor]) -> torch.Tensor:
    """A new x (B, T, H_in) with tokens[k] (B, L, H_in) written over positions starts[:, k] .. + L of each row.
    Tokens must match x's device and dtype: no silent casts."""
    B, T, H = x.shape
    if starts.shape != (B, len(tokens)):
        raise ValueError(f"tokens for {len(tokens)} slot(s), but the prompts' slot starts have shape "
                         f"{tuple(starts.shape)}; every prompt needs one ~ID~ per token set")
    for k, t in enumerate(tokens):
        check_tensors({f"tokens[{k}]": t}, x.device, x.dtype, where="encode_prompts: ")
        if t.ndim != 3 or t.shape[0] != B or t.shape[2] != H:
            raise ValueError(f"encode_prompts: tokens[{k}] has shape {tuple(t.shape)}, expected ({B}, L, {H})")
        pos = starts[:, k, None] + torch.arange(t.shape[1], device=x.device)  # (B, L)
        rows = torch.arange(B, device=x.device)[:, None].expand_as(pos)
        x = x.index_put((rows, pos), t)
    return x
