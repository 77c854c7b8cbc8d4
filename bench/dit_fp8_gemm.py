"""Why FP8 training does (not) speed NanoDiT up: the converted token GEMMs one by one, one DiT block and the whole
model step, bf16 against torchao float8 training recipes (refgen.dit.fp8), on one GPU.

For each width of a NanoDiT preset, the token GEMM shapes are read from the model itself: every nn.Linear that
`refgen.dit.fp8.fp8_module_filter` selects (what `fp8: true` converts), its rows M = batch x the tokens it sees
(image tokens N, or the cross-attention context T + 1 + N for `cross_attn.kv`), grouped by (M, K, N) with their
count in the model. Then, per shape and per recipe:

  linear   forward + backward (3 GEMMs) of one layer under torch.compile(dynamic=False): bf16 = nn.Linear with
           fp32 master weights under bf16 autocast (what training runs), fp8 = the same layer converted by torchao
           (Float8Linear: amax, scale and cast of input, weight and output gradient, then the scaled GEMMs)
  kernel   the same 3 GEMMs alone, eager: torch.mm in bf16 against torch._scaled_mm on FP8 operands (tensorwise
           or rowwise scales; rowwise_with_gw_hp keeps the weight-gradient GEMM in bf16). No casts: the ceiling
           of the linear's speed-up, so linear vs kernel separates "the FP8 GEMM is not faster at this shape"
           from "the casts eat the gain"
  block    one DiTBlock forward + backward on its real inputs (captured from the model), compiled as training
           compiles it (`blk.compile()`, what NanoDiT.compile_blocks does), converted before compiling
  model    the whole NanoDiT forward + backward (flow-matching MSE, no optimizer) with compile_blocks()

Timing: CUDA events around each iteration after warm-up, the median over `--iters`; the first call's wall time
is reported as compile_s, and dynamo is reset before every compiled case (otherwise the shared Linear.forward
code would hit the recompile limit and silently run eagerly), with the graph breaks it counted. The summary line
per recipe is Amdahl's law on the measured numbers: share = sum(count x bf16 linear ms) / bf16 model ms is the
fraction of a step the converted GEMMs are; predicted = the model step if every converted GEMM took its
isolated fp8 time; free casts = the step if each converted GEMM got its FP8 kernel's own speed-up (the kernel
part) with no cast cost, what perfect cast fusion would give; measured = the converted model step; ideal = the
step if the converted GEMMs ran exactly 2x faster with free casts (FP8's dense peak is 2x bf16's on Hopper):
the most any FP8 recipe can give at this width. `--profile` adds the GPU kernel time of the block and model steps by class (bf16 GEMM, FP8 GEMM,
attention, Triton fused kernels, the rest).

Method after torchao's own float8 benchmarks (benchmarks/float8/float8_roofline.py: bf16 vs Float8Linear
forward + backward under torch.compile, next to the bare torch.mm / torch._scaled_mm GEMM times). What torchao
reports (NVIDIA H100; torchao/float8/README.md and float8_linear_utils.py): a linear (M, K, N) = (1024, 2048,
1024) is 0.80x in FP8 (too small), (4096, 8192, 16384) is 1.39x; the gain grows with M, K and N towards the
GEMMs' 2x, and casts are memory-bound overhead. Its auto-filter, drawn from those H100 tables, leaves a linear
in bf16 when K <= 4096 and N <= 1024 for tensorwise, and when N <= 2048, K <= 1024, or N <= 4096 with K <= 2048
for rowwise (the `auto_filter` column: whether torchao would convert the shape). End to end: Llama3-8B on
8xH100 (seq 8192) +25 % tokens/s tensorwise, +10 % rowwise; rowwise in large Llama pretraining on 2k H200s
1.34-1.43x. NanoDiT base's token GEMMs have K = 1536 but for mlp.2 (K = 6144), i.e. small-to-medium by
those tables. The recipe API (`Float8LinearConfig.from_recipe_name("tensorwise" | "rowwise" |
"rowwise_with_gw_hp")`, `convert_to_float8_training(module, config=, module_filter_fn=)`) is the same in
torchao 0.17 and 0.18.

    python bench/dit_fp8_gemm.py --out fp8_gemm.json                               # base, 256 px, batch 128
    python bench/dit_fp8_gemm.py --widths 1536,3072 --recipes tensorwise,rowwise --profile --out w.json
    python bench/dit_fp8_gemm.py --tiny --out /tmp/g.json                          # CPU smoke test, seconds

`--tiny` runs the tiny preset eagerly on the CPU in fp32, where torchao emulates the FP8 GEMM: it checks the
plumbing, its numbers mean nothing. A recipe that cannot run there is skipped with its reason; on a GPU a failing
case is recorded with its error, the run goes on, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import sys
import time
from typing import NamedTuple

import torch
from torch import nn

from refgen.artifacts import atomic_write_json, provenance
from refgen.dit.config import FP8_RECIPES, model_preset
from refgen.dit.fp8 import convert_to_fp8, fp8_linear_config, fp8_module_filter
from refgen.dit.model import Cond, NanoDiT, forward_flops

PARTS = ("linear", "kernel", "block", "model")
SHORT = {"tensorwise": "tw", "rowwise": "rw", "rowwise_with_gw_hp": "rwgw"}   # table labels


class Settings(NamedTuple):     # (NamedTuples: the tests load this file without registering a module)
    preset: str = "base"
    widths: tuple[int, ...] = ()          # hidden sizes to run; () = the preset's. Head dim stays the preset's
    px: int = 256
    batch: int = 128
    text_len: int = 128
    recipes: tuple[str, ...] = ("tensorwise", "rowwise")
    parts: tuple[str, ...] = PARTS
    compile: bool = True
    warmup: int = 5
    iters: int = 20
    cross_attention: str = "zpad"         # TrainConfig's default
    profile: bool = False
    device: str = "cuda"
    amp: bool = True                      # bf16 autocast over fp32 master weights, as training runs

    def validate(self) -> None:
        bad = [r for r in self.recipes if r not in FP8_RECIPES]
        if bad:
            raise ValueError(f"--recipes: {bad} unknown; choose from {', '.join(FP8_RECIPES)}")
        if not set(self.parts) <= set(PARTS):
            raise ValueError(f"--parts: choose from {', '.join(PARTS)}, got {list(self.parts)}")
        if self.px % 8 or self.batch < 1 or self.iters < 1 or self.warmup < 0:
            raise ValueError("--px must be a multiple of 8 (the VAE's /8), --batch and --iters >= 1, --warmup >= 0")


class GemmShape(NamedTuple):
    """One (M, K, N) of the converted token GEMMs: the per-block module names that have it and how many
    converted linears of the whole model do."""
    M: int
    K: int
    N: int
    modules: tuple[str, ...]
    count: int

    @property
    def train_flops(self) -> int:      # forward + grad_input + grad_weight GEMMs
        return 6 * self.M * self.K * self.N


# --------------------------------------------------------------------------- inputs and shapes

def make_inputs(cfg, px: int, batch: int, text_len: int, device: torch.device, seed: int = 0):
    """A batch as training sees it: random latents and conditioning, captions of random length (padded keys)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = px // 8
    n_tok = (h // cfg.patch_size) ** 2
    lens = torch.randint(8 if text_len > 8 else 1, text_len + 1, (batch, 1), generator=g, device=device)
    cond = Cond(t5=torch.randn(batch, text_len, cfg.t5_dim, generator=g, device=device),
                t5_mask=torch.arange(text_len, device=device).expand(batch, text_len) < lens,
                dino_cls=torch.randn(batch, cfg.dino_dim, generator=g, device=device),
                dino_patches=torch.randn(batch, n_tok, cfg.dino_dim, generator=g, device=device))
    x = torch.randn(batch, cfg.latent_channels, h, h, generator=g, device=device)
    sigma = torch.rand(batch, generator=g, device=device)
    target = torch.randn(x.shape, generator=g, device=device)
    return x, sigma, cond, target


def build_model(cfg, s: Settings, device: torch.device) -> NanoDiT:
    """Random weights, with the zero-initialised layers (adaLN-Zero gates, cross-attention output, final layer)
    opened, so every GEMM carries real values and gradients flow everywhere, as they do after a few steps."""
    torch.manual_seed(0)
    model = NanoDiT(cfg).to(device)
    for blk in model.blocks:
        nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.02)
        nn.init.normal_(blk.cross_attn.proj.weight, std=0.02)
    nn.init.normal_(model.final.adaLN_modulation[-1].weight, std=0.02)
    nn.init.normal_(model.final.linear.weight, std=0.02)
    model.set_attention(s.cross_attention)
    return model.train()


