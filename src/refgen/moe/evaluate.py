"""`refgen moe eval`: the evaluation suite over a config matrix of setups x seeds x splits, resumable.

A setup is one operating point: a `refgen moe train` folder (run in PyTorch) or an export folder (run in ONNX
Runtime, fp32 or int8), with a method name that groups setups for the hypervolume. `{seed}` in a path picks a
per-seed model. Splits: 'clean' (the test split), '<corruption>@<severity>' for the 7 corruptions x severities
(corruptions.corrupt_set: the seed fixes every corrupted byte), and 'latency' (batch-1 median on one CPU thread,
measured once per setup at the first seed).

Each finished job appends one schema-checked record to OUT/eval_raw.jsonl; a rerun skips (setup, seed, split)
triples already there with status 'ok' and retries failed ones. More than `max_failed_fraction` of the jobs failing
aborts the run with a summary (exit 1). `--dry-run` lists the jobs and what would be skipped. The reports
(eval_matrix.md, robustness_curves.png, reliability_diagram.png, hypervolume.csv, eval.json) are rebuilt from the
JSONL after every run, so one command regenerates all of them.

Calibration: ECE / MCE on a seeded subsample (`calib_n`, 2,000 by default) of each split, before and after a
temperature fitted on the model's validation holdout (the split `refgen moe train` held out), per setup.
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
from refgen.moe.calibration import ece_mce, fit_temperature, reliability_bins, uncertainty
from refgen.moe.corruptions import CORRUPTIONS

RAW = "eval_raw.jsonl"
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
    },
    "allOf": [{"if": {"properties": {"status": {"const": "ok"}, "split": {"not": {"const": "latency"}}}},
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
class EvalConfig:
    setups: list[Setup] = field(default_factory=list)
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

    def __post_init__(self):
        from refgen.config import from_dict

        self.setups = [from_dict(Setup, s, section="setups") if isinstance(s, dict) else s for s in self.setups]
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
    return out


def done_triples(out: Path) -> set[tuple[str, int, str]]:
    from refgen.artifacts import read_jsonl

    p = out / RAW
    if not p.is_file():
        return set()
    return {(r["setup"], r["seed"], r["split"]) for r in read_jsonl(p) if r.get("status") == "ok"}


# ---- a setup as a predictor ------------------------------------------------------------------------------

@dataclass
class _Loaded:
    predict: object        # uint8 [N, H, W, C] -> logits
    data: object           # ImageSet
    val: tuple             # (x, y) validation holdout
    bytes: int
    temperature: float | None = None


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
    if split == "clean":
        rec["reliability"] = reliability_bins(logits[sub], y[sub])
        rec["reliability_ts"] = reliability_bins(logits[sub] / ld.temperature, y[sub])
    return rec


def run_matrix(cfg: EvalConfig, out: str | Path, dry_run: bool = False, progress: bool = True) -> dict:
    from jsonschema import validate
    from tqdm import tqdm

    from refgen.artifacts import JsonlLogger, git_commit

    out = Path(out)
    all_jobs, done = jobs(cfg), done_triples(out)
    todo = [j for j in all_jobs if j not in done]
    plan = {"jobs": len(all_jobs), "skipped_done": len(all_jobs) - len(todo), "to_run": len(todo),
            "todo": [f"{s} seed={d} {sp}" for s, d, sp in todo]}
    if dry_run:
        return plan
    if not cfg.setups:
        raise ValueError("the config has no setups")
    log, sha, commit = JsonlLogger(out / RAW), cfg.sha256(), git_commit()
    by_name = {s.name: s for s in cfg.setups}
    loaded: dict[tuple[str, int], tuple] = {}
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
                ld.temperature = fit_temperature(ld.predict(vx), vy)
                loaded[key] = (ld, kind)
            ld, kind = loaded[key]
            if split == "latency":
                med, p95 = _latency(kind, ld.data.shape, cfg.latency_iters)
                rec.update(latency_ms_median=med, latency_ms_p95=p95, unstable=p95 > 2 * med, threads=1,
                           bytes=ld.bytes)
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

def _ok_records(out: Path) -> list[dict]:
    from refgen.artifacts import read_jsonl

    latest = {}
    for r in read_jsonl(out / RAW):
        if r.get("status") == "ok":
            latest[(r["setup"], r["seed"], r["split"])] = r
    return list(latest.values())


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

    s = summarize(cfg, _ok_records(out))
    rows = list(s["setups"].values())[:cfg.max_plot_setups]
    files = {}
    if rows:
        robustness_curves(rows, cfg.corruptions, cfg.severities, out / "robustness_curves.png")
        clean = {r["setup"]: r for r in _ok_records(out) if r["split"] == "clean" and r["seed"] == cfg.seeds[0]}
        reliability_diagram([clean[r["setup"]] for r in rows if r["setup"] in clean], out / "reliability_diagram.png")
        files = {"robustness_curves": "robustness_curves.png", "reliability_diagram": "reliability_diagram.png"}
    atomic_write_text(out / "hypervolume.csv", "method,points,hypervolume\n" + "".join(
        f"{m},{v['points']},{v['hypervolume']:.6f}\n" for m, v in s["hypervolume"].items()))
    atomic_write_text(out / "eval_matrix.md", matrix_md(s, cfg))
    atomic_write_json(out / "eval.json", provenance(cfg, summary=s, files=files))
    return {"summary": s}


def _f(v, fmt):
    return "–" if v is None else format(v, fmt)


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
