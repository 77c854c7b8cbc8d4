import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from refgen.cli import main
from refgen.identity.inject import load_residual
from refgen.identity.invert import InvertConfig, Inverter, shard_identities
from refgen.images import scan

FAST = dict(height=32, width=32, steps=8, lr=5e-2, init_scale=1.0, qa=False, checkpoint_every=5, parametrisation="rms_scaled")


def make_identities(root, n=3, size=40):
    rng = np.random.default_rng(0)
    for k in range(n):
        d = root / f"seed_{k}"
        d.mkdir(parents=True)
        base = rng.integers(0, 255, 3).astype(np.uint8)
        for j in range(2 + k % 2):
            a = np.zeros((size, size + 8, 3), np.uint8) + base  # not square: exercises the centre crop
            a[10:30, 10 + 3 * j:25 + 3 * j] = 255 - base
            Image.fromarray(a).save(d / f"img{j}.png")
    return root


def run(pipe, root, out, **kw):
    cfg = InvertConfig(**{**FAST, **kw})
    inv = Inverter(pipe, cfg, out, model_id="tiny", progress=False)
    idents = scan(root).identities
    states = []
    K = cfg.identities_per_batch
    for b in range(0, len(idents), K):
        states += inv.run_batch(idents[b:b + K])
    return inv, {s.ident.id: s for s in states}


def test_loss_falls_offslot_zero_and_artifacts(pipe, tmp_path):
    root = make_identities(tmp_path / "ids", n=1)
    inv, states = run(pipe, root, root, steps=40, qa=True, qa_alphas=[1.0, 2.0], qa_seeds=[0], qa_steps=2)
    rec = inv.finish(states["seed_0"])
    assert rec["eval_loss_teacher"] < rec["eval_loss_base"]  # the residual helps denoise this identity
    d = root / "seed_0"
    E_t = torch.load(d / "teacher_prompt_embeds.pt")
    E_b = torch.load(d / "base_prompt_embeds.pt")
    S, H, L, s = rec["S"], rec["H"], rec["L"], rec["s"]
    assert E_t.shape == (1, S, H) and E_t.device.type == "cpu"
    diff = E_t - E_b
    assert diff[:, :s].abs().max() == 0 and diff[:, s + L:].abs().max() == 0  # off-slot exactly zero
    assert diff[:, s:s + L].abs().max() > 0
    R = load_residual(d / "teacher_residual.safetensors", pipe, torch.device("cpu"), torch.float32)
    assert R.shape == (L, H) and torch.allclose(diff[0, s:s + L], R)
    meta = json.loads((d / "teacher.json").read_text())
    for k in ("S", "H", "L", "s", "dtype", "scheduler", "true_cfg", "steps_run", "stop_reason", "final_loss", "scale",
              "config", "versions", "git_commit"):
        assert k in meta, k
    assert meta["steps_run"] == 40 and meta["stop_reason"] == "max_steps" and 0.01 <= meta["scale"] <= 1.5
    assert (d / "alpha_eval" / "grid.png").exists()
    assert json.loads((d / "alpha_eval" / "grid.json").read_text())["alphas"] == [1.0, 2.0]
    lines = [json.loads(x) for x in (d / "teacher_metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 40 and {"loss", "total_rms", "slot_rms", "offslot_rms", "scale", "lr"} <= set(lines[0])
    assert all(x["offslot_rms"] == 0 for x in lines)
    assert not (d / "teacher_ckpt.pt").exists()  # complete: the checkpoint is gone


def test_saved_teacher_embeds_are_what_the_bf16_model_saw(tiny_models, tmp_path):
    """In bf16, teacher_prompt_embeds.pt is bit-identical to the encoder_hidden_states the transformer receives
    with the final residual (captured at its input), and differs from rounding fp32 E + R once."""
    from refgen.identity.render import load_pipeline

    pipe16 = load_pipeline(tiny_models["qwen_image"], device="cpu", dtype="bf16")
    root = make_identities(tmp_path / "ids", n=1)
    inv, states = run(pipe16, root, root, steps=3)
    seen = []
    hook = pipe16.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].detach().clone()), with_kwargs=True)
    try:
        inv.eval_loss(states["seed_0"], inv.residual(states["seed_0"]).detach())
    finally:
        hook.remove()
    inv.finish(states["seed_0"])
    E_t = torch.load(root / "seed_0" / "teacher_prompt_embeds.pt")
    assert E_t.dtype == torch.bfloat16 and torch.equal(E_t[0], seen[-1][0])
    R = load_residual(root / "seed_0" / "teacher_residual.safetensors", pipe16, torch.device("cpu"), torch.float32)
    once = torch.load(root / "seed_0" / "base_prompt_embeds.pt").float()
    once[0, inv.slot.start:inv.slot.start + inv.slot.length] += R
    assert not torch.equal(E_t, once.to(torch.bfloat16))  # the two roundings differ here: the check has teeth