def token_gemms(model: NanoDiT, inputs, batch: int) -> list[GemmShape]:
    """The converted GEMMs' shapes, read from a forward pass of one sample: each selected linear's input rows x
    `batch` is its M."""
    rows: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if fp8_module_filter(m, name):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: rows.__setitem__(name, args[0].shape[:-1].numel())))
    x, sigma, cond, _ = inputs
    one = Cond(*(t[:1] if isinstance(t, torch.Tensor) else t
               for t in (getattr(cond, f.name) for f in dataclasses.fields(cond))))
    try:
        with torch.no_grad():
            model(x[:1], sigma[:1], one)
    finally:
        for h in hooks:
            h.remove()
    groups: dict[tuple[int, int, int], list[str]] = {}
    mods = dict(model.named_modules())
    for name, r in rows.items():
        lin = mods[name]
        groups.setdefault((r * batch, lin.in_features, lin.out_features), []).append(name)
    out = []
    for (M, K, N), names in groups.items():
        per_block = tuple(dict.fromkeys(n.split(".", 2)[2] for n in names))
        out.append(GemmShape(M, K, N, per_block, len(names)))
    return out


def block_inputs(model: NanoDiT, inputs, amp: bool, device: torch.device) -> tuple:
    """Block 0's real arguments (x, c, ctx, ctx_valid) at the bench batch, leaf tensors that want gradients as in
    training (all three come from trainable layers)."""
    got = {}
    h = model.blocks[0].register_forward_pre_hook(lambda mod, args: got.setdefault("args", args))
    x, sigma, cond, _ = inputs
    try:
        with torch.no_grad(), _autocast(device, amp):
            model(x, sigma, cond)
    finally:
        h.remove()
    return tuple(a.detach().clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                 for a in got["args"])


