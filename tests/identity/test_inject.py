import json

import pytest
import torch

from refgen.identity.inject import (ResidualMismatchError, inject, load_residual, read_residual,
                                    residual_metadata, save_residual)
from refgen.identity.prompts import encode_prompts
from refgen.identity.slots import Slot
from refgen.runtime import DeviceMismatchError


def test_injection_touches_only_its_window_and_adds_alpha_r():
    E = torch.randn(3, 10, 8)
    slots = [Slot(2, 3), Slot(6, 3)]
    r0, r1 = torch.randn(3, 8), torch.randn(3, 3, 8)
    out = inject(E, slots, [r0, r1], [1.5, 0.5])
    assert out is not E and not torch.equal(out, E)
    assert torch.allclose(out[:, 2:5], E[:, 2:5] + 1.5 * r0[None])
    assert torch.allclose(out[:, 6:9], E[:, 6:9] + 0.5 * r1)
    for idx in (0, 1, 5, 9):
        assert torch.equal(out[:, idx], E[:, idx])
    # commutative: order of people does not matter for disjoint windows
    assert torch.equal(inject(E, slots[::-1], [r1, r0], [0.5, 1.5]), out)


def test_per_row_alpha_and_zero_residual_bit_identical():
    E = torch.randn(4, 6, 5)
    E[0, 1, 0] = -0.0  # x + 0.0 would turn this into +0.0
    z = inject(E, [Slot(1, 2)], [torch.zeros(2, 5)], [1.0])
    assert torch.equal(z.view(torch.int32), E.view(torch.int32))
    r = torch.randn(2, 5)
    a = torch.tensor([0.0, 1.0, 2.0, 3.0])
    out = inject(E, [Slot(1, 2)], [r], [a])
    for b in range(4):
        assert torch.allclose(out[b, 1:3], E[b, 1:3] + a[b] * r)
    assert torch.equal(out[0].view(torch.int32), E[0].view(torch.int32))


def test_injection_errors_name_the_tensor():
    E = torch.randn(2, 6, 5, dtype=torch.bfloat16)
    with pytest.raises(DeviceMismatchError, match=r"residual\[0\].*float32"):
        inject(E, [Slot(0, 2)], [torch.randn(2, 5)], [1.0])
    with pytest.raises(ValueError, match="needs"):
        inject(E, [Slot(0, 2)], [torch.randn(3, 5, dtype=torch.bfloat16)], [1.0])
    with pytest.raises(ValueError, match="outside"):
        inject(E, [Slot(5, 2)], [torch.randn(2, 5, dtype=torch.bfloat16)], [1.0])
    with pytest.raises(ValueError, match="one residual and one alpha"):
        inject(E, [Slot(0, 2)], [], [1.0])


def test_two_slot_prompt_each_person_in_its_own_window(pipe):
    enc = encode_prompts(pipe, "~ID~ and ~ID~ on a beach", n_identities=2)
    (s0, s1) = enc.slots[0]
    L, H = s0.length, enc.embeds.shape[2]
    ra, rb = torch.randn(L, H), torch.randn(L, H)
    out = inject(enc.embeds, enc.slots[0], [ra, rb], [1.2, 0.9])
    d = out - enc.embeds
    assert torch.allclose(d[0, s0.start:s0.start + L], 1.2 * ra)
    assert torch.allclose(d[0, s1.start:s1.start + L], 0.9 * rb)
    d[0, s0.start:s0.start + L] = 0
    d[0, s1.start:s1.start + L] = 0
    assert d.abs().max() == 0


def test_residual_file_roundtrip_and_mismatch(pipe, tmp_path):
    enc = encode_prompts(pipe, "a photo of ~ID~", n_identities=1)
    L, H = enc.slots[0][0].length, enc.embeds.shape[2]
    md = residual_metadata(pipe, "tiny")
    r = torch.randn(L, H)
    f = tmp_path / "r.safetensors"
    save_residual(f, r, md)
    back = load_residual(f, pipe, torch.device("cpu"), torch.float32)
    assert torch.equal(back, r) and read_residual(f)[1]["L"] == str(L)

    for key, value, match in [("H", str(H + 1), "H="), ("tokenizer_fingerprint", "deadbeef", "fingerprint"),
                              ("placeholder_token_ids", json.dumps([1, 2]), "placeholder token ids")]:
        bad = dict(md, **{key: value})
        g = tmp_path / f"bad_{key}.safetensors"
        from refgen.artifacts import atomic_save_safetensors
        atomic_save_safetensors({"residual": r}, g, bad)
        with pytest.raises(ResidualMismatchError, match=match):
            load_residual(g, pipe, torch.device("cpu"), torch.float32)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ResidualMismatchError, match="junk.safetensors"):
        load_residual(tmp_path / "junk.safetensors", pipe, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="does not match metadata"):
        save_residual(tmp_path / "x.safetensors", torch.randn(L + 1, H), md)
