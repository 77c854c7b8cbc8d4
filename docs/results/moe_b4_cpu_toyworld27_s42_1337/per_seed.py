import json, sys, collections
import numpy as np
raw = [json.loads(l) for l in open(sys.argv[1])]
T = ["gaussian_noise","impulse_noise","defocus_blur","motion_blur","fog","contrast","jpeg_compression"]
acc = {(r["setup"], r["seed"], r["split"]): r for r in raw if r.get("status") == "ok"}
setups = sorted({k[0] for k in acc}); seeds = sorted({k[1] for k in acc})
out = {}
for su in setups:
    for s in seeds:
        c = acc[(su, s, "clean")]
        d = {t: 100 * (acc[(su, s, f"{t}@3")]["acc"] - c["acc"]) for t in T}
        sev = {v: float(np.mean([100 * (acc[(su, s, f"{t}@{v}")]["acc"] - c["acc"]) for t in T])) for v in range(1, 6) if all((su, s, f"{t}@{v}") in acc for t in T)}
        e3 = float(np.mean([acc[(su, s, f"{t}@3")]["ece"] for t in T])); e3t = float(np.mean([acc[(su, s, f"{t}@3")]["ece_ts"] for t in T]))
        out[f"{su}_s{s}"] = dict(clean=100 * c["acc"], mean3=float(np.mean(list(d.values()))), drops=d, sev=sev, ece3=e3, ece3_ts=e3t, T=c["temperature"])
        o = out[f"{su}_s{s}"]
        print(f"{su} s{s}: clean {o['clean']:.2f}%  mean@3 {o['mean3']:+.2f}  " + " ".join(f"{t[:6]} {v:+.1f}" for t, v in d.items()) + f"  ECE3 {e3:.3f}->{e3t:.3f} T {c['temperature']:.3f}  sev " + " / ".join(f"{v:+.1f}" for v in sev.values()))
json.dump(out, open(sys.argv[2], "w"), indent=1) if len(sys.argv) > 2 else None
