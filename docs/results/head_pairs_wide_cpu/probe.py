"""CPU check before the H200's `wp` run: do two-person steps with slot_roles go further from the wide one-person head
(`w`, slot_repeat 3, 89.3 % one person) than from the 3-token one (`s2`, 81.6 %)? Each continued on two-person steps
only with slot_roles (150 TRAINING people from 100000, 1,024 rendered pairs, batch 8, lr 1e-3, the same seed and data
order; the setup of docs/results/head_roles_probe_cpu, whose 3,000-step roles row read 14.6 % from s2), then both
right on 24 pairs of 48 VALIDATION people (400000-400047; 5 scenes x 2 seeds = 240 images, alpha 1, fp32), and each
head's one-person row on those 48 people. Never test people. The heads are bf16 copies outside the tree (ignored
.carry/heads/): w_bf16 (docs/head.md), and s2_bf16 = `git show 80e51ce:docs/results/head_e2e_idloss/s2_head_bf16/...`
with its feature record's VL location rewritten from the dev machine's path of the toy VL to the
`refgen:assets/toyworld/vl` name it has had since (the same VL: the config hash in the record is unchanged).
python docs/results/head_pairs_wide_cpu/probe.py OUT [--steps 3000] [--narrow .carry/heads/s2_bf16] [--wide .carry/heads/w_bf16]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, "bench")
import toyworld_head_e2e as B  # noqa: E402
from refgen.identity.train_e2e import E2EConfig, train_e2e  # noqa: E402
from refgen.toyworld.benchmark import BenchmarkConfig, attributes_of, default_model, default_vl_model, test_pairs  # noqa: E402
from refgen.toyworld.identities import make_identities  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--narrow", default=".carry/heads/s2_bf16")
ap.add_argument("--wide", default=".carry/heads/w_bf16")
ap.add_argument("--steps", type=int, default=3000)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
out = Path(a.out)
base = dict(output="tokens", refs_max=4, two_person_fraction=1.0, two_person_images=1024, toyworld_identities=150,
            toyworld_first_id=100_000, steps=a.steps, batch_size=8, lr=1e-3, warmup_steps=10, eval_identities=0,
            checkpoint_every=100, slot_roles=True)
root = out / "val48"
if not root.exists():
    make_identities(root, n=48, seed=B.VAL_SEED, progress=False)
bcfg = BenchmarkConfig(device="cpu", dtype="fp32", n_train=1200, n_test=48, n_pairs=24, head_alphas=[1.0])
bcfg.scenes, bcfg.seeds = bcfg.scenes[:5], bcfg.seeds[:2]
rows = {}
for name, init, repeat in (("narrow", a.narrow, 1), ("wide", a.wide, 3)):
    t = time.time()
    if not (out / name / "head.json").exists():
        train_e2e(None, out / name, default_model(), default_vl_model(),
                  E2EConfig(init_head=init, slot_repeat=repeat, cache_dir=str(out / f"cache_{name}"), **base),
                  device="cpu", dtype="bf16", progress=False)
    rows[name] = {"init": init, "slot_repeat": repeat, "train_s": time.time() - t}
    t = time.time()
    pipe, head, fx, net, neg = B.scoring_setup(default_model(), default_vl_model(), out / name, "cpu", "fp32")
    dirs = B._dirs(root)
    attrs = [attributes_of(d) for d in dirs]
    people = B.residuals(head, fx, dirs)
    m = B.two_slot(pipe, net, "cpu", attrs, people, test_pairs(len(dirs), 24), 1.0, bcfg, neg, False, head)
    rows[name]["pairs"] = {k: m[k] for k in ("all_people_acc", "all_people_ci", "identity_acc", "identity_ci",
                                             "identity_ci_people", "leak", "leak_chance", "people_count_acc",
                                             "n_images")}
    one = B.sweep(pipe, net, "cpu", attrs, people, [1.0], bcfg, neg)["1"]
    rows[name]["one"] = {k: one[k] for k in ("identity_acc", "identity_ci", "scene_acc", "n_images")}
    rows[name]["score_s"] = time.time() - t
    print(name, json.dumps(rows[name]), flush=True)
(out / "result.json").write_text(json.dumps(rows, indent=1))
