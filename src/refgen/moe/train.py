"""`refgen moe train`: one MoE (or dense baseline) on one data set, with the plateau heuristic, the monitor, and
an artifact folder:

    model.safetensors   weights (metadata: the config as JSON)
    moe.json            provenance (config, versions, git commit), test metrics, routing statistics, graph
                        statistics, the static cost table, data source, timings, monitor summary
    metrics.jsonl       training loss every `log_every` steps, one record per epoch (val/test), the LR/WD
                        timeline ('hparams' records), monitor samples ('monitor' records)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from refgen.artifacts import JsonlLogger, atomic_save_safetensors, atomic_write_json, provenance
from refgen.config import from_dict, from_yaml
from refgen.moe import augment
from refgen.moe.cost import CostTable, cost_table
from refgen.moe.data import DATASETS, ImageSet, load_dataset, stratified_split
from refgen.moe.graph import graph_stats
from refgen.moe.meta import PlateauController, make_optimizer
from refgen.moe.model import PATHS, MoEClassifier, MoEModelConfig
from refgen.moe.monitor import Probe

SCHEDULES = ("plateau", "onecycle")
BALANCES = ("switch", "composite")


@dataclass
class MoETrainConfig:
    dataset: str = "mnist"
    cache: str | None = None            # data cache (default $REFGEN_MOE_DATA or ~/.cache/refgen/moe)
    data_dir: str | None = None         # cifar10 only: the user's folder of CIFAR-10 python pickles
    n_train: int | None = None          # cut the training split (toyworld27: render this many)
    n_test: int | None = None
    val_fraction: float = 0.1           # carved from the training split (stratified, split seed 0)
    model: MoEModelConfig = field(default_factory=MoEModelConfig)
    epochs: int = 10
    max_steps: int | None = None        # stop early after this many steps (smoke tests)
    batch_size: int = 128
    lr: float = 2e-3
    gate_lr_scale: float = 0.5
    weight_decay: float = 5e-4
    schedule: str = "plateau"           # plateau: ReduceLROnPlateau(0.5) after plateau_epochs; onecycle
    plateau_epochs: int = 3
    balance_coef: float = 0.01          # weight of the load-balance loss (against expert collapse; Switch: 0.01)
    balance: str = "switch"             # switch: Switch/GShard E * sum f.P; composite: + importance CV^2 + entropy
    z_loss_coef: float = 1e-3           # router z-loss weight (ST-MoE: 1e-3)
    graph_l1: float = 3e-4              # L1 coefficient (loss units) on the off-diagonal graph edges; proximal step
                                        # in Adam's metric (graph_prox_threshold); chosen on the validation split
    graph_target_sparsity: float = 0.0  # > 0: prune the smallest off-diagonal edges by magnitude to this share,
                                        # gradually (graph_prune_schedule); 0: off. Replaces graph_l1, which must
                                        # be 0 with it: an L1 would go on removing edges past the stated share
    shift_px: int = 2                   # random translation by up to this many pixels (0: off)
    corrupt_p: float = 0.0              # share of training images corrupted (refgen.moe.augment; 0: off)
    corrupt_types: tuple[str, ...] = ("gaussian_noise", "impulse_noise", "defocus_blur", "motion_blur", "fog",
                                      "contrast", "jpeg_compression")
    corrupt_severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    corrupt_mix: bool = False           # AugMix-style blend of clean and corrupted image, weight ~ U(0, 1)
    path: str = "sparse"                # execution path while training (eval is checked on both)
    seed: int = 0
    device: str | None = None           # cuda (default) or cpu
    threads: int | None = None          # torch CPU threads
    sample_every: int = 50              # monitor: one step in this many is timed
    monitor: bool = True
    log_every: int = 20
    eval_batch: int = 512

    def __post_init__(self):
        if isinstance(self.model, dict):  # built directly or from a checkpoint's JSON with a mapping
            self.model = from_dict(MoEModelConfig, self.model, section="model")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {self.balance!r}")
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        for k in ("epochs", "batch_size", "plateau_epochs", "sample_every", "log_every", "eval_batch"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for k in ("lr", "gate_lr_scale"):
            if not (math.isfinite(getattr(self, k)) and getattr(self, k) > 0):
                raise ValueError(f"{k} must be a positive number, got {getattr(self, k)}")
        for k in ("weight_decay", "balance_coef", "z_loss_coef", "graph_l1", "shift_px"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        if not 0 <= self.graph_target_sparsity < 1:
            raise ValueError(f"graph_target_sparsity must be in [0, 1) (the share of off-diagonal edges pruned; "
                             f"0: off), got {self.graph_target_sparsity}")
        if self.graph_target_sparsity > 0 and self.graph_l1 > 0:
            raise ValueError(f"graph_target_sparsity {self.graph_target_sparsity} states the sparsity itself; "
                             f"set graph_l1: 0 with it (got graph_l1 {self.graph_l1}), or graph_target_sparsity: 0")
        self.corrupt_types = tuple(str(t) for t in self.corrupt_types)
        self.corrupt_severities = tuple(int(s) for s in self.corrupt_severities)
        augment.check(self.corrupt_p, self.corrupt_types, self.corrupt_severities)
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @classmethod
    def from_yaml(cls, path, **overrides) -> MoETrainConfig:
        return from_yaml(cls, path, **overrides)


# ---- data on the device -------------------------------------------------------------------------------

class Batches:
    """uint8 images kept on the device, normalised per batch with the training split's channel mean/std."""

    def __init__(self, x: np.ndarray, y: np.ndarray, mean: np.ndarray, std: np.ndarray, device):
        self.x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
        self.y = torch.from_numpy(y).to(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __len__(self):
        return len(self.y)

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.x[idx].float() / 255 - self.mean) / self.std, self.y[idx]


