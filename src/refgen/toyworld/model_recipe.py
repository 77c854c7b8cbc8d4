"""Recipe for the toy world's text-to-image model: a small model of the real Qwen-Image classes.

`refgen toyworld train-model --config configs/toyworld_model.yaml --out OUT` builds, from scratch:

    tokenizer     byte-level BPE trained on world captions, wrapped as transformers' Qwen2 tokenizer
                  with Qwen's special tokens (<|im_start|>, <|im_end|>, <|endoftext|>, vision tokens)
    text_encoder  Qwen2_5_VLForConditionalGeneration, small, random init, frozen (like the real one,
                  whose weights the image model never changes)
    vae           AutoencoderKLQwenImage trained as an autoencoder on world images; latents_mean/std
                  measured on the data and written into its config (the pipeline de-normalises with them)
    transformer   QwenImageTransformer2DModel trained with refgen.flow (rectified flow)
    scheduler     FlowMatchEulerDiscreteScheduler

and saves them as a standard `QwenImagePipeline` folder, so every identity command loads it with
`QwenImagePipeline.from_pretrained(OUT)` exactly as it loads the real model.

Why the details are what they are:
- Text embeddings come from the pipeline's own `encode_prompt` (chat template, last hidden layer,
  the first 34 template tokens dropped). The tokenizer is checked to split the template prefix into
  exactly 34 tokens, or the drop would cut caption tokens (or leave template tokens) silently.
- Training matches the pipeline's sampling exactly: latents normalised (z - mean) / std, packed 2x2
  as `QwenImagePipeline._pack_latents` does (`identity.qwen_flow.pack`), `img_shapes=[(1, h/2, w/2)]`, transformer timestep = sigma
  (the pipeline passes t / 1000 with t = 1000 sigma), target noise - x0.
- Each image gets `captions_per_image` caption draws (random attribute subsets, 25% of people
  described only as 'a person'), so the model learns each attribute alone and the placeholder-free
  phrase; they are encoded once into a bank (the text encoder is frozen). 10% of steps' captions are
  dropped to '' or ' ' so classifier-free guidance has an unconditional.
- Weights are stored in bf16 (as Qwen-Image ships) to stay under 30 MB; load with
  torch_dtype=torch.float32 on the CPU.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from refgen import flow
from refgen.ema import ema_decay_at, ema_update
from refgen.artifacts import JsonlLogger, atomic_save_image, atomic_write_json, provenance
from refgen.config import flatten
from refgen.toyworld import world

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
TEMPLATE_DROP = 34  # QwenImagePipeline.prompt_template_encode_start_idx
DATA_SEED_BASE = 3_000_000_000  # training scenes; disjoint from the recognizer's train/eval ranges
VAL_ID_BASE = 300_000           # identities the recipe measures its caption ceiling on; the benchmark's
                                # train (100,000...) and test (200,000...) ids stay unseen by model selection
VAL_SCENE_BASE = 4_000_000_000  # held-out scenes for the VAE round trip


# ---------------------------------------------------------------------------------------------
# config


@dataclass
class VaeConfig:
    base_dim: int = 32
    z_dim: int = 16
    # 3 levels: 2 downsamples, 64 px -> 16x16 latents -> 8x8 packed tokens. One more level (64 -> 8x8 latents,
    # 4x4 tokens, as the real model's /8) lost face shape and glasses in the round trip alone.
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    steps: int = 4000
    batch: int = 64
    lr: float = 4e-4
    kl_weight: float = 1e-6   # an autoencoder in all but name: the latent scale is fixed by mean/std later


@dataclass
class TextConfig:
    vocab_size: int = 1024
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256


@dataclass
class TransformerConfig:
    layers: int = 6
    heads: int = 6
    head_dim: int = 32
    axes_dims_rope: list[int] = field(default_factory=lambda: [8, 12, 12])  # sums to head_dim
    steps: int = 20000
    batch: int = 128
    lr: float = 3e-4
    warmup: int = 500
    ema: float = 0.999
    grad_clip: float = 1.0
    sigma_mode: str = "logit_normal"
    caption_dropout: float = 0.1
    p_bare: float = 0.25
    p_full: float = 0.4          # share of described people named with all 7 attributes (the ceiling's words)
    captions_per_image: int = 3  # caption draws per image, encoded once (the text encoder is frozen)
    compile: bool = False        # diffusers' compile_repeated_blocks (CUDA only)


@dataclass
class ToyModelConfig:
    size: int = 64
    n_images: int = 30000
    seed: int = 0
    device: str = "cuda"
    shift: float = 1.0          # sampling time shift exp(mu); 1 = none (16 latent tokens need none)
    max_minutes: float = 14.0   # safety stop for render + VAE + transformer; the run is meant to stop on steps
    log_every: int = 100
    eval_identities: int = 48   # validation identities (ids VAL_ID_BASE...) for the caption ceiling (0 = skip)
    eval_steps: int = 20        # sampling as the benchmark samples: 20 steps, true CFG 4
    eval_true_cfg: float = 4.0
    workers: int = 8            # processes rendering the data set
    vae: VaeConfig = field(default_factory=VaeConfig)
    text: TextConfig = field(default_factory=TextConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)

    def __post_init__(self):
        from refgen.config import from_dict

        for name, cls in (("vae", VaeConfig), ("text", TextConfig), ("transformer", TransformerConfig)):
            if isinstance(getattr(self, name), dict):  # built directly with a mapping (from_yaml passes instances)
                setattr(self, name, from_dict(cls, getattr(self, name), section=name))
        v, t, x = self.vae, self.text, self.transformer
        down = 2 ** (len(v.dim_mult) - 1)
        if self.size % (down * 2) or self.size < world.MIN_SIZE:
            raise ValueError(f"size={self.size} must be >= {world.MIN_SIZE} and a multiple of {down * 2} "
                             f"(VAE downsampling {down} x 2x2 packing)")
        if sum(x.axes_dims_rope) != x.head_dim:
            raise ValueError(f"transformer.axes_dims_rope {x.axes_dims_rope} must sum to head_dim={x.head_dim}")
        if t.hidden % t.heads or t.heads % t.kv_heads:
            raise ValueError(f"text: hidden={t.hidden} must divide by heads={t.heads}, heads by kv_heads={t.kv_heads}")
        hd = t.hidden // t.heads
        if hd % 2 or hd // 2 < 3:
            raise ValueError(f"text head dim {hd} must be even and >= 6 (multimodal rope splits it in 3)")
        if not 0 <= x.caption_dropout < 1 or not 0 <= x.p_bare <= 1 or not 0 <= x.p_full <= 1:
            raise ValueError("transformer.caption_dropout must be in [0,1), p_bare and p_full in [0,1]")
        if self.eval_identities < 0 or self.eval_identities == 1:
            raise ValueError(f"eval_identities must be 0 (skip) or >= 2 (pairs need two), got {self.eval_identities}")
        for k in ("n_images",):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1")
        for sec, k in (("vae", "steps"), ("vae", "batch"), ("transformer", "steps"), ("transformer", "batch")):
            if getattr(getattr(self, sec), k) < 1:
                raise ValueError(f"{sec}.{k} must be >= 1")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if x.captions_per_image < 1:
            raise ValueError(f"transformer.captions_per_image must be >= 1, got {x.captions_per_image}")
        if x.compile and self.device != "cuda":
            raise ValueError(f"transformer.compile is for CUDA runs; device is {self.device!r}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> ToyModelConfig:
        from refgen.config import from_yaml

        return from_yaml(cls, path, **overrides)

    @classmethod
    def tiny(cls, **overrides) -> ToyModelConfig:
        """CPU smoke test: a handful of steps on a handful of 32 px images, same code path."""
        d = dict(size=32, n_images=16, device="cpu", eval_identities=0, workers=0, log_every=1,
                 vae=VaeConfig(base_dim=8, dim_mult=[1, 2, 2, 2], steps=2, batch=4),
                 text=TextConfig(vocab_size=400, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64),
                 transformer=TransformerConfig(layers=1, heads=2, head_dim=16, axes_dims_rope=[4, 6, 6], steps=2,
                                               batch=4, warmup=1))
        d.update(overrides)
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# components


def train_caption_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with Qwen2's own pre-tokenizer regex, trained on `texts`, returned as a
    transformers Qwen2 tokenizer with Qwen's special tokens: eos <|im_end|>, pad <|endoftext|>, no bos.

    The corpus also holds placeholder prompts ('~ID~', '~ID~,', '(~ID~)'), so the toy tokenizer makes
    the same context-sensitive merges around the placeholder the real one does.
    """
    from refgen.tiny_qwen import train_qwen_bpe

    prefix, suffix = _template_parts()
    rng = random.Random(0)
    placeholder = [f"{rng.choice(world.OPENERS[:3]).capitalize()} {rng.choice(['~ID~', '~ID~,', '(~ID~)', '~ID~.'])} "
                   f"{rng.choice(world.SCENE_PHRASES[rng.choice(world.SCENES)])}." for _ in range(300)]
    # the template is repeated so every template word becomes one token (34 in all, like Qwen's)
    corpus = list(texts) + [prefix + suffix] * 200 + world.template_texts() * 20 + placeholder
    hf = train_qwen_bpe(corpus, vocab_size, special_tokens=SPECIAL_TOKENS)
    hf.model_max_length = 1024 + TEMPLATE_DROP
    n = len(hf(prefix).input_ids)
    if n != TEMPLATE_DROP:
        raise RuntimeError(f"the tokenizer splits the Qwen-Image template prefix into {n} tokens, not "
                           f"{TEMPLATE_DROP}; QwenImagePipeline drops exactly {TEMPLATE_DROP}. Raise text.vocab_size "
                           f"(now {vocab_size}) so every template word is merged into one token.")
    return hf


