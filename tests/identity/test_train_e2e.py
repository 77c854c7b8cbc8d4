"""End-to-end head training on the shipped toy Qwen-Image and toy Qwen3-VL (real models, CPU-sized)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from refgen.identity.train_e2e import E2EConfig, pair_batch, prepare_data, single_batch, step_generator, train_e2e
from refgen.toyworld.benchmark import default_model, default_vl_model
from refgen.toyworld.identities import make_identities


@pytest.fixture(scope="module")
def toy_ids(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_ids")
    make_identities(root, n=5, seed=100_000, progress=False)  # training-range ids: 3-5 photos each
    return root


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e_cache")


@pytest.fixture(scope="module")
def toy(toy_ids, toy_cache):
    from refgen.identity.features import VisionFeatures
    from refgen.identity.render import load_pipeline

    pipe = load_pipeline(default_model(), "cpu", "fp32")
    fx = VisionFeatures(default_vl_model(), "cpu", "fp32")
    cfg = E2EConfig(refs_max=3, two_person_fraction=0.5, two_person_images=6, cache_dir=str(toy_cache))
    return pipe, fx, prepare_data(pipe, fx, toy_ids, cfg, progress=False), cfg


def test_references_are_other_photos_of_the_same_person(toy, toy_ids):
    pipe, fx, data, cfg = toy
    owner = {p: i for i, ph in enumerate(data.photos) for p in ph.tolist()}
    seen_k = set()
    for s in range(40):
        g = step_generator(0, "step", s)
        b = single_batch(data, [0, 1, 2, 3, 4], cfg, g)
        assert b.slot_item.tolist() == [0, 1, 2, 3, 4]
        for j in range(5):
            refs = b.refs[j][b.ref_mask[j]].tolist()
            seen_k.add(len(refs))
            assert b.latent[j].item() not in refs  # the target is never a reference
            assert {owner[r] for r in refs} == {owner[b.latent[j].item()]} == {b.slot_ident[j].item()}
            assert len(set(refs)) == len(refs) and cfg.refs_min <= len(refs) <= cfg.refs_max
            assert b.row[j].item() == data.photo_row[b.latent[j]].item()  # the target's own sentence
        p = pair_batch(data, 3, cfg, g)  # two-person targets: each slot's references are its own person's photos
        assert p.slot_item.tolist() == [0, 0, 1, 1, 2, 2] and p.slot_k.tolist() == [0, 1] * 3
        for j in range(6):
            assert {owner[r] for r in p.refs[j][p.ref_mask[j]].tolist()} == {p.slot_ident[j].item()}
        assert (p.latent >= len(owner)).all()  # rendered two-person images, not anyone's reference photo
    assert seen_k == {1, 2, 3}
    # the cache pools exactly as VisionFeatures does at inference
    from refgen.identity.features import pool_photos
    from refgen.images import load_rgb, scan

    ident = sorted(scan(toy_ids).identities, key=lambda i: i.id)[2]
    photos = [load_rgb(p) for p in ident.images[1:3]]
    z = pool_photos(data.means[data.photos[2][1:3]])
    torch.testing.assert_close(z, fx(photos), rtol=1e-5, atol=1e-6)
    tok, mask = fx.tokens(photos)
    torch.testing.assert_close(data.tokens[data.photos[2][1:3]][mask], tok[mask])
    # a two-person prompt has two windows, a one-person prompt one
    assert (data.bank_starts[data.pairs[:, 3]] >= 0).all()
    assert (data.bank_starts[data.photo_row][:, 1] == -1).all()


def test_e2e_training_lowers_the_flow_loss_and_the_head_loads(toy_ids, tmp_path):
    from refgen.identity.head import load_head

    cfg = E2EConfig(head="linear", output="residual", steps=40, batch_size=3, lr=1e-2, warmup_steps=0,
                    eval_every=40, eval_identities=3, checkpoint_every=20)
    out = tmp_path / "head"
    s = train_e2e(toy_ids, out, default_model(), default_vl_model(), cfg, device="cpu", dtype="fp32", progress=False)
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = log[0], log[-1]
    assert first["step"] == 0 and last["step"] == 40 and s["step"] == 40
    # fixed noise and sigmas: the untrained head's loss on the same targets, and the bare placeholder's
    assert last["train_flow"] < 0.9 * first["train_flow"], (first, last)
    assert last["train_flow"] < last["train_flow_zero"]
    rec = json.loads((out / "head.json").read_text())
    assert rec["kind"] == "linear" and rec["objective"] == "e2e" and rec["step"] == 40 and rec["git_commit"]
    assert len(rec["train_ids"]) == 5 and json.loads(rec["feature_settings"])["dtype"] == "fp32"
    head, md = load_head(out, torch.device("cpu"), torch.float32)
    assert md["kind"] == "linear" and md["L"] == rec["L"]
    # a finished run resumes to nothing; other settings are refused, not mixed into the checkpoint
    again = train_e2e(toy_ids, out, default_model(), default_vl_model(), cfg, device="cpu", dtype="fp32",
                      progress=False)
    assert again["step"] == 40 and len((out / "metrics.jsonl").read_text().splitlines()) == len(log)
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        train_e2e(toy_ids, out, default_model(), default_vl_model(), E2EConfig(**{**cfg.__dict__, "lr": 1e-3}),
                  device="cpu", dtype="fp32", progress=False)


def test_config_refusals():
    with pytest.raises(ValueError, match="objective must be one of"):
        E2EConfig(objective="regress")
    with pytest.raises(ValueError, match="refs_max"):
        E2EConfig(refs_max=9)
    with pytest.raises(ValueError, match="two_person_fraction needs the e2e or mixed"):
        E2EConfig(objective="teacher", output="residual", two_person_fraction=0.5)
    with pytest.raises(ValueError, match="exactly one ~ID~"):
        E2EConfig(default_prompt="a photo")
    with pytest.raises(ValueError, match="sigma_tail"):
        E2EConfig(sigma_tail=1.5)
    with pytest.raises(ValueError, match="id_weight must be >= 0"):
        E2EConfig(id_weight=-0.1)
    with pytest.raises(ValueError, match="id_weight needs the e2e or mixed"):
        E2EConfig(objective="teacher", output="residual", id_weight=0.1)
    with pytest.raises(ValueError, match="multiples of 32"):
        E2EConfig(id_weight=0.1, height=48, width=48)


def test_sigma_tail_reaches_the_training_batches(toy):
    """sigma_tail trains the sampler's first step (sigma near 1), which logit-normal sigmas never reach; 0 leaves the
    batches exactly as they were (noise included), so earlier runs resume and replay bit for bit."""
    pipe, fx, data, cfg = toy
    tail = dataclasses.replace(cfg, sigma_tail=1.0, sigma_tail_low=0.98)
    none = dataclasses.replace(cfg, sigma_tail=0.0)
    s_tail, s_none = [], []
    for s in range(20):
        s_tail.append(single_batch(data, [0, 1, 2, 3, 4], tail, step_generator(0, "step", s)).sigma)
        b0 = single_batch(data, [0, 1, 2, 3, 4], none, step_generator(0, "step", s))
        b1 = single_batch(data, [0, 1, 2, 3, 4], cfg, step_generator(0, "step", s))
        assert torch.equal(b0.sigma, b1.sigma) and torch.equal(b0.noise, b1.noise)
        s_none.append(b0.sigma)
    s_tail, s_none = torch.cat(s_tail), torch.cat(s_none)
    assert (s_tail >= 0.98).all() and (s_tail <= 1).all() and (s_none < 0.98).all()


def test_id_loss_reads_the_person_in_the_decoded_estimate(toy, toy_ids, tmp_path):
    """The vision tower reads a float image as its processor path reads the photo; the ID loss of the clean-image
    estimate is 0 for the target's own latents and larger for another person's, on one- and two-person targets; it
    reaches the head's gradient; and a run with it trains and logs it."""
    import numpy as np

    from refgen.identity.qwen_flow import pack
    from refgen.identity.id_loss import mean_id_loss
    from refgen.identity.train_e2e import _frozen_flow_model, build_e2e_head, item_losses
    from refgen.images import load_rgb, scan

    pipe, fx, data, cfg = toy
    photo = load_rgb(sorted(scan(toy_ids).identities, key=lambda i: i.id)[1].images[0])
    x = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    x.requires_grad_(True)
    m = fx.pixel_means(x)
    torch.testing.assert_close(m[0], fx.per_image([photo])[0].mean(0), rtol=1e-4, atol=1e-5)
    m.sum().backward()
    assert x.grad.abs().sum() > 0
    with_id = dataclasses.replace(cfg, id_weight=1.0)
    data.vae, data.vl = pipe.vae, fx
    try:
        b = single_batch(data, [0, 1, 2, 3, 4], with_id, step_generator(0, "step", 0))
        x0 = pack(data.latents[b.latent])
        hw = tuple(data.latents.shape[-2:])
        own = mean_id_loss(pipe.vae, fx, x0, x0, hw)
        other = mean_id_loss(pipe.vae, fx, pack(data.latents[b.latent.roll(1)]), x0, hw)  # another person's photo
        assert (own.abs() < 1e-5).all() and (other > 1e-3).all(), (own, other)
        # the target is read from its own latent, as the estimate is: the crop at the training size, decoded
        from refgen.identity.qwen_flow import decode_qwen_latents

        seen = fx.pixel_means((decode_qwen_latents(pipe.vae, x0, *hw).float() + 1) / 2)
        torch.testing.assert_close(other, 1 - torch.nn.functional.cosine_similarity(
            fx.pixel_means((decode_qwen_latents(pipe.vae, pack(data.latents[b.latent.roll(1)]), *hw).float() + 1) / 2),
            seen, dim=-1))
        p = pair_batch(data, 2, with_id, step_generator(0, "step", 1))  # two-person targets too
        px0 = pack(data.latents[p.latent])
        assert (mean_id_loss(pipe.vae, fx, px0, px0, hw).abs() < 1e-5).all()
        assert (mean_id_loss(pipe.vae, fx, px0.roll(1, 0), px0, hw) > 1e-3).all()
        torch.manual_seed(0)
        head = build_e2e_head(dataclasses.replace(cfg, head="linear"), data.means.shape[1], data.L, data.H)
        b = single_batch(data, [0, 1, 2], with_id, step_generator(0, "step", 2))
        fm, grads = _frozen_flow_model(pipe, cfg), []
        for c in (cfg, with_id):
            head.zero_grad()
            out = item_losses(head, data, b, fm, c, torch.float32)
            out["loss"].sum().backward()
            grads.append(torch.cat([q.grad.flatten() for q in head.parameters() if q.grad is not None]).clone())
        assert "id" in out and not torch.allclose(grads[0], grads[1])
    finally:
        data.vae = data.vl = None
    run = E2EConfig(head="linear", output="residual", steps=3, batch_size=3, lr=1e-2, warmup_steps=0, eval_every=3,
                    eval_identities=2, checkpoint_every=3, id_weight=0.5)
    out = tmp_path / "head_id"
    train_e2e(toy_ids, out, default_model(), default_vl_model(), run, device="cpu", dtype="fp32", progress=False)
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 3 and all(0 < r["id"] < 2 for r in steps)
    assert all(r["loss"] == pytest.approx(r["flow"] + 0.5 * r["id"], rel=1e-5) for r in steps)


