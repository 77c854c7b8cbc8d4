"""Injection E[b, s_k:s_k+L, :] += alpha_k * R_k[b] and the slot-residual file format.

A residual file is safetensors with one tensor `residual` (L, H) and string metadata that pins what it
fits: L, H, the placeholder's token ids, a fingerprint of the tokenizer's vocabulary and merges, and
the model it was made for. `load_residual` refuses a file that does not fit the loaded pipeline, since
a residual from another tokenizer would land on the wrong tokens without any visible error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from refgen.identity.slots import PLACEHOLDER, Slot, placeholder_ids
from refgen.runtime import DeviceMismatchError, check_tensors

FORMAT = "refgen.slot_residual/1"


class ResidualMismatchError(ValueError):
    pass


def inject(embeds: torch.Tensor, slots: Sequence[Slot], residuals: Sequence[torch.Tensor],
           alphas: Sequence[float | torch.Tensor]) -> torch.Tensor:
    """Return a new E with alpha_k * R_k added in slot k's window. E is not modified.

    embeds (B, S, H); residuals[k] (B, L, H) or (L, H), expanded explicitly to (B, L, H), never
    broadcast implicitly; alphas[k] a float or a (B,) tensor (one alpha per row: an alpha grid in
    one batch). Residuals must already be on E's device and dtype: no silent casts.
    A zero residual leaves E bit-identical (also for -0.0 entries, which x + 0.0 would flip).
    """
    if embeds.ndim != 3:
        raise ValueError(f"embeds must be (B, S, H), got shape {tuple(embeds.shape)}")
    if not (len(slots) == len(residuals) == len(alphas)):
        raise ValueError(f"{len(slots)} slots, {len(residuals)} residuals and {len(alphas)} alphas: "
                         "one residual and one alpha per slot")
    B, S, H = embeds.shape
    out = embeds.clone()
    for k, (slot, r, a) in enumerate(zip(slots, residuals, alphas)):
        check_tensors({f"residual[{k}]": r}, embeds.device, embeds.dtype, where="inject: ")
        if r.ndim == 2:
            r = r.unsqueeze(0).expand(B, -1, -1)  # (L, H) -> (B, L, H), explicit
        if r.ndim != 3 or r.shape != (B, slot.length, H):
            raise ValueError(f"inject: residual[{k}] has shape {tuple(r.shape)}, slot {k} needs "
                             f"({B}, {slot.length}, {H}) or ({slot.length}, {H})")
        if slot.start < 0 or slot.start + slot.length > S:
            raise ValueError(f"inject: slot {k} [{slot.start}, {slot.start + slot.length}) outside S={S}")
        if isinstance(a, torch.Tensor):
            if a.shape != (B,):
                raise ValueError(f"inject: alpha[{k}] has shape {tuple(a.shape)}, expected ({B},) or a float")
            check_tensors({f"alpha[{k}]": a}, embeds.device, where="inject: ")
            a = a.to(embeds.dtype).view(B, 1, 1)
        delta = a * r  # (B, L, H)
        win = out[:, slot.start:slot.start + slot.length, :]
        out[:, slot.start:slot.start + slot.length, :] = torch.where(delta == 0, win, win + delta)
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (and added tokens): two tokenizers with the same fingerprint split text alike."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def residual_metadata(pipe, model_id: str, extra: dict | None = None, repeat: int = 1) -> dict[str, str]:
    ids = placeholder_ids(pipe.tokenizer, repeat)
    md = {"format": FORMAT, "placeholder": PLACEHOLDER, "L": str(len(ids)), "slot_repeat": str(repeat),
          "H": str(pipe.transformer.config.joint_attention_dim), "placeholder_token_ids": json.dumps(ids),
          "tokenizer": str(pipe.tokenizer.name_or_path), "tokenizer_fingerprint": tokenizer_fingerprint(pipe.tokenizer),
          "model": str(model_id)}
    for k, v in (extra or {}).items():
        md[k] = v if isinstance(v, str) else json.dumps(v, default=str)
    return md


def save_residual(path: str | Path, residual: torch.Tensor, metadata: dict[str, str]) -> None:
    from refgen.artifacts import atomic_save_safetensors

    if residual.ndim != 2 or list(residual.shape) != [int(metadata["L"]), int(metadata["H"])]:
        raise ValueError(f"residual shape {tuple(residual.shape)} does not match metadata "
                         f"L={metadata['L']} H={metadata['H']}")
    atomic_save_safetensors({"residual": residual.detach().to("cpu", torch.float32)}, path, metadata)


def read_identity_file(path: str | Path, names: tuple[str, ...], fmt: str, error: type[ValueError],
                       what: str) -> tuple[list[torch.Tensor], dict[str, str]]:
    """(the tensors `names`, metadata) of a residual or token file of format `fmt`; `error` (naming the file) when it
    is not readable, lacks a tensor or has another format. `what` names the kind of file when it is missing."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            missing = [n for n in names if n not in f.keys()]
            if missing:
                raise error(f"{path}: no tensor named {', '.join(map(repr, missing))} (keys: {list(f.keys())})")
            tensors = [f.get_tensor(n) for n in names]
    except error:
        raise
    except Exception as e:
        raise error(f"{path}: not a readable safetensors file ({e})") from e
    if md.get("format") != fmt:
        raise error(f"{path}: format {md.get('format')!r}, expected {fmt!r}")
    return tensors, md


