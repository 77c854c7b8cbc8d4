"""Input-level identities: learnt placeholder token embeddings through the frozen text encoder."""

import json

import pytest
import torch

from refgen.identity.invert import InvertConfig, Inverter
from refgen.identity.prompts import encode_prompts
from refgen.identity.render import encode_with_tokens
from refgen.identity.tokens import (TokensMismatchError, placeholder_embeds, read_checked_tokens, read_tokens,
                                    save_tokens)
from refgen.images import scan

from .test_invert import FAST, make_identities


def test_placeholder_tokens_encode_exactly_as_the_prompt_and_grads_reach_them(pipe):
    prompts = ["A photo of two people on a beach: on the left, ~ID~; on the right, ~ID~.", "~ID~ and ~ID~"]
    T = placeholder_embeds(pipe)  # (L, H_in)
    plain = encode_prompts(pipe, prompts)
    same = encode_prompts(pipe, prompts, tokens=[T[None].expand(2, -1, -1)] * 2)
    assert torch.equal(plain.embeds, same.embeds) and torch.equal(plain.mask, same.mask)
    t = torch.nn.Parameter(T[None].clone())
    out = encode_prompts(pipe, "A photo of ~ID~ at sunset.", tokens=[t])
    out.embeds.float().pow(2).sum().backward()
    assert t.grad is not None and t.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="placeholder"):  # tokens for one slot, prompts with two
        encode_prompts(pipe, prompts, tokens=[T[None].expand(2, -1, -1)])
    with pytest.raises(ValueError, match="tokens long"):
        encode_prompts(pipe, "a ~ID~", tokens=[T[None, :1]])


def test_isolated_people_reach_only_their_own_segment_of_the_prompt(pipe):
    from refgen.identity.prompts import tokenize

    T = placeholder_embeds(pipe)
    g = torch.Generator().manual_seed(0)
    A, B = [torch.nn.Parameter((T + torch.randn(T.shape, generator=g))[None].expand(2, -1, -1).clone())
            for _ in range(2)]
    prompts = ["A photo of two people on a beach: on the left, ~ID~; on the right, ~ID~.", "~ID~ and ~ID~ in a city"]
    iso = encode_prompts(pipe, prompts, tokens=[A, B], isolate=True)
    only_a = encode_prompts(pipe, prompts, tokens=[A, T[None].expand(2, -1, -1)])   # B's slot left bare
    only_b = encode_prompts(pipe, prompts, tokens=[T[None].expand(2, -1, -1), B])
    joint = encode_prompts(pipe, prompts, tokens=[A, B])
    for r, p in enumerate(prompts):
        s2, n = tokenize(pipe, p, 2).slots[1].start, int(iso.mask[r].sum())
        assert torch.allclose(iso.embeds[r, :s2], only_a.embeds[r, :s2], atol=1e-5)   # A's segment never reads B
        assert torch.allclose(iso.embeds[r, s2:n], only_b.embeds[r, s2:n], atol=1e-5)  # B's segment never reads A
        assert not torch.allclose(iso.embeds[r, s2:n], joint.embeds[r, s2:n], atol=1e-3)  # jointly, B's words do
    assert torch.equal(iso.mask, joint.mask)
    iso.embeds.float().pow(2).sum().backward()
    assert A.grad.abs().sum() > 0 and B.grad.abs().sum() > 0
    one = encode_prompts(pipe, "A photo of ~ID~ at sunset.", tokens=[A[:1].detach()], isolate=True)
    assert torch.equal(one.embeds, encode_prompts(pipe, "A photo of ~ID~ at sunset.", tokens=[A[:1].detach()]).embeds)
    E_iso, _ = encode_with_tokens(pipe, [prompts[1]], [[A[0].detach()], [B[0].detach()]], [1.0], isolate=True)
    assert torch.allclose(E_iso[0, :n], iso.embeds[1, :n].to(E_iso), atol=1e-5)


def test_alpha_zero_is_the_prompt_as_written_and_each_person_has_their_own_alpha(pipe):
    T = placeholder_embeds(pipe)
    g = torch.Generator().manual_seed(0)
    A, B = T + torch.randn(T.shape, generator=g), T + torch.randn(T.shape, generator=g)
    p = "~ID~ next to ~ID~ in the city."
    E0, M0 = encode_with_tokens(pipe, [p], [[A], [B]], [0.0])
    plain = encode_prompts(pipe, p)
    assert torch.equal(E0, plain.embeds) and torch.equal(M0, plain.mask)
    E1, _ = encode_with_tokens(pipe, [p], [[A], [B]], [1.0])
    s0, s1 = plain.slots[0]
    # the encoder is causal: tokens before the first slot never see the people, tokens after it do
    assert torch.equal(E1[:, :s0.start], E0[:, :s0.start])
    assert (E1[:, s0.start + s0.length:s1.start] - E0[:, s0.start + s0.length:s1.start]).abs().max() > 0