def test_spatial_id_loss_sees_who_stands_where(toy):
    """The token-by-token ID loss is ~0 for the target's own latent, larger for a mirrored image (the same pixels,
    the people swapped left and right, which a mean feature barely sees), and reaches two-person steps."""
    from refgen.identity.id_loss import spatial_id_loss
    from refgen.identity.qwen_flow import pack
    from refgen.identity.train_e2e import _frozen_flow_model, build_e2e_head, item_losses

    pipe, fx, data, cfg = toy
    with pytest.raises(ValueError, match="id_spatial is a form of the ID loss"):
        E2EConfig(id_spatial=True)
    hw = tuple(data.latents.shape[-2:])
    p = pair_batch(data, 3, cfg, step_generator(0, "step", 3))
    x0 = pack(data.latents[p.latent])
    own = spatial_id_loss(pipe.vae, fx, x0, x0, hw)
    mirrored = spatial_id_loss(pipe.vae, fx, pack(data.latents[p.latent].flip(-1)), x0, hw)
    assert (own < 1e-4).all() and (mirrored > 10 * own.clamp_min(1e-6)).all(), (own, mirrored)
    spatial = dataclasses.replace(cfg, id_weight=1.0, id_spatial=True)
    data.vae, data.vl = pipe.vae, fx
    try:
        torch.manual_seed(0)
        head = build_e2e_head(dataclasses.replace(cfg, head="linear"), data.means.shape[1], data.L, data.H)
        out = item_losses(head, data, p, _frozen_flow_model(pipe, cfg), spatial, torch.float32)
        assert out["id"].shape == (3,) and (out["id"] > 0).all()
        torch.testing.assert_close(out["loss"], out["flow"] + out["id"])
    finally:
        data.vae = data.vl = None


