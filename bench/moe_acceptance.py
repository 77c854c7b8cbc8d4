"""The acceptance table of refgen.moe WP1 (spec section 8, A1-A5) in one call.

    python bench/moe_acceptance.py --out runs/moe_acceptance --cache DATA_CACHE --device cuda

Every training run goes to OUT/<dataset>/<variant>_s<seed>/ and is skipped when its moe.json exists, so the call
can be repeated (or split with --only) until everything is there; the table is printed from what exists, with
a missing cell shown as '-'. Variants (same recipe = the dataset's configs/moe_<dataset>.yaml):
    graph        the graph-MoE of the config (k = 2)                                   A1, A2, A3
    flat         the same without the graph (flat top-2 gate)                           A3 (delta acc)
    graph_k1/k3  the graph-MoE with top-1 / top-3                                       A3 ablation (first seed)
    dense_flops  a dense CNN whose FLOPs/image equal the graph-MoE's active FLOPs        A2
    dense_bytes  a dense CNN whose stored bytes equal the graph-MoE's                    A2
RL (A4) runs `refgen moe rl` on the first seed's graph-MoE of MNIST and Animal-MNIST (configs/moe_rl.yaml);
the monitor (A5) runs `refgen moe bench` sections sleep, flops, overhead, energy on the MNIST graph-MoE.

What is big in OUT: the weights (model.safetensors, 0.9 MB per run; RL: a policy and a fine-tuned model per
lambda), 34 MB for the 40 runs of 2026-11-30. The table reads only moe.json, rl/rl.json and monitor/bench.json.
--pack FILE.tar.gz writes every file of OUT except *.safetensors (moe.json, metrics.jsonl, rl.json, bench.json,
acceptance.md/json) into one archive, and drops the JSONL logs too if the archive would pass --pack-max-mb;
unpacked anywhere, `--out THAT --table` prints the same table:
    python bench/moe_acceptance.py --out runs/moe_acceptance --table --pack moe_acceptance_small.tar.gz

--plots writes OUT/report.md after the table: the table, then per data set cost vs accuracy per run (with the RL
lambda sweep, its Pareto front and the random gate when rl/rl.json exists) and the expert-graph edge heatmaps of
every graph-MoE run, as PNGs beside their numbers (refgen/moe/report.py). OUT may also be one data set's run
folders without the <dataset>/ level (docs/results/moe_acceptance_h200/mnist_graphfix):
    python bench/moe_acceptance.py --out docs/results/moe_acceptance_h200/mnist_graphfix --datasets mnist \
        --table --plots

An RL sweep split over processes (GPUs): each call runs some lambdas into OUT/<dataset>/rl_parts/, then one call
merges them into OUT/<dataset>/rl/rl.json (Pareto flags over all lambdas; refgen.moe.routing.merge_sweeps):
    python bench/moe_acceptance.py --out OUT --cache C --datasets mnist --seeds 17 --only rl --rl-lambdas 0,0.002
    python bench/moe_acceptance.py --out OUT --cache C --datasets mnist --seeds 17 --only rl --rl-lambdas 0.005,0.1
    python bench/moe_acceptance.py --out OUT --datasets mnist --seeds 17 --only rl-merge

A CPU smoke run of the whole script (minutes):
    python bench/moe_acceptance.py --out /tmp/acc --device cpu --datasets digits --seeds 0 --epochs 2 \
        --rl-steps 20 --config-dir configs --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

SEEDS = (17, 42, 1337)
DATASETS = ("mnist", "animal_mnist", "toyworld27")
VARIANTS = ("graph", "flat", "graph_k1", "graph_k3", "dense_flops", "dense_bytes")
TARGET = {"mnist": 0.993, "animal_mnist": 0.94, "toyworld27": 0.90, "digits": 0.0}


def _cfg(args, dataset, seed, **model_over):
    from refgen.moe.model import MoEModelConfig
    from refgen.moe.train import MoETrainConfig

    name = "digits" if dataset == "digits" else dataset
    over = {"device": args.device, "seed": seed, "cache": args.cache, "epochs": args.epochs, "threads": args.threads}
    cfg = MoETrainConfig.from_yaml(Path(args.config_dir) / f"moe_{name}.yaml", **over)
    if model_over:
        cfg.model = MoEModelConfig(**{**dataclasses.asdict(cfg.model), **model_over})
    return cfg


def _load(folder: Path):
    f = folder / "moe.json"
    return json.loads(f.read_text()) if f.is_file() else None


def train_runs(args, dataset, ds, log):
    from refgen.moe.cost import cost_table, match_dense_width
    from refgen.moe.model import MoEClassifier
    from refgen.moe.train import train

    root = Path(args.out) / dataset
    for seed in args.seeds:
        variants = {"graph": {}, "flat": {"kind": "flat"}}
        if seed == args.lead:
            variants.update(graph_k1={"top_k": 1}, graph_k3={"top_k": 3})
        for name, over in variants.items():
            out = root / f"{name}_s{seed}"
            if name in args.variants and _load(out) is None:
                log(f"train {dataset} {name} seed {seed}")
                train(_cfg(args, dataset, seed, **over), out, progress=not args.quiet, data=ds)
        g = _cfg(args, dataset, seed)
        moe = MoEClassifier(g.model, ds.shape[0], ds.num_classes)
        t = cost_table(moe, ds.shape)
        for name, target, metric in (("dense_flops", t.static_topk_flops(g.model.top_k), "flops"),
                                     ("dense_bytes", t.total_bytes, "bytes")):
            out = root / f"{name}_s{seed}"
            if name in args.variants and _load(out) is None:
                dense, _ = match_dense_width(g.model, ds.shape[0], ds.num_classes, ds.shape, target, metric)
                log(f"train {dataset} {name} (width {dense.cfg.expert_channels}) seed {seed}")
                train(g, out, progress=not args.quiet, data=ds, model=dense)


def rl_runs(args, dataset, ds, log):
    from refgen.moe.routing import RLConfig, rl_sweep

    src = Path(args.out) / dataset / f"graph_s{args.lead}"
    out = Path(args.out) / dataset / "rl"
    over = {"device": args.device, "steps": args.rl_steps, "threads": args.threads}
    if args.rl_lambdas:  # one part of a sweep split over processes: OUT/<dataset>/rl_parts/<its lambdas>/
        over["lambdas"] = args.rl_lambdas
        out = Path(args.out) / dataset / "rl_parts" / ("lam_" + "_".join(f"{lam:g}" for lam in args.rl_lambdas))
    if _load(src) is None or (out / "rl.json").is_file():
        return
    cfg = RLConfig.from_yaml(Path(args.config_dir) / "moe_rl.yaml", **over)
    log(f"rl sweep {dataset} lambdas {cfg.lambdas}")
    rl_sweep(src, cfg, out, progress=not args.quiet, data=ds)


def rl_merge(args, dataset, log):
    """OUT/<dataset>/rl/rl.json from the parts in OUT/<dataset>/rl_parts/*/rl.json (--rl-lambdas runs)."""
    from refgen.moe.routing import merge_sweeps

    files = sorted((Path(args.out) / dataset / "rl_parts").glob("*/rl.json"))
    if not files:
        log(f"rl-merge {dataset}: no parts in {Path(args.out) / dataset / 'rl_parts'}")
        return
    res = merge_sweeps([json.loads(f.read_text()) for f in files], Path(args.out) / dataset / "rl")
    log(f"rl-merge {dataset}: {len(files)} parts, lambdas {res['config']['lambdas']}, "
        f"{res['pareto_points']} Pareto points")


