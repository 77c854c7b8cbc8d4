"""refgen moe serve: the service in process (errors, metrics, batching, rate limit) and the entrypoint as a process
(checksum refusal, SIGHUP swap) — what the Dockerfile runs."""

import asyncio
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from refgen.moe import onnxrun
from refgen.moe.serve import ServeConfig, Server, TokenBucket


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _files(data, ctype="image/png"):
    return {"file": ("x.png", data, ctype)}


@pytest.fixture
def client(exported_digits):
    srv = Server(ServeConfig(model=str(exported_digits[0]), burst=1000, max_bytes=20_000))
    with TestClient(srv.app) as c:
        yield srv, c


def test_predict_matches_onnx_runtime_on_the_same_image(client, exported_digits, digits):
    srv, c = client
    img = digits.x_test[3]
    r = c.post("/predict", files=_files(_png(img[..., 0])))
    assert r.status_code == 200, r.text
    body = r.json()
    lg, pr = onnxrun.run(onnxrun.session(exported_digits[0] / "model_int8.onnx"), onnxrun.to_input(img[None]))
    assert body["class"] == int(lg.argmax()) and body["label"] == str(int(lg.argmax()))
    assert sorted(body["top_k_experts"]) == sorted(np.argsort(-pr[0])[:2].tolist())
    assert abs(sum(body["probs"]) - 1) < 1e-4 and body["model_version"] == "0.1.0"
    h = c.get("/health").json()
    assert h["status"] == "ok" and h["file"] == "model_int8.onnx" and len(h["sha256"]) == 64


def test_errors_are_json_with_the_right_codes(client, digits):
    srv, c = client
    good = _png(digits.x_test[0][..., 0])
    cases = [
        (c.post("/predict", json={"image": [1, 2]}), 415, "multipart"),
        (c.post("/predict", files=_files(good, "text/plain")), 415, "text/plain"),
        (c.post("/predict", files=_files(b"\0" * 30_000)), 413, "limit"),
        (c.post("/predict", files=_files(b"not an image at all")), 422, "not a readable image"),
        (c.post("/predict", files=_files(_png(np.zeros((9, 8), np.uint8)))), 422, "8x9 px, the model takes 8x8"),
        (c.post("/predict", files={"other": ("x.png", good, "image/png")}), 422, "no file field"),
    ]
    for r, code, text in cases:
        assert r.status_code == code, (code, r.text)
        assert r.json()["error"]["status"] == code and text in r.json()["error"]["message"]
    m = c.get("/metrics").text
    for code in ("413", "415", "422"):
        assert f'moe_request_errors_total{{code="{code}"}}' in m


def test_rate_limit_429_with_retry_after(exported_digits, digits):
    srv = Server(ServeConfig(model=str(exported_digits[0]), rate=0.01, burst=2))
    good = _png(digits.x_test[0][..., 0])
    with TestClient(srv.app) as c:
        codes = [c.post("/predict", files=_files(good), headers={"x-api-key": "a"}).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = c.post("/predict", files=_files(good), headers={"x-api-key": "a"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "rate limit" in r.json()["error"]["message"]
        assert c.post("/predict", files=_files(good), headers={"x-api-key": "b"}).status_code == 200  # per key


def test_token_bucket_refills_at_its_rate():
    t = [0.0]
    b = TokenBucket(rate=2, burst=2, clock=lambda: t[0])
    assert [b.take("k")[0] for _ in range(3)] == [True, True, False]
    t[0] += 0.5
    assert b.take("k")[0] and not b.take("k")[0]


def test_metrics_and_micro_batching_under_concurrency(exported_digits, digits):
    srv = Server(ServeConfig(model=str(exported_digits[0]), burst=1000, max_wait_ms=50))
    imgs = [_png(digits.x_test[i][..., 0]) for i in range(16)]

    async def go():
        async with srv.app.router.lifespan_context(srv.app):
            tr = httpx.ASGITransport(app=srv.app)
            async with httpx.AsyncClient(transport=tr, base_url="http://t") as c:
                alone = await c.post("/predict", files=_files(imgs[0]))
                many = await asyncio.gather(*[c.post("/predict", files=_files(d)) for d in imgs])
                return alone, many, (await c.get("/metrics")).text

    alone, many, m = asyncio.run(go())
    assert alone.status_code == 200 and all(r.status_code == 200 for r in many)
    assert 'moe_batches_total{reason="idle"}' in m                     # the lone request did not wait
    sizes = [ln for ln in m.splitlines() if ln.startswith("moe_batch_size_count")]
    n_batches = float(sizes[0].split()[-1])
    assert n_batches < 17                                                 # 17 requests, fewer batches
    assert 'moe_batch_size_bucket{le="1.0"}' in m and "moe_request_latency_seconds_bucket" in m
    assert "moe_requests_in_flight 0.0" in m and 'moe_requests_total{code="200"} 17.0' in m


def test_the_serving_path_imports_no_torch(exported_digits):
    code = ("import sys; from refgen.moe.serve import Server, ServeConfig; import refgen.cli; "
            f"Server(ServeConfig(model={str(exported_digits[0])!r})); "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.loads(r.read())


def _start(folder, port):
    return subprocess.Popen([sys.executable, "-m", "refgen.cli", "moe", "serve", "--model", str(folder), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_entrypoint_as_a_process_refuses_tampering_and_swaps_on_sighup(exported_digits, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(exported_digits[0], folder)
    # a tampered artifact: the process exits non-zero before opening a port, naming the file
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    b = bytearray((bad / "model_int8.onnx").read_bytes())
    b[-10] ^= 0xFF
    (bad / "model_int8.onnx").write_bytes(bytes(b))
    p = _start(bad, _port())
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "refgen moe serve: error:" in err and "model_int8.onnx: SHA-256" in err

    port = _port()
    p = _start(folder, port)
    try:
        for _ in range(300):
            try:
                h = _get(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                if p.poll() is not None:
                    raise AssertionError(p.stderr.read())
                time.sleep(0.1)
        assert h["version"] == "0.1.0"
        # a new version of the folder (here: the manifest's version bumped) is swapped in on SIGHUP
        man = json.loads((folder / "manifest.json").read_text())
        man["version"] = "0.2.0"
        (folder / "manifest.json").write_text(json.dumps(man))
        p.send_signal(signal.SIGHUP)
        for _ in range(100):
            if _get(f"http://127.0.0.1:{port}/health")["version"] == "0.2.0":
                break
            time.sleep(0.1)
        assert _get(f"http://127.0.0.1:{port}/health")["version"] == "0.2.0"
        # a tampered folder is verified on SIGHUP and rejected: the running model stays
        (folder / "model.onnx.data").write_bytes(b"x")
        man["version"] = "0.3.0"
        (folder / "manifest.json").write_text(json.dumps(man))
        p.send_signal(signal.SIGHUP)
        for _ in range(100):
            m = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            if 'moe_reloads_total{result="rejected"} 1.0' in m:
                break
            time.sleep(0.1)
        assert 'moe_reloads_total{result="rejected"} 1.0' in m
        assert _get(f"http://127.0.0.1:{port}/health")["version"] == "0.2.0"
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
