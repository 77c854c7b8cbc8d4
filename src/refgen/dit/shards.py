"""Streaming loader for the shards written by `refgen dit prepare` (WebDataset).

BATCH CONTRACT (NanoDiT training depends on exactly this):

    Each batch is a dict; all samples in a batch come from ONE bucket (same H, W):
      latent        float32 (B, C, h, w)     VAE latents (h = H/8, w = W/8), already normalised per channel with
                                             the dataset statistics: (z - mean[c]) / std[c]
      t5            float   (B, T, D_t5)     T5 last_hidden_state, T = t5_max_length (default 512); positions
                                             where t5_mask is False are zeros
      t5_mask       bool    (B, T)           True for real tokens (a prefix of each row)
      dino_cls      float   (B, D_dino)      DINOv3 CLS token
      dino_patches  float   (B, (h/2)*(w/2), D_dino)  DINOv3 patch tokens, registers excluded, row-major over the
                                             (H/16, W/16) grid = the DiT's patch-2 token grid on the latents
      caption       list[str]
      key           list[str]                WebDataset sample keys (meta.json's "source" has the image path)

    `load_latent_stats(shard_dir) -> (mean, std)`, each a float32 tensor (C,), undoes the normalisation before
    decoding: `vae.decode(latent * std[:, None, None] + mean[:, None, None])` (the VAE's own scaling_factor /
    shift_factor are not used anywhere).

Distributed use (torchrun): shards are split over ranks (`wds.split_by_node`) and then over DataLoader workers
(`wds.split_by_worker`). With finite epochs, ranks can get different numbers of batches and DDP would hang at the
end; pass `resampled=True, epoch_batches=N` so every rank draws shards with replacement and yields exactly N
batches per epoch.
"""

from __future__ import annotations

import functools
import json
import random
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

LATENT_STATS = "latent_stats.json"
INDEX = "index.json"
FIELDS = ("latent.npy", "t5.npy", "t5_mask.npy", "dino_cls.npy", "dino_patches.npy", "caption.txt", "meta.json")


