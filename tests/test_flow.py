import torch

from refgen import flow


def test_noising_endpoints_and_target():
    x0, eps = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert torch.equal(flow.add_noise(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(flow.add_noise(x0, eps, torch.ones(3)), eps)
    mid = flow.add_noise(x0, eps, torch.tensor([0.25, 0.5, 0.75]))
    assert torch.allclose(mid[1], 0.5 * x0[1] + 0.5 * eps[1])
    assert torch.equal(flow.velocity_target(x0, eps), eps - x0)


def test_euler_is_exact_for_the_true_velocity():
    # For a single data point the optimal velocity field is constant (eps - x0), so Euler with any
    # number of steps must land exactly on x0: checks signs and the step direction.
    x0, eps = torch.randn(2, 8), torch.randn(2, 8)
    out = flow.euler_sample(lambda x, s: eps - x0, eps, flow.sigma_schedule(3, shift=3.0))
    assert torch.allclose(out, x0, atol=1e-6)


def test_sigma_sampling_and_schedule():
    g = torch.Generator().manual_seed(0)
    for mode in ("uniform", "logit_normal"):
        s = flow.sample_sigmas(1000, mode, generator=g)
        assert s.shape == (1000,) and (s > 0).all() and (s < 1).all()
    sched = flow.sigma_schedule(4, shift=3.0)
    assert sched[0] == 1 and sched[-1] == 0 and (sched[1:] < sched[:-1]).all()
    assert sched[2] > 0.5  # shift spends more steps at high noise


def test_loss_per_sample_and_cfg():
    model = lambda x, s, c: x * c  # noqa: E731
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    per = flow.loss(model, x0, 0.0, sigma=torch.full((4,), 0.5), noise=eps, reduction="none")
    assert per.shape == (4,) and torch.allclose(per, (eps - x0).pow(2).mean(1))
    u, t, d = torch.zeros(2), torch.ones(2), 2 * torch.ones(2)
    assert torch.equal(flow.cfg(t, u, 3.0), 3 * torch.ones(2))
    assert torch.equal(flow.dual_cfg(u, t, d, 2.0, 0.5), 3 * torch.ones(2))
