"""`IdentityPipeline`: refgen as a Python object that a diffusers user holds and calls.

It loads Qwen-Image once (and, for reference photos, the Qwen3-VL vision tower and a residual head) and keeps the
models resident between calls:

    ip = IdentityPipeline.from_pretrained("Qwen/Qwen-Image", vl_model="Qwen/Qwen3-VL-8B-Instruct", head="head.safetensors")
    anna = ip.residual_from_refs(["anna1.jpg", "anna2.jpg"])     # photos -> features -> head -> SlotResidual
    bob = ip.invert(bob_photos)                                  # teacher inversion, result in memory
    images = ip("~ID~ and ~ID~ on a beach", people=[anna, bob], alphas=[1.2, 0.9], seeds=[0, 1])
    prompt_embeds, prompt_embeds_mask = ip.encode("~ID~ on a beach", people=[anna])   # for a stock pipeline

`encode_identity(pipe, prompt, people, alphas)` is the same encoding for a `QwenImagePipeline` the user already
holds. Every method is built on the functions behind the CLI (slots, prompt encoding, injection, the inversion
engine, features, head, rendering), and `refgen render`, `invert` and `generate` call this object.

refgen's own state (model id, device, head, vision tower, which prompts are encoded) lives here, never on the
diffusers pipeline; what the pipeline itself does (its offload hooks) is read from the pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from refgen.identity.inject import ResidualMismatchError
from refgen.identity.slots import SLOT_REPEAT

# Encoded prompts kept per IdentityPipeline: (1, S, H) each, a few hundred kB for Qwen-Image. Re-running a prompt
# with other seeds, alphas or people then costs no text-encoder forward (and no 16 GB move back to the GPU).
ENCODE_CACHE_SIZE = 32


class InversionError(RuntimeError):
    """Teacher inversion stopped without a residual (non-finite loss, or divergence after halving the lr)."""


@dataclass
class SlotResidual:
    """One person: a residual [L, H] for the `~ID~` window, and the metadata that says which model it fits
    (L, H, placeholder token ids, tokenizer fingerprint, model; the file format of `refgen invert`)."""

    tensor: torch.Tensor  # (L, H) float32 on the CPU
    metadata: dict[str, str]

    def __post_init__(self):
        if not isinstance(self.tensor, torch.Tensor) or self.tensor.ndim != 2:
            raise ValueError(f"SlotResidual.tensor must be an (L, H) tensor, got "
                             f"{getattr(self.tensor, 'shape', type(self.tensor).__name__)}")
        if self.tensor.dtype != torch.float32 or self.tensor.device.type != "cpu":
            raise ValueError(f"SlotResidual.tensor is stored as float32 on the CPU (the file format), got "
                             f"{self.tensor.dtype} on {self.tensor.device}: pass tensor.float().cpu()")
        missing = [k for k in ("L", "H", "placeholder_token_ids", "tokenizer_fingerprint") if k not in self.metadata]
        if missing:
            raise ValueError(f"SlotResidual.metadata lacks {', '.join(missing)}: build it with "
                             "refgen.identity.inject.residual_metadata(pipe, model_id)")
        if list(self.tensor.shape) != [int(self.metadata["L"]), int(self.metadata["H"])]:
            raise ValueError(f"SlotResidual.tensor has shape {tuple(self.tensor.shape)} but its metadata says "
                             f"L={self.metadata['L']} H={self.metadata['H']}")

    @property
    def L(self) -> int:
        return self.tensor.shape[0]

    @property
    def H(self) -> int:
        return self.tensor.shape[1]

    def save(self, path: str | Path) -> None:
        """Write the residual file (atomically), as `refgen invert` does; `refgen render --residual` reads it."""
        from refgen.identity.inject import save_residual

        save_residual(path, self.tensor, self.metadata)

    @classmethod
    def load(cls, path: str | Path, pipe) -> "SlotResidual":
        """Read a residual file, refused (ResidualMismatchError) unless it fits `pipe` (an IdentityPipeline or a
        QwenImagePipeline): L, H, placeholder ids, tokenizer fingerprint."""
        from refgen.identity.inject import read_checked_residual

        return cls(*read_checked_residual(path, _diffusers_pipe(pipe)))

    def check_fits(self, pipe, name: str = "residual") -> None:
        """ResidualMismatchError unless this residual fits `pipe` (the checks `load` makes)."""
        from refgen.identity.inject import residual_problems

        problems = residual_problems(self.tensor, self.metadata, _diffusers_pipe(pipe))
        if problems:
            raise ResidualMismatchError(f"{name} (made for model {self.metadata.get('model')!r}) does not fit the "
                                        "loaded model: " + "; ".join(problems))


@dataclass
class SlotTokens:
    """One person as learnt token embeddings [L, H_in] for the `~ID~` placeholder, read by the text encoder
    (`InvertConfig.parametrisation = "tokens"`), with the placeholder's own embeddings they were learnt from
    and the metadata of a residual (the file format of `refgen invert` in that mode: teacher_tokens.safetensors).
    Strength alpha moves from the placeholder (alpha 0) to the learnt tokens (alpha 1) and on."""

    tensor: torch.Tensor  # (L, H_in) float32 on the CPU
    placeholder: torch.Tensor  # (L, H_in) float32 on the CPU
    metadata: dict[str, str]

    def __post_init__(self):
        for name in ("tensor", "placeholder"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.dtype != torch.float32 or t.device.type != "cpu":
                raise ValueError(f"SlotTokens.{name} must be an (L, H_in) float32 CPU tensor, got "
                                 f"{getattr(t, 'shape', type(t).__name__)} {getattr(t, 'dtype', '')}")
        if self.tensor.shape != self.placeholder.shape:
            raise ValueError(f"SlotTokens.tensor {tuple(self.tensor.shape)} and placeholder "
                             f"{tuple(self.placeholder.shape)} differ in shape")
        missing = [k for k in ("L", "H_in", "placeholder_token_ids", "tokenizer_fingerprint") if k not in self.metadata]
        if missing:
            raise ValueError(f"SlotTokens.metadata lacks {', '.join(missing)}: build it with "
                             "refgen.identity.tokens.token_metadata(pipe, model_id)")

    def save(self, path: str | Path) -> None:
        """Write the token file (atomically), as `refgen invert` does; `refgen render --residual` reads it."""
        from refgen.identity.tokens import save_tokens

        save_tokens(path, self.tensor, self.placeholder, self.metadata)

    @classmethod
    def load(cls, path: str | Path, pipe) -> "SlotTokens":
        """Read a token file, refused (TokensMismatchError) unless it fits `pipe`: placeholder ids, tokenizer
        fingerprint, and the text encoder's own placeholder embeddings."""
        from refgen.identity.tokens import read_tokens

        p = cls(*read_tokens(path))
        p.check_fits(pipe, f"token file {path}")
        return p

    def check_fits(self, pipe, name: str = "tokens") -> None:
        from refgen.identity.tokens import TokensMismatchError, token_problems

        problems = token_problems(self.tensor, self.placeholder, self.metadata, _diffusers_pipe(pipe))
        if problems:
            raise TokensMismatchError(f"{name} (made for model {self.metadata.get('model')!r}) does not fit the "
                                      "loaded model: " + "; ".join(problems))