def monitor_runs(args, dataset, log):
    from refgen.moe.bench import run_bench
    from refgen.moe.train import load_model

    src = Path(args.out) / dataset / f"graph_s{args.lead}"
    out = Path(args.out) / "monitor"
    if _load(src) is None or (out / "bench.json").is_file():
        return
    model, info = load_model(src, args.device)
    sections = ["sleep", "flops", "overhead"] + (["energy"] if args.device != "cpu" else [])
    log(f"monitor bench {sections}")
    run_bench(model, tuple(info["input_shape"]), sections, out, steps=200 if not args.smoke else 4,
              blocks=5 if not args.smoke else 2, sample_every=50 if not args.smoke else 2)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def _pct(x):
    return "-" if x is None else f"{100 * x:.2f}"


def table(args) -> tuple[list[str], dict]:
    from refgen.moe.report import dataset_dirs

    root = Path(args.out)
    # OUT/<dataset>/ as this script writes it, or one data set's runs directly in OUT (docs/results keeps them so)
    dirs = dataset_dirs(root) if root.is_dir() else {}

    def droot(d):
        return dirs.get(d, root / d)

    lines, verdict = [], {}
    lines.append("## A1 accuracy (graph-MoE, mean over seeds " + ", ".join(map(str, args.seeds)) + ")")
    lines.append("| data | acc % per seed | mean % | target % | params | pass |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for d in args.datasets:
        runs = [_load(droot(d) / f"graph_s{s}") for s in args.seeds]
        accs = [r["metrics"]["test"]["acc"] if r else None for r in runs]
        m = _mean(accs) if all(a is not None for a in accs) else None
        params = next((r["params"] for r in runs if r), None)
        ok = m is not None and m >= TARGET[d] and params <= 250_000
        verdict[f"A1 {d}"] = ok if m is not None else None
        lines.append(f"| {d} | {' / '.join(_pct(a) for a in accs)} | {_pct(m)} | {100 * TARGET[d]:.1f} | "
                     f"{params or '-'} | {ok if m is not None else '-'} |")
    lines += ["", "## A2 graph-MoE vs dense CNNs of equal active FLOPs / equal stored bytes (same recipe)",
              "| data | model | acc % (mean) | active MFLOP/img | stored bytes | min routing share | "
              "gate entropy per input / of the mean (nats, mean) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for d in args.datasets:
        for v in ("graph", "flat", "dense_flops", "dense_bytes"):
            runs = [_load(droot(d) / f"{v}_s{s}") for s in args.seeds]
            if not any(runs):
                lines.append(f"| {d} | {v} | - | - | - | - | - |")
                continue
            r0 = next(r for r in runs if r)
            t = r0["metrics"]["test"]
            shares = [r["metrics"]["test"]["min_routing_share"] for r in runs if r]
            # per input: how decided the gate is (ln E = no preference at all); of the mean: how balanced (ln E =
            # perfectly balanced). Dense baselines have one expert: 0 / 0
            ent = [(r["metrics"]["test"]["gate_entropy_per_sample"], r["metrics"]["test"]["gate_entropy_batch_mean"])
                   for r in runs if r]
            lines.append(f"| {d} | {v} | {_pct(_mean([r['metrics']['test']['acc'] for r in runs if r]))} | "
                         f"{t.get('active_flops_per_image', 0) / 1e6:.2f} | {r0['cost']['total_bytes']:,} | "
                         f"{min(shares):.3f} | {abs(_mean([e[0] for e in ent])):.3f} / "
                         f"{abs(_mean([e[1] for e in ent])):.3f} |")
            if v == "graph":
                verdict[f"A2 {d} no collapse (every expert >= 5 %)"] = min(shares) >= 0.05
    lines += ["", "## A3 graph: sparsity, distance from identity, delta acc vs no graph, k ablation",
              "| data | sparsity | ||A-I||_F | graph acc % | flat acc % | delta pp | k=1 / 2 / 3 acc % | pass |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d in args.datasets:
        g = [_load(droot(d) / f"graph_s{s}") for s in args.seeds]
        f = [_load(droot(d) / f"flat_s{s}") for s in args.seeds]
        if not all(g) or not all(f):
            lines.append(f"| {d} | - | - | - | - | - | - | - |")
            continue
        sp = _mean([r["graph"]["sparsity"] for r in g])
        dist = _mean([r["graph"]["dist_from_identity"] for r in g])
        ga, fa = _mean([r["metrics"]["test"]["acc"] for r in g]), _mean([r["metrics"]["test"]["acc"] for r in f])
        ks = [_load(droot(d) / f"graph_k{k}_s{args.lead}") if k != 2 else g[0] for k in (1, 2, 3)]
        ok = sp >= 0.30 and dist >= 0.1 and 100 * (ga - fa) >= -0.3
        verdict[f"A3 {d}"] = ok
        lines.append(f"| {d} | {sp:.2f} | {dist:.3f} | {_pct(ga)} | {_pct(fa)} | {100 * (ga - fa):+.2f} | "
                     f"{' / '.join(_pct(k['metrics']['test']['acc']) if k else '-' for k in ks)} | {ok} |")
    lines += ["", "## A4 RL gate (greedy) vs random gate of equal expected cost",
              "| data | lambda | acc % | random % | margin pp | FLOPs / static top-2 | delta pp vs top-2 | Pareto |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d in args.datasets:
        f = droot(d) / "rl" / "rl.json"
        if not f.is_file():
            lines.append(f"| {d} | - | - | - | - | - | - | - |")
            continue
        rl = json.loads(f.read_text())
        for r in rl["lambdas"]:
            lines.append(f"| {d} | {r['lam']:g} | {_pct(r['acc'])} | {_pct(r['random_gate_acc'])} | "
                         f"{r['margin_over_random_pp']:+.2f} | {r['flops_vs_static_ref']:.3f} | "
                         f"{r['delta_acc_pp_vs_static_ref']:+.2f} | {'*' if r['on_pareto_front'] else ''} |")
        rows = rl["lambdas"]
        verdict[f"A4 {d} >= 5 Pareto points"] = rl["pareto_points"] >= 5
        verdict[f"A4 {d} a lambda with FLOPs <= 0.7 x top-2 at drop <= 0.5 pp"] = any(
            r["flops_vs_static_ref"] <= 0.7 and r["delta_acc_pp_vs_static_ref"] >= -0.5 for r in rows)
        verdict[f"A4 {d} >= 1 pp over random at every lambda"] = all(r["margin_over_random_pp"] >= 1 for r in rows)
    b = root / "monitor" / "bench.json"
    lines += ["", "## A5 monitor"]
    if b.is_file():
        res = json.loads(b.read_text())["results"]
        o, s = res["overhead"], res["sleep"]
        lines.append(f"- overhead (sample_every {o['sample_every']}): {o['overhead_pct']:.2f} % "
                     f"({o['median_off']:.1f} vs {o['median_on']:.1f} steps/s, {o['device']}); the probe's own cost "
                     f"{o['probe_cost_us_per_step']:.1f} us/step = {o['overhead_pct_direct']:.4f} % of a step")
        lines.append(f"- sleep(0.05): median {s['median_ms']:.2f} ms")
        lines.append(f"- FLOPs linear in batch / deterministic: {res['flops']['linear_in_batch']}")
        verdict["A5 overhead < 5 %"] = o["overhead_pct"] < 5
        verdict["A5 sleep 50 +- 10 ms"] = s["pass"]
        if "energy" in res:
            for p, w in res["energy"]["windows"].items():
                lines.append(f"- energy, {p} path: {w['j_per_image_total'] * 1e3:.4f} mJ/image total, "
                             f"{w['j_per_image_marginal'] * 1e3:.4f} mJ/image marginal ({w['seconds']:.1f} s window, "
                             f"idle {w['idle_w']:.1f} W)")
            lines.append(f"- c_flop (proxy coefficient): {res['energy']['coefficients']['c_flop_j']:.3e} J/FLOP")
    else:
        lines.append("- not run yet")
    lines += ["", "## Verdict"] + [f"- {k}: {'-' if v is None else ('PASS' if v else 'FAIL')}"
                                   for k, v in verdict.items()]
    return lines, verdict


WEIGHTS = (".safetensors", ".pt", ".pt2", ".onnx", ".data")


def pack(out: Path, dest: Path, max_mb: float = 15.0) -> dict:
    """tar.gz of every file under OUT except weights (WEIGHTS suffixes), paths relative to OUT's parent; without
    the JSONL logs when the archive with them would exceed MAX_MB. Returns what was packed."""
    import io
    import tarfile

    from refgen.artifacts import atomic_write_bytes

    files = sorted(f for f in out.rglob("*") if f.is_file() and not f.name.endswith(WEIGHTS)
                   and f.resolve() != dest.resolve())
    for keep_logs in (True, False):
        chosen = [f for f in files if keep_logs or f.suffix != ".jsonl"]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for f in chosen:
                tar.add(f, arcname=str(f.relative_to(out.parent)))
        if buf.tell() <= max_mb * 1e6 or not keep_logs:
            break
    atomic_write_bytes(dest, buf.getvalue())
    skipped = [f for f in out.rglob("*") if f.is_file() and f not in chosen]
    return {"archive": str(dest), "bytes": len(buf.getvalue()), "files": len(chosen), "jsonl_kept": keep_logs,
            "skipped_bytes": sum(f.stat().st_size for f in skipped)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--cache", default=None, help="the refgen moe data cache (fetch-data output)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--epochs", type=int, default=None, help="override the configs' epochs (smoke runs)")
    p.add_argument("--rl-steps", type=int, default=None)
    p.add_argument("--rl-lambdas", default=None, metavar="L1,L2,...",
                   help="RL on these lambdas only, into OUT/<dataset>/rl_parts/lam_<L1>_<L2>.../ (one part of a "
                        "sweep split over processes); --only rl-merge then writes OUT/<dataset>/rl/rl.json")
    p.add_argument("--config-dir", default="configs")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="which training runs (one process per variant spreads a data set over a GPU)")
    p.add_argument("--only", default="train,rl,monitor",
                   help="which parts to run before the table (train, rl, monitor; rl-merge: merge the --rl-lambdas "
                        "parts, after every part has finished)")
    p.add_argument("--table", action="store_true", help="only print the table of what exists")
    p.add_argument("--smoke", action="store_true", help="tiny monitor bench (CPU smoke runs)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--pack", default=None, metavar="FILE.tar.gz",
                   help="after the table: archive OUT without weights (what --table needs, plus the logs)")
    p.add_argument("--plots", action="store_true",
                   help="after the table: OUT/report.md with the table, cost-vs-accuracy and edge-heatmap PNGs")
    p.add_argument("--pack-max-mb", type=float, default=15.0, help="drop the JSONL logs above this archive size")
    args = p.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.variants = [v for v in args.variants.split(",") if v]
    args.rl_lambdas = [float(x) for x in args.rl_lambdas.split(",") if x] if args.rl_lambdas else None
    if set(args.variants) - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(set(args.variants) - set(VARIANTS))}; known {list(VARIANTS)}")
    # the top-k ablation, RL and monitor use one seed's graph-MoE: the first acceptance seed whenever it is among
    # --seeds, so the runs can be split over calls or processes by seed
    args.lead = SEEDS[0] if SEEDS[0] in args.seeds else args.seeds[0]
    only = set(args.only.split(","))
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    if not args.table:
        from refgen.moe.data import load_dataset

        for d in args.datasets:
            if only & {"train", "rl"}:
                ds = load_dataset(d, args.cache, progress=not args.quiet)
            if "train" in only:
                train_runs(args, d, ds, log)
            if "rl" in only and d in ("mnist", "animal_mnist", "digits"):
                rl_runs(args, d, ds, log)
            if "rl-merge" in only:
                rl_merge(args, d, log)
        if "monitor" in only:
            monitor_runs(args, args.datasets[0], log)
    lines, verdict = table(args)
    import datetime
    import subprocess

    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    prev = Path(args.out) / "acceptance.json"
    if args.table and prev.is_file():
        # nothing ran in this call: the numbers are from the machine that trained, not the one printing them
        dev = json.loads(prev.read_text()).get("device", dev)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    head = [f"# refgen.moe acceptance (WP1) - {dev}, {datetime.date.today()}, commit {commit}",
            f"command: python bench/moe_acceptance.py {' '.join(argv if argv is not None else sys.argv[1:])}", ""]
    text = "\n".join(head + lines) + "\n"
    print(text)
    from refgen.artifacts import atomic_write_json, atomic_write_text

    atomic_write_text(Path(args.out) / "acceptance.md", text)
    atomic_write_json(Path(args.out) / "acceptance.json", {"verdict": verdict, "device": dev})
    if args.plots:
        from refgen.moe.report import write_report

        rep = write_report(args.out, lines, head[:2], args.datasets)
        print(f"report: {rep['report']}", file=sys.stderr)
    if args.pack:
        info = pack(Path(args.out), Path(args.pack), args.pack_max_mb)
        print(f"packed {info['files']} files, {info['bytes'] / 1e6:.2f} MB -> {info['archive']} (weights left out: "
              f"{info['skipped_bytes'] / 1e6:.1f} MB; JSONL logs {'kept' if info['jsonl_kept'] else 'dropped'})",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
