"""`refgen moe eval`: the evaluation suite over a config matrix of setups x seeds x splits, resumable.

A setup is one operating point: a `refgen moe train` folder (run in PyTorch) or an export folder (run in ONNX
Runtime, fp32 or int8), with a method name that groups setups for the hypervolume. `{seed}` in a path picks a
per-seed model. Splits: 'clean' (the test split), '<corruption>@<severity>' for the 7 corruptions x severities
(corruptions.corrupt_set: the seed fixes every corrupted byte), and 'latency' (batch-1 median on one CPU thread,
measured once per setup at the first seed).

With `device` (e.g. `cuda`), each PyTorch setup gets one more job, 'device', at the first seed: batch-1 latency on
that device (CUDA events after warm-up, median / P95) and, with `energy`, NVML energy windows of >= `energy_seconds`
at batch `energy_batch` (monitor.energy_window: idle-subtracted J/image total and marginal). The summary divides the
setup's clean accuracy by them: accuracy per ms on the device and accuracy % per joule, the columns spec §8 asks
of the H200. ONNX setups are recorded as not measured there (ONNX Runtime runs on the CPU: their 'latency' job).
A device without an energy counter is refused before any stage or job runs (no number stands in for a joule).

`exports` and `compressions` name the artifacts the setups read (`refgen moe export` / `refgen moe compress` of a
train folder, `{seed}` expanding over the seeds): the command makes any that is not complete (an export folder
without its manifest, a compression folder without compress.json / compress.md / its plot) before the matrix, so one
command regenerates every report, the compression reports included; complete ones are skipped.

Each finished job appends one schema-checked record to OUT/eval_raw.jsonl; a rerun skips (setup, seed, split)
triples already there with status 'ok' and retries failed ones. More than `max_failed_fraction` of the jobs failing
aborts the run with a summary (exit 1). `--dry-run` lists the jobs and what would be skipped. The reports
(eval_matrix.md, robustness_curves.png, reliability_diagram.png, hypervolume.csv, eval.json) are rebuilt from the
JSONL after every run, so one command regenerates all of them.

Calibration: ECE / MCE on a seeded subsample (`calib_n`, 2,000 by default) of each split, before and after a
temperature fitted on the model's validation holdout (the split `refgen moe train` held out), per setup. With
`shift_temperature` (`--shift-temperature`) a second, shift-aware temperature is fitted per setup on a corrupted copy
of the same validation holdout (calibration.corrupted_validation: `shift_corruptions` x `shift_severities`,
`shift_copies` copies, the fixed seed `shift_seed`, recorded with the SHA-256 of the corrupted set) and reported
beside the clean one, which stays the default. Neither is ever fitted on test images (refused). The B5 rule (ECE
cut >= 20 % wherever the uncalibrated ECE > 2 %) is judged per setup and temperature on the clean split and on each
severity (ECE averaged over corruptions and seeds), and counted per (corruption, severity) split as well.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refgen.moe import onnxrun
from refgen.moe.calibration import (corrupted_validation, ece_mce, fit_temperature, refuse_test_images,
                                    reliability_bins, severity_mix, uncertainty)
from refgen.moe.corruptions import CORRUPTIONS
from refgen.moe.monitor import MIN_ENERGY_WINDOW_S

B5_ECE, B5_CUT = 0.02, 0.20   # B5: temperature scaling cuts ECE by >= 20 % wherever ECE > 2 %

RAW = "eval_raw.jsonl"
MEASURE_SPLITS = ("latency", "device")  # jobs that time or meter a setup: no accuracy, no calibration
RECORD_SCHEMA = {
    "type": "object",
    "required": ["setup", "method", "seed", "split", "status", "config_sha256", "git_commit"],
    "properties": {
        "setup": {"type": "string"}, "method": {"type": "string"}, "seed": {"type": "integer"},
        "split": {"type": "string"}, "status": {"enum": ["ok", "failed"]},
        "acc": {"type": "number", "minimum": 0, "maximum": 1}, "n": {"type": "integer", "minimum": 1},
        "ece": {"type": "number"}, "mce": {"type": "number"}, "ece_ts": {"type": "number"},
        "mce_ts": {"type": "number"}, "temperature": {"type": "number", "exclusiveMinimum": 0},
        "latency_ms_median": {"type": "number"}, "error": {"type": "string"},
        "ece_shift": {"type": "number"}, "mce_shift": {"type": "number"},
        "temperature_shift": {"type": "number", "exclusiveMinimum": 0},
        "shift": {"type": "object", "required": ["spec", "seed", "sha256", "n"]},
    },
    "allOf": [{"if": {"properties": {"status": {"const": "ok"},
                                   "split": {"not": {"enum": list(MEASURE_SPLITS)}}}},
               "then": {"required": ["acc", "n", "ece", "mce", "ece_ts", "mce_ts", "temperature"]}},
              {"if": {"properties": {"status": {"const": "failed"}}}, "then": {"required": ["error"]}}],
}


@dataclass
class Setup:
    name: str
    path: str                       # a train folder, or an export folder
    method: str = ""                # groups setups for the hypervolume (default: the name)
    file: str | None = None         # export folder: which ONNX file (default: the manifest's deployable)

    def __post_init__(self):
        self.method = self.method or self.name


@dataclass
class Stage:
    """An artifact the setups read, made before the matrix when it is not complete."""
    model: str                      # a `refgen moe train` folder; `{seed}` = one per seed
    out: str
    config: str | None = None       # YAML mirroring ExportConfig / CompressConfig (None = their defaults)


@dataclass
class EvalConfig:
    setups: list[Setup] = field(default_factory=list)
    exports: list[Stage] = field(default_factory=list)       # `refgen moe export` runs made first (if incomplete)
    compressions: list[Stage] = field(default_factory=list)  # `refgen moe compress` runs made first (if incomplete)
    seeds: tuple[int, ...] = (17, 42, 1337)
    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    latency: bool = True
    latency_iters: int = 200
    calib_n: int = 2000             # ECE subsample per split
    n_test: int | None = None       # cut the test split (smoke runs)
    cache: str | None = None
    batch: int = 256
    max_failed_fraction: float = 0.05
    cost: str = "latency_ms"        # hypervolume / modes cost: latency_ms or bytes
    max_plot_setups: int = 6
    shift_temperature: bool = False  # also fit T on a corrupted validation copy, reported beside the clean T
    shift_severities: tuple[int, ...] | str = "all"   # 0..5 (0 = clean copy) or all / mild / severe / all+clean
    shift_corruptions: tuple[str, ...] = CORRUPTIONS
    shift_copies: int = 5           # corrupted copies of each validation image
    shift_seed: int = 0             # fixes every corrupted validation byte; recorded
    device: str | None = None       # e.g. cuda: one 'device' job per setup (latency there, and energy): None = none
    energy: bool = True             # with device: NVML energy windows too (accuracy per joule)
    energy_seconds: float = 10.0    # per window, >= 5 s (NVML's counter refreshes every 20-100 ms)
    energy_batch: int = 256
    energy_idle_seconds: float = 5.0  # idle power measured just before each window
    device_latency_iters: int = 1000

    def __post_init__(self):
        from refgen.config import from_dict

        self.setups = [from_dict(Setup, s, section="setups") if isinstance(s, dict) else s for s in self.setups]
        for k in ("exports", "compressions"):
            setattr(self, k, [from_dict(Stage, s, section=k) if isinstance(s, dict) else s for s in getattr(self, k)])
        names = [s.name for s in self.setups]
        if len(set(names)) != len(names):
            raise ValueError(f"setup names must be unique, got {names}")
        bad = [c for c in self.corruptions if c not in CORRUPTIONS]
        if bad:
            raise ValueError(f"unknown corruption(s) {bad}; known: {list(CORRUPTIONS)}")
        if any(s not in (1, 2, 3, 4, 5) for s in self.severities):
            raise ValueError(f"severities must be in 1..5, got {self.severities}")
        if self.cost not in ("latency_ms", "bytes"):
            raise ValueError(f"cost must be latency_ms or bytes, got {self.cost!r}")
        if self.cost == "latency_ms" and not self.latency:
            raise ValueError("cost latency_ms needs latency: true")
        self.seeds, self.corruptions = tuple(int(s) for s in self.seeds), tuple(self.corruptions)
        self.severities = tuple(int(s) for s in self.severities)
        self.shift_severities = severity_mix(self.shift_severities)
        self.shift_corruptions = tuple(self.shift_corruptions)
        bad = [c for c in self.shift_corruptions if c not in CORRUPTIONS]
        if bad or not self.shift_corruptions:
            raise ValueError(f"shift_corruptions must be a non-empty subset of {list(CORRUPTIONS)}, got {bad or []}")
        if int(self.shift_copies) < 1:
            raise ValueError(f"shift_copies must be >= 1, got {self.shift_copies}")
        self.shift_copies, self.shift_seed = int(self.shift_copies), int(self.shift_seed)
        if self.device is not None and self.device.split(":")[0] not in ("cuda", "cpu"):
            raise ValueError(f"device must be cuda[:N] or cpu, got {self.device!r}")
        if (self.energy_seconds < MIN_ENERGY_WINDOW_S or self.energy_batch < 1 or self.device_latency_iters < 1
                or self.energy_idle_seconds <= 0):
            raise ValueError(f"need energy_seconds >= {MIN_ENERGY_WINDOW_S:g}, energy_batch >= 1, "
                             f"device_latency_iters >= 1 and energy_idle_seconds > 0, got {self.energy_seconds}, "
                             f"{self.energy_batch}, {self.device_latency_iters}, {self.energy_idle_seconds}")

    def shift_spec(self) -> str:
        """What the shift-aware temperature is fitted on; a record with another spec is not 'done'."""
        return (f"{','.join(self.shift_corruptions)} x sev {','.join(map(str, self.shift_severities))} x "
                f"{self.shift_copies} copies, seed {self.shift_seed}")

    @classmethod
    def from_yaml(cls, path, **overrides) -> EvalConfig:
        from refgen.config import from_yaml

        return from_yaml(cls, path, **overrides)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()


class EvalAborted(ValueError):
    """More than max_failed_fraction of the jobs failed; the message is the summary."""


def splits(cfg: EvalConfig) -> list[str]:
    return ["clean"] + [f"{c}@{s}" for c in cfg.corruptions for s in cfg.severities]


def jobs(cfg: EvalConfig) -> list[tuple[str, int, str]]:
    out = []
    for s in cfg.setups:
        for i, seed in enumerate(cfg.seeds):
            out += [(s.name, seed, sp) for sp in splits(cfg)]
            if cfg.latency and i == 0:
                out.append((s.name, seed, "latency"))
            if cfg.device and i == 0:
                out.append((s.name, seed, "device"))
    return out


STAGE_DONE = {"export": ("manifest.json",), "compress": ("compress.json", "compress.md", "compress_acc_vs_size.png")}


def stages(cfg: EvalConfig) -> list[tuple[str, str, str, str | None]]:
    """(kind, model, out, config) of every export and compression, `{seed}` expanded, in the order they run."""
    out = []
    for kind, items in (("export", cfg.exports), ("compress", cfg.compressions)):
        for s in items:
            for seed in cfg.seeds if "{seed}" in s.model + s.out else ("",):  # no {seed}: one stage
                out.append((kind, s.model.replace("{seed}", str(seed)), s.out.replace("{seed}", str(seed)), s.config))
    return out


def stage_done(kind: str, out: str) -> bool:
    return all((Path(out) / f).is_file() for f in STAGE_DONE[kind])


def run_stage(kind: str, model: str, out: str, config: str | None, cache: str | None, progress: bool) -> None:
    if kind == "export":
        from refgen.moe.export import ExportConfig, export_run

        export_run(model, out, ExportConfig.from_yaml(config) if config else ExportConfig(), cache=cache)
    else:
        from refgen.moe.compress import CompressConfig, compress_run

        compress_run(model, out, CompressConfig.from_yaml(config) if config else CompressConfig(), cache=cache,
                     progress=progress)


def done_triples(out: Path, cfg: EvalConfig | None = None) -> set[tuple[str, int, str]]:
    """Triples with an 'ok' record; with CFG's shift_temperature on, a calibration record counts only if it
    carries a shift-aware temperature fitted as CFG asks (same spec)."""
    from refgen.artifacts import read_jsonl

    p = out / RAW
    if not p.is_file():
        return set()
    spec = cfg.shift_spec() if cfg is not None and cfg.shift_temperature else None

    def done(r):
        if r.get("status") != "ok":
            return False
        return spec is None or r["split"] in MEASURE_SPLITS or (r.get("shift") or {}).get("spec") == spec
    return {(r["setup"], r["seed"], r["split"]) for r in read_jsonl(p) if done(r)}


# ---- a setup as a predictor ------------------------------------------------------------------------------

@dataclass
class _Loaded:
    predict: object        # uint8 [N, H, W, C] -> logits
    data: object           # ImageSet
    val: tuple             # (x, y) validation holdout
    bytes: int
    temperature: float | None = None
    temperature_shift: float | None = None
    shift: dict | None = None      # how the shift-aware temperature was fitted (recorded with every record)


def _load(setup: Setup, seed: int, cfg: EvalConfig):
    from refgen.moe import manifest as mf
    from refgen.moe.data import load_dataset, stratified_split

    path = Path(setup.path.replace("{seed}", str(seed)))
    if (path / mf.MANIFEST).is_file():
        man = mf.verify(path)
        f = setup.file or man["deployable"]
        sess = onnxrun.session(path / f)
        predict = lambda x: onnxrun.run(sess, onnxrun.to_input(x), man["input"]["max_batch"])[0]  # noqa: E731
        dataset, vf = man.get("dataset"), (man.get("source") or {}).get("val_fraction")
        nbytes, kind = mf.artifact_bytes(path / f)["total"], ("onnx", sess)
    elif (path / "model.safetensors").is_file():
        import torch

        from refgen.moe.export import deployable_from_info, torch_outputs
        from refgen.moe.train import load_model

        model, info = load_model(path)
        dep = deployable_from_info(model, info)
        predict = lambda x: torch_outputs(dep, onnxrun.to_input(x), cfg.batch)[0]  # noqa: E731
        dataset, vf = info["dataset"], info.get("config", {}).get("val_fraction")
        nbytes, kind = (path / "model.safetensors").stat().st_size, ("torch", dep)
        torch.set_num_threads(1)
    else:
        raise FileNotFoundError(f"setup {setup.name!r}: {path} is neither a `refgen moe train` folder "
                                f"(model.safetensors) nor an export folder (manifest.json)")
    if not vf:
        raise ValueError(f"setup {setup.name!r}: the model has no validation holdout (val_fraction 0): temperature "
                         f"scaling must not be fitted on training or test data")
    ds = load_dataset(dataset, cfg.cache, n_test=cfg.n_test)
    _, va = stratified_split(ds.y_train, vf, seed=0)
    return _Loaded(predict, ds, (ds.x_train[va], ds.y_train[va]), nbytes), kind


def _fit_shift(ld: _Loaded, cfg: EvalConfig, cache: dict, dup: int) -> None:
    """The shift-aware temperature of one loaded setup: fitted on the corrupted validation holdout (built once per
    validation set and spec, shared by the setups that have the same holdout)."""
    from refgen.moe.data import sha256_array

    vx, vy = ld.val  # already checked against the test split (refuse_test_images: DUP identical images)
    key = (sha256_array(vx), cfg.shift_spec())
    if key not in cache:
        cache[key] = corrupted_validation(vx, vy, cfg.shift_corruptions, cfg.shift_severities, cfg.shift_copies,
                                          cfg.shift_seed)
    sx, sy, meta = cache[key]
    z = ld.predict(sx)
    ld.temperature_shift = fit_temperature(z, sy)
    ld.shift = {"spec": cfg.shift_spec(), **meta, "val_test_duplicates": dup,
                "val_ece_t1": ece_mce(z, sy)["ece"], "val_ece_fitted": ece_mce(z / ld.temperature_shift, sy)["ece"]}


def _latency(kind, shape, iters: int) -> float:
    x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    if kind[0] == "onnx":
        name = kind[1].get_inputs()[0].name
        call = lambda: kind[1].run(None, {name: x})  # noqa: E731
    else:
        import torch

        xt = torch.from_numpy(x)

        def call():
            with torch.no_grad():
                kind[1](xt)
    for _ in range(10):  # warm-up, as spec §3 says
        call()
    t = []
    for _ in range(iters):
        s = time.perf_counter_ns()
        call()
        t.append((time.perf_counter_ns() - s) / 1e6)
    return float(np.median(t)), float(np.percentile(t, 95))


def _device_job(kind, shape, cfg: EvalConfig, counter) -> dict:
    """Batch-1 latency on cfg.device and (COUNTER given) energy windows at cfg.energy_batch, of a copy of the
    setup's PyTorch module moved there; an ONNX setup is recorded as not measured."""
    import copy

    import torch

    from refgen.moe.monitor import energy_window, measure_latency

    dev = torch.device(cfg.device)
    if kind[0] == "onnx":  # onnxruntime (not onnxruntime-gpu) here and on the H200 image: CPU only
        return {"device": str(dev), "not_measured": "an ONNX setup: ONNX Runtime runs on the CPU here (its 'latency' "
                                                    "job); the device numbers are its PyTorch source's"}
    module = copy.deepcopy(kind[1]).to(dev).eval()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x1 = torch.rand(1, *shape, device=dev)
    with torch.no_grad():
        lat = measure_latency(lambda: module(x1), dev, warmup=10, iters=cfg.device_latency_iters)
        rec = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "device_latency_ms_median": lat["median_ms"], "device_latency_ms_p95": lat["p95_ms"],
               "device_latency_clock": lat["clock"], **_graph_latency(module, x1, cfg.device_latency_iters)}
        if counter is not None:
            xb = torch.rand(cfg.energy_batch, *shape, device=dev)
            w = energy_window(lambda: module(xb), cfg.energy_batch, counter, min_seconds=cfg.energy_seconds,
                              idle_seconds=cfg.energy_idle_seconds, sync=sync)
            rec["energy"] = {**w, "batch": cfg.energy_batch,
                             "counter": getattr(counter, "name", type(counter).__name__)}
    return rec