def _diffusers_pipe(pipe):
    return pipe.pipe if isinstance(pipe, IdentityPipeline) else pipe


def load_person(path: str | Path, pipe) -> "SlotResidual | SlotTokens":
    """A residual or token file (what `refgen invert` wrote, told apart by the format in its metadata), checked
    against `pipe`."""
    from refgen.identity.tokens import FORMAT as TOKENS

    if _file_format(path) == TOKENS:
        return SlotTokens.load(path, pipe)
    return SlotResidual.load(path, pipe)


def read_person_file(path: str | Path) -> "SlotResidual | SlotTokens":
    """A residual or token file as stored, not yet checked against a model (`load_person` does that): the cheap
    check before any model loads that it is there, readable and of a known format (the error names the file)."""
    from refgen.identity.inject import read_residual
    from refgen.identity.tokens import FORMAT as TOKENS, read_tokens

    if _file_format(path) == TOKENS:
        return SlotTokens(*read_tokens(path))
    return SlotResidual(*read_residual(path))


def _file_format(path: str | Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:
        return None  # not readable: SlotResidual.load names the file and the reason


def _residual_of(person, pipe, k: int) -> "SlotResidual | SlotTokens":
    """A SlotResidual, SlotTokens, or a residual/token file, as person k (checked against `pipe`)."""
    if isinstance(person, SlotResidual):
        person.check_fits(pipe, f"person {k + 1}'s residual")
        return person
    if isinstance(person, SlotTokens):
        person.check_fits(pipe, f"person {k + 1}'s tokens")
        return person
    if isinstance(person, (str, os.PathLike)):
        return load_person(person, pipe)
    raise TypeError(f"person {k + 1}: expected a SlotResidual, SlotTokens or a residual/token file (.safetensors), "
                    f"got {type(person).__name__}")


def _alphas_for(n_people: int, alphas) -> list[float]:
    from refgen.identity.generate import assign_alphas

    if alphas is None:
        alphas = []
    elif isinstance(alphas, (int, float)):
        alphas = [alphas]
    return assign_alphas(n_people, [float(a) for a in alphas])


def _inject(enc, residuals: Sequence[SlotResidual], alphas: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (1, S, H), prompt_embeds_mask (1, S)) of an encoded prompt with alpha_k * R_k in slot k."""
    from refgen.identity.inject import inject

    E = enc.embeds
    if residuals:
        E = inject(E, enc.slots[0], [r.tensor.to(E.device, E.dtype) for r in residuals], list(alphas))
    return E, enc.mask


def _people_by_kind(pipe, people: Sequence, alphas: Sequence[float], repeat: int = 1) -> tuple[list, list]:
    """(tokens per slot, residuals per slot) for a prompt with at least one SlotTokens person: a token person's
    tokens at its alpha and a zero residual; a residual person's alpha * R and the placeholder's own embeddings."""
    from refgen.identity.tokens import at_alpha, placeholder_embeds

    ph = placeholder_embeds(_diffusers_pipe(pipe), repeat)
    H = _diffusers_pipe(pipe).transformer.config.joint_attention_dim
    toks, res = [], []
    for p, a in zip(people, alphas):
        if isinstance(p, SlotTokens):
            toks.append(at_alpha(p.tensor, ph, a))
            res.append(torch.zeros(ph.shape[0], H))
        else:
            toks.append(ph)
            res.append(a * p.tensor)
    return toks, res


def _encode_people(pipe, prompt: str, people: Sequence, alphas: Sequence[float], encode_text, isolate: bool = False):
    """(prompt_embeds (1, S, H), prompt_embeds_mask (1, S)) with person k in slot k. Residual people only: the
    prompt (`encode_text`, which may cache it) plus alpha_k R_k. With token people the text encoder reads the
    prompt with their tokens in their slots (no cache serves that), then residual people are added; `isolate`:
    each person reaches only its own segment of the prompt (heads trained with `isolate_slots`). The slots are as
    wide as the people (one slot repeat for all: identity/slots.py)."""
    from refgen.identity.inject import inject
    from refgen.identity.prompts import tokenize
    from refgen.identity.render import encode_with_tokens
    from refgen.identity.slots import common_repeat

    dp = _diffusers_pipe(pipe)
    repeat = common_repeat(dp.tokenizer, [p.tensor.shape[0] for p in people])
    if not any(isinstance(p, SlotTokens) for p in people):
        return _inject(encode_text(prompt, len(people) or None, repeat), people, alphas)
    toks, res = _people_by_kind(pipe, people, alphas, repeat)
    E, M = encode_with_tokens(dp, [prompt], [[t] for t in toks], [1.0], isolate)
    slots = tokenize(dp, prompt, len(people), repeat).slots  # the tokenizer's windows: no second text-encoder pass
    E = inject(E, slots, [r.to(E.device, E.dtype) for r in res], [1.0] * len(res))
    return E, M


def encode_identity(pipe, prompt: str, people: Sequence = (), alphas=None,
                    isolate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`(prompt_embeds, prompt_embeds_mask)` for a stock `QwenImagePipeline`, with person k in the k-th `~ID~`.

        prompt_embeds, mask = refgen.encode_identity(pipe, "~ID~ on a beach", [SlotResidual.load("anna.safetensors", pipe)])
        image = pipe(prompt_embeds=prompt_embeds, prompt_embeds_mask=mask, negative_prompt=" ", true_cfg_scale=4).images[0]

    `people`: SlotResiduals, SlotTokens or their files, one per `~ID~` (none: the placeholders stay plain text); `alphas`:
    one per person, or one for all (default 1). The prompt is encoded as `pipe.encode_prompt` does (bit-identical
    without placeholders), every `~ID~` with the same fixed token ids; the slot count, each residual's fit and the
    alphas are checked first. Reference photos need the vision tower and a head: use `IdentityPipeline`.
    `isolate`: two or more token people each reach only their own segment of the prompt, as a head trained with
    `isolate_slots` was (`IdentityPipeline` reads it from the head).
    """
    from refgen.identity.prompts import encode_prompts, tokenize

    tokenize(pipe, prompt, n_identities=len(people) or None)  # slot count first: it needs no model
    people = [_residual_of(p, pipe, k) for k, p in enumerate(people)]
    alphas = _alphas_for(len(people), alphas)
    return _encode_people(pipe, prompt, people, alphas,
                          lambda p, n, r: encode_prompts(pipe, p, n_identities=n, repeat=r), isolate)


def reference_photos(images) -> list[Image.Image]:
    """Reference photos as 8-bit RGB: paths, folders (every image in them) or PIL images, read by refgen's one
    loader's rules; an unreadable file is an error naming it."""
    from PIL import ImageOps

    from refgen.images import load_rgb, resolve_refs, to_rgb

    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    out: list[Image.Image] = []
    for k, im in enumerate(images):
        if isinstance(im, Image.Image):
            out.append(to_rgb(ImageOps.exif_transpose(im), f"reference photo #{k + 1}"))
        elif isinstance(im, (str, os.PathLike)):
            out += [load_rgb(p) for p in resolve_refs(im)]
        else:
            raise TypeError(f"reference photo #{k + 1}: expected a path, a folder or a PIL image, got "
                            f"{type(im).__name__}")
    if not out:
        raise ValueError("no reference photos given")
    return out


def photos_id(photos: Sequence[Image.Image]) -> str:
    """A name for a set of photos from their pixels: the same photos (as files or in memory) get the same name."""
    h = hashlib.sha256()
    for im in photos:
        h.update(f"{im.size[0]}x{im.size[1]}:".encode())
        h.update(im.tobytes())
    return "ref_" + h.hexdigest()[:16]


def _photo_prompts(images, prompts: Sequence[str] | None, n: int) -> list[str]:
    """Each photo's own prompt for image_prompts inversion: `prompts` (one per photo), or the prompts.json of a
    folder given as the photos (in the order its photos are read)."""
    from refgen.images import resolve_refs

    if prompts is None:
        folder = Path(images) if isinstance(images, (str, os.PathLike)) and Path(images).is_dir() else None
        table = folder / "prompts.json" if folder else None
        if table is None or not table.is_file():
            raise ValueError("config.image_prompts needs each photo's prompt: pass prompts=[...] (one per photo, each "
                             "with one ~ID~), or a folder of photos with a prompts.json ({file name: prompt})")
        rows = json.loads(table.read_text())
        files = resolve_refs(folder)
        missing = [f.name for f in files if f.name not in rows]
        if missing:
            raise ValueError(f"{table}: no prompt for {missing}")
        prompts = [rows[f.name] for f in files]
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} photos: one prompt per photo")
    return prompts