def test_batched_equals_sequential(pipe, tmp_path):
    root = make_identities(tmp_path / "ids", n=3)
    inv1, one = run(pipe, root, tmp_path / "a", identities_per_batch=1)
    inv3, three = run(pipe, root, tmp_path / "b", identities_per_batch=3)
    for k in one:
        r1, r3 = inv1.residual(one[k]), inv3.residual(three[k])
        assert torch.allclose(r1, r3, atol=1e-5, rtol=1e-4), k
        assert one[k].losses == pytest.approx(three[k].losses, rel=1e-4)


def test_nan_stops_one_identity_and_the_others_go_on(pipe, tmp_path):
    root = make_identities(tmp_path / "ids", n=2)
    cfg = InvertConfig(**{**FAST, "identities_per_batch": 2})
    inv = Inverter(pipe, cfg, tmp_path / "out", progress=False)
    states = [inv._new_state(i) for i in scan(root).identities]
    with torch.no_grad():
        states[0].log_scale.fill_(float("nan"))
    inv.run_batch([s.ident for s in states], states)
    assert states[0].stop_reason == "nan" and "non-finite" in states[0].message
    assert states[1].stop_reason == "max_steps" and torch.isfinite(inv.residual(states[1])).all()
    rec = inv.finish(states[0])
    assert rec["stop_reason"] == "nan" and not (tmp_path / "out" / "seed_0" / "teacher_residual.safetensors").exists()


def test_divergence_halves_lr_then_stops(pipe, tmp_path):
    root = make_identities(tmp_path / "ids", n=1)
    # lr 0 cannot lower the loss; with diverge_steps=1 any rise of the smoothed loss counts as divergence.
    _, states = run(pipe, root, tmp_path / "o", steps=30, diverge_steps=1, lr=1e-9)
    s = states["seed_0"]
    assert s.lr_halved and s.lr == pytest.approx(0.5e-9) and s.stop_reason == "diverged"


def test_shards_cover_every_identity_once(tmp_path):
    root = make_identities(tmp_path / "ids", n=3)
    idents = scan(root).identities * 1
    ids = [i.id for n in (1, 2, 3, 5) for j in range(n) for i in shard_identities(idents, j, n)]
    assert sorted(ids) == sorted([i.id for i in idents] * 4)
    with pytest.raises(ValueError):
        shard_identities(idents, 2, 2)


def _invert_cmd(root, model, out, cfg_path):
    return [sys.executable, "-m", "refgen.cli", "invert", str(root), "--model", model, "--out", str(out),
            "--config", str(cfg_path), "--device", "cpu", "--dtype", "fp32"]


