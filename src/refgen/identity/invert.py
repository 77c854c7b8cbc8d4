"""Teacher inversion: one identity (learnt tokens or a slot residual) per person, K identities per forward.

Objective. The frozen Qwen-Image transformer should denoise a person's photos when the prompt carries them:
min_X  E_{sigma, eps, x0} || v(x_sigma, sigma, E(prompt, X)) - (eps - x0) ||^2  (flow matching, as the model
was trained; the seed's epsilon/v-prediction branch is UNet thinking). Where X lives (parametrisation):

  tokens      the placeholder's input token embeddings T = T_ph + e * P, read by the frozen text encoder, so every
              word after the slot sees the person too (the default: it measured best, docs/benchmarks.md)
  rms_scaled  the seed's residual on the encoder output's window, R = clamp(exp(log_scale), 0.01, 1.5) * P / RMS(P);
              off-slot entries are exactly zero at every step, so the seed's off-slot penalty is identically 0
  free        that window residual as P itself, no normalisation or clamp

P starts as a seeded Gaussian (not 0: P/RMS(P) would be 0/0), scaled by init_scale in tokens and free, or at
a given start (a head's guess). From a given start, start_weight * mean((P - P_start)^2) may keep P near it: a
head trained on many people is a prior that a fit to a few photos would otherwise drift from. Each photo may come
with its own prompt (image_prompts), so the scene is said in words and not learnt into the person.

Batching. Identities share the base prompt, so K of them go through one transformer forward (K x batch
rows). Everything that makes one identity's run is its own: its parameters form their own AdamW param
group (own lr), its gradient is clipped by its own norm, its images/sigmas/noise come from its own
generator. So a batched run computes the same residual as K separate runs (tested), an identity can
stop (plateau, NaN, divergence) while the others go on, and resuming does not depend on batch make-up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refgen import flow
from refgen.artifacts import JsonlLogger, atomic_torch_save, atomic_write_json, drop_metrics_after, provenance
from refgen.identity.qwen_flow import QwenFlowModel, encode_qwen_latents, images_to_tensor, pack
from refgen.identity.render import execution_device, release_text_encoder
from refgen.identity.slots import SLOT_REPEAT
from refgen.images import Identity, center_crop_resize, load_rgb


PARAMETRISATIONS = ("rms_scaled", "free", "tokens")


@dataclass
class InvertConfig:
    base_prompt: str = "a portrait photo of ~ID~, studio lighting"
    negative_prompt: str = " "
    height: int = 768
    width: int = 512
    steps: int = 600
    lr: float = 0.05  # measured on the toy world for every parametrisation (P is unit-scale in tokens and free)
    # "constant", or "cosine" from lr down to lr_min_ratio * lr at `steps`: smaller late steps, so the last steps
    # refine instead of jitter, and a start from a head's guess is not thrown off by full-size first steps. Constant
    # stays the default until the toy-world benchmark says otherwise.
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.1
    weight_decay: float = 0.0  # decay would pull P toward 0, which the normalisation P/RMS(P) undoes anyway
    grad_clip: float = 1.0
    images_per_step: int = 2  # the seed's batch size, per identity
    # K identities per forward. 2 fills an 80 GB H100 at 768x512 (72.8 GiB eager, 64.3 compiled); 4 needs
    # gradient_checkpointing there (44.5 GiB, but slower per identity). Measured: docs/benchmarks.md.
    identities_per_batch: int = 2
    sigma_sampling: str = "uniform"  # or "logit_normal"
    sigma_tail: float = 0.0  # share of sigmas drawn uniform on [sigma_tail_low, 1] instead (flow.sample_sigmas)
    sigma_tail_low: float = 0.95
    true_cfg: float = 1.0  # > 1: optimise through the pipeline's true CFG (two forwards per step)
    # Where the identity lives in the slot window of the encoder output:
    #   rms_scaled  clamp(exp(log_scale)) * P / RMS(P), the seed's parametrisation: bounded, slow to grow
    #   free        P itself, started at init_scale * N(0, 1): any vector, no clamp. The transformer RMS-normalises
    #               text tokens, so what a residual changes is each window token's direction; a bound on its size
    #               bounds how far that direction can turn.
    #   tokens      not on the encoder output: the placeholder's input token embeddings T = T_ph + e * P (e the RMS
    #               of the embedding table, so lr means the same for any text encoder), learnt through the frozen
    #               text encoder (textual inversion). Every token after the slot sees the person too; the text
    #               encoder stays loaded and is back-propagated through. Saved as teacher_tokens.safetensors.
    # Default: tokens, which measured best by far on the toy-world benchmark (docs/benchmarks.md).
    parametrisation: str = "tokens"
    # Each ~ID~ is the placeholder's tokens this many times over (identity/slots.py): more room for the person (what
    # it buys: docs/benchmarks.md, "Wider slots"); 1 is the seed's one placeholder. A start head must be as wide.
    slot_repeat: int = SLOT_REPEAT
    # Prompts (each with exactly one ~ID~) the identity is optimised in besides base_prompt; each image of a step
    # draws one of base_prompt + contexts from the identity's own generator. A residual fitted in one sentence
    # is not read the same in another; scenes and a second person make it hold in the prompts users write.
    contexts: list[str] = field(default_factory=list)
    # Each photo in its own sentence: seed_<id>/prompts.json maps image file names to prompts with one ~ID~
    # ("a photo of ~ID~ on a beach"). What the sentence says (the scene, the light) then need not be learnt into
    # the identity, which is left to hold the person alone (DreamBooth's per-image captions, for inversion).
    image_prompts: bool = False
    init_scale: float = 0.1
    # > 0: from a given start (Inverter.run's `start`, a head's prediction), add start_weight * mean((P - P_start)^2)
    # to each identity's loss, in P's own units (tokens: embedding-table RMS). On the toy world a head on unseen
    # people beats per-person inversion, and inversion from it drifts back down as it fits the few photos
    # (docs/benchmarks.md); this anchors the refinement to the head (1: the measured head-start recipe's weight).
    # No effect on identities started from noise.
    start_weight: float = 1.0
    # > 0: + id_weight * the ID loss (refgen.identity.id_loss) of each image's one-step estimate against the photo,
    # read by the Qwen3-VL vision tower (`refgen invert --vl-model`): the flow loss weighs every pixel of a few
    # photos alike, this what the tower sees of the person. Needs height/width multiples of 32. 0 = off, the steps
    # unchanged.
    id_weight: float = 0.0
    scale_min: float = 0.01
    scale_max: float = 1.5
    rms_weight: float = 0.02
    rms_ema: float = 0.99  # running mean of the per-token slot RMS for the seed's RMS regulariser
    plateau_window: int = 100  # stop when mean loss of the last window improved < plateau_min_improvement
    plateau_min_improvement: float = 0.01
    diverge_steps: int = 50  # smoothed loss rising this many steps in a row = divergence
    loss_smoothing: float = 0.9
    checkpoint_every: int = 200
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the transformer's repeated blocks: 0.60 -> 0.42 s/step at K=2 (H100)
    seed: int = 0
    qa_alphas: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    qa_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    qa_steps: int = 28
    qa_true_cfg: float = 4.0
    qa: bool = True

    def __post_init__(self):
        if self.lr_schedule not in ("constant", "cosine") or not 0 <= self.lr_min_ratio <= 1:
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine' and 0 <= lr_min_ratio <= 1, got "
                             f"{self.lr_schedule!r}, {self.lr_min_ratio}")
        if self.sigma_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"sigma_sampling must be 'uniform' or 'logit_normal', got {self.sigma_sampling!r}")
        flow.check_tail(self.sigma_tail, self.sigma_tail_low)
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height/width must be multiples of 16, got {self.height}x{self.width}")
        if not (0 < self.scale_min <= self.init_scale <= self.scale_max):
            raise ValueError(f"need 0 < scale_min <= init_scale <= scale_max, got {self.scale_min}, "
                             f"{self.init_scale}, {self.scale_max}")
        for name in ("steps", "images_per_step", "identities_per_batch", "plateau_window", "diverge_steps",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, text in [("base_prompt", self.base_prompt)] + [(f"contexts[{i}]", c) for i, c in enumerate(self.contexts)]:
            if text.count("~ID~") != 1:
                raise ValueError(f"{name} must contain exactly one ~ID~: {text!r}")
        if self.image_prompts and self.contexts:
            raise ValueError("image_prompts and contexts are two ways to choose each image's prompt: set one")
        from refgen.identity.slots import check_repeat

        check_repeat(self.slot_repeat)  # SlotError, a ValueError
        if self.parametrisation not in PARAMETRISATIONS:
            raise ValueError(f"parametrisation must be one of {PARAMETRISATIONS}, got {self.parametrisation!r}")
        if not (self.start_weight >= 0 and math.isfinite(self.start_weight)):
            raise ValueError(f"start_weight must be a finite number >= 0, got {self.start_weight}")
        if not (self.id_weight >= 0 and math.isfinite(self.id_weight)):
            raise ValueError(f"id_weight must be a finite number >= 0, got {self.id_weight}")
        if self.id_weight and (self.height % 32 or self.width % 32):
            raise ValueError(f"id_weight needs height/width multiples of 32 (the vision tower's patch 16 x merge 2), "
                             f"got {self.height}x{self.width}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "InvertConfig":
        from refgen.config import from_yaml

        return from_yaml(cls, path, **overrides)


def identity_seed(base_seed: int, identity_id: str) -> int:
    """A per-identity seed that does not depend on which batch or shard the identity lands in."""
    return int(hashlib.sha256(f"{base_seed}:{identity_id}".encode()).hexdigest()[:12], 16)


def shard_identities(identities: list[Identity], index: int, count: int) -> list[Identity]:
    """Round-robin over identities sorted by id: every identity in exactly one of the `count` shards."""
    if not (0 <= index < count):
        raise ValueError(f"shard {index}/{count}: need 0 <= i < n")
    return [ident for j, ident in enumerate(sorted(identities, key=lambda x: x.id)) if j % count == index]


@dataclass
class _State:
    """One identity's optimisation state; everything needed to resume it bit-exactly."""
    ident: Identity
    latents: torch.Tensor  # (N, C, h, w) cached normalised VAE latents
    P: torch.nn.Parameter  # (L, H)
    log_scale: torch.nn.Parameter  # ()
    gen: torch.Generator
    step: int = 0
    lr: float = 0.0
    losses: list[float] = field(default_factory=list)
    smooth: float | None = None
    rising: int = 0
    lr_halved: bool = False
    rms_mean: torch.Tensor | None = None  # (L,)
    stop_reason: str | None = None
    message: str = ""
    adam_state: dict | None = None  # AdamW moments restored from a checkpoint
    started_from: str = "noise"  # or "given" (Inverter.run's start: a head's prediction)
    P_start: torch.Tensor | None = None  # P at a given start, what start_weight anchors to
    means: torch.Tensor | None = None  # (N, D) each photo's vision-tower feature (id_weight > 0)


