"""Monitoring: offline KPIs of a head checkpoint, error counts of generate runs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def build_report(head_json: str | Path | None = None, logs: list[str | Path] = ()) -> dict:
    rep: dict = {}
    if head_json:
        h = json.loads(Path(head_json).read_text())
        m = h.get("metrics", {})
        rep["head"] = {"file": str(head_json), "epoch": h.get("epoch"), "val_cos": m.get("val_cos"),
                       "val_rms_err": m.get("val_rms_err"), "train_cos": m.get("train_cos"),
                       "n_train": len(h.get("train_ids", [])), "n_val": len(h.get("val_ids", [])),
                       "qwen_image_model": h.get("qwen_image_model"), "vl_model": h.get("vl_model"),
                       "git_commit": h.get("git_commit"), "created": h.get("created")}
    files = []
    for p in logs:
        p = Path(p)
        files += sorted(p.rglob("generate_log.jsonl")) if p.is_dir() else [p]
    kinds: Counter = Counter()
    for f in files:
        for line in f.read_text().splitlines():
            if line.strip():
                kinds[json.loads(line)["kind"]] += 1
    if files:
        total = sum(kinds.values())
        rep["generate"] = {"runs": total, "ok": kinds.get("ok", 0), "errors_by_kind":
                           {k: v for k, v in sorted(kinds.items()) if k != "ok"},
                           "error_rate": (total - kinds.get("ok", 0)) / total if total else None,
                           "logs": [str(f) for f in files]}
    return rep


def to_markdown(rep: dict) -> str:
    lines = ["# refgen monitoring report", ""]
    if "head" in rep:
        h = rep["head"]
        lines += ["## Head (offline)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v if not isinstance(v, float) else f'{v:.4f}'} |" for k, v in h.items()]
        lines.append("")
    if "generate" in rep:
        g = rep["generate"]
        lines += ["## Generate runs (online)", "", f"{g['runs']} runs, {g['ok']} ok", "", "| error kind | count |",
                  "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in g["errors_by_kind"].items()] or ["| (none) | 0 |"]
    return "\n".join(lines) + "\n"
