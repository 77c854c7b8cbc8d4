import json

import pytest
import torch

from refgen.identity.head import HEAD_FILE, HEAD_JSON, LinearHead, build_head, head_config, load_head
from refgen.identity.resampler import ResamplerConfig, ResamplerHead, photo_tokens


def _head(D=16, L=3, H=24, **kw):
    torch.manual_seed(0)
    return ResamplerHead(D, L, H, ResamplerConfig(width=32, layers=2, heads=4, **kw)).eval()


@pytest.mark.parametrize("pooled_query", [True, False])
def test_resampler_shapes_scale_and_padding_invariance(pooled_query):
    h = _head(pooled_query=pooled_query)
    g = torch.Generator().manual_seed(1)
    tok = torch.randn(2, 3, 4, 16, generator=g)  # 2 people, up to 3 photos of 4 tokens
    tok_mask = torch.ones(2, 3, 4, dtype=torch.bool)
    photo_mask = torch.tensor([[True, True, False], [True, True, True]])
    x, m = photo_tokens(tok, tok_mask, photo_mask)
    assert x.shape == (2, 12, 16) and m.shape == (2, 12) and m.sum().item() == 20
    with torch.no_grad():
        R = h(x, m)
        assert R.shape == (2, 3, 24)
        rms = R.pow(2).mean(-1).sqrt()  # every token at the one learned scale
        torch.testing.assert_close(rms, torch.full_like(rms, h.log_scale.exp().item()))
        # person 0 alone, without its padded third photo: the same residual
        alone = h(tok[0, :2].reshape(1, 8, 16), torch.ones(1, 8, dtype=torch.bool))
        torch.testing.assert_close(R[:1], alone, rtol=1e-5, atol=1e-6)
        # garbage in the padded photo changes nothing; in a real photo it does
        tok2 = tok.clone()
        tok2[0, 2] = 1e3 * torch.randn(4, 16, generator=g)
        torch.testing.assert_close(h(*photo_tokens(tok2, tok_mask, photo_mask)), R)
        tok2[0, 1] = torch.randn(4, 16, generator=g)
        assert (h(*photo_tokens(tok2, tok_mask, photo_mask))[0] - R[0]).abs().max() > 1e-3
        # the photos of a person are a set: their order does not matter
        swapped = h(tok[1, [2, 0, 1]].reshape(1, 12, 16), torch.ones(1, 12, dtype=torch.bool))
        torch.testing.assert_close(swapped, R[1:], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no real token"):
        h(x, torch.zeros_like(m))
    with pytest.raises(ValueError, match=r"tokens must be \(B, N, 16\)"):
        h(torch.zeros(1, 4, 8), torch.ones(1, 4, dtype=torch.bool))


def test_resampler_scale_is_clamped_and_trainable():
    h = _head(scale_max=0.5)
    x, m = torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool)
    assert h(x, m).pow(2).mean().sqrt().item() == pytest.approx(0.5, rel=1e-4)  # exp(0) = 1, clamped to 0.5
    h.log_scale.data.fill_(-1.0)
    h(x, m).pow(2).mean().backward()
    assert h.queries.grad.abs().sum() > 0 and h.log_scale.grad.abs() > 0
    with pytest.raises(ValueError, match="divisible"):
        ResamplerConfig(width=30, heads=4)


def _write(folder, head, md_extra=None, record_extra=None):
    from refgen.artifacts import atomic_save_safetensors, atomic_write_json

    md = {"kind": head.kind, "head_config": json.dumps(head_config(head)), "L": str(head.L), "H": str(head.H),
          "D": "16", "feature_settings": json.dumps({"dtype": "fp32"}), **(md_extra or {})}
    atomic_save_safetensors({k: v.contiguous() for k, v in head.state_dict().items()}, folder / HEAD_FILE, md)
    atomic_write_json(folder / HEAD_JSON, {**md, **(record_extra or {})})


def test_load_head_round_trips_both_kinds_and_refuses_mismatches(tmp_path):
    from refgen.identity.generate import HeadMismatchError

    res, lin = _head(), build_head("linear", 16, 3, 24)
    for name, h in (("res", res), ("lin", lin)):
        _write(tmp_path / name, h)
        got, md = load_head(tmp_path / name, torch.device("cpu"), torch.float32)
        assert type(got) is type(h) and md["kind"] == h.kind
        for k, v in h.state_dict().items():
            assert torch.equal(got.state_dict()[k], v), k
        got2, _ = load_head(tmp_path / name / HEAD_FILE, torch.device("cpu"), torch.float32)  # the weights file
        assert type(got2) is type(h)
    x, m = torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(load_head(tmp_path / "res", torch.device("cpu"), torch.float32)[0](x, m), res(x, m))

    with pytest.raises(HeadMismatchError, match="is a linear head, not the resampler head"):
        load_head(tmp_path / "lin", torch.device("cpu"), torch.float32, kind="resampler")
    _write(tmp_path / "rec", res, record_extra={"kind": "linear"})  # head.json says linear, weights resampler
    with pytest.raises(HeadMismatchError, match=r"head.json and .*head.safetensors disagree on kind"):
        load_head(tmp_path / "rec", torch.device("cpu"), torch.float32)
    _write(tmp_path / "fs", res, record_extra={"feature_settings": json.dumps({"dtype": "bf16"})})
    with pytest.raises(HeadMismatchError, match="disagree on feature_settings"):
        load_head(tmp_path / "fs", torch.device("cpu"), torch.float32)
    other = json.dumps({**head_config(res), "width": 64})  # recorded architecture is not the weights'
    _write(tmp_path / "arch", res, md_extra={"head_config": other})
    with pytest.raises(HeadMismatchError, match="weights do not fit a resampler head"):
        load_head(tmp_path / "arch", torch.device("cpu"), torch.float32)
    with pytest.raises(FileNotFoundError, match="has no head.safetensors"):
        load_head(tmp_path, torch.device("cpu"), torch.float32)
    # a linear head file from before kinds were recorded still loads as linear
    _write(tmp_path / "old", lin)
    from safetensors.torch import load_file, save_file

    save_file(load_file(tmp_path / "old" / HEAD_FILE), tmp_path / "old" / HEAD_FILE,
              {"L": "3", "H": "24", "D": "16"})
    (tmp_path / "old" / HEAD_JSON).unlink()
    assert isinstance(load_head(tmp_path / "old", torch.device("cpu"), torch.float32)[0], LinearHead)
