"""The markdown report of an acceptance folder (bench/moe_acceptance.py --plots): the acceptance table the caller
passes in, the expert-graph edge heatmaps of every graph-MoE run (final adjacency, and snapshots every 5 epochs
from metrics.jsonl), and cost vs accuracy per run with the RL lambda sweep when rl.json exists.

Two folder layouts are read: the script's own OUT/<dataset>/<variant>_s<seed>/ and one data set's run folders
directly under the folder (how docs/results keeps them, metrics.jsonl gzipped or not). Every PNG has a JSON of the
numbers it draws beside it, so a reader (or a test) can check the picture against the runs.

Written per data set DS into the folder that holds its runs: report.md (one for the whole folder, at its root),
graphs/<DS>_<run>.png + .json (one per graph-MoE run), graphs/<DS>_final.png (the final adjacency of every graph
run side by side), cost_accuracy_<DS>.png + .json.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

RUN_NAME = re.compile(r"^(?P<variant>.+)_s(?P<seed>\d+)$")
# the seed: «Snapshots alle 5 Epochen», «nur 4–8 Experten» in plots
SNAPSHOT_EVERY = 5
MAX_EXPERTS = 8


def _run_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / "moe.json").is_file())


def _read_json(f: Path) -> dict:
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from e


def dataset_dirs(root: str | Path) -> dict[str, Path]:
    """{data set: the folder holding its run folders} under ROOT: ROOT's sub-folders that hold runs, named by the
    sub-folder, and ROOT itself when runs sit directly in it, named by its runs' moe.json "dataset"."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder (expected a bench/moe_acceptance.py --out folder)")
    found = {}
    direct = _run_dirs(root)
    if direct:
        name = _read_json(direct[0] / "moe.json").get("dataset") or root.name
        found[name] = root
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub not in direct and _run_dirs(sub):
            found.setdefault(sub.name, sub)
    return found


def _get(info: dict, f: Path, *keys):
    cur = info
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            raise ValueError(f"{f}: has no {'.'.join(keys)} (not a `refgen moe train` moe.json?)")
        cur = cur[k]
    return cur


def load_runs(folder: Path) -> list[dict]:
    """One record per run folder: variant and seed (from the folder name <variant>_s<seed>; otherwise the whole
    name and '-'), test accuracy, active FLOPs/image, stored bytes, and the moe.json itself."""
    runs = []
    for d in _run_dirs(folder):
        f = d / "moe.json"
        info = _read_json(f)
        m = RUN_NAME.match(d.name)
        runs.append({"name": d.name, "dir": d, "variant": m["variant"] if m else d.name,
                     "seed": int(m["seed"]) if m else "-", "acc": float(_get(info, f, "metrics", "test", "acc")),
                     "flops": float(_get(info, f, "metrics", "test", "active_flops_per_image")),
                     "bytes": int(_get(info, f, "cost", "total_bytes")), "info": info})
    return runs


def final_adjacency(run_dir: Path, info: dict) -> list[list[float]] | None:
    """The raw E x E adjacency at the end of training: moe.json's graph.adjacency, else recomputed from
    model.safetensors (moe.json files written before the graph statistics were recorded); None without a graph."""
    graph = info.get("graph")
    if graph and graph.get("adjacency") is not None:
        return graph["adjacency"]
    if (info.get("model_config") or {}).get("kind", "graph") != "graph":
        return None
    if not (run_dir / "model.safetensors").is_file():
        return None
    from refgen.moe.graph import graph_stats
    from refgen.moe.train import load_model

    model, _ = load_model(run_dir)
    return graph_stats(model.graph)["adjacency"] if model.graph is not None else None


def epoch_adjacencies(run_dir: Path) -> list[tuple[int, list[list[float]]]]:
    """(epoch, adjacency) of every epoch record in the run's metrics.jsonl (or metrics.jsonl.gz); [] when there is
    no log or it records no adjacency."""
    for name, opener in (("metrics.jsonl", open), ("metrics.jsonl.gz", gzip.open)):
        f = run_dir / name
        if f.is_file():
            out = []
            with opener(f, "rt") as fh:
                for i, line in enumerate(fh):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{f}: line {i + 1} is not JSON ({e})") from e
                    if rec.get("kind") == "epoch" and rec.get("adjacency") is not None:
                        out.append((int(rec["epoch"]), rec["adjacency"]))
            return out
    return []