def random_shift(x: torch.Tensor, max_px: int, gen: torch.Generator) -> torch.Tensor:
    """Each image translated by whole pixels in [-max_px, max_px], zero fill (nearest-neighbour grid_sample)."""
    if max_px <= 0:
        return x
    B, _, H, W = x.shape
    s = torch.randint(-max_px, max_px + 1, (B, 2), generator=gen).to(x.device, x.dtype)
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = -2 * s[:, 0] / W, -2 * s[:, 1] / H
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


# ---- evaluation ---------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: MoEClassifier, data: Batches, path: str = "dense", batch: int = 512,
             table: CostTable | None = None) -> dict:
    """Accuracy, loss and routing statistics on DATA (eval mode)."""
    was = model.training
    model.eval()
    n, correct, loss = len(data), 0, 0.0
    E = model.cfg.num_experts
    slots = torch.zeros(E, dtype=torch.float64)
    wsum = torch.zeros(E, dtype=torch.float64)
    psum = torch.zeros(E, dtype=torch.float64)
    ent, active = 0.0, 0.0
    for i in range(0, n, batch):
        idx = torch.arange(i, min(i + batch, n), device=data.y.device)
        x, y = data.get(idx)
        out = model(x, path=path)
        loss += float(F.cross_entropy(out.logits, y, reduction="sum"))
        correct += int((out.logits.argmax(1) == y).sum())
        r = out.routing
        slots += r.mask.sum(0).double().cpu()
        wsum += r.weights.sum(0).double().cpu()
        psum += r.probs.sum(0).double().cpu()
        ent += float(-(r.probs * r.probs.clamp_min(1e-12).log()).sum())
        if table is not None:
            active += float(table.active_flops(r.mask).sum())
    model.train(was)
    share = slots / slots.sum()
    pmean = psum / n
    res = {"n": n, "acc": correct / n, "loss": loss / n,
           "routing_share": share.tolist(), "min_routing_share": float(share.min()),
           "routing_weight": (wsum / n).tolist(),
           "gate_entropy_batch_mean": float(-(pmean * pmean.clamp_min(1e-12).log()).sum()),
           "gate_entropy_per_sample": ent / n,
           "load_cv": float(slots.std(unbiased=False) / slots.mean()) if E > 1 else 0.0}
    if table is not None:
        res["active_flops_per_image"] = active / n
    return res


# ---- training -----------------------------------------------------------------------------------------

def split_data(cfg: MoETrainConfig, ds: ImageSet):
    if cfg.val_fraction > 0:
        tr, va = stratified_split(ds.y_train, cfg.val_fraction, seed=0)
    else:
        tr, va = np.arange(len(ds.y_train)), np.arange(0)
    x = ds.x_train[tr].astype(np.float64) / 255
    mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2)).clip(1e-3)
    return tr, va, mean, std


def build_model(cfg: MoETrainConfig, ds: ImageSet) -> MoEClassifier:
    return MoEClassifier(cfg.model, ds.shape[0], ds.num_classes)