def test_localization_loss_on_two_person_steps(toy, toy_ids):
    """loc_weight: two-person steps add loc_weight * the localisation loss (one-person steps do not); the value and
    the head's gradient are the same under gradient checkpointing (the hooks only keep what the blocks compute);
    and a head trained on it alone makes each person's tokens read that person's slot more."""
    from refgen.identity.train_e2e import _frozen_flow_model, build_e2e_head, item_losses

    pipe, fx, _, cfg = toy
    with pytest.raises(ValueError, match="loc_weight acts on two-person steps"):
        E2EConfig(loc_weight=1.0)
    loc = dataclasses.replace(cfg, output="residual", loc_weight=0.5)
    data = prepare_data(pipe, fx, toy_ids, loc, progress=False)
    assert data.pair_regions.shape == (6, 2, data.latents.shape[-2] * data.latents.shape[-1] // 4)
    assert data.pair_regions[:, 0].any(1).all() and data.pair_regions[:, 1].any(1).all()
    p = pair_batch(data, 3, loc, step_generator(0, "step", 3))
    one = single_batch(data, [0, 1], loc, step_generator(0, "step", 4))
    torch.manual_seed(0)
    head = build_e2e_head(dataclasses.replace(loc, head="linear"), data.means.shape[1], data.L, data.H)

    def run(checkpointing: bool):
        fm = _frozen_flow_model(pipe, dataclasses.replace(loc, gradient_checkpointing=checkpointing))
        head.zero_grad()
        out = item_losses(head, data, p, fm, loc, torch.float32)
        out["loss"].sum().backward()
        return out, [q.grad.clone() for q in head.parameters() if q.grad is not None]

    try:
        plain, g0 = run(False)
        pipe.transformer.train()  # diffusers checkpoints only in training mode; dropout is 0 in this model
        ckpt, g1 = run(True)
    finally:
        pipe.transformer.disable_gradient_checkpointing()
        pipe.transformer.eval()
    assert plain["loc"].shape == (3,) and (plain["loc"] > 0).all()
    torch.testing.assert_close(plain["loss"], plain["flow"] + 0.5 * plain["loc"])
    torch.testing.assert_close(ckpt["loc"], plain["loc"])
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert "loc" not in item_losses(head, data, one, _frozen_flow_model(pipe, loc), loc, torch.float32)

    only = dataclasses.replace(loc, loc_weight=1.0)
    fm = _frozen_flow_model(pipe, only)
    opt = torch.optim.Adam(head.parameters(), lr=3e-2)
    start = None
    for _ in range(15):
        opt.zero_grad()
        val = item_losses(head, data, p, fm, only, torch.float32)["loc"].mean()
        start = val.item() if start is None else start
        val.backward()
        opt.step()
    assert val.item() < 0.9 * start, (start, val.item())


def test_training_logs_the_localization_loss(toy_ids, tmp_path):
    cfg = E2EConfig(output="residual", steps=2, batch_size=3, two_person_fraction=1.0, two_person_images=4,
                    loc_weight=0.5, warmup_steps=0, eval_identities=0, cache_dir=str(tmp_path / "cache"),
                    resampler={"width": 32, "layers": 1, "heads": 2})
    train_e2e(toy_ids, tmp_path / "h", default_model(), default_vl_model(), cfg, device="cpu", dtype="fp32",
              progress=False)
    m = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in m if "loss" in r]
    assert len(steps) == 2 and all(r["two_person"] and r["loc"] > 0 for r in steps)
    assert steps[-1]["loss"] == pytest.approx(steps[-1]["flow"] + 0.5 * steps[-1]["loc"], rel=1e-5)


def test_e2e_trains_data_parallel_with_an_uneven_last_batch(toy, toy_ids, tmp_path):
    """2 ranks (gloo), 5 identities in batches of 4: step 2 is the epoch's last batch, 1 target, so rank 1 has
    nothing and must still join the gradient all-reduce. Same losses and weights as one process. The 2 ranks
    read their data cache memory-mapped (rank 0 wrote it while rank 1 waited), the one process from its device."""
    cfg_file = tmp_path / "e2e.yaml"
    cfg_file.write_text("steps: 3\nbatch_size: 4\nlr: 0.01\nwarmup_steps: 0\neval_identities: 0\n"
                        "resampler: {width: 32, layers: 1, heads: 2}\n")
    common = ["train-head", str(toy_ids), "--objective", "e2e", "--head", "resampler", "--model", default_model(),
              "--vl-model", default_vl_model(), "--config", str(cfg_file), "--device", "cpu", "--dtype", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "refgen.cli", *common, "--out", str(tmp_path / "ddp"), "--tables", "mapped"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    from refgen.cli import main

    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    a = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["items"] for r in a if "items" in r] == [4, 1, 4]
    assert [r["loss"] for r in a if "loss" in r] == pytest.approx([r["loss"] for r in b if "loss" in r], rel=1e-4)
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "ddp" / "head.safetensors"), load_file(tmp_path / "one" / "head.safetensors")
    # AdamW turns float noise in gradients that are zero in exact arithmetic (the key bias: softmax ignores a shift
    # common to all keys) into steps of up to lr, so weights agree to a fraction of lr, not to float precision
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=2e-3, msg=lambda m, k=k: f"{k}: {m}")
    # the trained resampler at inference (IdentityPipeline.residual_from_refs on a head folder) gives the residual
    # the trainer computed for the same reference photos
    from refgen.identity.train_e2e import Batch, head_forward
    from refgen.images import scan
    from refgen.pipeline import IdentityPipeline

    ip = IdentityPipeline.from_pretrained(default_model(), vl_model=default_vl_model(), head=str(tmp_path / "one"),
                                          device="cpu", dtype="fp32")
    assert ip.head.kind == "resampler"
    data = toy[2]
    ident = sorted(scan(toy_ids).identities, key=lambda i: i.id)[1]
    got = ip.residual_from_refs(ident.images[:3]).tensor  # tokens (the default output): T_ph + e * out
    ph = data.photos[1][:3]
    zero = torch.zeros(1, dtype=torch.long)
    b = Batch(ph[:1], data.photo_row[ph[:1]], torch.zeros(1), torch.zeros(1), zero, zero,
              torch.ones(1, dtype=torch.long), ph[None], torch.ones(1, 3, dtype=torch.bool))
    with torch.no_grad():
        want = ip.head.token_base + ip.head.token_scale * head_forward(ip.head, data, b)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_cli_needs_the_models_for_e2e(tmp_path, capsys):
    from refgen.cli import main

    assert main(["train-head", str(tmp_path), "--out", str(tmp_path / "h"), "--objective", "e2e",
                 "--device", "cpu"]) == 1
    assert "needs --model (Qwen-Image) and --vl-model" in capsys.readouterr().err


