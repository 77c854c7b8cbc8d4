"""graph_target_sparsity: the sparsity of the expert graph stated as such (gradual magnitude pruning of the
off-diagonal edges, Zhu & Gupta's cubic schedule) instead of an L1 coefficient (docs/moe.md, A3)."""

import json

import pytest
import torch

from refgen.moe import graph as graph_mod
from refgen.moe import train as train_mod
from refgen.moe.graph import ExpertGraph
from refgen.moe.train import MoETrainConfig, graph_prune_schedule, train

from .conftest import tiny_train_config

OFF = ~torch.eye(4, dtype=torch.bool)


def _records(folder, kind):
    return [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_config_checks_name_the_key():
    with pytest.raises(ValueError, match=r"graph_target_sparsity must be in \[0, 1\)"):
        MoETrainConfig(graph_target_sparsity=1.0, graph_l1=0.0)
    with pytest.raises(ValueError, match="graph_target_sparsity"):
        MoETrainConfig(graph_target_sparsity=-0.1, graph_l1=0.0)
    with pytest.raises(ValueError, match="set graph_l1: 0 with it"):
        MoETrainConfig(graph_target_sparsity=0.5)          # the default graph_l1 is 3e-4
    assert MoETrainConfig().graph_target_sparsity == 0.0
    assert MoETrainConfig(graph_target_sparsity=0.5, graph_l1=0.0).graph_target_sparsity == 0.5


def test_cubic_schedule():
    T, s = 1000, 0.5
    assert graph_prune_schedule(0, T, s) == graph_prune_schedule(250, T, s) == 0.0
    assert graph_prune_schedule(500, T, s) == pytest.approx(s * (1 - 0.5 ** 3))   # 7/8 of it at half the span
    assert graph_prune_schedule(750, T, s) == graph_prune_schedule(T, T, s) == s
    v = [graph_prune_schedule(t, T, s) for t in range(T + 1)]
    assert all(a <= b for a, b in zip(v, v[1:]))


def test_prune_smallest_by_magnitude_keeps_pruned_edges_and_the_diagonal():
    g = ExpertGraph(4, 8, self_loop="fixed")
    with torch.no_grad():
        g.weight.copy_(torch.arange(16.0).view(4, 4) / 10 + 0.05)
    diag = g.weight.diagonal().clone()
    m = g.prune_smallest(torch.zeros(4, 4, dtype=torch.bool), 3)
    assert m.sum() == 3 and set(m.flatten().nonzero().flatten().tolist()) == {1, 2, 3}   # row 0's edges
    assert (g.weight[m] == 0).all() and torch.equal(g.weight.diagonal(), diag)
    with torch.no_grad():   # an optimizer step moves a pruned edge: it stays pruned, nothing else goes
        g.weight[0, 1] = 5.0
    m2 = g.prune_smallest(m, 3)
    assert torch.equal(m2, m) and g.weight[0, 1] == 0
    m3 = g.prune_smallest(m2, 5)
    assert m3.sum() == 5 and (m3 & m).sum() == 3 and (g.adjacency()[m3] == 0).all()
    assert not (m3 & ~OFF).any() and torch.equal(g.weight.diagonal(), diag)
    with pytest.raises(ValueError, match="count must be in 0..12"):
        g.prune_smallest(m3, 13)


def test_off_is_the_code_path_of_before(digits, tmp_path, monkeypatch):
    """graph_target_sparsity 0 (the default) never reaches the pruning code, and a few steps give the same losses
    and weights as a config that does not name the key."""
    def boom(*a, **k):
        raise AssertionError("pruning code reached with graph_target_sparsity 0")

    cfg = dict(max_steps=4, log_every=1, monitor=False, schedule="onecycle")
    a = train(tiny_train_config(**cfg), tmp_path / "a", progress=False, data=digits)
    monkeypatch.setattr(graph_mod.ExpertGraph, "prune_smallest", boom)
    monkeypatch.setattr(train_mod, "graph_prune_schedule", boom)
    b = train(tiny_train_config(graph_target_sparsity=0.0, **cfg), tmp_path / "b", progress=False, data=digits)
    assert a["steps"] == b["steps"] == 4
    la, lb = ([r["loss"] for r in _records(tmp_path / k, "train")] for k in "ab")
    assert len(la) == 4 and la == lb
    from safetensors.torch import load_file
    wa, wb = (load_file(str(tmp_path / k / "model.safetensors")) for k in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not _records(tmp_path / "b", "graph_prune")


def test_target_sparsity_prunes_to_the_target_and_the_model_still_trains(digits, tmp_path):
    """Half of the 12 off-diagonal edges pruned by the end, exactly 0 from the step they go on, the diagonal at 1,
    the loss falling and the digits learnt."""
    info = train(tiny_train_config(epochs=6, schedule="onecycle", lr=2e-2, monitor=False, seed=0, graph_l1=0.0,
                                   graph_target_sparsity=0.5), tmp_path, progress=False, data=digits)
    a = torch.tensor(info["graph"]["adjacency"])
    assert int((a[OFF] == 0).sum()) == round(0.5 * 12) and (a.diagonal() == 1).all(), a
    assert info["graph"]["sparsity"] == 0.5 and info["graph"]["dist_from_identity"] > 0
    events = _records(tmp_path, "graph_prune")
    assert [e["pruned"] for e in events] == sorted(e["pruned"] for e in events) and events[-1]["pruned"] == 6
    total = info["steps"]
    assert all(0.25 * total < e["step"] <= 0.75 * total + 1 for e in events)
    final = torch.tensor(events[-1]["mask"], dtype=torch.bool)
    assert torch.equal(final, a == 0)
    for e in events:        # once pruned, an edge is 0 in every later epoch's adjacency
        m = torch.tensor(e["mask"], dtype=torch.bool)
        for r in _records(tmp_path, "epoch"):
            if r["step"] >= e["step"]:
                assert (torch.tensor(r["adjacency"])[m] == 0).all(), (e["step"], r["step"])
    losses = [r["loss"] for r in _records(tmp_path, "train")]
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3]), losses
    assert info["metrics"]["test"]["acc"] > 0.85


def test_graph_configs_list_the_key():
    """Every configs/moe_*.yaml that sets graph_l1 also shows graph_target_sparsity: 0.5 with the L1 off on the two
    data sets where no L1 value met A3 on the H200 (Animal-MNIST, ToyWorld-27; also the ToyWorld-27 robust recipe, which
    is the plain one + augmentation), 0 elsewhere; each loads."""
    from pathlib import Path

    import yaml

    named = [p for p in sorted(Path("configs").glob("moe_*.yaml")) if "graph_l1" in yaml.safe_load(p.read_text())]
    assert len(named) >= 5
    for p in named:
        cfg = MoETrainConfig.from_yaml(p)
        want = 0.5 if p.stem in ("moe_animal_mnist", "moe_toyworld27", "moe_toyworld27_robust") else 0.0
        assert yaml.safe_load(p.read_text()).get("graph_target_sparsity") == want == cfg.graph_target_sparsity, p
        assert cfg.graph_l1 == 0.0 or want == 0.0, p