def _graph_latency(module, x1, iters: int) -> dict:
    """Batch-1 latency of MODULE replayed as one CUDA graph, synchronised per call: the latency one request sees
    (B7 is judged on it; eager, a model this small is bound by kernel launches on a GPU). Checked against the eager
    forward on another input than the captured one first; where capture is impossible (no CUDA, a host sync in
    the forward) or the replay differs, the reason is recorded and nothing stands in for the number."""
    import torch

    from refgen.moe.monitor import CudaGraphCall, GraphCaptureUnsupported, measure_latency

    try:  # the deployable module returns (logits, gate weights); a graph replays one tensor
        call = CudaGraphCall(lambda x: module(x)[0], x1)
    except GraphCaptureUnsupported as e:
        return {"graph_not_measured": str(e)}
    x2 = torch.rand_like(x1)
    diff = float((call(x2).clone() - module(x2)[0]).abs().max())
    if diff > 1e-4:
        return {"graph_not_measured": f"the CUDA-graph replay differs from the eager forward: max |dlogit| {diff:.3g}"}
    lat = measure_latency(lambda: call(x1), x1.device, warmup=10, iters=iters, sync_each=True)
    return {"graph_latency_ms_median": lat["median_ms"], "graph_latency_ms_p95": lat["p95_ms"],
            "graph_max_abs_diff": diff}