class Inverter:
    """Runs teacher inversion for identities against one loaded QwenImagePipeline."""

    def __init__(self, pipe, cfg: InvertConfig, out_root: str | Path, model_id: str = "", progress: bool = True,
                 vl=None):
        """`vl`: the VisionFeatures the ID loss reads with (needed when cfg.id_weight > 0, unused otherwise)."""
        from refgen.identity.prompts import encode_prompts, encode_tokenized, tokenize

        if cfg.id_weight and vl is None:
            raise ValueError("id_weight > 0 reads each estimate through the Qwen3-VL vision tower: give the "
                             "Inverter a VisionFeatures (refgen invert --vl-model; in Python "
                             "IdentityPipeline.invert(..., features=VisionFeatures(vl_model)))")
        self.pipe, self.cfg, self.out_root, self.model_id, self.progress = pipe, cfg, Path(out_root), model_id, progress
        self.vl = vl if cfg.id_weight else None
        if self.vl is not None:
            pipe.vae.requires_grad_(False)
        self.device = execution_device(pipe)
        self.dtype = pipe.transformer.dtype
        self.tokens = cfg.parametrisation == "tokens"
        self.base_tp = tokenize(pipe, cfg.base_prompt, 1, cfg.slot_repeat)
        base = encode_tokenized(pipe, [self.base_tp])
        self.E_base, self.slot = base.embeds, base.slots[0][0]  # (1, S, H), Slot
        self.ctx, self.bank_tps = None, None
        if cfg.contexts or (self.tokens and not cfg.image_prompts):  # base_prompt is context 0
            self.ctx = self._prompt_bank([cfg.base_prompt] + list(cfg.contexts), "contexts")
        if self.tokens:
            from refgen.identity.render import moved_by_hooks
            from refgen.identity.tokens import embed_rms, placeholder_embeds

            te = pipe.text_encoder
            if moved_by_hooks(te):
                raise ValueError("parametrisation 'tokens' back-propagates through the text encoder every step, which "
                                 "model CPU offload moves off the GPU as soon as the transformer runs: use --offload "
                                 "none (with gradient_checkpointing on smaller cards), or parametrisation 'free' or "
                                 "'rms_scaled' (a residual on the encoder output) under offload")
            te.requires_grad_(False)
            te.eval()
            self.te_dtype = te.dtype
            self.T_ph = placeholder_embeds(pipe, cfg.slot_repeat).to(self.device)  # (L, H_in)
            self.emb_rms = embed_rms(pipe)
        self.neg = None
        if cfg.true_cfg > 1 or (cfg.qa and cfg.qa_true_cfg > 1):
            ne = encode_prompts(pipe, cfg.negative_prompt)
            self.neg = (ne.embeds, ne.mask)
        # The text encoder is needed for nothing else: off the GPU with it (Qwen2.5-VL-7B is ~16 GB in bf16).
        # With image_prompts it first encodes the photos' own prompts, in run(); with tokens it runs every step.
        if not cfg.image_prompts and not self.tokens:
            release_text_encoder(pipe)
        self.image_rows: dict[str, torch.Tensor] = {}  # identity id -> bank row of each of its images
        tr = pipe.transformer
        tr.requires_grad_(False)
        tr.eval()
        if cfg.gradient_checkpointing:
            tr.enable_gradient_checkpointing()
        if cfg.compile:
            tr.compile_repeated_blocks(fullgraph=True)
        self.vae_scale = 2 ** len(pipe.vae.temperal_downsample)
        self.latent_hw = (cfg.height // self.vae_scale, cfg.width // self.vae_scale)
        self.model = QwenFlowModel(tr, self.latent_hw, cfg.true_cfg, self.neg)

    # ---- paths -------------------------------------------------------------------------------------
    def dir(self, ident: Identity) -> Path:
        return self.out_root / ident.id

    def is_complete(self, ident: Identity) -> bool:
        return (self.dir(ident) / "teacher.json").exists()  # written last, atomically

    def run(self, identities: list[Identity], start: dict[str, torch.Tensor] | None = None) -> list[dict]:
        """Invert every identity of `identities` that is not complete, K (identities_per_batch) per forward;
        returns the records of those it inverted. The one loop behind `refgen invert`, the toy benchmark and
        the demo. `start` (identity id -> what `residual` returns: (L, H), or (L, H_in) tokens) starts those
        identities there instead of near the placeholder, e.g. from a head's prediction."""
        todo = [i for i in identities if not self.is_complete(i)]
        if self.cfg.image_prompts:
            self.encode_image_prompts(todo)
        records = []
        K = self.cfg.identities_per_batch
        for b in range(0, len(todo), K):
            batch = todo[b:b + K]
            states = [self._new_state(i, (start or {}).get(i.id)) for i in batch]
            records += [self.finish(s) for s in self.run_batch(batch, states)]
        return records

    def encode_image_prompts(self, identities: list[Identity]) -> None:
        """Encode every photo's own prompt (seed_<id>/prompts.json) into one padded bank, then release the text
        encoder. All identities of the run at once: the text encoder leaves the GPU after this."""
        texts, rows = [], {}
        for ident in identities:
            f = ident.path / "prompts.json"
            if not f.is_file():
                raise ValueError(f"{ident.id}: image_prompts needs {f} ({{image file name: prompt with one ~ID~}})")
            table = json.loads(f.read_text())
            missing = [p.name for p in ident.images if p.name not in table]
            if missing:
                raise ValueError(f"{f}: no prompt for {missing}")
            for p in ident.images:
                if table[p.name].count("~ID~") != 1:
                    raise ValueError(f"{f}: the prompt of {p.name} must contain exactly one ~ID~: {table[p.name]!r}")
            rows[ident.id] = torch.arange(len(texts), len(texts) + len(ident.images))
            texts += [table[p.name] for p in ident.images]
        if not texts:
            return
        self.ctx = self._prompt_bank(texts, "image prompts")
        self.image_rows = rows
        if not self.tokens:
            release_text_encoder(self.pipe)

    def _prompt_bank(self, texts: list[str], what: str) -> tuple:
        """(embeds (P, S, H), mask (P, S) int64, window start (P,)): prompts with one ~ID~ each, one padded batch.
        Every window must have base_prompt's length L: the residual is (L, H)."""
        from refgen.identity.prompts import encode_tokenized, tokenize

        tps = [tokenize(self.pipe, t, 1, self.cfg.slot_repeat) for t in texts]
        enc = encode_tokenized(self.pipe, tps)
        if self.tokens:  # the rows are encoded again every step, with the identity's tokens in the window
            self.bank_tps = tps
        if {sl[0].length for sl in enc.slots} != {self.slot.length}:
            raise ValueError(f"~ID~ has different window lengths in the {what} than in base_prompt "
                             f"({self.slot.length}): {[sl[0] for sl in enc.slots]}")
        return (enc.embeds, enc.mask.to(self.device),
                torch.tensor([sl[0].start for sl in enc.slots], device=self.device))

    def settings_diff(self, ident: Identity) -> dict:
        """{key: (recorded, now)} where a complete identity's teacher.json differs from this run's settings
        (model or any InvertConfig key that changes the optimisation); {} when it matches or is not complete.
        A complete record made under other settings must not be passed off as this run's result."""
        f = self.dir(ident) / "teacher.json"
        if not f.exists():
            return {}
        rec = json.loads(f.read_text())
        now = json.loads(json.dumps(dataclasses.asdict(self.cfg)))  # as recorded: tuples become lists
        now = {k: v for k, v in now.items() if k not in _RESUMABLE}
        was = {**_BEFORE_KEY, **{k: v for k, v in (rec.get("config") or {}).items() if k not in _RESUMABLE}}
        d = _diff(was, now)
        if rec.get("model") != self.model_id:
            d["model"] = (rec.get("model"), self.model_id)
        return d

    def refuse_stale(self, identities: list[Identity]) -> None:
        """ValueError naming the complete identities whose teacher.json was made with other settings: their
        residuals must not be reported as this run's."""
        stale = {i.id: d for i in identities if (d := self.settings_diff(i))}
        if stale:
            first = next(iter(stale))
            raise ValueError(f"{len(stale)} identities under {self.out_root} were inverted with other settings "
                             f"({first}: {', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in stale[first].items())}); "
                             "delete their teacher.json to redo them with these settings, or use another output "
                             "folder (--out)")

    # ---- state -------------------------------------------------------------------------------------
    def _new_state(self, ident: Identity, start: torch.Tensor | None = None) -> _State:
        images = [center_crop_resize(load_rgb(p), self.cfg.width, self.cfg.height) for p in ident.images]
        latents = encode_qwen_latents(self.pipe.vae, images, device=self.device)  # (N, C, h, w)
        gen = torch.Generator("cpu").manual_seed(identity_seed(self.cfg.seed, ident.id))
        L, H = self.slot.length, self.E_base.shape[2]
        if self.tokens:
            H = self.T_ph.shape[1]
        P = torch.randn(L, H, generator=gen)
        if self.cfg.parametrisation in ("free", "tokens"):  # start small, near the placeholder's own
            P = P * self.cfg.init_scale
        log_scale = math.log(self.cfg.init_scale)
        if start is not None:  # after the draw above, so the identity's noise stream is the same either way
            P, log_scale = self._params_for(start, ident.id)
        P = torch.nn.Parameter(P.to(self.device, torch.float32))
        ls = torch.nn.Parameter(torch.tensor(log_scale, device=self.device))
        st = _State(ident, latents, P, ls, gen, lr=self.cfg.lr, started_from="noise" if start is None else "given",
                    P_start=None if start is None else P.detach().clone())
        if self.vl is not None:  # the photos as the ID loss sees its estimates: at the inversion's size
            with torch.no_grad():
                st.means = self.vl.pixel_means((images_to_tensor(images)[:, :, 0] + 1) / 2)  # (N, D)
        ckpt = self.dir(ident) / "teacher_ckpt.pt"
        if ckpt.exists():
            self._load_ckpt(st, ckpt)
            # steps after the checkpoint were logged by the killed run and are about to be replayed
            drop_metrics_after(self.dir(ident) / "teacher_metrics.jsonl", st.step)
            if self.progress:
                print(f"{ident.id}: resuming from step {st.step} ({ckpt})")
        return st

    def _params_for(self, start: torch.Tensor, name: str) -> tuple[torch.Tensor, float]:
        """(P, log_scale) whose `residual` is `start` (rms_scaled: up to its scale clamp)."""
        want = (self.slot.length, self.T_ph.shape[1] if self.tokens else self.E_base.shape[2])
        if tuple(start.shape) != want or not torch.isfinite(start).all():
            raise ValueError(f"{name}: start has shape {tuple(start.shape)} (finite: {bool(torch.isfinite(start).all())}); "
                             f"parametrisation {self.cfg.parametrisation!r} starts from a finite {want} tensor")
        start = start.detach().to("cpu", torch.float32)
        if self.tokens:
            return (start - self.T_ph.cpu()) / self.emb_rms, math.log(self.cfg.init_scale)
        if self.cfg.parametrisation == "free":
            return start.clone(), math.log(self.cfg.init_scale)
        rms = start.pow(2).mean().sqrt().item()
        return start.clone(), math.log(min(max(rms, self.cfg.scale_min), self.cfg.scale_max))

    def residual(self, st: _State) -> torch.Tensor:
        """(L, H) float32: clamp(exp(log_scale)) * P / RMS(P), or P itself (parametrisation 'free'); with
        'tokens' the learnt input token embeddings (L, H_in) T_ph + e * P."""
        if self.cfg.parametrisation == "free":
            return st.P
        if self.tokens:
            return self.T_ph + self.emb_rms * st.P
        scale = st.log_scale.exp().clamp(self.cfg.scale_min, self.cfg.scale_max)
        return scale * st.P / st.P.pow(2).mean().add(1e-12).sqrt()

    def _ckpt_dict(self, st: _State, opt: torch.optim.Optimizer) -> dict:
        return {"step": st.step, "P": st.P.detach().cpu(), "log_scale": st.log_scale.detach().cpu(),
                "adam": {k: [opt.state[p].get(k) for p in (st.P, st.log_scale)] for k in ("step", "exp_avg", "exp_avg_sq")},
                "gen": st.gen.get_state(), "lr": st.lr, "losses": st.losses, "smooth": st.smooth,
                "rising": st.rising, "lr_halved": st.lr_halved, "rms_mean": st.rms_mean,
                "P_start": None if st.P_start is None else st.P_start.cpu(), "config": dataclasses.asdict(self.cfg)}

    def _load_ckpt(self, st: _State, path: Path) -> None:
        d = torch.load(path, map_location="cpu", weights_only=False)
        diff = {k: v for k, v in _diff({**_BEFORE_KEY, **d["config"]}, dataclasses.asdict(self.cfg)).items()
                if k not in _RESUMABLE}
        if diff:
            raise ValueError(f"{path}: checkpoint was made with another config; delete it or rerun with the same "
                             f"config (differences: {diff})")
        with torch.no_grad():
            st.P.copy_(d["P"].to(self.device))
            st.log_scale.copy_(d["log_scale"].to(self.device))
        st.gen.set_state(d["gen"])
        st.step, st.lr, st.losses, st.smooth = d["step"], d["lr"], d["losses"], d["smooth"]
        st.rising, st.lr_halved = d["rising"], d["lr_halved"]
        st.rms_mean = None if d["rms_mean"] is None else d["rms_mean"].to(self.device)
        if d.get("P_start") is not None:  # the start this run was anchored to, whatever start is given now
            st.P_start, st.started_from = d["P_start"].to(self.device), "given"
        st.adam_state = d["adam"]

    # ---- one batch of identities ---------------------------------------------------------------------
    def run_batch(self, idents: list[Identity], states: list[_State] | None = None) -> list[_State]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        states = states or [self._new_state(i) for i in idents]
        opt = torch.optim.AdamW([{"params": [s.P, s.log_scale], "lr": s.lr} for s in states],
                                lr=cfg.lr, weight_decay=cfg.weight_decay)
        for s in states:  # restore AdamW moments after a resume
            ad = s.adam_state
            for j, p in enumerate((s.P, s.log_scale)):
                if ad and ad["step"][j] is not None:  # log_scale has no moments where it is unused ('tokens', 'free')
                    opt.state[p] = {k: ad[k][j].to(p.device) if k != "step" else ad[k][j] for k in ad}
        loggers = {s.ident.id: JsonlLogger(self.dir(s.ident) / "teacher_metrics.jsonl") for s in states}
        active = [s for s in states if s.stop_reason is None and s.step < cfg.steps]
        for s in states:
            if s.stop_reason is None and s.step >= cfg.steps:
                s.stop_reason = "max_steps"
        bar = tqdm(total=cfg.steps, initial=min(s.step for s in states), desc=f"invert x{len(states)}",
                   disable=not self.progress, unit="step")
        while active:
            for g, s in zip(opt.param_groups, states):  # one group per identity, in `states` order
                g["lr"] = s.lr * self.lr_factor(s.step)
            losses, metrics = self._step(active, opt)
            for s, loss, m in zip(list(active), losses, metrics):
                self._after_step(s, loss, m, opt, loggers[s.ident.id])
                if s.stop_reason is None and (s.step % cfg.checkpoint_every == 0):
                    atomic_torch_save(self._ckpt_dict(s, opt), self.dir(s.ident) / "teacher_ckpt.pt")
            active = [s for s in active if s.stop_reason is None]
            bar.n = min([s.step for s in active], default=cfg.steps)
            bar.set_postfix(active=len(active), loss=f"{sum(s.smooth or 0 for s in states) / len(states):.4f}")
            bar.refresh()
        bar.close()
        return states

    def lr_factor(self, step: int) -> float:
        """The schedule's multiplier of an identity's lr at `step` (its own lr may have been halved)."""
        cfg = self.cfg
        if cfg.lr_schedule == "constant":
            return 1.0
        p = min(1.0, step / max(1, cfg.steps))
        return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    def _step(self, active: list[_State], opt) -> tuple[list[float], list[dict]]:
        """One optimisation step of every active identity; (loss (K), metrics (K)) read back once."""
        cfg, n = self.cfg, self.cfg.images_per_step
        x0, noise, sigma, c, picks = self._draw(active)
        R = torch.stack([self.residual(s) for s in active])  # (K, L, H) float32, or (K, L, H_in) tokens
        E, M, E0, win = self._embeds(R, c, n)
        per, x_t, v = flow.loss_and_prediction(self.model, x0, (E, M), sigma=sigma, noise=noise)
        per_id = per.view(len(active), n).mean(1)  # (K,)
        tok_rms = R.pow(2).mean(-1).sqrt()  # (K, L) per-token RMS of what is learnt
        reg = []
        for k, s in enumerate(active):
            ref = tok_rms[k].detach() if s.rms_mean is None else s.rms_mean
            reg.append((tok_rms[k] - ref).abs().mean())
        reg = torch.stack(reg)
        total = per_id + cfg.rms_weight * reg  # (K,)
        zero = torch.zeros((), device=self.device)
        ident = torch.zeros_like(per_id)
        if cfg.id_weight:
            from refgen.identity.id_loss import id_loss

            means = torch.cat([s.means[i.to(s.means.device)] for s, i in zip(active, picks)])  # (K*n, D)
            ident = id_loss(self.pipe.vae, self.vl, flow.predict_x0(x_t, v, sigma), self.latent_hw,
                            means).view(len(active), n).mean(1)
            total = total + cfg.id_weight * ident
        anchor = torch.stack([(s.P - s.P_start).pow(2).mean() if s.P_start is not None else zero
                              for s in active])  # (K,) mean squared distance from the given start
        if cfg.start_weight:
            total = total + cfg.start_weight * anchor
        finite = torch.isfinite(total) & torch.isfinite(torch.stack([s.log_scale for s in active]))
        ok = finite.tolist()  # one host sync for the whole batch, not one per identity
        opt.zero_grad(set_to_none=True)
        if any(ok):
            total[finite].sum().backward()  # params are disjoint: each identity gets its own gradient
        self._clip_each(active, ok)
        opt.step()
        with torch.no_grad():
            # per-identity metrics as (K,) tensors, read back to the host once per step
            delta = (E[::n].float() - E0[::n].float())  # (K, S, H): what the model actually saw
            w = win[::n, :, None]
            off = delta.masked_fill(w, 0)
            log_scale = torch.stack([s.log_scale.detach() for s in active])  # (K,)
            cols = torch.stack([per_id.detach(), reg.detach(), delta.pow(2).mean((1, 2)).sqrt(),
                                (delta.masked_fill(~w, 0).pow(2).sum((1, 2)) / (self.slot.length * delta.shape[2])).sqrt(),
                                off.pow(2).mean((1, 2)).sqrt(),
                                log_scale.exp().clamp(cfg.scale_min, cfg.scale_max), log_scale,
                                anchor.detach().sqrt(), ident.detach(), total.detach()], 1).tolist()  # (K, 10)
            for k, s in enumerate(active):
                s.rms_mean = tok_rms[k].detach() if s.rms_mean is None else (
                    cfg.rms_ema * s.rms_mean + (1 - cfg.rms_ema) * tok_rms[k].detach())
        metrics = [dict(zip(("mse", "rms_reg", "total_rms", "slot_rms", "offslot_rms", "scale", "log_scale",
                             "start_dist", "id"), c[:9])) for c in cols]
        return [c[9] for c in cols], metrics

    def _draw(self, active: list[_State]) -> tuple:
        """(x0 (K*n, N_tok, 4C), noise, sigma (K*n,), prompt-bank row per image (K*n,) or None, each identity's
        photo numbers [(n,)]). Each identity draws from its own generator, in a fixed order: batch make-up does not
        change what it sees."""
        cfg, n = self.cfg, self.cfg.images_per_step
        x0s, noises, sigmas, ctx_idx, picks = [], [], [], [], []
        for s in active:
            idx = torch.randint(0, s.latents.shape[0], (n,), generator=s.gen)
            picks.append(idx)
            x0 = s.latents[idx]
            noises.append(torch.randn(x0.shape, generator=s.gen))
            sigmas.append(flow.sample_sigmas(n, cfg.sigma_sampling, tail=cfg.sigma_tail, tail_low=cfg.sigma_tail_low,
                                             generator=s.gen))
            if cfg.image_prompts:
                if s.ident.id not in self.image_rows:
                    raise RuntimeError(f"{s.ident.id}: image prompts not encoded; invert through Inverter.run()")
                ctx_idx.append(self.image_rows[s.ident.id][idx])  # each photo with its own sentence
            elif self.ctx is not None:
                ctx_idx.append(torch.randint(0, self.ctx[0].shape[0], (n,), generator=s.gen))
            x0s.append(x0)
        x0 = torch.cat(x0s)
        noise = pack(torch.cat(noises).to(x0))  # one host-to-device copy for the batch
        return pack(x0), noise, torch.cat(sigmas).to(self.device), torch.cat(ctx_idx) if ctx_idx else None, picks

    def _embeds(self, R: torch.Tensor, c: torch.Tensor | None, n: int) -> tuple:
        """(E (K*n, S, H) with each identity in its rows' prompts, mask or None, E0 the prompts as written, window
        mask (K*n, S)). c: each row's prompt-bank row (None: every row is base_prompt)."""
        from refgen.identity.inject import inject
        from refgen.identity.prompts import encode_tokenized

        Rn = R.to(self.te_dtype if self.tokens else self.dtype).repeat_interleave(n, 0)  # (K*n, L, H or H_in)
        if c is None:
            E0 = self.E_base.expand(R.shape[0] * n, -1, -1)
            win = torch.zeros(E0.shape[:2], dtype=torch.bool, device=self.device)
            win[:, self.slot.start:self.slot.start + self.slot.length] = True
            return inject(E0, [self.slot], [Rn], [1.0]), None, E0, win  # (K*n, S, H)
        if self.tokens:  # the text encoder reads the identity's tokens in each row's own prompt
            enc = encode_tokenized(self.pipe, [self.bank_tps[i] for i in c.tolist()], self.device, self.dtype, [Rn])
            E, M = enc.embeds, enc.mask
        c = c.to(self.device)
        pos = self.ctx[2][c][:, None] + torch.arange(self.slot.length, device=self.device)  # (K*n, L)
        rows = torch.arange(pos.shape[0], device=self.device)[:, None].expand_as(pos)
        if self.tokens:
            E0 = self.ctx[0][c][:, :E.shape[1]]  # the placeholder as written, for the metrics
        else:  # each row its own context: its slot starts elsewhere, so add R at per-row window positions
            E0, M = self.ctx[0][c], self.ctx[1][c]
            E = E0.index_put((rows, pos), Rn, accumulate=True)
        win = torch.zeros(E0.shape[:2], dtype=torch.bool, device=self.device)
        win[rows, pos] = True
        return E, M, E0, win

    def _clip_each(self, active: list[_State], ok: list[bool]) -> None:
        """Clip each identity's gradient by its own norm; identities whose loss was not finite take no step."""
        with torch.no_grad():
            for k, s in enumerate(active):
                if not ok[k]:
                    s.P.grad = None
                    s.log_scale.grad = None
                    continue
                grads = [p.grad for p in (s.P, s.log_scale) if p.grad is not None]
                norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads))
                coef = (self.cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0)
                for g in grads:
                    g.mul_(coef)

    def _after_step(self, s: _State, loss: float, m: dict, opt, log: JsonlLogger) -> None:
        cfg = self.cfg
        s.step += 1
        if not math.isfinite(loss) or not math.isfinite(m["scale"]) or not math.isfinite(m["log_scale"]):
            s.stop_reason = "nan"
            s.message = (f"{s.ident.id}: non-finite loss/scale at step {s.step} (loss={loss}, scale={m['scale']}); "
                         "stopped. Try a lower lr, lower true_cfg, or fp32.")
            print(f"refgen invert: {s.message}")
            log.log(step=s.step, loss=loss, lr=s.lr, stop="nan", **m)
            return
        s.losses.append(loss)
        prev = s.smooth
        s.smooth = loss if prev is None else cfg.loss_smoothing * prev + (1 - cfg.loss_smoothing) * loss
        s.rising = s.rising + 1 if prev is not None and s.smooth > prev else 0
        log.log(step=s.step, loss=loss, lr=s.lr * self.lr_factor(s.step - 1), **m)
        if s.rising >= cfg.diverge_steps:
            if not s.lr_halved:
                s.lr /= 2
                s.lr_halved, s.rising = True, 0
                for g in opt.param_groups:
                    if g["params"][0] is s.P:
                        g["lr"] = s.lr
                print(f"refgen invert: {s.ident.id}: loss rose {cfg.diverge_steps} steps in a row; lr halved to {s.lr:g}")
            else:
                s.stop_reason = "diverged"
                s.message = f"loss rose {cfg.diverge_steps} steps in a row again after halving the lr"
                return
        w = cfg.plateau_window
        if len(s.losses) >= 2 * w:
            cur, before = sum(s.losses[-w:]) / w, sum(s.losses[-2 * w:-w]) / w
            if before > 0 and (before - cur) / before < cfg.plateau_min_improvement:
                s.stop_reason = "plateau"
                return
        if s.step >= cfg.steps:
            s.stop_reason = "max_steps"

    @torch.no_grad()
    def eval_loss(self, st: _State, R: torch.Tensor | None, n_sigmas: int = 8) -> float:
        """Flow-matching loss on a fixed set (every image x n_sigmas evenly spaced sigmas, noise from a fixed
        seed): a noise-free number to compare the teacher residual against the bare base prompt (R=None)."""
        g = torch.Generator("cpu").manual_seed(identity_seed(self.cfg.seed + 1, st.ident.id))
        x0 = st.latents.repeat_interleave(n_sigmas, 0)
        noise = torch.randn(x0.shape, generator=g).to(x0)
        sigma = torch.linspace(0.05, 0.95, n_sigmas).repeat(st.latents.shape[0]).to(self.device)
        E = self.base_embeds(R).expand(x0.shape[0], -1, -1)
        per = [flow.loss(self.model, pack(x0[i:i + 8]), (E[i:i + 8], None), sigma=sigma[i:i + 8],
                         noise=pack(noise[i:i + 8]), reduction="none") for i in range(0, x0.shape[0], 8)]
        return torch.cat(per).mean().item()

    def base_embeds(self, R: torch.Tensor | None) -> torch.Tensor:
        """(1, S, H) base_prompt's embeddings as the optimisation saw them: R rounded to the model's dtype and
        added in that dtype (inject), or the tokens read by the text encoder; R None: the bare base prompt."""
        if R is None:
            return self.E_base
        if self.tokens:
            from refgen.identity.prompts import encode_tokenized

            return encode_tokenized(self.pipe, [self.base_tp], self.device, self.dtype,
                                    [R[None].to(self.device, self.te_dtype)]).embeds
        from refgen.identity.inject import inject

        return inject(self.E_base, [self.slot], [R.to(self.device, self.dtype)], [1.0])

    # ---- artifacts ------------------------------------------------------------------------------------
    def finish(self, s: _State) -> dict:
        """teacher_prompt_embeds.pt, teacher_residual.safetensors (teacher_tokens.safetensors with 'tokens'),
        alpha_eval/, then teacher.json (last)."""
        from refgen.identity.inject import residual_metadata, save_residual
        from refgen.identity.render import RenderConfig, render_grid

        d = self.dir(s.ident)
        cfg = self.cfg
        with torch.no_grad():
            R = self.residual(s).detach()  # (L, H) float32
            if not torch.isfinite(R).all():
                R = None
        record = provenance(cfg, kind="teacher", identity=s.ident.id, model=self.model_id,
                            images=[str(p) for p in s.ident.images], S=self.E_base.shape[1], H=self.E_base.shape[2],
                            L=self.slot.length, s=self.slot.start, dtype=str(self.dtype).replace("torch.", ""),
                            scheduler=type(self.pipe.scheduler).__name__, true_cfg=cfg.true_cfg,
                            steps_run=s.step, stop_reason=s.stop_reason, message=s.message,
                            started_from=s.started_from,
                            final_loss=(sum(s.losses[-10:]) / len(s.losses[-10:])) if s.losses else None,
                            first_loss=(sum(s.losses[:10]) / len(s.losses[:10])) if s.losses else None,
                            scale=float(s.log_scale.detach().exp().clamp(cfg.scale_min, cfg.scale_max))
                            if R is not None else None,
                            eval_loss_base=self.eval_loss(s, None), eval_loss_teacher=self.eval_loss(s, R) if R is not None else None)
        if R is not None:
            # The embeddings the model was optimised on: R rounded to the model's dtype, then added in that dtype
            # (the training step's inject), not E + R in fp32 rounded once; or the tokens read by the encoder.
            E_t = self.base_embeds(R).detach().cpu()
            atomic_torch_save(E_t, d / "teacher_prompt_embeds.pt")
            atomic_torch_save(self.E_base.detach().cpu(), d / "base_prompt_embeds.pt")
            extra = {"identity": s.ident.id, "base_prompt": cfg.base_prompt, "slot_start": str(self.slot.start)}
            delta = E_t.float() - self.E_base.detach().cpu().float()  # (1, S, H)
            win = torch.zeros(delta.shape[1], dtype=torch.bool)
            win[self.slot.start:self.slot.start + self.slot.length] = True
            record.update(teacher_prompt_embeds="teacher_prompt_embeds.pt", slot_rms=delta[:, win].pow(2).mean().sqrt().item(),
                          offslot_rms=delta[:, ~win].pow(2).mean().sqrt().item() if (~win).any() else 0.0)
            if self.tokens:
                from refgen.identity.tokens import save_tokens, token_metadata

                save_tokens(d / "teacher_tokens.safetensors", R, self.T_ph,
                            token_metadata(self.pipe, self.model_id, extra, cfg.slot_repeat))
                record.update(tokens="teacher_tokens.safetensors",
                              token_shift_rms=((R - self.T_ph).pow(2).mean().sqrt() / self.emb_rms).item())
            else:
                save_residual(d / "teacher_residual.safetensors", R,
                              residual_metadata(self.pipe, self.model_id, extra, cfg.slot_repeat))
                record.update(residual="teacher_residual.safetensors")
            if cfg.qa:
                rc = RenderConfig(prompt=cfg.base_prompt, alphas=cfg.qa_alphas, seeds=cfg.qa_seeds, steps=cfg.qa_steps,
                                  true_cfg=cfg.qa_true_cfg, negative_prompt=cfg.negative_prompt, height=cfg.height,
                                  width=cfg.width)
                if self.tokens:
                    render_grid(self.pipe, rc, [], d / "alpha_eval", progress=self.progress, neg=self.neg, tokens=[R])
                else:
                    render_grid(self.pipe, rc, [R.to(self.device, self.dtype)], d / "alpha_eval", progress=self.progress,
                                encoded=(self.E_base, torch.ones(self.E_base.shape[:2], dtype=torch.long,
                                                                 device=self.device), [self.slot]), neg=self.neg)
                record["alpha_eval"] = "alpha_eval/grid.png"
        atomic_write_json(d / "teacher.json", record)
        ck = d / "teacher_ckpt.pt"
        if ck.exists():
            ck.unlink()  # complete: teacher.json is the record now
        return record


