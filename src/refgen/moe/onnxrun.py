"""Running an exported model with ONNX Runtime: one session per model file, pinned threads, images in the layout the
export fixed (uint8 [N, H, W, C] -> float32 [N, C, H, W] in [0, 1]; the per-channel normalisation is inside the
graph), outputs 'logits' and 'gate_probs'.

No torch here: the serving image runs on onnxruntime + numpy only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [0, 1], the exported graph's input."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)


def session(path: str | Path, threads: int = 1):
    """An ORT CPU session with THREADS intra-op threads and one inter-op thread (on the 2-core machines more
    threads than cores makes batch-1 calls an order of magnitude slower: spec §3, latency)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def run(sess, x: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(logits, gate_probs) for float32 inputs X [N, C, H, W], in chunks of BATCH (the export's dynamic range is
    1..max_batch)."""
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    if not outs:
        raise ValueError("no inputs")
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def topk_sets(gate_probs: np.ndarray, k: int) -> np.ndarray:
    """[N, k] sorted expert ids of each input's top-k team (a set: order within the team does not matter)."""
    return np.sort(np.argsort(-gate_probs, axis=1, kind="stable")[:, :k], axis=1)


def topk_agreement(probs_a: np.ndarray, probs_b: np.ndarray, k: int) -> float:
    """Share of inputs whose top-k expert set is the same under two gates."""
    return float((topk_sets(probs_a, k) == topk_sets(probs_b, k)).all(axis=1).mean())