def test_teacher_and_mixed_objectives(toy, toy_ids, tmp_path):
    from refgen.identity.inject import residual_metadata, save_residual

    pipe, _, data, cfg = toy
    teachers = tmp_path / "teachers"
    g = torch.Generator().manual_seed(0)
    md = residual_metadata(pipe, "toy", repeat=cfg.slot_repeat)  # teachers as wide as the head's slot
    def teacher(name):
        save_residual(teachers / name / "teacher_residual.safetensors", 0.5 * torch.randn(data.L, data.H, generator=g),
                      md)

    for name in data.ids[:4]:
        teacher(name)
    base = dict(output="residual", teacher_root=str(teachers), batch_size=5, lr=1e-2, warmup_steps=0,
                eval_identities=0, resampler={"width": 32, "layers": 1, "heads": 2})
    with pytest.raises(ValueError, match=r"1 have none under .*seed_100004/teacher_residual"):
        train_e2e(toy_ids, tmp_path / "t0", default_model(), default_vl_model(), E2EConfig(objective="teacher", **base),
                  device="cpu", dtype="fp32", progress=False)
    teacher(data.ids[4])
    train_e2e(toy_ids, tmp_path / "t", default_model(), default_vl_model(),
              E2EConfig(objective="teacher", steps=30, **base), device="cpu", dtype="fp32", progress=False)
    log = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "teacher" in r]
    assert "flow" not in steps[0] and steps[-1]["teacher"] < 0.7 * steps[0]["teacher"]
    train_e2e(toy_ids, tmp_path / "m", default_model(), default_vl_model(),
              E2EConfig(objective="mixed", steps=2, teacher_weight=0.5, two_person_fraction=1.0, two_person_images=4,
                        **base), device="cpu", dtype="fp32", progress=False)
    m = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()][-1]
    assert m["two_person"] and m["loss"] == pytest.approx(m["flow"] + 0.5 * m["teacher"], rel=1e-5)


def test_token_output_is_token_inversion_s_encoding(toy, toy_ids):
    """A token head's output goes in as T_ph + e * out before the text encoder: exactly `encode_prompts` with
    those tokens (the path token inversion optimises and `render` reads), the prompt as written at out = 0, and
    each slot of a two-person prompt gets its own person's tokens."""
    import dataclasses

    from refgen.identity.prompts import encode_prompts
    from refgen.identity.tokens import embed_rms, placeholder_embeds
    from refgen.identity.train_e2e import condition

    pipe, fx, data, cfg = toy
    tcfg = E2EConfig(**{**dataclasses.asdict(cfg), "output": "tokens"})
    tok = prepare_data(pipe, fx, toy_ids, tcfg, progress=False)
    assert tok.H == pipe.text_encoder.get_input_embeddings().weight.shape[1] and tok.e == embed_rms(pipe)
    torch.testing.assert_close(tok.T_ph, placeholder_embeds(pipe, tcfg.slot_repeat))
    g = step_generator(0, "step", 0)
    b = single_batch(tok, [0, 3], tcfg, g)
    R = torch.randn(2, tok.L, tok.H, generator=torch.Generator().manual_seed(1))
    E, M = condition(tok, b, R, torch.float32)
    for j in range(2):
        want = encode_prompts(pipe, [tok.tps[b.row[j]].prompt], tokens=[(tok.T_ph + tok.e * R[j])[None]],
                              repeat=tcfg.slot_repeat)
        n = int(want.mask.sum())
        torch.testing.assert_close(E[j, :n], want.embeds[0, :n])
        assert int(M[j].sum()) == n
    E0, M0 = condition(tok, b, torch.zeros_like(R), torch.float32)  # out = 0: the prompt as written (the bank)
    S = int(M0.sum(1).max())
    torch.testing.assert_close(E0[:, :S], tok.bank[b.row][:, :S], rtol=1e-5, atol=1e-5)
    p = pair_batch(tok, 2, tcfg, g)  # two slots per target, in order
    R2 = torch.randn(4, tok.L, tok.H, generator=torch.Generator().manual_seed(2))
    E2, _ = condition(tok, p, R2, torch.float32)
    want = encode_prompts(pipe, [tok.tps[p.row[0]].prompt], tokens=[(tok.T_ph + tok.e * R2[k])[None] for k in (0, 1)],
                          repeat=tcfg.slot_repeat)
    n = int(want.mask.sum())
    torch.testing.assert_close(E2[0, :n], want.embeds[0, :n])
    swapped = encode_prompts(pipe, [tok.tps[p.row[0]].prompt], tokens=[(tok.T_ph + tok.e * R2[k])[None] for k in (1, 0)],
                             repeat=tcfg.slot_repeat)
    assert (swapped.embeds[0, :n] - E2[0, :n]).abs().max() > 1e-3
    # isolate_slots: each person's segment of the prompt is encoded without the other person (the inference path)
    E3, _ = condition(tok, p, R2, torch.float32, isolate=True)
    want = encode_prompts(pipe, [tok.tps[p.row[0]].prompt], tokens=[(tok.T_ph + tok.e * R2[k])[None] for k in (0, 1)],
                          isolate=True, repeat=tcfg.slot_repeat)
    torch.testing.assert_close(E3[0, :n], want.embeds[0, :n])
    assert (E3[0, :n] - E2[0, :n]).abs().max() > 1e-3