def load_latent_stats(shard_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float32 tensors of shape (C,), computed by `prepare` over every latent value in the dataset."""
    path = Path(shard_dir) / LATENT_STATS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {shard_dir} the OUT folder of `refgen dit prepare`, and did "
                                f"it finish?")
    d = json.loads(path.read_text())
    return torch.tensor(d["mean"], dtype=torch.float32), torch.tensor(d["std"], dtype=torch.float32)


def load_index(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `refgen dit prepare` to completion first")
    return json.loads(path.read_text())


def shard_urls(shard_dir: str | Path, buckets: Iterable[str] | None = None) -> list[str]:
    """Absolute paths of all non-empty shards (optionally only some buckets), in a fixed order."""
    shard_dir = Path(shard_dir)
    index = load_index(shard_dir)
    names = list(index["buckets"]) if buckets is None else list(buckets)
    unknown = [b for b in names if b not in index["buckets"]]
    if unknown:
        raise KeyError(f"bucket(s) {unknown} not in {shard_dir / INDEX}; have {sorted(index['buckets'])}")
    return [str(shard_dir / s["path"]) for b in names for s in index["buckets"][b]["shards"]]


def _npy(data: bytes) -> np.ndarray:
    import io

    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def decode_sample(sample: dict) -> dict:
    """Raw tar members -> numpy arrays. Only our own fields are decoded (no pickle, no generic decoders)."""
    missing = [f for f in FIELDS if f not in sample]
    if missing:
        raise KeyError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks {missing}")
    meta = json.loads(sample["meta.json"])
    return {
        "key": sample["__key__"],
        "bucket": meta["bucket"],
        "latent": _npy(sample["latent.npy"]),  # (C, h, w)
        "t5": _npy(sample["t5.npy"]),  # (n_tokens, D_t5), valid tokens only
        "t5_mask": _npy(sample["t5_mask.npy"]),  # (T,) bool
        "dino_cls": _npy(sample["dino_cls.npy"]),  # (D,)
        "dino_patches": _npy(sample["dino_patches.npy"]),  # (h/2 * w/2, D)
        "caption": sample["caption.txt"].decode("utf-8"),
    }


def bucket_batches(samples: Iterator[dict], batch_size: int, drop_last: bool = False) -> Iterator[list[dict]]:
    """Group a (shuffled) sample stream into single-bucket batches; a bucket's batch is emitted when it fills."""
    pending: dict[str, list[dict]] = {}
    for s in samples:
        lst = pending.setdefault(s["bucket"], [])
        lst.append(s)
        if len(lst) == batch_size:
            yield lst
            pending[s["bucket"]] = []
    if not drop_last:
        for lst in pending.values():
            if lst:
                yield lst


class Collate:
    """List of decoded samples of one bucket -> the contract's batch dict (normalises latents)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, dit_patch_size: int = 2):
        self.mean = mean.view(-1, 1, 1)
        self.std = std.view(-1, 1, 1)
        self.p = dit_patch_size

    def __call__(self, samples: list[dict]) -> dict:
        lat = torch.from_numpy(np.stack([s["latent"] for s in samples])).float()  # (B, C, h, w)
        if lat.shape[1] != self.mean.shape[0]:
            raise ValueError(f"latents have {lat.shape[1]} channels but latent_stats.json has {self.mean.shape[0]}")
        B, _, h, w = lat.shape
        T = samples[0]["t5_mask"].shape[0]
        D = samples[0]["t5"].shape[-1]
        t5 = torch.zeros(B, T, D)  # (B, T, D_t5)
        mask = torch.zeros(B, T, dtype=torch.bool)  # (B, T)
        for i, s in enumerate(samples):
            n = s["t5"].shape[0]
            t5[i, :n] = torch.from_numpy(s["t5"]).float()
            mask[i] = torch.from_numpy(s["t5_mask"].astype(bool))
            if int(mask[i].sum()) != n:
                raise ValueError(f"sample {s['key']}: t5 has {n} tokens but t5_mask marks {int(mask[i].sum())}")
        patches = torch.from_numpy(np.stack([s["dino_patches"] for s in samples])).float()  # (B, N, D_dino)
        if patches.shape[1] != (h // self.p) * (w // self.p):
            raise ValueError(f"bucket {samples[0]['bucket']}: {patches.shape[1]} DINO patches for a {h}x{w} latent "
                             f"at DiT patch {self.p} (expected {(h // self.p) * (w // self.p)})")
        return {
            "latent": (lat - self.mean) / self.std,
            "t5": t5,
            "t5_mask": mask,
            "dino_cls": torch.from_numpy(np.stack([s["dino_cls"] for s in samples])).float(),  # (B, D_dino)
            "dino_patches": patches,
            "caption": [s["caption"] for s in samples],
            "key": [s["key"] for s in samples],
        }


def make_dataset(shard_dir: str | Path, batch_size: int, *, shuffle: bool = True, shuffle_buffer: int = 1000,
                 seed: int | None = None, buckets: Iterable[str] | None = None, resampled: bool = False,
                 epoch_batches: int | None = None, drop_last: bool = False):
    """A webdataset pipeline yielding contract batches (an IterableDataset; batching happens inside it).

    Shuffling: shard order (per epoch) plus a sample buffer of `shuffle_buffer` before bucket grouping.
    """
    import webdataset as wds

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    index = load_index(shard_dir)
    urls = shard_urls(shard_dir, buckets)
    if not urls:
        raise FileNotFoundError(f"{shard_dir}: no non-empty shards" + (f" in buckets {list(buckets)}" if buckets
                                                                         else ""))
    mean, std = load_latent_stats(shard_dir)
    if seed is None:
        seed = random.randint(0, 2**31 - 1)
    if not resampled and wds.utils.pytorch_worker_info()[1] > 1:  # world size, from torchrun's env or the group
        warnings.warn("distributed run with resampled=False: ranks may see different numbers of batches and "
                      "DDP can hang at the end of an epoch; pass resampled=True, epoch_batches=N", stacklevel=2)
    ds = wds.WebDataset(
        urls, resampled=resampled, shardshuffle=(len(urls) if shuffle and not resampled else False),
        nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker, seed=seed,
        # detshuffle: a new shard order each epoch (seed + epoch); plain shuffle with a seed repeats one order.
        detshuffle=True,
        # Few shards over many ranks x workers leaves some workers without any: that is not an error.
        empty_check=False,
    )
    ds = ds.map(decode_sample)
    if shuffle and shuffle_buffer > 1:
        ds = ds.compose(wds.detshuffle(shuffle_buffer, min(100, shuffle_buffer), seed=seed))
    # partial, not a lambda: DataLoader workers started with 'spawn' must pickle the pipeline.
    ds = ds.compose(functools.partial(bucket_batches, batch_size=batch_size, drop_last=drop_last))
    ds = ds.map(Collate(mean, std, index.get("dit_patch_size", 2)))
    if epoch_batches is not None:
        ds = ds.with_epoch(epoch_batches)
    return ds


def make_loader(shard_dir: str | Path, batch_size: int, *, num_workers: int = 4, pin_memory: bool = False,
                **kwargs):
    """A `wds.WebLoader` (torch DataLoader) over `make_dataset`; workers each read their own shards.

    `epoch_batches` counts batches per rank: webdataset's with_epoch counts per worker, so each worker is given
    ceil(N / num_workers) and the loader is cut at exactly N. Workers are persistent so that each new epoch
    continues their shuffle seeds (seed + epoch) instead of repeating the first epoch's order.
    """
    import webdataset as wds

    n = kwargs.pop("epoch_batches", None)
    per_worker = None if n is None else -(-n // max(num_workers, 1))
    ds = make_dataset(shard_dir, batch_size, epoch_batches=per_worker, **kwargs)
    loader = wds.WebLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                           persistent_workers=num_workers > 0)
    return loader if n is None else loader.with_epoch(n)