def test_kill_and_resume_matches_uninterrupted(tiny_models, tmp_path):
    import yaml

    root = make_identities(tmp_path / "ids", n=1)
    cfg_path = tmp_path / "inv.yaml"
    cfg_path.write_text(yaml.safe_dump({**FAST, "steps": 24, "checkpoint_every": 8}))
    model = tiny_models["qwen_image"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_invert_cmd(root, model, tmp_path / "killed", cfg_path), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "seed_0" / "teacher_ckpt.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (tmp_path / "killed" / "seed_0" / "teacher.json").exists()
    resumed = subprocess.run(_invert_cmd(root, model, tmp_path / "killed", cfg_path), env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0 and "resuming from step" in resumed.stdout
    assert subprocess.run(_invert_cmd(root, model, tmp_path / "clean", cfg_path), env=env,
                          capture_output=True).returncode == 0
    a = torch.load(tmp_path / "killed" / "seed_0" / "teacher_prompt_embeds.pt")
    b = torch.load(tmp_path / "clean" / "seed_0" / "teacher_prompt_embeds.pt")
    assert torch.equal(a, b)
    # the steps the killed run logged past its checkpoint were replayed: each is in the log once, as in a clean run
    logs = [[json.loads(x) for x in (tmp_path / d / "seed_0" / "teacher_metrics.jsonl").read_text().splitlines()]
            for d in ("killed", "clean")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == list(range(1, 25))
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    # a third run finds everything complete and does nothing
    out = subprocess.run(_invert_cmd(root, model, tmp_path / "clean", cfg_path), env=env, capture_output=True,
                         text=True)
    assert "1 complete, 0 to do" in out.stdout


def test_cli_only_and_bad_only(tiny_models, tmp_path, capsys):
    root = make_identities(tmp_path / "ids", n=2)
    base = ["invert", str(root), "--model", tiny_models["qwen_image"], "--device", "cpu", "--dtype", "fp32",
            "--steps", "2", "--height", "32", "--width", "32", "--out", str(tmp_path / "o")]
    assert main(base + ["--only", "seed_9"]) == 1
    assert "seed_9" in capsys.readouterr().err
    assert main(base + ["--only", "seed_1", "--shard", "x"]) == 1
    assert main(base + ["--only", "seed_1", "--config", str(tmp_path / "nope.yaml")]) == 1


def test_resume_under_another_batch_size_but_not_another_objective(pipe, tmp_path):
    root = make_identities(tmp_path / "ids", n=2)
    out = tmp_path / "o"
    run(pipe, root, out, identities_per_batch=2, steps=6, checkpoint_every=3)  # finish() not called: ckpt at step 3
    ident = scan(root).identities[0]
    assert (out / ident.id / "teacher_ckpt.pt").exists()
    inv = Inverter(pipe, InvertConfig(**{**FAST, "identities_per_batch": 1, "steps": 6, "checkpoint_every": 3}),
                   out, progress=False)
    assert inv._new_state(ident).step == 3
    inv = Inverter(pipe, InvertConfig(**{**FAST, "lr": 1e-3, "steps": 6, "checkpoint_every": 3}), out, progress=False)
    with pytest.raises(ValueError, match="another config.*lr"):
        inv._new_state(ident)


@pytest.mark.parametrize("parametrisation", ["tokens", "free"])
def test_resume_where_log_scale_has_no_moments(pipe, tmp_path, parametrisation):
    # 'tokens' (the default) and 'free' never use log_scale, so AdamW keeps no moments for it; a resume must restore
    # P's moments alone and end where the uninterrupted run ended
    root = make_identities(tmp_path / "ids", n=1)
    kw = {**FAST, "parametrisation": parametrisation, "steps": 6, "checkpoint_every": 3}
    _, full = run(pipe, root, tmp_path / "o", **kw)  # leaves its step-3 checkpoint behind
    ident = scan(root).identities[0]
    inv = Inverter(pipe, InvertConfig(**kw), tmp_path / "o", progress=False)
    s = inv._new_state(ident)
    assert s.step == 3 and s.adam_state["step"][1] is None and s.adam_state["step"][0] is not None
    resumed = inv.run_batch([ident], [s])[0]
    assert resumed.step == 6 and torch.equal(resumed.P, full[ident.id].P)


def test_cli_turns_qa_off_and_sets_the_checkpoint_interval(tiny_models, tmp_path):
    root = make_identities(tmp_path / "ids", n=1)
    assert main(["invert", str(root), "--model", tiny_models["qwen_image"], "--device", "cpu", "--dtype", "fp32",
                 "--steps", "2", "--height", "32", "--width", "32", "--out", str(tmp_path / "o"), "--no-qa",
                 "--checkpoint-every", "7"]) == 0
    rec = json.loads((tmp_path / "o" / "seed_0" / "teacher.json").read_text())
    assert rec["config"]["qa"] is False and rec["config"]["checkpoint_every"] == 7
    assert not (tmp_path / "o" / "seed_0" / "alpha_eval").exists()
    assert rec["config"]["parametrisation"] == "tokens" and (tmp_path / "o" / "seed_0" / "teacher_tokens.safetensors").exists()
    assert main(["invert", str(root), "--model", tiny_models["qwen_image"], "--device", "cpu", "--dtype", "fp32",
                 "--steps", "2", "--height", "32", "--width", "32", "--out", str(tmp_path / "free"), "--no-qa",
                 "--parametrisation", "free", "--slot-repeat", "2"]) == 0
    assert (tmp_path / "free" / "seed_0" / "teacher_residual.safetensors").exists()
    rec = json.loads((tmp_path / "free" / "seed_0" / "teacher.json").read_text())
    wide = json.loads((tmp_path / "o" / "seed_0" / "teacher.json").read_text())  # the default slot_repeat
    assert wide["config"]["slot_repeat"] == InvertConfig().slot_repeat
    assert rec["config"]["slot_repeat"] == 2 and rec["L"] * wide["config"]["slot_repeat"] == 2 * wide["L"]


def test_complete_identities_made_with_other_settings_are_refused_not_reused(tiny_models, tmp_path, capsys):
    root = make_identities(tmp_path / "ids", n=1)
    base = ["invert", str(root), "--model", tiny_models["qwen_image"], "--device", "cpu", "--dtype", "fp32",
            "--height", "32", "--width", "32", "--out", str(tmp_path / "o")]
    assert main(base + ["--steps", "2"]) == 0
    assert main(base + ["--steps", "2"]) == 0  # same settings: complete, skipped
    assert "1 complete, 0 to do" in capsys.readouterr().out
    assert main(base + ["--steps", "3"]) == 1  # other settings: the old teacher must not pass for this run's
    err = capsys.readouterr().err
    assert "seed_0" in err and "steps 2 -> 3" in err
    rec = json.loads((tmp_path / "o" / "seed_0" / "teacher.json").read_text())
    assert rec["steps_run"] == 2  # nothing was overwritten


CONTEXTS = ["a photo of ~ID~ on a beach at sunset, wide shot", "two people: on the left, ~ID~; on the right, a person"]


def test_contexts_put_the_residual_at_each_prompts_own_window(pipe, tmp_path):
    """Each image of a step draws one of base_prompt + contexts; the residual goes into that prompt's window
    (which starts elsewhere in each) and nowhere else; draws come from the identity's own generator, so
    batched still equals sequential."""
    from refgen.identity.prompts import encode_prompts

    starts = [encode_prompts(pipe, t, n_identities=1).slots[0][0].start for t in [FAST_BASE] + CONTEXTS]
    assert len(set(starts)) == 3  # the windows really are at different places
    root = make_identities(tmp_path / "ids", n=3)
    inv1, one = run(pipe, root, tmp_path / "a", identities_per_batch=1, base_prompt=FAST_BASE, contexts=CONTEXTS)
    inv3, three = run(pipe, root, tmp_path / "b", identities_per_batch=3, base_prompt=FAST_BASE, contexts=CONTEXTS)
    for k in one:
        assert torch.allclose(inv1.residual(one[k]), inv3.residual(three[k]), atol=1e-5, rtol=1e-4), k
        assert one[k].losses == pytest.approx(three[k].losses, rel=1e-4)
    lines = [json.loads(x) for x in (tmp_path / "a" / "seed_0" / "teacher_metrics.jsonl").read_text().splitlines()]
    assert all(x["offslot_rms"] == 0 and x["slot_rms"] > 0 for x in lines)
    # a context changes what is optimised: not the same residual as base_prompt alone
    inv0, alone = run(pipe, root, tmp_path / "c", base_prompt=FAST_BASE)
    assert not torch.allclose(inv0.residual(alone["seed_0"]), inv1.residual(one["seed_0"]))
    with pytest.raises(ValueError, match=r"contexts\[1\]"):
        InvertConfig(contexts=["~ID~ on a beach", "no placeholder here"])


def test_free_parametrisation_is_the_residual_itself_unbounded(pipe, tmp_path):
    root = make_identities(tmp_path / "ids", n=1)
    inv, st = run(pipe, root, tmp_path / "o", parametrisation="free", init_scale=1.0, scale_max=1.0, lr=0.5,
                  steps=12)
    s = st["seed_0"]
    R = inv.residual(s)
    assert R is s.P  # no normalisation, no scale: the optimiser moves the window embedding offsets directly
    assert R.pow(2).mean().sqrt() > 1.0  # past what the rms_scaled clamp (scale_max 1.0) would allow
    rec = inv.finish(s)
    assert rec["eval_loss_teacher"] < rec["eval_loss_base"]
    saved = load_residual(tmp_path / "o" / "seed_0" / "teacher_residual.safetensors", pipe, torch.device("cpu"),
                          torch.float32)
    assert torch.equal(saved, R.detach().cpu())  # the same portable [L, H] artifact as the seed's mode
    with pytest.raises(ValueError, match="parametrisation"):
        InvertConfig(parametrisation="huge")
    with pytest.raises(ValueError, match="sigma_tail"):
        InvertConfig(sigma_tail=2.0)


FAST_BASE = "a portrait photo of ~ID~, studio lighting"


def test_image_prompts_give_each_photo_its_own_sentence(pipe, tmp_path):
    from refgen.toyworld.identities import make_identities as make_toy_identities

    root = tmp_path / "ids"
    make_toy_identities(root, n=2, seed=7, size=32, progress=False)
    idents = scan(root).identities
    table = json.loads((idents[0].path / "prompts.json").read_text())
    assert set(table) == {p.name for p in idents[0].images} and all(t.count("~ID~") == 1 for t in table.values())
    cfg = InvertConfig(**{**FAST, "image_prompts": True, "steps": 4})
    inv = Inverter(pipe, cfg, tmp_path / "o", model_id="tiny", progress=False)
    recs = inv.run(idents)
    assert [r["steps_run"] for r in recs] == [4, 4]
    # the bank holds every photo's own prompt, in the order of the identity's images
    E, M, starts = inv.ctx
    assert E.shape[0] == sum(len(i.images) for i in idents)
    from refgen.identity.prompts import encode_prompts

    first = encode_prompts(pipe, table[idents[0].images[0].name], n_identities=1, repeat=cfg.slot_repeat)
    n = first.embeds.shape[1]
    assert torch.equal(E[0, :n], first.embeds[0]) and int(starts[0]) == first.slots[0][0].start
    lines = [json.loads(x) for x in (tmp_path / "o" / idents[0].id / "teacher_metrics.jsonl").read_text().splitlines()]
    assert all(x["offslot_rms"] == 0 and x["slot_rms"] > 0 for x in lines)
    # a folder without prompts.json is named, before any step runs
    (idents[1].path / "prompts.json").unlink()
    inv2 = Inverter(pipe, cfg, tmp_path / "o2", model_id="tiny", progress=False)
    with pytest.raises(ValueError, match="prompts.json"):
        inv2.run(idents)
    with pytest.raises(ValueError, match="set one"):
        InvertConfig(image_prompts=True, contexts=["~ID~ on a beach"])


def test_cosine_lr_schedule_and_records_from_before_it(pipe, tmp_path):
    """lr_schedule cosine: each step's lr (logged) falls from lr to lr_min_ratio * lr; a teacher recorded before
    the setting existed ran at a constant lr, and is not stale for a constant-lr run."""
    import math

    root = make_identities(tmp_path / "ids", n=1)
    run(pipe, root, tmp_path / "cos", lr_schedule="cosine", lr_min_ratio=0.2)
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "cos" / "seed_0" / "teacher_metrics.jsonl").read_text()
           .splitlines() if '"lr"' in x]
    want = [5e-2 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * s / 8))) for s in range(8)]
    assert lrs[:8] == pytest.approx(want) and lrs[0] > lrs[4] > lrs[7]
    inv2, st2 = run(pipe, root, tmp_path / "const")
    inv2.finish(st2["seed_0"])
    rec_file = tmp_path / "const" / "seed_0" / "teacher.json"
    rec = json.loads(rec_file.read_text())
    for k in ("lr_schedule", "lr_min_ratio"):  # as a record made before these settings existed
        del rec["config"][k]
    rec_file.write_text(json.dumps(rec))
    assert inv2.settings_diff(scan(root).identities[0]) == {}
    with pytest.raises(ValueError, match="lr_schedule"):
        InvertConfig(lr_schedule="linear")


