"""The benchmark scripts run end to end on tiny models (numbers are meaningless on CPU; see docs/benchmarks.md)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_identity_bench_runs_on_tiny_models(tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "identity_bench.py"), "--tiny", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    for k in ("plain_per_image_s", "refgen_single_s", "refgen_two_slot_s", "inject_s", "grid_bs2_s",
              "invert_K1", "invert_K2_ckpt", "features_s_per_identity", "head_s"):
        assert k in res, k
    assert res["invert_K1"]["step_s"] > 0 and "| alpha grid 4x2" in r.stdout
