"""`refgen dit prepare SRC OUT`: images (+ captions) -> per-bucket WebDataset shards for DiT training.

DINOv3 geometry: patch 16, register tokens excluded, no centre crop. Steps: scan + bucket, plan shards, encode (VAE latents, T5 sequence, DINOv3 CLS and
patch grid), write shards, aggregate latent statistics. The shard format is documented in docs/dit_data.md.

Resumable and idempotent: the plan is deterministic (sorted keys, chunked per bucket); a shard counts as done
when its tar and its sidecar JSON exist (both written temp + rename, sidecar last), so a re-run skips done
shards and redoes at most the one that was interrupted. Latent statistics are summed per shard in the sidecars,
so they cover all shards whichever run wrote them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from refgen.artifacts import JsonlLogger, atomic_write_file, atomic_write_json, provenance
from refgen.dit.buckets import (Bucket, aspect_distortion, nearest_bucket, parse_buckets,
                                upscale_factor)
from refgen.dit.hub_ids import DEFAULT_DINO, DEFAULT_T5, DEFAULT_VAE
from refgen.images import image_size
from refgen.runtime import PolicyError, parse_dtype

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
STORE_DTYPES = {"fp16": np.float16, "fp32": np.float32}
FP16_MAX = 65504.0
FORMAT_NAME = "refgen-dit-shards"
FORMAT_VERSION = 1


# Fields that change what is written; a resumed run must agree on them with the first run.
_RUN_ONLY_FIELDS = {"src", "out", "device", "batch_size", "num_workers", "overwrite"}


@dataclass
class PrepareConfig:
    src: str
    out: str
    vae: str = DEFAULT_VAE
    vae_subfolder: str | None = "vae"
    text_encoder: str = DEFAULT_T5
    text_encoder_subfolder: str | None = None
    tokenizer: str | None = None  # None: the text encoder's folder
    tokenizer_subfolder: str | None = None
    dino: str = DEFAULT_DINO
    dino_subfolder: str | None = None
    buckets: list[str] | str | None = None  # ["WxH", ...] or "WxH,WxH"; None: the ~1 MP default set
    t5_max_length: int = 512
    shard_size: int = 1000
    batch_size: int = 8
    num_workers: int = 4  # image decode/resize threads (PIL releases the GIL)
    device: str = "cuda"
    dtype: str = "bf16"  # compute dtype of the encoders
    store_dtype: str = "fp16"  # npy has no bfloat16; see _to_store
    dit_patch_size: int = 2
    max_upscale: float = 2.0  # images that need more enlargement than this (per side) are "too small"
    max_aspect_distortion: float = 0.15  # beyond this stretch an image is skipped instead of squashed
    caption_keys: list[str] = field(default_factory=lambda: ["caption", "text", "prompt"])
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.buckets = [b.name for b in parse_buckets(self.buckets)]
        for name in ("t5_max_length", "shard_size", "batch_size", "dit_patch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype {self.store_dtype!r}: use one of {sorted(STORE_DTYPES)} "
                             f"(.npy has no bfloat16)")
        if parse_dtype(self.dtype) == torch.float16:
            raise PolicyError("dtype fp16 is refused: T5 v1.1 encoders overflow in fp16 (inf/NaN states). "
                              "Use bf16 (default) or fp32.")
        if self.max_upscale < 1.0:
            raise ValueError(f"max_upscale must be >= 1, got {self.max_upscale}")
        if self.max_aspect_distortion < 0:
            raise ValueError(f"max_aspect_distortion must be >= 0, got {self.max_aspect_distortion}")
        if not Path(self.src).is_dir():
            raise FileNotFoundError(f"source folder {self.src} does not exist")

    @property
    def bucket_list(self) -> list[Bucket]:
        return parse_buckets(self.buckets)


# ------------------------------------------------------------------------------------------------- scan

@dataclass
class SourceImage:
    key: str
    relpath: str
    orig_width: int
    orig_height: int
    bucket: str
    aspect_distortion: float
    upscale: float
    caption: str
    caption_source: str
    source_meta: dict | None = None


def make_key(relpath: str) -> str:
    # WebDataset splits a member name at the first dot of its basename, so keys carry no dots; the hash keeps
    # 'a b.jpg' and 'a_b.jpg' apart after sanitising.
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", relpath.rsplit(".", 1)[0]).strip("_")[:80]
    return f"{stem}-{hashlib.sha1(relpath.encode()).hexdigest()[:8]}"


_image_size = image_size  # (width, height) as displayed, under refgen's pixel limit


def _caption_for(path: Path, keys: list[str]) -> tuple[str, str, dict | None]:
    js, txt = path.with_suffix(".json"), path.with_suffix(".txt")
    if js.is_file():
        try:
            meta = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"caption file {js.name} is unreadable: {e}") from None
        if isinstance(meta, dict):
            for k in keys:
                if isinstance(meta.get(k), str):
                    return meta[k].strip(), f"json:{k}", meta
            if txt.is_file():
                return txt.read_text(encoding="utf-8").strip(), "txt", meta
            return "", "none", meta
        if isinstance(meta, str):
            return meta.strip(), "json", None
        raise ValueError(f"caption file {js.name}: expected an object or a string, got {type(meta).__name__}")
    if txt.is_file():
        try:
            return txt.read_text(encoding="utf-8").strip(), "txt", None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"caption file {txt.name} is unreadable: {e}") from None
    return "", "none", None


def scan(cfg: PrepareConfig) -> tuple[list[SourceImage], list[dict]]:
    """All images under SRC (sorted, recursive), bucketed; plus skip records {file, reason, stage}."""
    src = Path(cfg.src).resolve()
    out = Path(cfg.out).resolve()
    buckets = cfg.bucket_list
    images, skipped = [], []
    paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                   and out not in p.resolve().parents
                   and not any(part.startswith(".") for part in p.relative_to(src).parts))
    keys_seen: dict[str, str] = {}
    for p in paths:
        rel = p.relative_to(src).as_posix()
        try:
            w, h = _image_size(p)
        except Exception as e:  # PIL raises many types for broken files; each is a skip, not a crash
            skipped.append({"file": rel, "reason": f"unreadable image: {type(e).__name__}: {e}", "stage": "scan"})
            continue
        b = nearest_bucket(w, h, buckets)
        dist, up = aspect_distortion(w, h, b), upscale_factor(w, h, b)
        if up > cfg.max_upscale:
            skipped.append({"file": rel, "stage": "scan", "reason":
                            f"too small: {w}x{h} needs x{up:.2f} enlargement for bucket {b.name} "
                            f"(max_upscale {cfg.max_upscale})"})
            continue
        if dist > cfg.max_aspect_distortion:
            skipped.append({"file": rel, "stage": "scan", "reason":
                            f"aspect ratio {w / h:.3f} is {dist:.1%} off the nearest bucket {b.name} "
                            f"(max_aspect_distortion {cfg.max_aspect_distortion:.0%})"})
            continue
        try:
            caption, csrc, meta = _caption_for(p, cfg.caption_keys)
        except ValueError as e:
            skipped.append({"file": rel, "reason": str(e), "stage": "scan"})
            continue
        key = make_key(rel)
        if key in keys_seen:  # sha1 prefix collision: astronomically unlikely, but a silent overwrite is worse
            raise RuntimeError(f"key collision: {rel} and {keys_seen[key]} both map to {key}")
        keys_seen[key] = rel
        images.append(SourceImage(key, rel, w, h, b.name, round(dist, 5), round(up, 4), caption, csrc, meta))
    return images, skipped


# ------------------------------------------------------------------------------------------------- plan

def make_plan(images: list[SourceImage], shard_size: int) -> dict[str, list[list[SourceImage]]]:
    """bucket name -> shards -> samples, deterministic (sorted keys), so a re-run finds the same shards."""
    by_bucket: dict[str, list[SourceImage]] = {}
    for im in sorted(images, key=lambda x: x.key):
        by_bucket.setdefault(im.bucket, []).append(im)
    return {b: [lst[i:i + shard_size] for i in range(0, len(lst), shard_size)]
            for b, lst in sorted(by_bucket.items())}


def shard_relpath(bucket: str, index: int) -> str:
    return f"buckets/{bucket}/shard-{index:06d}.tar"


def _plan_json(plan) -> dict:
    return {b: [[im.key for im in shard] for shard in shards] for b, shards in plan.items()}


def _sidecar_path(tar: Path) -> Path:
    return tar.with_suffix(".json")


def shard_is_complete(tar: Path, keys: list[str]) -> bool:
    side = _sidecar_path(tar)
    if not (tar.is_file() and side.is_file()):
        return False
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    # The size check catches a tar replaced or truncated after its sidecar was written.
    return meta.get("planned_keys") == keys and meta.get("tar_bytes") == tar.stat().st_size


# ---------------------------------------------------------------------------------------------- writing

def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _to_store(a: np.ndarray, dtype, what: str, source: str) -> np.ndarray:
    # fp16 rather than bf16 because .npy has no bfloat16 and every stored tensor is bounded (VAE posterior mean,
    # outputs of T5's and DINOv3's final norms); refuse rather than store inf if that assumption breaks.
    if not np.all(np.isfinite(a)):
        raise FloatingPointError(f"{source}: {what} contains NaN/inf (encoder output); not writing it")
    if dtype == np.float16 and np.abs(a).max() > FP16_MAX:
        raise OverflowError(f"{source}: {what} exceeds the fp16 range (max |x| = {np.abs(a).max():.1f}); "
                            f"use --store-dtype fp32")
    return a.astype(dtype)


class _Stats:
    """Per-channel sums in float64 over every latent value written (exact to merge across shards and runs)."""

    def __init__(self, channels: int):
        self.n = 0
        self.s = np.zeros(channels, np.float64)
        self.ss = np.zeros(channels, np.float64)

    def add(self, lat: np.ndarray) -> None:  # (C, h, w)
        x = lat.astype(np.float64).reshape(lat.shape[0], -1)
        self.n += x.shape[1]
        self.s += x.sum(1)
        self.ss += (x * x).sum(1)

    def to_json(self) -> dict:
        return {"values_per_channel": self.n, "sum": self.s.tolist(), "sum_sq": self.ss.tolist()}


def _load_batch(records: list[SourceImage], src: Path, bucket: Bucket):
    from refgen.dit.encoders import resize_to_bucket
    from refgen.images import load_rgb

    out = []
    for r in records:
        try:
            out.append((r, resize_to_bucket(load_rgb(src / r.relpath), bucket.width, bucket.height), None))
        except Exception as e:  # truncated/corrupt data that the header check did not catch
            out.append((r, None, f"unreadable image: {type(e).__name__}: {e}"))
    return out


def _prefetched(pool: ThreadPoolExecutor | None, batches: list[list[SourceImage]], src: Path,
                bucket: Bucket) -> Iterator[list]:
    """Decode the next batch on the thread pool while the current one is being encoded."""
    if pool is None:
        for b in batches:
            yield _load_batch(b, src, bucket)
        return
    pending: list[Future] = []
    it = iter(batches)
    for b in it:
        pending.append(pool.submit(_load_batch, b, src, bucket))
        if len(pending) >= 2:
            break
    while pending:
        res = pending.pop(0).result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(_load_batch, nxt, src, bucket))
        yield res


def write_shard(tar: Path, records: list[SourceImage], enc, cfg: PrepareConfig, pool, progress) -> dict:
    """Encode `records` and write one shard (temp + rename), then its sidecar. Returns the sidecar."""
    import webdataset as wds

    from refgen.dit.encoders import dino_input, encode_dino, encode_latents, encode_text, to_uint8_tensor

    bucket = parse_buckets([records[0].bucket])[0]
    store = STORE_DTYPES[cfg.store_dtype]
    src = Path(cfg.src)
    stats = _Stats(enc.latent_channels)
    skipped, written = [], []
    t0 = time.time()

    def fill(f) -> None:
        # mtime 0: the same inputs give byte-identical shards.
        writer = wds.TarWriter(f, encoder=False, mtime=0.0)
        batches = [records[i:i + cfg.batch_size] for i in range(0, len(records), cfg.batch_size)]
        for loaded in _prefetched(pool, batches, src, bucket):
            ok = [(r, im) for r, im, err in loaded if err is None]
            for r, _, err in loaded:
                if err is not None:
                    skipped.append({"file": r.relpath, "reason": err, "stage": "encode"})
            progress.update(len(loaded) - len(ok))
            if not ok:
                continue
            pixels = to_uint8_tensor([im for _, im in ok])  # (B, 3, H, W) uint8
            lat = encode_latents(enc.vae, pixels).cpu().numpy()  # (B, C, H/8, W/8)
            cls, patches = encode_dino(enc.dino, dino_input(pixels, enc.dino_mean, enc.dino_std))
            cls, patches = cls.cpu().numpy(), patches.cpu().numpy()  # (B, D), (B, H/16 * W/16, D)
            t5, _ = encode_text(enc.tokenizer, enc.text_encoder, [r.caption for r, _ in ok],
                                cfg.t5_max_length)  # B x (n_i, D_t5)
            gh, gw = lat.shape[2] // cfg.dit_patch_size, lat.shape[3] // cfg.dit_patch_size
            if patches.shape[1] != gh * gw:
                raise RuntimeError(f"bucket {bucket.name}: {patches.shape[1]} DINO patches but the latent grid "
                                   f"{lat.shape[2:]} at DiT patch {cfg.dit_patch_size} has {gh * gw} tokens")
            for i, (r, _) in enumerate(ok):
                latent = _to_store(lat[i], store, "latent", r.relpath)
                stats.add(latent)
                mask = np.zeros(cfg.t5_max_length, dtype=bool)
                mask[: len(t5[i])] = True
                meta = {"key": r.key, "source": r.relpath, "bucket": bucket.name,
                        "width": bucket.width, "height": bucket.height,
                        "orig_width": r.orig_width, "orig_height": r.orig_height,
                        "aspect_distortion": r.aspect_distortion, "upscale": r.upscale,
                        "caption_source": r.caption_source, "t5_tokens": int(len(t5[i])),
                        "latent_shape": list(latent.shape), "dino_grid": [gh, gw]}
                if r.source_meta is not None:
                    meta["source_meta"] = r.source_meta
                writer.write({
                    "__key__": r.key,
                    "latent.npy": _npy_bytes(latent),
                    "t5.npy": _npy_bytes(_to_store(t5[i], store, "t5", r.relpath)),
                    "t5_mask.npy": _npy_bytes(mask),
                    "dino_cls.npy": _npy_bytes(_to_store(cls[i], store, "dino_cls", r.relpath)),
                    "dino_patches.npy": _npy_bytes(_to_store(patches[i], store, "dino_patches", r.relpath)),
                    "caption.txt": r.caption.encode("utf-8"),
                    "meta.json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                })
                written.append(r.key)
            progress.update(len(ok))
        writer.close()

    atomic_write_file(tar, fill)
    secs = time.time() - t0
    sidecar = {"planned_keys": [r.key for r in records], "keys": written, "count": len(written),
               "skipped": skipped, "bucket": bucket.name, "tar_bytes": tar.stat().st_size,
               "latent_stats": stats.to_json(), "seconds": round(secs, 3)}
    atomic_write_json(_sidecar_path(tar), sidecar)
    return sidecar


# ----------------------------------------------------------------------------------------------- driver

def _check_resume(out: Path, cfg: PrepareConfig, plan_keys: dict) -> None:
    cfg_file, plan_file = out / "config.json", out / "plan.json"
    if cfg_file.is_file():
        old = json.loads(cfg_file.read_text()).get("config", {})
        new = dataclasses.asdict(cfg)
        diff = [k for k in new if k not in _RUN_ONLY_FIELDS and old.get(k) != new[k]]
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diff)
            raise ValueError(f"{cfg_file}: OUT was prepared with different settings ({changes}); "
                               f"use a new OUT or --overwrite")
    if plan_file.is_file():
        old_plan = json.loads(plan_file.read_text())["shards"]
        if old_plan != plan_keys:
            raise ValueError(f"{plan_file}: the images under {cfg.src} changed since OUT was planned (shard "
                               f"membership differs); use a new OUT or --overwrite")


def _clear(out: Path) -> None:
    """--overwrite: remove only what prepare writes, never anything else the user put into OUT."""
    shutil.rmtree(out / "buckets", ignore_errors=True)
    for name in ("config.json", "plan.json", "latent_stats.json", "index.json", "encoders.json",
                 "skipped.json", "report.jsonl"):
        (out / name).unlink(missing_ok=True)


def _load_encoders(cfg: PrepareConfig):
    from refgen.dit.encoders import (Encoders, dino_patch_size, load_dino, load_text_encoder, load_vae,
                                     vae_downsample)
    from refgen.runtime import resolve_device

    device = resolve_device(cfg.device)
    dtype = parse_dtype(cfg.dtype)
    vae = load_vae(cfg.vae, cfg.vae_subfolder, device, dtype)
    tok, t5 = load_text_encoder(cfg.text_encoder, cfg.text_encoder_subfolder, cfg.tokenizer,
                                cfg.tokenizer_subfolder, device, dtype)
    dino, (mean, std) = load_dino(cfg.dino, cfg.dino_subfolder, device, dtype)
    f, ps = vae_downsample(vae), dino_patch_size(dino)
    if f * cfg.dit_patch_size != ps:
        fix = f" (--dit-patch-size {ps // f} would)" if ps % f == 0 else ""
        raise ValueError(f"VAE /{f} x DiT patch {cfg.dit_patch_size} = {f * cfg.dit_patch_size} px per DiT token, "
                         f"but DINOv3 ({cfg.dino}) has {ps} px patches: the grids would not align{fix}")
    for b in cfg.bucket_list:
        if b.width % ps or b.height % ps:
            raise ValueError(f"bucket {b.name}: sides must be multiples of the DINOv3 patch size {ps}")
    return Encoders(vae, tok, t5, dino, mean, std, device)


def finalize(out: Path, cfg: PrepareConfig, plan, encoders_info: dict, scan_skipped: list[dict]) -> dict:
    """Merge sidecars into latent_stats.json, index.json and skipped.json."""
    C = encoders_info["vae"]["latent_channels"]
    n, s, ss = 0, np.zeros(C), np.zeros(C)
    buckets, skipped, total = {}, list(scan_skipped), 0
    for bname, shards in plan.items():
        b = parse_buckets([bname])[0]
        entries = []
        for i in range(len(shards)):
            rel = shard_relpath(bname, i)
            side = json.loads(_sidecar_path(out / rel).read_text())
            ls = side["latent_stats"]
            n += ls["values_per_channel"]
            s += np.asarray(ls["sum"])
            ss += np.asarray(ls["sum_sq"])
            skipped += side["skipped"]
            if side["count"]:
                entries.append({"path": rel, "count": side["count"]})
            total += side["count"]
        f = encoders_info["vae"]["downsample"]
        lh, lw = b.height // f, b.width // f
        buckets[bname] = {"width": b.width, "height": b.height, "latent_hw": [lh, lw],
                          "dino_grid": [lh // cfg.dit_patch_size, lw // cfg.dit_patch_size],
                          "count": sum(e["count"] for e in entries), "shards": entries}
    if n == 0:
        raise ValueError(f"no image under {cfg.src} could be used; see {out / 'skipped.json'}")
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean ** 2, 0.0))
    if np.any(std < 1e-6):
        raise ValueError(f"latent channel(s) {np.nonzero(std < 1e-6)[0].tolist()} have zero variance over the "
                           f"dataset; normalising would divide by zero")
    atomic_write_json(out / "latent_stats.json", {
        "mean": mean.tolist(), "std": std.tolist(), "values_per_channel": int(n), "samples": total,
        "normalise": "latent_norm = (latent - mean[c]) / std[c]; decode: vae.decode(latent_norm * std + mean) "
                     "(raw posterior mean: the VAE's scaling_factor/shift_factor are NOT applied)",
        "vae": encoders_info["vae"], **provenance(None)})
    atomic_write_json(out / "skipped.json", skipped)
    index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "samples": total, "skipped": len(skipped),
             "store_dtype": cfg.store_dtype, "t5_max_length": cfg.t5_max_length,
             "t5_dim": encoders_info["text_encoder"]["d_model"], "dino_dim": encoders_info["dino"]["hidden_size"],
             "latent_channels": C, "dit_patch_size": cfg.dit_patch_size, "buckets": buckets}
    atomic_write_json(out / "index.json", index)
    return index


def prepare(cfg: PrepareConfig, *, progress: bool = True) -> dict:
    """Run the whole pipeline; returns index.json's content. Idempotent: a finished OUT costs only a scan."""
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    if cfg.overwrite:
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    report = JsonlLogger(out / "report.jsonl")
    images, scan_skipped = scan(cfg)
    plan = make_plan(images, cfg.shard_size)
    plan_keys = _plan_json(plan)
    _check_resume(out, cfg, plan_keys)
    atomic_write_json(out / "config.json", provenance(cfg))
    atomic_write_json(out / "plan.json", {"shards": plan_keys, "samples": {
        im.key: {"source": im.relpath, "bucket": im.bucket} for im in images}})
    for sk in scan_skipped:
        report.log(event="skip", **sk)

    todo = [(out / shard_relpath(b, i), shard) for b, shards in plan.items() for i, shard in enumerate(shards)
            if not shard_is_complete(out / shard_relpath(b, i), [im.key for im in shard])]
    n_total = len(images)
    n_todo = sum(len(s) for _, s in todo)
    report.log(event="start", images=n_total + len(scan_skipped), planned=n_total, skipped_scan=len(scan_skipped),
               shards=sum(len(s) for s in plan.values()), shards_todo=len(todo), samples_todo=n_todo)

    enc_file = out / "encoders.json"
    if todo or not enc_file.is_file():
        if not images:
            raise ValueError(f"no usable image under {cfg.src} ({len(scan_skipped)} skipped; see "
                               f"{out / 'report.jsonl'})")
        enc = _load_encoders(cfg)
        info = enc.describe()
        # where the VAE came from, so `refgen dit sample` can decode with it without being told
        from refgen.dit.encoders import resolve_source

        vsrc, vsub = resolve_source(cfg.vae, cfg.vae_subfolder, "VAE")
        info["vae"]["source"] = str(Path(vsrc).resolve()) if Path(vsrc).is_dir() else vsrc
        info["vae"]["subfolder"] = vsub
        atomic_write_json(enc_file, info)
        bar = tqdm(total=n_total, initial=n_total - n_todo, unit="img", desc="prepare", disable=not progress)
        pool = ThreadPoolExecutor(cfg.num_workers) if cfg.num_workers > 0 else None
        try:
            for tar, shard in todo:
                side = write_shard(tar, shard, enc, cfg, pool, bar)
                for sk in side["skipped"]:
                    report.log(event="skip", **sk)
                report.log(event="shard", path=str(tar.relative_to(out)), count=side["count"],
                           seconds=side["seconds"],
                           samples_per_s=round(side["count"] / max(side["seconds"], 1e-9), 2))
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown()
    else:
        info = json.loads(enc_file.read_text())
    index = finalize(out, cfg, plan, info, scan_skipped)
    report.log(event="done", samples=index["samples"], skipped=index["skipped"])
    return index
