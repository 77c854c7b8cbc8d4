import json

import pytest
import torch
from safetensors.torch import load_file

from refgen.artifacts import read_jsonl
from refgen.cli import main
from refgen.moe.cost import cost_table, match_dense_width
from refgen.moe.train import Batches, MoETrainConfig, evaluate, load_model, split_data, train

from .conftest import tiny_train_config


def test_training_learns_and_writes_every_artifact(trained_digits, digits):
    folder, info = trained_digits
    t = info["metrics"]["test"]
    assert t["acc"] > 0.85, t["acc"]  # chance is 0.10
    assert info["metrics"]["test_acc_sparse_path"] == t["acc"]
    assert t["min_routing_share"] > 0 and abs(sum(t["routing_share"]) - 1) < 1e-9
    assert 0 <= info["graph"]["sparsity"] <= 1 and len(info["graph"]["adjacency"]) == 4
    saved = json.loads((folder / "moe.json").read_text())
    assert saved["config"]["dataset"] == "digits" and saved["versions"]["torch"] == torch.__version__
    assert "git_commit" in saved and saved["cost"]["total_flops"] > 0
    recs = read_jsonl(folder / "metrics.jsonl")
    kinds = [r["kind"] for r in recs]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert kinds.count("epoch") == 8 and kinds.count("hparams") == 8 and "monitor" in kinds and "train" in kinds
    lr = [r["groups"]["experts"]["lr"] for r in recs if r["kind"] == "hparams"]
    assert lr[0] == 3e-3 and all(b <= a for a, b in zip(lr, lr[1:]))
    model, meta = load_model(folder)
    tr, _, mean, std = split_data(tiny_train_config(), digits)
    again = evaluate(model, Batches(digits.x_test, digits.y_test, mean, std, "cpu"))
    assert again["acc"] == t["acc"]


def test_same_seed_same_weights(digits, tmp_path):
    cfg = tiny_train_config(epochs=1, max_steps=6)
    train(cfg, tmp_path / "a", progress=False, data=digits)
    train(cfg, tmp_path / "b", progress=False, data=digits)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((tmp_path / "a" / "moe.json").read_text())
    assert info["steps"] == 6 and info["stopped_on_max_steps"] is True


def test_a_width_matched_dense_baseline_trains_with_the_same_recipe(digits, trained_digits, tmp_path):
    _, info = trained_digits
    cfg = tiny_train_config(epochs=1, max_steps=4)
    target = cost_table(load_model(trained_digits[0])[0], digits.shape).static_topk_flops(2)
    dense, flops = match_dense_width(cfg.model, 1, 10, digits.shape, target, "flops")
    out = train(cfg, tmp_path / "dense", progress=False, data=digits, model=dense)
    assert out["model_config"]["kind"] == "dense" and out["cost"]["total_flops"] == flops


def test_cli_train_with_the_digits_config(tmp_path, capsys):
    assert main(["moe", "train", "--config", "configs/moe_digits.yaml", "--epochs", "1", "--out",
                 str(tmp_path / "run"), "--quiet"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["dataset"] == "digits" and s["kind"] == "graph" and 0 <= s["test_acc"] <= 1
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_cli_errors_are_one_line_naming_the_culprit(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: digits\nepohcs: 3\n")
    assert main(["moe", "train", "--config", str(bad), "--out", str(tmp_path / "x"), "--device", "cpu"]) == 1
    assert "refgen moe train: error:" in capsys.readouterr().err
    assert main(["moe", "train", "--dataset", "animal_mnist", "--cache", str(tmp_path / "empty"), "--device", "cpu",
                 "--out", str(tmp_path / "y"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "animal_data_version_3.gz" in err and "refgen moe fetch-data" in err
    with pytest.raises(ValueError, match="schedule must be one of"):
        MoETrainConfig(schedule="cosine")
    with pytest.raises(ValueError, match="lr must be a positive number"):
        MoETrainConfig(lr=float("nan"))


def test_cli_bench_and_rl(tmp_path, capsys, trained_digits):
    assert main(["moe", "bench", "--dataset", "digits", "--device", "cpu", "--section",
                 "sleep,flops,corruptions,latency,overhead", "--n-images", "20", "--iters", "10", "--steps", "4",
                 "--blocks", "2", "--batch", "16", "--sample-every", "2", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    s = json.loads(out[:out.rindex("}") + 1])
    assert s["sleep_pass"] is True and s["corruption_sha256_identical"] is True and s["flops_linear_in_batch"]
    assert "b1/k1/sparse" in s["latency_median_ms"] and "monitor_overhead_pct" in s
    assert 0 <= s["monitor_overhead_pct_direct"] < 5
    res = json.loads((tmp_path / "b" / "bench.json").read_text())["results"]
    assert len(res["corruptions"]["sets"]) == 7
    assert main(["moe", "bench", "--dataset", "digits", "--device", "cpu", "--section", "energy",
                 "--out", str(tmp_path / "e")]) == 1
    assert "energy" in capsys.readouterr().err
    assert main(["moe", "rl", "--model", str(trained_digits[0]), "--lambdas", "0,0.5", "--steps", "5", "--device",
                 "cpu", "--out", str(tmp_path / "rl"), "--quiet"]) == 0
    assert "static top-2" in capsys.readouterr().out and (tmp_path / "rl" / "rl.json").is_file()
