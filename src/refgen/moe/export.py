"""`refgen moe export`: a trained (or compressed) MoE as deployable files, checked before they are called done.

    model.onnx + model.onnx.data   fp32, torch's dynamo exporter, dynamic batch 1..max_batch (weights in the
                                   external-data file, the exporter's default)
    model_int8.onnx                int8 QDQ (ONNX Runtime static quantisation, per-channel weights, calibrated on
                                   training images), the deployable artifact the byte budget applies to
    model.pt2                      a torch.export program (TorchScript is deprecated: spec §7.13)
    manifest.json                  SemVer, git commit, SHA-256 and bytes of every file, the checks below, the
                                   input contract; written last, so a folder without it is unfinished

Every exported graph takes images in [0, 1] (float32 NCHW) and normalises them itself, and returns 'logits' and
'gate_probs' (the gate's full distribution, so the int8 gate's top-k decisions can be compared and logged).

Checks that must pass before the manifest is written (each failure raises, naming the numbers):
    parity       ONNX Runtime fp32 vs PyTorch on the whole test split at batch 1, 7 and 32: test accuracy within
                 max_acc_diff_pp (0.1 pp), top-1 agreement reported, max |logit difference| reported
    pt2          the saved program reloads and gives the same logits
    gate         top-k expert sets of the int8 gate agree with the fp32 gate on >= min_gate_agreement of inputs
    budget       model_int8.onnx and every external-data file it names <= budget_bytes together
Not torch.ao.quantization (slated for removal, spec §7.12).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from refgen.moe import manifest as mf
from refgen.moe import onnxrun

FP32, INT8, PT2 = "model.onnx", "model_int8.onnx", "model.pt2"


@dataclass
class ExportConfig:
    version: str = "0.1.0"              # SemVer of the artifact
    max_batch: int = 32                 # dynamic batch 1..max_batch
    int8: bool = True
    calib_images: int = 512             # training images for the int8 activation ranges
    per_channel: bool = True
    budget_bytes: int = mf.BUDGET_BYTES
    parity_batches: tuple[int, ...] = (1, 7, 32)
    max_acc_diff_pp: float = 0.1        # ONNX vs PyTorch test accuracy, fp32
    min_gate_agreement: float = 0.98    # fp32 vs int8 top-k expert sets
    seed: int = 0                       # which training images calibrate
    # int8 covers these modules only; [] = every node ORT can quantise. The stem and gate stay float: the gate's
    # top-k is often decided by margins below the int8 rounding of its input (docs/moe.md: a digits model's gate
    # agreed on 28-87 % of inputs with everything quantised, 100 % with this default)
    int8_modules: tuple[str, ...] = ("model.experts", "model.graph", "model.head")

    def __post_init__(self):
        mf.check_semver(self.version)
        self.parity_batches = tuple(int(b) for b in self.parity_batches)
        self.int8_modules = tuple(str(m) for m in (self.int8_modules or ()))
        if not 1 <= self.max_batch:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if any(not 1 <= b <= self.max_batch for b in self.parity_batches):
            raise ValueError(f"parity_batches {self.parity_batches} must lie in 1..max_batch={self.max_batch}")
        if self.calib_images < 1 or self.budget_bytes < 1:
            raise ValueError("calib_images and budget_bytes must be >= 1")
        if not 0 <= self.min_gate_agreement <= 1:
            raise ValueError(f"min_gate_agreement must be in [0, 1], got {self.min_gate_agreement}")

    @classmethod
    def from_yaml(cls, path, **overrides) -> ExportConfig:
        from refgen.config import from_yaml

        return from_yaml(cls, path, **overrides)


class ExportCheckError(ValueError):
    """An export check failed (parity, pt2 reload, gate agreement); the message has the numbers."""


class Deployable(nn.Module):
    """MODEL with the training split's normalisation in front and (logits, gate_probs) out, on the dense masked
    path (no data-dependent control flow). A model whose gate is None (the dense baselines) reports a gate of one
    expert with probability 1."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model((image - self.mean) / self.std, path="dense")
        return out.logits, out.routing.probs


