"""Tables of rows kept on disk (memory-mapped safetensors) and gathered to a device a few rows at a time.

Why. The end-to-end head trainer reads, per step, the features and latents of a few dozen photos out of
hundreds of thousands. Holding every photo on every rank's GPU does not scale; reading the rows a step draws from
memory-mapped files does, and ranks on one host share the mapped pages through the OS page cache.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

# safetensors dtype name -> (numpy dtype the bytes are mapped as, torch dtype they are viewed as)
_DTYPES = {"F64": (np.float64, torch.float64), "F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
           "BF16": (np.int16, torch.bfloat16), "I64": (np.int64, torch.int64), "I32": (np.int32, torch.int32),
           "I16": (np.int16, torch.int16), "I8": (np.int8, torch.int8), "U8": (np.uint8, torch.uint8),
           "BOOL": (np.bool_, torch.bool)}


def map_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({name: CPU tensor backed by the file's pages}, metadata) of a safetensors file, without reading it: only
    the rows that are indexed later are read from disk. Copy-on-write mapping: the tensors are writable in
    memory (torch wants that) and the file is never changed."""
    path = Path(path)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None) or {}
    out = {}
    for name, h in header.items():
        if h["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {h['dtype']}, which cannot be memory-mapped here")
        np_dt, torch_dt = _DTYPES[h["dtype"]]
        start, end = h["data_offsets"]
        shape = tuple(h["shape"])
        if end == start:
            out[name] = torch.zeros(shape, dtype=torch_dt)
            continue
        arr = np.memmap(path, dtype=np_dt, mode="c", offset=8 + n + start, shape=shape)
        t = torch.from_numpy(arr)
        out[name] = t.view(torch_dt) if torch_dt == torch.bfloat16 else t
    return out, meta


class Rows:
    """Rows 0..N-1 of a table split into parts (each a CPU tensor (n_i, ...), memory-mapped or in memory) whose
    second axis may differ in length (tokens of photos, positions of prompts): indexing gathers only the rows
    asked for, zero-pads that axis to the longest part's, casts to `dtype` and moves them to `device`, so
    `rows[idx]` is what `tensor[idx]` gives for the whole table on that device (`materialise`)."""

    def __init__(self, parts: list[torch.Tensor], device: torch.device | str, dtype: torch.dtype | None = None):
        if not parts:
            raise ValueError("Rows needs at least one part")
        tails = {tuple(p.shape[2:]) for p in parts}
        if len(tails) != 1 or len({p.ndim for p in parts}) != 1:
            raise ValueError(f"parts differ in more than their second axis: {[tuple(p.shape) for p in parts]}")
        self.parts = parts
        self.device = torch.device(device)
        self.dtype = dtype or parts[0].dtype
        sizes = torch.tensor([p.shape[0] for p in parts])
        self.starts = torch.cumsum(sizes, 0) - sizes
        row = list(parts[0].shape[1:])
        if row:
            row[0] = max(p.shape[1] for p in parts)
        self.shape = torch.Size([int(sizes.sum()), *row])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long)
        flat = idx.reshape(-1).cpu()
        if len(flat) and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise IndexError(f"row index out of range 0..{self.shape[0] - 1}")
        out = torch.zeros((len(flat), *self.shape[1:]), dtype=self.dtype)
        part = torch.searchsorted(self.starts, flat, right=True) - 1
        for p in part.unique().tolist():
            sel = (part == p).nonzero().squeeze(1)
            rows = self.parts[p][flat[sel] - self.starts[p]].to(self.dtype)
            if rows.ndim > 1:
                out[sel, :rows.shape[1]] = rows
            else:
                out[sel] = rows
        return out.reshape(*idx.shape, *self.shape[1:]).to(self.device)

    def materialise(self) -> torch.Tensor:
        """The whole table as one tensor on the device (the in-memory path, for sets that fit)."""
        return self[torch.arange(self.shape[0])]

    def extend(self, rows: torch.Tensor) -> "Rows":
        """These rows followed by `rows` (kept in memory)."""
        return Rows([*self.parts, rows.cpu()], self.device, self.dtype)
