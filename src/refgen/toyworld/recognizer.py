"""The toy world's ArcFace analogue: a small CNN that reads who is in an image.

One network, many heads. For each of two slots (slot 0 = the leftmost person, slot 1 = the second
person from the left) it predicts presence, every identity attribute and every state; plus the
scene. Slots are defined by left-to-right order, not by image half, so a single person anywhere is
always slot 0 and the labels are never ambiguous.

`evaluate` reports per-attribute accuracy over visible people and the joint identity accuracy (all
identity attributes of a person right at once), which is what the identity benchmark relies on.

Training images are rendered on the fly from seeds in a training range; held-out evaluation uses a
disjoint seed range, so no evaluation scene (or its exact jitter) was seen in training. A light
degradation (blur by down/up-sampling, pixel noise) is applied during training so the recognizer
also reads the softer images a diffusion model produces; `evaluate(..., degrade=True)` measures that.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from refgen.artifacts import JsonlLogger, atomic_save_safetensors, atomic_write_json, provenance
from refgen.toyworld import world

SLOTS = 2
# Stride pattern of the conv stack. Downsampling early keeps it fast on a 2-core CPU (the whole
# training must fit in minutes); the stride-1 convs at 16x16 and 8x8 are where glasses and shirt
# patterns are resolved.
STRIDES = (2, 2, 1, 2, 1, 2)
TRAIN_SEED_BASE = 1_000_000_000   # scene seeds used for training: base + [0, n)
EVAL_SEED_BASE = 2_000_000_000    # held out: never used for training
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "toyworld" / "recognizer"


@dataclass
class RecognizerConfig:
    size: int = 64                                   # network input; other sizes are resized to it
    channels: tuple[int, ...] = (24, 48, 48, 96, 96, 96)   # strides 2,2,1,2,1,2: 64 -> 4
    hidden: int = 160
    # training
    n_train: int = 24_000
    steps: int = 3000
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    degrade_prob: float = 0.5
    seed: int = 0
    n_eval: int = 2000
    log_every: int = 50

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) != len(STRIDES):
            raise ValueError(f"channels needs {len(STRIDES)} entries (strides {STRIDES}), got {self.channels}")
        if self.size < world.MIN_SIZE or self.size % 16:
            raise ValueError(f"size must be a multiple of 16 and >= {world.MIN_SIZE}, got {self.size}")
        for k in ("n_train", "steps", "batch", "n_eval", "log_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not 0.0 <= self.degrade_prob <= 1.0:
            raise ValueError(f"degrade_prob must be in [0, 1], got {self.degrade_prob}")


# ---------------------------------------------------------------------------------------------
# labels


def heads() -> dict[str, int]:
    """Head name -> number of classes. Order is fixed: it is the layout of the output vector."""
    h = {}
    for s in range(SLOTS):
        h[f"p{s}.present"] = 2
        for k, v in {**world.ATTRIBUTES, **world.STATES}.items():
            h[f"p{s}.{k}"] = len(v)
    h["scene"] = len(world.SCENES)
    return h


IGNORE = -100


def labels(scene: world.Scene) -> dict[str, int]:
    y = {"scene": world.SCENES.index(scene.background)}
    for s in range(SLOTS):
        p = scene.people[s] if s < len(scene.people) else None
        y[f"p{s}.present"] = int(p is not None)
        for k, v in world.ATTRIBUTES.items():
            y[f"p{s}.{k}"] = v.index(getattr(p.identity, k)) if p else IGNORE
        for k, v in world.STATES.items():
            y[f"p{s}.{k}"] = v.index(getattr(p.state, k)) if p else IGNORE
    return y


def render_set(seed_base: int, n: int, size: int, progress: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(uint8 images (n,3,size,size), {head: (n,) labels}) for scenes seed_base + [0, n)."""
    imgs = np.empty((n, size, size, 3), dtype=np.uint8)
    ys = {h: np.empty(n, dtype=np.int64) for h in heads()}
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"render {n}", leave=False)
    for i in it:
        sc = world.scene_from_seed(seed_base + i)
        imgs[i] = np.asarray(world.render(sc, size))
        for h, v in labels(sc).items():
            ys[h][i] = v
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), {h: torch.from_numpy(v) for h, v in ys.items()}