# --------------------------------------------------------------------------- timing

def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, warmup: int, iters: int) -> dict:
    """compile_s: the first call's wall time (compilation, if any); ms: the median of `iters` timed calls (CUDA
    events on the GPU, wall clock on the CPU: refgen's one latency timer, `measure_latency`), after the rest of
    the warm-up."""
    from refgen.moe.monitor import measure_latency

    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    r = measure_latency(fn, device, warmup=max(warmup - 1, 0), iters=iters)
    return {"ms": r["median_ms"], "compile_s": first}


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def _fresh_compile_state() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def _kernel_class(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "attn", "sdpa", "cudnn_generated")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "sm80_", "splitk", "scaled_mm")):
        return "gemm fp8" if any(k in n for k in ("e4m3", "e5m2", "f8f8", "fp8", "float8")) else "gemm bf16"
    if n.startswith("triton"):
        # inductor names a fused kernel after its ops: FP8 scaling shows up as amax reductions and clamped casts
        return "triton amax/fp8 cast" if ("amax" in n or "clamp" in n) else "triton other"
    return "other"


def profile_ms(fn, n: int = 3) -> dict:
    """GPU kernel time per call by class, and the top kernels (after the timing runs: everything compiled)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    by_class: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.name.startswith("ProfilerStep"):
            continue
        us = e.time_range.elapsed_us()
        by_class[_kernel_class(e.name)] = by_class.get(_kernel_class(e.name), 0.0) + us
        by_name[e.name] = by_name.get(e.name, 0.0) + us
    return {"gpu_ms": sum(by_class.values()) / n / 1e3,
            "by_class_ms": {k: v / n / 1e3 for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [(k[:100], v / n / 1e3) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:10]]}


# --------------------------------------------------------------------------- the cases

def _grads_off(params) -> None:
    for p in params:
        p.grad = None


def linear_case(shape: GemmShape, recipe: str | None, s: Settings, device: torch.device) -> dict:
    dtype = torch.bfloat16 if s.amp else torch.float32
    torch.manual_seed(0)
    mod = nn.Sequential(nn.Linear(shape.K, shape.N)).to(device)      # fp32 master weights
    if recipe is not None:
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(mod, config=fp8_linear_config(recipe))
    if s.compile:
        _fresh_compile_state()
        mod = torch.compile(mod, dynamic=False)
    x = torch.randn(shape.M, shape.K, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(shape.M, shape.N, device=device, dtype=dtype)
    params = [x, *mod.parameters()]

    def step():
        _grads_off(params)
        with _autocast(device, s.amp):
            y = mod(x)
        y.backward(gy)

    r = time_fn(step, device, s.warmup, s.iters)
    r["tflops"] = shape.train_flops / (r["ms"] * 1e-3) / 1e12
    if s.compile:
        r["graph_breaks"] = _graph_breaks()
    return r


def kernel_case(shape: GemmShape, recipe: str | None, s: Settings, device: torch.device) -> dict:
    """The three GEMMs of a linear's forward + backward without any cast: (M,K)x(K,N) output, (M,N)x(N,K)
    grad_input, (K,M)x(M,N) grad_weight; the second operand column-major (what _scaled_mm wants)."""
    M, K, N = shape.M, shape.K, shape.N
    ms = 0.0
    for role, (m, k, n) in (("output", (M, K, N)), ("grad_input", (M, N, K)), ("grad_weight", (K, M, N))):
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, k, device=device, dtype=torch.bfloat16).t()
        if recipe is None or (recipe == "rowwise_with_gw_hp" and role == "grad_weight"):
            def fn(a=a, b=b):
                return torch.mm(a, b)
        else:
            f8 = torch.float8_e4m3fn
            a8, b8 = a.to(f8), b.to(f8)
            if recipe == "tensorwise":
                sa, sb = torch.ones((), device=device), torch.ones((), device=device)
            else:
                sa, sb = torch.ones(m, 1, device=device), torch.ones(1, n, device=device)

            def fn(a8=a8, b8=b8, sa=sa, sb=sb, fast=role == "output"):
                return torch._scaled_mm(a8, b8, sa, sb, out_dtype=torch.bfloat16, use_fast_accum=fast)
        ms += time_fn(fn, device, s.warmup, s.iters)["ms"]
    return {"ms": ms, "tflops": shape.train_flops / (ms * 1e-3) / 1e12}


def _converted(module: nn.Module, recipe: str | None, wrap_as_block: bool) -> nn.Module:
    if recipe is None:
        return module
    if wrap_as_block:            # the filter selects by model path: give the lone block its place in a model
        holder = nn.Module()
        holder.blocks = nn.ModuleList([module])
        convert_to_fp8(holder, recipe)
    else:
        convert_to_fp8(module, recipe)
    return module


def block_case(model: NanoDiT, args: tuple, recipe: str | None, s: Settings, device: torch.device) -> dict:
    blk = _converted(copy.deepcopy(model.blocks[0]), recipe, wrap_as_block=True)
    if s.compile:
        _fresh_compile_state()
        blk.compile()                    # in place, as NanoDiT.compile_blocks: converted first, compiled second
    params = [*(a for a in args if isinstance(a, torch.Tensor) and a.requires_grad), *blk.parameters()]
    gout = torch.randn_like(args[0])

    def step():
        _grads_off(params)
        with _autocast(device, s.amp):
            y = blk(*args)
        y.backward(gout)

    r = time_fn(step, device, s.warmup, s.iters)
    if s.compile:
        r["graph_breaks"] = _graph_breaks()
    if s.profile and device.type == "cuda":
        r["profile"] = profile_ms(step)
    return r


def model_case(model: NanoDiT, inputs, recipe: str | None, s: Settings, device: torch.device,
               train_flops: float) -> dict:
    m = _converted(copy.deepcopy(model), recipe, wrap_as_block=False)
    if s.compile:
        _fresh_compile_state()
        m.compile_blocks()
    x, sigma, cond, target = inputs
    params = list(m.parameters())

    def step():
        _grads_off(params)
        with _autocast(device, s.amp):
            v = m(x, sigma, cond)
        (v.float() - target).square().mean().backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    r = time_fn(step, device, s.warmup, s.iters)
    r["tflops"] = train_flops / (r["ms"] * 1e-3) / 1e12
    if device.type == "cuda":
        r["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if s.compile:
        r["graph_breaks"] = _graph_breaks()
    if s.profile and device.type == "cuda":
        r["profile"] = profile_ms(step)
    return r


def torchao_auto_filter(shape: GemmShape, recipe: str) -> bool | None:
    """Would torchao's own H100-derived heuristic convert this linear? None where it has no rule (the private
    helper may move between torchao versions)."""
    try:
        from torchao.float8 import _auto_filter_for_recipe

        return bool(_auto_filter_for_recipe(recipe, [])(nn.Linear(shape.K, shape.N, device="meta"), "x"))
    except Exception:
        return None


# --------------------------------------------------------------------------- driving

class Runner:
    """Runs each case, records an error (GPU) or a skip (--tiny) instead of stopping, and keeps the JSON current
    after every case so a run cut short still leaves what it measured."""

    def __init__(self, s: Settings, tiny: bool, save):
        self.s, self.tiny, self.save = s, tiny, save
        self.failed = 0

    def __call__(self, what: str, fn) -> dict:
        try:
            r = fn()
            if self.s.device == "cuda":     # progress, for a run with a time limit
                print(f"  {what}: {r['ms']:.3f} ms (first call {r.get('compile_s', 0):.1f} s)", flush=True)
        except Exception as e:     # noqa: BLE001 - one case's failure (compile error, OOM) is a result
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if self.tiny:
                print(f"  skipped {what} on the CPU: {msg}", flush=True)
                r = {"skipped": msg}
            else:
                print(f"  FAILED {what}: {msg}", flush=True)
                self.failed += 1
                r = {"error": msg}
            if self.s.device == "cuda":
                torch.cuda.empty_cache()
        self.save()
        return r


def _speedups(rec: dict, recipes) -> None:
    base = rec.get("bf16", {}).get("ms")
    for r in recipes:
        if base and "ms" in rec.get(r, {}):
            rec[r]["speedup"] = base / rec[r]["ms"]


def summarize(width_rec: dict, recipes) -> dict:
    """Amdahl's law on the measured times (see the module docstring)."""
    out = {}
    model_bf16 = width_rec.get("model", {}).get("bf16", {}).get("ms")
    gemms = width_rec["gemms"]
    lin_bf16 = [g["linear"].get("bf16", {}).get("ms") for g in gemms] if gemms and "linear" in gemms[0] else []
    if not model_bf16 or not lin_bf16 or None in lin_bf16:
        return out
    gemm_ms = sum(g["count"] * t for g, t in zip(gemms, lin_bf16))
    share = gemm_ms / model_bf16
    for r in recipes:
        lin = [g["linear"].get(r, {}).get("ms") for g in gemms]
        rec = {"gemm_share_of_bf16_step": share, "ideal_speedup_2x_gemms": 1 / max(1 - share / 2, 1e-9)}
        if None not in lin:
            saved = sum(g["count"] * (tb - tf) for g, tb, tf in zip(gemms, lin_bf16, lin))
            rec["gemm_speedup"] = gemm_ms / (gemm_ms - saved)
            rec["predicted_step_speedup"] = model_bf16 / (model_bf16 - saved)
        kern = [(g.get("kernel", {}).get("bf16", {}).get("ms"), g.get("kernel", {}).get(r, {}).get("ms"))
                for g in gemms]
        if all(kb and kf for kb, kf in kern):
            # the FP8 GEMM kernels' own speed-up at each shape, applied to the bf16 linears: the step if the casts
            # were free (fused away entirely)
            saved = sum(g["count"] * tb * (1 - kf / kb) for g, tb, (kb, kf) in zip(gemms, lin_bf16, kern))
            rec["free_casts_step_speedup"] = model_bf16 / (model_bf16 - saved)
        measured = width_rec["model"].get(r, {}).get("ms")
        if measured:
            rec["measured_step_speedup"] = model_bf16 / measured
        out[r] = rec
    return out


