"""The CUDA-graph latency rows and accuracy per joule of `refgen moe bench` (issue 21, B6/B7), on the CPU: the
refusals (no GPU, the uncapturable sparse path, a model in training mode), the option plumbing through the CLI, the
replay check's comparison and the accuracy/J arithmetic. The captures themselves need a GPU
(.carry/next3/M5_wp2_gpu.sh runs them on the H200)."""

import json

import pytest
import torch

from refgen.cli import main
from refgen.moe.bench import (CAPTURABLE_PATHS, accuracy_per_joule, bench_latency, check_capturable, check_replay,
                              graphed_forward, run_bench)
from refgen.moe.monitor import CudaGraphCall, GraphCaptureUnsupported, measure_latency
from refgen.moe.train import load_model

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="these test the refusal where there is no GPU")


@pytest.fixture(scope="module")
def model(trained_digits):
    m, info = load_model(trained_digits[0], "cpu")
    return m, tuple(info["input_shape"]), info


@needs_no_gpu
def test_cuda_graphs_on_the_cpu_refuse_instead_of_measuring_something_else(model, tmp_path):
    m, shape, _ = model
    x = torch.zeros(1, *shape)
    with pytest.raises(GraphCaptureUnsupported, match="CUDA graphs need a CUDA GPU.*nothing is measured"):
        bench_latency(m, shape, batches=(1,), iters=2, cuda_graphs=True)
    with pytest.raises(GraphCaptureUnsupported, match="CUDA graphs need a CUDA GPU; the input is on cpu"):
        graphed_forward(m, x, "dense")
    with pytest.raises(GraphCaptureUnsupported, match="CUDA GPU"):
        CudaGraphCall(lambda t: t * 2, x)
    with pytest.raises(GraphCaptureUnsupported, match="CUDA GPU"):  # before any section has run
        run_bench(m, shape, ["sleep", "latency"], tmp_path / "b", cuda_graphs=True)
    assert not (tmp_path / "b" / "bench.json").exists()


def test_the_sparse_path_is_refused_by_name_and_only_dense_is_capturable(model):
    m, shape, _ = model
    assert CAPTURABLE_PATHS == ("dense",)
    with pytest.raises(GraphCaptureUnsupported, match=r"the sparse path cannot be captured.*nonzero\(\)"):
        graphed_forward(m, torch.zeros(2, *shape), "sparse")
    with pytest.raises(GraphCaptureUnsupported, match="the sparse path cannot be captured"):
        bench_latency(m, shape, batches=(1,), iters=2, cuda_graphs=True, graph_paths=("dense", "sparse"))
    with pytest.raises(ValueError, match="path must be one of"):
        check_capturable("fast")
    check_capturable("dense")
    m.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            graphed_forward(m, torch.zeros(2, *shape), "dense")
    finally:
        m.eval()


def test_auto_and_off_measure_eager_rows_only_on_the_cpu(model):
    m, shape, _ = model
    for opt in (None, False):
        r = bench_latency(m, shape, batches=(1, 3), iters=2, warmup=1, cuda_graphs=opt)
        assert "cuda_graph" not in r
        assert {row["batch"] for row in r["rows"]} == {1, 3}
        assert len(r["rows"]) == 2 * m.cfg.num_experts * 2
    t = measure_latency(lambda: None, "cpu", warmup=0, iters=3, sync_each=True)  # no GPU: plain wall time
    assert t["clock"] == "perf_counter_ns" and t["n"] == 3


def test_replay_check_compares_with_the_eager_forward_and_raises_on_a_difference(model):
    m, shape, _ = model
    x = torch.rand(5, *shape)
    # a stand-in for a replay that reads its input: the sparse path agrees with the dense one in eval mode
    ok = check_replay(m, lambda t: m(t, path="sparse").logits, x, "dense")
    assert ok["max_abs_diff"] < 1e-4 and ok["top1_agreement"] == 1.0
    with pytest.raises(AssertionError, match=r"replay differs from eager on the dense path at batch 5.*\|dlogit\|"):
        check_replay(m, lambda t: m(t).logits + 1e-2, x, "dense")


def test_accuracy_per_joule():
    w = {"j_per_image_total": 2e-3, "j_per_image_marginal": 5e-4}
    r = accuracy_per_joule(0.99, w)
    assert r["acc_pct_per_j_total"] == pytest.approx(99 / 2e-3)
    assert r["acc_pct_per_j_marginal"] == pytest.approx(99 / 5e-4)
    assert accuracy_per_joule(0.5, {"j_per_image_total": 1e-3, "j_per_image_marginal": -1e-5})[
        "acc_pct_per_j_marginal"] is None  # idle power above the working power: no marginal figure
    with pytest.raises(ValueError, match="fraction"):
        accuracy_per_joule(99.0, w)


@needs_no_gpu
def test_cli_options_reach_the_bench_and_the_accuracy_comes_from_moe_json(trained_digits, tmp_path, capsys):
    run, info = trained_digits
    base = ["moe", "bench", "--model", str(run), "--device", "cpu", "--threads", "1", "--section", "latency",
            "--iters", "2"]
    assert main(base + ["--cuda-graphs", "on", "--out", str(tmp_path / "on")]) == 1
    assert "CUDA graphs need a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "on").exists()
    assert main(base + ["--cuda-graphs", "on", "--graph-paths", "sparse", "--out", str(tmp_path / "sp")]) == 1
    assert "sparse path cannot be captured" in capsys.readouterr().err
    assert main(base + ["--latency-batches", "0", "--out", str(tmp_path / "z")]) == 1
    assert "positive integers" in capsys.readouterr().err
    assert main(base + ["--cuda-graphs", "off", "--latency-batches", "2", "--out", str(tmp_path / "off")]) == 0
    capsys.readouterr()
    b = json.loads((tmp_path / "off" / "bench.json").read_text())
    assert {r["batch"] for r in b["results"]["latency"]["rows"]} == {2}
    assert "cuda_graph" not in b["results"]["latency"]
    assert b["accuracy"] == info["metrics"]["test"]["acc"] and "moe.json metrics.test.acc" in b["accuracy_source"]
    assert main(["moe", "bench", "--model", str(run), "--device", "cpu", "--section", "energy", "--energy-batch", "8",
                 "--out", str(tmp_path / "e")]) == 1
    assert "energy section needs the model on a CUDA GPU" in capsys.readouterr().err
