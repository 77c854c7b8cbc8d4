"""Loading Qwen-Image under the device policy, and rendering with injected slot residuals.

Rendering goes through diffusers' own QwenImagePipeline with `prompt_embeds`/`prompt_embeds_mask`
(and negative embeds for true CFG). An alpha x seed grid is one prompt encoded once, then batched:
each pipeline call renders `batch_size` images of the grid, each row with its own alpha and its own
seeded generator, so an image depends on (alpha, seed) and not on which batch it fell into.

With true CFG the pipeline runs two transformer forwards per step (prompt, then negative prompt).
`RenderConfig.cfg_batch` runs both in ONE forward of 2B rows instead (`sample_batched_cfg`): the same
scheduler, latents, guidance formula and decoder as the pipeline, so the images equal the pipeline's up to
the float rounding of a larger batch (tested); what it buys on an H100 is in docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refgen.hub import require_model
from refgen.identity.sampling import GRID_SEEDS, SamplingConfig
from refgen.runtime import (check_cpu_size, check_dtype_for_model, check_tensors, diffusers_dtype_kwargs, parse_dtype,
                            resolve_device)


OFFLOAD_MODES = ("none", "model", "group")


def load_pipeline(model: str, device: str | None = None, dtype: str = "bf16", offload: str = "none",
                  compile: bool = False):
    """QwenImagePipeline on `device`/`dtype` under the policy: CUDA unless 'cpu' is asked for, and then
    only for models under 200M parameters (counted from the configs before any weight is loaded).

    offload (for cards smaller than the ~56 GiB everything-on-GPU needs; peaks in docs/benchmarks.md):
      none   every component on the GPU;
      model  diffusers' model CPU offload: each component moves to the GPU while it runs (the 41 GB
             transformer alone is resident while denoising);
      group  the transformer streams in block by block (diffusers' group offload, block level, on a CUDA
             stream from pinned host memory); text encoder and VAE stay on the GPU, and render/generate
             release the text encoder once the prompts are encoded. For 24 GB cards; bound by
             host-to-device copies. The text encoder is not group-offloaded: pinning all 58 GB at once
             needs about twice that in host memory while the copies are made.
    compile: `torch.compile` of the transformer's repeated blocks (diffusers' regional compilation: one
      block compiled once, reused by all 60), paid for once per process and shape.
    """
    from diffusers import QwenImagePipeline

    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
    dev = resolve_device(device)
    dt = parse_dtype(dtype)
    check_dtype_for_model(dt, "qwen-image")
    require_model(model, "Qwen-Image model")
    if dev.type == "cpu":
        check_cpu_size(_count_params(model), dev, what=f"Qwen-Image model {model!r}")
        if offload != "none":
            raise ValueError(f"--offload {offload} moves weights between the CPU and a GPU; it needs --device cuda")
    pipe = QwenImagePipeline.from_pretrained(model, **diffusers_dtype_kwargs(dt))
    place(pipe, dev, offload)
    if compile:
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def place(pipe, device: torch.device, offload: str = "none") -> None:
    """Put a pipeline on `device` by one of OFFLOAD_MODES (`offload_mode` reads the choice back from the pipeline)."""
    if offload == "none":
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "group":
        pipe.transformer.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                              offload_type="block_level", num_blocks_per_group=1, use_stream=True)
        pipe.text_encoder.to(device)
        pipe.vae.to(device)
    else:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")


def execution_device(pipe) -> torch.device:
    """Where `pipe`'s models compute: the GPU under offload even while weights sit on the CPU. The one place refgen
    reads diffusers' private `_execution_device` (tests/identity/test_prompts_render.py fails if diffusers drops it)."""
    return pipe._execution_device


def moved_by_hooks(module) -> bool:
    """True when accelerate's hooks (diffusers' model or sequential CPU offload) bring `module` to the execution
    device whenever it runs, so where its weights sit now says nothing about where it computes. Read from the
    module itself, as diffusers' `_execution_device` does: a pipeline offloaded by its user counts like one
    refgen placed."""
    return hasattr(module, "_hf_hook")


