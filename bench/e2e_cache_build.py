"""How long the end-to-end trainer's data cache takes to build: N toy-world people rendered on the fly (`ToySource`,
as `toyworld_head_e2e.py --stream` feeds them), their photos through the shipped toy Qwen3-VL tower and toy
Qwen-Image VAE, their prompts through its text encoder: `e2e_cache.build_cache`, the path `train_e2e` takes.

    OMP_NUM_THREADS=1 python bench/e2e_cache_build.py --n 64 --threads 1          # CPU, fp32
    python bench/e2e_cache_build.py --n 1200 --device cuda --dtype bf16             # GPU

Each repeat builds into a fresh folder (the models are loaded once, outside the timing); prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    from refgen.identity.e2e_cache import ToySource, build_cache, cache_key
    from refgen.identity.features import FeatureConfig, VisionFeatures, feature_settings
    from refgen.identity.render import load_pipeline
    from refgen.model_identity import identify_model
    from refgen.toyworld.benchmark import default_model, default_vl_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="toy-world people")
    ap.add_argument("--first-id", type=int, default=100_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--repeats", type=int, default=2, help="builds timed; the best is reported")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, vl = default_model(), default_vl_model()
    pipe = load_pipeline(model, a.device, a.dtype)
    fx = VisionFeatures(vl, a.device, a.dtype, FeatureConfig())
    src = ToySource(a.first_id, a.n)
    key = cache_key(src, pipe, model, feature_settings(identify_model(vl, "--vl-model"), fx.cfg, a.dtype), 64, 64)
    times = []
    for _ in range(a.repeats):
        with tempfile.TemporaryDirectory() as d:
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            man = build_cache(d, src, key, pipe, lambda: fx, 64, 64, progress=False)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    best = min(times)
    res = {"people": a.n, "photos": sum(man["counts"]), "device": a.device, "dtype": a.dtype,
           "threads": torch.get_num_threads(), "build_s": [round(x, 3) for x in times],
           "ms_per_person": round(1000 * best / a.n, 2)}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
