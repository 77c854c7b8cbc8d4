"""bench/moe_acceptance.py --plots (refgen.moe.report): edge heatmaps, cost vs accuracy, report.md, on synthetic
run folders shaped like the H200 ones (docs/results/moe_acceptance_h200/mnist_graphfix)."""

import gzip
import json
from pathlib import Path

import pytest

from refgen.moe import report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def acc(bench_module):
    return bench_module("moe_acceptance")


def _adj(E, k):
    """A recognisable adjacency: diagonal 1, off-diagonal (i, j) = k + i/10 + j/100, one edge pruned to 0."""
    a = [[1.0 if i == j else round(k + i / 10 + j / 100, 4) for j in range(E)] for i in range(E)]
    a[0][1] = 0.0
    return a


def _run(folder: Path, acc_: float, kind: str = "graph", flops: float = 1.5e7, nbytes: int = 877_312,
         epochs: int = 0, gz: bool = False, dataset: str = "digits", E: int = 4) -> dict:
    folder.mkdir(parents=True)
    test = {"n": 100, "acc": acc_, "routing_share": [1 / E] * E, "min_routing_share": 1 / E,
            "gate_entropy_per_sample": 1.2, "gate_entropy_batch_mean": 1.38, "active_flops_per_image": flops}
    graph = None
    if kind == "graph":
        graph = {"sparsity": 0.5, "dist_from_identity": 0.3, "threshold": 0.01, "adjacency": _adj(E, 0.5),
                 "normalized": _adj(E, 0.4)}
    info = {"dataset": dataset, "params": 200_000, "device": "cuda", "cost": {"total_bytes": nbytes},
            "metrics": {"test": test}, "graph": graph, "model_config": {"kind": kind, "num_experts": E}}
    (folder / "moe.json").write_text(json.dumps(info))
    recs = [{"kind": "start"}] + [{"kind": "epoch", "epoch": e, "adjacency": _adj(E, 0.01 * e)}
                                  for e in range(epochs)] + [{"kind": "done"}]
    text = "".join(json.dumps(r) + "\n" for r in recs)
    if gz:
        (folder / "metrics.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    else:
        (folder / "metrics.jsonl").write_text(text)
    return info


def _acceptance(out: Path, with_rl: bool) -> list[dict]:
    d = out / "digits"
    infos = [_run(d / "graph_s0", 0.97, epochs=10), _run(d / "graph_s1", 0.96, epochs=3),
             _run(d / "flat_s0", 0.95, kind="flat", nbytes=840_000),
             _run(d / "dense_flops_s0", 0.94, kind="dense", nbytes=478_488)]
    if with_rl:
        lams = [{"lam": lam, "acc": a, "random_gate_acc": a - 0.05, "active_flops_per_image": f,
                 "flops_vs_static_ref": f / 1.5e7, "delta_acc_pp_vs_static_ref": 0.1, "margin_over_random_pp": 5.0,
                 "on_pareto_front": p}
                for lam, a, f, p in ((0.0, 0.97, 2.1e7, True), (0.1, 0.96, 1.5e7, True), (0.5, 0.90, 1.6e7, False))]
        (d / "rl").mkdir()
        (d / "rl" / "rl.json").write_text(json.dumps({
            "dataset": "digits", "lambdas": lams, "pareto_points": 2,
            "static_topk": [{"k": k, "acc": 0.95, "active_flops_per_image": 1e7 * k} for k in (1, 2)]}))
    return infos


def test_heatmaps_draw_the_runs_adjacency_and_the_report_embeds_them(acc, tmp_path, capsys):
    out = tmp_path / "acc"
    infos = _acceptance(out, with_rl=False)
    assert acc.main(["--out", str(out), "--datasets", "digits", "--seeds", "0,1", "--table", "--plots"]) == 0
    capsys.readouterr()
    g = out / "digits" / "graphs"
    png, beside = g / "digits_graph_s0.png", json.loads((g / "digits_graph_s0.json").read_text())
    assert png.read_bytes()[:8] == PNG
    # the last panel is moe.json's final adjacency; snapshots after epoch 1 and 5 (epoch 10 is the final panel)
    assert beside["drawn"][-1] == infos[0]["graph"]["adjacency"]
    assert [s["epoch"] for s in beside["snapshots"]] == [1, 5]
    assert beside["drawn"][1] == _adj(4, 0.04)
    assert (g / "digits_final.png").read_bytes()[:8] == PNG
    assert not (g / "digits_flat_s0.png").exists()  # no graph, no heatmap
    text = (out / "report.md").read_text()
    assert "## A1 accuracy" in text and "| digits | 97.00 / 96.00 | 96.50 |" in text  # the bench table itself
    for link in ("digits/graphs/digits_graph_s0.png", "digits/graphs/digits_graph_s1.png",
                 "digits/graphs/digits_final.png", "digits/cost_accuracy_digits.png"):
        assert f"]({link})" in text and (out / link).is_file()
    assert "No `digits/rl/rl.json`: the RL part" in text
    assert json.loads((out / "digits" / "cost_accuracy_digits.json").read_text())["drawn"] == {"flops": 4, "bytes": 4}


def test_scatter_one_point_per_run_and_the_rl_sweep(tmp_path):
    out = tmp_path / "acc"
    _acceptance(out, with_rl=True)
    res = report.write_report(out, ["(table)"])
    sc = res["datasets"]["digits"]["scatter"]
    assert sc["drawn"] == {"flops": 4, "bytes": 4, "rl": 3}
    assert sorted(p["name"] for p in sc["points"]) == ["dense_flops_s0", "flat_s0", "graph_s0", "graph_s1"]
    saved = json.loads((out / "digits" / "cost_accuracy_digits.json").read_text())
    assert [p["lam"] for p in saved["rl"]] == [0.0, 0.1, 0.5]
    text = (out / "report.md").read_text()
    assert "3 lambdas, 2 on the Pareto front" in text and "No `digits/rl" not in text


def test_flat_layout_and_gzipped_logs_as_in_docs_results(acc, tmp_path, capsys):
    """docs/results keeps one data set's runs directly in the folder, metrics.jsonl gzipped."""
    out = tmp_path / "mnist_graphfix"
    _run(out / "graph_s17", 0.9965, epochs=6, gz=True, dataset="mnist")
    _run(out / "flat_s17", 0.996, kind="flat", dataset="mnist")
    assert report.dataset_dirs(out) == {"mnist": out}
    (out / "acceptance.json").write_text(json.dumps({"device": "NVIDIA H200", "verdict": {}}))
    assert acc.main(["--out", str(out), "--datasets", "mnist", "--seeds", "17", "--table", "--plots"]) == 0
    capsys.readouterr()
    # the table finds the runs, and keeps the device the runs were made on
    md = (out / "acceptance.md").read_text()
    assert md.startswith("# refgen.moe acceptance (WP1) - NVIDIA H200") and "| mnist | 99.65 | 99.65 |" in md
    beside = json.loads((out / "graphs" / "mnist_graph_s17.json").read_text())
    assert beside["epochs_logged"] == 6 and [s["epoch"] for s in beside["snapshots"]] == [1, 5]
    assert "](graphs/mnist_graph_s17.png)" in (out / "report.md").read_text()


def test_adjacency_from_safetensors_when_moe_json_has_none(tmp_path):
    import torch

    from refgen.moe.graph import graph_stats
    from refgen.moe.model import MoEClassifier, MoEModelConfig
    from refgen.moe.train import _save_model

    model = MoEClassifier(MoEModelConfig(num_experts=3, top_k=2, stem_channels=4, expert_channels=4,
                                         expert_dim=8, pool=1), 1, 10)
    with torch.no_grad():
        model.graph.weight.copy_(torch.tensor([[1.0, 0.2, 0.0], [0.3, 1.0, 0.05], [0.0, 0.7, 1.0]]))
    _save_model(model, tmp_path)
    got = report.final_adjacency(tmp_path, {"graph": None, "model_config": {"kind": "graph"}})
    assert got == graph_stats(model.graph)["adjacency"]
    assert got[2][1] == pytest.approx(0.7)
    assert report.final_adjacency(tmp_path, {"graph": None, "model_config": {"kind": "dense"}}) is None


def test_more_than_8_experts_shows_the_8_most_routed():
    share = [0.01, 0.2, 0.02, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.07]
    assert report.shown_experts({"metrics": {"test": {"routing_share": share}}}, 10) == [1, 3, 4, 5, 6, 7, 8, 9]
    assert report.shown_experts({}, 4) == [0, 1, 2, 3]


def test_bad_folders_name_the_culprit(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        report.write_report(tmp_path / "nowhere", [])
    (tmp_path / "empty" / "monitor").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty holds no run folder"):
        report.write_report(tmp_path / "empty", [])
    _run(tmp_path / "ok" / "graph_s0", 0.9)
    with pytest.raises(ValueError, match=r"of data sets \['mnist'\] \(found: \['digits'\]\)"):
        report.write_report(tmp_path / "ok", [], datasets=["mnist"])
    bad = tmp_path / "bad" / "graph_s0"
    bad.mkdir(parents=True)
    (bad / "moe.json").write_text(json.dumps({"dataset": "digits", "metrics": {}}))
    with pytest.raises(ValueError, match=r"graph_s0/moe.json: has no metrics\.test\.acc"):
        report.write_report(tmp_path / "bad", [])