def deployable_from_info(model: nn.Module, info: dict) -> Deployable:
    if "norm_mean" not in info or "norm_std" not in info:
        raise ValueError("the model's moe.json has no norm_mean / norm_std: not a `refgen moe train` folder")
    return Deployable(model, info["norm_mean"], info["norm_std"]).eval()


def _dynamic(max_batch: int) -> dict:
    return {"image": {0: torch.export.Dim("batch", min=1, max=max_batch)}}


def _example(shape, n: int = 2) -> tuple[torch.Tensor]:
    # batch 2, not 1: torch.export specialises a dimension of size 1
    return (torch.rand(n, *shape),)


def export_pt2(module: nn.Module, shape, path: Path, max_batch: int) -> torch.export.ExportedProgram:
    from refgen.artifacts import atomic_write_file

    ep = torch.export.export(module, _example(shape), dynamic_shapes=_dynamic(max_batch))
    atomic_write_file(path, lambda f: torch.export.save(ep, f))
    return ep


def export_onnx(module, shape, folder: Path, name: str, max_batch: int) -> list[Path]:
    """Dynamo export of MODULE (an nn.Module, or a torch.export program that already has its dynamic batch) into
    a scratch folder, then each file renamed into FOLDER (the graph names its external-data file by a relative
    path, so both keep their names). Returns the files of the model."""
    import warnings

    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dyn = None if isinstance(module, torch.export.ExportedProgram) else _dynamic(max_batch)
            torch.onnx.export(module, _example(shape), str(scratch / name), dynamo=True, input_names=["image"],
                              output_names=["logits", "gate_probs"], dynamic_shapes=dyn, verbose=False)
        files = mf.onnx_files(scratch / name)
        for f in files[1:] + files[:1]:  # data first: the graph appears only when what it needs is there
            os.replace(f, folder / f.name)
        return [folder / f.name for f in files]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def strip_metadata(path: Path) -> None:
    """Rewrite the ONNX graph file PATH without the exporter's per-node metadata (torch name scopes, stack traces:
    ~75 % of a small model's graph file, measured in docs/moe.md) and without value_info. Initializers, external-
    data references and the computation are untouched. Atomic."""
    import onnx

    from refgen.artifacts import atomic_write_bytes

    proto = onnx.load(str(path), load_external_data=False)
    for n in proto.graph.node:
        del n.metadata_props[:]
    del proto.graph.value_info[:]
    atomic_write_bytes(path, proto.SerializeToString())


def nodes_in_modules(path: Path, modules) -> list[str]:
    """Names of the ONNX nodes that the dynamo exporter attributes to any of the torch MODULES (qualified names as
    in the Deployable, e.g. 'model.gate'), read from each node's 'pkg.torch.onnx.name_scopes' metadata."""
    import json as _json

    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    names = []
    for n in proto.graph.node:
        md = {p.key: p.value for p in n.metadata_props}
        scopes = md.get("pkg.torch.onnx.name_scopes")
        if not scopes:
            continue
        try:
            scopes = _json.loads(scopes.replace("'", '"'))
        except ValueError:
            scopes = [scopes]
        if any(s == m or str(s).startswith(m + ".") for s in scopes for m in modules):
            names.append(n.name)
    return names


