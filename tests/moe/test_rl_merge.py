"""An RL sweep split over processes (bench/moe_acceptance.py --rl-lambdas, then --only rl-merge) gives the rl.json
one sweep over all lambdas gives: same rows, Pareto flags over all of them (refgen.moe.routing.merge_sweeps)."""

import json
import shutil

import pytest

from refgen.moe import routing as R

KEYS = ("lam", "acc", "random_gate_acc", "active_flops_per_image", "flops_vs_static_ref", "team_size_hist",
        "delta_acc_pp_vs_static_ref", "margin_over_random_pp", "on_pareto_front")


@pytest.fixture(scope="module")
def acc(bench_module):
    return bench_module("moe_acceptance")


def test_a_split_sweep_merges_into_the_one_sweep(acc, trained_digits, digits, tmp_path, capsys):
    out = tmp_path / "acc"
    shutil.copytree(trained_digits[0], out / "digits" / "graph_s0")
    common = ["--out", str(out), "--datasets", "digits", "--seeds", "0", "--device", "cpu", "--rl-steps", "12",
              "--quiet", "--config-dir", "configs"]
    lams = [0.0, 0.3, 1.0]
    for part in ("1,0", "0.3"):
        assert acc.main(common + ["--only", "rl", "--rl-lambdas", part]) == 0
    parts = out / "digits" / "rl_parts"
    assert sorted(p.name for p in parts.iterdir()) == ["lam_0.3", "lam_1_0"]
    assert not (out / "digits" / "rl" / "rl.json").exists()
    assert acc.main(common + ["--only", "rl-merge"]) == 0
    merged = json.loads((out / "digits" / "rl" / "rl.json").read_text())

    cfg = R.RLConfig.from_yaml("configs/moe_rl.yaml", lambdas=lams, steps=12, device="cpu")
    one = R.rl_sweep(out / "digits" / "graph_s0", cfg, tmp_path / "one", progress=False, data=digits)
    assert [r["lam"] for r in merged["lambdas"]] == lams == merged["config"]["lambdas"]
    assert [{k: r[k] for k in KEYS} for r in merged["lambdas"]] == [{k: r[k] for k in KEYS} for r in one["lambdas"]]
    assert merged["pareto_points"] == one["pareto_points"]
    assert merged["reference"] == one["reference"] and merged["reference_acc_spread_pp"] == 0
    assert sorted(m["lambdas"] for m in merged["merged_from"]) == [[0.3], [1.0, 0.0]]
    # the acceptance table reads the merged sweep like a single one
    table = (out / "acceptance.md").read_text()
    assert table.count("| digits | ") >= len(lams)
    capsys.readouterr()


def _part(lams, accs, flops, steps=1500, model="m"):
    rows = [dict(lam=lam, acc=a, random_gate_acc=a - 0.01, active_flops_per_image=f, flops_vs_static_ref=f / 2,
                 delta_acc_pp_vs_static_ref=0.0, margin_over_random_pp=1.0, on_pareto_front=True)
            for lam, a, f in zip(lams, accs, flops)]
    return {"config": {"lambdas": lams, "steps": steps, "device": "cuda", "threads": 1}, "model_dir": model,
            "dataset": "mnist", "reference": {"k": 2, "acc": 0.99}, "static_topk": [], "lambdas": rows,
            "pareto_points": len(rows), "seconds": 10.0, "device": "cuda"}


def test_merge_recomputes_the_front_and_refuses_what_is_not_one_sweep(tmp_path):
    # each part alone has every point on its front; together (2, 0.985) is dominated by (1, 0.99)
    a, b = _part([0.0, 0.1], [0.995, 0.985], [3.0, 2.0]), _part([0.2], [0.99], [1.0])
    m = R.merge_sweeps([b, a], tmp_path)
    assert [r["lam"] for r in m["lambdas"]] == [0.0, 0.1, 0.2]
    assert [r["on_pareto_front"] for r in m["lambdas"]] == [True, False, True] and m["pareto_points"] == 2
    assert [r["delta_acc_pp_vs_static_ref"] for r in m["lambdas"]] == pytest.approx([0.5, -0.5, 0.0])
    assert m["seconds"] == 20.0 and json.loads((tmp_path / "rl.json").read_text())["pareto_points"] == 2
    assert a["lambdas"][1]["on_pareto_front"]  # the parts are not modified
    with pytest.raises(ValueError, match="more than one part"):
        R.merge_sweeps([a, _part([0.1], [0.9], [1.0])])
    with pytest.raises(ValueError, match=r"config \['steps'\]"):
        R.merge_sweeps([a, _part([0.3], [0.9], [1.0], steps=150)])
    with pytest.raises(ValueError, match="model_dir"):
        R.merge_sweeps([a, _part([0.3], [0.9], [1.0], model="other")])
    with pytest.raises(ValueError, match="at least one"):
        R.merge_sweeps([])
