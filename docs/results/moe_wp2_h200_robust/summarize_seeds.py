"""Per-seed and per-severity summary of a `refgen moe eval` eval_raw.jsonl (B4 / B5 view).
python summarize_seeds.py EVAL/eval_raw.jsonl > seeds_summary.md  (also writes seeds_summary.json beside this file)"""
import json, sys, pathlib
import numpy as np

B5_ECE, B5_CUT = 0.02, 0.20
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
recs = [r for r in recs if r.get("status") == "ok" and r["split"] != "latency"]
types = ["gaussian_noise", "impulse_noise", "defocus_blur", "motion_blur", "fog", "contrast", "jpeg_compression"]
setups = list(dict.fromkeys(r["setup"] for r in recs))
seeds = sorted({r["seed"] for r in recs})
out = {}
for s in setups:
    out[s] = {}
    for sd in seeds + ["mean"]:
        mine = [r for r in recs if r["setup"] == s and (sd == "mean" or r["seed"] == sd)]
        if not mine:
            continue
        by = {}
        for r in mine:
            by.setdefault(r["split"], []).append(r)
        m = lambda sp, k: float(np.mean([r[k] for r in by[sp]]))
        clean = m("clean", "acc")
        d = {"clean_acc": clean, "ece_clean": m("clean", "ece"), "ece_clean_ts": m("clean", "ece_ts"),
             "T": m("clean", "temperature")}
        for v in range(1, 6):
            sp = [f"{c}@{v}" for c in types if f"{c}@{v}" in by]
            if len(sp) < 7:
                continue
            d[f"mean_drop_pp_sev{v}"] = float(np.mean([100 * (m(x, "acc") - clean) for x in sp]))
            d[f"ece_sev{v}"] = float(np.mean([m(x, "ece") for x in sp]))
            d[f"ece_ts_sev{v}"] = float(np.mean([m(x, "ece_ts") for x in sp]))
        d["drop_pp_sev3"] = {c: 100 * (m(f"{c}@3", "acc") - clean) for c in types if f"{c}@3" in by}
        # B5 per split (split = corruption@severity, mean over the seeds in this view)
        app = [(sp, m(sp, "ece"), m(sp, "ece_ts")) for sp in by if sp != "clean" and m(sp, "ece") > B5_ECE]
        d["b5_splits_ece_gt_2pct"] = {sp: {"ece": e, "ece_ts": t, "cut_pct": 100 * (e - t) / e} for sp, e, t in app}
        d["b5_splits_failing"] = [sp for sp, e, t in app if t > (1 - B5_CUT) * e]
        out[s][str(sd)] = d
pathlib.Path(__file__).with_name("seeds_summary.json").write_text(json.dumps(out, indent=1))
print("| setup | seed | clean acc | mean drop sev1..5 (pp) | ECE clean → T | ECE@3 → T | splits ECE>2 % (failing cut) |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for s in out:
    for sd, d in out[s].items():
        drops = " / ".join(f"{d[f'mean_drop_pp_sev{v}']:+.2f}" for v in range(1, 6) if f"mean_drop_pp_sev{v}" in d)
        print(f"| {s} | {sd} | {100*d['clean_acc']:.2f} % | {drops} | {d['ece_clean']:.4f} → {d['ece_clean_ts']:.4f} "
              f"| {d.get('ece_sev3', float('nan')):.4f} → {d.get('ece_ts_sev3', float('nan')):.4f} "
              f"| {len(d['b5_splits_ece_gt_2pct'])} ({len(d['b5_splits_failing'])}) |")
print()
print("| setup | seed | " + " | ".join(types) + " |")
print("| --- | --- | " + " | ".join("---" for _ in types) + " |")
for s in out:
    for sd, d in out[s].items():
        print(f"| {s} | {sd} | " + " | ".join(f"{d['drop_pp_sev3'].get(c, float('nan')):+.1f}" for c in types) + " |")
