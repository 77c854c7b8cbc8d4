"""Fix loc_weight before any run, from gradient norms (as id_weight was): on two-person batches of TRAINING people
(100000+, the e2e training range), |grad flow| / |grad loc| of a head's parameters at loc_weight 1, and how much of
each person's slot-reading their own region's tokens already give their own slot (exp(-loc) is a geometric-mean
share). Heads: the ID-loss head f2 (never saw pairs), the pair heads q0 (from f2) and r256c2p.
python docs/results/head_loc_probe_cpu/loc_probe.py HEAD_DIR... > docs/results/head_loc_probe_cpu/probe.txt"""
import sys
import time

import torch

from refgen.identity.features import VisionFeatures
from refgen.identity.head import load_head
from refgen.identity.render import load_pipeline
from refgen.identity.train_e2e import E2EConfig, _frozen_flow_model, item_losses, pair_batch, prepare_data, step_generator
from refgen.toyworld.benchmark import default_model, default_vl_model

torch.set_num_threads(2)
cfg = E2EConfig(output="tokens", refs_max=4, two_person_fraction=1.0, two_person_images=64, loc_weight=1.0,
                toyworld_identities=40, toyworld_first_id=100_000, cache_dir="/tmp/loc_probe_cache")
pipe = load_pipeline(default_model(), "cpu", "fp32")
fx = VisionFeatures(default_vl_model(), "cpu", "fp32")
data = prepare_data(pipe, fx, None, cfg, progress=False)
fm = _frozen_flow_model(pipe, cfg)
print(f"{len(data.ids)} training people, {data.pairs.shape[0]} pair images, regions per person "
      f"{data.pair_regions.float().sum(-1).mean():.1f} of {data.pair_regions.shape[-1]} tokens")
print("head | loc (mean) | own-slot share exp(-loc) | |grad flow| | |grad loc| | ratio flow/loc")
for path in sys.argv[1:]:
    head, _ = load_head(path, torch.device("cpu"), torch.float32)
    params = [p for p in head.parameters() if p.requires_grad]
    rows = []
    t0 = time.time()
    for b in range(4):
        batch = pair_batch(data, 16, cfg, step_generator(0, "probe", b))
        out = item_losses(head, data, batch, fm, cfg, torch.float32)
        gf = torch.autograd.grad(out["flow"].mean(), params, retain_graph=True, allow_unused=True)
        gl = torch.autograd.grad(out["loc"].mean(), params, allow_unused=True)
        norm = lambda gs: torch.sqrt(sum((g.float() ** 2).sum() for g in gs if g is not None)).item()
        rows.append((out["loc"].mean().item(), norm(gf), norm(gl)))
    loc, f, l = (sum(r[i] for r in rows) / len(rows) for i in range(3))
    print(f"{path} | {loc:.4f} | {torch.tensor(-loc).exp():.3f} | {f:.3e} | {l:.3e} | {f / l:.3f}  ({time.time() - t0:.0f} s)")
