"""Load test of `refgen moe serve` (spec section 8, WP2 B8; issue 21): locust headless over loopback at a fixed
request rate, measuring the client-side latency (P50/P95/P99), the error rate and the server's resident memory.

    python bench/moe_serve_load.py --model EXPORT --out runs/moe_load [--rps 100] [--seconds 60] [--cache DIR]

One file, two roles:
  - run as a script it is the runner: starts `python -m refgen.cli moe serve --model EXPORT --port P` as a child
    process (its log to OUT/server.log), waits for /health, sends --warmup requests, records the server's RSS
    (VmRSS of /proc/PID/status) before the load, runs `locust -f THIS --headless` as a second child process
    (FastHttpUser, --users clients each at rps/users requests per second: constant_throughput, so the offered
    rate does not rise when the server is slow), samples the server's RSS once a second, then reads the exact
    per-request latencies the locust process wrote, the locust CSV, and the server's /metrics, prints a table and
    writes OUT/load.json;
  - loaded by locust (-f) it is the locustfile: every user posts the test images (PNG, multipart field 'file')
    round-robin from a random start, a response counts as a failure unless it is 200 with a class in it; served
    accuracy is counted against the images' labels.

Acceptance (spec B8): P95 <= 50 ms, errors < 0.1 %, RSS growth < 5 % (end of the run vs after the warm-up).
Images: MOE_LOAD_IMAGES (a folder of <index>_<label>.png written by the runner from the export's test split, or
random images of the input shape with --random-images). The load generator and the server share the machine: on
the 2-core dev VM both run on the same two cores as anything else there, which the load average in the JSON shows.
"""

from __future__ import annotations

import os

if os.environ.get("MOE_LOAD_IMAGES"):  # ---- the locustfile (imported by locust, which has patched gevent) ----
    import json as _json
    import random as _random
    import time as _time
    from pathlib import Path as _Path

    from locust import FastHttpUser, constant_throughput, events, task

    _FILES = sorted(_Path(os.environ["MOE_LOAD_IMAGES"]).glob("*.png"))
    _IMAGES = [(p.read_bytes(), int(p.stem.split("_")[1])) for p in _FILES]
    _RATE = float(os.environ.get("MOE_LOAD_USER_RATE", "1"))
    _ARRIVALS = os.environ.get("MOE_LOAD_ARRIVALS", "poisson")
    _RAW: list[tuple[float, float, int]] = []  # (start time, ms, ok)
    _COUNTS = {"correct": 0, "answered": 0}

    class MoEUser(FastHttpUser):
        """One client at _RATE requests/s. poisson: exponential gaps (all users together: a Poisson stream, the
        open-loop load of MLPerf's server scenario); uniform: fixed gaps from a random phase; lockstep: locust's
        constant_throughput, every user started in the same ~second keeps its phase, so requests come in bursts
        of about `users` at once."""

        if _ARRIVALS == "lockstep":
            wait_time = constant_throughput(_RATE)
        else:
            def wait_time(self):
                gap = _random.expovariate(_RATE) if _ARRIVALS == "poisson" else 1 / _RATE
                self.next_t = max(self.next_t + gap, _time.monotonic() - 1 / _RATE)  # no catch-up bursts
                return max(0.0, self.next_t - _time.monotonic())

        def on_start(self):
            self.i = _random.randrange(len(_IMAGES))
            if _ARRIVALS != "lockstep":
                phase = _random.expovariate(_RATE) if _ARRIVALS == "poisson" else _random.uniform(0, 1 / _RATE)
                self.next_t = _time.monotonic() + phase
                _time.sleep(phase)  # gevent-patched: yields

        @task
        def predict(self):
            data, label = _IMAGES[self.i % len(_IMAGES)]
            self.i += 1
            t = _time.time()
            t0 = _time.perf_counter()
            ok = 0
            with self.client.post("/predict", files={"file": ("x.png", data, "image/png")},
                                  catch_response=True, name="/predict") as r:
                if r.status_code != 200:
                    r.failure(f"HTTP {r.status_code}")
                else:
                    try:
                        k = int(_json.loads(r.content)["class"])
                    except Exception as e:  # noqa: BLE001 - any malformed body is a failure
                        r.failure(f"bad body ({type(e).__name__})")
                    else:
                        ok = 1
                        r.success()
                        _COUNTS["answered"] += 1
                        _COUNTS["correct"] += int(k == label)
            _RAW.append((t, 1000 * (_time.perf_counter() - t0), ok))

    @events.test_stop.add_listener
    def _dump(**_):
        out = os.environ.get("MOE_LOAD_RAW")
        if out:
            _Path(out).write_text(_json.dumps({"requests": _RAW, **_COUNTS}))

