"""CPU check of the localisation loss before its H200 run: the pair head q0 (I5) continued on two-person steps only
(40 TRAINING people 100000-100039, 256 rendered pairs, batch 8, lr 1e-3, 100 steps) with loc_weight 0 / 0.4 from
the same seed, then the own-slot share on 64 pairs of VALIDATION people (400000-400023; never test people).
python docs/results/head_loc_probe_cpu/loc_finetune.py OUT [--weights 0,0.4]"""
import argparse
import json
import sys
from pathlib import Path

import torch

from refgen.identity.features import VisionFeatures
from refgen.identity.head import load_head
from refgen.identity.render import load_pipeline
from refgen.identity.train_e2e import (E2EConfig, _frozen_flow_model, item_losses, pair_batch, prepare_data,
                                       step_generator, train_e2e)
from refgen.toyworld.benchmark import default_model, default_vl_model

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--init", default=".carry/next6/heads/q0")
ap.add_argument("--weights", default="0,0.4")
ap.add_argument("--steps", type=int, default=100)
ap.add_argument("--threads", type=int, default=1)
a = ap.parse_args()
torch.set_num_threads(a.threads)
out = Path(a.out)
base = dict(output="tokens", refs_max=4, two_person_fraction=1.0, two_person_images=256, toyworld_identities=40,
            toyworld_first_id=100_000, steps=a.steps, batch_size=8, lr=1e-3, warmup_steps=10, eval_identities=0,
            init_head=a.init, cache_dir=str(out / "cache_train"), checkpoint_every=50)
heads = {"start": a.init}
for w in [float(x) for x in a.weights.split(",")]:
    name = f"loc{w:g}"
    if not (out / name / "head.json").exists():
        train_e2e(None, out / name, default_model(), default_vl_model(), E2EConfig(loc_weight=w, **base) if w else
                  E2EConfig(**base), device="cpu", dtype="bf16", progress=False)
    heads[name] = str(out / name)
val = E2EConfig(output="tokens", refs_max=4, two_person_fraction=1.0, two_person_images=64, loc_weight=1.0,
                toyworld_identities=24, toyworld_first_id=400_000, cache_dir=str(out / "cache_val"))
pipe = load_pipeline(default_model(), "cpu", "bf16")  # the heads were trained on bf16 features
data = prepare_data(pipe, VisionFeatures(default_vl_model(), "cpu", "bf16"), None, val, progress=False)
fm = _frozen_flow_model(pipe, val)
rows = {}
for name, path in heads.items():
    head, _ = load_head(path, torch.device("cpu"), torch.float32)
    loc, flow = [], []
    with torch.no_grad():
        for b in range(8):
            o = item_losses(head, data, pair_batch(data, 8, val, step_generator(1, "val", b)), fm, val, torch.bfloat16)
            loc.append(o["loc"].mean().item())
            flow.append(o["flow"].mean().item())
    rows[name] = {"loc": sum(loc) / len(loc), "own_share_geo": float(torch.tensor(-sum(loc) / len(loc)).exp()),
                  "flow": sum(flow) / len(flow)}
    print(name, rows[name], flush=True)
(out / "val_shares.json").write_text(json.dumps(rows, indent=1))