def offload_mode(pipe) -> str:
    """Which of OFFLOAD_MODES `pipe` is under, read from its transformer's hooks (not from anything refgen
    stored on the pipeline): "model" for accelerate's offload hooks, "group" for diffusers' group offloading."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    if moved_by_hooks(pipe.transformer):
        return "model"
    if _is_group_offload_enabled(pipe.transformer):
        return "group"
    return "none"


def release_text_encoder(pipe) -> None:
    """Once every prompt is encoded the text encoder (Qwen2.5-VL-7B, ~16 GB in bf16) is dead weight on the
    GPU: move it to the CPU. Under model offload the hooks already do this, so it is left alone."""
    if pipe.text_encoder is None or moved_by_hooks(pipe.text_encoder):
        return
    if next(pipe.text_encoder.parameters()).device.type == "cuda":
        pipe.text_encoder.to("cpu")
        torch.cuda.empty_cache()


def load_tokenizer_only(model: str):
    """A pipeline object holding just the tokenizer: for `refgen slots`, which needs no weights."""
    from diffusers import QwenImagePipeline
    from transformers import AutoTokenizer

    require_model(model, "Qwen-Image model")
    tok = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    return QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=tok, transformer=None)


def _count_params(model: str) -> int:
    """Parameters of transformer + text encoder + VAE, from configs only (meta tensors, no weights read)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    n = 0
    with init_empty_weights():
        for cls, sub in ((QwenImageTransformer2DModel, "transformer"), (AutoencoderKLQwenImage, "vae")):
            n += sum(p.numel() for p in cls.from_config(cls.load_config(model, subfolder=sub)).parameters())
        cfg = AutoConfig.from_pretrained(model, subfolder="text_encoder")
        n += sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration(cfg).parameters())
    return n


@dataclass(kw_only=True)
class RenderConfig(SamplingConfig):
    """An alpha x seed grid of one prompt."""
    prompt: str
    alphas: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    seeds: list[int] = field(default_factory=lambda: list(GRID_SEEDS))

    def __post_init__(self):
        super().__post_init__()
        if not self.alphas:
            raise ValueError("need at least one alpha and one seed")
        if not all(math.isfinite(a) for a in self.alphas):
            raise ValueError(f"alphas must be finite numbers, got {self.alphas}")