def _template_parts() -> tuple[str, str]:
    """(prefix, suffix) of QwenImagePipeline's prompt template, read from the installed diffusers
    (a pipeline with no components is enough: the template is set in __init__)."""
    from diffusers import QwenImagePipeline

    template = QwenImagePipeline(None, None, None, None, None).prompt_template_encode
    prefix, suffix = template.split("{}")
    return prefix, suffix


def build_text_encoder(tokenizer, cfg: TextConfig, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hd = cfg.hidden // cfg.heads
    half = hd // 2
    sec = [half - 2 * (half // 3), half // 3, half // 3]  # multimodal rope sections (t, h, w) sum to hd/2
    ids = tokenizer.convert_tokens_to_ids
    tc = dict(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
              num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
              max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "mrope_section": sec},
              pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    # the vision tower is never used (text-only prompts) but is part of the class; keep it minimal
    vc = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=cfg.hidden,
              fullatt_block_indexes=[0])
    c = Qwen2_5_VLConfig(text_config=tc, vision_config=vc, image_token_id=ids("<|image_pad|>"),
                         video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                         vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=True)
    torch.manual_seed(seed)
    te = Qwen2_5_VLForConditionalGeneration(c).eval()
    te.requires_grad_(False)
    return te


def build_vae(cfg: VaeConfig):
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                                  num_res_blocks=cfg.num_res_blocks,
                                  temperal_downsample=[False] * (len(cfg.dim_mult) - 1),  # images: no time axis
                                  latents_mean=[0.0] * cfg.z_dim, latents_std=[1.0] * cfg.z_dim)


def build_transformer(cfg: TransformerConfig, z_dim: int, text_hidden: int):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=4 * z_dim, out_channels=z_dim,
                                       num_layers=cfg.layers, attention_head_dim=cfg.head_dim,
                                       num_attention_heads=cfg.heads, joint_attention_dim=text_hidden,
                                       axes_dims_rope=tuple(cfg.axes_dims_rope))