@dataclass
class _Run:
    """What one training run's steps share: the model, its optimizer and schedules, the monitor, the log."""
    cfg: MoETrainConfig
    model: MoEClassifier
    table: CostTable
    opt: torch.optim.Optimizer
    log: JsonlLogger
    total_steps: int
    plateau: PlateauController | None
    sched: torch.optim.lr_scheduler.LRScheduler | None
    probe: Probe | None
    gate_group: dict
    gen: torch.Generator
    train_flops: float
    step: int = 0                            # optimizer steps taken
    graph_pruned: torch.Tensor | None = None  # [E, E] bool: the edges graph_target_sparsity has pruned (stay 0)


def _start_run(cfg: MoETrainConfig, model: MoEClassifier, shape, n_train: int, out: Path, device) -> _Run:
    table = cost_table(model, shape)
    opt = make_optimizer(model, cfg.lr, cfg.gate_lr_scale, cfg.weight_decay)
    log = JsonlLogger(out / "metrics.jsonl")
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps,
                                                                                   cfg.epochs * steps_per_epoch)
    plateau = PlateauController(opt, cfg.plateau_epochs, logger=log) if cfg.schedule == "plateau" else None
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                 total_steps=total_steps) if cfg.schedule == "onecycle" else None)
    probe = Probe(device, cfg.sample_every, logger=log) if cfg.monitor else None
    gate_group = next((g for g in opt.param_groups if g["name"] == "gate"), opt.param_groups[0])
    gen = torch.Generator().manual_seed(cfg.seed)
    train_flops = 3 * table.static_topk_flops(cfg.model.top_k) * cfg.batch_size  # forward + backward ~ 3x forward
    return _Run(cfg, model, table, opt, log, total_steps, plateau, sched, probe, gate_group, gen, train_flops)


def graph_prox_threshold(opt: torch.optim.Optimizer, group: dict, param: torch.Tensor, l1: float) -> torch.Tensor:
    """Per-edge soft threshold of the proximal L1 step after an Adam(W) step: lr x L1 / (sqrt(v_hat) + eps), the
    proximal operator of L1 x |W| in the metric Adam's update lives in (ProxGen, Yun et al. 2021). Its fixed
    points are those of loss + L1 x |W|: an edge survives where the task's mean gradient on it exceeds L1, in loss
    units. A threshold of lr x L1 alone would compare L1 with Adam's *normalised* step, i.e. with the gradient's
    mean / RMS, and its total would grow with the number of steps (docs/moe.md)."""
    st = opt.state.get(param)
    if not st or "exp_avg_sq" not in st:
        raise ValueError("graph_prox_threshold needs an Adam-type optimizer state (exp_avg_sq) after its first step")
    b2 = group["betas"][1]
    v_hat = st["exp_avg_sq"] / (1 - b2 ** float(st["step"]))
    return group["lr"] * l1 / (v_hat.sqrt() + group["eps"])


GRAPH_PRUNE_SPAN = (0.25, 0.75)  # graph_target_sparsity: prune between these fractions of the training steps


def graph_prune_schedule(step: int, total_steps: int, target: float, span=GRAPH_PRUNE_SPAN) -> float:
    """Zhu & Gupta's (2017) gradual pruning schedule: the sparsity after STEP of TOTAL_STEPS rises from 0 to TARGET
    as s_t = target x (1 - (1 - (t - t_0) / (t_1 - t_0))^3) between t_0 = span[0] x total and t_1 = span[1] x total
    (cubic: most edges go early, while the others can still adapt; none after t_1, so the rest of the run trains
    the graph that is left). 0 before t_0, TARGET from t_1 on."""
    t0, t1 = span[0] * total_steps, span[1] * total_steps
    p = min(max((step - t0) / max(t1 - t0, 1e-9), 0.0), 1.0)
    return target * (1 - (1 - p) ** 3)


def _prune_graph(run: _Run) -> None:
    """graph_target_sparsity: prune to the schedule's share of the off-diagonal edges (whole edges, rounded), keep
    the pruned ones at 0, and log when an edge goes."""
    g = run.model.graph
    E = g.num_experts
    count = math.floor(graph_prune_schedule(run.step, run.total_steps, run.cfg.graph_target_sparsity)
                       * E * (E - 1) + 0.5)
    if run.graph_pruned is None:
        run.graph_pruned = torch.zeros(E, E, dtype=torch.bool, device=g.weight.device)
    before = int(run.graph_pruned.sum())
    run.graph_pruned = g.prune_smallest(run.graph_pruned, max(count, before))
    if int(run.graph_pruned.sum()) > before:
        run.log.log(kind="graph_prune", step=run.step, pruned=int(run.graph_pruned.sum()),
                    mask=run.graph_pruned.int().tolist())


