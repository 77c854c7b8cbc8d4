"""Training NanoDiT with rectified flow.

One optimizer step = `grad_accum` micro batches (effective batch = batch_size x world_size x grad_accum):

    sigma ~ logit-normal, noise ~ N(0, I), per-sample CFG mode ~ {uncond, text-only, DINO-only, both}
    loss  = refgen.flow.loss(model, x0, cond)            MSE to v = noise - x0, bf16 autocast on CUDA
    AdamW step after grad-norm clipping (folded into fused AdamW on CUDA: `clip_and_step`); EMA update with
    warm-up; JSONL metrics; checkpoint every N steps

Determinism: the step's random draws come from a generator seeded by (seed, step, rank), and the data stream
is replayed up to the number of batches already consumed, so a resumed run continues bit-exactly (on the same
device and kernels). `torchrun --nproc_per_node=K refgen dit train ...` runs DDP; a plain run is one process.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from refgen.ema import ema_decay_at, ema_update  # noqa: F401  (re-exported for the benches)
from refgen import flow
from refgen.artifacts import JsonlLogger, atomic_torch_save, atomic_write_json, drop_metrics_after, provenance
from refgen.dit.config import CFGDropout, TrainConfig, fit_to_shards, to_dict, train_config_from_dict
from refgen.dit.model import Cond, NanoDiT, count_params
from refgen.runtime import check_cpu_size, resolve_device, seed_everything

CKPT_DIR = "checkpoints"
LATEST = "latest.json"


# --------------------------------------------------------------------------- pieces

def build_model(cfg: TrainConfig, device: torch.device) -> NanoDiT:
    torch.manual_seed(cfg.seed)   # same init on every rank (DDP also broadcasts, this keeps single runs reproducible)
    model = NanoDiT(cfg.model)
    check_cpu_size(model, device, "NanoDiT")
    return model.to(device)


def clip_and_step(opt: torch.optim.Optimizer, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_(params, max_norm); opt.step()`, returning the total grad norm. With fused AdamW (CUDA)
    the clip is folded into the optimizer: the grads are divided by grad_scale = max((norm + 1e-6) / max_norm, 1)
    inside the fused kernel (the hook GradScaler uses) instead of a separate multiply pass over every gradient,
    one full read+write of the grads less per step (bench/dit_throughput.py `clip-in-adam`). Same total norm
    (per-tensor norms, then the norm of those, as clip_grad_norm_), same update up to fp32 rounding.
    Non-fused optimizers (the CPU path, bit-exact resume tests): the plain two calls."""
    if not all(g.get("fused") for g in opt.param_groups):
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        return total
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)   # what clip_grad_norm_ computes (public since torch 2.6)
    fused_step_dividing_grads(opt, torch.clamp((total + 1e-6) / max_norm, min=1.0))
    return total


def fused_step_dividing_grads(opt: torch.optim.Optimizer, divisor: torch.Tensor) -> None:
    """`opt.step()` with every gradient divided by `divisor` (a 0-d tensor) inside the fused kernel, in place (the
    grads are left divided, as GradScaler leaves them unscaled).

    The one place refgen uses torch's private hook: fused Adam/AdamW read `opt.grad_scale` and unscale inside the
    kernel (what GradScaler uses). tests/dit/test_model_xattn.py checks the installed torch still honours it."""
    if not all(g.get("fused") for g in opt.param_groups):
        raise ValueError("fused_step_dividing_grads needs a fused optimizer (torch reads grad_scale only there)")
    opt.grad_scale = divisor
    try:
        opt.step()
    finally:
        del opt.grad_scale