def test_cli_starts_each_identity_from_a_head_s_prediction(tmp_path, capsys):
    """`refgen invert --start-head H --vl-model V`: every identity starts from H's prediction from its own photos
    (the record says so and the first step's tokens are that prediction), anchored by --start-weight; a head of the
    other output kind is refused before any model loads."""
    from refgen.identity.train_e2e import E2EConfig, train_e2e
    from refgen.identity.tokens import read_tokens
    from refgen.pipeline import IdentityPipeline
    from refgen.toyworld.benchmark import default_model, default_vl_model
    from refgen.toyworld.identities import make_identities as make_toy_identities

    make_toy_identities(tmp_path / "train", n=3, seed=100_000, progress=False)
    head = tmp_path / "head"
    train_e2e(tmp_path / "train", head, default_model(), default_vl_model(),
              E2EConfig(head="linear", steps=2, batch_size=2, warmup_steps=0, eval_identities=0),
              device="cpu", dtype="fp32", progress=False)
    make_toy_identities(tmp_path / "people", n=1, seed=500_000, progress=False)
    base = ["invert", str(tmp_path / "people"), "--model", default_model(), "--device", "cpu", "--dtype", "fp32",
            "--no-qa", "--height", "64", "--width", "64", "--start-head", str(head), "--vl-model", default_vl_model()]
    assert main(base + ["--steps", "1", "--out", str(tmp_path / "o"), "--start-weight", "2.5"]) == 0
    (ident,) = scan(tmp_path / "people").identities
    rec = json.loads((tmp_path / "o" / ident.id / "teacher.json").read_text())
    assert rec["started_from"] == "given" and rec["config"]["start_weight"] == 2.5
    ip = IdentityPipeline.from_pretrained(default_model(), vl_model=default_vl_model(), head=str(head), device="cpu",
                                          dtype="fp32")
    guess = ip.residual_from_refs(ident.images)  # SlotTokens: the head's tokens for this person
    learnt, placeholder, _ = read_tokens(tmp_path / "o" / ident.id / "teacher_tokens.safetensors")
    moved, guessed = (learnt - guess.tensor).pow(2).mean().sqrt(), (guess.tensor - placeholder).pow(2).mean().sqrt()
    assert 0 < moved < guessed  # one small step away from the head's guess, not from the bare placeholder
    assert main(base + ["--steps", "1", "--out", str(tmp_path / "free"), "--parametrisation", "free"]) == 1
    assert "outputs tokens, but the inversion's parametrisation is 'free'" in capsys.readouterr().err