def test_token_head_trains_loads_and_makes_slot_tokens(toy_ids, tmp_path):
    """Trained with output "tokens" through the frozen text encoder and transformer, the head beats the prompt as
    written; load_head and IdentityPipeline give SlotTokens = T_ph + token_scale * out for reference photos, and a
    head whose placeholder embeddings are not the text encoder's is refused."""
    from safetensors.torch import load_file, save_file

    from refgen.identity.generate import HeadMismatchError
    from refgen.identity.head import PLACEHOLDER_KEY, load_head, residual_from_photos
    from refgen.images import load_rgb, scan
    from refgen.pipeline import IdentityPipeline, SlotTokens

    cfg = E2EConfig(head="linear", output="tokens", steps=30, batch_size=3, lr=1e-2, warmup_steps=0, eval_every=30,
                    eval_identities=3, checkpoint_every=30)
    out = tmp_path / "head"
    train_e2e(toy_ids, out, default_model(), default_vl_model(), cfg, device="cpu", dtype="fp32", progress=False)
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["train_flow"] < log[-1]["train_flow_zero"] and log[-1]["train_flow"] < log[0]["train_flow"]
    head, md = load_head(out, torch.device("cpu"), torch.float32)
    assert md["output"] == "tokens" and head.output == "tokens" and head.scale_max == 4.0
    ip = IdentityPipeline.from_pretrained(default_model(), vl_model=default_vl_model(), head=str(out), device="cpu",
                                          dtype="fp32")
    photos = sorted(scan(toy_ids).identities, key=lambda i: i.id)[0].images[:2]
    person = ip.residual_from_refs(photos)
    assert isinstance(person, SlotTokens)
    step = residual_from_photos(head, ip.features, [load_rgb(p) for p in photos])[0]
    torch.testing.assert_close(person.tensor, head.token_base + float(md["token_scale"]) * step)
    person.check_fits(ip.pipe)
    img = ip("A photo of ~ID~ at the beach.", [person], [1.0], seeds=[0], steps=2, height=32, width=32, progress=False)
    assert img[0].size == (32, 32)
    # another text encoder's placeholder: refused when the head is loaded, naming the difference
    sd = load_file(out / "head.safetensors")
    from safetensors import safe_open

    with safe_open(str(out / "head.safetensors"), framework="pt") as f:
        meta = f.metadata()
    sd[PLACEHOLDER_KEY] = sd[PLACEHOLDER_KEY] + 1.0
    save_file(sd, out / "head.safetensors", meta)
    with pytest.raises(HeadMismatchError, match="placeholder embeddings differ"):
        ip.load_head(str(out), default_vl_model())


def test_init_head_starts_from_a_trained_head_and_refuses_another_architecture(toy_ids, tmp_path):
    """A run with init_head starts where the given head ended (its step-0 loss on the fixed-noise eval set is the
    first run's last), and a head of another architecture is refused, naming what differs."""
    from refgen.identity.generate import HeadMismatchError

    common = dict(output="tokens", batch_size=3, lr=1e-2, warmup_steps=0, eval_identities=3,
                  cache_dir=str(tmp_path / "cache"))
    first = tmp_path / "first"
    train_e2e(toy_ids, first, default_model(), default_vl_model(),
              E2EConfig(head="linear", steps=6, eval_every=6, checkpoint_every=6, **common),
              device="cpu", dtype="fp32", progress=False)
    second = tmp_path / "second"
    train_e2e(toy_ids, second, default_model(), default_vl_model(),
              E2EConfig(head="linear", steps=2, eval_every=2, checkpoint_every=2, init_head=str(first), **common),
              device="cpu", dtype="fp32", progress=False)
    log1 = [json.loads(x) for x in (first / "metrics.jsonl").read_text().splitlines()]
    log2 = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines()]
    assert log1[-1]["train_flow"] < log1[0]["train_flow"]  # the first run learnt something to start from
    assert log2[0]["step"] == 0 and log2[0]["train_flow"] == pytest.approx(log1[-1]["train_flow"], rel=1e-5)
    with pytest.raises(HeadMismatchError, match="init_head .* has kind 'linear'"):
        train_e2e(toy_ids, tmp_path / "third", default_model(), default_vl_model(),
                  E2EConfig(head="resampler", steps=1, init_head=str(first), **common),
                  device="cpu", dtype="fp32", progress=False)


def test_token_output_refusals():
    with pytest.raises(ValueError, match="output must be one of"):
        E2EConfig(output="words")
    with pytest.raises(ValueError, match="isolate_slots is for output: tokens"):
        E2EConfig(output="residual", isolate_slots=True)


def test_isolated_pair_training_reaches_the_head_and_the_pipeline(toy_ids, tmp_path):
    """A head trained with isolate_slots on two-person steps records it; IdentityPipeline reads it from the head and
    encodes two people each in their own segment, as training did (a checkpoint without the key resumes)."""
    from refgen.identity.prompts import encode_prompts
    from refgen.identity.tokens import at_alpha, placeholder_embeds
    from refgen.images import scan
    from refgen.pipeline import IdentityPipeline

    cfg = E2EConfig(head="linear", output="tokens", steps=2, batch_size=2, warmup_steps=0, eval_identities=0,
                    two_person_fraction=1.0, two_person_images=4, isolate_slots=True, checkpoint_every=2,
                    cache_dir=str(tmp_path / "c"))
    out = tmp_path / "head"
    train_e2e(toy_ids, out, default_model(), default_vl_model(), cfg, device="cpu", dtype="fp32", progress=False)
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(log) == 2 and all(r["two_person"] for r in log)
    ip = IdentityPipeline.from_pretrained(default_model(), vl_model=default_vl_model(), head=str(out), device="cpu",
                                          dtype="fp32")
    assert ip.isolate_slots
    ids = sorted(scan(toy_ids).identities, key=lambda i: i.id)
    a, b = (ip.residual_from_refs(i.images[:2]) for i in ids[:2])
    prompt = "~ID~ next to ~ID~ in the city."
    E, M = ip.encode(prompt, [a, b])
    k = json.loads((out / "head.json").read_text())["config"]["slot_repeat"]  # the head's width
    ph = placeholder_embeds(ip.pipe, k)
    want = encode_prompts(ip.pipe, prompt, tokens=[at_alpha(t.tensor, ph, 1.0)[None] for t in (a, b)], isolate=True,
                          repeat=k)
    n = int(M.sum())
    torch.testing.assert_close(E[0, :n], want.embeds[0, :n].to(E))
    ip.isolate_slots = False  # the user may still ask for the joint encoding
    assert (ip.encode(prompt, [a, b])[0][0, :n] - E[0, :n]).abs().max() > 1e-4


