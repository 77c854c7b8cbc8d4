"""`refgen moe serve`: the exported model behind FastAPI + ONNX Runtime.

    POST /predict   multipart/form-data with one image file (field 'file'); JSON out: class, label, probabilities,
                    the gate's top-k experts, the model version
    GET  /health    JSON: status, model version and SHA-256, uptime, queue depth
    GET  /metrics   Prometheus: latency histogram, in-flight gauge, requests and errors by code, batch sizes,
                    batches by close reason, reloads by result

Errors are JSON {"error": {"status": code, "message": ...}}: 413 payload over max_bytes, 415 not multipart or not
an image part, 422 missing / undecodable / wrong-size image, 429 over the token bucket (per X-API-Key header, else
per client address; Retry-After set).

Micro-batching: requests queue for one worker, which closes a batch at max_batch requests or max_wait_ms after
the first one arrived, and does not wait at all when no other request is in flight (an idle server answers a
lone request at once). Inference runs in a thread, so the event loop keeps accepting.

Integrity: the export folder's manifest is verified (every file's size and SHA-256) before the first request; a
mismatch refuses to start (exit 1). SIGHUP re-verifies the folder and swaps the model in; a folder that fails the
check leaves the running model in place (counted in moe_reloads_total{result="rejected"}).

No torch here: the CPU image runs onnxruntime + numpy + Pillow.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import Request  # at module level: the route's annotation is resolved from these globals

from refgen.moe import manifest as mf
from refgen.moe import onnxrun

log = logging.getLogger("refgen.moe.serve")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/gif", "image/webp", "image/tiff")


@dataclass
class ServeConfig:
    model: str                       # an export folder (manifest.json + files)
    file: str | None = None          # which ONNX file (default: the manifest's deployable)
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = 1                 # ORT intra-op threads (1 on the 2-core machines: spec §3)
    max_batch: int = 8
    max_wait_ms: float = 5.0
    rate: float = 200.0              # token bucket: requests per second per client ...
    burst: int = 400                 # ... and its depth
    max_bytes: int = 1_000_000       # largest accepted request body
    queue_limit: int = 1024          # queued requests beyond this get 429 (back-pressure)

    def __post_init__(self):
        if not 1 <= self.max_batch:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0 or self.rate <= 0 or self.burst < 1 or self.max_bytes < 1:
            raise ValueError("max_wait_ms >= 0, rate > 0, burst >= 1 and max_bytes >= 1 are required")


class Model:
    """A verified export folder and its ORT session."""

    def __init__(self, folder: str | Path, file: str | None = None, threads: int = 1):
        self.folder = Path(folder)
        man = mf.read_manifest(self.folder)
        self.file = file or man["deployable"]
        self.manifest = mf.verify(self.folder, self.file)  # raises TamperedArtifactError
        self.session = onnxrun.session(self.folder / self.file, threads)
        self.shape = tuple(self.manifest["input"]["shape"])  # (C, H, W)
        self.max_batch = int(self.manifest["input"]["max_batch"])
        self.classes = list(self.manifest.get("classes") or range(0))
        self.top_k = int(self.manifest.get("top_k", 1))
        self.version = self.manifest["version"]
        self.sha256 = self.manifest["files"][self.file]["sha256"]

    def run(self, x: np.ndarray):
        return onnxrun.run(self.session, x, self.max_batch)


class TokenBucket:
    """Per-key token bucket: RATE tokens/s up to BURST; take() -> (allowed, seconds until a token)."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self.state: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def take(self, key: str) -> tuple[bool, float]:
        with self.lock:
            now = self.clock()
            tokens, last = self.state.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self.state[key] = (tokens - 1, now)
                return True, 0.0
            self.state[key] = (tokens, now)
            return False, (1 - tokens) / self.rate


