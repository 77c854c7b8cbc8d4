"""Calibration: ECE and MCE (torchmetrics, 15 equal-width confidence bins), temperature scaling, and the bins of a
reliability diagram.

Temperature scaling divides the logits by one scalar T > 0 fitted by LBFGS on the negative log-likelihood of a
held-out validation split (never the split it is then evaluated on); it changes confidence, not the argmax, so
accuracy is unchanged by construction (tested).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

N_BINS = 15


def ece_mce(logits: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict:
    from torchmetrics.classification import MulticlassCalibrationError

    p = torch.from_numpy(np.asarray(logits, dtype=np.float64)).softmax(1).float()
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    c = p.shape[1]
    ece = MulticlassCalibrationError(num_classes=c, n_bins=n_bins, norm="l1")(p, y)
    mce = MulticlassCalibrationError(num_classes=c, n_bins=n_bins, norm="max")(p, y)
    return {"ece": float(ece), "mce": float(mce)}


def fit_temperature(logits: np.ndarray, labels: np.ndarray, iters: int = 100) -> float:
    """T minimising the NLL of softmax(logits / T) on (LOGITS, LABELS); optimised as log T (T stays > 0)."""
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if len(y) == 0:
        raise ValueError("temperature scaling needs a non-empty validation split")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not np.isfinite(t):
        raise FloatingPointError("temperature fit diverged")
    return t


def reliability_bins(logits: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Per equal-width confidence bin: count, mean confidence, accuracy (None where empty)."""
    p = torch.from_numpy(np.asarray(logits, dtype=np.float64)).softmax(1).numpy()
    conf, pred = p.max(1), p.argmax(1)
    idx = np.clip((conf * n_bins).astype(int), 0, n_bins - 1)
    out = {"count": [], "confidence": [], "accuracy": []}
    for b in range(n_bins):
        m = idx == b
        out["count"].append(int(m.sum()))
        out["confidence"].append(float(conf[m].mean()) if m.any() else None)
        out["accuracy"].append(float((pred[m] == labels[m]).mean()) if m.any() else None)
    return out


def uncertainty(logits: np.ndarray) -> dict:
    """Mean entropy, mean variation ratio (1 - max p) and mean top-2 gap (p1 - p2): the seed's «Variation Ratio
    (Top-2 Gap)» is two metrics (spec Phase 8)."""
    p = torch.from_numpy(np.asarray(logits, dtype=np.float64)).softmax(1).numpy()
    s = -np.sort(-p, axis=1)
    ent = -(p * np.log(np.clip(p, 1e-12, None))).sum(1)
    return {"entropy": float(ent.mean()), "variation_ratio": float((1 - s[:, 0]).mean()),
            "top2_gap": float((s[:, 0] - s[:, 1]).mean()) if p.shape[1] > 1 else 1.0}