def test_tokens_inversion_learns_the_person_and_saves_a_checked_token_file(pipe, tmp_path):
    root = make_identities(tmp_path / "ids", n=2)
    cfg = InvertConfig(**{**FAST, "parametrisation": "tokens", "init_scale": 0.1, "steps": 30, "lr": 0.1,
                          "qa": True, "qa_alphas": [1.0], "qa_seeds": [0], "qa_steps": 2})
    inv = Inverter(pipe, cfg, tmp_path / "o", model_id="tiny", progress=False)
    recs = inv.run(scan(root).identities)
    for rec in recs:
        assert rec["eval_loss_teacher"] < rec["eval_loss_base"], rec  # the tokens help denoise this person
        d = tmp_path / "o" / rec["identity"]
        assert not (d / "teacher_residual.safetensors").exists()
        T, md = read_checked_tokens(d / "teacher_tokens.safetensors", pipe)
        assert T.shape == placeholder_embeds(pipe, cfg.slot_repeat).shape and md["identity"] == rec["identity"]
        # what is saved is what the model was optimised on: the base prompt read with these tokens
        E_t = torch.load(d / "teacher_prompt_embeds.pt")
        E_again = encode_prompts(pipe, cfg.base_prompt, tokens=[T[None].to(pipe.text_encoder.dtype)],
                                 repeat=cfg.slot_repeat).embeds
        assert torch.equal(E_t, E_again.cpu())
        s = rec["s"]
        E_b = torch.load(d / "base_prompt_embeds.pt")
        assert torch.equal(E_t[:, :s], E_b[:, :s]) and rec["offslot_rms"] > 0  # after the slot, the person is read
        assert (d / "alpha_eval" / "grid.png").exists() and rec["token_shift_rms"] > 0
    lines = [json.loads(x) for x in (tmp_path / "o" / recs[0]["identity"] / "teacher_metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 30 and all(x["offslot_rms"] > 0 for x in lines)


def test_token_file_from_another_text_encoder_is_refused(pipe, tmp_path):
    from refgen.identity.tokens import token_metadata

    T = placeholder_embeds(pipe)
    md = token_metadata(pipe, "tiny")
    save_tokens(tmp_path / "ok.safetensors", T + 1, T, md)
    t, _ = read_checked_tokens(tmp_path / "ok.safetensors", pipe)
    assert torch.equal(t, T + 1)
    save_tokens(tmp_path / "other.safetensors", T + 1, torch.randn_like(T), md)
    with pytest.raises(TokensMismatchError, match="another text encoder"):
        read_checked_tokens(tmp_path / "other.safetensors", pipe)
    with pytest.raises(ValueError, match="does not match metadata"):
        save_tokens(tmp_path / "bad.safetensors", T[:1], T, md)
    from refgen.identity.inject import residual_metadata, save_residual

    save_residual(tmp_path / "r.safetensors", torch.zeros(int(md["L"]), int(md["H"])), residual_metadata(pipe, "tiny"))
    with pytest.raises(TokensMismatchError, match="no tensor named"):
        read_tokens(tmp_path / "r.safetensors")


@pytest.mark.parametrize("mode", ["tokens", "free", "rms_scaled"])
def test_inversion_starts_from_a_given_identity_in_every_mode(pipe, tmp_path, mode):
    root = make_identities(tmp_path / "ids", n=1)
    cfg = InvertConfig(**{**FAST, "parametrisation": mode, "steps": 1, "lr": 1e-9})
    inv = Inverter(pipe, cfg, tmp_path / "o", model_id="tiny", progress=False)
    ident = scan(root).identities[0]
    noise = inv.residual(inv._new_state(ident)).detach()
    g = torch.Generator().manual_seed(1)
    start = torch.randn(noise.shape, generator=g) * 0.5 + (placeholder_embeds(pipe, cfg.slot_repeat) if mode == "tokens"
                                                           else 0)
    st = inv._new_state(ident, start)
    torch.testing.assert_close(inv.residual(st).detach().cpu(), start)  # the optimisation begins where it was told
    (rec,) = inv.run([ident], start={ident.id: start})
    assert rec["started_from"] == "given"
    with pytest.raises(ValueError, match="starts from a finite"):
        inv._new_state(ident, start[:, :-1])


def test_start_weight_keeps_a_refinement_near_its_start_and_survives_a_resume(pipe, tmp_path):
    """From a given start the anchor holds P nearer to it than the same run without; identities started from noise
    are untouched by it (bit-equal), and a resumed run keeps the start it was anchored to."""
    root = make_identities(tmp_path / "ids", n=1)
    ident = scan(root).identities[0]
    base = {**FAST, "parametrisation": "tokens", "steps": 6, "lr": 0.2, "qa": False}
    T_ph = placeholder_embeds(pipe, InvertConfig(**base).slot_repeat)
    start = T_ph + 0.3 * torch.randn(T_ph.shape, generator=torch.Generator().manual_seed(2))

    def final(weight, given, out):
        inv = Inverter(pipe, InvertConfig(**base, start_weight=weight), tmp_path / out, model_id="tiny",
                       progress=False)
        (st,) = inv.run_batch([ident], [inv._new_state(ident, start if given else None)])
        return st

    free, held = final(0.0, True, "a"), final(1e3, True, "b")
    d_free, d_held = [(s.P - s.P_start).pow(2).mean().sqrt().item() for s in (free, held)]
    assert d_held < 0.2 * d_free and d_free > 0
    assert torch.equal(final(0.0, False, "c").P, final(1e3, False, "d").P)  # from noise: no anchor
    inv = Inverter(pipe, InvertConfig(**base, start_weight=1e3), tmp_path / "e", model_id="tiny", progress=False)
    ck = inv.dir(ident) / "teacher_ckpt.pt"
    ck.parent.mkdir(parents=True, exist_ok=True)
    torch.save(inv._ckpt_dict(held, torch.optim.AdamW([held.P, held.log_scale])), ck)  # as a killed run leaves it
    st = inv._new_state(ident)  # no start given now: the checkpoint's start comes back with the weights
    assert st.started_from == "given" and torch.equal(st.P_start.cpu(), held.P_start.cpu())
    assert torch.equal(st.P.cpu(), held.P.detach().cpu())
    with pytest.raises(ValueError, match="start_weight"):
        InvertConfig(start_weight=-1.0)


@pytest.mark.parametrize("mode", ["tokens", "free"])
def test_slot_repeat_inverts_wider_people_that_render_everywhere(pipe, tmp_path, mode):
    """slot_repeat 2: every ~ID~ is the placeholder twice over; the file records it, and the API, `refgen render` and
    `refgen generate` read such a person into slots as wide (the same picture), and refuse it beside a person of
    another width."""
    import numpy as np
    from PIL import Image

    from refgen.cli import main
    from refgen.identity.slots import SlotError, placeholder_ids
    from refgen.pipeline import IdentityPipeline

    root = make_identities(tmp_path / "ids", n=1)
    cfg = InvertConfig(**{**FAST, "parametrisation": mode, "steps": 20, "lr": 0.1, "slot_repeat": 2})
    (rec,) = Inverter(pipe, cfg, tmp_path / "o", model_id="tiny", progress=False).run(scan(root).identities)
    base = len(placeholder_ids(pipe.tokenizer))
    assert rec["L"] == 2 * base and rec["eval_loss_teacher"] < rec["eval_loss_base"]
    f = tmp_path / "o" / rec["identity"] / ("teacher_tokens.safetensors" if mode == "tokens"
                                           else "teacher_residual.safetensors")
    ip = IdentityPipeline(pipe)
    person = ip.load_residual(f)
    assert person.tensor.shape[0] == 2 * base and person.metadata["slot_repeat"] == "2"
    assert json.loads(person.metadata["placeholder_token_ids"]) == placeholder_ids(pipe.tokenizer) * 2
    prompt = "a photo of ~ID~ on a beach"
    img = np.asarray(ip(prompt, [person], seeds=[3], steps=2, height=32, width=32)[0])
    common = ["--model", pipe.name_or_path, "--prompt", prompt, "--residual", str(f), "--seeds", "3", "--steps", "2",
              "--height", "32", "--width", "32", "--device", "cpu", "--dtype", "fp32"]
    assert main(["render", *common, "--alphas", "1", "--out", str(tmp_path / "r")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "r" / "images" / "a1_s3.png")), img)
    assert main(["generate", *common, "--out", str(tmp_path / "g")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g" / "seed3.png")), img)
    narrow = placeholder_embeds(pipe) + 0.5
    from refgen.pipeline import SlotTokens
    from refgen.identity.tokens import token_metadata

    other = SlotTokens(narrow, placeholder_embeds(pipe), token_metadata(pipe, "tiny"))
    with pytest.raises(SlotError, match="different slot repeats"):
        ip("~ID~ and ~ID~", [person, other], seeds=[0], steps=2, height=32, width=32)