def _fmt(rec: dict, key: str = "ms") -> str:
    if "ms" in rec:
        sp = f" {rec['speedup']:4.2f}x" if "speedup" in rec else "      "
        return f"{rec[key]:9.3f}{sp}"
    return f"{'skip' if 'skipped' in rec else 'FAIL':>9}      "


def print_width(w: dict, recipes, parts) -> None:
    cols = ["bf16", *recipes]
    head = "".join(f"{c[:14]:>15}" for c in cols)
    print(f"\nwidth {w['width']} ({w['heads']} heads, depth {w['depth']}), batch {w['batch']}, "
          f"{w['image_tokens']} image tokens, context {w['context_tokens']}; ms fwd+bwd (speed-up vs bf16)")
    if "linear" in parts or "kernel" in parts:
        print(f"{'GEMM':38} {'M':>7} {'K':>6} {'N':>6} {'x':>3} {'part':>6}{head} {'bf16 TF/s':>10} auto_filter")
        for g in w["gemms"]:
            first = True
            for part in ("linear", "kernel"):
                if part not in g:
                    continue
                row = "".join(f"{_fmt(g[part].get(c, {})):>15}" for c in cols)
                tf = g[part].get("bf16", {}).get("tflops")
                af = ",".join(f"{SHORT[r]}={'y' if v else 'n' if v is not None else '?'}"
                              for r, v in g["auto_filter"].items())
                name = "+".join(g["modules"]) if first else ""
                print(f"{name[:38]:38} {g['M']:7} {g['K']:6} {g['N']:6} {g['count']:3} {part:>6}{row} "
                      f"{tf if tf is None else round(tf):>10} {af if first else ''}")
                first = False
    for part in ("block", "model"):
        if part in w:
            row = "".join(f"{_fmt(w[part].get(c, {})):>15}" for c in cols)
            gb = [w[part].get(c, {}).get("graph_breaks") for c in cols]
            mem = [w[part].get(c, {}).get("peak_mem_gib") for c in cols]
            extra = f" graph breaks {gb}" if any(g is not None for g in gb) else ""
            extra += f" peak GiB {[None if m is None else round(m, 1) for m in mem]}" if any(mem) else ""
            print(f"{part + ' fwd+bwd':38} {'':7} {'':6} {'':6} {'':3} {'':>6}{row}{extra}")
    for r, sm in w.get("summary", {}).items():
        txt = (f"{r}: converted GEMMs = {100 * sm['gemm_share_of_bf16_step']:.0f} % of the bf16 step; ideal 2x "
               f"GEMMs -> {sm['ideal_speedup_2x_gemms']:.2f}x")
        if "predicted_step_speedup" in sm:
            txt += (f"; their measured {sm['gemm_speedup']:.2f}x -> predicted step {sm['predicted_step_speedup']:.2f}x")
        if "free_casts_step_speedup" in sm:
            txt += f"; free casts -> {sm['free_casts_step_speedup']:.2f}x"
        if "measured_step_speedup" in sm:
            txt += f"; measured step {sm['measured_step_speedup']:.2f}x"
        print("  " + txt)
    for part in ("block", "model"):
        for c in cols:
            p = w.get(part, {}).get(c, {}).get("profile")
            if p:
                cls = ", ".join(f"{k} {v:.2f}" for k, v in p["by_class_ms"].items())
                print(f"  profile {part} {c}: {p['gpu_ms']:.2f} GPU ms = {cls}")


