"""Is the placeholder's width what holds per-person token inversion back? `~ID~` is 3 tokens in the toy tokenizer
(Qwen's is alike); the words of the caption ceiling are ~15. This probe makes every slot K copies of the placeholder's
ids (3K tokens; the prompt text still says `~ID~`) by patching `placeholder_ids` where it is imported, and inverts
the same tuning people (500000+, never test people) with the toy teacher settings, scored by the benchmark.
2-core CPU, fp32. python docs/results/token_capacity_cpu/probe.py OUT K [N_PEOPLE] [STEPS]   (from the repo root)"""
import json
import sys
from pathlib import Path

import torch

from refgen.identity import inject, slots, tokens
from refgen.toyworld.benchmark import BenchmarkConfig, run_benchmark

torch.set_num_threads(2)
out, K = Path(sys.argv[1]), int(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 8
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 600
_orig = slots.placeholder_ids


def wide(tokenizer, repeat=1):  # refgen has InvertConfig.slot_repeat since: this patch predates it
    return _orig(tokenizer, repeat) * K


for mod in (slots, tokens, inject):
    mod.placeholder_ids = wide
cfg = BenchmarkConfig(device="cpu", dtype="fp32", n_train=0, n_test=n, test_seed=500000, train_seed=100000,
                      n_pairs=0, alphas=[1.0, 1.4], seeds=[0, 1],
                      invert={"steps": steps, "images_per_step": 4})
rec = run_benchmark(cfg, out / f"k{K}", progress=False)
(out / f"k{K}.json").write_text(json.dumps(rec, indent=1, default=str))
print(json.dumps({k: v for k, v in rec.items() if k in ("teacher", "ceiling")}, default=str)[:3000])
