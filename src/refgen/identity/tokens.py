"""Input-level identities: the placeholder's own token embeddings, learnt (textual inversion through the
frozen text encoder), and their file format.

A slot residual (inject.py) changes the encoder's output in the `~ID~` window only. Token embeddings go in
before the text encoder instead: the encoder reads the person like any word, and every token after the
slot sees it (Qwen2.5-VL is causal), so "wearing a hat" after `~ID~` is read as that person's hat.

Strength alpha moves along the straight line from the placeholder's own embeddings (alpha 0: the prompt as
written) to the learnt ones (alpha 1): T(alpha) = T_ph + alpha (T - T_ph), per person, so several people in
one prompt each keep their own strength.

A token file is safetensors with `tokens` (L, H_in) and `placeholder` (L, H_in), the placeholder's
embeddings it was learnt from, plus the slot residual's metadata (L, placeholder ids, tokenizer
fingerprint, model). `read_checked_tokens` refuses a file whose placeholder embeddings are not the loaded
text encoder's: learnt tokens mean nothing to another embedding table, and nothing else would show it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from refgen.identity.slots import SlotError, placeholder_ids, repeat_of_length

FORMAT = "refgen.slot_tokens/1"


class TokensMismatchError(ValueError):
    pass


def placeholder_embeds(pipe, repeat: int = 1) -> torch.Tensor:
    """(L, H_in) float32 on the CPU: the text encoder's input embeddings of the placeholder's token ids (`repeat`
    times over: slots.py)."""
    table = pipe.text_encoder.get_input_embeddings().weight
    ids = torch.tensor(placeholder_ids(pipe.tokenizer, repeat), device=table.device)
    return table[ids].detach().to("cpu", torch.float32)


def embed_rms(pipe) -> float:
    """RMS of the text encoder's whole input embedding table: the scale a word embedding has in this model."""
    return pipe.text_encoder.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt().item()


def at_alpha(tokens: torch.Tensor, base: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """T_ph + alpha (T - T_ph). tokens (B, L, H_in) or (L, H_in); base (L, H_in); alpha a float or (B,)."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(tokens.dtype).view(-1, 1, 1)
    return base + alpha * (tokens - base)


def token_metadata(pipe, model_id: str, extra: dict | None = None, repeat: int = 1) -> dict[str, str]:
    from refgen.identity.inject import residual_metadata

    md = residual_metadata(pipe, model_id, extra, repeat)
    md.update(format=FORMAT, H_in=str(pipe.text_encoder.get_input_embeddings().weight.shape[1]),
              text_encoder=str(getattr(pipe.text_encoder, "name_or_path", "")))
    return md


def save_tokens(path: str | Path, tokens: torch.Tensor, placeholder: torch.Tensor, metadata: dict[str, str]) -> None:
    from refgen.artifacts import atomic_save_safetensors

    want = [int(metadata["L"]), int(metadata["H_in"])]
    for name, t in (("tokens", tokens), ("placeholder", placeholder)):
        if t.ndim != 2 or list(t.shape) != want:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match metadata L={want[0]} H_in={want[1]}")
    atomic_save_safetensors({"tokens": tokens.detach().to("cpu", torch.float32),
                             "placeholder": placeholder.detach().to("cpu", torch.float32)}, path, metadata)


def read_tokens(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """(tokens (L, H_in), placeholder (L, H_in), metadata) as stored."""
    from refgen.identity.inject import read_identity_file

    (t, ph), md = read_identity_file(path, ("tokens", "placeholder"), FORMAT, TokensMismatchError, "token")
    return t, ph, md


def token_problems(t: torch.Tensor, ph: torch.Tensor, md: dict[str, str], pipe) -> list[str]:
    """Why learnt tokens do not fit `pipe`; [] if they fit."""
    from refgen.identity.inject import tokenizer_problems

    problems = tokenizer_problems(md, pipe)
    try:
        mine = placeholder_embeds(pipe, repeat_of_length(pipe.tokenizer, t.shape[0], "the token set"))
    except SlotError as e:
        return problems + [str(e)]
    if t.shape != mine.shape or ph.shape != mine.shape:
        problems.append(f"tokens {tuple(t.shape)} / placeholder {tuple(ph.shape)} != this text encoder's "
                        f"placeholder embeddings {tuple(mine.shape)}")
    else:
        # bf16 storage of the same table differs by ~0.4 % relative; another table by ~100 %
        rel = (ph - mine).norm() / mine.norm().clamp_min(1e-12)
        if rel > 0.02:
            problems.append(f"its placeholder embeddings differ from this text encoder's by {rel:.0%} (relative): "
                            f"learnt for another text encoder (model {md.get('model')!r})")
    if not problems and not torch.isfinite(t).all():
        problems.append("it contains NaN/Inf")
    return problems


def read_checked_tokens(path: str | Path, pipe) -> tuple[torch.Tensor, dict[str, str]]:
    """(tokens (L, H_in) float32, metadata), refused unless they fit `pipe`."""
    t, ph, md = read_tokens(path)
    problems = token_problems(t, ph, md, pipe)
    if problems:
        raise TokensMismatchError(f"token file {path} does not fit the loaded model: " + "; ".join(problems))
    return t, md