def test_slot_roles_are_learnt_on_pair_steps_and_read_at_inference(toy, toy_ids, tmp_path):
    """slot_roles: a learnt (2, L, H) offset for the first / second slot of a two-person prompt, zero at the start,
    added to the head's output on pair steps only; saved in the head, read by the bench helper and IdentityPipeline
    for two-person prompts (one person: unchanged); a head without roles can start a run with them, not back."""
    import dataclasses

    from refgen.identity.generate import HeadMismatchError
    from refgen.identity.head import load_head, with_slot_role
    from refgen.identity.prompts import encode_prompts
    from refgen.identity.tokens import at_alpha, placeholder_embeds
    from refgen.identity.train_e2e import build_e2e_head, head_forward
    from refgen.images import scan
    from refgen.pipeline import IdentityPipeline

    with pytest.raises(ValueError, match="slot_roles are learnt on two-person steps"):
        E2EConfig(slot_roles=True)
    pipe, fx, data, cfg = toy
    rcfg = dataclasses.replace(cfg, output="residual", slot_roles=True)
    head = build_e2e_head(rcfg, data.means.shape[1], data.L, data.H)
    assert head.slot_roles.shape == (2, data.L, data.H) and not head.slot_roles.any()
    with torch.no_grad():
        head.slot_roles.normal_()
    g = step_generator(0, "step", 0)
    pb, sb = pair_batch(data, 2, rcfg, g), single_batch(data, [0, 1], rcfg, g)
    plain = dataclasses.replace(rcfg, slot_roles=False)
    bare = build_e2e_head(plain, data.means.shape[1], data.L, data.H)
    bare.load_state_dict({k: v for k, v in head.state_dict().items() if k != "slot_roles"})
    torch.testing.assert_close(head_forward(head, data, pb) - head_forward(bare, data, pb), head.slot_roles[pb.slot_k])
    torch.testing.assert_close(head_forward(head, data, sb), head_forward(bare, data, sb))   # one person: no role

    base = dict(head="linear", output="tokens", steps=2, batch_size=2, warmup_steps=0, eval_identities=0,
                two_person_fraction=1.0, two_person_images=4, checkpoint_every=2, cache_dir=str(tmp_path / "c"))
    first = tmp_path / "no_roles"
    train_e2e(toy_ids, first, default_model(), default_vl_model(), E2EConfig(**base), device="cpu", dtype="fp32",
              progress=False)
    out = tmp_path / "roles"
    train_e2e(toy_ids, out, default_model(), default_vl_model(), E2EConfig(**base, slot_roles=True,
              init_head=str(first)), device="cpu", dtype="fp32", progress=False)
    h, _ = load_head(out, torch.device("cpu"), torch.float32)
    assert h.slot_roles.abs().sum() > 0                                      # learnt from zero on the pair steps
    with pytest.raises(HeadMismatchError, match="slot_roles"):            # roles cannot be dropped silently
        train_e2e(toy_ids, tmp_path / "back", default_model(), default_vl_model(),
                  E2EConfig(**base, init_head=str(out)), device="cpu", dtype="fp32", progress=False)
    ip = IdentityPipeline.from_pretrained(default_model(), vl_model=default_vl_model(), head=str(out), device="cpu",
                                          dtype="fp32")
    ids = sorted(scan(toy_ids).identities, key=lambda i: i.id)
    a, b = (ip.residual_from_refs(i.images[:2]) for i in ids[:2])
    k = json.loads((out / "head.json").read_text())["config"]["slot_repeat"]  # the head's width
    ph = placeholder_embeds(ip.pipe, k)
    prompt = "~ID~ next to ~ID~ in the city."
    E, M = ip.encode(prompt, [a, b], [0.5])
    toks = [at_alpha(with_slot_role(h, "tokens", t.tensor, k, 2), ph, 0.5)[None] for k, t in enumerate((a, b))]
    torch.testing.assert_close(E, encode_prompts(ip.pipe, prompt, tokens=toks, repeat=k).embeds.to(E),
                               atol=1e-5, rtol=1e-5)
    assert not torch.equal(with_slot_role(h, "tokens", a.tensor, 1, 2), a.tensor)
    assert torch.equal(with_slot_role(h, "tokens", a.tensor, 0, 1), a.tensor)              # one person: as made
    assert torch.equal(with_slot_role(h, "residual", a.tensor, 0, 2), a.tensor)            # another kind: as made
    one = "A photo of ~ID~ in the city."
    torch.testing.assert_close(ip.encode(one, [a])[0], encode_prompts(
        ip.pipe, one, tokens=[a.tensor[None]], repeat=k).embeds.to(E), atol=1e-5, rtol=1e-5)


def test_token_heads_regress_token_teachers(toy, toy_ids, tmp_path):
    """teacher / mixed with token output regress each person's teacher tokens as the head's own unit,
    (T - T_ph) / e; residual teachers are named as the other output's, and tokens learnt for another text encoder
    are refused like any token file."""
    from refgen.identity.inject import residual_metadata, save_residual
    from refgen.identity.tokens import TokensMismatchError, embed_rms, placeholder_embeds, save_tokens, token_metadata

    pipe, _, data, cfg = toy
    T_ph, e = placeholder_embeds(pipe, cfg.slot_repeat), embed_rms(pipe)  # teachers as wide as the head's slot
    g = torch.Generator().manual_seed(0)
    teachers = tmp_path / "teachers"
    for name in data.ids:
        save_tokens(teachers / name / "teacher_tokens.safetensors", T_ph + e * torch.randn(T_ph.shape, generator=g),
                    T_ph, token_metadata(pipe, "toy", repeat=cfg.slot_repeat))
    base = dict(teacher_root=str(teachers), batch_size=5, lr=1e-2, warmup_steps=0, eval_identities=0,
                resampler={"width": 32, "layers": 1, "heads": 2})
    train_e2e(toy_ids, tmp_path / "t", default_model(), default_vl_model(),
              E2EConfig(objective="teacher", steps=30, **base), device="cpu", dtype="fp32", progress=False)
    log = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "teacher" in r]
    assert steps[-1]["teacher"] < 0.7 * steps[0]["teacher"]
    assert json.loads((tmp_path / "t" / "head.json").read_text())["output"] == "tokens"
    train_e2e(toy_ids, tmp_path / "m", default_model(), default_vl_model(),
              E2EConfig(objective="mixed", steps=2, teacher_weight=0.5, two_person_fraction=1.0, two_person_images=4,
                        **base), device="cpu", dtype="fp32", progress=False)
    m = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()][-1]
    assert m["two_person"] and m["loss"] == pytest.approx(m["flow"] + 0.5 * m["teacher"], rel=1e-5)
    only_residuals = tmp_path / "res"
    for name in data.ids:
        save_residual(only_residuals / name / "teacher_residual.safetensors", torch.zeros(data.L, data.H),
                      residual_metadata(pipe, "toy", repeat=cfg.slot_repeat))
    with pytest.raises(ValueError, match="has teacher_residual.safetensors: set output to residual"):
        train_e2e(toy_ids, tmp_path / "r", default_model(), default_vl_model(),
                  E2EConfig(objective="teacher", steps=1, **{**base, "teacher_root": str(only_residuals)}),
                  device="cpu", dtype="fp32", progress=False)
    other = tmp_path / "other"
    for name in data.ids:
        save_tokens(other / name / "teacher_tokens.safetensors", T_ph + 1.0, T_ph + 1.0,
                    token_metadata(pipe, "x", repeat=cfg.slot_repeat))
    with pytest.raises(TokensMismatchError, match="placeholder embeddings differ"):
        train_e2e(toy_ids, tmp_path / "o", default_model(), default_vl_model(),
                  E2EConfig(objective="teacher", steps=1, **{**base, "teacher_root": str(other)}),
                  device="cpu", dtype="fp32", progress=False)
    narrow = tmp_path / "narrow"  # teachers inverted at the seed's one placeholder, for a wider head: named
    T1 = placeholder_embeds(pipe)
    for name in data.ids:
        save_tokens(narrow / name / "teacher_tokens.safetensors", T1 + e, T1, token_metadata(pipe, "toy"))
    with pytest.raises(ValueError, match=f"teacher of {data.ids[0]} .*slot_repeat {cfg.slot_repeat}"):
        train_e2e(toy_ids, tmp_path / "n", default_model(), default_vl_model(),
                  E2EConfig(objective="teacher", steps=1, **{**base, "teacher_root": str(narrow)}),
                  device="cpu", dtype="fp32", progress=False)