else:  # ---- the runner ----------------------------------------------------------------------------------------
    import argparse
    import csv
    import datetime
    import io
    import json
    import platform
    import re
    import shlex
    import socket
    import subprocess
    import sys
    import threading
    import time
    import urllib.request
    from pathlib import Path

    import numpy as np

    P95_MAX_MS, ERROR_MAX, RSS_GROWTH_MAX = 50.0, 0.001, 0.05

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def rss_bytes(pid: int) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {pid}")

    def write_images(folder: Path, model: Path, dataset: str | None, cache: str | None, n: int, random: bool,
                     seed: int = 0) -> dict:
        """N test images as <index>_<label>.png (label -1: random images); returns where they came from."""
        from PIL import Image

        man = json.loads((model / "manifest.json").read_text())
        c, h, w = man["input"]["shape"]
        folder.mkdir(parents=True, exist_ok=True)
        if random:
            rng = np.random.default_rng(seed)
            x = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
            y = np.full(n, -1)
            src = {"images": "random", "n": n}
        else:
            from refgen.moe.data import load_dataset

            name = dataset or man.get("dataset")
            if not name:
                raise SystemExit("the manifest names no dataset: pass --dataset or --random-images")
            ds = load_dataset(name, cache, progress=False)
            x, y = ds.x_test[:n], ds.y_test[:n]
            src = {"images": f"{name} test split, first {len(y)}", "n": int(len(y))}
        for i, (a, lab) in enumerate(zip(x, y)):
            Image.fromarray(a[..., 0] if c == 1 else a).save(folder / f"{i:05d}_{int(lab)}.png")
        src["png_bytes_mean"] = float(np.mean([p.stat().st_size for p in folder.glob("*.png")]))
        return src

    def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
        t_end = time.time() + timeout
        while time.time() < t_end:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode} before /health answered")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    return json.loads(r.read())
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"/health did not answer within {timeout:.0f} s")

    def post_image(url: str, data: bytes) -> int:
        b = "----moeload"
        body = (f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
        req = urllib.request.Request(url + "/predict", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={b}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status

    def fetch(url: str) -> str:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()

    def metric_values(text: str, name: str) -> dict[str, float]:
        """{labels: value} of one Prometheus metric family's samples NAME{...} in TEXT."""
        out = {}
        for line in text.splitlines():
            m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
            if m:
                out[m.group(1) or ""] = float(m.group(2))
        return out

    def percentiles(ms: list[float]) -> dict[str, float]:
        if not ms:
            return {}
        a = np.asarray(ms)
        return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
                "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()), "mean_ms": float(a.mean())}

    def read_locust_csv(prefix: Path) -> dict:
        f = Path(f"{prefix}_stats.csv")
        if not f.is_file():
            return {}
        for row in csv.DictReader(io.StringIO(f.read_text())):
            if row.get("Name") == "Aggregated":
                keep = ("Request Count", "Failure Count", "Median Response Time", "Average Response Time",
                        "Max Response Time", "Requests/s", "95%", "99%")
                return {k: row[k] for k in keep if k in row}
        return {}

    def run(args) -> dict:
        model = Path(args.model).resolve()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        images = out / "images"
        src = write_images(images, model, args.dataset, args.cache, args.images, args.random_images)
        port = args.port or free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        serve_cmd = [sys.executable, "-m", "refgen.cli", "moe", "serve", "--model", str(model), "--port", str(port),
                     *(["--fp32"] if args.fp32 else []), *args.serve_args]
        load0 = os.getloadavg()
        with open(out / "server.log", "w") as slog:
            server = subprocess.Popen(serve_cmd, stdout=slog, stderr=subprocess.STDOUT, env=env)
            try:
                health = wait_healthy(url, server)
                rss_start = rss_bytes(server.pid)
                pngs = sorted(images.glob("*.png"))
                for i in range(args.warmup):
                    if post_image(url, pngs[i % len(pngs)].read_bytes()) != 200:
                        raise SystemExit("a warm-up request failed")
                rss_seq = rss_bytes(server.pid)
                users = args.users or max(1, min(int(round(args.rps)), 100))
                raw = out / "raw.json"

                def locust(seconds: int, raw_file: Path, csv_prefix: Path):
                    raw_file.unlink(missing_ok=True)
                    cmd = ["locust", "-f", str(Path(__file__).resolve()), "--headless", "--host", url,
                           "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "5",
                           "--csv", str(csv_prefix), "--only-summary", "--loglevel", "WARNING"]
                    lenv = {**env, "MOE_LOAD_IMAGES": str(images), "MOE_LOAD_RAW": str(raw_file),
                            "MOE_LOAD_USER_RATE": repr(args.rps / users), "MOE_LOAD_ARRIVALS": args.arrivals}
                    return cmd, subprocess.run(cmd, env=lenv, capture_output=True, text=True)

                if args.warmup_seconds > 0:  # the same load first: allocations that only concurrency makes
                    locust(args.warmup_seconds, out / "raw_warmup.json", out / "locust_warmup")
                rss_warm = rss_bytes(server.pid)
                metrics0 = fetch(url + "/metrics")
                samples, stop = [], threading.Event()

                def sample():
                    t0 = time.time()
                    while not stop.wait(1.0):
                        try:
                            samples.append((round(time.time() - t0, 2), rss_bytes(server.pid)))
                        except (OSError, RuntimeError):
                            return

                th = threading.Thread(target=sample, daemon=True)
                th.start()
                t0 = time.time()
                locust_cmd, lp = locust(args.seconds, raw, out / "locust")
                wall = time.time() - t0
                stop.set()
                th.join()
                rss_end = rss_bytes(server.pid)
                metrics = fetch(url + "/metrics")
                alive = server.poll() is None
            finally:
                server.terminate()
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
        (out / "locust.log").write_text(lp.stdout + lp.stderr)
        if not raw.is_file():
            raise SystemExit(f"locust wrote no raw results (exit {lp.returncode}); see {out / 'locust.log'}")
        r = json.loads(raw.read_text())
        reqs = r["requests"]
        n = len(reqs)
        fails = sum(1 for _, _, ok in reqs if not ok)
        ts = [t for t, _, _ in reqs]
        span = (max(ts) - min(ts)) if n > 1 else float("nan")
        lat = percentiles([ms for _, ms, _ in reqs])
        rss_peak = max([s for _, s in samples] + [rss_end])

        def delta(name):  # the main run's share of a counter (the warm-ups came before metrics0)
            a, b = metric_values(metrics0, name), metric_values(metrics, name)
            return {k: v - a.get(k, 0.0) for k, v in b.items()}

        bs = sum(delta("moe_batch_size_sum").values()), sum(delta("moe_batch_size_count").values())
        srv_lat = (sum(delta("moe_request_latency_seconds_sum").values()),
                   sum(delta("moe_request_latency_seconds_count").values()))
        res = {
            "device": args.device_note, "date": args.date or datetime.date.today().isoformat(),
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_before": load0,
                     "loadavg_after": os.getloadavg()},
            "model": {"folder": str(model), "file": health.get("file"), "version": health.get("version"),
                      "sha256": health.get("sha256")},
            "images": src,
            "load": {"target_rps": args.rps, "seconds": args.seconds, "users": users, "warmup": args.warmup,
                     "warmup_seconds": args.warmup_seconds, "arrivals": args.arrivals,
                     "serve_command": serve_cmd, "locust_command": locust_cmd, "locust_exit": lp.returncode,
                     "wall_s": wall},
            "requests": n, "failures": fails, "error_rate": fails / n if n else float("nan"),
            "achieved_rps": n / args.seconds, "request_start_span_s": span,
            "served_accuracy": (r["correct"] / r["answered"] if r["answered"] and not args.random_images else None),
            "latency_client": lat, "locust_csv": read_locust_csv(out / "locust"),
            "server": {"alive_at_end": alive,
                       "mean_latency_ms": 1000 * srv_lat[0] / max(srv_lat[1], 1),
                       "mean_batch_size": bs[0] / max(bs[1], 1),
                       "batches_by_reason": delta("moe_batches_total"),
                       "requests_by_code": delta("moe_requests_total")},
            "rss": {"start_bytes": rss_start, "after_sequential_warmup_bytes": rss_seq,
                    "after_warmup_bytes": rss_warm, "end_bytes": rss_end, "peak_bytes": rss_peak,
                    "growth": (rss_end - rss_warm) / rss_warm, "growth_peak": (rss_peak - rss_warm) / rss_warm,
                    "growth_from_sequential_warmup": (rss_end - rss_seq) / rss_seq, "samples": samples},
        }
        res["acceptance"] = {
            "p95_le_50ms": bool(lat and lat["p95_ms"] <= P95_MAX_MS),
            "errors_lt_0.1pct": bool(n and res["error_rate"] < ERROR_MAX),
            "rss_growth_lt_5pct": bool(res["rss"]["growth"] < RSS_GROWTH_MAX),
            "rate_held": bool(n and res["achieved_rps"] >= 0.95 * args.rps),
        }
        tmp = out / "load.json.tmp"
        tmp.write_text(json.dumps(res, indent=2))
        tmp.replace(out / "load.json")
        return res

    def table(res: dict) -> str:
        lat, rss, acc = res["latency_client"], res["rss"], res["acceptance"]
        rows = [
            ("requests / failures", f"{res['requests']:,} / {res['failures']:,}", ""),
            ("achieved rate", f"{res['achieved_rps']:.1f} req/s (target {res['load']['target_rps']:g})",
             "ok" if acc["rate_held"] else "LOW"),
            ("error rate", f"{100 * res['error_rate']:.3f} %", "ok" if acc["errors_lt_0.1pct"] else "FAIL (>= 0.1 %)"),
            ("latency P50 / P95 / P99", f"{lat.get('p50_ms', float('nan')):.2f} / {lat.get('p95_ms', float('nan')):.2f}"
             f" / {lat.get('p99_ms', float('nan')):.2f} ms", "ok" if acc["p95_le_50ms"] else "FAIL (P95 > 50 ms)"),
            ("latency max", f"{lat.get('max_ms', float('nan')):.1f} ms", ""),
            ("RSS after load warm-up -> end (peak)", f"{rss['after_warmup_bytes'] / 2**20:.1f} -> "
             f"{rss['end_bytes'] / 2**20:.1f} MiB ({rss['peak_bytes'] / 2**20:.1f})", ""),
            ("RSS growth", f"{100 * rss['growth']:+.2f} % (peak {100 * rss['growth_peak']:+.2f} %)",
             "ok" if acc["rss_growth_lt_5pct"] else "FAIL (>= 5 %)"),
            ("server mean batch size", f"{res['server']['mean_batch_size']:.2f}", ""),
        ]
        if res["served_accuracy"] is not None:
            rows.append(("served accuracy", f"{100 * res['served_accuracy']:.2f} %", ""))
        w = max(len(r[0]) for r in rows)
        return "\n".join([f"| {'measure':<{w}} | value | check |", f"| {'-' * w} | --- | --- |"]
                         + [f"| {a:<{w}} | {b} | {c} |" for a, b, c in rows])

    def main(argv=None) -> int:
        ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--model", required=True, help="an export folder (refgen moe export / compress)")
        ap.add_argument("--out", required=True)
        ap.add_argument("--rps", type=float, default=100.0)
        ap.add_argument("--seconds", type=int, default=60)
        ap.add_argument("--users", type=int, default=None, help="locust users (default: min(rps, 100))")
        ap.add_argument("--warmup", type=int, default=200, help="sequential requests after start-up")
        ap.add_argument("--warmup-seconds", type=int, default=10,
                        help="then this long the same locust load; the RSS baseline is taken after it")
        ap.add_argument("--arrivals", choices=["poisson", "uniform", "lockstep"], default="poisson",
                        help="request arrival process (see MoEUser)")
        ap.add_argument("--images", type=int, default=256)
        ap.add_argument("--dataset", default=None, help="default: the manifest's dataset")
        ap.add_argument("--cache", default=None)
        ap.add_argument("--random-images", action="store_true")
        ap.add_argument("--fp32", action="store_true", help="serve model.onnx instead of the int8 deployable")
        ap.add_argument("--port", type=int, default=None)
        ap.add_argument("--device-note", default=f"{os.cpu_count()}-core CPU", help="recorded as 'device'")
        ap.add_argument("--date", default=None)
        ap.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                        help="passed on to refgen moe serve (last option)")
        args = ap.parse_args(argv)
        res = run(args)
        print(table(res))
        print(f"wrote {Path(args.out) / 'load.json'}")
        return 0 if all(res["acceptance"].values()) else 3

    if __name__ == "__main__":
        sys.exit(main())
