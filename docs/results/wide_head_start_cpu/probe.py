"""Issue 16, item 4 with wide slots: does a short inversion from the wide one-person head (I19 stage w, slot_repeat 3,
not in the tree: its bf16 copy lives in the ignored .carry/heads/w_bf16) reach what 600 steps from the placeholder
reach (docs/results/token_capacity_cpu/k3.json: the same 8 tuning people, 600 x 4 images)? Inversions of 150 steps
from the placeholder, and 50 / 150 anchored steps (start_weight 1) from the head, scored by the benchmark with the
head alone as 0 steps. 2-core CPU, fp32. With N_PAIRS > 0 also two-person prompts of ordered pairs of those people
(a start head with slot_roles adds "+roles" rows: every token source rendered with its offsets).
python docs/results/wide_head_start_cpu/probe.py OUT HEAD [N_PEOPLE] [N_PAIRS]"""
import json
import sys
from pathlib import Path

import torch

from refgen.toyworld.benchmark import BenchmarkConfig, run_benchmark

torch.set_num_threads(2)
out, head = Path(sys.argv[1]), sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 8
n_pairs = int(sys.argv[4]) if len(sys.argv) > 4 else 0
cfg = BenchmarkConfig(device="cpu", dtype="fp32", n_train=0, n_test=n, test_seed=500000, train_seed=100000,
                      n_pairs=n_pairs, alphas=[1.0, 1.4], seeds=[0, 1], short_steps=[50, 150], start_head=head,
                      invert={"steps": 150, "images_per_step": 4, "slot_repeat": 3, "start_weight": 1.0})
rec = run_benchmark(cfg, out / "run", progress=False)
(out / "result.json").write_text(json.dumps(rec, indent=1, default=str))
print(json.dumps({k: v for k, v in rec.items() if k in ("short_steps", "head_start", "two_slot")}, default=str)[:3000])
