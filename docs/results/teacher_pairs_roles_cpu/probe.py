"""Issue 16, two slots: do the learnt slot roles of the two-person head (`src/refgen/assets/toyworld/head`; it ran
as `docs/results/head_pairs_long/roles_head_bf16`) lift per-person inversions in two-person prompts, and does an
anchored inversion from that head keep its pairs? 24 tuning people (500000+), 12 ordered pairs, fp32 on the CPU; every two-slot source is rendered
with and without the head's offsets (the benchmark's "+roles" rows).
    python docs/results/teacher_pairs_roles_cpu/probe.py OUT   (from the repo root)"""
import json
import sys
from pathlib import Path

import torch

from refgen.toyworld.benchmark import BenchmarkConfig, run_benchmark

torch.set_num_threads(2)
cfg = BenchmarkConfig(device="cpu", dtype="fp32", n_train=0, n_test=24, n_pairs=12, test_seed=500_000,
                      alphas=[0.0, 1.0, 1.4], short_steps=[150],
                      start_head="src/refgen/assets/toyworld/head",
                      invert={"steps": 375, "start_weight": 1.0})
r = run_benchmark(cfg, Path(sys.argv[1]), progress=True)
print(json.dumps({k: {x: round(m[x], 3) for x in ("all_people_acc", "identity_acc", "people_count_acc")}
                  for k, m in r["two_slot"].items()}, indent=1))
