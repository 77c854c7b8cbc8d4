"""Re-score the committed bf16 copy of s2 on the 192 test people at alpha 1, on the CPU in fp32: the by-person
interval the H200 run did not record. python docs/results/head_e2e_idloss/rescore_s2_cpu.py OUT   (from the repo root; 633 s on 2 CPU threads)
The s2 head (docs/results/head_e2e_idloss/s2_head_bf16) left the tree: `git checkout 80e51ce -- docs/results/head_e2e_idloss/s2_head_bf16` first.
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, "bench")
import toyworld_head_e2e as H  # noqa: E402
from refgen.toyworld.benchmark import BenchmarkConfig, attributes_of, default_model, default_vl_model  # noqa: E402
from refgen.toyworld.identities import make_identities  # noqa: E402

torch.set_num_threads(2)
out = Path(sys.argv[1])
bcfg = BenchmarkConfig(device="cpu", dtype="fp32", n_train=0, n_test=192, head_alphas=[1.0])
make_identities(out / "test", n=192, seed=bcfg.test_seed, progress=False)
t = time.time()
pipe, head, fx, net, neg = H.scoring_setup(default_model(), default_vl_model(),
                                           Path("docs/results/head_e2e_idloss/s2_head_bf16"), "cpu", "fp32")
dirs = H._dirs(out / "test")
attrs = [attributes_of(d) for d in dirs]
m = H.sweep(pipe, net, "cpu", attrs, H.residuals(head, fx, dirs), [1.0], bcfg, neg)["1"]
keep = ("identity_acc", "identity_ci", "identity_ci_people", "n_distinct_people", "n_images", "n_people",
        "attribute_acc", "scene_acc", "per_attribute")
rec = {k: m[k] for k in keep} | {"seconds": time.time() - t, "test_seed": bcfg.test_seed}
(out / "s2_cpu_alpha1.json").write_text(json.dumps(rec, indent=1))
print(json.dumps(rec))