def shown_experts(info: dict, num_experts: int, limit: int = MAX_EXPERTS) -> list[int]:
    """All experts when there are at most LIMIT, else the LIMIT with the largest test routing share (sorted by id):
    a heatmap of more cells is unreadable."""
    if num_experts <= limit:
        return list(range(num_experts))
    share = (info.get("metrics") or {}).get("test", {}).get("routing_share") or [0.0] * num_experts
    return sorted(sorted(range(num_experts), key=lambda e: -share[e])[:limit])


def _sub(a: list[list[float]], ids: list[int]) -> list[list[float]]:
    return [[a[i][j] for j in ids] for i in ids]


def _snapshots(epochs: list[tuple[int, list]], every: int) -> list[tuple[int, list]]:
    """The first epoch and every EVERY-th (1-based: after epoch 5, 10, ...), the last one left to the final panel."""
    keep = [(e, a) for k, (e, a) in enumerate(epochs) if k == 0 or (e + 1) % every == 0]
    return [(e, a) for e, a in keep if e != epochs[-1][0]]


def graph_heatmaps(ds: str, folder: Path, runs: list[dict], every: int = SNAPSHOT_EVERY) -> list[dict]:
    """For every graph-MoE run: graphs/<ds>_<run>.png (snapshots + final) and .json; then graphs/<ds>_final.png
    of all finals. Returns one record per run ({'name', 'png', 'experts', 'final', 'snapshots', 'sparsity', ...})."""
    from refgen.artifacts import atomic_write_json
    from refgen.moe.plots import edge_heatmaps

    out, finals = [], []
    for r in runs:
        a = final_adjacency(r["dir"], r["info"])
        if a is None:
            continue
        ids = shown_experts(r["info"], len(a))
        epochs = epoch_adjacencies(r["dir"])
        last = epochs[-1][0] + 1 if epochs else None
        snaps = _snapshots(epochs, every) if epochs else []
        g = r["info"].get("graph") or {}
        stats = (f"sparsity {g['sparsity']:.2f}, ||A-I|| {g['dist_from_identity']:.3f}"
                 if "sparsity" in g and "dist_from_identity" in g else "")
        panels = [{"title": f"after epoch {e + 1}", "adjacency": _sub(m, ids), "experts": ids} for e, m in snaps]
        panels.append({"title": f"final{f' (epoch {last})' if last else ''}" + (f"\n{stats}" if stats else ""),
                       "adjacency": _sub(a, ids), "experts": ids})
        png = folder / "graphs" / f"{ds}_{r['name']}.png"
        drawn = edge_heatmaps(panels, png)
        rec = {"name": r["name"], "png": png, "experts": ids, "num_experts": len(a), "final": a,
               "snapshots": [{"epoch": e + 1, "adjacency": m} for e, m in snaps], "drawn": drawn,
               "sparsity": g.get("sparsity"), "dist_from_identity": g.get("dist_from_identity"),
               "epochs_logged": len(epochs)}
        atomic_write_json(png.with_suffix(".json"), {k: v for k, v in rec.items() if k != "png"})
        out.append(rec)
        finals.append({"title": r["name"] + (f"\n{stats}" if stats else ""), "adjacency": _sub(a, ids),
                       "experts": ids})
    if finals:
        edge_heatmaps(finals, folder / "graphs" / f"{ds}_final.png", cols=min(len(finals), 5))
    return out


def cost_scatter(ds: str, folder: Path, runs: list[dict]) -> dict:
    """cost_accuracy_<ds>.png + .json: one point per run; the RL panel when <folder>/rl/rl.json exists."""
    from refgen.artifacts import atomic_write_json
    from refgen.moe.plots import cost_accuracy

    f = folder / "rl" / "rl.json"
    rl = _read_json(f) if f.is_file() else None
    if rl is not None and not isinstance(rl.get("lambdas"), list):
        raise ValueError(f"{f}: has no 'lambdas' list (not a `refgen moe rl` rl.json?)")
    points = [{k: r[k] for k in ("name", "variant", "seed", "acc", "flops", "bytes")} for r in runs]
    png = folder / f"cost_accuracy_{ds}.png"
    drawn = cost_accuracy(points, png, rl)
    rl_points = [{k: r.get(k) for k in ("lam", "acc", "random_gate_acc", "active_flops_per_image",
                                        "on_pareto_front")} for r in rl["lambdas"]] if rl else None
    atomic_write_json(png.with_suffix(".json"), {"runs": points, "rl": rl_points, "drawn": drawn,
                                                 "rl_json": str(f.relative_to(folder)) if rl else None})
    return {"png": png, "points": points, "rl": rl, "rl_file": f, "drawn": drawn}