def teacher_file(identity_dir: str | Path) -> Path:
    """The identity file a complete inversion wrote into `identity_dir` (teacher_tokens.safetensors or
    teacher_residual.safetensors, as its teacher.json records); an error naming the folder if it has none."""
    d = Path(identity_dir)
    f = d / "teacher.json"
    if not f.is_file():
        raise FileNotFoundError(f"{d}: no teacher.json (not inverted, or not finished)")
    rec = json.loads(f.read_text())
    made = rec.get("tokens") or rec.get("residual")
    if not made:
        raise ValueError(f"{d}: the inversion stopped without a result ({rec.get('stop_reason')}: {rec.get('message')})")
    return d / made


# Settings that do not change one identity's optimisation: a run may resume under other values
# (e.g. a worker with a smaller GPU picks a smaller K).
_RESUMABLE = {"identities_per_batch", "gradient_checkpointing", "checkpoint_every", "compile"}


# Settings added after teachers were made, with what those teachers ran with: a record without the key is not stale
# when the run asks for that value.
_BEFORE_KEY = {"lr_schedule": "constant", "lr_min_ratio": 0.1, "start_weight": 0.0}


def _diff(a: dict, b: dict) -> dict:
    return {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}


def check_invert_offload(offload: str) -> None:
    """Inversion runs with every component on the GPU or under model offload, not under group offload."""
    if offload not in ("none", "model"):
        raise ValueError(f"invert supports --offload none or model, not {offload!r} (group offload sends each "
                         "layer's weights back to the CPU after its forward, and the backward pass needs them)")


