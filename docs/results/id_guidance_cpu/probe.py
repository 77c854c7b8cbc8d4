"""Identity guidance (SamplingConfig.id_guidance, refgen.flow.identity_cfg) on the shipped toy head: one person and
two people (with the head's slot roles), on VALIDATION people only (400000-400047, the head's alpha-choosing set;
never test people), 5 scenes x 2 seeds, alpha 1, fp32 on the CPU. Every row renders the same people, prompts and
noise; only the guidance changes. python docs/results/id_guidance_cpu/probe.py OUT G1,G2,..  (from the repo root)"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, "bench")
import toyworld_head_e2e as H  # noqa: E402
from refgen.toyworld.benchmark import BenchmarkConfig, attributes_of, default_model, default_vl_model  # noqa: E402
from refgen.toyworld.benchmark import test_pairs  # noqa: E402
from refgen.toyworld.identities import make_identities  # noqa: E402

torch.set_num_threads(2)
out, gs = Path(sys.argv[1]), [float(g) for g in sys.argv[2].split(",")]
N, NP = 48, 24
make_identities(out / "val", n=N, seed=H.VAL_SEED, progress=False)
pipe, head, fx, net, neg = H.scoring_setup(default_model(), default_vl_model(),
                                           Path("src/refgen/assets/toyworld/head"), "cpu", "fp32")
dirs = H._dirs(out / "val")
attrs = [attributes_of(d) for d in dirs]
res = H.residuals(head, fx, dirs)
pairs = test_pairs(N, NP)
for g in gs:
    f = out / f"g{g:g}.json"
    if f.exists():
        continue
    bcfg = BenchmarkConfig(device="cpu", dtype="fp32", n_train=0, n_test=N, n_pairs=NP, id_guidance=g)
    rec = {"id_guidance": g, "people": [H.VAL_SEED, H.VAL_SEED + N], "n_pairs": NP,
           "one": H.sweep(pipe, net, "cpu", attrs, res, [1.0], bcfg, neg)["1"],
           "two": H.two_slot(pipe, net, "cpu", attrs, res, pairs, 1.0, bcfg, neg, head=head)}
    f.write_text(json.dumps(rec, indent=1))
    o, t = rec["one"], rec["two"]
    print(f"g={g:g} one: identity {o['identity_acc']:.3f} attrs {o['attribute_acc']:.3f} scene {o['scene_acc']:.3f}"
          f" | two: both {t['all_people_acc']:.3f} each {t['identity_acc']:.3f} count {t['people_count_acc']:.3f} "
          f"leak {t.get('leak', 0):.3f} ({t.get('leak_chance', 0):.3f})", flush=True)
