"""Read throughput: WebDataset tar shards vs the same samples as individual .npy files.

Writes N synthetic samples with the field set of `refgen dit prepare` (latent, t5, t5_mask, dino_cls,
dino_patches, caption, meta) twice: as shards of --shard-size samples (our format, via the same writer helpers),
and as one file per field per sample in per-field folders (the seed's `derived/<field>/<id>.npy` layout). Then
reads every sample back, decoded to numpy arrays, and reports samples/s and MB/s:

  cold: the files' pages are evicted first with posix_fadvise(DONTNEED) (no root needed; directory/inode caches
        stay warm, so this still flatters the per-file layout a little)
  warm: straight after a full read, everything in the page cache

Usage:
    python bench/shard_read.py --n 2000                      # small samples (64 px bucket, tiny encoders)
    python bench/shard_read.py --n 500 --preset 256px-large   # 256 px, T5-Large / DINOv3-L widths
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

PRESETS = {
    # latent (C, h, w), t5 tokens, t5 dim, dino patches, dino dim
    "small": dict(latent=(16, 8, 8), t5_tokens=12, t5_dim=32, t5_max=32, dino_patches=16, dino_dim=32),
    "256px-large": dict(latent=(16, 32, 32), t5_tokens=60, t5_dim=1024, t5_max=512, dino_patches=256,
                        dino_dim=1024),
}


def _npy_bytes(a):
    from refgen.dit.prepare import _npy_bytes

    return _npy_bytes(a)


def make_samples(n: int, p: dict, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        mask = np.zeros(p["t5_max"], bool)
        mask[: p["t5_tokens"]] = True
        meta = {"key": f"s{i:06d}", "source": f"img/{i:06d}.jpg", "bucket": "64x64"}
        yield f"s{i:06d}", {
            "latent.npy": rng.standard_normal(p["latent"]).astype(np.float16),
            "t5.npy": rng.standard_normal((p["t5_tokens"], p["t5_dim"])).astype(np.float16),
            "t5_mask.npy": mask,
            "dino_cls.npy": rng.standard_normal(p["dino_dim"]).astype(np.float16),
            "dino_patches.npy": rng.standard_normal((p["dino_patches"], p["dino_dim"])).astype(np.float16),
            "caption.txt": f"a caption for sample {i}".encode(),
            "meta.json": json.dumps(meta).encode(),
        }


def write_both(root: Path, n: int, p: dict, shard_size: int) -> tuple[list[Path], list[tuple[str, dict]]]:
    import webdataset as wds

    shard_dir, npy_dir = root / "shards", root / "npy"
    shard_dir.mkdir(parents=True)
    shards, files = [], []
    writer, count = None, 0
    for key, s in make_samples(n, p):
        if writer is None or count == shard_size:
            if writer is not None:
                writer.close()
                f.close()
            shards.append(shard_dir / f"shard-{len(shards):06d}.tar")
            f = open(shards[-1], "wb")
            writer, count = wds.TarWriter(f, encoder=False, mtime=0.0), 0
        enc = {k: (_npy_bytes(v) if k.endswith(".npy") else v) for k, v in s.items()}
        writer.write({"__key__": key, **enc})
        count += 1
        paths = {}
        for field, data in enc.items():
            d = npy_dir / field.split(".")[0]
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"{key}.{field.split('.', 1)[1]}"
            path.write_bytes(data)
            paths[field] = path
        files.append((key, paths))
    writer.close()
    f.close()
    return shards, files


def evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # only clean pages go: os.sync() ran after writing
        finally:
            os.close(fd)


def read_shards(shards: list[Path]) -> tuple[int, int]:
    import webdataset as wds

    from refgen.dit.shards import decode_sample

    n = nbytes = 0
    ds = wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False)
    for raw in ds:
        nbytes += sum(len(v) for k, v in raw.items() if not k.startswith("_"))
        decode_sample(raw)
        n += 1
    return n, nbytes


def read_npy(files) -> tuple[int, int]:
    n = nbytes = 0
    for key, paths in files:
        out = {}
        for field, path in paths.items():
            if field.endswith(".npy"):
                out[field] = np.load(path, allow_pickle=False)
                nbytes += out[field].nbytes
            else:
                data = path.read_bytes()
                nbytes += len(data)
                out[field] = json.loads(data) if field.endswith(".json") else data.decode()
        n += 1
    return n, nbytes


def timed(fn, *a):
    t = time.perf_counter()
    n, b = fn(*a)
    return n, b, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp folder, removed after)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    root = Path(args.dir or tempfile.mkdtemp(prefix="shard_read_"))
    try:
        t = time.perf_counter()
        shards, files = write_both(root, args.n, p, args.shard_size)
        write_s = time.perf_counter() - t
        os.sync()
        all_npy = [path for _, ps in files for path in ps.values()]
        shard_bytes = sum(s.stat().st_size for s in shards)
        npy_bytes = sum(path.stat().st_size for path in all_npy)
        res: dict = {"n": args.n, "preset": args.preset, "shape": p, "shards": len(shards),
                     "npy_files": len(all_npy), "shard_mb": round(shard_bytes / 2**20, 2),
                     "npy_mb": round(npy_bytes / 2**20, 2), "write_both_s": round(write_s, 2)}
        for mode in ("cold", "warm"):
            for name, fn, arg, paths, size in [("shards", read_shards, shards, shards, shard_bytes),
                                               ("npy", read_npy, files, all_npy, npy_bytes)]:
                secs = []
                for _ in range(args.repeats):
                    if mode == "cold":
                        evict(paths)
                    else:
                        fn(arg)  # make sure it is all cached
                    n, _, s = timed(fn, arg)
                    assert n == args.n, (name, n)
                    secs.append(s)
                med = statistics.median(secs)
                res[f"{name}_{mode}"] = {"median_s": round(med, 3), "samples_per_s": round(args.n / med, 1),
                                         "mb_per_s": round(size / 2**20 / med, 1)}
        for mode in ("cold", "warm"):
            res[f"speedup_{mode}"] = round(res[f"shards_{mode}"]["samples_per_s"] /
                                           res[f"npy_{mode}"]["samples_per_s"], 2)
        print(json.dumps(res, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