def build_scheduler(shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler

    # dynamic shifting with base_shift == max_shift: the pipeline's mu is then log(shift) at every size
    mu = math.log(shift)
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=mu, max_shift=mu,
                                           base_image_seq_len=256, max_image_seq_len=4096,
                                           time_shift_type="exponential")


# ---------------------------------------------------------------------------------------------
# data


def _render_one(args):
    seed, size = args
    sc = world.scene_from_seed(seed)
    return np.asarray(world.render(sc, size)), sc


def render_dataset(cfg: ToyModelConfig, progress: bool = True) -> tuple[torch.Tensor, list[world.Scene]]:
    """uint8 (N,3,H,W) images and their scenes, for scene seeds DATA_SEED_BASE + seed*1e7 + [0, N)."""
    base = DATA_SEED_BASE + cfg.seed * 10_000_000
    jobs = [(base + i, cfg.size) for i in range(cfg.n_images)]
    if cfg.workers > 0:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(cfg.workers) as pool:
            it = pool.imap(_render_one, jobs, chunksize=256)
            res = list(_tq(it, progress, "render", len(jobs)))
    else:
        res = [_render_one(j) for j in _tq(jobs, progress, "render")]
    imgs = torch.from_numpy(np.stack([r[0] for r in res])).permute(0, 3, 1, 2).contiguous()
    return imgs, [r[1] for r in res]


