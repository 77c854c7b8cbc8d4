"""Monitoring: offline KPIs of a head checkpoint, error counts of generate runs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def build_report(head_json: str | Path | None = None, logs: list[str | Path] = (),
                 toyworld: str | Path | None = None) -> dict:
    """`head_json`: a head folder, its head.json or its head.safetensors (regression heads: cosine / RMS error to
    the teachers; end-to-end heads: the fixed-noise flow loss of held-out and training people against the bare
    placeholder's).
    `toyworld`: the result.json of `bench/toyworld_head_e2e.py` for that head: what it draws on unseen people."""
    rep: dict = {}
    if head_json:
        path = Path(head_json)
        if path.is_dir():
            path = path / "head.json"
        elif path.suffix == ".safetensors":  # the weights file `generate --head` takes: its record lies beside it
            path = path.with_name("head.json")
        if not path.is_file():
            raise FileNotFoundError(f"head record {path} not found: give a head folder, its head.json or its "
                                    f"head.safetensors (from `refgen train-head`)")
        try:
            h = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a head record (head.json from `refgen train-head`): {e}") from None
        m = h.get("metrics", {})
        rep["head"] = {"file": str(path), "kind": h.get("kind", "linear"), "output": h.get("output", "residual"),
                       "objective": h.get("objective", "teacher"), "epoch": h.get("epoch"), "step": h.get("step"),
                       "n_train": len(h.get("train_ids", [])), "n_val": len(h.get("val_ids", [])),
                       # the window it writes: people of one width per prompt, a start head as wide as the inversion
                       "L": None if h.get("L") is None else int(h["L"]),  # e2e records keep it as text
                       "slot_repeat": (h.get("config") or {}).get("slot_repeat", 1),
                       "qwen_image_model": h.get("qwen_image_model"), "vl_model": h.get("vl_model"),
                       "git_commit": h.get("git_commit"), "created": h.get("created")}
        keys = (("val_flow", "val_flow_zero", "train_flow", "train_flow_zero") if "objective" in h and
                h["objective"] != "teacher" else ("val_cos", "val_rms_err", "train_cos"))
        rep["head"].update({k: m.get(k) for k in keys})
    if toyworld:
        rep["toyworld"] = toyworld_kpis(json.loads(Path(toyworld).read_text()), str(toyworld))
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


def toyworld_kpis(r: dict, source: str = "") -> dict:
    """The head's toy-world numbers on unseen people (bench/toyworld_head_e2e.py result.json), each beside the
    caption ceiling it is read against, with its 95 % interval and n."""
    alpha = r["test"]["alpha"]
    m, c1 = r["test"]["per_alpha"][alpha], r["ceiling"]["single"]
    k = {"source": source, "alpha": alpha, "identity": m["identity_acc"], "identity_ci": m["identity_ci"],
         "n_images": m["n_images"], "of_ceiling": m["identity_acc"] / max(c1["identity_acc"], 1e-9),
         "ceiling": c1["identity_acc"], "attributes": m["attribute_acc"], "scene": m["scene_acc"],
         "scene_ci": m["scene_ci"]}
    if "identity_ci_people" in m:  # clustered by person (results before it have none)
        k.update(identity_ci_people=m["identity_ci_people"], n_people_distinct=m["n_distinct_people"])
    if "two_slot" in r:
        t, c2 = r["two_slot"], r["ceiling"]["pair"]
        k.update(two_people_both_right=t["all_people_acc"], two_people_ci=t["all_people_ci"],
                 two_people_ceiling=c2["all_people_acc"], two_people_count=t["people_count_acc"],
                 two_people_n_images=t["n_images"])
        if "leak" in t:  # results from before the measure have none
            k.update(two_people_leak=t["leak"], two_people_leak_chance=t["leak_chance"])
    if "two_slot_pair_alpha" in r:  # another alpha chosen for two people on validation pairs
        t = r["two_slot_pair_alpha"]
        k.update(two_people_alpha=t["alpha"], two_people_both_right_at_that_alpha=t["all_people_acc"],
                 two_people_ci_at_that_alpha=t["all_people_ci"])
    if "copy_paste" in r:
        cp = r["copy_paste"]["head"]
        k.update(one_photo_identity=cp["identity_acc"], one_photo_scene_as_asked=cp["scene_acc"],
                 one_photo_reference_scene_back=cp["scene_is_reference_scene"],
                 one_photo_expression_as_asked=cp["expression_as_asked"])
    return k


def to_markdown(rep: dict) -> str:
    lines = ["# refgen monitoring report", ""]
    if "head" in rep:
        h = rep["head"]
        lines += ["## Head (offline)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v if not isinstance(v, float) else f'{v:.4f}'} |" for k, v in h.items()]
        lines.append("")
    if "toyworld" in rep:
        lines += ["## Head on unseen toy-world people", "", "| KPI | value |", "|---|---|"]
        for k, v in rep["toyworld"].items():
            if isinstance(v, list):
                v = f"[{v[0]:.1%}, {v[1]:.1%}]"
            elif isinstance(v, float):
                v = f"{v:.1%}"
            lines.append(f"| {k} | {v} |")
        lines.append("")
    if "generate" in rep:
        g = rep["generate"]
        lines += ["## Generate runs (online)", "", f"{g['runs']} runs, {g['ok']} ok", "", "| error kind | count |",
                  "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in g["errors_by_kind"].items()] or ["| (none) | 0 |"]
    return "\n".join(lines) + "\n"
