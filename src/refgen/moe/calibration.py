"""Calibration: ECE and MCE (torchmetrics, 15 equal-width confidence bins), temperature scaling, and the bins of a
reliability diagram.

Temperature scaling divides the logits by one scalar T > 0 fitted by LBFGS on the negative log-likelihood of a
held-out validation split (never the split it is then evaluated on); it changes confidence, not the argmax, so
accuracy is unchanged by construction (tested).

A shift-aware temperature is the same fit on a *corrupted copy of the validation holdout*: every validation image
appears `copies` times, each copy corrupted (refgen.moe.corruptions.corrupt, one explicit numpy Generator seeded by
a fixed, recorded seed) with one (corruption, severity) pair of a mix; the pairs are dealt out balanced and then
shuffled. It is fitted on validation images only: `refuse_test_images` stops a fit whose images are the test split.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

N_BINS = 15
SEVERITY_MIXES = {"all": (1, 2, 3, 4, 5), "mild": (1, 2), "severe": (3, 4, 5), "all+clean": (0, 1, 2, 3, 4, 5)}


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


def severity_mix(mix) -> tuple[int, ...]:
    """A named mix (SEVERITY_MIXES) or a list of severities in 0..5 -> a sorted tuple; 0 = an uncorrupted copy
    (as many as of each other severity), so a mix with 0 fits one T to clean and shifted data together."""
    if isinstance(mix, str):
        if mix not in SEVERITY_MIXES:
            raise ValueError(f"unknown severity mix {mix!r}; named mixes: {SEVERITY_MIXES}, or a list of 1..5")
        return SEVERITY_MIXES[mix]
    out = tuple(sorted({int(s) for s in mix}))
    if not out or any(s not in (0, 1, 2, 3, 4, 5) for s in out) or out == (0,):
        raise ValueError(f"a severity mix must be a subset of 0..5 (0 = clean) with a severity >= 1, got {mix!r}")
    return out


def refuse_test_images(x_fit: np.ndarray, x_test: np.ndarray, max_overlap: float = 0.05) -> int:
    """Raise if the images a temperature is fitted on are (a view of, or mostly copies of) the test split; return
    how many of them are byte-identical to some test image. A small share is allowed because real data sets repeat
    images across splits (Animal-MNIST: 8 of its 800 validation silhouettes occur in the test split)."""
    import hashlib

    if np.shares_memory(x_fit, x_test):
        raise ValueError("refusing to fit a temperature on the test split (the images share memory with it)")
    test = {hashlib.sha256(r.tobytes()).digest() for r in np.ascontiguousarray(x_test)}
    dup = sum(hashlib.sha256(r.tobytes()).digest() in test for r in np.ascontiguousarray(x_fit))
    if len(x_fit) and dup > max_overlap * len(x_fit):
        raise ValueError(f"refusing to fit a temperature on the test split: {dup} of {len(x_fit)} fitting images are "
                         f"byte-identical to test images (> {max_overlap:.0%})")
    return int(dup)


def corrupted_validation(x: np.ndarray, y: np.ndarray, corruptions, severities, copies: int, seed: int):
    """(images, labels, meta): COPIES corrupted copies of the validation images X, each copy with one (corruption,
    severity) pair of CORRUPTIONS x SEVERITIES, pairs balanced (counts differ by at most one) and shuffled; a pure
    function of its arguments (meta carries the seed and the SHA-256 of the result)."""
    from refgen.moe.corruptions import CORRUPTIONS, corrupt
    from refgen.moe.data import sha256_array

    if copies < 1 or len(x) == 0:
        raise ValueError(f"need >= 1 copy of a non-empty validation split, got {copies} copies of {len(x)} images")
    pairs = [(c, s) for c in corruptions for s in severity_mix(severities)]
    bad = [c for c, _ in pairs if c not in CORRUPTIONS]
    if bad:
        raise ValueError(f"unknown corruption(s) {sorted(set(bad))}; known: {list(CORRUPTIONS)}")
    rng = np.random.default_rng([int(seed), 0x5EED])
    src = np.tile(np.arange(len(x)), copies)
    which = rng.permutation(np.resize(np.arange(len(pairs)), len(src)))
    out = np.stack([corrupt(x[i], *pairs[k], rng) if pairs[k][1] else x[i] for i, k in zip(src, which)])
    meta = {"seed": int(seed), "corruptions": sorted({c for c, _ in pairs}, key=list(CORRUPTIONS).index),
            "severities": list(severity_mix(severities)), "copies": int(copies), "n": int(len(out)),
            "val_n": int(len(x)), "val_sha256": sha256_array(x), "sha256": sha256_array(out)}
    return out, y[src], meta
