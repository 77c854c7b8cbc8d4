"""Short fine-tuning of a compressed model (pruned, factorised, fake-quantised) on the training images: the
recovery step between compression steps. Cross-entropy on the logits only (the gate is kept as trained: its
balance terms were settled in `refgen moe train`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from refgen.moe import onnxrun


def finetune(module: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, batch: int = 64,
             seed: int = 0, params=None, switch_mode: bool = True) -> list[float]:
    """EPOCHS passes of AdamW over uint8 images X [N, H, W, C] (MODULE takes [0, 1] NCHW and returns (logits,
    ...)). PARAMS (default: every parameter that requires grad). SWITCH_MODE=False leaves train/eval alone (a
    torch.export module refuses both; torchao switches its ops). Returns the mean loss per epoch."""
    if epochs <= 0:
        return []
    params = [p for p in (params if params is not None else module.parameters()) if p.requires_grad]
    if not params:
        raise ValueError("finetune: the module has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    xt, yt = torch.from_numpy(onnxrun.to_input(x)), torch.from_numpy(np.asarray(y, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    # Dropout and the gate's training noise draw from torch's global generator: seed it for this call only, so
    # the result does not depend on what the process ran before (the compress runner's earlier methods).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _epochs(module, opt, xt, yt, gen, epochs, batch, lr, switch_mode)


def _epochs(module, opt, xt, yt, gen, epochs: int, batch: int, lr: float, switch_mode: bool) -> list[float]:
    if switch_mode:
        module.train()
    losses = []
    for _ in range(epochs):
        perm, tot = torch.randperm(len(yt), generator=gen), 0.0
        for i in range(0, len(yt), batch):
            idx = perm[i:i + batch]
            if len(idx) < 2:  # BatchNorm in training mode needs two inputs
                continue
            loss = F.cross_entropy(module(xt[idx])[0], yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
        if not np.isfinite(tot):
            raise FloatingPointError(f"fine-tuning loss is {tot} (lr {lr}); lower the learning rate")
        losses.append(tot / len(yt))
    if switch_mode:
        module.eval()
    return losses


@torch.no_grad()
def accuracy(module: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    """Top-1 accuracy of MODULE (already in eval mode) on uint8 images X."""
    xt = torch.from_numpy(onnxrun.to_input(x))
    pred = torch.cat([module(xt[i:i + batch])[0].argmax(1) for i in range(0, len(xt), batch)])
    return float((pred.numpy() == y).mean())
