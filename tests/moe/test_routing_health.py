"""Tests that would have caught the routing collapse of the 2026-11-30 H200 acceptance runs (docs/moe.md, "Why the
gate did not learn"): an input-independent gate at init, no task gradient into a top-1 gate, graph edges that
could never come back from zero."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from refgen.moe.graph import ExpertGraph
from refgen.moe.model import MoEClassifier, MoEModelConfig
from refgen.moe.train import Batches, MoETrainConfig, load_model, split_data

from .conftest import TINY_MODEL


def _digits_batch(digits, n=256):
    tr, _, mean, std = split_data(MoETrainConfig(dataset="digits"), digits)
    b = Batches(digits.x_train[tr], digits.y_train[tr], mean, std, "cpu")
    return b.get(torch.arange(n))


@pytest.mark.parametrize("name", ["mnist", "animal_mnist"])
@pytest.mark.parametrize("seed", [17, 42, 1337])
def test_at_init_the_gate_depends_on_the_input_and_uses_every_expert(digits, name, seed):
    """Before the fix every input went to the same two experts at step 0 (shares 0.5 / 0 / 0 / 0.5): the gate's
    constant part (non-negative features, output bias) was ~10x its input-dependent part."""
    x, _ = _digits_batch(digits)
    cfg = MoETrainConfig.from_yaml(f"configs/moe_{name}.yaml")
    torch.manual_seed(seed)
    m = MoEClassifier(cfg.model, 1, 10).train()
    with torch.no_grad():
        z = m.features(x)
        logits = m.gate(m.gate_input(z))
        r = m.route(z)
    share = r.mask.mean(0) / cfg.model.top_k
    assert share.min() >= 0.05, share
    spread = logits.std(0).mean()                      # input-dependent part
    offset = logits.mean(0).std()                      # preference of one expert over another for every input
    assert spread > 2 * offset, (spread, offset)


@pytest.mark.parametrize("kind,k", [("flat", 1), ("flat", 2), ("graph", 1), ("graph", 2), ("hier", 1)])
def test_the_task_loss_reaches_the_gate(kind, k):
    """With weights renormalised over a team of one, a top-1 gate's weight was the constant 1: the cross-entropy
    gave its gate no gradient at all."""
    torch.manual_seed(0)
    m = MoEClassifier(MoEModelConfig(**{**TINY_MODEL, "kind": kind, "top_k": k}), 1, 10).train()
    out = m(torch.randn(32, 1, 8, 8), path="sparse")
    assert torch.allclose(out.routing.weights.sum(1), out.routing.weights.sum(1).detach())
    if kind != "hier":
        assert torch.allclose(out.routing.weights.sum(1), torch.ones(32))
    F.cross_entropy(out.logits, torch.randint(0, 10, (32,))).backward()
    g = sum(float(p.grad.abs().sum()) for p in m.gate.parameters() if p.grad is not None)
    assert g > 0


def test_a_tiny_training_run_routes_by_input_and_uses_every_expert(trained_digits):
    t = trained_digits[1]["metrics"]["test"]
    E = len(t["routing_share"])
    assert t["min_routing_share"] >= 0.05, t["routing_share"]
    # the gate commits per input (ln E = the same uniform distribution for every input) ...
    assert t["gate_entropy_per_sample"] < 0.9 * math.log(E), t["gate_entropy_per_sample"]
    # ... while the experts stay balanced on average
    assert t["gate_entropy_batch_mean"] > 0.85 * math.log(E)


def test_an_edge_at_zero_still_gets_its_gradient_and_can_grow_back():
    g = ExpertGraph(3, 4)
    with torch.no_grad():
        g.weight[0, 1] = 0.0
        g.msg.weight.copy_(torch.eye(4))
        g.msg.bias.fill_(0.1)
    h = torch.zeros(1, 3, 4)
    h[0, 1] = 1.0  # expert 0's output is relu(m_0 + 0.1), m_0 = A_01 / (A_00 + A_01 + A_02): it grows with the edge 0 <- 1
    out = g(h, torch.ones(1, 3))
    out[0, 0].sum().backward()
    assert g.adjacency()[0, 1] == 0 and g.weight.grad[0, 1] > 0  # relu(W) gave 0 here
    opt = torch.optim.Adam([g.weight], lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        (-g(h, torch.ones(1, 3))[0, 0, :].sum()).backward()
        opt.step()
        g.prox_l1(0.005)
    assert g.adjacency()[0, 1] > 0.1


def test_a_checkpoint_from_before_the_fix_loads_with_its_old_gate(tmp_path):
    cfg = MoEModelConfig(**{**TINY_MODEL, "kind": "flat", "gate_norm": "none", "gate_bias": True})
    torch.manual_seed(0)
    m = MoEClassifier(cfg, 1, 10).eval()
    d = {k: v for k, v in __import__("dataclasses").asdict(cfg).items() if k not in ("gate_norm", "gate_bias")}
    save_file(m.state_dict(), tmp_path / "model.safetensors",
              metadata={"refgen_moe_config": json.dumps(d), "in_channels": "1", "num_classes": "10"})
    m2, _ = load_model(tmp_path)
    x = torch.randn(4, 1, 8, 8)
    assert m2.cfg.gate_norm == "none" and m2.cfg.gate_bias
    assert torch.equal(m2(x).logits, m(x).logits)


def test_config_checks_for_the_router():
    with pytest.raises(ValueError, match="gate_norm"):
        MoEModelConfig(gate_norm="ln")
    with pytest.raises(ValueError, match="gate_hidden"):
        MoEModelConfig(gate_hidden=-1)
    with pytest.raises(ValueError, match="balance must be one of"):
        MoETrainConfig(balance="cv")
    m = MoEClassifier(MoEModelConfig(**{**TINY_MODEL, "kind": "flat", "gate_hidden": 0}), 1, 10)
    assert [type(x).__name__ for x in m.gate] == ["GateNorm", "Linear"] and m.gate[1].bias is None
    out = m.train()(torch.randn(1, 1, 8, 8))  # a training batch of one: running statistics, no error
    assert out.logits.shape == (1, 10)


@pytest.mark.parametrize("k", [1, 2])
def test_the_task_loss_reaches_the_in_group_gate_of_the_hierarchical_gate(k):
    """Renormalised over a team of one, the hierarchical gate's in-group weight was the constant 1: at top-1 the
    cross-entropy reached the group gate only, and the in-group choice was trained by the balance terms alone."""
    torch.manual_seed(0)
    cfg = MoEModelConfig(**{**TINY_MODEL, "kind": "hier", "top_k": k})
    m = MoEClassifier(cfg, 1, 10).train()
    out = m(torch.randn(32, 1, 8, 8), path="sparse")
    r, G = out.routing, cfg.groups
    # the value is unchanged: the team's weights sum to the chosen group's probability
    pg = r.logits[:, :G].softmax(1)
    assert torch.allclose(r.weights.sum(1), pg.max(1).values, atol=1e-6)
    F.cross_entropy(out.logits, torch.randint(0, 10, (32,))).backward()
    grad = m.gate[-1].weight.grad
    group, in_group = float(grad[:G].abs().sum()), float(grad[G:].abs().sum())
    assert group > 0 and in_group > 0.1 * group, (group, in_group)  # before the fix at k = 1: 1e-8 against 0.14
