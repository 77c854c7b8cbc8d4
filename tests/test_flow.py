"""refgen.flow against diffusers' FlowMatchEulerDiscreteScheduler, the sampler Qwen-Image and FLUX ship with:
the same noising path, the target's sign and the Euler step direction come from it, not from our own formulas."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from refgen import flow


def _scheduler(steps=4):
    s = FlowMatchEulerDiscreteScheduler()
    s.set_timesteps(steps)
    return s


def test_noising_is_the_schedulers():
    x0, eps = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    sched = _scheduler()
    for t, sigma in zip(sched.timesteps, sched.sigmas):
        ref = sched.scale_noise(x0, t.repeat(3), eps)
        torch.testing.assert_close(flow.add_noise(x0, eps, sigma.repeat(3)), ref)
    assert torch.equal(flow.add_noise(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(flow.add_noise(x0, eps, torch.ones(3)), eps)


def test_the_target_moves_the_scheduler_along_the_noising_path():
    """The scheduler's step fed the loss's target lands on the path at the next sigma; the opposite sign
    does not: the target is d x_sigma / d sigma as the sampler integrates it."""
    x0, eps = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    sched = _scheduler()
    v = flow.velocity_target(x0, eps)
    for i, t in enumerate(sched.timesteps):
        x = flow.add_noise(x0, eps, sched.sigmas[i].repeat(2))
        want = flow.add_noise(x0, eps, sched.sigmas[i + 1].repeat(2))
        flipped = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * -v
        got = sched.step(v, t, x).prev_sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"step {i}: {m}")
        assert (flipped - want).abs().max() > (sched.sigmas[i] - sched.sigmas[i + 1])  # 2 |dsigma| |v|


def test_euler_sample_takes_the_schedulers_steps():
    """A velocity that depends on x and sigma (not a constant that any direction could integrate)."""
    sched = _scheduler(6)
    noise = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))

    def velocity(x, s):
        return torch.tanh(x) * s.view(-1, 1, 1) + 0.3

    ours = flow.euler_sample(velocity, noise, sched.sigmas)
    x = noise
    for i, t in enumerate(sched.timesteps):
        x = sched.step(velocity(x, sched.sigmas[i].repeat(2)), t, x).prev_sample
    torch.testing.assert_close(ours, x)
    assert (ours - noise).abs().max() > 0.1


def test_loss_is_zero_for_the_path_velocity_and_sees_its_sign():
    """The path velocity by finite differences of the scheduler's own noising (it is linear in sigma): the
    loss of a model predicting it is 0, of one predicting its negative 4 |v|^2, per sample."""
    x0, eps = torch.randn(4, 6, 3), torch.randn(4, 6, 3)
    sched = _scheduler()
    (ta, tb), (sa, sb) = sched.timesteps[1:3], sched.sigmas[1:3]
    v_path = (sched.scale_noise(x0, ta.repeat(4), eps) - sched.scale_noise(x0, tb.repeat(4), eps)) / (sa - sb)
    sigma = torch.tensor([0.1, 0.4, 0.6, 0.9])
    right = flow.loss(lambda x, s, c: v_path, x0, None, sigma=sigma, noise=eps, reduction="none")
    wrong = flow.loss(lambda x, s, c: -v_path, x0, None, sigma=sigma, noise=eps, reduction="none")
    assert right.shape == (4,) and right.max() < 1e-8
    torch.testing.assert_close(wrong, 4 * v_path.pow(2).flatten(1).mean(1), rtol=1e-4, atol=1e-6)
    assert flow.loss(lambda x, s, c: -v_path, x0, None, sigma=sigma, noise=eps) == pytest.approx(wrong.mean().item())
    # the one-step estimate from the path velocity is the clean sample; from a wrong one it is off by sigma * error
    per, x_t, v = flow.loss_and_prediction(lambda x, s, c: v_path, x0, None, sigma=sigma, noise=eps)
    torch.testing.assert_close(per, right)
    torch.testing.assert_close(flow.predict_x0(x_t, v, sigma), x0, rtol=1e-4, atol=1e-5)
    off = flow.predict_x0(x_t, -v_path, sigma) - x0
    torch.testing.assert_close(off, 2 * sigma.view(-1, 1, 1) * v_path, rtol=1e-4, atol=1e-5)


def test_sigma_sampling_and_schedule():
    g = torch.Generator().manual_seed(0)
    for mode in ("uniform", "logit_normal"):
        s = flow.sample_sigmas(1000, mode, generator=g)
        assert s.shape == (1000,) and (s > 0).all() and (s < 1).all()
    # the logit-normal draws are sigmoid of N(0, 1): their median is 0.5, their logit's std 1
    s = flow.sample_sigmas(20000, "logit_normal", generator=g)
    assert abs(s.median().item() - 0.5) < 0.02 and abs(torch.logit(s).std().item() - 1) < 0.03
    sched = flow.sigma_schedule(4, shift=3.0)
    assert sched[0] == 1 and sched[-1] == 0 and (sched[1:] < sched[:-1]).all()
    assert sched[2] > 0.5  # shift spends more steps at high noise


def test_sigma_tail_mixes_uniform_draws_near_one_into_the_sampling():
    base = flow.sample_sigmas(4000, "logit_normal", generator=torch.Generator().manual_seed(1))
    same = flow.sample_sigmas(4000, "logit_normal", tail=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(base, same)  # tail 0: exactly the old draws, so old runs replay bit for bit
    s = flow.sample_sigmas(4000, "logit_normal", tail=0.25, tail_low=0.95, generator=torch.Generator().manual_seed(1))
    assert (s > 0).all() and (s <= 1).all()
    top = (s >= 0.95).float().mean().item()
    # logit-normal alone puts ~0.2 % at >= 0.95; the mixture adds its 25 % there (4000 draws: +-2 %)
    assert (base >= 0.95).float().mean().item() < 0.01 and 0.22 < top < 0.29
    assert (s > 0.99).sum() > 100 and (base > 0.99).sum() == 0  # the sampler's first step is trained at last
    assert torch.equal(s[s < 0.95], base[s < 0.95])  # the others are the base draws, untouched
    for bad in ({"tail": -0.1}, {"tail": 1.5}, {"tail": 0.1, "tail_low": 1.0}):
        with pytest.raises(ValueError, match="tail"):
            flow.sample_sigmas(4, "logit_normal", **bad)


def test_guidance_combinations():
    u, t, d = torch.zeros(2), torch.ones(2), 2 * torch.ones(2)
    assert torch.equal(flow.cfg(t, u, 3.0), 3 * torch.ones(2))
    assert torch.equal(flow.cfg(t, u, 1.0), t)                    # scale 1: the conditional prediction
    assert torch.equal(flow.dual_cfg(u, t, d, 2.0, 0.5), 3 * torch.ones(2))
    assert torch.equal(flow.dual_cfg(u, t, d, 1.0, 0.0), t)       # text only


def test_identity_cfg_pushes_the_person_and_keeps_true_cfgs_norm():
    g = torch.Generator().manual_seed(0)
    v_id, v_plain, v_u = (torch.randn(2, 5, 8, generator=g) for _ in range(3))
    assert torch.equal(flow.identity_cfg(v_id, v_plain, v_u, 4.0, 0.0), flow.true_cfg(v_id, v_u, 4.0))
    # without a difference from the prompt as written there is nothing to push
    assert torch.allclose(flow.identity_cfg(v_id, v_id.clone(), v_u, 4.0, 2.0), flow.true_cfg(v_id, v_u, 4.0))
    out = flow.identity_cfg(v_id, v_plain, v_u, 4.0, 1.5)
    assert torch.allclose(out.norm(dim=-1), v_id.norm(dim=-1), rtol=1e-5)  # per-token norm of the person's row
    # direction: true CFG from the pushed conditional v_id + 1.5 (v_id - v_plain)
    want = flow.cfg(v_id + 1.5 * (v_id - v_plain), v_u, 4.0)
    cos = torch.nn.functional.cosine_similarity(out, want, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    assert not torch.allclose(out, flow.true_cfg(v_id, v_u, 4.0), atol=1e-3)
    # several references (one per person): the pushes add up
    v_b = torch.randn(2, 5, 8, generator=g)
    two = flow.identity_cfg(v_id, [v_plain, v_b], v_u, 4.0, 1.5)
    want = flow.cfg(v_id + 1.5 * ((v_id - v_plain) + (v_id - v_b)), v_u, 4.0)
    cos = torch.nn.functional.cosine_similarity(two, want, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    assert torch.equal(flow.identity_cfg(v_id, [v_plain], v_u, 4.0, 1.5), out)