def _energy_counter(cfg: EvalConfig, counter=None):
    """The energy counter of cfg.device, or None when energy is off; refuses a device without one."""
    if not cfg.device or not cfg.energy:
        return None
    if counter is not None:
        return counter
    import torch

    from refgen.moe.monitor import EnergyUnavailable, NvmlEnergy

    dev = torch.device(cfg.device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise EnergyUnavailable(f"energy: true needs a CUDA device with NVML, got device {cfg.device!r} on a machine "
                                f"{'with' if torch.cuda.is_available() else 'without'} CUDA; set energy: false for "
                                f"latency only (--no-energy)")
    return NvmlEnergy(dev.index or 0)


def _evaluate(ld: _Loaded, split: str, seed: int, cfg: EvalConfig) -> dict:
    from refgen.moe.corruptions import corrupt_set

    x, y = ld.data.x_test, ld.data.y_test
    if split != "clean":
        name, sev = split.split("@")
        x = corrupt_set(x, name, int(sev), seed)
    logits = ld.predict(x)
    acc = float((logits.argmax(1) == y).mean())
    sub = np.random.default_rng([seed, 7]).permutation(len(y))[:cfg.calib_n]
    before, after = ece_mce(logits[sub], y[sub]), ece_mce(logits[sub] / ld.temperature, y[sub])
    rec = {"acc": acc, "n": int(len(y)), "ece": before["ece"], "mce": before["mce"], "ece_ts": after["ece"],
           "mce_ts": after["mce"], "temperature": ld.temperature, "calib_n": int(len(sub)),
           **uncertainty(logits)}
    if ld.temperature_shift is not None:
        shifted = ece_mce(logits[sub] / ld.temperature_shift, y[sub])
        rec.update(ece_shift=shifted["ece"], mce_shift=shifted["mce"], temperature_shift=ld.temperature_shift,
                   shift=ld.shift)
    if split == "clean":
        rec["reliability"] = reliability_bins(logits[sub], y[sub])
        rec["reliability_ts"] = reliability_bins(logits[sub] / ld.temperature, y[sub])
    return rec


def run_matrix(cfg: EvalConfig, out: str | Path, dry_run: bool = False, progress: bool = True,
               energy_counter=None) -> dict:
    """ENERGY_COUNTER: a counter with read_mj() (and name) for the device jobs instead of NVML's (tests)."""
    from jsonschema import validate
    from tqdm import tqdm

    from refgen.artifacts import JsonlLogger, git_commit

    out = Path(out)
    all_jobs, done = jobs(cfg), done_triples(out, cfg)
    todo = [j for j in all_jobs if j not in done]
    st = stages(cfg)
    st_todo = [s for s in st if not stage_done(s[0], s[2])]
    plan = {"jobs": len(all_jobs), "skipped_done": len(all_jobs) - len(todo), "to_run": len(todo),
            "stages": len(st), "stages_to_run": len(st_todo),
            "todo": [f"{k} {m} -> {o}" for k, m, o, _ in st_todo] + [f"{s} seed={d} {sp}" for s, d, sp in todo]}
    if dry_run:
        return plan
    if not cfg.setups:
        raise ValueError("the config has no setups")
    # refused before anything runs: no stage or job is spent on a run that cannot measure what it was asked to
    counter = _energy_counter(cfg, energy_counter) if any(j[2] == "device" for j in todo) else None
    for kind, model, o, conf in st_todo:  # the artifacts the setups read; a failure here stops the run
        stage = f"stage `refgen moe {kind} --model {model} --out {o}`"
        try:
            run_stage(kind, model, o, conf, cfg.cache, progress)
        except (FileNotFoundError, ValueError) as e:  # bad input stays bad input: one line from the CLI
            raise ValueError(f"{stage} failed: {type(e).__name__}: {e}") from e
        except Exception as e:  # anything else is a bug to be read in its traceback, which names the stage
            e.add_note(f"in {stage}")
            raise
    log, sha, commit = JsonlLogger(out / RAW), cfg.sha256(), git_commit()
    by_name = {s.name: s for s in cfg.setups}
    loaded: dict[tuple[str, int], tuple] = {}
    shift_sets: dict = {}
    failed: list[str] = []
    bar = tqdm(todo, desc="moe eval", disable=not progress)
    for name, seed, split in bar:
        setup = by_name[name]
        rec = {"setup": name, "method": setup.method, "seed": seed, "split": split, "config_sha256": sha,
               "git_commit": commit}
        t = time.perf_counter()
        try:
            key = (name, seed if "{seed}" in setup.path else 0)
            if key not in loaded:
                ld, kind = _load(setup, seed, cfg)
                vx, vy = ld.val
                dup = refuse_test_images(vx, ld.data.x_test)
                ld.temperature = fit_temperature(ld.predict(vx), vy)
                if cfg.shift_temperature:
                    _fit_shift(ld, cfg, shift_sets, dup)
                loaded[key] = (ld, kind)
            ld, kind = loaded[key]
            if split == "latency":
                med, p95 = _latency(kind, ld.data.shape, cfg.latency_iters)
                rec.update(latency_ms_median=med, latency_ms_p95=p95, unstable=p95 > 2 * med, threads=1,
                           bytes=ld.bytes)
            elif split == "device":
                rec.update(_device_job(kind, ld.data.shape, cfg, counter), bytes=ld.bytes)
            else:
                rec.update(_evaluate(ld, split, seed, cfg), bytes=ld.bytes)
            rec["status"] = "ok"
        except Exception as e:  # a job's failure is data: recorded, counted, retried on the next run
            rec.update(status="failed", error=f"{type(e).__name__}: {e}")
            failed.append(f"{name} seed={seed} {split}: {rec['error']}")
        rec["seconds"] = time.perf_counter() - t
        validate(rec, RECORD_SCHEMA)
        log.log(**rec)
        if len(failed) > cfg.max_failed_fraction * len(all_jobs):
            bar.close()
            raise EvalAborted(f"{len(failed)} of {len(all_jobs)} jobs failed (> {cfg.max_failed_fraction:.0%}); "
                              f"aborted. First failures: " + "; ".join(failed[:3]) + f". Records: {out / RAW}")
    bar.close()
    return {**plan, "failed": failed, **write_reports(cfg, out)}


# ---- reports ------------------------------------------------------------------------------------------

def _latest_records(out: Path) -> tuple[list[dict], list[str]]:
    """(the latest 'ok' record of every triple, the triples whose latest record failed), from one read of the raw
    records: the reports name the failed ones, so a missing row is never silent (a later run's 'ok' clears one)."""
    from refgen.artifacts import read_jsonl

    ok, latest = {}, {}
    for r in read_jsonl(out / RAW):
        key = (r["setup"], r["seed"], r["split"])
        latest[key] = r
        if r.get("status") == "ok":
            ok[key] = r
    failed = [f"{k[0]} seed={k[1]} {k[2]}: {r['error']}" for k, r in latest.items() if r.get("status") == "failed"]
    return list(ok.values()), failed


def _cut(before: float, after: float) -> float:
    """Relative ECE cut in % (negative: the temperature made ECE worse)."""
    return 100 * (before - after) / before if before > 0 else 0.0


def _b5_rule(levels: dict, key: str) -> dict:
    """B5 for one temperature over LEVELS ({name: {'ece', KEY}}): met iff the cut is >= 20 % wherever the
    uncalibrated ECE > 2 %; 'vacuous' when no level has ECE > 2 %; 'worsened' lists levels the temperature pushed
    above max(ECE, 2 %) (not part of the rule, reported beside it)."""
    applies = [k for k, d in levels.items() if key in d and d["ece"] > B5_ECE]
    failing = [k for k in applies if levels[k][key] > (1 - B5_CUT) * levels[k]["ece"]]
    worse = [k for k, d in levels.items() if key in d and d[key] > max(d["ece"], B5_ECE)]
    return {"met": not failing, "vacuous": not applies, "applies": applies, "failing": failing, "worsened": worse}


def calibration_summary(cfg: EvalConfig, mine: list[dict]) -> dict:
    """Per level (clean, sevN = mean over corruptions and seeds): ECE / MCE before and after each temperature and
    the cut in %; the B5 verdict per temperature at that level, and counted per (corruption, severity) split."""
    temps = [("clean_t", "ece_ts", "mce_ts")] + ([("shift_t", "ece_shift", "mce_shift")]
                                                 if any("ece_shift" in r for r in mine) else [])
    groups = {"clean": [r for r in mine if r["split"] == "clean"]}
    groups.update({f"sev{v}": [r for r in mine if r["split"].endswith(f"@{v}")] for v in cfg.severities})
    per_split: dict[str, list] = {}
    for r in mine:
        if "@" in r["split"]:
            per_split.setdefault(r["split"], []).append(r)

    def mean_level(rs):
        d = {"records": len(rs)}
        for k in ("ece", "mce") + tuple(x for _, a, b in temps for x in (a, b)):
            if rs and all(k in r for r in rs):
                d[k] = float(np.mean([r[k] for r in rs]))
        for t, a, _ in temps:
            if a in d:
                d[f"cut_{t}"] = _cut(d["ece"], d[a])
        return d

    levels = {k: mean_level(rs) for k, rs in groups.items() if rs}
    splits_ = {k: mean_level(rs) for k, rs in per_split.items()}
    b5 = {}
    for t, a, _ in temps:
        b5[t] = _b5_rule(levels, a)
        strict = _b5_rule(splits_, a)
        b5[t].update(splits_applying=len(strict["applies"]), splits_failing=len(strict["failing"]))
    return {"levels": levels, "b5": b5}


def _device_summary(acc: float, recs: list[dict]) -> dict | None:
    """Accuracy per ms on the device and accuracy % per joule (total, marginal) from the setup's device job."""
    from refgen.moe.bench import accuracy_per_joule

    if not recs:
        return None
    r = recs[0]
    if "not_measured" in r:
        return {"device": r["device"], "not_measured": r["not_measured"]}
    d = {k: r[k] for k in ("device", "device_name", "device_latency_ms_median", "device_latency_ms_p95")}
    d["acc_per_ms"] = acc / r["device_latency_ms_median"]
    if "graph_latency_ms_median" in r:
        d.update(graph_latency_ms_median=r["graph_latency_ms_median"], graph_latency_ms_p95=r["graph_latency_ms_p95"],
                 graph_acc_per_ms=acc / r["graph_latency_ms_median"])
    else:
        d["graph_not_measured"] = r.get("graph_not_measured", "not recorded")
    if "energy" in r:
        w = r["energy"]
        d.update(j_per_image_total=w["j_per_image_total"], j_per_image_marginal=w["j_per_image_marginal"],
                 energy_window_s=w["seconds"], energy_batch=w["batch"], avg_w=w["avg_w"], idle_w=w["idle_w"],
                 **accuracy_per_joule(acc, w))
    return d


def summarize(cfg: EvalConfig, recs: list[dict]) -> dict:
    from refgen.moe.pareto import hypervolume, operating_modes

    rows = {}
    for s in cfg.setups:
        mine = [r for r in recs if r["setup"] == s.name]
        clean = [r for r in mine if r["split"] == "clean"]
        if not clean:
            continue
        acc = np.array([r["acc"] for r in clean])
        by_split = {}
        for r in mine:
            if "@" in r["split"]:
                by_split.setdefault(r["split"], []).append(r["acc"])
        sev = {f"{c}@{v}": float(np.mean(by_split[f"{c}@{v}"])) for c in cfg.corruptions for v in cfg.severities
               if f"{c}@{v}" in by_split}
        drops3 = {c: 100 * (sev[f"{c}@3"] - acc.mean()) for c in cfg.corruptions if f"{c}@3" in sev}
        lat = [r for r in mine if r["split"] == "latency"]
        row = {"setup": s.name, "method": s.method, "seeds": len(clean), "acc": float(acc.mean()),
               "acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
               "ece": float(np.mean([r["ece"] for r in clean])), "ece_ts": float(np.mean([r["ece_ts"] for r in clean])),
               "mce": float(np.mean([r["mce"] for r in clean])), "temperature": clean[0]["temperature"],
               "bytes": clean[0]["bytes"], "acc_by_split": sev, "drop_pp_severity3": drops3,
               "mean_drop_pp_severity3": float(np.mean(list(drops3.values()))) if drops3 else None,
               "relative_robustness_severity3": (float(np.mean([sev[f"{c}@3"] for c in drops3])) / acc.mean()
                                                 if drops3 else None),
               "latency_ms_median": lat[0]["latency_ms_median"] if lat else None,
               "latency_unstable": lat[0]["unstable"] if lat else None}
        oods3 = [r for r in mine if r["split"].endswith("@3")]
        row["ece_severity3"] = float(np.mean([r["ece"] for r in oods3])) if oods3 else None
        row["ece_ts_severity3"] = float(np.mean([r["ece_ts"] for r in oods3])) if oods3 else None
        row["temperature_shift"] = clean[0].get("temperature_shift")
        row["shift"] = clean[0].get("shift")
        row["calibration"] = calibration_summary(cfg, [r for r in mine if r["split"] not in MEASURE_SPLITS])
        row["device"] = _device_summary(row["acc"], [r for r in mine if r["split"] == "device"])
        row["acc_per_ms"] = row["acc"] / row["latency_ms_median"] if row["latency_ms_median"] else None
        row["cost"] = row["latency_ms_median"] if cfg.cost == "latency_ms" else row["bytes"]
        rows[s.name] = row
    valid = [r for r in rows.values() if r["cost"] is not None]
    scale = max((r["cost"] for r in valid), default=1.0) or 1.0
    hv = {}
    for m in sorted({r["method"] for r in valid}):
        pts = [(1 - r["acc"], r["cost"] / scale) for r in valid if r["method"] == m]
        hv[m] = {"hypervolume": hypervolume(pts), "points": len(pts)}
    return {"setups": rows, "hypervolume": hv, "cost": cfg.cost, "cost_scale": scale,
            "modes": operating_modes(valid)}


def write_reports(cfg: EvalConfig, out: Path) -> dict:
    from refgen.artifacts import atomic_write_json, atomic_write_text, provenance
    from refgen.moe.plots import reliability_diagram, robustness_curves

    recs, failed = _latest_records(out)
    s = {**summarize(cfg, recs), "failed": failed}
    rows = list(s["setups"].values())[:cfg.max_plot_setups]
    files = {}
    if rows:
        robustness_curves(rows, cfg.corruptions, cfg.severities, out / "robustness_curves.png")
        clean = {r["setup"]: r for r in recs if r["split"] == "clean" and r["seed"] == cfg.seeds[0]}
        reliability_diagram([clean[r["setup"]] for r in rows if r["setup"] in clean], out / "reliability_diagram.png")
        files = {"robustness_curves": "robustness_curves.png", "reliability_diagram": "reliability_diagram.png"}
    atomic_write_text(out / "hypervolume.csv", "method,points,hypervolume\n" + "".join(
        f"{m},{v['points']},{v['hypervolume']:.6f}\n" for m, v in s["hypervolume"].items()))
    atomic_write_text(out / "eval_matrix.md", matrix_md(s, cfg))
    atomic_write_json(out / "eval.json", provenance(cfg, summary=s, files=files))
    return {"summary": s}


def _f(v, fmt):
    return "–" if v is None else format(v, fmt)


def _verdict(b: dict) -> str:
    if b["vacuous"]:
        v = "met (no ECE > 2 %)"
    else:
        v = "met" if b["met"] else "**not met** (" + ", ".join(b["failing"]) + ")"
    v += f"; splits {b['splits_applying'] - b['splits_failing']}/{b['splits_applying']}"
    return v + (f"; worse: {', '.join(b['worsened'])}" if b["worsened"] else "")


def calibration_md(s: dict, cfg: EvalConfig) -> list[str]:
    rows = list(s["setups"].values())
    if not rows:
        return []
    shift = any(r["temperature_shift"] is not None for r in rows)
    levels = ["clean"] + [f"sev{v}" for v in cfg.severities]
    what = ("ECE → after clean-fitted T (cut %)" + (" → after shift-aware T (cut %)" if shift else "") +
            "; a negative cut = worse")
    out = ["", f"Calibration (B5: cut ≥ {B5_CUT:.0%} wherever ECE > {B5_ECE:.0%}; sevN = mean over corruptions and "
               f"seeds; 'splits' = per (corruption, severity) split, mean over seeds): {what}", ""]
    if shift:
        sets = {r["shift"]["sha256"]: (r["shift"], [q["setup"] for q in rows if (q["shift"] or {}).get("sha256")
                                                     == r["shift"]["sha256"]]) for r in rows if r["shift"]}
        for sh, who in sets.values():
            out += [f"Shift-aware T ({', '.join(who)}) fitted on {sh['n']:,} corrupted validation images "
                    f"({sh['copies']} copies of {sh['val_n']:,}; {', '.join(sh['corruptions'])}; severities "
                    f"{sh['severities']} (0 = clean); seed {sh['seed']}; SHA-256 {sh['sha256'][:12]}…); never on "
                    f"test images.", ""]
    head = ["setup", "T clean"] + (["T shift"] if shift else []) + levels + ["B5 clean T"] + (["B5 shift T"] if shift
                                                                                           else [])
    out += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        c = r["calibration"]
        cells = [r["setup"], f"{r['temperature']:.3f}"] + ([_f(r["temperature_shift"], ".3f")] if shift else [])
        for lv in levels:
            d = c["levels"].get(lv)
            if not d or "ece" not in d:
                cells.append("–")
                continue
            txt = f"{d['ece']:.4f} → {d['ece_ts']:.4f} ({d['cut_clean_t']:+.0f} %)"
            if shift and "ece_shift" in d:
                txt += f" → {d['ece_shift']:.4f} ({d['cut_shift_t']:+.0f} %)"
            cells.append(txt)
        cells += [_verdict(c["b5"][t]) for t in (["clean_t", "shift_t"] if shift else ["clean_t"]) if t in c["b5"]]
        out.append("| " + " | ".join(cells) + " |")
    return out


def matrix_md(s: dict, cfg: EvalConfig) -> str:
    lines = ["# refgen moe eval", "",
             f"Seeds {list(cfg.seeds)}; corruptions {list(cfg.corruptions)}; severities {list(cfg.severities)}; "
             f"ECE/MCE on {cfg.calib_n}-image subsamples, 15 bins; latency: batch 1, one CPU thread, median.", "",
             "| setup | method | seeds | clean acc | ECE → TS | T | mean drop @3 (pp) | Acc_OOD/Acc_ID @3 | "
             "ECE@3 → TS | latency ms | acc/ms | bytes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in s["setups"].values():
        lines.append(f"| {r['setup']} | {r['method']} | {r['seeds']} | {100 * r['acc']:.2f} ± {100 * r['acc_std']:.2f} % | "
                     f"{r['ece']:.4f} → {r['ece_ts']:.4f} | {r['temperature']:.3f} | "
                     f"{_f(r['mean_drop_pp_severity3'], '+.2f')} | {_f(r['relative_robustness_severity3'], '.3f')} | "
                     f"{_f(r['ece_severity3'], '.4f')} → {_f(r['ece_ts_severity3'], '.4f')} | "
                     f"{_f(r['latency_ms_median'], '.3f')}{' (unstable)' if r['latency_unstable'] else ''} | "
                     f"{_f(r['acc_per_ms'], '.3f')} | {r['bytes']:,} |")
    if s.get("failed"):
        lines += ["", f"**{len(s['failed'])} job(s) failed** (their rows are missing or partial; the next run retries "
                      "them):", ""] + [f"- {f}" for f in s["failed"]]
    dev = [r for r in s["setups"].values() if r.get("device")]
    if dev:
        lines += ["", "On the device (batch-1 latency, after 10 warm-up calls, median: eager with CUDA events on a GPU; "
                      "as one CUDA graph synchronised per call, the latency a request sees; energy: "
                      f"NVML windows >= {cfg.energy_seconds:g} s at batch {cfg.energy_batch}, eager, idle-subtracted = "
                      "marginal; accuracy = the clean accuracy above, mean over seeds):", "",
                  "| setup | device | latency ms eager (P95) | acc/ms eager | latency ms CUDA graph (P95) | "
                  "acc/ms graph | J/image total | J/image marginal | acc %/J total | acc %/J marginal |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in dev:
            d = r["device"]
            if "not_measured" in d:
                lines.append(f"| {r['setup']} | {d['device']} | {d['not_measured']} | | | | | | | |")
                continue
            graph = (f"{d['graph_latency_ms_median']:.3f} ({d['graph_latency_ms_p95']:.3f}) | "
                     f"{d['graph_acc_per_ms']:.3f}" if "graph_latency_ms_median" in d
                     else f"not measured: {d['graph_not_measured']} | –")
            lines.append(f"| {r['setup']} | {d['device_name']} | {d['device_latency_ms_median']:.3f} "
                         f"({d['device_latency_ms_p95']:.3f}) | {d['acc_per_ms']:.3f} | {graph} | "
                         f"{_f(d.get('j_per_image_total'), '.3e')} | {_f(d.get('j_per_image_marginal'), '.3e')} | "
                         f"{_f(d.get('acc_pct_per_j_total'), '.4g')} | {_f(d.get('acc_pct_per_j_marginal'), '.4g')} |")
    lines += calibration_md(s, cfg)
    lines += ["", "Per-type drop at severity 3 (pp):", "", "| setup | " + " | ".join(cfg.corruptions) + " |",
              "| --- |" + " --- |" * len(cfg.corruptions)]
    for r in s["setups"].values():
        lines.append(f"| {r['setup']} | " + " | ".join(_f(r["drop_pp_severity3"].get(c), "+.1f")
                                                       for c in cfg.corruptions) + " |")
    lines += ["", f"Hypervolume (error × {s['cost']} / {s['cost_scale']:.4g}, reference (1, 1.1)):", ""]
    lines += [f"- {m}: {v['hypervolume']:.4f} over {v['points']} point(s)" for m, v in s["hypervolume"].items()]
    if s["modes"]:
        lines += ["", "Operating modes (quality-max = best accuracy; balanced = best accuracy per normalised cost; "
                      "cost-saving = cheapest within 1 pp of the best): " + ", ".join(
                          f"{k} = {v}" for k, v in s["modes"].items())]
    return "\n".join(lines) + "\n"
