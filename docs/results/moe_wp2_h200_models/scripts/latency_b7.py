import json, os, time, sys
import numpy as np
from refgen.moe import onnxrun
res = {"load_avg_before": os.getloadavg(), "threads": 1, "warmup": 10, "iters": 2000, "batch": 1}
rows = []
for name, p in [("mnist int8 (PTQ)", "/tmp/wp2/mnist_export/model_int8.onnx"), ("mnist fp32", "/tmp/wp2/mnist_export/model.onnx"),
                ("mnist QAT5 int8", "/tmp/wp2/mnist_compress_qat5/qat/model_int8.onnx"),
                ("animal int8 (PTQ)", "/tmp/wp2/animal_export/model_int8.onnx")]:
    s = onnxrun.session(p, 1)
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    for _ in range(10): s.run(None, {"image": x})
    t = []
    for _ in range(2000):
        a = time.perf_counter_ns(); s.run(None, {"image": x}); t.append(time.perf_counter_ns() - a)
    t = np.array(t) / 1e6
    rows.append({"model": name, "file": p, "median_ms": float(np.median(t)), "p95_ms": float(np.percentile(t, 95)), "p99_ms": float(np.percentile(t, 99))})
    print(rows[-1])
res["rows"] = rows; res["load_avg_after"] = os.getloadavg()
json.dump(res, open(sys.argv[1], "w"), indent=1)
print(res["load_avg_before"], res["load_avg_after"])
