"""The end-to-end head trainer's data cache: every photo's Qwen3-VL tokens and mean, its VAE latent and its prompt
row, computed once (all three models are frozen) and written to safetensors shards that every rank reads.

Why on disk. 20,000 people of ~5 photos are ~100,000 photos: their tokens alone are hundreds of GB at full size,
far more than a rank's GPU. Written once (by rank 0 under torchrun, while the others wait), a cache is read
memory-mapped (`refgen.identity.rows`): a step gathers the few dozen rows it draws, and ranks on one host share
the mapped pages. A re-run, a resumed run or another run with the same key reuses it.

Layout of a cache folder:
    key.json                 what the cache is made from: the identities (a folder root's listing, or a toy-world
                             id range), every feature setting, the Qwen-Image components, the target size
    photos_<k>.safetensors   identities [k*S, (k+1)*S): per photo its tokens (n, T_k, D) in the tower's dtype (the
                             float32 the tower returns is exactly that dtype's values), token mask, mean (n, D)
                             float32, VAE latent (n, C, h, w); per identity its photo count; the photos' prompts
                             in the metadata
    prompts_<k>.safetensors  encoded prompt rows (q, S_k, H) as written (no identity), mask, ~ID~ window starts
    manifest.json            written last: its presence means the cache is complete
Every file is written atomically; a killed build resumes at the first missing shard.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from refgen.artifacts import atomic_save_safetensors, atomic_write_json, provenance
from refgen.config import flatten

FORMAT = "refgen-e2e-cache-1"
SHARD_IDENTITIES = 256   # identities per photo shard: a shard is the unit a killed build redoes
# Photos go to the frozen models in batches that span people: with small models every call is launch-bound, so
# one call per person (~4 photos) left the GPU mostly idle. The bounds keep memory flat whatever the photos.
TOWER_PATCHES = 65_536   # patches per vision-tower call, whole reference sets (~8 people at the 2 MP budget)
VAE_BATCH = 64           # photos per VAE encode call on an accelerator,
VAE_PIXELS = 2**23       # and at most this many pixels (8 photos at 1024 px: ~1.6x a person's 5 photos)
VAE_BATCH_CPU = 8        # on the CPU a call costs no launch, and a large batch's activations leave the cache
                         # (toy VAE, 64 px: 64 photos per call were ~1.6x slower per photo than 4-16)
BANK_ROWS = 1024         # prompts encoded per text-encoder call and per prompt shard
POLL_S = 2.0             # how often ranks other than 0 look for the finished cache


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def read_prompts(folder: Path, images: list[Path], default: str) -> list[str]:
    """Each photo's own sentence with one ~ID~ (folder/prompts.json, else `default`)."""
    f = folder / "prompts.json"
    table = json.loads(f.read_text()) if f.is_file() else {}
    out = []
    for p in images:
        text = table.get(p.name, default)
        if text.count("~ID~") != 1:
            raise ValueError(f"{f}: the prompt of {p.name} must contain exactly one ~ID~: {text!r}")
        out.append(text)
    return out


# ---- where the identities come from ----------------------------------------------------------------------------


class FolderSource:
    """seed_<id>/ folders under a root (>= 2 photos each), in name order."""

    def __init__(self, root: str | Path, default_prompt: str):
        from refgen.images import no_identities_message, scan

        self.root = Path(root)
        res = scan(self.root)
        self.idents = sorted(res.identities, key=lambda i: i.id)
        if not self.idents:
            raise ValueError(no_identities_message(res, self.root))
        self.ids = [i.id for i in self.idents]
        self.default_prompt = default_prompt

    def key(self) -> dict:
        # names, sizes and mtimes of every photo and prompts.json: a photo replaced or added changes the key
        listing = []
        for ident in self.idents:
            files = [*ident.images, ident.path / "prompts.json"]
            listing.append([ident.id, [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]])
        return {"kind": "folders", "root": str(self.root.resolve()), "n": len(self.ids), "listing_sha256": _sha(listing),
                "default_prompt": self.default_prompt}

    def person(self, j: int) -> tuple[list, list[str]]:
        from refgen.images import load_rgb

        ident = self.idents[j]
        return [load_rgb(p) for p in ident.images], read_prompts(ident.path, ident.images, self.default_prompt)