class _NoTower:
    """Stands for the vision tower where a finished cache must be reused: loading it fails the test."""

    def __init__(self, fx):
        self.model_id, self.cfg, self.dtype = fx.model_id, fx.cfg, fx.dtype

    def load(self):
        raise AssertionError("the cache was rebuilt: the vision tower was loaded")


def test_cache_is_written_once_reused_and_refused_with_other_settings(toy, toy_ids, tmp_path):
    """Toy-world people rendered on the fly are the folders' people (same photos, prompts, features, latents);
    their cache is written once and reused without the vision tower; memory-mapped rows are the device rows; a
    cache made with other settings is refused naming them; a build that lost a shard redoes only that shard."""
    import dataclasses

    import numpy as np

    from refgen.identity.e2e_cache import FolderSource, ToySource, build_cache
    from refgen.identity.rows import Rows

    pipe, fx, folders, cfg = toy
    want, got = FolderSource(toy_ids, cfg.default_prompt), ToySource(100_000, 5)
    assert got.ids == want.ids
    for j in range(5):
        (wi, wp), (gi, gp) = want.person(j), got.person(j)
        assert gp == wp and len(gi) == len(wi) and all(np.array_equal(np.asarray(a), np.asarray(b))
                                                        for a, b in zip(gi, wi))
    scfg = dataclasses.replace(cfg, two_person_fraction=0.0, toyworld_identities=5, cache_dir=str(tmp_path / "c"))
    data = prepare_data(pipe, fx, None, scfg, progress=False)
    assert data.ids == folders.ids and [p.tolist() for p in data.photos] == [p.tolist() for p in folders.photos]
    P = len(data.photo_row)
    torch.testing.assert_close(data.tokens, folders.tokens)
    torch.testing.assert_close(data.latents, folders.latents[:P])
    assert [data.bank_starts[r].tolist() for r in data.photo_row] == [folders.bank_starts[r].tolist()
                                                                      for r in folders.photo_row[:P]]
    files = sorted((tmp_path / "c").iterdir())
    mtimes = [f.stat().st_mtime_ns for f in files]
    mapped = prepare_data(pipe, _NoTower(fx), None, dataclasses.replace(scfg, tables="mapped"), progress=False)
    assert sorted((tmp_path / "c").iterdir()) == files and [f.stat().st_mtime_ns for f in files] == mtimes
    assert isinstance(mapped.tokens, Rows) and isinstance(mapped.latents, Rows)
    idx = torch.tensor([[3, 0], [7, 7]])
    for name in ("tokens", "tok_mask", "means", "latents"):
        torch.testing.assert_close(getattr(mapped, name)[idx], getattr(data, name)[idx], rtol=0, atol=0)
    torch.testing.assert_close(mapped.bank[data.photo_row[:3]], data.bank[data.photo_row[:3]], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"other settings \(height\)"):
        prepare_data(pipe, _NoTower(fx), None, dataclasses.replace(scfg, height=32), progress=False)
    with pytest.raises(ValueError, match=r"other settings \(features.pixel_budget\)"):
        fx2 = _NoTower(fx)
        fx2.cfg = dataclasses.replace(fx.cfg, pixel_budget=1e5)
        prepare_data(pipe, fx2, None, scfg, progress=False)
    with pytest.raises(ValueError, match=r"identities.first_id, identities.n"):
        prepare_data(pipe, _NoTower(fx), None, dataclasses.replace(scfg, toyworld_identities=3, toyworld_first_id=7),
                     progress=False)
    # an interrupted build (shards of 2 people; the manifest and the second shard lost) redoes that shard only
    key = json.loads((tmp_path / "c" / "key.json").read_text())
    src = ToySource(100_000, 5)
    calls = []

    def tower():
        calls.append(1)
        return fx

    man = build_cache(tmp_path / "s", src, key, pipe, tower, 64, 64, progress=False, shard_identities=2)
    assert man["identities_computed"] == 5 and len(man["shards"]) == 3
    (tmp_path / "s" / "manifest.json").unlink()
    (tmp_path / "s" / "photos_00001.safetensors").unlink()
    again = build_cache(tmp_path / "s", src, key, pipe, tower, 64, 64, progress=False, shard_identities=2)
    assert again["identities_computed"] == 2 and again["photo_rows"] == man["photo_rows"] and len(calls) == 2


