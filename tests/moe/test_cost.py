import numpy as np
import pytest
import torch

from refgen.moe.cost import (CostNormalizer, EnergyCoefficients, calibrate, cost_table, count_flops,
                             match_dense_width)
from refgen.moe.model import MoEClassifier, MoEModelConfig

from .conftest import TINY_MODEL


def _model(kind="graph"):
    torch.manual_seed(0)
    return MoEClassifier(MoEModelConfig(**{**TINY_MODEL, "kind": kind}), 1, 10)


def test_cost_table_splits_total_into_fixed_and_experts():
    m = _model()
    t = cost_table(m, (1, 8, 8))
    full = count_flops(lambda x: m(x, path="dense"), torch.zeros(1, 1, 8, 8))
    assert t.total_flops == full and len(set(t.expert_flops)) == 1 and t.fixed_flops > 0
    all_on = torch.ones(1, 4)
    assert float(t.active_flops(all_on)) == t.total_flops
    two = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])
    assert t.active_flops(two).tolist() == [t.fixed_flops + 2 * t.expert_flops[0], t.fixed_flops + t.expert_flops[0]]
    assert t.static_topk_flops(2) == t.fixed_flops + 2 * t.expert_flops[0]
    assert t.total_bytes == 4 * m.num_params() + sum(b.numel() * b.element_size() for b in m.buffers())
    assert float(t.active_bytes(all_on)) == t.total_bytes


def test_flops_are_linear_in_batch_and_deterministic():
    m = _model().eval()
    f = [count_flops(lambda x: m(x, path="dense"), torch.zeros(b, 1, 8, 8)) for b in (1, 3, 8)]
    assert f[1] == 3 * f[0] and f[2] == 8 * f[0]
    assert cost_table(m, (1, 8, 8)) == cost_table(m, (1, 8, 8))


def test_dense_baselines_of_equal_flops_and_bytes():
    m = _model()
    t = cost_table(m, (1, 8, 8))
    d, v = match_dense_width(m.cfg, 1, 10, (1, 8, 8), t.static_topk_flops(2), "flops")
    assert d.cfg.kind == "dense" and abs(v - t.static_topk_flops(2)) / t.static_topk_flops(2) < 0.05
    d, v = match_dense_width(m.cfg, 1, 10, (1, 8, 8), t.total_bytes, "bytes")
    assert abs(v - t.total_bytes) / t.total_bytes < 0.05
    with pytest.raises(ValueError, match="metric must be"):
        match_dense_width(m.cfg, 1, 10, (1, 8, 8), 1, "params")


def test_energy_proxy_and_calibration(tmp_path):
    c = EnergyCoefficients()
    assert not c.calibrated and c.proxy_mj(1e9) == pytest.approx(1.0)
    k = calibrate(2e-3, 1e7, "H200", "window")
    assert k.calibrated and k.c_flop_j == pytest.approx(2e-10) and k.proxy_mj(1e7) == pytest.approx(2.0)
    k.save(tmp_path / "e.json")
    assert EnergyCoefficients.load(tmp_path / "e.json") == k
    with pytest.raises(ValueError, match="finite and >= 0"):
        EnergyCoefficients(c_flop_j=-1)
    with pytest.raises(ValueError, match="positive J/image"):
        calibrate(0.0, 1e7, "x", "y")


def test_cost_normalizer_ema_clip_floor_and_minmax():
    n = CostNormalizer(beta=0.9)
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    n.update(a)
    z = n.normalize(a)
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std(unbiased=False)) - 1) < 1e-6
    b = torch.tensor([10.0, 10.0, 10.0, 10.0])
    n.update(b)
    assert float(n.mean) == pytest.approx(0.9 * 2.5 + 0.1 * 10)
    # EMA variance: within-batch variances and the shift of the mean
    assert float(n.var) == pytest.approx(0.9 * 1.25 + 0.1 * (0 + 0.9 * 7.5 ** 2))
    out = n.normalize(torch.tensor([1e6, -1e6, 3.0]))
    assert float(out.max()) == 3.0 and float(out.min()) == -3.0
    assert n.n_clipped == 2 and n.clipped_share == pytest.approx(2 / 7)
    const = CostNormalizer()
    const.update(torch.full((5,), 7.0))
    assert torch.isfinite(const.normalize(torch.full((5,), 7.0))).all()
    mm = CostNormalizer(mode="minmax")
    mm.update(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
    o = mm.normalize(torch.tensor([[2.0, 40.0]]))
    assert o.tolist() == [[0.5, 1.0]]
    s = n.state_dict()
    n2 = CostNormalizer()
    n2.load_state_dict(s)
    assert torch.equal(n2.normalize(a, count=False), n.normalize(a, count=False))
    with pytest.raises(RuntimeError, match="before any update"):
        CostNormalizer().normalize(a)
    with pytest.raises(ValueError, match="beta"):
        CostNormalizer(beta=1.0)
    assert np.isclose(CostNormalizer(mode="z").clip, 3.0)