class ToySource:
    """Toy-world identities first_id .. first_id + n - 1, rendered on the fly: the photos and prompts
    `make_identities` would write to seed_<id>/ (`identity_record`), in the order a folder scan reads them."""

    def __init__(self, first_id: int, n: int, size: int = 64):
        from refgen.toyworld.identities import IdentitySetConfig

        if n < 1 or first_id < 0:
            raise ValueError(f"toy-world identities need n >= 1 and first id >= 0, got n={n}, first id={first_id}")
        self.first_id, self.n = first_id, n
        self.photo_cfg = IdentitySetConfig(n=1, seed=first_id, size=size)
        self.ids = [f"seed_{first_id + j}" for j in range(n)]

    def key(self) -> dict:
        from refgen.toyworld import identities, world

        # the world's code draws the photos: a change there changes what the same ids look like
        code = hashlib.sha256(Path(world.__file__).read_bytes() + Path(identities.__file__).read_bytes()).hexdigest()
        photo = {k: v for k, v in asdict(self.photo_cfg).items() if k not in ("n", "seed")}
        return {"kind": "toyworld", "first_id": self.first_id, "n": self.n, **photo, "code_sha256": code}

    def person(self, j: int) -> tuple[list, list[str]]:
        from refgen.toyworld.identities import identity_record

        rec, images = identity_record(self.first_id + j, self.photo_cfg)
        order = sorted(range(len(images)), key=lambda i: rec["images"][i]["file"])  # as `image_files` sorts
        return [images[i] for i in order], [rec["images"][i]["prompt"] for i in order]


@dataclass
class LazyTower:
    """The Qwen3-VL vision tower the features come from, loaded only when a cache has to be built: with a finished
    cache no rank spends the tower's memory (16 GB for the 8B model)."""
    model_id: str
    device: str
    dtype: torch.dtype
    cfg: object  # FeatureConfig

    def load(self):
        from refgen.identity.features import VisionFeatures

        return VisionFeatures(self.model_id, self.device, {torch.bfloat16: "bf16", torch.float32: "fp32"}[self.dtype],
                              self.cfg)


# ---- the key -----------------------------------------------------------------------------------------------------


def _config_sha(cfg: dict) -> str:
    return _sha({k: v for k, v in cfg.items() if not k.startswith("_") and k != "transformers_version"})


def pipeline_identity(pipe, model_id: str) -> dict:
    """What of the Qwen-Image pipeline decides the cache: the VAE (latents) and the text encoder + tokenizer (the
    prompt rows), by their configs, dtypes and vocabulary."""
    from refgen.identity.inject import tokenizer_fingerprint

    p = Path(str(model_id)).expanduser()
    return {"model": str(p.resolve()) if p.exists() else str(model_id),
            "vae_config_sha256": _config_sha(dict(pipe.vae.config)), "vae_dtype": str(pipe.vae.dtype),
            "text_encoder_config_sha256": _config_sha(pipe.text_encoder.config.to_dict()),
            "text_encoder_dtype": str(pipe.text_encoder.dtype),
            "tokenizer_fingerprint": tokenizer_fingerprint(pipe.tokenizer)}


def cache_key(source, pipe, model_id: str, features: dict, height: int, width: int, slot_repeat: int = 1) -> dict:
    # slot_repeat widens every ~ID~ of the prompt rows (identity/slots.py); 1 is left out so earlier caches still fit
    return {"format": FORMAT, "identities": source.key(), "features": features, "qwen_image": pipeline_identity(
        pipe, model_id), "height": height, "width": width, **({"slot_repeat": slot_repeat} if slot_repeat != 1 else {})}


def check_key(folder: Path, key: dict) -> None:
    """ValueError naming every setting that differs, when `folder` holds a cache made from another key."""
    f = folder / "key.json"
    if not f.is_file():
        return
    was, now = flatten(json.loads(f.read_text())), flatten(json.loads(json.dumps(key, default=str)))
    diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    if diff:
        raise ValueError(f"the e2e cache {folder} was made with other settings ({', '.join(diff)}): use another "
                         "cache_dir (--cache-dir), or delete that folder to rebuild it")


def is_complete(folder: Path, key: dict) -> bool:
    m = folder / "manifest.json"
    return m.is_file() and json.loads(m.read_text()).get("key_sha256") == _sha(key)


# ---- building (rank 0) ---------------------------------------------------------------------------------------------


