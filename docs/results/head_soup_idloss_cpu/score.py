"""Score a head folder exactly as bench/toyworld_head_e2e.py --eval-head --n-val 0 --alphas 1 does for the
test sweep (one person, alpha 1) and two_slot (default pairs), but keep per-image recognizer predictions for a
paired comparison, and skip the head-independent caption ceiling and copy-paste. Uses the bench's own functions."""
import argparse, importlib.util, json, time
from pathlib import Path
import torch

spec = importlib.util.spec_from_file_location("bench", "bench/toyworld_head_e2e.py")
B = importlib.util.module_from_spec(spec); spec.loader.exec_module(B)

ap = argparse.ArgumentParser()
ap.add_argument("--head", required=True); ap.add_argument("--out", required=True)
ap.add_argument("--test-root", required=True); ap.add_argument("--n-test", type=int, default=48)
ap.add_argument("--n-pairs", type=int, default=24); ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--alpha", type=float, default=1.0); ap.add_argument("--no-pairs", action="store_true")
ap.add_argument("--seed", type=int, default=400000)
a = ap.parse_args()
torch.set_num_threads(a.threads)
from refgen.toyworld import recognizer as R
from refgen.toyworld import world
from refgen.toyworld.benchmark import (BenchmarkConfig, attributes_of, default_model, default_vl_model,
                                       render_config, render_rows, score, test_pairs, SCENE_PROMPT, PAIR_PROMPT)
from refgen.toyworld.identities import make_identities

t0 = time.time(); T = {}
SEED = a.seed
model, vl = default_model(), default_vl_model()
bcfg = BenchmarkConfig(device="cpu", dtype="fp32", n_train=1200, n_test=a.n_test, n_pairs=a.n_pairs, head_alphas=[a.alpha])
root = Path(a.test_root)
if not root.exists():
    make_identities(root, n=a.n_test, seed=SEED, progress=False)
head_dir = Path(a.head)
rec = json.loads((head_dir / "head.json").read_text())
scored = {f"seed_{i}" for i in range(SEED, SEED + a.n_test)}
assert not (scored & set(rec.get("train_ids", []) + rec.get("val_ids", []))), "head trained on test people"
pipe, head, fx, net, neg = B.scoring_setup(model, vl, head_dir, "cpu", "fp32")
dirs = B._dirs(root); attrs = [attributes_of(d) for d in dirs]
pairs = [] if a.no_pairs else test_pairs(len(dirs), a.n_pairs)
key, res = B.residuals(head, fx, dirs)
T["setup_s"] = time.time() - t0
rc = render_config(bcfg); out = {"head": str(head_dir), "n_test": len(dirs), "pairs": pairs, "alpha": a.alpha,
                                 "scenes": bcfg.scenes, "seeds": bcfg.seeds, "render_steps": bcfg.render_steps}
# one person (= B.sweep at one alpha)
t = time.time()
prompts = [SCENE_PROMPT.format(where=world.SCENE_PHRASES[s][0]) for s in bcfg.scenes]
jobs, rows = [], []
for k in range(len(res)):
    for si, s in enumerate(bcfg.scenes):
        for seed in bcfg.seeds:
            jobs.append({"prompt": si, key: [res[k]], "alpha": a.alpha, "seed": seed})
            rows.append({"people": [attrs[k]], "scene": s, "who": [k], "seed": seed})
preds = R.predict(net, render_rows(pipe, prompts, jobs, rc, neg), "cpu")
out["single"] = score(preds, rows); out["single_rows"] = [{"row": r, "pred": p} for r, p in zip(rows, preds)]
T["single_s"] = time.time() - t
if pairs:
    t = time.time()
    prompts = [PAIR_PROMPT.format(where=world.SCENE_PHRASES[s][0]) for s in bcfg.scenes]
    jobs, rows = [], []
    for i, j in pairs:
        for si, s in enumerate(bcfg.scenes):
            for seed in bcfg.seeds:
                jobs.append({"prompt": si, key: [res[i], res[j]], "alpha": a.alpha, "seed": seed})
                rows.append({"people": [attrs[i], attrs[j]], "scene": s, "who": [i, j], "seed": seed})
    preds = R.predict(net, render_rows(pipe, prompts, jobs, rc, neg), "cpu")
    out["two_slot"] = score(preds, rows); out["two_rows"] = [{"row": r, "pred": p} for r, p in zip(rows, preds)]
    T["pairs_s"] = time.time() - t
T["total_s"] = time.time() - t0; out["timings"] = T
Path(a.out).parent.mkdir(parents=True, exist_ok=True)
Path(a.out).write_text(json.dumps(out, default=str))
s = out["single"]; print(f"one person: id {B._pct(s, 'identity_acc')} attr {s['attribute_acc']:.1%} scene {s['scene_acc']:.1%} n={s['n_people']}")
if pairs:
    m = out["two_slot"]
    print(f"two: both {B._pct(m, 'all_people_acc')} count {m['people_count_acc']:.1%} each {m['identity_acc']:.1%} "
          f"attr {m['attribute_acc']:.1%} leak {m.get('leak', float('nan')):.1%} (chance {m.get('leak_chance', float('nan')):.1%}, n={m.get('leak_n')}) n={m['n_images']}")
print("timings", {k: round(v) for k, v in T.items()})
