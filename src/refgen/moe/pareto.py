"""Cost efficiency: non-dominated points, hypervolume (pymoo) and the three operating modes, picked by rule.

Objectives are minimised: error = 1 - accuracy, and cost normalised by a fixed scale (the largest cost in the
matrix unless given), so the reference point (1, 1.1) is fixed across methods. Hypervolume is a property of a set
of operating points: one value per method over its setups (spec Phase 8).
"""

from __future__ import annotations

import numpy as np

REFERENCE = (1.0, 1.1)


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point dominates (both objectives minimised)."""
    p = np.asarray(points, dtype=float)
    keep = np.ones(len(p), dtype=bool)
    for i in range(len(p)):
        dominated = np.all(p <= p[i], axis=1) & np.any(p < p[i], axis=1)
        keep[i] = not dominated.any()
    return keep


def hypervolume(points, ref=REFERENCE) -> float:
    from pymoo.indicators.hv import HV

    p = np.asarray(points, dtype=float).reshape(-1, 2)
    if not len(p):
        return 0.0
    return float(HV(ref_point=np.asarray(ref, dtype=float))(p))


def operating_modes(rows: list[dict], acc_key: str = "acc", cost_key: str = "cost") -> dict:
    """quality_max = best accuracy; balanced = best accuracy per normalised cost; cost_saving = the cheapest whose
    accuracy is within 1 pp of the best (spec B6). ROWS: dicts with 'setup', ACC_KEY, COST_KEY."""
    if not rows:
        return {}
    best = max(r[acc_key] for r in rows)
    scale = max(r[cost_key] for r in rows) or 1.0
    q = max(rows, key=lambda r: (r[acc_key], -r[cost_key]))
    b = max(rows, key=lambda r: r[acc_key] / max(r[cost_key] / scale, 1e-12))
    c = min((r for r in rows if r[acc_key] >= best - 0.01), key=lambda r: (r[cost_key], -r[acc_key]))
    return {"quality_max": q["setup"], "balanced": b["setup"], "cost_saving": c["setup"]}
