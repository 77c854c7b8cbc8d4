"""B4 (spec section 8, WP2): corruption-augmented training vs plain training, on the same data and seeds, measured
with the evaluation suite (`refgen moe eval`), and how much of it transfers to corruption families left out of
training.

    python bench/moe_robust_aug.py --base configs/moe_digits.yaml --robust configs/moe_digits_robust.yaml \
        --out runs/moe_robust_digits [--seeds 17 42 1337] [--leave-one-out] [--dataset mnist5k --cache DIR]

Trains OUT/train/base_s<seed> (the base recipe) and OUT/train/robust_s<seed> (the robust recipe: the base plus
`corrupt_p` etc., refgen.moe.augment), and with --leave-one-out also OUT/train/no_<type>_s<seed> (the robust recipe
without one corruption type); a folder with a moe.json is not trained again. Then one `refgen moe eval` matrix over
the setups (per-seed models, the seed also fixes the corruption draws; clean test split and the 7 corruptions at
--severities), and a table of the severity-3 drop per type: base, robust (every type seen in training, new draws),
held out (for type T the model trained without T). Writes OUT/robust_aug.json and OUT/robust_aug.md.
Nothing is chosen on the test split: the recipes are fixed before the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def train_one(config: str, out: Path, seed: int, dataset: str | None, cache: str | None, **over) -> dict:
    from refgen.moe.train import MoETrainConfig, train

    if (out / "moe.json").is_file():
        return json.loads((out / "moe.json").read_text())
    kw = {"seed": seed, "device": "cpu", "threads": 1, **over}
    if dataset:
        kw["dataset"] = dataset
    if cache:
        kw["cache"] = cache
    cfg = MoETrainConfig.from_yaml(config, **kw)
    return train(cfg, out, progress=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="training YAML without augmentation")
    ap.add_argument("--robust", required=True, help="training YAML with corrupt_p > 0")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[17, 42, 1337])
    ap.add_argument("--dataset", default=None, help="override both configs' dataset (e.g. mnist5k)")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--leave-one-out", action="store_true", help="one model per type held out of training")
    ap.add_argument("--held-out", nargs="+", default=None, metavar="TYPE",
                    help="leave-one-out for these types only (implies --leave-one-out)")
    args = ap.parse_args(argv)

    from refgen.moe.corruptions import CORRUPTIONS
    from refgen.moe.evaluate import EvalConfig, Setup, run_matrix
    from refgen.moe.train import MoETrainConfig

    rcfg = MoETrainConfig.from_yaml(args.robust)
    if rcfg.corrupt_p <= 0:
        raise SystemExit(f"{args.robust} has corrupt_p = 0: not a robust recipe")
    out = Path(args.out)
    tr = out / "train"
    t0 = time.perf_counter()
    held = list(args.held_out or (rcfg.corrupt_types if args.leave_one_out else []))
    bad = [t for t in held if t not in rcfg.corrupt_types]
    if bad:
        raise SystemExit(f"--held-out {bad}: not among the robust recipe's corrupt_types {list(rcfg.corrupt_types)}")
    for s in args.seeds:
        train_one(args.base, tr / f"base_s{s}", s, args.dataset, args.cache)
        train_one(args.robust, tr / f"robust_s{s}", s, args.dataset, args.cache)
        for t in held:
            train_one(args.robust, tr / f"no_{t}_s{s}", s, args.dataset, args.cache,
                      corrupt_types=[u for u in rcfg.corrupt_types if u != t])
    t_train = time.perf_counter() - t0
    setups = [Setup("base", str(tr / "base_s{seed}")), Setup("robust", str(tr / "robust_s{seed}"))]
    setups += [Setup(f"no_{t}", str(tr / f"no_{t}_s{{seed}}"), method="robust_loo") for t in held]
    ecfg = EvalConfig(setups=setups, seeds=tuple(args.seeds), severities=tuple(args.severities), latency=False,
                      cost="bytes", cache=args.cache)
    res = run_matrix(ecfg, out / "eval", progress=False)
    summ = json.loads((out / "eval" / "eval.json").read_text())["summary"]["setups"]
    base, rob = summ["base"], summ["robust"]
    rows = []
    for c in CORRUPTIONS:
        r = {"type": c, "base": base["drop_pp_severity3"].get(c), "robust": rob["drop_pp_severity3"].get(c)}
        if f"no_{c}" in summ:
            r["held_out"] = summ[f"no_{c}"]["drop_pp_severity3"].get(c)
        rows.append(r)

    def mean(k):  # over the 7 types; held_out: over the types held out (all 7 with --leave-one-out)
        v = [r[k] for r in rows if r.get(k) is not None]
        return float(np.mean(v)) if v and (len(v) == len(rows) or k == "held_out") else None

    means = {k: mean(k) for k in ("base", "robust", "held_out")}
    clean = {n: {"acc": v["acc"], "acc_std": v["acc_std"]} for n, v in summ.items()}
    report = {"base_config": args.base, "robust_config": args.robust, "dataset": args.dataset, "seeds": args.seeds,
              "severities": args.severities, "train_seconds": t_train,
              "eval": {k: res[k] for k in ("jobs", "skipped_done", "to_run", "failed") if k in res}, "clean": clean,
              "drop_pp_severity3": rows, "mean_drop_pp_severity3": means,
              "ece_severity3": {n: [v["ece_severity3"], v["ece_ts_severity3"]] for n, v in summ.items()},
              "command": "python " + " ".join(sys.argv)}
    f = lambda v: "–" if v is None else f"{v:+.1f}"  # noqa: E731
    lines = ["| corruption @ severity 3 | base (pp) | robust, seen (pp) | held out of training (pp) |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['type']} | {f(r['base'])} | {f(r['robust'])} | {f(r.get('held_out'))} |" for r in rows]
    n_held = sum(r.get("held_out") is not None for r in rows)
    lines.append(f"| **mean of 7** | **{f(means['base'])}** | **{f(means['robust'])}** | "
                 f"**{f(means['held_out'])}**{'' if n_held in (0, len(rows)) else f' (mean of {n_held})'} |")
    lines.append("")
    lines.append("clean test accuracy (mean ± std over seeds): " + ", ".join(
        f"{n} {100 * v['acc']:.2f} ± {100 * v['acc_std']:.2f} %" for n, v in clean.items()))
    md = "\n".join(lines)
    (out / "robust_aug.json").write_text(json.dumps(report, indent=2))
    (out / "robust_aug.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