def _check_head_args(head, vl_model):
    """The VL model's identity, after the checks that need no model: both given, the head file there."""
    from refgen.model_identity import identify_model

    if head is None or vl_model is None:
        raise ValueError("vl_model and head go together: reference photos become a residual through the "
                         "Qwen3-VL vision tower (vl_model) and a head trained on its features (head); "
                         f"got vl_model={vl_model!r}, head={head!r}")
    vl = identify_model(vl_model, "vl_model", allow_download=True)
    if not (Path(head).is_file() or (Path(head) / "head.safetensors").is_file()):
        raise FileNotFoundError(f"head checkpoint not found: {head} (a head.safetensors or a head folder)")
    return vl


class IdentityPipeline:
    """Qwen-Image with refgen's identity slots; `from_pretrained` loads it, or wrap a QwenImagePipeline you hold:
    `IdentityPipeline(pipe)` (then `load_head` for reference photos).

    `free_text_encoder`: move the text encoder off the GPU after each encoding (~16 GB for Qwen-Image, back when
    an uncached prompt comes); one-shot commands want it, interactive use does not. Under group offload the text
    encoder is always moved off after encoding, as `render` and `generate` do.
    """

    def __init__(self, pipe, model_id: str | None = None, *, free_text_encoder: bool = False):
        from refgen.identity.render import execution_device

        self.pipe = pipe
        self.model_id = str(model_id or pipe.name_or_path or "")
        self.device = execution_device(pipe)
        self.free_text_encoder = free_text_encoder
        self.features = self.head = self.head_metadata = self.head_path = None  # set by load_head
        # Two or more token people each read only their own segment of the prompt: set by load_head from the head's
        # training config (`isolate_slots`), so people are encoded as the head learnt them.
        self.isolate_slots = False
        self._encoded: OrderedDict = OrderedDict()

    def __repr__(self) -> str:
        head = f", head={self.head_path!r}, vl_model={self.features.model_id!r}" if self.head is not None else ""
        return (f"IdentityPipeline(model={self.model_id!r}{head}, device={self.device}, dtype={self.dtype}, "
                f"offload={self.offload!r})")

    # ---- loading ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str, vl_model: str | None = None, head: str | None = None,
                        device: str | None = None, dtype: str = "bf16", offload: str = "none", compile: bool = False,
                        free_text_encoder: bool = False) -> "IdentityPipeline":
        """Load Qwen-Image (hub id or folder) under refgen's device policy: CUDA (device None or "cuda[:N]"),
        "cpu" only when asked for and only for models under 200M parameters (the tiny and toy models); dtype
        "bf16" or "fp32". offload "none" | "model" | "group" and compile as for `refgen render`.
        With `head` and `vl_model`: `load_head`, its cheap checks made before the large model loads.
        """
        from refgen.identity.render import load_pipeline

        if head is not None or vl_model is not None:
            _check_head_args(head, vl_model)
        pipe = load_pipeline(model, device, dtype, offload=offload, compile=compile)
        ip = cls(pipe, model, free_text_encoder=free_text_encoder)
        if head is not None:
            ip.load_head(head, vl_model)
        return ip

    def load_head(self, head: str, vl_model: str) -> None:
        """Reference photos through a head (`refgen train-head`) on the features of `vl_model` (the Qwen3-VL model
        they came from). The head's fit (L, H, placeholder ids, tokenizer, VL model identity) is checked
        (HeadMismatchError), and the vision tower is loaded with the head's recorded feature settings, so
        `residual_from_refs` pools photos exactly as training did."""
        from refgen.identity.features import VisionFeatures, feature_config_from_settings
        from refgen.identity.generate import HeadMismatchError, check_head_fits, check_vl_model, head_feature_settings
        from refgen.identity.head import load_head
        from refgen.model_identity import identify_model

        vl = _check_head_args(head, vl_model)
        h, md = load_head(head, self.device, self.dtype)
        check_head_fits(md, self.pipe, vl, head)
        if h.output == "tokens":  # its tokens are steps from the placeholder embeddings it was trained against
            from refgen.identity.tokens import token_problems

            problems = token_problems(h.token_base, h.token_base, {**md, "model": md.get("qwen_image_model")},
                                      self.pipe)
            if problems:
                raise HeadMismatchError(f"token head {head} does not fit: " + "; ".join(problems))
        settings = head_feature_settings(md, head)
        # the features exactly as training made them: same budget, sides, image count and dtype
        device = "cpu" if self.device.type == "cpu" else str(self.device)
        fx = VisionFeatures(vl_model, device, settings["dtype"], feature_config_from_settings(settings))
        if vl.config_sha256 is None:  # downloaded just now: its config can be compared at last
            problems = check_vl_model(settings, identify_model(vl_model, "vl_model"))
            if problems:
                raise HeadMismatchError(f"head {head} does not fit: " + "; ".join(problems))
        self.features, self.head, self.head_metadata, self.head_path = fx, h, md, str(head)
        cfg = md.get("config") or "{}"
        self.isolate_slots = bool((json.loads(cfg) if isinstance(cfg, str) else cfg).get("isolate_slots", False))

    # ---- what the pipeline is ------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    @property
    def offload(self) -> str:
        """"none" | "model" | "group", read from the pipeline's hooks."""
        from refgen.identity.render import offload_mode

        return offload_mode(self.pipe)

    def slots(self, prompt: str, n_people: int | None = None, slot_repeat: int = SLOT_REPEAT) -> list[dict]:
        """Each `~ID~`'s window in the prompt embeddings (slot, start, length L, token ids, tokens), left to right;
        with `n_people`, SlotError unless the prompt has exactly that many (0: it must have none); `slot_repeat`:
        the windows of people made with that repeat (InvertConfig / E2EConfig.slot_repeat). Tokenizer only."""
        from refgen.identity.prompts import template_of, tokenize
        from refgen.identity.slots import PLACEHOLDER, describe_slots

        n = n_people if n_people or (n_people == 0 and PLACEHOLDER in prompt) else None
        tp = tokenize(self.pipe, prompt, n_identities=n, repeat=slot_repeat)
        return describe_slots(self.pipe.tokenizer, tp, template_of(self.pipe)[1])

    def slots_for(self, prompt: str, people: Sequence) -> list[dict]:
        """`slots` at the width these people fill (SlotResidual / SlotTokens: their one slot repeat), for a record of
        where they went."""
        from refgen.identity.slots import common_repeat

        width = common_repeat(self.pipe.tokenizer, [p.tensor.shape[0] for p in people])
        return self.slots(prompt, len(people) or None, slot_repeat=width)

    # ---- people ---------------------------------------------------------------------------------------------
    def load_residual(self, path: str | Path) -> "SlotResidual | SlotTokens":
        """A residual or token file from `refgen invert` (the format is read from the file), checked against
        this model."""
        return load_person(path, self)

    def residual_from_refs(self, images) -> "SlotResidual | SlotTokens":
        """1-n reference photos (paths, a folder, PIL images) -> Qwen3-VL features -> head -> SlotResidual, or
        SlotTokens from a head trained with output "tokens" (checked against this text encoder)."""
        from refgen.identity.inject import residual_metadata

        if self.head is None:
            raise ValueError("reference photos need a head: IdentityPipeline.from_pretrained(model, vl_model=..., "
                             "head=...) (a head from `refgen train-head`); or make the residual by teacher "
                             "inversion with .invert(photos)")
        from refgen.identity.head import person_from_photos
        from refgen.identity.slots import repeat_of_length

        photos = reference_photos(images)
        kind, t = person_from_photos(self.head, self.features, photos)  # (L, H) or (L, H_in), either kind of head
        extra = {"source": "head", "head": self.head_path, "references": photos_id(photos)}
        k = repeat_of_length(self.pipe.tokenizer, t.shape[0], f"head {self.head_path}")  # its window's slot repeat
        if kind == "tokens":
            from refgen.identity.tokens import token_metadata

            return SlotTokens(t, self.head.token_base.clone(), token_metadata(self.pipe, self.model_id, extra, k))
        return SlotResidual(t, residual_metadata(self.pipe, self.model_id, extra, k))

    def invert(self, images, config=None, out: str | Path | None = None, identity: str | None = None,
               progress: bool = True, prompts: Sequence[str] | None = None,
               start: "SlotResidual | SlotTokens | None" = None, features=None) -> "SlotResidual | SlotTokens":
        """Teacher inversion of 1-n photos of one person (`refgen invert`'s engine: the same optimisation,
        checkpoints and records) -> SlotTokens (the default parametrisation) or SlotResidual, in memory.

        `out`: a folder to keep the run in (`OUT/<identity>/`: the photos, teacher_residual.safetensors,
        teacher.json, metrics, checkpoints); a killed run resumes there and a finished one is reused. Without it
        the run goes to a temporary folder that is deleted afterwards. `identity` (default: a name made from the
        photos' pixels, so the same photos find their finished run) also seeds the inversion's noise.
        `config`: an InvertConfig (default: its defaults, with qa=False when there is no `out` to keep the QA
        grid in). With `config.image_prompts`, `prompts` gives each photo its own sentence with one `~ID~` (in the
        photos' order); a folder of photos may carry them instead as prompts.json ({file name: prompt}).
        `start`: begin at this person (e.g. a head's `residual_from_refs(photos)`) instead of near the placeholder:
        a SlotTokens for parametrisation "tokens", a SlotResidual for "free"/"rms_scaled".
        `features`: the VisionFeatures (`refgen.identity.features`) that reads the estimates of config.id_weight > 0
        (default: this pipeline's own, loaded with a head).
        """
        from refgen.artifacts import atomic_save_image
        from refgen.identity.invert import InvertConfig, teacher_file
        from refgen.images import Identity

        if config is None:
            config = InvertConfig(qa=out is not None)
        if config.qa and out is None:
            raise ValueError("config.qa renders an alpha grid into OUT/<identity>/alpha_eval/, which a run without "
                             "out would delete: pass out=... or an InvertConfig with qa=False")
        photos = reference_photos(images)
        prompts = _photo_prompts(images, prompts, len(photos)) if config.image_prompts else None
        if start is not None:
            want = SlotTokens if config.parametrisation == "tokens" else SlotResidual
            if not isinstance(start, want):
                raise TypeError(f"parametrisation {config.parametrisation!r} starts from a {want.__name__}, got "
                                f"{type(start).__name__}")
            start.check_fits(self, "start")
        ident_id = identity or photos_id(photos)
        with tempfile.TemporaryDirectory(prefix="refgen_invert_") if out is None else nullcontext(out) as root:
            root = Path(root)
            d = root / ident_id
            files = []
            for k, im in enumerate(photos):
                f = d / "references" / f"{k:03d}.png"
                if not f.exists():
                    atomic_save_image(im, f)
                files.append(f)
            if prompts is not None:  # where Inverter.run reads them, keyed by the copies' names
                from refgen.artifacts import atomic_write_json

                atomic_write_json(d / "prompts.json", {f.name: t for f, t in zip(files, prompts)})
            self.invert_identities([Identity(ident_id, d, files)], config, root, progress=progress,
                                   start=None if start is None else {ident_id: start.tensor}, vl=features)
            try:
                made = teacher_file(d)
            except ValueError as e:
                raise InversionError(f"inversion of {ident_id}: {e}" + (
                    f"; delete {d / 'teacher.json'} to retry it" if out is not None else "")) from None
            return self.load_residual(made)

    def invert_identities(self, identities: list, config, out_root: str | Path, progress: bool = True,
                          label: str | None = None, start: dict | None = None, vl=None) -> list[dict]:
        """Teacher inversion of identity folders (refgen.images.Identity) into OUT_ROOT/<id>/, K per forward,
        resumable, complete ones skipped; the records of those inverted now. What `refgen invert` runs (`label`:
        print how many are complete and to do under that name). A complete identity made with other settings
        is refused, never passed off as this run's. `vl`: the VisionFeatures for config.id_weight > 0 (default:
        this pipeline's own, loaded with a head)."""
        from refgen.identity.invert import Inverter, check_invert_offload

        check_invert_offload(self.offload)
        inv = Inverter(self.pipe, config, out_root, model_id=self.model_id, progress=progress,
                       vl=vl if vl is not None else self.features)
        inv.refuse_stale(identities)
        if label:
            n_done = sum(inv.is_complete(i) for i in identities)
            print(f"{label}: {len(identities)} identities, {n_done} complete, {len(identities) - n_done} to do")
        return inv.run(identities, start)

    def _residuals(self, people: Sequence) -> list:
        """Person k as a SlotResidual or SlotTokens: one of those, a residual/token file (.safetensors), or
        reference photos (a folder, an image file, a PIL image, or a list of them) through the head."""
        out = []
        for k, p in enumerate(people):
            if isinstance(p, (SlotResidual, SlotTokens)) or (isinstance(p, (str, os.PathLike)) and
                                                             Path(p).suffix.lower() == ".safetensors"):
                out.append(_residual_of(p, self, k))
            elif isinstance(p, (str, os.PathLike, Image.Image, list, tuple)):
                out.append(self.residual_from_refs(p))
            else:
                raise TypeError(f"person {k + 1}: expected a SlotResidual, SlotTokens, their file, or reference photos "
                                f"(paths, a folder, PIL images), got {type(p).__name__}")
        return out

    # ---- encoding ------------------------------------------------------------------------------------------
    def _text_encoder_ready(self) -> None:
        """Bring a text encoder that was moved off the GPU (free_text_encoder, inversion) back before encoding."""
        from refgen.identity.render import moved_by_hooks

        te = self.pipe.text_encoder
        if not moved_by_hooks(te) and next(te.parameters()).device != self.device:
            te.to(self.device)

    def _after_encoding(self) -> None:
        from refgen.identity.render import release_text_encoder

        if self.free_text_encoder or self.offload == "group":
            release_text_encoder(self.pipe)

    def _encode_text(self, prompt: str, n_identities: int | None = None, repeat: int = 1):
        """refgen.identity.prompts.encode_prompts for one prompt, remembered (the text encoder never changes)."""
        from refgen.identity.prompts import encode_prompts

        key = (prompt, n_identities, repeat)
        if key in self._encoded:
            self._encoded.move_to_end(key)
            return self._encoded[key]
        self._text_encoder_ready()
        enc = encode_prompts(self.pipe, prompt, n_identities=n_identities, repeat=repeat)
        self._encoded[key] = enc
        while len(self._encoded) > ENCODE_CACHE_SIZE:
            self._encoded.popitem(last=False)
        return enc

    def _negative(self, cfg) -> tuple[torch.Tensor, torch.Tensor] | None:
        """refgen.identity.render.encode_negative, through the cache."""
        if cfg.true_cfg <= 1:
            return None
        ne = self._encode_text(cfg.negative_prompt)
        return ne.embeds, ne.mask

    def _encode(self, prompt: str, people: Sequence, alphas) -> tuple[torch.Tensor, torch.Tensor, list[SlotResidual]]:
        people = list(people)
        self.slots(prompt, len(people) or None)  # slot count before any photo goes through a model
        residuals = self._residuals(people)
        alphas = _alphas_for(len(residuals), alphas)
        if any(isinstance(p, SlotTokens) for p in residuals):
            self._text_encoder_ready()  # token people are read by the text encoder: no cached prompt serves
        E, M = _encode_people(self, prompt, self._with_slot_roles(residuals), alphas, self._encode_text,
                              self.isolate_slots)
        return E, M, residuals

    def _with_slot_roles(self, people: list) -> list:
        """People as the loaded head's two-person slots read them (its `slot_roles`, `head.with_slot_role`); the same
        people without such a head or in a prompt of one or more than two."""
        if self.head is None or getattr(self.head, "slot_roles", None) is None or len(people) != 2:
            return people
        from refgen.identity.head import with_slot_role

        return [dataclasses.replace(p, tensor=with_slot_role(
            self.head, "tokens" if isinstance(p, SlotTokens) else "residual", p.tensor, k, 2))
            for k, p in enumerate(people)]

    def encode(self, prompt: str, people: Sequence = (), alphas=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(prompt_embeds (1, S, H), prompt_embeds_mask (1, S))` with person k in the k-th `~ID~`, for this
        object's `__call__` or a stock `QwenImagePipeline(prompt_embeds=..., prompt_embeds_mask=...)`.
        `people`: SlotResiduals, residual files, or reference photos (with a head); `alphas`: one per person, or
        one for all (default 1)."""
        E, M, _ = self._encode(prompt, people, alphas)
        self._after_encoding()
        return E, M

    # ---- rendering -----------------------------------------------------------------------------------------
    def __call__(self, prompt: str, people: Sequence = (), alphas=None, seeds: int | Sequence[int] = (0,),
                 steps: int = 28, true_cfg: float = 4.0, height: int = 768, width: int = 512,
                 negative_prompt: str = " ", batch_size: int = 4, cfg_batch: bool = True,
                 id_guidance: float = 0.0, progress: bool = False) -> list[Image.Image]:
        """One image per seed (PIL), person k in the k-th `~ID~`. The prompt is encoded once (and remembered);
        with true CFG the prompt and negative rows run as one batched forward (`cfg_batch`); each image has its
        own seeded generator, so a seed gives the same image in any batch. `id_guidance` > 0 adds the prompt
        without the people (every alpha 0) as a third row and pushes the people that much further
        (`refgen.flow.identity_cfg`)."""
        from refgen.identity.render import RenderConfig, render_images

        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        rc = RenderConfig(prompt=prompt, alphas=[1.0], seeds=seeds, steps=steps, true_cfg=true_cfg,
                          negative_prompt=negative_prompt, height=height, width=width, batch_size=batch_size,
                          cfg_batch=cfg_batch, id_guidance=id_guidance)
        E, M, people = self._encode(prompt, people, alphas)
        plain = self._encode(prompt, people, [0.0] * len(people))[0] if id_guidance else None
        neg = self._negative(rc)
        self._after_encoding()
        B = len(seeds)
        return render_images(self.pipe, E.expand(B, -1, -1), M.expand(B, -1), seeds, rc, neg, progress,
                             plain=None if plain is None else plain.expand(B, -1, -1))

    def render_grid(self, cfg, people: Sequence = (), out: str | Path = "grid", alphas=None,
                    residual_files: list[str] | None = None, progress: bool = True) -> dict:
        """An alpha x seed grid (`refgen render`): row alpha a gives person k a * alphas[k] * R_k. Writes OUT/grid.png,
        OUT/images/a{a}_s{seed}.png and OUT/grid.json; returns the JSON record. `cfg`: a RenderConfig."""
        from refgen.identity.render import render_grid
        from refgen.identity.slots import common_repeat

        people = list(people)
        self.slots(cfg.prompt, len(people) or None)
        residuals = self._residuals(people)
        person_alphas = _alphas_for(len(residuals), alphas)
        repeat = common_repeat(self.pipe.tokenizer, [p.tensor.shape[0] for p in residuals])
        neg = self._negative(cfg)
        if any(isinstance(p, SlotTokens) for p in residuals):  # rows are read by the text encoder, at their alpha
            self._text_encoder_ready()
            toks, res = _people_by_kind(self, residuals, person_alphas, repeat)
            res = [r.to(self.device, self.dtype) for r in res] if any(isinstance(p, SlotResidual) for p in residuals) else []
            rec = render_grid(self.pipe, cfg, res, out, residual_files=residual_files, progress=progress, neg=neg,
                              model_id=self.model_id, tokens=toks)
            self._after_encoding()
            return rec
        enc = self._encode_text(cfg.prompt, len(residuals) or None, repeat)
        self._after_encoding()
        scaled = [(a * r.tensor).to(self.device, self.dtype) for a, r in zip(person_alphas, residuals)]
        return render_grid(self.pipe, cfg, scaled, out, residual_files=residual_files, progress=progress,
                           encoded=(enc.embeds, enc.mask, enc.slots[0]), neg=neg, model_id=self.model_id)


__all__ = ["IdentityPipeline", "SlotResidual", "SlotTokens", "load_person", "encode_identity", "InversionError", "reference_photos", "photos_id"]
