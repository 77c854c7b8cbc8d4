import itertools
import json

import pytest
import torch

from refgen.moe import routing as R
from refgen.moe.cost import cost_table
from refgen.moe.train import Batches, load_model, split_data

from .conftest import tiny_train_config


def test_plackett_luce_probabilities_sum_to_one_and_match_gumbel_top_k_sampling():
    scores = torch.tensor([[1.0, 0.2, -0.5, 0.7]])
    total, probs = 0.0, {}
    for pair in itertools.permutations(range(4), 2):
        order = torch.tensor([list(pair) + [i for i in range(4) if i not in pair]])
        p = float(R.plackett_luce_logp(scores, order, torch.tensor([2])).exp())
        probs[frozenset(pair)] = probs.get(frozenset(pair), 0) + p
        total += p
    assert total == pytest.approx(1.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    n = 20000
    mask, _, m = R.sample_team(scores.expand(n, 4), torch.tensor([[-30.0, 30.0, -30.0]]).expand(n, 3), 1.0, g)
    assert (m == 2).all() and (mask.sum(1) == 2).all()
    for team, p in probs.items():
        idx = sorted(team)
        freq = float(((mask[:, idx[0]] == 1) & (mask[:, idx[1]] == 1)).float().mean())
        assert abs(freq - p) < 0.015, (team, freq, p)


def test_sample_team_log_prob_has_gradients():
    scores = torch.randn(5, 4, requires_grad=True)
    counts = torch.randn(5, 3, requires_grad=True)
    mask, logp, m = R.sample_team(scores, counts, 0.7, torch.Generator().manual_seed(0))
    assert (mask.sum(1) == m).all() and torch.isfinite(logp).all()
    logp.sum().backward()
    assert scores.grad.abs().sum() > 0 and counts.grad.abs().sum() > 0
    gm, gmm = R.greedy_team(torch.tensor([[0.1, 0.9, 0.5, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]]))
    assert gm.tolist() == [[0, 1, 1, 0]] and gmm.tolist() == [2]


@pytest.fixture(scope="module")
def env_parts(trained_digits, digits):
    folder, info = trained_digits
    model, _ = load_model(folder)
    tr, _, mean, std = split_data(tiny_train_config(), digits)
    data = Batches(digits.x_train[tr], digits.y_train[tr], mean, std, "cpu")
    return model, data, cost_table(model, digits.shape)


def test_env_is_deterministic_and_rewards_are_accuracy_minus_lambda_cost(env_parts):
    model, data, table = env_parts
    env = R.RoutingEnv(model, data, table, lam=0.5, batch_size=32, seed=3)
    s1 = env.reset(seed=7)
    mask = torch.zeros(32, 4)
    mask[:, 0] = 1
    mask[::2, 1] = 1
    _, r1, done, i1 = env.step(mask)
    s2 = env.reset(seed=7)
    _, r2, _, i2 = env.step(mask)
    assert done and torch.equal(s1, s2) and torch.equal(r1, r2)
    assert s1.shape == (32, env.state_dim)
    expect = table.active_flops(mask) / table.static_topk_flops(2)
    assert torch.allclose(i1["cost"], expect.float())
    assert torch.allclose(r1, i1["correct"] - 0.5 * i1["cost"])
    assert i1["cost"][1] < i1["cost"][0]  # one expert is cheaper than two
    with pytest.raises(ValueError, match="at least one expert"):
        env.step(torch.zeros(32, 4))
    with pytest.raises(RuntimeError, match="before reset"):
        R.RoutingEnv(model, data, table, 0.1, 8).step(mask)


def test_reinforce_moves_to_cheaper_teams_when_cost_matters(env_parts):
    model, data, table = env_parts
    cfg = R.RLConfig(lambdas=[2.0], steps=60, batch_size=64, finetune_experts=False, seed=0, lr=1e-2)
    policy, same = R.train_gate(model, data, table, 2.0, cfg)
    assert same is model
    env = R.RoutingEnv(model, data, table, 2.0, 256, seed=1)
    mask, m = R.greedy_team(*policy(env.reset()))
    assert float(m.float().mean()) < 1.2  # started uniform over 1, 2, 3


def test_pareto_front():
    pts = [(1.0, 0.90), (2.0, 0.95), (1.5, 0.89), (2.0, 0.94), (3.0, 0.95)]
    assert R.pareto_front(pts) == [True, True, False, False, False]


def test_rl_sweep_end_to_end_is_reproducible(trained_digits, digits, tmp_path):
    folder, _ = trained_digits
    cfg = R.RLConfig(lambdas=[0.0, 1.0], steps=25, batch_size=64, device="cpu", eval_batch=256)
    a = R.rl_sweep(folder, cfg, tmp_path / "a", progress=False, data=digits)
    b = R.rl_sweep(folder, cfg, tmp_path / "b", progress=False, data=digits)
    strip = lambda r: [{k: v for k, v in x.items()} for x in r["lambdas"]]  # noqa: E731
    assert strip(a) == strip(b)
    rec = json.loads((tmp_path / "a" / "rl.json").read_text())
    assert rec["git_commit"] is not None or rec["versions"]["torch"]
    assert [r["lam"] for r in rec["lambdas"]] == [0.0, 1.0] and len(rec["static_topk"]) == 3
    for r in rec["lambdas"]:
        assert 0 <= r["acc"] <= 1 and 0 <= r["random_gate_acc"] <= 1 and sum(r["team_size_hist"]) == 450
        assert r["margin_over_random_pp"] == pytest.approx(100 * (r["acc"] - r["random_gate_acc"]))
    assert (tmp_path / "a" / "lambda_1" / "policy.safetensors").is_file()
    kinds = {json.loads(line)["kind"] for line in open(tmp_path / "a" / "rl_metrics.jsonl")}
    assert kinds == {"episode", "lambda"}


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="lambdas"):
        R.RLConfig(lambdas=[-1.0])
    with pytest.raises(ValueError, match="tau_end"):
        R.RLConfig(tau_start=0.5, tau_end=1.0)
    with pytest.raises(ValueError, match="max_experts must be in 1..4"):
        R.TeamPolicy(10, 4, 5)
