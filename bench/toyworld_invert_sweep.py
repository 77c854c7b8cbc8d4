"""Teacher-inversion settings on the toy world: identity accuracy per setting (a small benchmark per row).

Each --variant is a JSON object of InvertConfig overrides; every variant inverts the same held-out test
identities (no head) through `refgen.toyworld.benchmark.run_benchmark`, and the table shows the caption
ceiling, the best alpha's identity / attribute / scene accuracy and its share of the ceiling, two-slot
prompts against the two-person ceiling, and the inversion cost.

    python bench/toyworld_invert_sweep.py --out /tmp/sweep --n-test 48 \
        --variant '{}' --variant '{"parametrisation": "free"}' \
        --variant '{"parametrisation": "free", "contexts": ["A photo of ~ID~ at the beach.", "~ID~ next to a person in the city."]}'
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> int:
    from refgen.artifacts import atomic_write_json, provenance
    from refgen.toyworld.benchmark import BenchmarkConfig, run_benchmark

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", action="append", required=True, help="JSON InvertConfig overrides")
    ap.add_argument("--n-test", type=int, default=16)
    ap.add_argument("--n-pairs", type=int, default=8)
    ap.add_argument("--pair-images", type=int, default=0, help="reference photos per identity beside another person")
    ap.add_argument("--photos", type=int, default=0, help="one-person reference photos per identity (0: 3-5)")
    ap.add_argument("--test-seed", type=int, default=200_000,
                    help="first identity id; choose settings on another range than the benchmark's test ids "
                         "(e.g. 500000), then report the choice on 200000")
    ap.add_argument("--short-steps", default="", help="comma-separated shorter inversions of the test set, e.g. "
                    "150,375 (a quarter of 1,500 is 375)")
    ap.add_argument("--start-head", default="", help="a head folder: the short inversions also start from its "
                    "predictions, and the head alone is scored")
    ap.add_argument("--start-head-alphas", default="", help="comma-separated alphas for the start head's rows "
                    "(default: the teacher's best alpha)")
    ap.add_argument("--pair-alphas", default="", help="comma-separated extra alphas for the two-slot rows")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke settings")
    a = ap.parse_args(argv)
    rows = []
    for k, v in enumerate(a.variant):
        over = json.loads(v)
        base = BenchmarkConfig.tiny() if a.tiny else BenchmarkConfig(device=a.device, n_train=0, n_test=a.n_test,
                                                                     n_pairs=a.n_pairs, test_seed=a.test_seed)
        base.pair_images = a.pair_images
        base.photos = a.photos
        base.short_steps = [int(x) for x in a.short_steps.split(",") if x]
        base.start_head = a.start_head
        base.pair_alphas = [float(x) for x in a.pair_alphas.split(",") if x]
        base.start_head_alphas = [float(x) for x in a.start_head_alphas.split(",") if x]
        cfg = BenchmarkConfig(**{**base.__dict__, "n_train": 0, "invert": {**base.invert, **over}})
        r = run_benchmark(cfg, Path(a.out) / f"v{k}", progress=False)
        best = r["teacher"]["best_alpha"]
        pa = r["teacher"]["per_alpha"]
        top = max(pa, key=lambda x: pa[x]["identity_acc"])
        inv = r["inversion"].get("all", {})
        c1, c2 = r["ceiling"]["single"]["identity_acc"], r["ceiling"]["pair"]["all_people_acc"]
        rows.append({"variant": over, "best_alpha": best, "best": pa[best] if best else None,
                     "max_id_alpha": top, "max_id": pa[top]["identity_acc"], "floor": pa.get("0"),
                     "ceiling_single": c1, "ceiling_pair": c2,
                     "two_slot": r["two_slot"]["teacher"]["all_people_acc"], "invert_s": inv.get("seconds"),
                     "per_alpha": {x: (m["identity_acc"], m["attribute_acc"], m["scene_acc"]) for x, m in pa.items()}})
        b = rows[-1]["best"] or {"identity_acc": float("nan"), "attribute_acc": float("nan"), "scene_acc": float("nan")}
        cp = b.get("identity_ci_people")
        print(f"{json.dumps(over)[:60]:60s} ceiling {c1:.2f} | best a={best} id {b['identity_acc']:.2f} "
              + (f"[by person {cp[0]:.2f}, {cp[1]:.2f}] " if cp else "") +
              f"({b['identity_acc'] / max(c1, 1e-9):.0%} of ceiling) attr {b['attribute_acc']:.2f} "
              f"scene {b['scene_acc']:.2f} | two-slot {rows[-1]['two_slot']:.2f} of {c2:.2f} | "
              f"invert {inv.get('seconds') or 0:.0f}s "
              f"| per alpha (id, attr, scene) {rows[-1]['per_alpha']}", flush=True)
        for name, rows_ in (("from noise", r.get("short_steps", {})),
                            ("from the head", r.get("head_start", {}).get("per_steps", {}))):
            for steps, pa in rows_.items():
                print("    " + f"{steps} steps {name}: " + ", ".join(
                    f"a={x} id {m['identity_acc']:.3f} [{m['identity_ci'][0]:.3f}, {m['identity_ci'][1]:.3f}] "
                    f"attr {m['attribute_acc']:.3f} scene {m['scene_acc']:.3f}" for x, m in pa.items()), flush=True)
        for name, m in r["two_slot"].items():
            print(f"    two slots, {name} (alpha {m['alpha']:g}): both right {m['all_people_acc']:.3f}, person count "
                  f"{m['people_count_acc']:.3f}, attributes {m['attribute_acc']:.3f}"
                  + (f", leak {m['leak']:.3f} (chance {m['leak_chance']:.3f})" if "leak" in m else ""), flush=True)
        rows[-1].update(short_steps=r.get("short_steps"), head_start=r.get("head_start"), two_slots=r["two_slot"])
        atomic_write_json(Path(a.out) / "sweep.json", provenance(vars(a), rows=rows))  # after every row: a
        # run cut short by a time limit keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
