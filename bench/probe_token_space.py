"""CPU probe: does keeping learnt placeholder tokens word-like make per-person token identities compose in
two-person prompts? Modes: tokens (control), vocab (each token a softmax-weighted mix of the vocabulary's
embeddings: in their convex hull, word-like by construction; CelebBasis's idea with the vocabulary as the basis),
normclamp (tokens, each token's norm capped at the largest word embedding's).
usage: python bench/probe_token_space.py MODE OUT   (about 8 min per mode on one CPU thread)"""
import json
import math
import sys

import torch

from refgen.identity import invert as inv
from refgen.toyworld.benchmark import BenchmarkConfig, run_benchmark

MODE, OUT = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
_init, _res = inv.Inverter.__init__, inv.Inverter.residual


def __init__(self, *a, **k):
    _init(self, *a, **k)
    E = self.pipe.text_encoder.get_input_embeddings().weight.detach().float().to(self.device)  # (V, H_in)
    self._E, self._cap = E, E.norm(dim=-1).max()
    self._tau = self.emb_rms ** 2 * math.sqrt(E.shape[1])


def residual(self, st):
    T = _res(self, st)
    if MODE == "vocab":
        return torch.softmax(T @ self._E.T / self._tau, dim=-1) @ self._E
    if MODE == "normclamp":
        return T * (self._cap / T.norm(dim=-1, keepdim=True)).clamp(max=1.0)
    return T


inv.Inverter.__init__, inv.Inverter.residual = __init__, residual
cfg = BenchmarkConfig(device="cpu", dtype="fp32", n_train=0, n_test=4, test_seed=500000, n_pairs=6, alphas=[0, 1],
                      seeds=[0, 1], invert={"steps": 600, "images_per_step": 4, "image_prompts": True})
r = run_benchmark(cfg, OUT, progress=False)
t, ts = r["teacher"]["per_alpha"]["1"], r["two_slot"]["teacher"]
print(json.dumps({"mode": MODE, "one": {k: t[k] for k in ("identity_acc", "attribute_acc", "scene_acc")},
                  "two": {k: ts.get(k) for k in ("all_people_acc", "people_count_acc", "identity_acc",
                                                  "attribute_acc", "leak", "leak_chance")},
                  "ceiling": {k: r["ceiling"][k].get("all_people_acc") for k in ("single", "pair")}}))