def _train_step(run: _Run, x: torch.Tensor, y: torch.Tensor):
    """One optimizer step (with the graph's proximal L1 or its pruning, and the per-step schedule); returns (CE,
    model output)."""
    cfg, model = run.cfg, run.model
    out_ = model(x, path=cfg.path)
    ce = F.cross_entropy(out_.logits, y)
    loss = ce + cfg.balance_coef * (out_.switch_loss if cfg.balance == "switch" else out_.balance_loss)
    if cfg.z_loss_coef > 0:
        loss = loss + cfg.z_loss_coef * out_.z_loss
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    run.step += 1
    if model.graph is not None and cfg.graph_l1 > 0:
        model.graph.prox_l1(graph_prox_threshold(run.opt, run.gate_group, model.graph.weight, cfg.graph_l1))
    if model.graph is not None and cfg.graph_target_sparsity > 0:
        _prune_graph(run)
    if run.sched is not None:
        run.sched.step()
    return ce, out_


def _train_epoch(run: _Run, train_b: Batches, epoch: int, step: int, bar) -> tuple[int, float]:
    """One pass over the shuffled training split, or up to run.total_steps. Returns (step, mean train loss)."""
    cfg, opt = run.cfg, run.opt
    run.model.train()
    perm = torch.randperm(len(train_b), generator=run.gen).to(train_b.y.device)
    run_loss, run_n = 0.0, 0
    aug_rng = augment.epoch_rng(cfg.seed, epoch) if cfg.corrupt_p > 0 else None
    for i in range(0, len(train_b), cfg.batch_size):
        if aug_rng is not None:  # corrupt the uint8 images, then normalise as Batches.get does
            idx = perm[i:i + cfg.batch_size]
            xu = augment.corrupt_batch(train_b.x[idx], cfg.corrupt_p, cfg.corrupt_types, cfg.corrupt_severities,
                                       aug_rng, cfg.corrupt_mix)
            x, y = (xu.float() / 255 - train_b.mean) / train_b.std, train_b.y[idx]
        else:
            x, y = train_b.get(perm[i:i + cfg.batch_size])
        x = random_shift(x, cfg.shift_px, run.gen)
        if run.probe is not None:
            with run.probe.step(step, flops=run.train_flops, images=len(y)):
                ce, o = _train_step(run, x, y)
        else:
            ce, o = _train_step(run, x, y)
        step += 1
        run_loss, run_n = run_loss + float(ce.detach()) * len(y), run_n + len(y)
        if step % cfg.log_every == 0:
            if not math.isfinite(float(ce.detach())):
                raise FloatingPointError(f"training loss is {float(ce)} at step {step} (lr {cfg.lr}); "
                                         f"lower the learning rate")
            run.log.log(kind="train", step=step, epoch=epoch, loss=float(ce.detach()),
                        balance=float(o.balance_loss.detach()), switch=float(o.switch_loss.detach()),
                        z_loss=float(o.z_loss.detach()),
                        lr={g["name"]: g["lr"] for g in opt.param_groups},
                        weight_decay={g["name"]: g["weight_decay"] for g in opt.param_groups})
            if run.probe is not None:
                run.probe.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{float(ce.detach()):.3f}")
        if step >= run.total_steps:
            break
    return step, run_loss / max(run_n, 1)


def _epoch_record(run: _Run, epoch: int, step: int, train_loss: float, val_b: Batches | None, t_train: float) -> dict:
    """The epoch's validation accuracy / loss and graph statistics, logged; the plateau heuristic steps on it."""
    model = run.model
    val = evaluate(model, val_b, batch=run.cfg.eval_batch) if val_b is not None else None
    rec = {"kind": "epoch", "epoch": epoch, "step": step, "train_loss": train_loss,
           "val_acc": val["acc"] if val else None, "val_loss": val["loss"] if val else None,
           "seconds": time.perf_counter() - t_train}
    if val and model.gate is not None:
        rec.update(val_routing_share=val["routing_share"], val_gate_entropy_per_sample=val["gate_entropy_per_sample"])
    if model.graph is not None:
        gs = graph_stats(model.graph)
        rec.update(graph_sparsity=gs["sparsity"], graph_dist_from_identity=gs["dist_from_identity"],
                   adjacency=gs["adjacency"])
    run.log.log(**rec)
    if run.plateau is not None:
        run.plateau.step(val["loss"] if val else rec["train_loss"], epoch)
    return rec