def run_width(width: int, s: Settings, device: torch.device, runner: Runner, rec: dict) -> None:
    base = model_preset(s.preset)
    head_dim = base.hidden_size // base.num_heads
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of {s.preset}'s head dim {head_dim}")
    cfg = dataclasses.replace(base, hidden_size=width, num_heads=width // head_dim)
    model = build_model(cfg, s, device)
    inputs = make_inputs(cfg, s.px, s.batch, s.text_len, device)
    n_tok = (s.px // 8 // cfg.patch_size) ** 2
    rec.update(width=width, heads=cfg.num_heads, depth=cfg.depth, batch=s.batch, image_tokens=n_tok,
               context_tokens=s.text_len + 1 + n_tok, gemms=[])
    variants = [("bf16", None), *((r, r) for r in s.recipes)]
    for shape in token_gemms(model, inputs, s.batch):
        g = {"modules": list(shape.modules), "M": shape.M, "K": shape.K, "N": shape.N, "count": shape.count,
             "auto_filter": {r: torchao_auto_filter(shape, r) for r in s.recipes}}
        rec["gemms"].append(g)
        for part, case in (("linear", linear_case), ("kernel", kernel_case)):
            if part in s.parts:
                g[part] = {}
                for name, recipe in variants:
                    g[part][name] = runner(f"{part} {shape.modules} {name}",
                                           lambda: case(shape, recipe, s, device))
                _speedups(g[part], s.recipes)
    if "block" in s.parts:
        args = block_inputs(model, inputs, s.amp, device)
        rec["block"] = {}
        for name, recipe in variants:
            rec["block"][name] = runner(f"block {name}", lambda: block_case(model, args, recipe, s, device))
        _speedups(rec["block"], s.recipes)
        del args
    if "model" in s.parts:
        flops = 3 * forward_flops(cfg, s.px // 8, s.px // 8, s.text_len) * s.batch
        rec["model"] = {}
        for name, recipe in variants:
            rec["model"][name] = runner(f"model {name}", lambda: model_case(model, inputs, recipe, s, device,
                                                                              flops))
        _speedups(rec["model"], s.recipes)
    rec["summary"] = summarize(rec, s.recipes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--widths", default="", help="hidden sizes, comma separated (default: the preset's); the "
                    "preset's head dim and depth are kept")
    ap.add_argument("--px", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--recipes", default="tensorwise,rowwise", help=f"any of {', '.join(FP8_RECIPES)}")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"any of {', '.join(PARTS)}")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile every case (default on a GPU; off with --tiny unless asked for)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cross-attention", default="zpad")
    ap.add_argument("--profile", action="store_true", help="GPU kernel time by class of the block and model steps")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset, eager, fp32, on the CPU (plumbing only)")
    a = ap.parse_args(argv)

    split = lambda v: tuple(x for x in v.split(",") if x)   # noqa: E731
    over = {}
    if a.tiny:
        torch.set_num_threads(1)    # tiny ops: OpenMP barriers between threads cost more than they bring
        over = dict(preset="tiny", px=64, batch=2, text_len=8, compile=bool(a.compile), warmup=1, iters=2,
                    device="cpu", amp=False, profile=False)
    s = Settings(preset=a.preset, widths=tuple(int(w) for w in split(a.widths)), px=a.px, batch=a.batch,
                 text_len=a.text_len, recipes=split(a.recipes), parts=split(a.parts), compile=a.compile is not False,
                 warmup=a.warmup, iters=a.iters, cross_attention=a.cross_attention, profile=a.profile)
    s = s._replace(**over)
    try:
        s.validate()
        model_preset(s.preset)
    except (ValueError, KeyError) as e:
        ap.error(str(e))
    device = torch.device(s.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU with FP8 tensor cores; --tiny runs the CPU smoke test")
        from refgen.dit.fp8 import check_fp8_device

        check_fp8_device(device)
    import torchao

    widths = s.widths or (model_preset(s.preset).hidden_size,)
    out = {"settings": s._asdict(), "widths": []}

    prov = provenance(None, torchao=torchao.__version__, torch=torch.__version__,
                      device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      argv=sys.argv[1:] if argv is None else argv)

    def save():
        atomic_write_json(a.out, {**prov, **out})

    runner = Runner(s, a.tiny, save)
    for width in widths:
        rec: dict = {}
        out["widths"].append(rec)
        try:
            run_width(width, s, device, runner, rec)
        except torch.OutOfMemoryError as e:      # building the model itself: the width does not fit
            rec["error"] = f"OutOfMemoryError: {str(e).splitlines()[0][:200]}"
            runner.failed += 1
            print(f"width {width}: {rec['error']}")
            torch.cuda.empty_cache()
            continue
        save()
        print_width(rec, s.recipes, s.parts)
    save()
    return 1 if runner.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