class MicroBatcher:
    """One worker; a batch closes at MAX_BATCH requests, MAX_WAIT after its first request, or at once when no
    other request is in flight ('idle')."""

    def __init__(self, run, max_batch: int, max_wait_s: float, in_flight, metrics):
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.in_flight, self.m = in_flight, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self):
        self.task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self):
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def submit(self, x: np.ndarray):
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((x, fut))
        return await fut

    async def _collect(self) -> tuple[list, str]:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            if self.in_flight() <= len(batch):
                return batch, "idle"
            left = deadline - loop.time()
            if left <= 0:
                return batch, "timeout"
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                return batch, "timeout"
        return batch, "full"

    async def _worker(self):
        while True:
            batch, why = await self._collect()
            self.m["batches"].labels(reason=why).inc()
            self.m["batch_size"].observe(len(batch))
            try:
                logits, probs = await asyncio.to_thread(self.run, np.stack([b[0] for b in batch]))
                for i, (_, fut) in enumerate(batch):
                    if not fut.done():
                        fut.set_result((logits[i], probs[i]))
            except Exception as e:  # every waiting request gets the error, the worker lives on
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    r = CollectorRegistry()
    return r, {
        "latency": Histogram("moe_request_latency_seconds", "POST /predict latency", registry=r,
                             buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .15, .25, .5, 1, 2.5)),
        "in_flight": Gauge("moe_requests_in_flight", "requests being handled", registry=r),
        "requests": Counter("moe_requests_total", "requests by status code", ["code"], registry=r),
        "errors": Counter("moe_request_errors_total", "error responses by status code", ["code"], registry=r),
        "batch_size": Histogram("moe_batch_size", "requests per inference batch", registry=r,
                                buckets=(1, 2, 3, 4, 5, 6, 7, 8, 16, 32)),
        "batches": Counter("moe_batches_total", "inference batches by why they closed", ["reason"], registry=r),
        "reloads": Counter("moe_reloads_total", "SIGHUP reloads by result", ["result"], registry=r),
        "info": Gauge("moe_model_info", "the model being served", ["version", "sha256"], registry=r),
    }


