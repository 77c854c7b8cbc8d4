"""Which attribute does the two-person roles head (src/refgen/assets/toyworld/head) get wrong for one
person, and as what? Its 96 validation people (400000-400095, the H200 run's; never test people), one person per
prompt, 5 scenes x 2 seeds, alpha 1, fp32 on the CPU; per attribute value: images right, and the values drawn
instead. python docs/results/head_misses_cpu/misses.py OUT   (from the repo root; ~10 min on 2 CPU threads)"""
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, "bench")
import toyworld_head_e2e as H  # noqa: E402
from refgen.toyworld import recognizer as R  # noqa: E402
from refgen.toyworld import world  # noqa: E402
from refgen.toyworld.benchmark import (SCENE_PROMPT, BenchmarkConfig, attributes_of, default_model,  # noqa: E402
                                       default_vl_model, render_config, render_rows)
from refgen.toyworld.identities import make_identities  # noqa: E402

torch.set_num_threads(2)
out = Path(sys.argv[1])
bcfg = BenchmarkConfig(device="cpu", dtype="fp32", n_train=0, n_test=2, n_pairs=0)
make_identities(out / "val", n=96, seed=H.VAL_SEED, progress=False)
pipe, head, fx, net, neg = H.scoring_setup(default_model(), default_vl_model(),
                                           Path("src/refgen/assets/toyworld/head"), "cpu", "fp32")
dirs = H._dirs(out / "val")
attrs = [attributes_of(d) for d in dirs]
key, res = H.residuals(head, fx, dirs)
prompts = [SCENE_PROMPT.format(where=world.SCENE_PHRASES[s][0]) for s in bcfg.scenes]
jobs = [{"prompt": si, key: [res[k]], "alpha": 1.0, "seed": seed}
        for k in range(len(res)) for si in range(len(bcfg.scenes)) for seed in bcfg.seeds]
preds = R.predict(net, render_rows(pipe, prompts, jobs, render_config(bcfg), neg), "cpu")
per = len(bcfg.scenes) * len(bcfg.seeds)
table = collections.defaultdict(lambda: {"n": 0, "right": 0, "drawn_instead": collections.Counter()})
people_right = []
for k, a in enumerate(attrs):
    ok = 0
    for p in preds[k * per:(k + 1) * per]:
        got = p["people"][0] if p["people"] else {}
        ok += all(got.get(n) == v for n, v in a.items())
        for n, v in a.items():
            row = table[f"{n}={v}"]
            row["n"] += 1
            row["right"] += got.get(n) == v
            if got.get(n) != v:
                row["drawn_instead"][str(got.get(n))] += 1
    people_right.append(ok)
rec = {"identity_acc": sum(people_right) / (per * len(attrs)), "n_images": per * len(attrs),
       "people_by_images_right": dict(sorted(collections.Counter(people_right).items())),
       "per_value": {k: {"n": v["n"], "acc": v["right"] / v["n"], "drawn_instead": dict(v["drawn_instead"])}
                     for k, v in sorted(table.items())}}
(out / "misses.json").write_text(json.dumps(rec, indent=1))
for k, v in rec["per_value"].items():
    print(f"{k:28s} {v['acc']:.3f} of {v['n']:4d}  instead {v['drawn_instead']}")
print("identity", rec["identity_acc"], rec["people_by_images_right"])