def _rel(p: Path, root: Path) -> str:
    return p.relative_to(root).as_posix()


def write_report(root: str | Path, table_lines: list[str], head_lines: list[str] = (),
                 datasets: list[str] | None = None) -> dict:
    """ROOT/report.md (HEAD_LINES, then TABLE_LINES, then per data set the scatter and the heatmaps, each with its
    numbers) and the PNGs it embeds; DATASETS limits the data sets (default: every one found). Raises
    FileNotFoundError / ValueError naming ROOT when it holds no run (of DATASETS)."""
    from refgen.artifacts import atomic_write_text

    root = Path(root)
    found = dataset_dirs(root)
    dsets = {d: f for d, f in found.items() if datasets is None or d in datasets}
    if not dsets:
        raise ValueError(f"{root} holds no run folder (<variant>_s<seed>/moe.json) "
                         + (f"of data sets {list(datasets)} (found: {sorted(found) or 'none'}) " if datasets else "")
                         + "directly or one level down: not a bench/moe_acceptance.py --out folder")
    lines = list(head_lines) + ["", "Figures and per-run numbers follow the acceptance table; every PNG has its "
                                    "numbers in the .json beside it.", ""] + list(table_lines)
    result = {"report": root / "report.md", "datasets": {}}
    for ds, folder in dsets.items():
        runs = load_runs(folder)
        sc = cost_scatter(ds, folder, runs)
        hm = graph_heatmaps(ds, folder, runs)
        result["datasets"][ds] = {"scatter": sc, "heatmaps": hm}
        lines += ["", f"# {ds}: figures", "", "## Cost vs accuracy",
                  f"![cost vs accuracy, {ds}]({_rel(sc['png'], root)})", "",
                  "Marker = variant, colour = seed. Active FLOPs are the FLOP proxy of the sparse-dispatch path "
                  "(the experts a sample's gate selects); stored bytes are the fp32 weights.", "",
                  "| run | acc % | active MFLOP/img | stored bytes |", "| --- | --- | --- | --- |"]
        lines += [f"| {p['name']} | {100 * p['acc']:.2f} | {p['flops'] / 1e6:.2f} | {p['bytes']:,} |"
                  for p in sc["points"]]
        lines.append("")
        if sc["rl"] is None:
            lines.append(f"No `{_rel(sc['rl_file'], root)}`: the RL part (lambda sweep, Pareto front, random gate) "
                         "is left out of the plot.")
        else:
            lams = sc["rl"]["lambdas"]
            lines.append(f"RL gate (right panel, from `{_rel(sc['rl_file'], root)}`): {len(lams)} lambdas, "
                         f"{sum(bool(r.get('on_pareto_front')) for r in lams)} on the Pareto front; the numbers "
                         "are the A4 table above.")
        lines += ["", "## Expert graph (raw edges A_ij, row = receiving expert)"]
        if not hm:
            lines.append("No graph-MoE run here (no adjacency in any moe.json or model.safetensors).")
            continue
        lines += ["Grey diagonal: the fixed self-loop (1). '.' = below 0.01 x the row's largest edge, which the "
                  "sparsity counts as zero. Colour scale shared by the panels of one figure.", "",
                  f"![final adjacency of every graph run, {ds}]({_rel(folder / 'graphs' / f'{ds}_final.png', root)})",
                  "", "| run | experts shown | epochs logged | sparsity | ||A-I||_F |",
                  "| --- | --- | --- | --- | --- |"]
        for h in hm:
            shown = "all " + str(h["num_experts"]) if len(h["experts"]) == h["num_experts"] else \
                f"{len(h['experts'])} of {h['num_experts']} (largest routing share)"
            sp = "-" if h["sparsity"] is None else f"{h['sparsity']:.2f}"
            di = "-" if h["dist_from_identity"] is None else f"{h['dist_from_identity']:.3f}"
            lines.append(f"| {h['name']} | {shown} | {h['epochs_logged']} | {sp} | {di} |")
        for h in hm:
            what = (f"after epoch 1 and every {SNAPSHOT_EVERY}th, then final" if h["snapshots"]
                    else "final only (no per-epoch adjacency in metrics.jsonl)")
            lines += ["", f"### {h['name']}: {what}", f"![edges {h['name']}]({_rel(h['png'], root)})"]
    atomic_write_text(root / "report.md", "\n".join(lines) + "\n")
    return result
