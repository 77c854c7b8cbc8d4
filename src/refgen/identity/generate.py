"""`refgen generate`: 1-n people in any prompt, through `refgen.pipeline.IdentityPipeline`.

Each person is a reference (a folder or image files -> Qwen3-VL features -> head -> residual) or a residual
file, and fills the next `~ID~` left to right. The prompt is encoded once, every slot gets alpha_k * R_k,
and the images render through QwenImagePipeline with `prompt_embeds`. Every check that can fail (slot
count, residual or head fit, unreadable references) runs before the large models are loaded, and every
run, failed or not, appends one line to OUT/generate_log.jsonl (`generate_log`) so `refgen report` can count
error kinds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from refgen.identity.inject import ResidualMismatchError
from refgen.identity.sampling import SamplingConfig
from refgen.model_identity import ModelIdentity, identify_model


class HeadMismatchError(ResidualMismatchError):
    pass


@dataclass
class Person:
    kind: str  # "ref" or "residual"
    source: list[str]  # image files/folders, or one residual file
    alpha: float = 1.0


@dataclass(kw_only=True)
class GenerateConfig(SamplingConfig):
    prompt: str
    people: list[Person]
    grid_alphas: list[float] | None = None  # optional QA grid: rows multiply every person's alpha

    def render_config(self, alphas: list[float] | None = None):
        """The sampling settings as a RenderConfig; `alphas`: its grid rows."""
        from refgen.identity.render import RenderConfig

        return RenderConfig(prompt=self.prompt, alphas=alphas or [1.0], **self.sampling())


def assign_alphas(n_people: int, alphas: list[float]) -> list[float]:
    """One alpha per person: none given = 1 each, one given = that for all; anything else must be one per person."""
    bad = [a for a in alphas if not math.isfinite(a)]
    if bad:
        raise ValueError(f"alphas must be finite numbers, got {bad[0]}")
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
    from refgen.identity.inject import tokenizer_problems
    from refgen.identity.slots import placeholder_ids

    problems = tokenizer_problems(md, pipe)  # placeholder ids (repeated for wider slots) and tokenizer fingerprint
    ids = json.loads(md.get("placeholder_token_ids", "null")) or placeholder_ids(pipe.tokenizer)
    if int(md["L"]) != len(ids):
        problems.append(f"L={md['L']} != {len(ids)}")
    if md.get("output", "residual") == "tokens":  # token embeddings: the text encoder's input width
        h_in = pipe.text_encoder.get_input_embeddings().weight.shape[1]
        if int(md["H"]) != h_in:
            problems.append(f"token head H={md['H']} != the text encoder's embedding width {h_in}")
    elif int(md["H"]) != pipe.transformer.config.joint_attention_dim:
        problems.append(f"H={md['H']} != {pipe.transformer.config.joint_attention_dim}")
    problems += check_vl_model(head_feature_settings(md, head_path), vl)
    if problems:
        raise HeadMismatchError(f"head {head_path} does not fit: " + "; ".join(problems))


def generate(cfg: GenerateConfig, model: str, out: str | Path, vl_model: str | None = None,
             head: str | None = None, device: str | None = None, dtype: str = "bf16", progress: bool = True,
             offload: str = "none", compile: bool = False) -> dict:
    """Load an IdentityPipeline, render one image per seed into OUT (seed<N>.png, generate.json, optional grid/)."""
    from refgen.artifacts import atomic_save_image, atomic_write_json, provenance
    from refgen.identity.prompts import tokenize
    from refgen.identity.render import load_tokenizer_only
    from refgen.images import resolve_refs
    from refgen.pipeline import IdentityPipeline, read_person_file

    out = Path(out)
    if not cfg.people:
        raise ValueError("no people given: use --ref DIR_OR_FILES or --residual FILE, one per ~ID~")
    rc = cfg.render_config()
    grid_cfg = cfg.render_config(cfg.grid_alphas) if cfg.grid_alphas else None
    # Cheap checks first: slots (tokenizer only), reference files, residual files' format.
    tokenize(load_tokenizer_only(model), cfg.prompt, n_identities=len(cfg.people))
    refs = {k: resolve_refs(p.source) for k, p in enumerate(cfg.people) if p.kind == "ref"}
    for p in cfg.people:
        if p.kind == "residual":
            read_person_file(p.source[0])
    if refs and not (vl_model and head):
        raise ValueError("--ref needs --vl-model and --head (a head checkpoint from `refgen train-head`)")
    # A head is loaded whenever it is given, people from files included: a head trained with slot roles offsets
    # both people of a two-person prompt, whoever made them (the measured teacher route: docs/benchmarks.md).
    if head and not vl_model:
        raise ValueError("--head needs --vl-model (the Qwen3-VL model its features came from), also with --residual "
                         "people only: the head's slot roles apply to them")
    if head:
        identify_model(vl_model, "--vl-model", allow_download=True)

    ip = IdentityPipeline.from_pretrained(model, vl_model=vl_model if head else None, head=head, device=device,
                                          dtype=dtype, offload=offload, compile=compile, free_text_encoder=True)
    residuals = [ip.load_residual(p.source[0]) if p.kind == "residual" else None for p in cfg.people]
    for k, files in refs.items():
        residuals[k] = ip.residual_from_refs(files)
    alphas = [p.alpha for p in cfg.people]
    images = ip(cfg.prompt, residuals, alphas, seeds=rc.seeds, steps=rc.steps, true_cfg=rc.true_cfg,
                height=rc.height, width=rc.width, negative_prompt=rc.negative_prompt, batch_size=rc.batch_size,
                cfg_batch=rc.cfg_batch, id_guidance=rc.id_guidance, progress=progress)
    files = []
    for s, im in zip(cfg.seeds, images):
        atomic_save_image(im, out / f"seed{s}.png")
        files.append(f"seed{s}.png")
    slots = [{"start": s["start"], "length": s["length"]} for s in ip.slots_for(cfg.prompt, residuals)]
    record = provenance(dataclasses.asdict(cfg), kind="generate", model=model, vl_model=vl_model, head=head,
                        head_metadata=ip.head_metadata, dtype=str(ip.dtype).replace("torch.", ""),
                        device=str(ip.device), slots=slots, alphas=alphas, images=files)
    if grid_cfg:
        ip.render_grid(grid_cfg, residuals, out / "grid", alphas=alphas, progress=progress)
        record["grid"] = "grid/grid.png"
    atomic_write_json(out / "generate.json", record)
    return record


@contextmanager
def generate_log(out: str | Path, prompt: str) -> Iterator[dict]:
    """One line per run in OUT/generate_log.jsonl, for `refgen report`: `kind` "ok" with the images the caller
    put into the yielded dict, or the error's kind (ERROR_KINDS) and message; the error is raised on."""
    from refgen.artifacts import JsonlLogger

    log = JsonlLogger(Path(out) / "generate_log.jsonl")
    result: dict = {}
    try:
        yield result
    except Exception as e:
        log.log(kind=error_kind(e), prompt=prompt, error=str(e))
        raise
    log.log(kind="ok", prompt=prompt, images=result.get("images", []))


ERROR_KINDS = {"SlotError": "slot", "HeadMismatchError": "head_mismatch", "ResidualMismatchError": "residual_mismatch",
               "TokensMismatchError": "residual_mismatch",
               "DeviceMismatchError": "device_dtype", "PolicyError": "policy", "FileNotFoundError": "missing_file",
               "ValueError": "bad_input"}


def error_kind(e: BaseException) -> str:
    for cls in type(e).__mro__:
        if cls.__name__ in ERROR_KINDS:
            return ERROR_KINDS[cls.__name__]
    return "other"