def _save_model(model: MoEClassifier, out: Path) -> None:
    atomic_save_safetensors({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "model.safetensors",
                            metadata={"refgen_moe_config": json.dumps(dataclasses.asdict(model.cfg)),
                                      "in_channels": str(model.in_channels), "num_classes": str(model.num_classes)})


def train(cfg: MoETrainConfig, out: str | Path, progress: bool = True, data: ImageSet | None = None,
          model: MoEClassifier | None = None) -> dict:
    """Train, evaluate on the test split, write the artifact folder; returns moe.json's content. DATA and MODEL
    (optional) replace loading the data set / building the model from the config (the dense baselines of
    bench/moe_acceptance.py pass a width-matched model)."""
    from tqdm import tqdm

    from refgen.runtime import resolve_device, seed_everything

    out = Path(out)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    t_start = time.perf_counter()
    ds = data if data is not None else load_dataset(cfg.dataset, cfg.cache, cfg.data_dir, cfg.n_train, cfg.n_test,
                                                    progress=progress)
    t_data = time.perf_counter() - t_start
    tr, va, mean, std = split_data(cfg, ds)
    train_b = Batches(ds.x_train[tr], ds.y_train[tr], mean, std, device)
    val_b = Batches(ds.x_train[va], ds.y_train[va], mean, std, device) if len(va) else None
    test_b = Batches(ds.x_test, ds.y_test, mean, std, device)

    torch.manual_seed(cfg.seed)
    model = (model if model is not None else build_model(cfg, ds)).to(device)
    run = _start_run(cfg, model, ds.shape, len(train_b), out, device)
    table = run.table
    run.log.log(kind="start", config=dataclasses.asdict(cfg), params=model.num_params(), cost=table.to_json(),
                n_train=len(train_b), n_val=len(va), n_test=len(test_b), device=str(device))

    step, epoch_recs = 0, []
    bar = tqdm(total=run.total_steps, desc=f"moe train {cfg.dataset} {cfg.model.kind}", disable=not progress)
    t_train = time.perf_counter()
    for epoch in range(cfg.epochs):
        step, train_loss = _train_epoch(run, train_b, epoch, step, bar)
        epoch_recs.append(_epoch_record(run, epoch, step, train_loss, val_b, t_train))
        if step >= run.total_steps:
            break
    stopped = step >= run.total_steps and cfg.max_steps is not None
    bar.close()
    train_s = time.perf_counter() - t_train

    test = evaluate(model, test_b, "dense", cfg.eval_batch, table)
    test_sparse = evaluate(model, test_b, "sparse", cfg.eval_batch)
    info = provenance(cfg, dataset=ds.name, data_source=ds.source, classes=list(ds.classes),
                      input_shape=list(ds.shape), norm_mean=mean.tolist(), norm_std=std.tolist(),
                      params=model.num_params(), cost=table.to_json(), steps=step, stopped_on_max_steps=stopped,
                      device=str(device), threads=torch.get_num_threads(),
                      metrics={"test": test, "test_acc_sparse_path": test_sparse["acc"],
                               "final_val": epoch_recs[-1] if epoch_recs else None},
                      graph=graph_stats(model.graph) if model.graph is not None else None,
                      hparams_timeline=run.plateau.timeline if run.plateau is not None else None,
                      monitor=run.probe.summary() if run.probe is not None else None,
                      seconds={"data": t_data, "train": train_s, "total": time.perf_counter() - t_start},
                      model_config=dataclasses.asdict(model.cfg))
    _save_model(model, out)
    atomic_write_json(out / "moe.json", info)
    run.log.log(kind="done", test_acc=test["acc"], steps=step, train_s=train_s)
    return info


def load_model(folder: str | Path, device="cpu") -> tuple[MoEClassifier, dict]:
    """(model in eval mode, moe.json) from a `refgen moe train` folder."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    f = folder / "model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist: not a `refgen moe train` output folder")
    with safe_open(str(f), "pt") as so:
        meta = so.metadata()
    d = json.loads(meta["refgen_moe_config"])
    if "gate_norm" not in d:  # written before the gate fix: no input norm, a biased output layer
        d.update(gate_norm="none", gate_bias=True)
    if "graph_self_loop" not in d:  # written before the graph fix: free diagonal, messages include h_i
        d.update(graph_self_loop="learned", graph_messages="team")
    mcfg = from_dict(MoEModelConfig, d, source=f)
    model = MoEClassifier(mcfg, int(meta["in_channels"]), int(meta["num_classes"]))
    model.load_state_dict(load_file(str(f)))
    info = json.loads((folder / "moe.json").read_text()) if (folder / "moe.json").is_file() else {}
    return model.to(device).eval(), info
