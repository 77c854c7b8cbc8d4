"""`refgen moe compress`: PTQ, QAT, structured iterative pruning and SVD low-rank on a trained MoE, each exported
as a deployable folder and measured against the float model on the same test split.

    OUT/baseline/   the float model exported (fp32 ONNX, int8 ONNX = PTQ, .pt2, manifest)
    OUT/qat/        torchao pt2e QAT, int8 ONNX + manifest
    OUT/prune/      torch-pruning, channels removed in `prune_steps` steps with fine-tuning between; full export
    OUT/lowrank/    SVD factorisation at the automatically chosen energy; full export
    OUT/int4/       int4 *storage* (refgen.moe.int4): experts' weights int4, gate int8 or fp32 per config, one
                    safetensors file dequantised at load into the float model + manifest
    OUT/prune+int4/, OUT/lowrank+int4/   the same storage of the pruned / factorised model (methods prune or
                    lowrank together with int4): the smallest artifacts
    OUT/ablate/     the spec's ablations: int8 and int4 with the experts only quantised vs the gate quantised too,
                    and the experts only pruned (int8-experts, int8-experts+gate, int4-experts, int4-experts+gate,
                    prune-experts)
    OUT/compress_acc_vs_size.png   test accuracy vs artifact bytes of every variant, the byte budget marked
    OUT/compress.json   provenance, every variant's bytes / accuracy / drop / pass flags
    OUT/compress.md     the same as a table
    OUT/compress.jsonl  one record per step (pruning steps, rank sweep), written as it goes

Accuracy drop ΔAcc = Acc(variant) − Acc(float model), both on the test split, in pp; a threshold "drop at most x"
is ΔAcc >= −x (spec §7.2). Bytes are the deployable files as `manifest.artifact_bytes` counts them (the graph and
its external data). Savings compare like with like: pruned / factorised fp32 against the float model's fp32
export (their int8 exports are reported beside, as the "combined" variants), PTQ / QAT int8 against fp32.
Selection (the rank sweep) uses the validation holdout, never the test split. The int4 variants are evaluated
as the float model their file loads into (PyTorch, like the pruned / factorised rows' accuracy); their bytes are
the one file written. Every row that has a gate reports the top-k agreement of its gate with the fp32 ONNX gate;
the combined rows (`+ptq`, `+int4`) with their own parent's fp32 gate (what the quantisation changed), a `+int4`
row also with the float model's (`gate_topk_agreement_vs_float`).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from refgen.moe import int4 as i4
from refgen.moe import manifest as mf
from refgen.moe import onnxrun
from refgen.moe.lowrank import within_drop
from refgen.moe.export import FP32, INT8, Deployable, ExportConfig, calibration_images, deployable_from_info, \
    export_model, export_onnx, quantize_int8, strip_metadata, torch_outputs, write_manifest

METHODS = ("ptq", "qat", "prune", "lowrank", "int4", "ablate")


@dataclass
class CompressConfig:
    methods: tuple[str, ...] = METHODS
    export: ExportConfig = field(default_factory=ExportConfig)
    batch_size: int = 64
    seed: int = 0
    qat_epochs: int = 5                  # spec: 5-10
    qat_lr: float = 1e-4
    prune_ratio: float = 0.4             # share of prunable channels removed after the last step
    prune_steps: int = 3
    prune_finetune_epochs: int = 1       # after every step
    prune_lr: float = 1e-3
    lowrank_energies: tuple[float, ...] = (0.7, 0.8, 0.9, 0.95, 0.98)
    lowrank_finetune_epochs: int = 1
    lowrank_lr: float = 5e-4
    lowrank_skip: tuple[str, ...] = ("model.gate", "model.graph")  # routing stays as trained
    # acceptance (spec B2), drops in pp
    ptq_max_drop_pp: float = 2.0
    qat_max_drop_pp: float = 1.0
    prune_max_drop_pp: float = 2.0
    prune_min_saving: float = 0.20
    lowrank_max_drop_pp: float = 1.0
    lowrank_min_saving: float = 0.15
    # int4 storage (spec: «Gate int8, Experten int4 per Config»): weights of these modules int4, the gate's int8 or
    # fp32, every other conv / linear weight (stem, graph, head) int8 or fp32; biases, norms, buffers stay fp32
    int4_modules: tuple[str, ...] = ("model.experts",)
    int4_gate: str = "int8"
    int4_other: str = "fp32"
    int4_max_drop_pp: float = 2.0        # the spec's overall bound: drop at most 2 pp below 1 MB

    def __post_init__(self):
        if isinstance(self.export, dict):
            from refgen.config import from_dict

            self.export = from_dict(ExportConfig, self.export, section="export")
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown compression method(s) {bad}; known: {list(METHODS)}")
        self.lowrank_energies = tuple(float(e) for e in self.lowrank_energies)
        self.lowrank_skip = tuple(self.lowrank_skip)
        if not 0 < self.prune_ratio < 1 or self.prune_steps < 1:
            raise ValueError(f"prune_ratio must be in (0, 1) and prune_steps >= 1, got {self.prune_ratio}, "
                             f"{self.prune_steps}")
        if not self.lowrank_energies or not all(0 < e <= 1 for e in self.lowrank_energies):
            raise ValueError(f"lowrank_energies must be in (0, 1], got {self.lowrank_energies}")
        self.int4_modules = tuple(str(m) for m in (self.int4_modules or ()))
        if not self.int4_modules:
            raise ValueError("int4_modules must name at least one module (e.g. model.experts)")
        if any(m == "model.gate" or m.startswith("model.gate.") for m in self.int4_modules):
            raise ValueError("int4_modules must not contain the gate: its precision is int4_gate (int8 or fp32)")
        for k in ("int4_gate", "int4_other"):
            if getattr(self, k) not in ("int8", "fp32"):
                raise ValueError(f"{k} must be 'int8' or 'fp32', got {getattr(self, k)!r}")
        for k in ("qat_epochs", "prune_finetune_epochs", "lowrank_finetune_epochs"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")

    @classmethod
    def from_yaml(cls, path, **overrides) -> CompressConfig:
        from refgen.config import from_yaml

        return from_yaml(cls, path, **overrides)


@dataclass
class _Data:
    x_fit: np.ndarray
    y_fit: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_train: np.ndarray  # all training images (int8 calibration)


def _split(ds, val_fraction: float) -> _Data:
    from refgen.moe.data import stratified_split

    if not val_fraction:
        raise ValueError("the model was trained with val_fraction 0: compression needs its validation holdout to "
                         "choose ranks without looking at the test split")
    tr, va = stratified_split(ds.y_train, val_fraction, seed=0)  # the split `refgen moe train` held out
    return _Data(ds.x_train[tr], ds.y_train[tr], ds.x_train[va], ds.y_train[va], ds.x_test, ds.y_test, ds.x_train)


def _onnx_acc(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    lg, pr = onnxrun.run(onnxrun.session(path), onnxrun.to_input(x))
    return float((lg.argmax(1) == y).mean()), pr


def _row(method, bytes_, ref_bytes, acc, ref_acc, max_drop, min_saving=None, budget=mf.BUDGET_BYTES, gated=True,
         **extra):
    saved = 1 - bytes_ / ref_bytes
    drop = 100 * (acc - ref_acc)
    ok = within_drop(drop, max_drop) and (min_saving is None or saved >= min_saving)
    return {"method": method, "bytes": bytes_, "ref_bytes": ref_bytes, "saved": saved, "acc": acc,
            "ref_acc": ref_acc, "drop_pp": drop, "max_drop_pp": max_drop, "min_saving": min_saving,
            "within_budget": bytes_ <= budget, "pass": bool(ok and bytes_ <= budget) if gated else None, **extra}


def compress(deployable: Deployable, out: str | Path, cfg: CompressConfig, data: _Data, meta: dict | None = None,
             progress: bool = True) -> dict:
    from tqdm import tqdm

    from refgen.artifacts import JsonlLogger, atomic_write_json, atomic_write_text, provenance
    from refgen.moe.finetune import accuracy, finetune

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = JsonlLogger(out / "compress.jsonl")
    ecfg, t0 = cfg.export, time.perf_counter()
    shape = (data.x_test.shape[3], data.x_test.shape[1], data.x_test.shape[2])
    bar = tqdm(total=1 + len(cfg.methods), desc="moe compress", disable=not progress)

    def export(module, name):
        return export_model(module, out / name, ecfg, data.x_train, data.x_test, data.y_test, meta)

    base = export(deployable, "baseline")
    ref_acc = base["checks"]["parity_fp32"]["torch_acc"]
    ref32, ref8 = base["models"]["fp32"]["bytes"], base["models"].get("int8", {}).get("bytes")
    _, ref_probs = _onnx_acc(out / "baseline" / "model.onnx", data.x_test, data.y_test)
    log.log(kind="baseline", acc=ref_acc, bytes_fp32=ref32, bytes_int8=ref8)
    bar.update(1)
    rows, k = [], deployable.model.cfg.top_k
    xt = onnxrun.to_input(data.x_test)

    def int4_row(name, folder, rules, other, max_drop, gated=True, source=None, gate_ref=None, **extra):
        """int4 storage of SOURCE (default the float model; a pruned or factorised one for the combined rows):
        written, reloaded (dequantised), evaluated like the pruned rows, its gate compared with GATE_REF (the
        gate probabilities of SOURCE's fp32 ONNX; default the float model's)."""
        d = out / folder
        d.mkdir(parents=True, exist_ok=True)
        (d / mf.MANIFEST).unlink(missing_ok=True)
        st = i4.save(deployable if source is None else source, d / i4.FILE, rules, other)
        lg, pr = torch_outputs(i4.load(d / i4.FILE), xt)
        acc = float((lg.argmax(1) == data.y_test).mean())
        agree = onnxrun.topk_agreement(ref_probs if gate_ref is None else gate_ref, pr, k)
        if gate_ref is not None:
            extra["gate_topk_agreement_vs_float"] = onnxrun.topk_agreement(ref_probs, pr, k)
        b = {"files": {i4.FILE: (d / i4.FILE).stat().st_size}}  # the whole artifact: i4.load needs nothing else
        b["total"] = sum(b["files"].values())
        write_manifest(d, ecfg, {"int4": {"file": i4.FILE, "files": [i4.FILE], "bytes": b["total"]}}, i4.FILE, b,
                       {"int4": {"acc": acc, "gate_topk_agreement": agree, "rules": rules, "other": other,
                                 "values": st["precisions"], "layers": st["layers"]}}, shape, deployable.model.cfg,
                       meta)
        row = _row(name, b["total"], ref32, acc, ref_acc, max_drop, budget=ecfg.budget_bytes, gated=gated,
                   artifact=f"{folder}/{i4.FILE}", precision="int4", gate_topk_agreement=agree,
                   saved_vs_int8=None if not ref8 else 1 - b["total"] / ref8, storage=rules | {"other": other},
                   values=st["precisions"], **extra)
        if gated:  # the spec's guard on quantising the gate
            row["pass"] = bool(row["pass"] and agree >= ecfg.min_gate_agreement)
        return row

    int4_rules = {m_: "int4" for m_ in cfg.int4_modules} | {"model.gate": cfg.int4_gate}

    def combined_int4_rows(parent, folder, module):
        """The int4 storage of MODULE, the model behind PARENT's rows (`prune` / `lowrank` and its `+ptq`, exported
        to FOLDER), when int4 is asked for too: the same storage as the float model's int4 row; reported, not gated
        (the parent is)."""
        if "int4" not in cfg.methods:
            return []
        name = parent[0]["method"] + "+int4"
        try:
            _, gate32 = _onnx_acc(out / folder / FP32, data.x_test, data.y_test)
            return [int4_row(name, name, int4_rules, cfg.int4_other, cfg.int4_max_drop_pp, gated=False, source=module,
                             gate_ref=gate32, parent=parent[0]["method"],
                             parent_bytes={v["method"]: v["bytes"] for v in parent})]
        except (ValueError, RuntimeError) as e:
            return [{"method": name, "error": f"{type(e).__name__}: {e}", "pass": False}]

    def int8_row(name, folder, modules):
        """ORT static int8 of the float model with only MODULES quantised (the gate check is reported, not raised)."""
        d = out / folder
        d.mkdir(parents=True, exist_ok=True)
        (d / mf.MANIFEST).unlink(missing_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".fp32-", dir=d))
        try:  # the baseline's graph has lost the name scopes the module choice reads: export it again
            export_onnx(deployable, shape, scratch, FP32, ecfg.max_batch)
            files = quantize_int8(scratch / FP32, d / INT8, calibration_images(data.x_train, ecfg.calib_images,
                                                                              ecfg.seed), ecfg.per_channel,
                                  modules=tuple(modules))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        strip_metadata(d / INT8)
        acc, pr = _onnx_acc(d / INT8, data.x_test, data.y_test)
        agree = onnxrun.topk_agreement(ref_probs, pr, k)
        b = mf.artifact_bytes(d / INT8)
        write_manifest(d, ecfg, {"int8": {"file": INT8, "files": [p.name for p in files], "bytes": b["total"]}}, INT8,
                       b, {"int8": {"acc": acc, "gate_topk_agreement": agree, "modules": list(modules)}}, shape,
                       deployable.model.cfg, meta)
        return _row(name, b["total"], ref32, acc, ref_acc, cfg.ptq_max_drop_pp, budget=ecfg.budget_bytes, gated=False,
                    artifact=f"{folder}/{INT8}", precision="int8", gate_topk_agreement=agree, modules=list(modules))

    for method in cfg.methods:
        t = time.perf_counter()
        n0 = len(rows)
        try:
            if method == "ptq":
                if ref8 is None:
                    raise ValueError("ptq needs export.int8: true")
                q = base["checks"]["int8"]
                rows.append(_row("ptq", ref8, ref32, q["acc"], ref_acc, cfg.ptq_max_drop_pp, budget=ecfg.budget_bytes,
                                 artifact="baseline/" + INT8, gate_topk_agreement=q["gate_topk_agreement"]))
            elif method == "qat":
                from refgen.moe.qat import qat

                ep, info = qat(deployable, data.x_fit, data.y_fit, cfg.qat_epochs, cfg.qat_lr, cfg.batch_size,
                               cfg.seed, max_batch=ecfg.max_batch)
                files = export_onnx(ep, shape, out / "qat", INT8, ecfg.max_batch)
                strip_metadata(out / "qat" / INT8)
                acc, pr = _onnx_acc(out / "qat" / INT8, data.x_test, data.y_test)
                agree = onnxrun.topk_agreement(ref_probs, pr, k)
                b = mf.artifact_bytes(out / "qat" / INT8)
                models = {"int8": {"file": INT8, "files": [p.name for p in files], "bytes": b["total"]}}
                write_manifest(out / "qat", ecfg, models, INT8, b, {"qat": {"acc": acc, "losses": info["losses"],
                                                                          "gate_topk_agreement": agree}},
                               shape, deployable.model.cfg, meta)
                rows.append(_row("qat", b["total"], ref32, acc, ref_acc, cfg.qat_max_drop_pp, budget=ecfg.budget_bytes,
                                 artifact="qat/" + INT8, gate_topk_agreement=agree, epochs=cfg.qat_epochs,
                                 losses=info["losses"]))
            elif method == "prune":
                from refgen.moe.prune import prune_iterative

                m = copy.deepcopy(deployable).eval()

                def step(s):
                    losses = finetune(m, data.x_fit, data.y_fit, cfg.prune_finetune_epochs, cfg.prune_lr,
                                      cfg.batch_size, cfg.seed + s)
                    rec = {"val_acc": accuracy(m, data.x_val, data.y_val), "finetune_losses": losses}
                    log.log(kind="prune_step", step=s, **rec)
                    return rec

                ex = torch.from_numpy(onnxrun.to_input(data.x_fit[:2]))
                steps = prune_iterative(m, cfg.prune_ratio, cfg.prune_steps, ex, step)
                parent = _exported_rows("prune", export(m, "prune"), ref32, ref8, ref_acc, cfg.prune_max_drop_pp,
                                        cfg.prune_min_saving, ecfg.budget_bytes, steps=steps,
                                        gate_topk_agreement=_torch_agreement(m, data, ref_probs, k))
                rows += parent + combined_int4_rows(parent, "prune", m)
            elif method == "lowrank":
                from refgen.moe.lowrank import auto_rank

                def tune(m):
                    finetune(m, data.x_fit, data.y_fit, cfg.lowrank_finetune_epochs, cfg.lowrank_lr, cfg.batch_size,
                             cfg.seed)

                res = auto_rank(deployable, cfg.lowrank_energies, lambda m: accuracy(m.eval(), data.x_val, data.y_val),
                                cfg.lowrank_max_drop_pp, skip=cfg.lowrank_skip, after=tune)
                for r in res["sweep"]:
                    log.log(kind="lowrank_sweep", **r)
                if res["model"] is None:
                    raise ValueError(f"no energy in {list(cfg.lowrank_energies)} keeps the validation accuracy within "
                                     f"{cfg.lowrank_max_drop_pp} pp (sweep: " + ", ".join(
                                         f"{r['energy']}: {r['drop_pp']:+.2f} pp" for r in res["sweep"]) + ")")
                parent = _exported_rows("lowrank", export(res["model"].eval(), "lowrank"), ref32, ref8, ref_acc,
                                        cfg.lowrank_max_drop_pp, cfg.lowrank_min_saving, ecfg.budget_bytes,
                                        energy=res["energy"], ranks=res["ranks"], sweep=res["sweep"])
                rows += parent + combined_int4_rows(parent, "lowrank", res["model"])
            elif method == "int4":
                rows.append(int4_row("int4", "int4", int4_rules, cfg.int4_other, cfg.int4_max_drop_pp))
            elif method == "ablate":
                rows += _ablations(cfg, deployable, data, int4_row, int8_row, export, ref32, ref8, ref_acc, ref_probs,
                                   k, ecfg, log)
        except (ValueError, RuntimeError) as e:  # one failed method is reported, the others still run
            rows.append({"method": method, "error": f"{type(e).__name__}: {e}", "pass": False})
        # the method's own row (prune, not prune+int4 appended after it); ablate has none of its name: its last row
        own = next((r for r in rows[n0:] if r["method"] == method), rows[-1])
        log.log(kind="method", method=method, seconds=time.perf_counter() - t,
                **{k_: v for k_, v in own.items() if k_ in ("bytes", "acc", "drop_pp", "saved", "pass", "error")})
        bar.update(1)
    bar.close()
    res = provenance(cfg, reference={"acc": ref_acc, "bytes_fp32": ref32, "bytes_int8": ref8,
                                     "artifact": "baseline"}, variants=rows,
                     seconds=time.perf_counter() - t0, **(meta or {}))
    atomic_write_json(out / "compress.json", res)
    atomic_write_text(out / "compress.md", report_md(res))
    from refgen.moe.plots import accuracy_vs_size

    pts = [{"label": "float fp32", "bytes": ref32, "acc": ref_acc}]
    pts += [{"label": v["method"], "bytes": v["bytes"], "acc": v["acc"]} for v in rows if "error" not in v]
    accuracy_vs_size(pts, ecfg.budget_bytes, out / "compress_acc_vs_size.png")
    return res


def _torch_agreement(module, data: _Data, ref_probs, k) -> float:
    """Top-k agreement of MODULE's gate (PyTorch) with the float model's fp32 ONNX gate on the test split."""
    return onnxrun.topk_agreement(ref_probs, torch_outputs(module.eval(), onnxrun.to_input(data.x_test))[1], k)


def _ablations(cfg, deployable, data, int4_row, int8_row, export, ref32, ref8, ref_acc, ref_probs, k, ecfg, log):
    """The spec's ablations (§7.10): experts-only quantised vs the gate quantised too, at int8 and at int4 (gate
    int8), and experts-only pruned; each its own row, a failure reported in its row."""
    from refgen.moe.finetune import finetune
    from refgen.moe.prune import prune_iterative

    def prune_experts():
        m = copy.deepcopy(deployable).eval()

        def step(s):
            losses = finetune(m, data.x_fit, data.y_fit, cfg.prune_finetune_epochs, cfg.prune_lr, cfg.batch_size,
                              cfg.seed + s)
            log.log(kind="prune_experts_step", step=s, finetune_losses=losses)

        ex = torch.from_numpy(onnxrun.to_input(data.x_fit[:2]))
        steps = prune_iterative(m, cfg.prune_ratio, cfg.prune_steps, ex, step, experts_only=True)
        return _exported_rows("prune-experts", export(m, "ablate/prune-experts"), ref32, ref8, ref_acc,
                              cfg.prune_max_drop_pp, cfg.prune_min_saving, ecfg.budget_bytes, gated=False,
                              folder="ablate/prune-experts", steps=steps,
                              gate_topk_agreement=_torch_agreement(m, data, ref_probs, k))

    experts = {m_: "int4" for m_ in cfg.int4_modules}
    jobs = [("int8-experts", lambda: [int8_row("int8-experts", "ablate/int8-experts", ("model.experts",))]),
            ("int8-experts+gate", lambda: [int8_row("int8-experts+gate", "ablate/int8-experts+gate",
                                                    ("model.experts", "model.gate"))]),
            ("int4-experts", lambda: [int4_row("int4-experts", "ablate/int4-experts", experts | {"model.gate": "fp32"},
                                               "fp32", cfg.int4_max_drop_pp, gated=False)]),
            ("int4-experts+gate", lambda: [int4_row("int4-experts+gate", "ablate/int4-experts+gate",
                                                    experts | {"model.gate": "int8"}, "fp32", cfg.int4_max_drop_pp,
                                                    gated=False)]),
            ("prune-experts", prune_experts)]
    rows = []
    for name, job in jobs:
        try:
            rows += job()
        except (ValueError, RuntimeError) as e:
            rows.append({"method": name, "error": f"{type(e).__name__}: {e}", "pass": False})
    return rows


def _exported_rows(method, man, ref32, ref8, ref_acc, max_drop, min_saving, budget, gated=True, folder=None,
                   gate_topk_agreement=None, **extra) -> list[dict]:
    folder = folder or method
    acc32 = man["checks"]["parity_fp32"]["torch_acc"]
    rows = [_row(method, man["models"]["fp32"]["bytes"], ref32, acc32, ref_acc, max_drop, min_saving,
                 budget=float("inf"), gated=gated, artifact=f"{folder}/model.onnx", precision="fp32",
                 gate_topk_agreement=gate_topk_agreement, **extra)]
    if "int8" in man["models"] and ref8:
        q = man["checks"]["int8"]
        rows.append(_row(method + "+ptq", man["models"]["int8"]["bytes"], ref8, q["acc"], ref_acc, max_drop,
                         None, budget=budget, gated=False, artifact=f"{folder}/{INT8}", precision="int8",
                         gate_topk_agreement=q["gate_topk_agreement"], saved_vs_fp32=1 - man["models"]["int8"]["bytes"] / ref32))
    return rows


def report_md(res: dict) -> str:
    r = res["reference"]
    lines = [f"# refgen moe compress ({res['created']}, commit {res['git_commit']})", "",
             f"Float model: test accuracy {100 * r['acc']:.2f} %, fp32 ONNX {r['bytes_fp32']:,} B, "
             + ("no int8 export (export.int8: false)." if r['bytes_int8'] is None
                else f"int8 {r['bytes_int8']:,} B."), "",
             "| variant | artifact | bytes | vs | saved | test acc | drop pp | gate top-k agree | limit | pass |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v in res["variants"]:
        if "error" in v:
            lines.append(f"| {v['method']} | failed: {v['error']} | | | | | | | | no |")
            continue
        g = v.get("gate_topk_agreement")
        lim = f">= -{v['max_drop_pp']} pp" + (f", saved >= {v['min_saving']:.0%}" if v["min_saving"] else "")
        lines.append(f"| {v['method']} | {v['artifact']} | {v['bytes']:,} | {v['ref_bytes']:,} | {v['saved']:.1%} | "
                     f"{100 * v['acc']:.2f} % | {v['drop_pp']:+.2f} | {'' if g is None else format(g, '.2%')} | "
                     f"{lim if v['pass'] is not None else 'reported'} | "
                     f"{ {True: 'yes', False: 'no', None: '-'}[v['pass']]} |")
    return "\n".join(lines) + "\n"


def compress_run(model_dir: str | Path, out: str | Path, cfg: CompressConfig, cache=None, data=None,
                 progress: bool = True) -> dict:
    from refgen.moe.data import load_dataset
    from refgen.moe.train import load_model

    model, info = load_model(model_dir)
    tcfg = info.get("config", {})
    if data is None:
        data = load_dataset(info["dataset"], cache, tcfg.get("data_dir"), tcfg.get("n_train"), tcfg.get("n_test"))
    meta = {"dataset": info.get("dataset"), "classes": info.get("classes") or list(data.classes),
            "source": {"model_dir": str(model_dir), "train_git_commit": info.get("git_commit"),
                       "val_fraction": tcfg.get("val_fraction")}}
    return compress(deployable_from_info(model, info), out, cfg, _split(data, tcfg.get("val_fraction", 0.1)), meta,
                    progress)


__all__ = ["CompressConfig", "compress", "compress_run", "report_md", "dataclasses"]
