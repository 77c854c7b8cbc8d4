import pytest
import torch

from refgen.moe.graph import ExpertGraph, graph_stats


def test_l1_on_a_softmax_is_constant_which_is_why_raw_edges_are_used():
    w = torch.randn(4, 4, requires_grad=True)
    s = w.softmax(1)
    l1 = s.abs().sum()
    l1.backward()
    assert torch.allclose(l1, torch.tensor(4.0)) and w.grad.abs().max() < 1e-6
    g = ExpertGraph(4, 8, init="random", generator=torch.Generator().manual_seed(0))
    g.l1().backward()
    off = ~torch.eye(4, dtype=torch.bool)
    assert (g.weight.grad[off] == 1).all() and (g.weight.grad.diagonal() == 0).all()


def test_edges_are_non_negative_rows_normalised_and_l1_makes_exact_zeros():
    torch.manual_seed(0)
    g = ExpertGraph(4, 8, init="random")
    n = g.normalized()
    assert (g.adjacency() >= 0).all() and torch.allclose(n.sum(1), torch.ones(4))
    opt = torch.optim.SGD([g.weight], lr=0.05)
    for _ in range(30):
        opt.zero_grad()
        g.l1().backward()
        opt.step()
    st = graph_stats(g)
    assert st["sparsity"] == 1.0 and (g.adjacency()[~torch.eye(4, dtype=torch.bool)] == 0).all()
    assert st["dist_from_identity"] < 1e-6


def test_sparsity_and_distance_definitions():
    g = ExpertGraph(3, 4)
    with torch.no_grad():
        g.weight.copy_(torch.tensor([[1.0, 0.005, 0.5], [0.0, 1.0, 0.0], [0.2, 0.2, 1.0]]))
    st = graph_stats(g)
    # off-diagonal below 0.01 x row max: (0,1) 0.005, (1,0), (1,2) -> 3 of 6
    assert st["sparsity"] == 0.5
    n = torch.tensor(st["normalized"])
    assert abs(st["dist_from_identity"] - float(torch.linalg.matrix_norm(n - torch.eye(3)))) < 1e-7
    assert st["dist_from_identity"] > 0.1


def test_message_passing_stays_inside_the_team_and_gradients_flow():
    torch.manual_seed(0)
    g = ExpertGraph(4, 6, init="random")
    h = torch.randn(3, 4, 6)
    mask = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1]])
    out = g(h, mask)
    assert out.shape == (3, 4, 6)
    assert (out[0, 2:] == 0).all() and (out[1, [0, 1, 3]] == 0).all()
    # a team of one receives only its own vector as message
    alone = h[1, 2] + torch.relu(g.msg(h[1, 2]))
    assert torch.allclose(out[1, 2], alone, atol=1e-6)
    # what experts outside the team hold does not matter
    h2 = h.clone()
    h2[0, 2:] = 1e3
    assert torch.allclose(g(h2, mask)[0], out[0])
    out.sum().backward()
    assert g.weight.grad.abs().sum() > 0 and g.msg.weight.grad.abs().sum() > 0
    assert torch.equal(g(h, mask), out.detach()) or torch.allclose(g(h, mask), out)


def test_proximal_l1_shrinks_off_diagonal_edges_to_exact_zero_and_projects_onto_non_negative():
    g = ExpertGraph(3, 4)
    with torch.no_grad():
        g.weight.copy_(torch.tensor([[1.0, 0.05, 0.5], [-0.2, 1.0, 0.02], [0.2, 0.3, 1.0]]))
    g.prox_l1(0.04)
    want = torch.tensor([[1.0, 0.01, 0.46], [0.0, 1.0, 0.0], [0.16, 0.26, 1.0]])
    assert torch.allclose(g.weight, want, atol=1e-7) and g.weight[1, 2] == 0
    # Adam normalises a dominating L1 subgradient to a full learning-rate step: why the prox is used instead
    w = torch.nn.Parameter(torch.full((2,), 0.5))
    opt = torch.optim.Adam([w], lr=0.01)
    for _ in range(10):
        opt.zero_grad()
        (1e-6 * w.abs().sum()).backward()
        opt.step()
    assert torch.allclose(w, torch.full((2,), 0.4), atol=1e-3)
    with pytest.raises(ValueError, match="prox step"):
        g.prox_l1(-1.0)