def sample_cfg_drop(n: int, probs: CFGDropout, generator: torch.Generator,
                    device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (drop_text, drop_dino), (n,) bool each.

    uncond -> both dropped; text-only -> DINO dropped; DINO-only -> text dropped; both -> nothing dropped."""
    p = torch.tensor([probs.uncond, probs.text_only, probs.dino_only, probs.both], dtype=torch.float32,
                     device=device)
    mode = torch.multinomial(p, n, replacement=True, generator=generator)
    drop_text = (mode == 0) | (mode == 2)
    drop_dino = (mode == 0) | (mode == 1)
    return drop_text, drop_dino


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant (DiT trains at a constant 1e-4)."""
    if cfg.lr_warmup_steps <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup_steps)


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """All random draws of one optimizer step: a pure function of (seed, step, rank), so resume needs no
    generator state and DDP ranks draw different noise."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 4099 + rank)
    return g


def _strip_prefixes(sd: dict) -> dict:
    """Checkpoints written from DDP (`module.`) or torch.compile (`_orig_mod.`) load into a plain model."""
    out = {}
    for k, v in sd.items():
        for pre in ("module.", "_orig_mod."):
            while k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def load_weights_report(model: nn.Module, state_dict: dict) -> dict:
    """Load what fits; return {missing, unexpected, shape_mismatch}. Never raises on a key mismatch: a warm
    start from a checkpoint without the DINO-patch parameters (a text+CLS model grown into one with patches) keeps
    their fresh init."""
    sd = _strip_prefixes(state_dict)
    own = model.state_dict()
    mismatch = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                for k, v in sd.items() if k in own and own[k].shape != v.shape]
    sd = {k: v for k, v in sd.items() if not (k in own and own[k].shape != v.shape)}
    res = model.load_state_dict(sd, strict=False)
    return {"missing": sorted(res.missing_keys), "unexpected": sorted(res.unexpected_keys),
            "shape_mismatch": sorted(mismatch)}


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    p = Path(out_dir) / CKPT_DIR / LATEST
    if not p.is_file():
        return None
    return Path(out_dir) / CKPT_DIR / json.loads(p.read_text())["file"]


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=False)


def model_from_checkpoint(path: str | Path, device, use_ema: bool = True) -> tuple[NanoDiT, TrainConfig]:
    """The EMA weights (what sampling and validation use) as an eval-mode NanoDiT."""
    ck = load_checkpoint(path)
    cfg = train_config_from_dict(ck["config"])
    model = NanoDiT(cfg.model)
    check_cpu_size(model, torch.device(device), "NanoDiT")
    model.load_state_dict(_strip_prefixes(ck["ema" if use_ema else "model"]))
    return model.to(device).eval().requires_grad_(False), cfg


# --------------------------------------------------------------------------- distributed

def _dist_setup(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cfg.device == "cpu":
            dist.init_process_group("gloo")
            return dist.get_rank(), world, torch.device("cpu")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return dist.get_rank(), world, torch.device("cuda", local)
    return 0, 1, resolve_device(cfg.device)


def _rank_slice(data: Iterable, rank: int, world: int) -> Iterable:
    """Batch i goes to rank i % world: a rank-agnostic iterable (synthetic data, a plain list) under DDP."""
    return data if world == 1 else itertools.islice(data, rank, None, world)


class _Stream:
    """Endless batches from a re-iterable source, counting what was consumed so resume can replay to it."""

    def __init__(self, source: Iterable | Callable[[], Iterable], skip: int = 0):
        self.source, self.consumed, self.epoch = source, 0, 0
        self._it = self._new()
        for _ in range(skip):
            self.next()

    def _new(self) -> Iterator:
        src = self.source() if callable(self.source) else self.source
        return iter(src)

    def next(self) -> dict:
        for _ in range(2):
            try:
                b = next(self._it)
                self.consumed += 1
                return b
            except StopIteration:
                self.epoch += 1
                self._it = self._new()
        raise RuntimeError("the training data yielded no batches")


# --------------------------------------------------------------------------- training

def shard_loader(cfg: TrainConfig, world: int):
    """Batches from the shard directory written by `refgen dit prepare` (refgen.dit.shards).

    One loader object for the whole run: re-iterating it starts the next epoch with a new (seeded) shard order,
    and a resumed run replays the same sequence. webdataset splits shards over ranks itself; under DDP every
    rank draws shards with replacement and yields the same number of batches, so no rank waits at an epoch end.
    """
    from refgen.dit import shards  # the data pipeline; imported lazily so tests need no shards

    if not cfg.data_dir:
        raise ValueError("no data: set data_dir in the config (a shard directory) or pass batches to train()")
    kw = {}
    if world > 1:
        n = int(shards.load_index(cfg.data_dir).get("samples", 0))
        kw = {"resampled": True, "epoch_batches": max(1, n // (cfg.batch_size * world))}
    return shards.make_loader(cfg.data_dir, cfg.batch_size, num_workers=cfg.num_workers,
                              pin_memory=torch.cuda.is_available(), seed=cfg.seed, **kw)


def train(cfg: TrainConfig, data: Iterable | Callable[[], Iterable] | None = None,
          config_name: str = "the config", on_eval: Callable[[int, NanoDiT, float], None] | None = None,
          eval_every: int = 0) -> dict:
    """Run (or resume) a training run; returns a summary. `data`: batches per the data contract (see
    refgen.dit.model.Cond / refgen.dit.shards), a re-iterable or a zero-argument factory; None = shards, whose
    dimensions the model must fit (`fit_to_shards`; `config_name` names the config in its errors).

    `on_eval(step, ema_model, train_s)` runs on rank 0 every `eval_every` steps and after the last one (the
    yardstick samples and scores there); its time is not counted in `train_s` nor in images/s."""
    cfg.validate()
    taken: dict = {}
    if data is None:
        from refgen.dit import shards

        if not cfg.data_dir:
            raise ValueError("no data: set data_dir in the config (a shard directory) or pass --data-dir")
        cfg, taken = fit_to_shards(cfg, shards.load_index(cfg.data_dir), cfg.data_dir, config_name)
    rank, world, device = _dist_setup(cfg)
    if taken and rank == 0:
        print("[dit train] dims_from_data: " + ", ".join(f"model.{k} {a} -> {b}" for k, (a, b) in taken.items())
              + f" (from {Path(cfg.data_dir) / 'index.json'})")
    try:
        return _train(cfg, data, rank, world, device, taken, on_eval, eval_every)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _resume_or_warm_start(cfg: TrainConfig, out: Path, model: NanoDiT, ema: nn.Module, opt, is_main: bool,
                          projector: nn.Module | None = None):
    """Load the checkpoint to resume (model, EMA, optimizer, step, data position, RNG) or the warm-start weights.
    Returns (step, batches consumed, resumed_from, warm-start report, training seconds so far)."""
    ckpt_path = latest_checkpoint(out) if cfg.resume == "auto" else (Path(cfg.resume) if cfg.resume else None)
    if ckpt_path is not None:
        ck = load_checkpoint(ckpt_path)
        saved = train_config_from_dict(ck["config"])
        if to_dict(saved.model) != to_dict(cfg.model):
            raise ValueError(f"cannot resume {ckpt_path}: its model config {to_dict(saved.model)} differs from "
                             f"{to_dict(cfg.model)}; use init_from for a warm start instead")
        if ("repa" in ck) != (projector is not None):
            raise ValueError(f"cannot resume {ckpt_path}: it was trained with repa.enabled "
                             f"{'repa' in ck} and the config says {projector is not None}; use init_from for a "
                             f"warm start instead")
        model.load_state_dict(_strip_prefixes(ck["model"]))
        ema.load_state_dict(_strip_prefixes(ck["ema"]))
        if projector is not None:
            projector.load_state_dict(ck["repa"])
        opt.load_state_dict(ck["optimizer"])
        _set_rng_state(ck.get("rng"))
        return int(ck["step"]), int(ck["batches_consumed"]), str(ckpt_path), None, float(ck.get("train_seconds", 0.0))
    if not cfg.init_from:
        return 0, 0, None, None, 0.0
    ck = load_checkpoint(cfg.init_from)
    # a full training checkpoint (prefer its EMA weights) or a bare state dict
    if "ema" in ck or "model" in ck:
        sd = ck["ema"] if "ema" in ck else ck["model"]
    else:
        sd = ck
    warm = load_weights_report(model, sd)
    ema.load_state_dict(model.state_dict())
    warm["from"] = str(cfg.init_from)
    if is_main:
        print(f"[dit train] warm start from {cfg.init_from}: {len(warm['missing'])} missing (fresh init): "
              f"{warm['missing']}; {len(warm['unexpected'])} unexpected (ignored): {warm['unexpected']}; "
              f"shape mismatches (fresh init): {warm['shape_mismatch']}")
        atomic_write_json(out / "warm_start.json", warm)
    return 0, 0, None, warm, 0.0


def enable_coordinate_descent_tuning(inductor_config=None) -> None:
    """Inductor's coordinate-descent autotuning of generated kernels, for every compile of this process. The one
    place refgen sets a private torch._inductor option; a torch without it is named, not silently ignored
    (setting an unknown attribute on the config module would do nothing). `inductor_config`: torch's, by default."""
    if inductor_config is None:
        import torch._inductor.config as inductor_config

    if not hasattr(inductor_config, "coordinate_descent_tuning"):
        raise RuntimeError(f"torch {torch.__version__} has no torch._inductor.config.coordinate_descent_tuning: set "
                           "compile_tuning: false (or update refgen.dit.train.enable_coordinate_descent_tuning)")
    inductor_config.coordinate_descent_tuning = True