def read_residual(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    (r,), md = read_identity_file(path, ("residual",), FORMAT, ResidualMismatchError, "residual")
    return r, md


def tokenizer_problems(md: dict[str, str], pipe) -> list[str]:
    """Why an identity file's placeholder ids or tokenizer fingerprint are not `pipe`'s; [] if they are. The file's
    ids may be the placeholder's repeated (slots.py, `repeat`): they are compared with as many repeats."""
    theirs = json.loads(md.get("placeholder_token_ids", "null")) or []
    base = placeholder_ids(pipe.tokenizer)
    ids = base * max(1, len(theirs) // len(base))
    problems = []
    if theirs != ids:
        problems.append(f"placeholder token ids {md.get('placeholder_token_ids')} != this tokenizer's {ids}")
    if md.get("tokenizer_fingerprint") != tokenizer_fingerprint(pipe.tokenizer):
        problems.append(f"tokenizer fingerprint {md.get('tokenizer_fingerprint')} != this tokenizer's "
                        f"{tokenizer_fingerprint(pipe.tokenizer)} (made for model {md.get('model')!r})")
    return problems


def residual_problems(r: torch.Tensor, md: dict[str, str], pipe) -> list[str]:
    """Why a residual (L, H) with its metadata does not fit `pipe` (L, H, placeholder ids, tokenizer); [] if it fits."""
    ids = json.loads(md.get("placeholder_token_ids", "null")) or placeholder_ids(pipe.tokenizer)
    H = pipe.transformer.config.joint_attention_dim
    problems = tokenizer_problems(md, pipe)
    if int(md.get("L", -1)) != len(ids) or r.ndim != 2 or r.shape[0] != len(ids):
        problems.append(f"L={md.get('L')} (tensor {tuple(r.shape)}) != its placeholder ids' L={len(ids)}")
    if int(md.get("H", -1)) != H or r.ndim != 2 or r.shape[1] != H:
        problems.append(f"H={md.get('H')} (tensor {tuple(r.shape)}) != this model's hidden size {H}")
    if not problems and not torch.isfinite(r).all():
        problems.append("it contains NaN/Inf")
    return problems


def read_checked_residual(path: str | Path, pipe) -> tuple[torch.Tensor, dict[str, str]]:
    """(residual (L, H) as stored, metadata), refused unless it fits `pipe`."""
    r, md = read_residual(path)
    problems = residual_problems(r, md, pipe)
    if problems:
        raise ResidualMismatchError(f"residual {path} does not fit the loaded model: " + "; ".join(problems))
    return r, md


def load_residual(path: str | Path, pipe, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Read a residual and refuse it unless it fits `pipe` (L, H, placeholder ids, tokenizer)."""
    return read_checked_residual(path, pipe)[0].to(device=device, dtype=dtype)


__all__ = ["inject", "save_residual", "load_residual", "read_residual", "read_checked_residual", "residual_problems",
           "residual_metadata",
           "ResidualMismatchError", "DeviceMismatchError", "FORMAT"]