def _finished(path: Path, **want: str) -> dict | None:
    """The metadata of a shard an earlier build finished with these values (key digest, contents), else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except Exception:  # a foreign or damaged file: rebuilt (writes are atomic, so not a half-written one)
        return None
    return md if all(md.get(k) == v for k, v in want.items()) else None


def _photo_shard(source, people: range, fx, vae, dev, height: int, width: int, bar) -> tuple[dict, list, list]:
    """The photo arrays of one shard (tokens, mask, means, latents, counts), its prompts and photo counts.

    Each person's photos are sized by `VisionFeatures.prepare`, max_images at a time, as `per_image` sizes a
    reference set (together, never with another person's photos), and resized for the VAE; then the tower takes
    several people's prepared sets per call (`VisionFeatures.tower`) and the VAE a batch of photos per call, both
    in photo order, so rows come out in the order they are written. Only prepared patches and VAE-sized photos
    wait for a batch, never the originals (a shard of full-size photos would not fit in memory).
    The VAE's latents differ from a per-person encode in float rounding only (a conv kernel may depend on the
    batch size; so does a per-person encode, on the person's photo count)."""
    from refgen.identity.features import pad_tokens
    from refgen.identity.qwen_flow import encode_qwen_latents
    from refgen.images import center_crop_resize

    per, lat, prompts, cnt = [], [], [], []
    sets, patches, for_vae = [], 0, []

    def run_tower():
        nonlocal sets, patches
        out = [e for s in fx.tower(sets) for e in s]
        per.extend(torch.cat(out).cpu().split([len(e) for e in out]))  # one device-to-host copy, not one a photo
        sets, patches = [], 0

    cap = VAE_BATCH_CPU if torch.device(dev).type == "cpu" else VAE_BATCH
    vae_batch = max(1, min(cap, VAE_PIXELS // (height * width)))

    def run_vae(n: int):
        # kept on the device until the shard is written: no copy waits for the encode, so the GPU encodes while
        # this loop renders and prepares the next people (a shard's latents are a few hundred MB at most)
        lat.append(encode_qwen_latents(vae, for_vae[:n], batch=n, device=dev))
        del for_vae[:n]

    m = fx.cfg.max_images
    for j in people:
        ims, ps = source.person(j)
        if not ims or len(ims) != len(ps):
            raise ValueError(f"{source.ids[j]}: {len(ims)} photos but {len(ps)} prompts")
        for c in range(0, len(ims), m):
            inp = fx.prepare(ims[c:c + m])
            if sets and patches + len(inp["pixel_values"]) > TOWER_PATCHES:
                run_tower()
            sets.append(inp)
            patches += len(inp["pixel_values"])
        for_vae += [center_crop_resize(im, width, height) for im in ims]
        while len(for_vae) >= vae_batch:
            run_vae(vae_batch)
        prompts += ps
        cnt.append(len(ims))
        bar.update(1)
    if sets:
        run_tower()
    if for_vae:
        run_vae(len(for_vae))
    tok, mask = pad_tokens(per)
    return ({"tokens": tok.to(fx.dtype), "tok_mask": mask, "means": torch.stack([e.mean(0) for e in per]),
             "latents": torch.cat(lat).cpu(), "counts": torch.tensor(cnt)}, prompts, cnt)


def build_cache(folder: str | Path, source, key: dict, pipe, load_tower, height: int, width: int,
                progress: bool = True, shard_identities: int = SHARD_IDENTITIES) -> dict:
    """Write the cache of `source` under `folder` (finished shards of an interrupted build are kept); returns the
    manifest. `load_tower()` gives the VisionFeatures, called only if a photo shard is missing."""
    from tqdm.auto import tqdm

    from refgen.identity.prompts import encode_prompts
    from refgen.identity.render import execution_device

    folder = Path(folder)
    check_key(folder, key)
    if is_complete(folder, key):
        return json.loads((folder / "manifest.json").read_text())
    t0 = time.time()
    digest = _sha(key)
    atomic_write_json(folder / "key.json", key)
    dev = execution_device(pipe)
    fx = None
    n = len(source.ids)
    shards, texts, counts, computed = [], [], [], 0
    bar = tqdm(total=n, desc="e2e cache: photos", disable=not progress)
    for k, lo in enumerate(range(0, n, shard_identities)):
        ids = source.ids[lo:lo + shard_identities]
        path = folder / f"photos_{k:05d}.safetensors"
        md = _finished(path, key_sha256=digest, ids=json.dumps(ids))
        if md is None:
            fx = fx or load_tower()
            arrays, prompts, cnt = _photo_shard(source, range(lo, lo + len(ids)), fx, pipe.vae, dev, height, width,
                                                bar)
            md = {"key_sha256": digest, "ids": json.dumps(ids), "prompts": json.dumps(prompts)}
            atomic_save_safetensors(arrays, path, md)
            computed += len(ids)
        else:
            bar.update(len(ids))
            cnt = None
        prompts = json.loads(md["prompts"])
        texts += prompts
        if cnt is None:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                cnt = f.get_tensor("counts").tolist()
        counts += cnt
        shards.append({"file": path.name, "photos": len(prompts)})
    bar.close()
    uniq = sorted(set(texts))
    row_of = {t: r for r, t in enumerate(uniq)}
    bank, L, H = [], set(), None
    for c, lo in enumerate(tqdm(range(0, len(uniq), BANK_ROWS), desc="e2e cache: prompts", disable=not progress)):
        rows = uniq[lo:lo + BANK_ROWS]
        path = folder / f"prompts_{c:05d}.safetensors"
        md = _finished(path, key_sha256=digest, prompts_sha256=_sha(rows))
        if md is not None:  # encoded by an interrupted build
            L.add(int(md["L"]))
            H = int(md["H"])
            bank.append({"file": path.name, "rows": len(rows)})
            continue
        enc = encode_prompts(pipe, rows, repeat=key.get("slot_repeat", 1))
        L_c = {sl.length for slots in enc.slots for sl in slots}
        L |= L_c
        H = enc.embeds.shape[2]
        starts = torch.full((len(rows), 2), -1, dtype=torch.long)
        for r, slots in enumerate(enc.slots):
            for s, sl in enumerate(slots[:2]):
                starts[r, s] = sl.start
        atomic_save_safetensors({"embeds": enc.embeds.cpu(), "mask": enc.mask.cpu(), "starts": starts}, path,
                                {"key_sha256": digest, "prompts_sha256": _sha(rows), "L": str(max(L_c)), "H": str(H)})
        bank.append({"file": path.name, "rows": len(rows)})
    if len(L) != 1:
        raise ValueError(f"~ID~ has windows of different lengths {sorted(L)} in these prompts: a residual has one "
                         "length L")
    man = provenance(key=key, key_sha256=digest, ids=source.ids, counts=counts, shards=shards, bank=bank,
                     prompts=uniq, photo_rows=[row_of[t] for t in texts], L=L.pop(), H=H,
                     build_s=time.time() - t0, identities_computed=computed)
    atomic_write_json(folder / "manifest.json", man)
    return man


def ensure_cache(folder: str | Path, source, key: dict, pipe, load_tower, height: int, width: int, rank: int = 0,
                 world: int = 1, progress: bool = True) -> dict:
    """The finished cache's manifest on every rank. Rank 0 builds (or reuses) it; the others wait for its
    manifest on the file system (a build of many identities outlasts a collective's timeout), then every rank
    joins one barrier. The folder must be one that every rank sees. If rank 0 fails (a refused key, a bad photo),
    torchrun stops the waiting ranks; a waiting rank that finds a cache of another key raises by itself."""
    folder = Path(folder)
    if rank == 0:
        build_cache(folder, source, key, pipe, load_tower, height, width, progress)
    else:
        while not is_complete(folder, key):
            check_key(folder, key)  # the cache there has another key: rank 0 refuses it too
            time.sleep(POLL_S)
    if world > 1:
        torch.distributed.barrier()
    return json.loads((folder / "manifest.json").read_text())


# ---- reading (every rank) ----------------------------------------------------------------------------------------


@dataclass
class CacheTables:
    """A finished cache as the trainer reads it: row tables (`Rows`, memory-mapped) and the small index tensors."""
    ids: list[str]
    photos: list[torch.Tensor]   # per identity its photo numbers
    photo_row: torch.Tensor      # (P,) each photo's prompt row
    prompts: list[str]           # the prompt of each row
    tokens: object               # Rows (P, T, D) float32
    tok_mask: object             # Rows (P, T) bool
    means: object                # Rows (P, D) float32
    latents: object              # Rows (P, C, h, w)
    bank: object                 # Rows (Q, S, H)
    bank_mask: object            # Rows (Q, S) int64
    bank_starts: torch.Tensor    # (Q, 2)
    L: int
    H: int


def open_cache(folder: str | Path, manifest: dict, device) -> CacheTables:
    from refgen.identity.rows import Rows, map_safetensors

    folder = Path(folder)
    shards = [map_safetensors(folder / s["file"])[0] for s in manifest["shards"]]
    bank = [map_safetensors(folder / b["file"])[0] for b in manifest["bank"]]
    counts = manifest["counts"]
    ends = torch.cumsum(torch.tensor(counts), 0).tolist()
    photos = [torch.arange(e - c, e) for c, e in zip(counts, ends)]

    def rows(tables, name, dtype=None):
        return Rows([t[name] for t in tables], device, dtype)

    return CacheTables(list(manifest["ids"]), photos, torch.tensor(manifest["photo_rows"]).to(device),
                       list(manifest["prompts"]), rows(shards, "tokens", torch.float32), rows(shards, "tok_mask"),
                       rows(shards, "means"), rows(shards, "latents"), rows(bank, "embeds"), rows(bank, "mask"),
                       torch.cat([b["starts"] for b in bank]).to(device), int(manifest["L"]), int(manifest["H"]))