def decode_image(data: bytes, shape) -> np.ndarray:
    """uint8 [H, W, C] from image bytes, or ValueError (-> 422) saying what is wrong."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"the upload is not a readable image ({type(e).__name__})") from e
    if img.size != (w, h):
        raise ValueError(f"image is {img.size[0]}x{img.size[1]} px, the model takes {w}x{h}")
    a = np.asarray(img.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
    return a[..., None] if c == 1 else a


class _Reject(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Server:
    """The app and its state (model, bucket, batcher, metrics), so a signal handler can swap the model."""

    def __init__(self, cfg: ServeConfig, model: Model | None = None):
        self.cfg = cfg
        self.model = model or Model(cfg.model, cfg.file, cfg.threads)
        self.registry, self.m = _metrics()
        self.m["info"].labels(self.model.version, self.model.sha256[:16]).set(1)
        self.bucket = TokenBucket(cfg.rate, cfg.burst)
        self.inflight, self.started = 0, time.time()
        self.batcher = MicroBatcher(lambda x: self.model.run(onnxrun.to_input(x)), cfg.max_batch,
                                    cfg.max_wait_ms / 1000, lambda: self.inflight, self.m)
        self.app = self._build()

    def reload(self) -> bool:
        """Verify the folder again and swap the model in; False (old model kept) when it fails."""
        try:
            new = Model(self.cfg.model, self.cfg.file, self.cfg.threads)
        except Exception as e:  # noqa: BLE001 - any failure keeps the running model
            self.m["reloads"].labels(result="rejected").inc()
            log.error(json.dumps({"event": "reload_rejected", "error": f"{type(e).__name__}: {e}"}))
            return False
        old, self.model = self.model, new
        self.m["info"].labels(old.version, old.sha256[:16]).set(0)
        self.m["info"].labels(new.version, new.sha256[:16]).set(1)
        self.m["reloads"].labels(result="ok").inc()
        log.info(json.dumps({"event": "reloaded", "version": new.version, "sha256": new.sha256}))
        return True

    def _build(self):
        from contextlib import asynccontextmanager

        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        @asynccontextmanager
        async def lifespan(app):
            self.batcher.start()
            yield
            await self.batcher.stop()

        app = FastAPI(title="refgen moe", lifespan=lifespan)

        def error(status: int, message: str, headers=None):
            self.m["errors"].labels(code=str(status)).inc()
            self.m["requests"].labels(code=str(status)).inc()
            return JSONResponse({"error": {"status": status, "message": message}}, status_code=status,
                                headers=headers)

        @app.get("/health")
        async def health():
            md = self.model
            return {"status": "ok", "version": md.version, "file": md.file, "sha256": md.sha256,
                    "uptime_s": round(time.time() - self.started, 3), "queue": self.batcher.queue.qsize(),
                    "in_flight": self.inflight}

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        @app.post("/predict")
        async def predict(request: Request):
            rid, t0 = request.headers.get("x-request-id") or uuid.uuid4().hex[:16], time.perf_counter()
            self.inflight += 1
            self.m["in_flight"].inc()
            try:
                x = await self._read(request)
                if self.batcher.queue.qsize() >= self.cfg.queue_limit:
                    raise _Reject(429, f"queue full ({self.cfg.queue_limit} waiting)", {"Retry-After": "1"})
                logits, probs = await self.batcher.submit(x)
            except _Reject as r:
                return error(r.status, r.message, r.headers)
            finally:
                self.inflight -= 1
                self.m["in_flight"].dec()
            z = logits.astype(np.float64)
            p = np.exp(z - z.max())
            p /= p.sum()
            k = int(np.argmax(p))
            experts = [int(e) for e in np.argsort(-probs, kind="stable")[:self.model.top_k]]
            dt = time.perf_counter() - t0
            self.m["latency"].observe(dt)
            self.m["requests"].labels(code="200").inc()
            log.info(json.dumps({"time": time.time(), "request_id": rid, "status": 200,
                                 "duration_ms": round(1000 * dt, 3), "top_k_experts": experts}))
            label = self.model.classes[k] if k < len(self.model.classes) else str(k)
            return {"request_id": rid, "class": k, "label": label, "probs": [round(float(v), 6) for v in p],
                    "top_k_experts": experts, "model_version": self.model.version}

        return app

    async def _read(self, request) -> np.ndarray:
        key = request.headers.get("x-api-key") or (request.client.host if request.client else "unknown")
        ok, wait = self.bucket.take(key)
        if not ok:
            raise _Reject(429, f"rate limit: {self.cfg.rate:g} requests/s, burst {self.cfg.burst}",
                          {"Retry-After": str(max(1, int(np.ceil(wait))))})
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise _Reject(415, f"send the image as multipart/form-data (field 'file'), got {ctype or 'no type'!r}")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.cfg.max_bytes:
            raise _Reject(413, f"request body is {int(length):,} B, the limit is {self.cfg.max_bytes:,} B")
        body = b""
        async for chunk in request.stream():  # a missing or lying Content-Length cannot get past the limit
            body += chunk
            if len(body) > self.cfg.max_bytes:
                raise _Reject(413, f"request body exceeds the limit of {self.cfg.max_bytes:,} B")
        request._body = body  # Starlette parses the form from the body it has read
        try:
            form = await request.form(max_files=1, max_fields=4)
        except Exception as e:  # noqa: BLE001 - malformed multipart
            raise _Reject(422, f"malformed multipart body ({type(e).__name__})") from e
        up = form.get("file")
        if up is None or isinstance(up, str):
            raise _Reject(422, "no file field 'file' in the form")
        if (up.content_type or "").split(";")[0].strip().lower() not in IMAGE_TYPES:
            raise _Reject(415, f"file part has type {up.content_type!r}; accepted: {', '.join(IMAGE_TYPES)}")
        data = await up.read()
        try:
            return decode_image(data, self.model.shape)
        except ValueError as e:
            raise _Reject(422, str(e)) from e


def serve(cfg: ServeConfig) -> None:
    """Verify, load, and run uvicorn until SIGINT / SIGTERM; SIGHUP reloads (see the module docstring)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server = Server(cfg)  # a tampered folder raises here, before a port is opened
    signal.signal(signal.SIGHUP, lambda *_: server.reload())
    log.info(json.dumps({"event": "start", "model": str(server.model.folder / server.model.file),
                         "version": server.model.version, "host": cfg.host, "port": cfg.port}))
    uvicorn.run(server.app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
