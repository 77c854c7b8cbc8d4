"""Inference for 1-n people in any prompt (seed 000, phases 4 and 5).

Each person is a reference (a folder or image files -> Qwen3-VL features -> head -> residual) or a residual
file, and fills the next `~ID~` left to right. The prompt is encoded once, every slot gets alpha_k * R_k,
and the images render through QwenImagePipeline with `prompt_embeds`. Every check that can fail (slot
count, residual or head fit, unreadable references) runs before the large models are loaded, and every
run, failed or not, appends one line to OUT/generate_log.jsonl so `refgen report` can count error kinds.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refgen.identity.inject import ResidualMismatchError
from refgen.model_identity import ModelIdentity, identify_model


class HeadMismatchError(ResidualMismatchError):
    pass


@dataclass
class Person:
    kind: str  # "ref" or "residual"
    source: list[str]  # image files/folders, or one residual file
    alpha: float = 1.0


@dataclass
class GenerateConfig:
    prompt: str
    people: list[Person]
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 28
    true_cfg: float = 4.0
    negative_prompt: str = " "
    height: int = 768
    width: int = 512
    batch_size: int = 4
    grid_alphas: list[float] | None = None  # optional QA grid: rows multiply every person's alpha
    cfg_batch: bool = True  # true CFG's prompt and negative rows in one forward (RenderConfig.cfg_batch)


def assign_alphas(n_people: int, alphas: list[float]) -> list[float]:
    if not alphas:
        return [1.0] * n_people
    if len(alphas) == 1:
        return alphas * n_people
    if len(alphas) != n_people:
        raise ValueError(f"{len(alphas)} alphas for {n_people} people: give one per person, or one for all")
    return list(alphas)


def head_feature_settings(md: dict, head_path) -> dict[str, str]:
    """The feature settings the head was trained on (every FEATURE_SETTING_KEYS entry), or HeadMismatchError:
    features made any other way are not what the head learned to map."""
    from refgen.identity.features import FEATURE_SETTING_KEYS

    settings = json.loads(md.get("feature_settings") or "{}")
    missing = [k for k in FEATURE_SETTING_KEYS if k not in settings]
    if missing:
        raise HeadMismatchError(f"head {head_path} does not record the feature setting(s) {', '.join(missing)}, so "
                                "its features cannot be reproduced: retrain it with `refgen train-head` on features "
                                "from `refgen features`")
    return settings


def check_vl_model(settings: dict[str, str], vl: ModelIdentity) -> list[str]:
    """[] when `vl` is the model the head's features came from (location and config fingerprint; a hub id not
    downloaded yet is compared by id alone and fingerprinted again once loaded)."""
    if settings["vl_model_location"] == vl.location and vl.config_sha256 in (None, settings["vl_model_config_sha256"]):
        return []
    trained = ModelIdentity(settings["vl_model_location"], settings["vl_model_config_sha256"])
    got = vl.describe() if vl.config_sha256 else (f"{vl.location}, which is not found here (neither a local folder "
                                                   "nor in the local Hugging Face cache)")
    return [f"trained on features of {trained.describe()}, got --vl-model {got}"]


def check_head_fits(md: dict, pipe, vl: ModelIdentity, head_path) -> None:
    from refgen.identity.inject import tokenizer_fingerprint
    from refgen.identity.slots import placeholder_ids

    problems = []
    ids = placeholder_ids(pipe.tokenizer)
    if json.loads(md.get("placeholder_token_ids", "null")) != ids:
        problems.append(f"placeholder ids {md.get('placeholder_token_ids')} != {ids}")
    if int(md["L"]) != len(ids):
        problems.append(f"L={md['L']} != {len(ids)}")
    if int(md["H"]) != pipe.transformer.config.joint_attention_dim:
        problems.append(f"H={md['H']} != {pipe.transformer.config.joint_attention_dim}")
    if md.get("tokenizer_fingerprint") != tokenizer_fingerprint(pipe.tokenizer):
        problems.append("tokenizer fingerprint differs")
    problems += check_vl_model(head_feature_settings(md, head_path), vl)
    if problems:
        raise HeadMismatchError(f"head {head_path} does not fit: " + "; ".join(problems))


def generate(cfg: GenerateConfig, model: str, out: str | Path, vl_model: str | None = None,
             head: str | None = None, device: str | None = None, dtype: str = "bf16", progress: bool = True,
             offload: str = "none", compile: bool = False) -> dict:
    from refgen.artifacts import atomic_save_image, atomic_write_json, provenance
    from refgen.identity.features import VisionFeatures, feature_config_from_settings
    from refgen.identity.head import load_head
    from refgen.identity.inject import inject, load_residual, read_residual
    from refgen.identity.prompts import encode_prompts, tokenize
    from refgen.identity.render import (RenderConfig, encode_negative, load_pipeline, load_tokenizer_only,
                                        release_text_encoder, render_grid, render_images)
    from refgen.images import load_rgb, resolve_refs

    out = Path(out)
    if not cfg.people:
        raise ValueError("no people given: use --ref DIR_OR_FILES or --residual FILE, one per ~ID~")
    rc = RenderConfig(prompt=cfg.prompt, alphas=[1.0], seeds=cfg.seeds, steps=cfg.steps, true_cfg=cfg.true_cfg,
                      negative_prompt=cfg.negative_prompt, height=cfg.height, width=cfg.width,
                      batch_size=cfg.batch_size, cfg_batch=cfg.cfg_batch)
    # Cheap checks first: slots (tokenizer only), reference files, residual files' format.
    tokenize(load_tokenizer_only(model), cfg.prompt, n_identities=len(cfg.people))
    refs = {k: resolve_refs(p.source) for k, p in enumerate(cfg.people) if p.kind == "ref"}
    for p in cfg.people:
        if p.kind == "residual":
            read_residual(p.source[0])
    if refs and not (vl_model and head):
        raise ValueError("--ref needs --vl-model and --head (a head checkpoint from `refgen train-head`)")
    vl = identify_model(vl_model, "--vl-model", allow_download=True) if refs else None

    pipe = load_pipeline(model, device, dtype, offload=offload, compile=compile)
    dev, dt = pipe._execution_device, pipe.transformer.dtype
    residuals: list[torch.Tensor] = [None] * len(cfg.people)  # type: ignore[list-item]
    for k, p in enumerate(cfg.people):
        if p.kind == "residual":
            residuals[k] = load_residual(p.source[0], pipe, dev, dt)
    head_md = None
    if refs:
        h, head_md = load_head(head, dev, dt)
        check_head_fits(head_md, pipe, vl, head)
        settings = head_feature_settings(head_md, head)
        # the features exactly as training made them: same budget, sides, image count and dtype
        fx = VisionFeatures(vl_model, device, settings["dtype"], feature_config_from_settings(settings))
        if vl.config_sha256 is None:  # downloaded just now: its config can be compared at last
            problems = check_vl_model(settings, identify_model(vl_model, "--vl-model"))
            if problems:
                raise HeadMismatchError(f"head {head} does not fit: " + "; ".join(problems))
        with torch.no_grad():
            for k, files in refs.items():
                z = fx([load_rgb(f) for f in files]).to(dev, dt)
                residuals[k] = h(z[None])[0]  # (L, H)
        del fx
    enc = encode_prompts(pipe, cfg.prompt, n_identities=len(cfg.people))
    slots = enc.slots[0]
    alphas = [p.alpha for p in cfg.people]
    neg = encode_negative(pipe, rc)
    release_text_encoder(pipe)  # every prompt is encoded: ~16 GB less on the GPU while denoising
    B = len(cfg.seeds)
    E = inject(enc.embeds.expand(B, -1, -1), slots, residuals, alphas)
    images = render_images(pipe, E, enc.mask.expand(B, -1), cfg.seeds, rc, neg, progress)
    files = []
    for s, im in zip(cfg.seeds, images):
        atomic_save_image(im, out / f"seed{s}.png")
        files.append(f"seed{s}.png")
    record = provenance(dataclasses.asdict(cfg), kind="generate", model=model, vl_model=vl_model, head=head,
                        head_metadata=head_md, dtype=str(dt).replace("torch.", ""), device=str(dev),
                        slots=[dataclasses.asdict(s) for s in slots], alphas=alphas, images=files)
    if cfg.grid_alphas:
        scaled = [a * r for a, r in zip(alphas, residuals)]
        grid_cfg = dataclasses.replace(rc, alphas=cfg.grid_alphas)
        render_grid(pipe, grid_cfg, scaled, out / "grid", progress=progress,
                    encoded=(enc.embeds, enc.mask, slots), neg=neg)
        record["grid"] = "grid/grid.png"
    atomic_write_json(out / "generate.json", record)
    return record


ERROR_KINDS = {"SlotError": "slot", "HeadMismatchError": "head_mismatch", "ResidualMismatchError": "residual_mismatch",
               "DeviceMismatchError": "device_dtype", "PolicyError": "policy", "FileNotFoundError": "missing_file",
               "ValueError": "bad_input"}


def error_kind(e: BaseException) -> str:
    for cls in type(e).__mro__:
        if cls.__name__ in ERROR_KINDS:
            return ERROR_KINDS[cls.__name__]
    return "other"