def _wrap_for_training(cfg: TrainConfig, model: NanoDiT, world: int, device: torch.device,
                       projector: nn.Module | None = None) -> nn.Module:
    """The module the training step calls: the model with its cross-attention set, compiled and under DDP as the
    config says (the weights stay `model`'s)."""
    model.set_attention(cfg.cross_attention)  # exact either way; no parameters change
    train_model: nn.Module = model
    if cfg.compile and cfg.compile_tuning:
        # compiles happen lazily (first step, then once per new bucket shape), so the knob is set for the process
        enable_coordinate_descent_tuning()
    if cfg.compile and cfg.compile_regional:
        model.compile_blocks()  # in place: state-dict keys stay plain
    elif cfg.compile:
        train_model = torch.compile(model)
    if projector is not None:
        from refgen.dit.repa import RepaDiT

        train_model = RepaDiT(train_model, projector, cfg.repa.depth)   # returns (velocity, projected hidden)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    return train_model


def _accumulate_grads(cfg: TrainConfig, train_model: nn.Module, stream: _Stream, gen: torch.Generator, accum: int,
                      world: int, device: torch.device, use_amp: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward and backward over one optimizer step's `accum` micro batches (DDP syncs only on the last).
    Returns (sum of the micro flow losses, sum of the velocities' RMS, images seen over all ranks, sum of the micro
    REPA losses (0 without REPA)). With REPA the optimised loss is flow + repa.weight x REPA."""
    captured: dict[str, torch.Tensor] = {}
    repa = cfg.repa.enabled

    def fwd(x, sigma, cond):
        v = train_model(x, sigma, cond)
        if repa:
            v, captured["projected"] = v
        captured["v"] = v.detach()
        return v

    loss_sum = torch.zeros((), device=device)
    vnorm_sum = torch.zeros((), device=device)
    repa_sum = torch.zeros((), device=device)
    images = 0
    for micro in range(accum):
        batch = stream.next()
        x0 = batch["latent"].to(device, torch.float32, non_blocking=True)
        B = x0.shape[0]
        sigma = flow.sample_sigmas(B, cfg.sigma_sampling, mean=cfg.logit_mean, std=cfg.logit_std,
                                   generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype)
        drop_text, drop_dino = sample_cfg_drop(B, cfg.cfg_dropout, gen, device)
        cond = Cond.from_batch(batch, device).with_drop(drop_text, drop_dino)
        sync = contextlib.nullcontext() if (world == 1 or micro == accum - 1) else train_model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = flow.loss(fwd, x0, cond, sigma=sigma, noise=noise)
            total = loss
            if repa:
                from refgen.dit.repa import repa_loss

                # the stored patches, not the null tokens the model saw where DINO was dropped
                align = repa_loss(captured.pop("projected"), cond.dino_patches,
                                drop_dino if cfg.repa.samples == "dino_dropped" else None)
                total = loss + cfg.repa.weight * align
                repa_sum += align.detach()
            (total / accum).backward()
        loss_sum += loss.detach()
        vnorm_sum += captured["v"].float().pow(2).mean().sqrt()
        images += B * world
    return loss_sum, vnorm_sum, images, repa_sum


def _train(cfg: TrainConfig, data, rank: int, world: int, device: torch.device, taken: dict | None = None,
           on_eval: Callable | None = None, eval_every: int = 0) -> dict:
    is_main = rank == 0
    out = Path(cfg.out_dir)
    accum = cfg.grad_accum(world)
    seed_everything(cfg.seed)
    use_amp = device.type == "cuda" and cfg.dtype == "bf16"   # CPU (tests) stays fp32: bit-exact and simple

    if cfg.fp8:   # refused off-CUDA / without FP8 tensor cores before anything is built or written
        from refgen.dit.fp8 import check_fp8_device

        check_fp8_device(device)
    model = build_model(cfg, device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if cfg.fp8:   # after the EMA copy: the EMA (what sampling uses) keeps plain nn.Linear layers
        from refgen.dit.fp8 import convert_to_fp8

        convert_to_fp8(model, cfg.fp8_recipe)   # before _wrap_for_training compiles the blocks
    fused = device.type == "cuda"
    projector = None
    if cfg.repa.enabled:   # built after the DiT, so the DiT's initial weights do not depend on REPA
        from refgen.dit.repa import build_projector

        projector = build_projector(cfg.repa, cfg.model.hidden_size, cfg.model.dino_dim).to(device)
    params = list(model.parameters()) + (list(projector.parameters()) if projector is not None else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)
    n_params = count_params(model)
    step, consumed, resumed_from, warm, train_s = _resume_or_warm_start(cfg, out, model, ema, opt, is_main,
                                                                        projector)
    if is_main:
        atomic_write_json(out / "config.json", provenance(cfg, n_params=n_params, world_size=world,
                                                          grad_accum=accum, resumed_from=resumed_from,
                                                          dims_taken_from_data=taken or None))
    train_model = _wrap_for_training(cfg, model, world, device, projector)

    if data is None:
        source = shard_loader(cfg, world)
    else:
        source = (lambda: _rank_slice(data() if callable(data) else data, rank, world))
    stream = _Stream(source, skip=consumed)
    if is_main and resumed_from is not None:
        # a run killed after its checkpoint logged steps it will now replay: each step stays in the log once
        drop_metrics_after(out / "metrics.jsonl", step)
    logger = JsonlLogger(out / "metrics.jsonl") if is_main else None

    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, initial=step, desc="dit train", disable=not (is_main and cfg.progress))
    last = {"loss": float("nan")}
    # metrics of the steps since the last log line
    win_loss, win_vnorm, win_images, win_steps, t0 = 0.0, 0.0, 0, 0, time.perf_counter()
    win_repa = 0.0
    # train_s: wall-clock seconds of training steps over the whole run (resumes included, checkpoint writes
    # excluded), what the yardstick's time-to-quality counts. Host syncs happen at log steps, so it is exact there.
    seg0 = time.perf_counter()
    model.train()
    while step < cfg.steps:
        gen = step_generator(cfg.seed, step, rank, device)
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss_sum, vnorm_sum, images, repa_sum = _accumulate_grads(cfg, train_model, stream, gen, accum, world,
                                                                  device, use_amp)
        win_images += images
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = clip_and_step(opt, params, clip)
        decay = ema_decay_at(step, cfg.ema_decay, cfg.ema_warmup)
        ema_update(ema, model, decay)
        step += 1
        win_steps += 1
        win_loss = win_loss + loss_sum / accum      # a tensor: no host sync until the log step
        win_vnorm = win_vnorm + vnorm_sum / accum
        win_repa = win_repa + repa_sum / accum
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.steps:
            loss_v = float(_mean_across_ranks(win_loss / win_steps, world))
            elapsed = time.perf_counter() - t0
            rec = {"step": step, "loss": loss_v, "grad_norm": float(grad_norm),
                   "velocity_norm": float(win_vnorm / win_steps), "lr": lr, "ema_decay": decay,
                   "images_per_s": win_images / max(elapsed, 1e-9), "epoch": stream.epoch,
                   "train_s": train_s + time.perf_counter() - seg0}
            if cfg.repa.enabled:   # the flow loss stays `loss`, comparable with runs without REPA
                rec["repa_loss"] = float(_mean_across_ranks(win_repa / win_steps, world))
            last = rec
            if is_main:
                logger.log(**rec)
                bar.set_postfix(loss=f"{loss_v:.4f}", gnorm=f"{float(grad_norm):.3f}")
            win_loss, win_vnorm, win_images, win_steps, t0 = 0.0, 0.0, 0, 0, time.perf_counter()
            win_repa = 0.0
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            train_s += time.perf_counter() - seg0
            if is_main:
                save_checkpoint(out, cfg, model, ema, opt, step, stream.consumed, train_seconds=train_s,
                                projector=projector)
            if world > 1:
                dist.barrier()
            seg0 = time.perf_counter()
        if on_eval is not None and is_main and ((eval_every and step % eval_every == 0) or step == cfg.steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)   # the steps queued so far belong to the training time
            t_eval = time.perf_counter()
            on_eval(step, ema, train_s + t_eval - seg0)
            spent = time.perf_counter() - t_eval
            seg0, t0 = seg0 + spent, t0 + spent
            model.train()
    bar.close()
    ck = latest_checkpoint(out)
    return {"step": step, "last": last, "checkpoint": str(ck) if ck else None, "n_params": n_params,
            "resumed_from": resumed_from, "warm_start": warm, "grad_accum": accum}


def _mean_across_ranks(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
    return t


def _rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict | None) -> None:
    if not s:
        return
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(out: Path, cfg: TrainConfig, model: nn.Module, ema: nn.Module, opt, step: int,
                    consumed: int, train_seconds: float = 0.0, projector: nn.Module | None = None) -> Path:
    """Everything resume needs, written atomically; `latest.json` is switched only after the file is complete."""
    name = f"step_{step:07d}.pt"
    path = out / CKPT_DIR / name
    atomic_torch_save({
        "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
        "step": step, "batches_consumed": consumed, "config": to_dict(cfg), "rng": _rng_state(),
        "train_seconds": train_seconds,
        **({"repa": projector.state_dict()} if projector is not None else {}),
        "provenance": provenance(None, step=step),
    }, path)
    atomic_write_json(out / CKPT_DIR / LATEST, {"file": name, "step": step})
    return path


def train_from_args(config_path: str, **overrides) -> dict:
    from refgen.dit.config import load_train_config

    return train(load_train_config(config_path, **overrides))