# ---------------------------------------------------------------------------------------------
# model


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class RecognizerNet(nn.Module):
    """64 -> 32 -> 16 -> 8 -> 4 spatial, then a flatten (not a global pool: the slot heads need to
    know where things are) and one hidden layer shared by all heads."""

    def __init__(self, cfg: RecognizerConfig):
        super().__init__()
        c = cfg.channels
        self.size = cfg.size
        self.features = nn.Sequential(*[_conv(ci, co, st) for ci, co, st in zip((3, *c[:-1]), c, STRIDES)])
        g = cfg.size // 16
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(c[-1] * g * g, cfg.hidden), nn.ReLU(inplace=True))
        self.head_sizes = heads()
        self.out = nn.Linear(cfg.hidden, sum(self.head_sizes.values()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: float (B,3,H,W) in [0,1]; returns {head: logits (B, classes)}."""
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        z = self.out(self.trunk(self.features((x - 0.5) / 0.25)))
        return dict(zip(self.head_sizes, torch.split(z, list(self.head_sizes.values()), dim=1)))


def degrade(x: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Soften a random subset of a float batch: down/up-sample blur plus pixel noise."""
    if prob <= 0:
        return x
    B, _, H, W = x.shape
    pick = torch.rand(B, generator=generator) < prob
    if not pick.any():
        return x
    x = x.clone()
    sub = x[pick]
    f = float(0.4 + 0.4 * torch.rand(1, generator=generator))
    small = F.interpolate(sub, scale_factor=f, mode="bilinear", antialias=True, align_corners=False)
    sub = F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)
    sub = sub + 0.04 * torch.rand(1, generator=generator) * torch.randn(sub.shape, generator=generator)
    x[pick] = sub.clamp(0, 1)
    return x


def loss_fn(logits: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> torch.Tensor:
    # absent slots carry IGNORE labels, so attribute heads learn only from people who are there
    return sum(F.cross_entropy(logits[h], y[h], ignore_index=IGNORE) for h in logits
               if (y[h] != IGNORE).any())


# ---------------------------------------------------------------------------------------------
# train / evaluate / save / load


def train(cfg: RecognizerConfig, out: str | Path | None = None, *, device: str = "cpu", progress: bool = True,
          train_data=None) -> tuple[RecognizerNet, dict]:
    """Train from scratch; writes `out` (weights, config.json, metrics.jsonl) when given."""
    from refgen.runtime import resolve_device, seed_everything

    dev = resolve_device(device)
    seed_everything(cfg.seed)
    t0 = time.time()
    X, Y = train_data if train_data is not None else render_set(TRAIN_SEED_BASE + cfg.seed * 10_000_000, cfg.n_train,
                                                                 cfg.size, progress)
    t_render = time.time() - t0
    net = RecognizerNet(cfg).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    g = torch.Generator().manual_seed(cfg.seed)
    logger = JsonlLogger(Path(out) / "metrics.jsonl") if out is not None else None
    it = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="recognizer")
    losses = []
    net.train()
    n = X.shape[0]
    for step in it:
        idx = torch.randint(0, n, (cfg.batch,), generator=g)
        x = degrade(X[idx].float() / 255.0, cfg.degrade_prob, g).to(dev)
        y = {h: v[idx].to(dev) for h, v in Y.items()}
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % cfg.log_every == 0 or step == 0:
            rec = {"step": step + 1, "loss": sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]),
                   "lr": sched.get_last_lr()[0]}
            if logger:
                logger.log(**rec)
            if progress:
                it.set_postfix(loss=f"{rec['loss']:.4f}")
    info = {"losses": losses, "render_s": t_render, "train_s": time.time() - t0 - t_render}
    if out is not None:
        metrics = {"clean": evaluate(net, cfg.n_eval, device=device),
                   "degraded": evaluate(net, cfg.n_eval, device=device, degrade_images=True)}
        info["metrics"] = metrics
        save(net, cfg, out, metrics={**metrics, "render_s": t_render, "train_s": info["train_s"],
                                     "device": str(dev)})
    return net, info


@torch.no_grad()
def predict_logits(net: RecognizerNet, images, device: str = "cpu", batch: int = 256) -> dict[str, torch.Tensor]:
    """images: uint8 tensor (N,3,H,W), float tensor in [0,1], or a list of PIL images."""
    if isinstance(images, list):
        images = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
    net.eval()
    outs: dict[str, list] = {}
    for i in range(0, images.shape[0], batch):
        x = images[i:i + batch]
        x = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).to(device)
        for h, v in net(x).items():
            outs.setdefault(h, []).append(v.cpu())
    return {h: torch.cat(v) for h, v in outs.items()}