def encode_negative(pipe, cfg: RenderConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(embeds (1, S', H), mask (1, S')) of cfg.negative_prompt for true CFG; None when CFG is off."""
    from refgen.identity.prompts import encode_prompts

    if cfg.true_cfg <= 1:
        return None
    ne = encode_prompts(pipe, cfg.negative_prompt)
    return ne.embeds, ne.mask


def render_images(pipe, embeds: torch.Tensor, mask: torch.Tensor, seeds: list[int], cfg: RenderConfig,
                  neg: tuple[torch.Tensor, torch.Tensor] | None = None, progress: bool = True,
                  output_type: str = "pil", plain: torch.Tensor | list[torch.Tensor] | None = None):
    """Render one image per row of `embeds` (B, S, H) with seeds[b]; returns PIL images (or, with
    output_type="latent", one packed latent (N, 4C) per image). `plain` (B, S, H): the same prompts without
    the people (alpha 0, the same mask), needed when cfg.id_guidance > 0; or a list of such blocks, each a
    reference the people are pushed from (`refgen.flow.identity_cfg` sums the pushes)."""
    from tqdm.auto import tqdm

    device, dtype = execution_device(pipe), pipe.transformer.dtype
    check_tensors({"prompt_embeds": embeds, "prompt_embeds_mask": mask}, device, dtype, where="render: ")
    if cfg.id_guidance:
        if plain is None or neg is None:
            raise ValueError(f"id_guidance {cfg.id_guidance} needs the prompts without the people (plain) and a "
                             "negative prompt (true CFG); got " + ("no plain rows" if plain is None else "no negative"))
        plain = [plain] if isinstance(plain, torch.Tensor) else list(plain)
        for k, p in enumerate(plain):
            if p.shape != embeds.shape:
                raise ValueError(f"render: plain rows #{k} {tuple(p.shape)} must match prompt_embeds "
                                 f"{tuple(embeds.shape)}")
            check_tensors({f"plain_embeds[{k}]": p}, device, dtype, where="render: ")
    images = []
    chunks = range(0, embeds.shape[0], cfg.batch_size)
    for i in tqdm(chunks, desc="render", disable=not progress, unit="batch"):
        sl = slice(i, i + cfg.batch_size)
        n = embeds[sl].shape[0]
        kw = {}
        if neg is not None and cfg.true_cfg > 1:
            kw = {"negative_prompt_embeds": neg[0].expand(n, -1, -1),
                  "negative_prompt_embeds_mask": neg[1].expand(n, -1)}
        # CPU generators: the same seed gives the same noise on any device.
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[sl]]
        if kw and cfg.cfg_batch:
            images += sample_batched_cfg(pipe, embeds[sl], mask[sl], kw["negative_prompt_embeds"],
                                         kw["negative_prompt_embeds_mask"], gens, cfg, output_type,
                                         None if plain is None or not cfg.id_guidance else [p[sl] for p in plain])
            continue
        # encode_prompt cuts BOTH prompt and negative embeddings to max_sequence_length: it must cover the
        # longer of the two, or a negative prompt longer than the prompt is silently truncated.
        max_len = max(embeds.shape[1], neg[0].shape[1] if kw else 0)
        out = pipe(prompt_embeds=embeds[sl], prompt_embeds_mask=mask[sl], true_cfg_scale=cfg.true_cfg,
                   num_inference_steps=cfg.steps, height=cfg.height, width=cfg.width, generator=gens,
                   max_sequence_length=max_len, output_type=output_type, **kw)
        images += list(out.images)
    return images


def _pad_to(x: torch.Tensor, S: int) -> torch.Tensor:
    """Zero-pad dim 1 of (B, S_x, ...) to S."""
    pad = x.new_zeros(x.shape[0], S - x.shape[1], *x.shape[2:])
    return torch.cat([x, pad], 1)


@torch.no_grad()
def sample_batched_cfg(pipe, embeds: torch.Tensor, mask: torch.Tensor, neg_embeds: torch.Tensor,
                       neg_mask: torch.Tensor, generators: list[torch.Generator], cfg: RenderConfig,
                       output_type: str = "pil", plain_embeds: list[torch.Tensor] | None = None):
    """QwenImagePipeline's denoising loop with true CFG, the prompt and negative rows in one forward.
    With `plain_embeds` (blocks of (B, S, H): the prompts without the people, the prompt's mask) one more block
    of rows per entry joins the forward and `refgen.flow.identity_cfg` replaces `true_cfg` (cfg.id_guidance).

    Everything but the batching is the pipeline's own: `prepare_latents` (so a seed gives the pipeline's
    noise), `calculate_shift` + `retrieve_timesteps` (Qwen-Image's shifted schedule), the guidance formula
    (`refgen.flow.true_cfg`), `scheduler.step`, the VAE's latents_mean/std and `postprocess`.
    The negative rows are zero-padded to the prompt's length (or the other way round) with mask 0, the way
    the pipeline pads prompts of different lengths within a batch: padded keys are masked out and the real
    tokens keep their RoPE positions. Returns what `pipe(...).images` would: PIL images or a tensor.
    """
    import numpy as np
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

    from refgen.flow import identity_cfg, true_cfg
    from refgen.identity.qwen_flow import decode_qwen_latents

    tr = pipe.transformer
    if tr.config.guidance_embeds:  # a guidance-distilled model takes no true CFG; the pipeline handles it
        raise ValueError("cfg_batch needs a model without guidance embeddings; set cfg_batch=False")
    B, device = embeds.shape[0], execution_device(pipe)
    S = max(embeds.shape[1], neg_embeds.shape[1])
    E = [_pad_to(embeds, S), _pad_to(neg_embeds, S)]
    M = [_pad_to(mask, S), _pad_to(neg_mask, S)]
    for p in plain_embeds or []:
        E, M = E + [_pad_to(p, S)], M + [M[0]]
    R = len(E)                                   # 2 blocks of B rows, + 1 per plain block
    E, M = torch.cat(E), torch.cat(M).bool()                                            # (R*B, S, H), (R*B, S)
    M = None if bool(M.all()) else M  # as encode_prompt does: no mask -> the unmasked attention kernel
    latents = pipe.prepare_latents(B, tr.config.in_channels // 4, cfg.height, cfg.width, embeds.dtype, device,
                                   generators)                                          # (B, h*w/4, 4C)
    h, w = cfg.height // pipe.vae_scale_factor // 2, cfg.width // pipe.vae_scale_factor // 2
    sc = pipe.scheduler.config
    mu = calculate_shift(latents.shape[1], sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                         sc.get("base_shift", 0.5), sc.get("max_shift", 1.15))
    sigmas = np.linspace(1.0, 1 / cfg.steps, cfg.steps)
    timesteps, _ = retrieve_timesteps(pipe.scheduler, cfg.steps, device, sigmas=sigmas, mu=mu)
    pipe.scheduler.set_begin_index(0)
    for t in timesteps:
        x = torch.cat([latents] * R)                                                     # (R*B, N, 4C)
        v = tr(hidden_states=x, timestep=t.expand(R * B).to(x.dtype) / 1000, encoder_hidden_states=E,
               encoder_hidden_states_mask=M, img_shapes=[[(1, h, w)]] * (R * B), return_dict=False)[0]
        if R == 2:
            v_cond, v_uncond = v.chunk(2)
            v = true_cfg(v_cond, v_uncond, cfg.true_cfg)
        else:
            v_cond, v_uncond, *v_plain = v.chunk(R)
            v = identity_cfg(v_cond, v_plain, v_uncond, cfg.true_cfg, cfg.id_guidance)
        latents = pipe.scheduler.step(v, t, latents, return_dict=False)[0]
    if output_type == "latent":
        return latents
    image = decode_qwen_latents(pipe.vae, latents, cfg.height // pipe.vae_scale_factor,
                                cfg.width // pipe.vae_scale_factor)
    image = pipe.image_processor.postprocess(image, output_type=output_type)
    pipe.maybe_free_model_hooks()
    return image


def encode_with_tokens(pipe, prompts: list[str], tokens: list[list[torch.Tensor]],
                       alphas: list[float], isolate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(E (B, S, H), mask (B, S)) of prompts[b] with slot k read as T_ph + alphas[b] (tokens[k][b] - T_ph).
    tokens[k][b] (L, H_in) are learnt token embeddings (identity/tokens.py), any device and float dtype: they
    are moved to where the text encoder computes, in its dtype. `isolate`: each person reaches only its own
    segment of the prompt (`prompts.encode_tokenized`; for heads trained with `isolate_slots`). The slots are as
    wide as the tokens (identity/slots.py, `repeat`)."""
    from refgen.identity.prompts import encode_prompts, text_encoder_device
    from refgen.identity.slots import common_repeat
    from refgen.identity.tokens import at_alpha, placeholder_embeds

    dev, dt = text_encoder_device(pipe), pipe.text_encoder.dtype
    repeat = common_repeat(pipe.tokenizer, [t.shape[0] for per_slot in tokens for t in per_slot], "the token people")
    base = placeholder_embeds(pipe, repeat).to(dev)
    a = torch.tensor([float(x) for x in alphas], device=dev)
    toks = [at_alpha(torch.stack([t.to(dev, torch.float32) for t in per_slot]), base, a).to(dt) for per_slot in tokens]
    enc = encode_prompts(pipe, prompts, n_identities=len(tokens), tokens=toks, isolate=isolate, repeat=repeat)
    return enc.embeds, enc.mask


def render_grid(pipe, cfg: RenderConfig, residuals: list[torch.Tensor], out_dir: str | Path,
                residual_files: list[str] | None = None, progress: bool = True,
                encoded: tuple | None = None, neg: tuple | None = None, model_id: str | None = None,
                tokens: list[torch.Tensor] | None = None) -> dict:
    """Alpha x seed grid for one prompt. Every slot gets its residual times the row's alpha.

    `tokens`: learnt token embeddings (L, H_in) per slot (identity/tokens.py), each row encoded with
    T_ph + alpha (T - T_ph) in its slots; `encoded` must then be None (the text encoder runs). People of both
    kinds in one prompt: `tokens` has every slot (the placeholder's own embeddings for a residual person) and so
    has `residuals` (zeros for a token person).

    With no residuals the placeholders stay as plain text (the empty-injection smoke test).
    `encoded` = (embeds (1,S,H), mask (1,S), slots) and `neg` = (embeds, mask) skip the text encoder
    (inversion has them already and has moved the text encoder off the GPU). `model_id` is what grid.json
    names as the model (default: the path or hub id the pipeline was loaded from).
    Writes grid.png, grid.json and images/a{alpha}_s{seed}.png; returns the JSON record.
    """
    from refgen.artifacts import atomic_save_image, atomic_write_json, provenance
    from refgen.grid import make_grid
    from refgen.identity.inject import inject
    from refgen.identity.prompts import encode_prompts, tokenize
    from refgen.identity.slots import common_repeat

    out_dir = Path(out_dir)
    if tokens and encoded is not None:
        raise ValueError("render_grid: tokens are encoded with the prompt; pass no encoded prompt")
    if tokens and residuals and len(tokens) != len(residuals):
        raise ValueError(f"render_grid: {len(tokens)} token sets and {len(residuals)} residuals: with both kinds, "
                         "one of each per slot")
    identities = residuals or tokens
    # Without a residual alpha scales nothing: every row would be the same pictures. Render one row, say so.
    alphas = list(cfg.alphas) if identities else [None]
    if not identities and len(cfg.alphas) > 1:
        print(f"refgen render: no residual, so alpha changes nothing: one row of {len(cfg.seeds)} seeds instead of "
              f"{len(cfg.alphas)} identical rows")
    pairs = [(a, s) for a in alphas for s in cfg.seeds]  # row-major: alpha rows, seed columns
    B = len(pairs)
    repeat = common_repeat(pipe.tokenizer, [t.shape[0] for t in identities or []])
    if tokens:  # each row is read with its tokens: the plain prompt is never encoded, its slots come from the tokenizer
        slots = tokenize(pipe, cfg.prompt, len(tokens), repeat).slots
        E, M = encode_with_tokens(pipe, [cfg.prompt] * B, [[t] * B for t in tokens], [a for a, _ in pairs])
        plain = encode_with_tokens(pipe, [cfg.prompt], [[t] for t in tokens], [0.0])[0].expand(B, -1, -1) \
            if cfg.id_guidance else None
    else:
        if encoded is None:
            enc = encode_prompts(pipe, cfg.prompt, n_identities=len(residuals) or None, repeat=repeat)
            encoded = (enc.embeds, enc.mask, enc.slots[0])
        embeds, mask, slots = encoded
        E, M = embeds.expand(B, -1, -1), mask.expand(B, -1)
        plain = E if cfg.id_guidance else None
    if residuals:
        alpha = torch.tensor([a for a, _ in pairs], device=E.device)
        E = inject(E, slots, residuals, [alpha] * len(residuals))
    if neg is None:
        neg = encode_negative(pipe, cfg)
    images = render_images(pipe, E, M, [s for _, s in pairs], cfg, neg, progress, plain=plain)
    files = []
    for (a, s), im in zip(pairs, images):
        f = out_dir / "images" / (f"a{a:g}_s{s}.png" if a is not None else f"s{s}.png")
        atomic_save_image(im, f)
        files.append(str(f.relative_to(out_dir)))
    rows = [images[i * len(cfg.seeds):(i + 1) * len(cfg.seeds)] for i in range(len(alphas))]
    grid = make_grid(rows, [f"a={a:g}" if a is not None else "no residual" for a in alphas],
                     [f"seed {s}" for s in cfg.seeds])
    atomic_save_image(grid, out_dir / "grid.png")
    record = provenance(
        dataclasses.asdict(cfg), kind="alpha_grid", model=model_id or pipe.name_or_path,
        dtype=str(pipe.transformer.dtype).replace("torch.", ""), device=str(execution_device(pipe)),
        alphas=cfg.alphas if identities else [], seeds=cfg.seeds, steps=cfg.steps, true_cfg=cfg.true_cfg, height=cfg.height,
        width=cfg.width, negative_prompt=cfg.negative_prompt, residuals=residual_files or [],
        slots=[dataclasses.asdict(s) for s in slots], S=E.shape[1], H=E.shape[2],
        layout="rows=alphas, columns=seeds", images=files, grid="grid.png")
    atomic_write_json(out_dir / "grid.json", record)
    return record
