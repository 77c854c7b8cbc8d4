"""CPU check of slot_roles before its H200 run: the one-person head s2 (bf16 copy) continued on two-person steps only
(PEOPLE TRAINING people from 100000, PAIRS rendered pairs, batch 8, lr 1e-3, STEPS steps, the same seed) without and with
slot_roles; then each head's validation-pair flow loss (fixed noise, 8 batches of 8 pairs of 24 VALIDATION people
400000-400023) and both-right on 24 pairs of 48 validation people (400000-400047; 5 scenes x 2 seeds = 240 images,
alpha 1, fp32). Never test people.
python docs/results/head_roles_probe_cpu/roles_probe.py OUT [--steps 150 --people 40 --pairs 256] [--threads 2]
(from the repo root)
The s2 head (docs/results/head_e2e_idloss/s2_head_bf16) left the tree: `git checkout 80e51ce -- docs/results/head_e2e_idloss/s2_head_bf16` first.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, "bench")
import toyworld_head_e2e as B  # noqa: E402
from refgen.identity.features import VisionFeatures  # noqa: E402
from refgen.identity.head import load_head  # noqa: E402
from refgen.identity.render import load_pipeline  # noqa: E402
from refgen.identity.train_e2e import (E2EConfig, _frozen_flow_model, item_losses, pair_batch, prepare_data,  # noqa: E402
                                       step_generator, train_e2e)
from refgen.toyworld.benchmark import BenchmarkConfig, attributes_of, default_model, default_vl_model, test_pairs  # noqa: E402
from refgen.toyworld.identities import make_identities  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--init", default="docs/results/head_e2e_idloss/s2_head_bf16")
ap.add_argument("--steps", type=int, default=150)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--people", type=int, default=40)
ap.add_argument("--pairs", type=int, default=256)
a = ap.parse_args()
torch.set_num_threads(a.threads)
out = Path(a.out)
base = dict(output="tokens", refs_max=4, two_person_fraction=1.0, two_person_images=a.pairs, toyworld_identities=a.people,
            toyworld_first_id=100_000, steps=a.steps, batch_size=8, lr=1e-3, warmup_steps=10, eval_identities=0,
            init_head=a.init, cache_dir=str(out / "cache_train"), checkpoint_every=50)
heads = {}
for name, roles in (("joint", False), ("roles", True)):
    t = time.time()
    if not (out / name / "head.json").exists():
        train_e2e(None, out / name, default_model(), default_vl_model(), E2EConfig(slot_roles=roles, **base),
                  device="cpu", dtype="bf16", progress=False)
    heads[name] = out / name
    print(name, "trained", round(time.time() - t), "s", flush=True)

rows = {}
val = E2EConfig(output="tokens", refs_max=4, two_person_fraction=1.0, two_person_images=64, toyworld_identities=24,
                toyworld_first_id=400_000, cache_dir=str(out / "cache_val"))
pipe = load_pipeline(default_model(), "cpu", "bf16")  # the heads were trained on bf16 features
data = prepare_data(pipe, VisionFeatures(default_vl_model(), "cpu", "bf16"), None, val, progress=False)
fm = _frozen_flow_model(pipe, val)
for name, path in heads.items():
    head, _ = load_head(path, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        flow = [item_losses(head, data, pair_batch(data, 8, val, step_generator(1, "val", b)), fm, val,
                            torch.bfloat16)["flow"].mean().item() for b in range(8)]
    rows[name] = {"val_pair_flow": sum(flow) / len(flow)}
    print(name, rows[name], flush=True)
del pipe, data, fm

root = out / "val48"
if not root.exists():
    make_identities(root, n=48, seed=B.VAL_SEED, progress=False)
bcfg = BenchmarkConfig(device="cpu", dtype="fp32", n_train=1200, n_test=48, n_pairs=24, head_alphas=[1.0])
bcfg.scenes, bcfg.seeds = bcfg.scenes[:5], bcfg.seeds[:2]
for name, path in heads.items():
    t = time.time()
    pipe, head, fx, net, neg = B.scoring_setup(default_model(), default_vl_model(), path, "cpu", "fp32")
    dirs = B._dirs(root)
    attrs = [attributes_of(d) for d in dirs]
    m = B.two_slot(pipe, net, "cpu", attrs, B.residuals(head, fx, dirs), test_pairs(len(dirs), 24), 1.0, bcfg, neg,
                   False, head)
    rows[name].update({k: m[k] for k in ("all_people_acc", "all_people_ci", "identity_acc", "identity_ci",
                                         "identity_ci_people", "leak", "leak_chance",
                                         "people_count_acc", "n_images")}, seconds=time.time() - t)
    print(name, rows[name], flush=True)
(out / "roles_probe.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