def quantize_int8(fp32: Path, out: Path, calib: np.ndarray, per_channel: bool = True, batch: int = 32,
                  modules: tuple[str, ...] | None = None) -> list[Path]:
    """ONNX Runtime static QDQ quantisation of FP32 (int8 weights per channel, int8 activations) with activation
    ranges from CALIB (float32 NCHW in [0, 1]). MODULES (torch module names, e.g. 'model.experts') limits it to
    those modules' nodes; None quantises every node ORT can. Written through a scratch folder; returns the files."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"image": calib[i:i + batch]} for i in range(0, len(calib), batch)])

        def get_next(self):
            return next(self.it, None)

    scratch = Path(tempfile.mkdtemp(prefix=".quant-", dir=out.parent))
    try:
        pre = scratch / "pre.onnx"
        quant_pre_process(str(fp32), str(pre))  # shape inference + graph optimisation ORT recommends before QDQ
        only = nodes_in_modules(pre, modules) if modules else None
        if modules and not only:
            raise ValueError(f"int8 modules {list(modules)}: no node of {fp32} belongs to them")
        quantize_static(str(pre), str(scratch / out.name), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=only,
                        # one Q/DQ pair per consumer: a float node reading a tensor that quantised nodes read too
                        # (the gate reading the stem's output) gets the float tensor, not its int8 rounding
                        extra_options={"DedicatedQDQPair": True})
        files = mf.onnx_files(scratch / out.name)
        for f in files[1:] + files[:1]:
            os.replace(f, out.parent / f.name)
        return [out.parent / f.name for f in files]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@torch.no_grad()
def torch_outputs(module: nn.Module, x: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    outs = [module(torch.from_numpy(x[i:i + batch])) for i in range(0, len(x), batch)]
    return (torch.cat([o[0] for o in outs]).numpy(), torch.cat([o[1] for o in outs]).numpy())


def parity(sess, ref_logits: np.ndarray, x: np.ndarray, y: np.ndarray, batches) -> dict:
    """ONNX Runtime vs the PyTorch logits REF_LOGITS on all of X, once per batch size."""
    ref_acc = float((ref_logits.argmax(1) == y).mean())
    rows = []
    for b in batches:
        lg, _ = onnxrun.run(sess, x, b)
        acc = float((lg.argmax(1) == y).mean())
        rows.append({"batch": b, "n": len(x), "acc": acc, "acc_diff_pp": 100 * (acc - ref_acc),
                     "top1_agreement": float((lg.argmax(1) == ref_logits.argmax(1)).mean()),
                     "max_abs_logit_diff": float(np.abs(lg - ref_logits).max())})
    return {"torch_acc": ref_acc, "rows": rows}


def calibration_images(x_train: np.ndarray, n: int, seed: int) -> np.ndarray:
    idx = np.random.default_rng(seed).permutation(len(x_train))[:n]
    return onnxrun.to_input(x_train[np.sort(idx)])


def export_model(module: Deployable, out: str | Path, cfg: ExportConfig, x_train: np.ndarray, x_test: np.ndarray,
                 y_test: np.ndarray, meta: dict | None = None, threads: int = 1) -> dict:
    """Write the export folder OUT for the Deployable MODULE, run the checks, write manifest.json last. X_* are
    uint8 [N, H, W, C]; META (dataset, classes, source, ...) goes into the manifest. Returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / mf.MANIFEST).unlink(missing_ok=True)  # the folder is unfinished until the new manifest is written
    module = module.eval()
    shape = (x_test.shape[3], x_test.shape[1], x_test.shape[2])  # (C, H, W)
    xt = onnxrun.to_input(x_test)
    ref_logits, ref_probs = torch_outputs(module, xt)

    ep = export_pt2(module, shape, out / PT2, cfg.max_batch)
    del ep
    re = torch.export.load(str(out / PT2)).module()
    pt2_diff = float(np.abs(torch_outputs(re, xt, cfg.max_batch)[0] - ref_logits).max())
    if pt2_diff > 1e-4:
        raise ExportCheckError(f"{out / PT2} reloads with logits {pt2_diff:.3g} away from the model's")

    fp32_files = export_onnx(module, shape, out, FP32, cfg.max_batch)
    k = module.model.cfg.top_k
    if cfg.int8:  # quantised from the graph with metadata: the int8 module choice reads its name scopes
        calib = calibration_images(x_train, cfg.calib_images, cfg.seed)
        int8_files = quantize_int8(out / FP32, out / INT8, calib, cfg.per_channel,
                                   modules=cfg.int8_modules or None)
        strip_metadata(out / INT8)
    strip_metadata(out / FP32)

    sess = onnxrun.session(out / FP32, threads)
    par = parity(sess, ref_logits, xt, y_test, cfg.parity_batches)
    bad = [r for r in par["rows"] if abs(r["acc_diff_pp"]) > cfg.max_acc_diff_pp]
    if bad:
        raise ExportCheckError("ONNX Runtime fp32 vs PyTorch test accuracy differs by more than "
                               f"{cfg.max_acc_diff_pp} pp: " + ", ".join(f"batch {r['batch']}: "
                                                                         f"{r['acc_diff_pp']:+.3f} pp" for r in bad))
    models = {"fp32": {"file": FP32, "files": [p.name for p in fp32_files],
                       "bytes": mf.artifact_bytes(out / FP32)["total"]},
              "pt2": {"file": PT2, "files": [PT2], "bytes": (out / PT2).stat().st_size}}
    checks = {"parity_fp32": par, "pt2_max_abs_logit_diff": pt2_diff}
    deployable = FP32
    if cfg.int8:
        q = onnxrun.session(out / INT8, threads)
        lg8, pr8 = onnxrun.run(q, xt, cfg.max_batch)
        agree = onnxrun.topk_agreement(ref_probs, pr8, k)
        acc8 = float((lg8.argmax(1) == y_test).mean())
        checks["int8"] = {"acc": acc8, "acc_drop_pp": 100 * (acc8 - par["torch_acc"]),
                          "top1_agreement_with_fp32": float((lg8.argmax(1) == ref_logits.argmax(1)).mean()),
                          "gate_topk_agreement": agree, "top_k": k, "calib_images": len(calib),
                          "modules": list(cfg.int8_modules) or "all"}
        if agree < cfg.min_gate_agreement:
            raise ExportCheckError(f"int8 gate picks the fp32 gate's top-{k} experts for {agree:.2%} of test inputs, "
                                   f"below min_gate_agreement {cfg.min_gate_agreement:.0%}")
        models["int8"] = {"file": INT8, "files": [p.name for p in int8_files],
                          "bytes": mf.artifact_bytes(out / INT8)["total"]}
        deployable = INT8
    budget = mf.check_budget(out / deployable, cfg.budget_bytes)
    checks["budget"] = {**budget, "budget_bytes": cfg.budget_bytes, "model": deployable}

    return write_manifest(out, cfg, models, deployable, budget, checks, shape, module.model.cfg, meta)