def test_id_loss_in_inversion(pipe, tiny_models, tmp_path, capsys):
    """id_weight reads each step's one-step estimates through a vision tower: it is logged, it changes what is learnt,
    it needs a VisionFeatures (refused without one, and on the CLI without --vl-model before any model loads)."""
    from refgen.identity.features import VisionFeatures

    root = make_identities(tmp_path / "ids", n=2)
    with pytest.raises(ValueError, match="give the Inverter a VisionFeatures"):
        Inverter(pipe, InvertConfig(**{**FAST, "id_weight": 0.5}), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="id_weight must be a finite number >= 0"):
        InvertConfig(id_weight=-1.0)
    with pytest.raises(ValueError, match="multiples of 32"):
        InvertConfig(id_weight=0.5, height=48, width=48)
    vl = VisionFeatures(tiny_models["qwen3_vl"], "cpu", "fp32")
    learnt = {}
    for w in (0.0, 5.0):
        cfg = InvertConfig(**{**FAST, "steps": 3, "id_weight": w})
        inv = Inverter(pipe, cfg, tmp_path / f"o{w}", model_id="tiny", progress=False, vl=vl)
        (s0, s1) = inv.run_batch(scan(root).identities[:2])
        learnt[w] = s0.P.detach().clone()
        log = [json.loads(x) for x in (tmp_path / f"o{w}" / "seed_0" / "teacher_metrics.jsonl").read_text().splitlines()]
        ids = [r["id"] for r in log if "id" in r]
        assert len(ids) == 3 and (all(0 < x < 2 for x in ids) if w else all(x == 0 for x in ids)), log
        if w:
            assert s0.means.shape == (s0.latents.shape[0], vl.dim)
    assert not torch.allclose(learnt[0.0], learnt[5.0])
    base = ["invert", str(root), "--model", tiny_models["qwen_image"], "--device", "cpu", "--dtype", "fp32",
            "--steps", "1", "--height", "32", "--width", "32", "--no-qa", "--parametrisation", "rms_scaled",
            "--id-weight", "0.5", "--out", str(tmp_path / "cli")]
    assert main(base) == 1 and "needs --vl-model" in capsys.readouterr().err
    assert main(base + ["--vl-model", tiny_models["qwen3_vl"], "--only", "seed_0"]) == 0
    rec = json.loads((tmp_path / "cli" / "seed_0" / "teacher.json").read_text())
    assert rec["config"]["id_weight"] == 0.5
    from refgen.pipeline import IdentityPipeline  # the Python API: features given with the call

    ip = IdentityPipeline(pipe)
    photos = scan(root).identities[1].images
    cfg = InvertConfig(**{**FAST, "steps": 2, "id_weight": 0.5})
    with pytest.raises(ValueError, match="features=VisionFeatures"):
        ip.invert(photos, cfg, progress=False)
    assert ip.invert(photos, cfg, progress=False, features=vl).tensor.shape[0] == s0.P.shape[0]