def test_training_from_mapped_tables_matches_the_device_tables(tmp_path):
    """The same run (toy-world people rendered on the fly, two-person steps, residual output) from the cache on
    the device and memory-mapped: the same losses. The second run reuses the first one's cache."""
    base = dict(head="resampler", output="residual", steps=3, batch_size=3, lr=1e-2, warmup_steps=0,
                eval_identities=0, resampler={"width": 32, "layers": 1, "heads": 2}, toyworld_identities=4,
                two_person_fraction=0.5, two_person_images=4, cache_dir=str(tmp_path / "cache"))
    logs = {}
    for tables in ("device", "mapped"):
        train_e2e(None, tmp_path / tables, default_model(), default_vl_model(), E2EConfig(tables=tables, **base),
                  device="cpu", dtype="fp32", progress=False)
        logs[tables] = [json.loads(x) for x in (tmp_path / tables / "metrics.jsonl").read_text().splitlines()]
        if tables == "device":
            built = (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns
    assert (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns == built
    a, b = ([r["loss"] for r in logs[k] if "loss" in r] for k in ("device", "mapped"))
    assert len(a) == 3 and any(r["two_person"] for r in logs["device"] if "loss" in r)
    assert b == pytest.approx(a, rel=1e-6)
    with pytest.raises(ValueError, match="not both"):
        train_e2e(tmp_path, tmp_path / "x", default_model(), default_vl_model(), E2EConfig(**base), device="cpu",
                  dtype="fp32", progress=False)


def test_yaml_mirrors_the_config():
    """configs/train_head_e2e.yaml lists every E2EConfig field at its default (a new field must reach the YAML)."""
    import dataclasses
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[2] / "configs" / "train_head_e2e.yaml"
    assert set(yaml.safe_load(path.read_text())) == {f.name for f in dataclasses.fields(E2EConfig)}
    assert dataclasses.asdict(E2EConfig.from_yaml(path)) == dataclasses.asdict(E2EConfig())


def test_soup_of_two_heads_from_one_start(toy_ids, tmp_path):
    """`refgen soup-heads`: weights (1, 0) give the first head back exactly, (0.5, 0.5) the mean of every weight;
    the soup loads like any head and keeps every parent's training people; other architectures are refused."""
    from safetensors.torch import load_file, save_file

    from refgen.cli import main
    from refgen.identity.head import load_head
    from refgen.identity.soup import soup_heads

    common = dict(head="linear", output="tokens", batch_size=3, lr=1e-2, warmup_steps=0, eval_identities=3,
                  cache_dir=str(tmp_path / "cache"))
    a, b = tmp_path / "a", tmp_path / "b"
    train_e2e(toy_ids, a, default_model(), default_vl_model(),
              E2EConfig(steps=3, eval_every=3, checkpoint_every=3, **common), device="cpu", dtype="fp32",
              progress=False)
    train_e2e(toy_ids, b, default_model(), default_vl_model(),
              E2EConfig(steps=2, eval_every=2, checkpoint_every=2, init_head=str(a), seed=1, **common),
              device="cpu", dtype="fp32", progress=False)
    wa, wb = load_file(a / "head.safetensors"), load_file(b / "head.safetensors")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)

    assert main(["soup-heads", str(a), str(b), "--weights", "1,0", "--out", str(tmp_path / "s10")]) == 0
    ha, _ = load_head(a, torch.device("cpu"), torch.float32)
    hs, md = load_head(tmp_path / "s10", torch.device("cpu"), torch.float32)
    for (k, x), (_, y) in zip(ha.state_dict().items(), hs.state_dict().items()):
        assert torch.equal(x, y), k
    assert torch.equal(hs.token_base, ha.token_base) and hs.token_scale == ha.token_scale
    assert json.loads(md["soup"])["weights"] == [1.0, 0.0]

    rec = soup_heads([a, b], None, tmp_path / "s55")
    ws = load_file(tmp_path / "s55" / "head.safetensors")
    for k in wa:
        torch.testing.assert_close(ws[k], wa[k] if k == "output.placeholder" else (wa[k] + wb[k]) / 2)
    ids_a = json.loads((a / "head.json").read_text())["train_ids"]
    assert set(rec["train_ids"]) >= set(ids_a) and rec["soup"]["parents"] == [str(a), str(b)]
    assert json.loads((tmp_path / "s55" / "head.json").read_text())["soup"]["weights"] == [0.5, 0.5]

    with pytest.raises(ValueError, match="sum to 1"):
        soup_heads([a, b], [0.7, 0.7], tmp_path / "bad")
    md_b = dict(__import__("safetensors").safe_open(str(b / "head.safetensors"), "pt").metadata())
    other = tmp_path / "other"
    other.mkdir()
    save_file(wb, other / "head.safetensors", {**md_b, "L": str(int(md_b["L"]) + 1)})
    (other / "head.json").write_text((b / "head.json").read_text())
    with pytest.raises(ValueError, match=r"differ in L \('\d+' against '\d+'\)"):
        soup_heads([a, other], None, tmp_path / "bad")
    assert main(["soup-heads", str(a), "--out", str(tmp_path / "bad")]) == 1   # one head: a clear error, exit 1


def test_a_head_with_wider_slots_trains_loads_and_renders(toy_ids, tmp_path):
    """slot_repeat 2: the head's window is the placeholder twice over, its cache rows and record say so, and
    IdentityPipeline reads its people into slots as wide; a 3-token inversion cannot start from it."""
    from refgen.identity.head import check_start_head, load_head
    from refgen.identity.slots import placeholder_ids
    from refgen.images import scan
    from refgen.pipeline import IdentityPipeline

    from refgen.cli import main

    cfg_file = tmp_path / "e2e.yaml"
    cfg_file.write_text("warmup_steps: 0\neval_identities: 0\neval_every: 4\ncheckpoint_every: 4\n")
    out = tmp_path / "head"
    assert main(["train-head", str(toy_ids), "--objective", "e2e", "--head", "linear", "--output", "tokens",
                 "--model", default_model(), "--vl-model", default_vl_model(), "--config", str(cfg_file),
                 "--steps", "4", "--batch-size", "3", "--lr", "0.01", "--slot-repeat", "2", "--out", str(out),
                 "--device", "cpu", "--dtype", "fp32"]) == 0
    head, md = load_head(out, torch.device("cpu"), torch.float32)
    assert json.loads((out / "head.json").read_text())["config"]["slot_repeat"] == 2
    ip = IdentityPipeline.from_pretrained(default_model(), vl_model=default_vl_model(), head=str(out), device="cpu",
                                          dtype="fp32")
    base = placeholder_ids(ip.pipe.tokenizer)
    assert int(md["L"]) == 2 * len(base) and json.loads(md["placeholder_token_ids"]) == base * 2
    person = ip.residual_from_refs(sorted(scan(toy_ids).identities, key=lambda i: i.id)[0].images[:2])
    assert person.tensor.shape[0] == 2 * len(base)
    img = ip("A photo of ~ID~ at the beach.", [person], seeds=[0], steps=2, height=32, width=32)
    assert img[0].size == (32, 32)
    check_start_head(out, "tokens", 2)
    with pytest.raises(ValueError, match="slot_repeat 2 .*slot_repeat is 1"):
        check_start_head(out, "tokens")
    from refgen.identity.report import build_report

    rep = build_report(out)["head"]  # `refgen report` shows the width
    assert rep["slot_repeat"] == 2 and rep["L"] == 2 * len(base)