def distributed_shard() -> tuple[int, int]:
    """(rank, world) under torchrun, (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def invert(root: str | Path, model: str, out: str | Path | None = None, only: list[str] | None = None,
           shard: tuple[int, int] = (0, 1), cfg: InvertConfig | None = None, device: str | None = None,
           dtype: str = "bf16", progress: bool = True, offload: str = "none", start_head: str | None = None,
           vl_model: str | None = None) -> list[dict]:
    """`refgen invert`: scan ROOT, pick this worker's identities, skip complete ones, invert the rest.

    vl_model is the Qwen3-VL model that the start head's features come from, and that reads the estimates of
    cfg.id_weight > 0 (the ID loss).
    start_head (with vl_model): each identity starts from the head's
    prediction from all of its photos instead of noise (`refgen train-head`; its output must be what
    cfg.parametrisation optimises), anchored to it by cfg.start_weight. On the toy world 150 steps from a head
    give what 1,500 give from noise (docs/benchmarks.md), so set cfg.steps accordingly.

    offload "model" (diffusers' model CPU offload) keeps only the running component on the GPU: the text
    encoder while the prompts are encoded, then the transformer, so a 48 GB card can invert (with
    gradient checkpointing; measured peaks in docs/benchmarks.md). Group offload is refused: the backward
    pass needs every layer's weights after its forward hook has already sent them back to the CPU."""
    from refgen.images import scan
    from refgen.pipeline import IdentityPipeline

    cfg = cfg or InvertConfig()
    res = scan(root)
    idents = res.identities
    if only:
        known = {i.id for i in idents}
        missing = [o for o in only if o not in known]
        if missing:
            raise ValueError(f"--only names identities that are not valid folders under {root}: {missing}")
        idents = [i for i in idents if i.id in set(only)]
    rank, world = distributed_shard()
    if world > 1:  # torchrun: one process per GPU, each its own slice of the shard
        if device in (None, "cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(torch.device(device))
        shard = (shard[0] * world + rank, shard[1] * world)
    idents = shard_identities(idents, *shard)
    out_root = Path(out or root)
    check_invert_offload(offload)
    if start_head:
        from refgen.identity.head import check_start_head

        check_start_head(start_head, cfg.parametrisation, cfg.slot_repeat)  # before any model loads
    if cfg.id_weight and not vl_model:
        raise ValueError("id_weight > 0 needs --vl-model: the Qwen3-VL model whose vision tower reads the person")
    ip = IdentityPipeline.from_pretrained(model, device=device, dtype=dtype, offload=offload)
    vl = None
    if cfg.id_weight:
        from refgen.identity.features import VisionFeatures

        vl = VisionFeatures(vl_model, str(execution_device(ip.pipe)), dtype)
    start = None
    if start_head:  # features + head are ~0.04 s per identity at full size: predict them all, then free the tower
        ip.load_head(start_head, vl_model)
        start = {i.id: ip.residual_from_refs(i.images).tensor for i in idents}
        ip.features = ip.head = None
    return ip.invert_identities(idents, cfg, out_root, progress=progress, start=start,
                                label=f"refgen invert: shard {shard[0]}/{shard[1]}", vl=vl)