def _tq(it, progress: bool, desc: str, total: int | None = None):
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total)


def to_vae_input(x_uint8: torch.Tensor, device, dtype=torch.float32) -> torch.Tensor:
    """uint8 (B,3,H,W) -> (B,3,1,H,W) in [-1,1]: the VAE is a video VAE, one frame per image."""
    return (x_uint8.to(device=device, dtype=dtype) / 127.5 - 1.0).unsqueeze(2)


# ---------------------------------------------------------------------------------------------
# training stages


class _Clock:
    def __init__(self, max_minutes: float):
        self.t0, self.limit = time.time(), max_minutes * 60

    def over(self) -> bool:
        return time.time() - self.t0 > self.limit


def _lr_lambda(warmup: int, total: int):
    return lambda s: min(1.0, (s + 1) / max(1, warmup)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))


def train_vae(vae, images: torch.Tensor, cfg: ToyModelConfig, dev, log: JsonlLogger, clock: _Clock, progress: bool) -> dict:
    vc = cfg.vae
    g = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=vc.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(max(1, vc.steps // 20), vc.steps))
    amp = _autocast(dev)
    vae.train()
    it = _tq(range(vc.steps), progress, "vae")
    recent, done = [], 0
    for step in it:
        idx = torch.randint(0, images.shape[0], (vc.batch,), generator=g)
        x = to_vae_input(images[idx], dev)
        with amp:
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(dev, post.mean.dtype)
            rec = vae.decode(z).sample
        rec = rec.float()
        l1 = (rec - x).abs().mean()
        mse = (rec - x).pow(2).mean()
        kl = 0.5 * (post.mean.float().pow(2) + post.var.float() - 1 - post.logvar.float()).mean()
        loss = l1 + mse + vc.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        recent.append(float(mse.detach()))
        if done % cfg.log_every == 0 or done == vc.steps:
            rec_ = {"stage": "vae", "step": done, "mse": sum(recent) / len(recent), "l1": float(l1.detach()),
                    "kl": float(kl.detach()), "lr": sched.get_last_lr()[0], "elapsed_s": time.time() - clock.t0}
            log.log(**rec_)
            recent = []
            if progress:
                it.set_postfix(mse=f"{rec_['mse']:.5f}")
        if clock.over():
            log.log(stage="vae", stopped_early=True, step=done)
            break
    vae.eval()
    return {"vae_steps_done": done}


@torch.no_grad()
def encode_dataset_latents(vae, images: torch.Tensor, dev, batch: int = 256) -> torch.Tensor:
    """Posterior means (N, z, h, w): deterministic, as the pipelines' retrieve_latents(sample_mode='argmax')."""
    out = []
    for i in range(0, images.shape[0], batch):
        with _autocast(dev):
            out.append(vae.encode(to_vae_input(images[i:i + batch], dev)).latent_dist.mode()[:, :, 0].float().cpu())
    return torch.cat(out)


def set_latent_stats(vae, latents: torch.Tensor) -> tuple[list[float], list[float]]:
    mean = latents.mean(dim=(0, 2, 3))
    std = latents.std(dim=(0, 2, 3)).clamp_min(1e-4)
    m, s = [round(float(v), 5) for v in mean], [round(float(v), 5) for v in std]
    vae.register_to_config(latents_mean=m, latents_std=s)  # saved in vae/config.json; the pipeline reads these
    return m, s


def _autocast(dev):
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


@torch.no_grad()
def build_text_bank(pipe, scenes: list[world.Scene], cfg: ToyModelConfig, dev, progress: bool = True):
    """Embeddings of `captions_per_image` caption draws per scene plus the two unconditional prompts
    ('' and ' ', rows -2 and -1), all through the pipeline's own `encode_prompt`.

    Why a bank: the text encoder is frozen, so its output is a pure function of the caption. Encoding
    once up front removes the tokenizer, the Qwen2.5-VL rope-index loop and the text forward from every
    training step (they were most of the step time at this model size). Rows are padded to one length
    with mask 0; the transformer masks padded keys and gives text rope positions by index, so padding
    length does not change the result.
    Returns (embeds (R, L, D) bf16/fp32 on dev, mask (R, L) bool on dev)."""
    tc = cfg.transformer
    rng = random.Random(cfg.seed + 3)
    M = tc.captions_per_image
    caps = [world.caption(scenes[i], rng, p_bare=tc.p_bare, p_full=tc.p_full)
            for i in range(len(scenes)) for _ in range(M)]
    caps += ["", " "]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    chunks = []
    for i in _tq(range(0, len(caps), 2048), progress, "text bank"):
        e, m = pipe.encode_prompt(caps[i:i + 2048], device=dev)
        if m is None:
            m = torch.ones(e.shape[:2], dtype=torch.bool, device=dev)
        chunks.append((e.to(dtype), m.bool()))
    L = max(e.shape[1] for e, _ in chunks)
    emb = torch.zeros(len(caps), L, chunks[0][0].shape[2], dtype=dtype, device=dev)
    mask = torch.zeros(len(caps), L, dtype=torch.bool, device=dev)
    r = 0
    for e, m in chunks:
        emb[r:r + e.shape[0], :e.shape[1]] = e
        mask[r:r + e.shape[0], :e.shape[1]] = m
        r += e.shape[0]
    return emb, mask


def train_transformer(pipe, latents: torch.Tensor, scenes, cfg: ToyModelConfig, dev, log: JsonlLogger, clock: _Clock,
                      progress: bool) -> tuple[dict, dict]:
    from refgen.identity.qwen_flow import QwenFlowModel, pack

    tc = cfg.transformer
    tf = pipe.transformer
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1)
    N, (C, h, w) = latents.shape[0], latents.shape[1:]
    z_all = pack((latents - mean) / std).to(dev)  # (N, h*w/4, 4C), the pipeline's 2x2 packing
    t0 = time.time()
    emb_bank, mask_bank = build_text_bank(pipe, scenes, cfg, dev, progress)
    text_s = time.time() - t0
    M, B = tc.captions_per_image, tc.batch
    # every random draw comes from one generator on the training device: reproducible, and no host sync
    g = torch.Generator(device=dev).manual_seed(cfg.seed + 2)
    ema = copy.deepcopy(tf).requires_grad_(False)
    opt = torch.optim.AdamW(tf.parameters(), lr=tc.lr, weight_decay=0.0, betas=(0.9, 0.99),
                            fused=dev.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tc.warmup, tc.steps))
    model = QwenFlowModel(tf, (h, w))  # model(x, sigma, (embeds, mask)): the pipeline's own transformer call
    if tc.compile:
        tf.compile_repeated_blocks(fullgraph=True)  # diffusers' regional compile: one graph per block type
    tf.train()
    it = _tq(range(tc.steps), progress, "transformer")
    recent, done, t_loop = [], 0, time.time()
    for step in it:
        idx = torch.randint(0, N, (B,), generator=g, device=dev)
        row = idx * M + torch.randint(0, M, (B,), generator=g, device=dev)
        drop = torch.rand(B, generator=g, device=dev) < tc.caption_dropout  # -> '' or ' ': the CFG unconditional
        row = torch.where(drop, emb_bank.shape[0] - 1 - torch.randint(0, 2, (B,), generator=g, device=dev), row)
        x0 = z_all[idx]
        noise = torch.randn(x0.shape, generator=g, device=dev)
        sigma = flow.sample_sigmas(B, tc.sigma_mode, generator=g, device=dev)
        with _autocast(dev):  # the one flow-matching loss and Qwen adapter inversion also uses
            loss = flow.loss(model, x0, (emb_bank[row], mask_bank[row]), sigma=sigma, noise=noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(tf.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        ema_update(ema, tf, ema_decay_at(step, tc.ema, 10))  # the EMA weights are what ship
        done = step + 1
        recent.append(loss.detach())
        if done % cfg.log_every == 0 or done == tc.steps:
            r = {"stage": "transformer", "step": done, "loss": float(torch.stack(recent).mean()), "grad_norm": float(gn),
                 "lr": sched.get_last_lr()[0], "steps_per_s": done / (time.time() - t_loop),
                 "elapsed_s": time.time() - clock.t0}
            log.log(**r)
            recent = []
            if progress:
                it.set_postfix(loss=f"{r['loss']:.4f}")
        if clock.over():
            log.log(stage="transformer", stopped_early=True, step=done)
            break
    return {"transformer_steps_done": done, "text_bank_s": text_s, "text_bank_rows": emb_bank.shape[0],
            "text_bank_len": emb_bank.shape[1], "transformer_steps_per_s": done / (time.time() - t_loop)}, ema


# ---------------------------------------------------------------------------------------------
# evaluation with the recognizer


@torch.no_grad()
def evaluate_with_recognizer(pipe, cfg: ToyModelConfig, dev, out: Path, *, roundtrip: bool = True,
                             samples: bool = True) -> dict:
    """What the recognizer reads in this model's pictures, on people and scenes no stage trained on:
    1. the VAE alone: joint identity (all 7 attributes) on held-out renders and on their round trips;
    2. the caption ceiling (`benchmark.caption_ceiling`): one and two people spelled out in words, on
       `eval_identities` validation identities x 5 scenes x 2 seeds, sampled as the benchmark samples."""
    from refgen.identity.prompts import encode_prompts
    from refgen.identity.render import RenderConfig
    from refgen.toyworld import benchmark as B
    from refgen.toyworld import recognizer as R

    try:
        net = R.load(device=str(dev))
    except FileNotFoundError as e:
        return {"skipped": str(e)}
    res: dict = {}
    if roundtrip:
        res["vae_roundtrip"] = _vae_roundtrip(pipe, net, cfg, dev)
    ids = range(VAL_ID_BASE, VAL_ID_BASE + cfg.eval_identities)
    attrs = [world.identity_from_seed(i).to_dict() for i in ids]
    pairs = B.test_pairs(len(attrs), len(attrs) // 2)
    rc = RenderConfig(prompt="", steps=cfg.eval_steps, true_cfg=cfg.eval_true_cfg, height=cfg.size, width=cfg.size,
                      batch_size=256)
    ne = encode_prompts(pipe, " ")
    res["ceiling"] = B.caption_ceiling(pipe, net, attrs, pairs, list(world.SCENES), [0, 1], rc,
                                       (ne.embeds, ne.mask), str(dev))
    if not samples:
        return res
    # a picture of what was measured: the first 8 validation people, 8 scene/seed columns
    from refgen.identity.render import render_images

    words = [world.full_description(world.IdentityAttributes.from_dict(a)) for a in attrs[:8]]
    prompts = [B.SCENE_PROMPT.format(where=world.SCENE_PHRASES[s][0]).replace("~ID~", w)
               for w in words for s in world.SCENES[:4]]
    enc = encode_prompts(pipe, prompts)
    E, M = enc.embeds.repeat_interleave(2, 0), enc.mask.repeat_interleave(2, 0)
    imgs = render_images(pipe, E, M, [0, 1] * len(prompts), rc, (ne.embeds, ne.mask), progress=False)
    atomic_save_image(_grid(imgs, cfg.size), out / "samples.png")
    atomic_write_json(out / "samples.json", {"prompts": prompts, "seeds": [0, 1], "rows": "identity",
                                             "columns": "scene x seed"})
    return res


@torch.no_grad()
def _vae_roundtrip(pipe, net, cfg: ToyModelConfig, dev) -> dict:
    """Joint identity the recognizer reads on 512 held-out renders and on their VAE round trips: what the
    autoencoder alone costs every later number."""
    from refgen.toyworld import benchmark as B
    from refgen.toyworld import recognizer as R

    scenes = [world.scene_from_seed(VAL_SCENE_BASE + i) for i in range(512)]
    x = torch.from_numpy(np.stack([np.asarray(world.render(sc, cfg.size)) for sc in scenes])).permute(0, 3, 1, 2)
    rec = []
    for i in range(0, x.shape[0], 128):
        with _autocast(dev):
            r = pipe.vae.decode(pipe.vae.encode(to_vae_input(x[i:i + 128], dev)).latent_dist.mode()).sample
        rec.append(((r[:, :, 0].float().clamp(-1, 1) + 1) / 2).cpu())
    rows = [{"people": [p.identity.to_dict() for p in sc.people], "scene": sc.background} for sc in scenes]
    return {"original": B.score(R.predict(net, x, str(dev)), rows),
            "reconstruction": B.score(R.predict(net, torch.cat(rec), str(dev)), rows)}


def _numbers(d: dict) -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}, numbers only: one JSONL line per evaluation."""
    return {k: v for k, v in flatten(d).items() if isinstance(v, (int, float))}


def _grid(imgs, size: int):
    from PIL import Image

    n = len(imgs)
    cols = min(8, n)
    rows = (n + cols - 1) // cols
    g = Image.new("RGB", (cols * size, rows * size))
    for i, im in enumerate(imgs):
        g.paste(im, ((i % cols) * size, (i // cols) * size))
    return g


# ---------------------------------------------------------------------------------------------
# the recipe


def _build_components(cfg: ToyModelConfig, scenes: list[world.Scene], dev):
    """(tokenizer, text encoder, VAE, transformer), each from its own seed. The tokenizer is trained on captions
    of the data set (several draws per scene: all attribute words)."""
    from refgen.runtime import check_cpu_size

    rng = random.Random(cfg.seed)
    cap_sample = [world.caption(scenes[i % len(scenes)], rng, p_bare=0.0) for i in range(min(20000, 4 * len(scenes)))]
    tokenizer = train_caption_tokenizer(cap_sample, cfg.text.vocab_size)
    text_encoder = build_text_encoder(tokenizer, cfg.text, cfg.seed).to(dev)
    torch.manual_seed(cfg.seed + 10)
    vae = build_vae(cfg.vae).to(dev)
    torch.manual_seed(cfg.seed + 20)
    transformer = build_transformer(cfg.transformer, cfg.vae.z_dim, cfg.text.hidden).to(dev)
    for name, m in (("vae", vae), ("transformer", transformer), ("text_encoder", text_encoder)):
        check_cpu_size(m, dev, name)
    return tokenizer, text_encoder, vae, transformer


def _evaluate_shipped(pipe, cfg: ToyModelConfig, dev, work: Path, log: JsonlLogger) -> dict:
    """The recognizer's reading of the weights that ship: bf16 (as Qwen-Image ships, and as the benchmark loads
    them on a GPU); on the CPU (smoke runs) the evaluation stays fp32, as CPU users load the model."""
    if dev.type == "cuda":
        pipe.to(torch.bfloat16)
    if cfg.eval_identities <= 0:
        return {}
    evals = evaluate_with_recognizer(pipe, cfg, dev, work)
    if dev.type == "cuda":  # the same bf16-rounded weights computed in fp32, as `--dtype fp32` runs them
        pipe.to(torch.float32)
        evals["fp32_compute"] = evaluate_with_recognizer(pipe, cfg, dev, work, roundtrip=False, samples=False)
    log.log(stage="eval", **_numbers(evals))
    return evals


def _publish_model(pipe, cfg: ToyModelConfig, out: Path, work: Path, report: dict, clock: _Clock) -> None:
    """Save the pipeline in bf16 with refgen_toyworld.json beside it (the report gains the weights' size and the
    total time), then swap it in at `out` (with the logs and samples from `work`); a half-written folder is never
    at `out`."""
    import os
    import shutil

    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.to(torch.bfloat16)
    pipe.save_pretrained(tmp, safe_serialization=True)
    report["weights_mb"] = sum(p.stat().st_size for p in tmp.rglob("*.safetensors")) / 2**20
    report["total_s"] = time.time() - clock.t0
    atomic_write_json(tmp / "refgen_toyworld.json", provenance(asdict(cfg), report=report))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    if (work / "metrics.jsonl").exists():
        shutil.copy2(work / "metrics.jsonl", out / "metrics.jsonl")
    for extra in ("samples.png", "samples.json"):
        if (work / extra).exists():
            shutil.copy2(work / extra, out / extra)
    shutil.rmtree(work, ignore_errors=True)


def train_model(cfg: ToyModelConfig, out: str | Path, *, progress: bool = True) -> Path:
    """Run the whole recipe and save a QwenImagePipeline folder at `out`. Returns `out`."""
    from diffusers import QwenImagePipeline

    from refgen.runtime import resolve_device, seed_everything

    out = Path(out)
    dev = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    work = out.parent / f".{out.name}.work"  # logs live beside, so a half-done run never looks like a model
    log = JsonlLogger(work / "metrics.jsonl")
    clock = _Clock(cfg.max_minutes)
    t = {}

    images, scenes = render_dataset(cfg, progress)
    t["render_s"] = time.time() - clock.t0
    tokenizer, text_encoder, vae, transformer = _build_components(cfg, scenes, dev)

    stats = train_vae(vae, images, cfg, dev, log, clock, progress)
    t["vae_s"] = time.time() - clock.t0 - t["render_s"]
    vae.requires_grad_(False)
    latents = encode_dataset_latents(vae, images, dev)
    lat_mean, lat_std = set_latent_stats(vae, latents)

    pipe = QwenImagePipeline(scheduler=build_scheduler(cfg.shift), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    st2, ema = train_transformer(pipe, latents, scenes, cfg, dev, log, clock, progress)
    stats.update(st2)
    t["transformer_s"] = time.time() - clock.t0 - t["render_s"] - t["vae_s"]
    transformer.load_state_dict(ema.state_dict())
    transformer.eval()
    del ema

    t1 = time.time()
    evals = _evaluate_shipped(pipe, cfg, dev, work, log)
    if cfg.eval_identities > 0:
        t["eval_s"] = time.time() - t1
    report = {**stats, "timings_s": t, "train_s": t["render_s"] + t["vae_s"] + t["transformer_s"],
              "total_s": None, "latents_mean": lat_mean,
              "latents_std": lat_std, "weights_mb": None, "eval": evals, "device": str(dev),
              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
              "stopped_early": stats["vae_steps_done"] < cfg.vae.steps
              or stats["transformer_steps_done"] < cfg.transformer.steps}
    _publish_model(pipe, cfg, out, work, report, clock)
    return out
