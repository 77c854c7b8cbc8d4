"""Per-seed B2 table + 3-seed mean from refgen moe compress outputs (compress.json), and the severity-3 B4 table
from a refgen moe eval over the compressed artifacts (eval_raw.jsonl). Usage:
python3 summarize_compress.py COMP_ROOT [EVAL_RAW_JSONL]  (COMP_ROOT/compress_s{17,42,1337}/compress.json)"""
import json
import sys
from pathlib import Path

GATED = {"ptq": ">= -2 pp", "qat": ">= -1 pp", "prune": ">= -2 pp, saved >= 20 %", "lowrank": ">= -1 pp, saved >= 15 %",
         "int4": ">= -2 pp"}
QUANT = {"ptq", "qat", "int4"}  # rows whose gate column is fp32 vs int8/int4 (B2 >= 98 %); prune: vs the original gate, not gated
root = Path(sys.argv[1])
out, summary = [], {}
for s in (17, 42, 1337):
    p = root / f"compress_s{s}" / "compress.json"
    if not p.is_file():
        continue
    r = json.loads(p.read_text())
    ref = r["reference"]
    out += [f"### seed {s} (float {100 * ref['acc']:.2f} %, fp32 {ref['bytes_fp32']:,} B, int8 {ref['bytes_int8']:,} B; "
            f"commit {r['git_commit']}; {r.get('seconds', 0):.0f} s)", "",
            "| variant | bytes | saved | vs | test acc | Δ pp | gate top-2 agree | limit | met |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    summary[s] = {}
    for v in r["variants"]:
        m = v["method"]
        g = v.get("gate_topk_agreement")
        gate_ok = g is None or g >= 0.98 or m not in QUANT
        met = "-" if v["pass"] is None else ("yes" if v["pass"] and gate_ok else "NO")
        out.append(f"| {m} | {v['bytes']:,} | {100 * v['saved']:.1f} % | {v['ref_bytes']:,} | {100 * v['acc']:.2f} % | "
                   f"{v['drop_pp']:+.2f} | {'' if g is None else f'{100 * g:.2f} %'} | {GATED.get(m, 'reported')} | {met} |")
        summary[s][m] = {k: v.get(k) for k in ("bytes", "saved", "acc", "drop_pp", "gate_topk_agreement", "pass")}
    summary[s]["_reference"] = ref
    out.append("")
seeds = sorted(summary)
if len(seeds) > 1:
    out += [f"### mean over seeds {seeds}", "", "| variant | saved (min) | Δ pp mean (worst) | gate agree min | met on all |",
            "| --- | --- | --- | --- | --- |"]
    for m in summary[seeds[0]]:
        if m.startswith("_") or not all(m in summary[s] for s in seeds):
            continue
        rows = [summary[s][m] for s in seeds]
        d = [x["drop_pp"] for x in rows]
        gs = [x["gate_topk_agreement"] for x in rows if x["gate_topk_agreement"] is not None]
        ps = [x["pass"] for x in rows]
        met = "-" if ps[0] is None else ("yes" if all(ps) and (not gs or min(gs) >= 0.98 or m not in QUANT) else "NO")
        out.append(f"| {m} | {100 * min(x['saved'] for x in rows):.1f} % | {sum(d) / len(d):+.2f} ({min(d):+.2f}) | "
                   f"{'' if not gs else f'{100 * min(gs):.2f} %'} | {met} |")
    out.append("")
if len(sys.argv) > 2:
    rows = [json.loads(l) for l in Path(sys.argv[2]).read_text().splitlines() if l.strip()]
    rows = [r for r in rows if r.get("status") == "ok" and r.get("split") != "latency"]
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    out += ["### B4 on the compressed artifacts: accuracy at severity 3 (refgen moe eval, corruption draws = seed)", "",
            "| setup | seed | clean | mean @3 | mean drop @3 (pp) | worst type (pp) | B4 (≤ 20 pp) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    b4 = {}
    for su in setups:
        for s in seeds:
            rr = [r for r in rows if r["setup"] == su and r["seed"] == s]
            clean = [r for r in rr if r["split"] == "clean"]
            cor = [r for r in rr if r["split"].endswith("@3")]
            if not clean or not cor:
                continue
            c = clean[0]["acc"]
            drops = {r["split"]: 100 * (r["acc"] - c) for r in cor}
            md = sum(drops.values()) / len(drops)
            w = min(drops, key=drops.get)
            b4[(su, s)] = md
            out.append(f"| {su} | {s} | {100 * c:.2f} % | {100 * sum(r['acc'] for r in cor) / len(cor):.2f} % | {md:+.2f} | "
                       f"{w} {drops[w]:+.2f} | {'yes' if md >= -20 else 'NO'} |")
    summary["b4_sev3_mean_drop_pp"] = {f"{k[0]}/s{k[1]}": v for k, v in b4.items()}
    out.append("")
print("\n".join(out))
(root / "compress_seeds_summary.json").write_text(json.dumps(summary, indent=1, default=str))
