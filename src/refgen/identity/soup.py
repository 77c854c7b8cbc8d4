"""Weight averaging of identity heads (a "model soup", Wortsman et al. 2022).

Heads fine-tuned from one start (`refgen train-head --init-head`: a one-person head, and the same head continued
with two-person steps) sit in one basin, so their weight-by-weight average is itself a head, somewhere between
them on the one-person / two-person trade-off, at no training cost. Heads that do not share a start average to
nothing useful; that cannot be checked from the files, so it is the caller's to know (the record keeps the parents).

The soup is a head folder like any other (head.safetensors + head.json) that `load_head`, `generate`, the API and
the benchmarks read. Its record is the first parent's, with `soup` (parents and weights) added and the training
and validation people of every parent, so a benchmark that refuses heads trained on its test people still can.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from refgen.artifacts import atomic_save_safetensors, atomic_write_json, git_commit, provenance
from refgen.identity.head import HEAD_FILE, HEAD_JSON, PLACEHOLDER_KEY, RECORD_KEYS, canonical, read_weights


def _read(folder: Path) -> tuple[dict, dict, dict]:
    """(tensors, weights metadata, head.json record) of a head folder."""
    w, j = folder / HEAD_FILE, folder / HEAD_JSON
    for p in (w, j):
        if not p.is_file():
            raise FileNotFoundError(f"{folder} is not a head folder: {p.name} is missing (a soup needs the "
                                    "folders `refgen train-head` writes)")
    return (*read_weights(w), json.loads(j.read_text()))


def soup_heads(heads: list[str | Path], weights: list[float] | None, out: str | Path) -> dict:
    """Average `heads` (folders) with `weights` (non-negative, summing to 1; None: equal) into the head folder
    `out`. Refused, naming the heads and what differs: fewer than two heads, heads that are not the same
    architecture and output (RECORD_KEYS), token heads with other placeholder embeddings or token scale, tensors
    of other names or shapes. Returns the soup's record."""
    folders = [Path(h) for h in heads]
    if len(folders) < 2:
        raise ValueError(f"a soup needs at least two heads, got {len(folders)}")
    weights = [1.0 / len(folders)] * len(folders) if weights is None else [float(x) for x in weights]
    if len(weights) != len(folders):
        raise ValueError(f"{len(weights)} weights for {len(folders)} heads")
    if min(weights) < 0 or abs(sum(weights) - 1) > 1e-6:
        raise ValueError(f"soup weights must be >= 0 and sum to 1 (an average stays in the parents' range), got "
                         f"{weights}")
    parts = [_read(f) for f in folders]
    sd0, md0, rec0 = parts[0]
    for f, (sd, md, _) in zip(folders[1:], parts[1:]):
        for key in (*RECORD_KEYS, "token_scale"):
            a, b = md0.get(key), md.get(key)
            if canonical(key, a) != canonical(key, b):
                raise ValueError(f"cannot average {folders[0]} and {f}: they differ in {key} ({a!r} against {b!r})")
        if sd.keys() != sd0.keys():
            raise ValueError(f"cannot average {folders[0]} and {f}: other tensors "
                             f"({sorted(set(sd) ^ set(sd0))[:3]} ...)")
        for k in sd0:
            if sd[k].shape != sd0[k].shape:
                raise ValueError(f"cannot average {folders[0]} and {f}: {k} is {tuple(sd0[k].shape)} against "
                                 f"{tuple(sd[k].shape)}")
        # a token head's output is a step from these embeddings: a soup of steps from different points is not one
        if PLACEHOLDER_KEY in sd0 and not torch.equal(sd[PLACEHOLDER_KEY], sd0[PLACEHOLDER_KEY]):
            raise ValueError(f"cannot average {folders[0]} and {f}: their placeholder embeddings "
                             f"({PLACEHOLDER_KEY}) differ (heads for another text encoder)")
    soup = {}
    for k, t0 in sd0.items():
        if k == PLACEHOLDER_KEY:
            soup[k] = t0
            continue
        acc = torch.zeros_like(t0, dtype=torch.float64)
        for w, (sd, _, _) in zip(weights, parts):
            acc += w * sd[k].double()
        soup[k] = acc.to(t0.dtype).contiguous()
    info = {"parents": [str(f) for f in folders], "weights": weights}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md_out = {**md0, "soup": json.dumps(info), "git_commit": str(git_commit())}
    for key in ("step", "metrics"):   # the first parent's training, not the soup's (head.json keeps every parent's)
        md_out.pop(key, None)
    atomic_save_safetensors(soup, out / HEAD_FILE, md_out)

    def union(key: str) -> list:
        seen: dict = {}
        for _, _, rec in parts:
            seen.update(dict.fromkeys(rec.get(key, [])))
        return list(seen)

    skip = {"created", "git_commit", "versions", "config", "step", "metrics", "timings", "train_ids", "val_ids"}
    rec = provenance(rec0.get("config"), **{k: v for k, v in rec0.items() if k not in skip}, soup=info,
                     parent_metrics=[r.get("metrics") for _, _, r in parts],
                     train_ids=union("train_ids"), val_ids=union("val_ids"))
    atomic_write_json(out / HEAD_JSON, rec)
    return rec