def write_manifest(out: Path, cfg: ExportConfig, models: dict, deployable: str, budget: dict, checks: dict, shape,
                   model_cfg, meta: dict | None) -> dict:
    """manifest.json (provenance + SHA-256 and bytes of every file of MODELS), written last and atomically."""
    from refgen.artifacts import atomic_write_json, provenance

    names = sorted({n for m in models.values() for n in m["files"]})
    dep = next(m for m in models.values() if m["file"] == deployable)
    man = provenance(dataclasses.asdict(cfg), name="refgen-moe", version=cfg.version, deployable=deployable,
                     deployable_files=dep["files"], deployable_bytes=budget["total"], budget_bytes=cfg.budget_bytes,
                     models=models, files=mf.file_entries(out, names),
                     input={"name": "image", "shape": list(shape), "dtype": "float32", "layout": "NCHW",
                            "range": [0.0, 1.0], "max_batch": cfg.max_batch},
                     outputs=["logits", "gate_probs"], top_k=model_cfg.top_k, num_experts=model_cfg.num_experts,
                     checks=checks, **(meta or {}))
    man["versions"].update(_runtime_versions())
    atomic_write_json(out / mf.MANIFEST, man)
    return man


def _runtime_versions() -> dict:
    v = {}
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return v


def export_run(model_dir: str | Path, out: str | Path, cfg: ExportConfig, cache=None, data=None, threads: int = 1,
               n_test: int | None = None) -> dict:
    """export_model for a `refgen moe train` folder: its data set (or DATA), its normalisation, its classes."""
    from refgen.moe.data import load_dataset
    from refgen.moe.train import load_model

    model, info = load_model(model_dir)
    if data is None:
        data = load_dataset(info["dataset"], cache, info.get("config", {}).get("data_dir"),
                            info.get("config", {}).get("n_train"), n_test or info.get("config", {}).get("n_test"))
    meta = {"dataset": info.get("dataset"), "classes": info.get("classes") or list(data.classes),
            "source": {"model_dir": str(model_dir), "train_git_commit": info.get("git_commit"),
                       "val_fraction": info.get("config", {}).get("val_fraction"),
                       "test_acc_torch": info.get("metrics", {}).get("test", {}).get("acc")}}
    return export_model(deployable_from_info(model, info), out, cfg, data.x_train, data.x_test, data.y_test, meta,
                        threads)
