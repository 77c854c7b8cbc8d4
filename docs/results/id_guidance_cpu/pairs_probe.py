"""Two people with identity guidance pushed jointly (one reference row: both people at alpha 0) or per person (one
reference row per person: that person at alpha 0, the other kept), on the shipped toy head's VALIDATION pairs
(24 ordered pairs of 400000-400047, never test people), 5 scenes x 2 seeds, alpha 1, its slot roles, fp32 CPU.
python docs/results/id_guidance_cpu/pairs_probe.py OUT MODE:G [MODE:G ...]   MODE in {joint, person}"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, "bench")
import toyworld_head_e2e as H  # noqa: E402
from refgen.identity.head import with_slot_role  # noqa: E402
from refgen.identity.render import encode_with_tokens, render_images  # noqa: E402
from refgen.identity.tokens import placeholder_embeds  # noqa: E402
from refgen.toyworld import recognizer as R  # noqa: E402
from refgen.toyworld import world  # noqa: E402
from refgen.toyworld.benchmark import (PAIR_PROMPT, BenchmarkConfig, attributes_of, default_model,  # noqa: E402
                                       default_vl_model, render_config, score, test_pairs)
from refgen.toyworld.identities import make_identities  # noqa: E402

torch.set_num_threads(2)
out = Path(sys.argv[1])
N, NP = 48, 24
make_identities(out / "val", n=N, seed=H.VAL_SEED, progress=False)
pipe, head, fx, net, neg = H.scoring_setup(default_model(), default_vl_model(),
                                           Path("src/refgen/assets/toyworld/head"), "cpu", "fp32")
dirs = H._dirs(out / "val")
attrs = [attributes_of(d) for d in dirs]
_, res = H.residuals(head, fx, dirs)
pairs = test_pairs(N, NP)
T_ph = placeholder_embeds(pipe)
for spec in sys.argv[2:]:
    mode, g = spec.split(":")
    g = float(g)
    f = out / f"{mode}_g{g:g}.json"
    if f.exists():
        continue
    bcfg = BenchmarkConfig(device="cpu", dtype="fp32", n_train=0, n_test=N, n_pairs=NP, id_guidance=g)
    rc = render_config(bcfg)
    images, rows = [], []
    for s in bcfg.scenes:
        prompt = PAIR_PROMPT.format(where=world.SCENE_PHRASES[s][0])
        jobs = [(i, j, seed) for i, j in pairs for seed in bcfg.seeds]
        people = [[with_slot_role(head, "tokens", res[p], k, 2) for k, p in enumerate((i, j))] for i, j, _ in jobs]
        B = len(jobs)

        def enc(slot_tokens):  # slot_tokens[k]: per job, person k's tokens
            return encode_with_tokens(pipe, [prompt] * B, slot_tokens, [1.0] * B)

        E, M = enc([[pp[k] for pp in people] for k in range(2)])
        if mode == "joint":
            plain = [enc([[T_ph] * B, [T_ph] * B])[0]]
        else:  # each person's own push: that person at alpha 0 (the placeholder), the other kept
            plain = [enc([[T_ph] * B, [pp[1] for pp in people]])[0], enc([[pp[0] for pp in people], [T_ph] * B])[0]]
        images += render_images(pipe, E, M, [seed for *_, seed in jobs], rc, neg, progress=False,
                                plain=plain if g else None)
        rows += [{"people": [attrs[i], attrs[j]], "scene": s} for i, j, _ in jobs]
    t = score(R.predict(net, images, "cpu"), rows)
    f.write_text(json.dumps({"mode": mode, "id_guidance": g, "two": t}, indent=1))
    print(f"{mode} g={g:g}: both {t['all_people_acc']:.3f} {t['all_people_ci']} each {t['identity_acc']:.3f} "
          f"count {t['people_count_acc']:.3f} scene {t['scene_acc']:.3f} leak {t.get('leak', 0):.3f} "
          f"({t.get('leak_chance', 0):.3f})", flush=True)
