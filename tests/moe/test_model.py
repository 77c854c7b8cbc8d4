import dataclasses

import pytest
import torch
import torch.nn.functional as F

from refgen.moe.model import KINDS, DenseLogits, MoEClassifier, MoEModelConfig
from refgen.moe.train import MoETrainConfig

from .conftest import TINY_MODEL


def _model(kind, **kw):
    torch.manual_seed(0)
    return MoEClassifier(MoEModelConfig(**{**TINY_MODEL, "kind": kind, **kw}), 1, 10)


@pytest.mark.parametrize("kind", KINDS)
def test_routing_shapes_and_weights(kind):
    m = _model(kind, groups=2).eval()
    out = m(torch.randn(6, 1, 8, 8))
    r = out.routing
    assert out.logits.shape == (6, 10)
    E, k = m.cfg.num_experts, m.cfg.top_k
    assert r.mask.shape == (6, E) and (r.mask.sum(1) == k).all()
    assert ((r.weights > 0) == (r.mask > 0)).all()
    assert torch.allclose(r.probs.sum(1), torch.ones(6), atol=1e-6)
    if kind in ("flat", "graph", "dense"):
        assert torch.allclose(r.weights.sum(1), torch.ones(6), atol=1e-6)
    if kind == "hier":
        # the team lies inside one group, and its weights sum to that group's probability
        groups = r.mask.view(6, 2, 2).sum(2)
        assert ((groups == 2).sum(1) == 1).all()
        pg = r.probs.view(6, 2, 2).sum(2)
        assert torch.allclose(r.weights.sum(1), (pg * (groups == 2)).sum(1), atol=1e-6)


@pytest.mark.parametrize("kind,norm,mode", [("flat", "bn", "eval"), ("hier", "bn", "eval"), ("graph", "bn", "eval"),
                                            ("graph", "gn", "train")])
def test_dense_and_sparse_paths_agree_in_outputs_and_gradients(kind, norm, mode):
    """BatchNorm experts agree in eval mode (running statistics); GroupNorm experts in training mode too."""
    m = _model(kind, expert_norm=norm).train(mode == "train")
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    grads = []
    for path in ("dense", "sparse"):
        torch.manual_seed(1)
        m.zero_grad()
        out = m(x, path=path)
        F.cross_entropy(out.logits, y).backward()
        # an expert nobody chose gets a zero gradient on the dense path and none on the sparse one
        grads.append({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                      for n, p in m.named_parameters()})
        if path == "dense":
            ref = out.logits.detach()
        else:
            assert torch.allclose(out.logits, ref, atol=1e-5)
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n


def test_in_training_bn_experts_normalise_over_their_own_inputs():
    m = _model("flat").train()
    x = torch.randn(16, 1, 8, 8)
    mask = torch.zeros(16, 4)
    mask[:8, :2] = 1
    mask[8:, 2:] = 1
    dense, sparse = m(x, path="dense", mask=mask).logits, m(x, path="sparse", mask=mask).logits
    assert not torch.allclose(dense, sparse, atol=1e-4)
    m.eval()
    assert torch.allclose(m(x, path="dense", mask=mask).logits, m(x, path="sparse", mask=mask).logits, atol=1e-5)


def test_sparse_path_runs_each_expert_only_on_its_inputs():
    m = _model("graph").eval()
    seen = [0] * 4
    for i, e in enumerate(m.experts):
        e.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, seen[i] + inp[0].shape[0]))
    out = m(torch.randn(32, 1, 8, 8), path="sparse")
    assert seen == out.routing.mask.sum(0).int().tolist() and sum(seen) == 64
    seen[:] = [0] * 4
    m(torch.randn(32, 1, 8, 8), path="dense")
    assert seen == [32] * 4


def test_a_given_team_replaces_the_gate_choice():
    m = _model("flat").eval()
    x = torch.randn(4, 1, 8, 8)
    mask = torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 1]])
    out = m(x, path="sparse", mask=mask)
    assert torch.equal(out.routing.mask, mask)
    assert torch.allclose(out.logits, m(x, path="dense", mask=mask).logits, atol=1e-5)
    with pytest.raises(ValueError, match=r"mask must have shape \(4, 4\)"):
        m(x, mask=torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"expected input \[B, 1, H, W\]"):
        m(torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match="path must be one of"):
        m(x, path="fast")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="model.kind"):
        MoEModelConfig(kind="soft")
    with pytest.raises(ValueError, match=r"top_k=5 must be in 1..num_experts=4"):
        MoEModelConfig(top_k=5)
    with pytest.raises(ValueError, match="groups=3 must divide num_experts=4"):
        MoEModelConfig(kind="hier", groups=3)
    with pytest.raises(ValueError, match="exceeds the group size 2"):
        MoEModelConfig(kind="hier", groups=2, top_k=3)
    assert MoEModelConfig(kind="dense", num_experts=8, top_k=3).num_experts == 1


@pytest.mark.parametrize("name,channels,classes", [("mnist", 1, 10), ("animal_mnist", 1, 10), ("toyworld27", 3, 27)])
def test_acceptance_recipes_stay_within_250k_parameters(name, channels, classes):
    cfg = MoETrainConfig.from_yaml(f"configs/moe_{name}.yaml")
    n = MoEClassifier(cfg.model, channels, classes).num_params()
    assert n <= 250_000, n


def test_param_groups_partition_the_parameters():
    m = _model("graph")
    g = m.param_groups()
    ids = [id(p) for p in g["gate"] + g["experts"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert {id(p) for p in g["gate"]} == {id(p) for p in [*m.gate.parameters(), *m.graph.parameters()]}


def test_the_dense_path_exports_with_torch_export():
    m = _model("graph").eval()
    x = torch.randn(3, 1, 8, 8)
    ep = torch.export.export(DenseLogits(m), (x,))
    assert torch.allclose(ep.module()(x), m(x).logits, atol=1e-5)
    assert dataclasses.asdict(m.cfg)["kind"] == "graph"


def test_balance_loss_prefers_confident_balanced_routing():
    from refgen.moe.model import balance_loss, switch_balance_loss

    eye = torch.eye(4)
    balanced = eye.repeat(2, 1)                               # each input commits, experts equally used
    collapsed = eye[[0] * 8]                                  # each input commits, all to expert 0
    uniform = torch.full((8, 4), 0.25)                        # nobody commits; top-2 decided by tie-breaks
    fixed_pair = torch.tensor([[1.0, 1, 0, 0]] * 8)
    assert float(switch_balance_loss(uniform, fixed_pair)) == pytest.approx(1.0)  # the Switch term is blind to it
    assert float(balance_loss(balanced, balanced)) == pytest.approx(1.0)
    assert float(balance_loss(uniform, fixed_pair)) == pytest.approx(2.0)
    assert float(balance_loss(collapsed, collapsed)) == pytest.approx(7.0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 8, requires_grad=True)
    balance_loss(logits.softmax(1), fixed_pair).backward()
    assert logits.grad[:, 3].sum() < 0  # descending the loss raises the expert nobody chose
