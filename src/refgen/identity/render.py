"""Loading Qwen-Image under the device policy, and rendering with injected slot residuals (phase 1.4, 4.6).

Rendering goes through diffusers' own QwenImagePipeline with `prompt_embeds`/`prompt_embeds_mask`
(and negative embeds for true CFG). An alpha x seed grid is one prompt encoded once, then batched:
each pipeline call renders `batch_size` images of the grid, each row with its own alpha and its own
seeded generator, so an image depends on (alpha, seed) and not on which batch it fell into.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refgen.runtime import check_cpu_size, check_dtype_for_model, check_tensors, parse_dtype, resolve_device


def load_pipeline(model: str, device: str | None = None, dtype: str = "bf16"):
    """QwenImagePipeline on `device`/`dtype` under the policy: CUDA unless 'cpu' is asked for, and then
    only for models under 200M parameters (counted from the configs before any weight is loaded)."""
    from diffusers import QwenImagePipeline

    dev = resolve_device(device)
    dt = parse_dtype(dtype)
    check_dtype_for_model(dt, "qwen-image")
    if dev.type == "cpu":
        check_cpu_size(_count_params(model), dev, what=f"Qwen-Image model {model!r}")
    pipe = QwenImagePipeline.from_pretrained(model, torch_dtype=dt)
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    pipe.refgen_model_id = str(model)
    return pipe


def load_tokenizer_only(model: str):
    """A pipeline object holding just the tokenizer: for `refgen slots`, which needs no weights."""
    from diffusers import QwenImagePipeline
    from transformers import AutoTokenizer

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


@dataclass
class RenderConfig:
    prompt: str
    alphas: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    seeds: list[int] = field(default_factory=lambda: list(range(8)))
    steps: int = 28
    true_cfg: float = 4.0
    negative_prompt: str = " "
    height: int = 768
    width: int = 512
    batch_size: int = 4  # images per pipeline call

    def __post_init__(self):
        if not self.alphas or not self.seeds:
            raise ValueError("need at least one alpha and one seed")
        # Qwen-Image's scheduler stretches sigmas to shift_terminal; with one step that is 0/0 and the
        # image comes out NaN (diffusers 0.42), so one step is refused rather than rendered black.
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2 (got {self.steps}): one step gives NaN with Qwen-Image's "
                             "terminal-shift schedule")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be multiples of 16 (VAE /8 x 2x2 packing), got "
                             f"{self.height}x{self.width}")


def render_images(pipe, embeds: torch.Tensor, mask: torch.Tensor, seeds: list[int], cfg: RenderConfig,
                  neg: tuple[torch.Tensor, torch.Tensor] | None = None, progress: bool = True):
    """Render one image per row of `embeds` (B, S, H) with seeds[b]; returns PIL images."""
    from tqdm.auto import tqdm

    device, dtype = pipe._execution_device, pipe.transformer.dtype
    check_tensors({"prompt_embeds": embeds, "prompt_embeds_mask": mask}, device, dtype, where="render: ")
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
        out = pipe(prompt_embeds=embeds[sl], prompt_embeds_mask=mask[sl], true_cfg_scale=cfg.true_cfg,
                   num_inference_steps=cfg.steps, height=cfg.height, width=cfg.width, generator=gens,
                   max_sequence_length=embeds.shape[1], output_type="pil", **kw)
        images += out.images
    return images


def render_grid(pipe, cfg: RenderConfig, residuals: list[torch.Tensor], out_dir: str | Path,
                residual_files: list[str] | None = None, progress: bool = True,
                encoded: tuple | None = None, neg: tuple | None = None) -> dict:
    """Alpha x seed grid for one prompt. Every slot gets its residual times the row's alpha.

    With no residuals the placeholders stay as plain text (phase 1.3's empty-injection smoke test).
    `encoded` = (embeds (1,S,H), mask (1,S), slots) and `neg` = (embeds, mask) skip the text encoder
    (inversion has them already and has moved the text encoder off the GPU).
    Writes grid.png, grid.json and images/a{alpha}_s{seed}.png; returns the JSON record.
    """
    from refgen.artifacts import atomic_save_image, atomic_write_json, provenance
    from refgen.grid import make_grid
    from refgen.identity.inject import inject
    from refgen.identity.prompts import encode_prompts

    out_dir = Path(out_dir)
    if encoded is None:
        enc = encode_prompts(pipe, cfg.prompt, n_identities=len(residuals) if residuals else None)
        encoded = (enc.embeds, enc.mask, enc.slots[0])
    embeds, mask, slots = encoded
    pairs = [(a, s) for a in cfg.alphas for s in cfg.seeds]  # row-major: alpha rows, seed columns
    B = len(pairs)
    E = embeds.expand(B, -1, -1)
    M = mask.expand(B, -1)
    if residuals:
        alpha = torch.tensor([a for a, _ in pairs], device=E.device)
        E = inject(E, slots, residuals, [alpha] * len(residuals))
    if neg is None and cfg.true_cfg > 1:
        ne = encode_prompts(pipe, cfg.negative_prompt)
        neg = (ne.embeds, ne.mask)
    images = render_images(pipe, E, M, [s for _, s in pairs], cfg, neg, progress)
    files = []
    for (a, s), im in zip(pairs, images):
        f = out_dir / "images" / f"a{a:g}_s{s}.png"
        atomic_save_image(im, f)
        files.append(str(f.relative_to(out_dir)))
    rows = [images[i * len(cfg.seeds):(i + 1) * len(cfg.seeds)] for i in range(len(cfg.alphas))]
    grid = make_grid(rows, [f"a={a:g}" for a in cfg.alphas], [f"seed {s}" for s in cfg.seeds])
    atomic_save_image(grid, out_dir / "grid.png")
    record = provenance(
        dataclasses.asdict(cfg), kind="alpha_grid", model=getattr(pipe, "refgen_model_id", None),
        dtype=str(pipe.transformer.dtype).replace("torch.", ""), device=str(pipe._execution_device),
        alphas=cfg.alphas, seeds=cfg.seeds, steps=cfg.steps, true_cfg=cfg.true_cfg, height=cfg.height,
        width=cfg.width, negative_prompt=cfg.negative_prompt, residuals=residual_files or [],
        slots=[dataclasses.asdict(s) for s in slots], S=embeds.shape[1], H=embeds.shape[2],
        layout="rows=alphas, columns=seeds", images=files, grid="grid.png")
    atomic_write_json(out_dir / "grid.json", record)
    return record