def predict(net: RecognizerNet, images, device: str = "cpu") -> list[dict]:
    """Readable predictions: [{"scene": ..., "people": [{attr: value, ..., "confidence": p}, ...]}]
    with people left to right; a slot whose presence is predicted absent is left out."""
    logits = predict_logits(net, images, device)
    n = logits["scene"].shape[0]
    res = []
    for i in range(n):
        people = []
        for s in range(SLOTS):
            if int(logits[f"p{s}.present"][i].argmax()) != 1:
                continue
            p, conf = {}, 1.0
            for k, v in {**world.ATTRIBUTES, **world.STATES}.items():
                pr = logits[f"p{s}.{k}"][i].softmax(-1)
                p[k] = v[int(pr.argmax())]
                if k in world.ATTRIBUTES:
                    conf *= float(pr.max())
            p["confidence"] = conf  # product of the identity heads' top probabilities
            people.append(p)
        res.append({"scene": world.SCENES[int(logits["scene"][i].argmax())], "people": people})
    return res


@torch.no_grad()
def evaluate(net: RecognizerNet, n: int = 2000, *, device: str = "cpu", seed_base: int = EVAL_SEED_BASE,
             degrade_images: bool = False, data=None) -> dict:
    """Held-out accuracy: per head (over visible people for attribute/state heads), presence, scene,
    and `joint_identity`: the fraction of visible people whose identity attributes are all right."""
    size = net.size
    X, Y = data if data is not None else render_set(seed_base, n, size)
    if degrade_images:
        X = degrade(X.float() / 255.0, 1.0, torch.Generator().manual_seed(1234))
    L = predict_logits(net, X, device)
    pred = {h: v.argmax(-1) for h, v in L.items()}
    m: dict = {"n_images": int(X.shape[0])}
    for h in L:
        valid = Y[h] != IGNORE
        m[f"acc/{h}"] = float((pred[h][valid] == Y[h][valid]).float().mean()) if valid.any() else None
    per_attr = {}
    joint_ok, joint_n = 0, 0
    for s in range(SLOTS):
        vis = Y[f"p{s}.present"] == 1
        ok = vis & (pred[f"p{s}.present"] == 1)
        for k in world.ATTRIBUTES:
            ok = ok & (pred[f"p{s}.{k}"] == Y[f"p{s}.{k}"])
        joint_ok += int(ok.sum())
        joint_n += int(vis.sum())
    for k in {**world.ATTRIBUTES, **world.STATES}:
        c = sum(int(((pred[f"p{s}.{k}"] == Y[f"p{s}.{k}"]) & (Y[f"p{s}.present"] == 1)).sum()) for s in range(SLOTS))
        v = sum(int((Y[f"p{s}.present"] == 1).sum()) for s in range(SLOTS))
        per_attr[k] = c / max(1, v)
    m["attribute"] = per_attr
    m["presence"] = float(sum((pred[f"p{s}.present"] == Y[f"p{s}.present"]).float().mean() for s in range(SLOTS)) / SLOTS)
    m["scene"] = m["acc/scene"]
    m["joint_identity"] = joint_ok / max(1, joint_n)
    m["n_people"] = joint_n
    return m


def save(net: RecognizerNet, cfg: RecognizerConfig, out: str | Path, metrics: dict | None = None) -> None:
    """model.safetensors (fp16: halves the shipped size; the net is evaluated in fp32 after loading)
    + config.json (config, label vocabulary, metrics, provenance)."""
    out = Path(out)
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    atomic_save_safetensors(sd, out / "model.safetensors", metadata={"format": "pt", "kind": "toyworld-recognizer"})
    atomic_write_json(out / "config.json", {
        "config": asdict(cfg), "heads": heads(), "attributes": world.ATTRIBUTES, "states": world.STATES,
        "scenes": world.SCENES, "metrics": metrics or {}, "provenance": provenance(),
    })


def load(path: str | Path | None = None, device: str = "cpu") -> RecognizerNet:
    """Load a saved recognizer (default: the one shipped in refgen/assets/toyworld/recognizer)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_DIR
    cfg_path, w_path = path / "config.json", path / "model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"recognizer file {p} is missing; train one with `refgen toyworld train-recognizer`")
    meta = json.loads(cfg_path.read_text())
    if meta.get("heads") != heads():
        raise ValueError(f"{cfg_path}: saved heads {meta.get('heads')} differ from this world's {heads()}; "
                         "the world vocabulary changed, retrain the recognizer")
    cfg = RecognizerConfig(**meta["config"])
    net = RecognizerNet(cfg)
    sd = load_file(str(w_path))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return net.to(device).eval()


__all__ = ["RecognizerConfig", "RecognizerNet", "heads", "labels", "render_set", "train", "evaluate", "predict",
           "predict_logits", "save", "load", "DEFAULT_DIR"]
