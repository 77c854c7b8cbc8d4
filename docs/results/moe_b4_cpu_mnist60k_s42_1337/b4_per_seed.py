"""Per-seed B4 numbers from a `refgen moe eval` raw file: clean acc, severity-3 drop per type and mean of 7,
ECE at severity 3 (mean over the 7 types) before/after the clean-fitted T, mean drop per severity."""
import json, sys
import numpy as np
TYPES = ["gaussian_noise", "impulse_noise", "defocus_blur", "motion_blur", "fog", "contrast", "jpeg_compression"]
raw, setup = sys.argv[1], sys.argv[2]
recs = [json.loads(l) for l in open(raw) if l.strip()]
recs = [r for r in recs if r["setup"] == setup and r.get("status") == "ok"]
out = {}
for seed in sorted({r["seed"] for r in recs}):
    by = {r["split"]: r for r in recs if r["seed"] == seed}
    clean = by["clean"]["acc"]
    d = {"seed": seed, "clean_acc": clean, "temperature": by["clean"]["temperature"],
         "clean_ece": by["clean"]["ece"], "clean_ece_ts": by["clean"]["ece_ts"]}
    d["drop_pp_sev3"] = {t: 100 * (by[f"{t}@3"]["acc"] - clean) for t in TYPES if f"{t}@3" in by}
    if len(d["drop_pp_sev3"]) == 7:
        d["mean_drop_pp_sev3"] = float(np.mean(list(d["drop_pp_sev3"].values())))
        d["ece_sev3"] = float(np.mean([by[f"{t}@3"]["ece"] for t in TYPES]))
        d["ece_ts_sev3"] = float(np.mean([by[f"{t}@3"]["ece_ts"] for t in TYPES]))
        d["max_split_ece_sev3"] = float(max(by[f"{t}@3"]["ece"] for t in TYPES))
    d["mean_drop_pp_by_severity"] = {s: float(np.mean([100 * (by[f"{t}@{s}"]["acc"] - clean) for t in TYPES]))
                                     for s in range(1, 6) if all(f"{t}@{s}" in by for t in TYPES)}
    d["max_split_ece_all"] = float(max(r["ece"] for r in by.values()))
    d["b4_met"] = d.get("mean_drop_pp_sev3", -999) >= -20
    out[seed] = d
print(json.dumps(out, indent=1))
