"""The DiT yardstick (refgen.dit.yardstick, bench/dit_yardstick.py): its tiny CPU run goes through every stage, and
the parts its numbers depend on can fail here: the judge must read the held-out renders and their VAE round trip
(a wrong latent normalisation or VAE wiring drops those), seed ranges must be disjoint, every held-out caption word
must be a token of the tiny T5, time-to-quality (caption and DINO check) must pick the first crossing, and a variant
continued with --resume must end where one longer run ends, with its earlier scorings kept."""

from __future__ import annotations

import json

import pytest
import torch

from refgen.dit import yardstick as Y
from refgen.toyworld import world


def test_tiny_yardstick_runs_every_stage_and_its_ceilings_read_the_images(tmp_path, capsys, bench_module):
    out = tmp_path / "yard"
    assert bench_module("dit_yardstick").main(["--tiny", "--out", str(out), "--variants", "default,repa",
                                               "--lr", "2e-3"]) == 0
    table = capsys.readouterr().out
    assert "| default |" in table and "| repa |" in table
    rep = json.loads((out / "yardstick.json").read_text())
    assert rep["config"]["train"]["lr"] == 2e-3
    assert (out / "yardstick.png").stat().st_size > 10_000
    # the held-out set went through `prepare`: its shards hold every held-out image, in the toy VAE's /4 geometry
    idx = json.loads((out / "shards" / "eval" / "index.json").read_text())
    assert idx["samples"] == 6 and idx["dit_patch_size"] == 4 and idx["buckets"]["64x64"]["latent_hw"] == [16, 16]
    # the judge reads the renders, and through the VAE round trip (stored latents -> decode) almost as well
    c = rep["ceilings"]
    assert c["renders"]["attribute"]["acc"] >= 0.9 and c["vae_round_trip"]["attribute"]["acc"] >= 0.85, c
    v = rep["variants"]["default"]
    assert [r["step"] for r in v["scores"]] == [2, 4]
    for r in v["scores"]:
        assert 0 < r["train_s"] < 60 and r["images_seen"] == r["step"] * 4
        for check in ("text", "dino"):
            for k in ("attribute", "person", "scene", "person_count"):
                m = r[check][k]
                assert m["n"] > 0 and m["ci"][0] <= m["acc"] <= m["ci"][1], (check, k, m)
        # four steps of a 0.1 M model draw nothing the judge reads as the captioned people
        assert r["text"]["attribute"]["acc"] < c["vae_round_trip"]["attribute"]["acc"] - 0.3
    assert v["time_to_quality"] == {"80%": None, "90%": None}
    assert "yardstick training scenes" in rep["seed_ranges"] and rep["encoders"]["dino"].startswith("tiny random")
    assert (out / "runs" / "default" / "samples_step0000004.png").is_file()
    # the second variant trained from scratch on the same shards, with REPA on; its flow loss is compared
    r = rep["variants"]["repa"]
    assert [x["step"] for x in r["scores"]] == [2, 4] and r["loss_vs_first_variant"]["steps_compared"] == 2
    assert "repa_loss" in json.loads((out / "runs" / "repa" / "metrics.jsonl").read_text().splitlines()[-1])
    # a later call on the same OUT re-runs one variant on the prepared data and keeps the other's scores
    shard = next((out / "shards" / "train" / "buckets").rglob("*.tar")).stat().st_mtime_ns
    assert bench_module("dit_yardstick").main(["--tiny", "--out", str(out), "--variants", "repa", "--lr", "2e-3"]) == 0
    again = json.loads((out / "yardstick.json").read_text())
    assert list(again["variants"]) == ["default", "repa"] and again["variants"]["default"] == v
    assert next((out / "shards" / "train" / "buckets").rglob("*.tar")).stat().st_mtime_ns == shard   # not redone


def test_scores_split_by_people_say_when_the_words_go_to_the_wrong_person():
    """Renders read right; the same two-person renders scored against the people in swapped order lose their
    attributes to the other person (leak near 1), while the one-person rows keep theirs."""
    from refgen.toyworld import recognizer as R

    seeds = {1: [], 2: []}
    s = 5_600_000_000
    while min(len(v) for v in seeds.values()) < 6:
        sc = world.scene_from_seed(s)
        if len(seeds[len(sc.people)]) < 6:
            seeds[len(sc.people)].append(s)
        s += 1
    rows, images = [], []
    for k, ss in seeds.items():
        for x in ss:
            sc = world.scene_from_seed(x)
            people = [p.identity.to_dict() for p in sc.people]
            rows.append({"scene": sc.background, "people": people[::-1]})  # two people: the wrong order
            images.append(world.render(sc, 64))
    m = Y.score_images(R.load(), images, rows)
    one, two = m["by_people"]["1"], m["by_people"]["2"]
    assert one["person"]["n"] == 6 and two["person"]["n"] == 12 and m["person"]["n"] == 18
    assert one["attribute"]["acc"] >= 0.9 and two["attribute"]["acc"] < one["attribute"]["acc"] - 0.3
    assert two["leak"] > 0.8 > two["leak_chance"] and "leak" not in one
    assert m["attribute"]["k"] == one["attribute"]["k"] + two["attribute"]["k"]


def test_time_to_quality_is_the_first_scoring_at_or_above_each_threshold():
    def rec(step, acc, dino):
        return {"step": step, "train_s": 30.0 * step, "images_seen": 8 * step,
                "text": {"attribute": {"acc": acc, "ci": [acc - 0.05, acc + 0.05]}},
                "dino": {"attribute": {"acc": dino, "ci": [dino - 0.05, dino + 0.05]}}}

    recs = [rec(1, 0.5, 0.85), rec(2, 0.82, 0.7), rec(3, 0.79, 0.91), rec(4, 0.95, 0.99)]
    ttq = Y.time_to_quality(recs, [0.8, 0.9, 0.99])
    assert ttq["80%"]["step"] == 2 and ttq["80%"]["train_min"] == 1.0 and ttq["80%"]["images_seen"] == 16
    assert ttq["90%"]["step"] == 4 and ttq["99%"] is None
    # the DINO check on its own numbers: crossed at step 1, dropped below at 2, 90 % first at step 3
    dino = Y.time_to_quality(recs, [0.8, 0.9, 0.99], check="dino")
    assert dino["80%"]["step"] == 1 and dino["80%"]["acc"] == 0.85 and dino["80%"]["train_min"] == 0.5
    assert dino["90%"]["step"] == 3 and dino["99%"]["step"] == 4
    with pytest.raises(ValueError, match="'both'"):
        Y.time_to_quality(recs, [0.8], check="both")


def test_resume_continues_a_variant_to_what_one_longer_run_gives(tmp_path, capsys, bench_module, monkeypatch):
    from refgen.artifacts import read_jsonl
    from refgen.dit.train import latest_checkpoint, load_checkpoint

    out = tmp_path / "yard"
    one = Y.YardstickConfig.tiny(str(out))
    one.train.steps = 8
    Y.run_yardstick(one, {"single": {}})                       # the reference: 8 steps in one call
    bench = bench_module("dit_yardstick")
    assert bench.main(["--tiny", "--out", str(out), "--variants", "default"]) == 0   # 4 steps, then ...
    scores = out / "runs" / "default" / "scores.jsonl"
    first = read_jsonl(scores)
    # ... a call cut after its step-4 checkpoint was written but before that step was scored
    scores.write_text(scores.read_text().splitlines()[0] + "\n")
    scored = []
    call = Y.Scorer.__call__
    monkeypatch.setattr(Y.Scorer, "__call__", lambda self, model: scored.append(1) or call(self, model))
    assert bench.main(["--tiny", "--out", str(out), "--variants", "default", "--resume", "--steps", "8"]) == 0
    assert "DINO min to 80% |" in capsys.readouterr().out
    rep = json.loads((out / "yardstick.json").read_text())
    assert list(rep["variants"]) == ["single", "default"]
    a, b = rep["variants"]["single"], rep["variants"]["default"]
    # step 2 read back, not scored again (its own clock and scoring time kept); step 4 from the checkpoint, 6 and 8
    # by the continued run: three scorings
    assert b["scores"][0] == first[0] and len(scored) == 3
    assert [r["step"] for r in b["scores"]] == [2, 4, 6, 8] and b["steps"] == 8
    assert [r["train_s"] for r in b["scores"]] == sorted(r["train_s"] for r in b["scores"])
    assert b["calls"] == [{"from_step": 0, "steps": 4}, {"from_step": 4, "steps": 8}]
    # continued, not trained again from step 0 (which would give the same numbers)
    run_cfg = json.loads((out / "runs" / "default" / "config.json").read_text())
    assert run_cfg["resumed_from"].endswith("step_0000004.pt")
    # bit-exact on the CPU: the loss curve, every score, and the final weights and optimizer state
    assert b["loss_curve"] == a["loss_curve"] and len(a["loss_curve"]) == 4
    for x, y in zip(a["scores"], b["scores"]):
        assert (x["step"], x["text"], x["dino"]) == (y["step"], y["text"], y["dino"])
    assert b["time_to_quality_dino"] == Y.time_to_quality(b["scores"], [0.8, 0.9], check="dino")
    ca, cb = (load_checkpoint(latest_checkpoint(out / "runs" / n)) for n in ("single", "default"))
    for k in ("model", "ema"):
        assert all(torch.equal(ca[k][p], cb[k][p]) for p in ca[k]), k
    assert ca["optimizer"]["state"][0]["exp_avg_sq"].equal(cb["optimizer"]["state"][0]["exp_avg_sq"])
    # one checkpoint kept per run, the latest
    assert sorted(f.name for f in (out / "runs" / "default" / "checkpoints").iterdir()) == \
        ["latest.json", "step_0000008.pt"]

    # refused before anything is redone, naming what differs; the run is left as it was
    assert bench.main(["--tiny", "--out", str(out), "--resume", "--steps", "8", "--eval-every", "1"]) == 1
    assert "eval_every: 2 then, 1 now" in capsys.readouterr().err
    other = Y.YardstickConfig.tiny(str(out))
    other.train.steps, other.train.lr = 8, 2e-3
    with pytest.raises(ValueError, match=r"differ in train\.lr: 0\.001 then, 0\.002 now"):
        Y.run_yardstick(other, {"default": {}}, resume=True)
    short = Y.YardstickConfig.tiny(str(out))
    short.train.steps = 6
    with pytest.raises(ValueError, match="at step 8, past the 6 steps"):
        Y.resume_point(short, "default", {}, rep["device"])
    assert latest_checkpoint(out / "runs" / "default").name == "step_0000008.pt"


def test_extending_is_refused_when_the_lr_schedule_depends_on_the_total(monkeypatch):
    from refgen.dit import train as T

    train = Y._variant_train_dict(Y.YardstickConfig.tiny("/unused"), "default", {})
    train["steps"] = 8
    Y._check_schedule_ignores_steps(train, [{"from_step": 0, "steps": 4}], 4, "default")   # warm-up, constant
    monkeypatch.setattr(T, "lr_at", lambda step, cfg: cfg.lr * (1 - step / cfg.steps))   # a decay to the end
    with pytest.raises(ValueError, match="LR schedule depends on the total"):
        Y._check_schedule_ignores_steps(train, [{"from_step": 0, "steps": 4}], 4, "default")


def test_seed_ranges_are_disjoint_from_what_the_judge_and_the_vae_saw(monkeypatch):
    from refgen.toyworld import recognizer as R

    cfg = Y.YardstickConfig(n_train=1000, n_eval=100)
    ranges = Y.seed_ranges(cfg)
    assert {"recognizer training scenes", "recognizer held-out scenes", "toy model (VAE) training scenes"} <= set(ranges)
    monkeypatch.setattr(Y, "EVAL_SEED_BASE", R.EVAL_SEED_BASE + 50)   # held-out scenes the judge was scored on
    with pytest.raises(ValueError, match="held-out violation: yardstick held-out scenes"):
        Y.seed_ranges(cfg)


def test_held_out_captions_name_every_attribute_in_words_the_tiny_t5_knows():
    from refgen.dit.tiny_encoders import tiny_tokenizer
    from refgen.toyworld import world

    tok = tiny_tokenizer(Y.toy_vocabulary())
    for seed in range(Y.EVAL_SEED_BASE, Y.EVAL_SEED_BASE + 40):
        scene = world.scene_from_seed(seed)
        text = Y.held_out_caption(scene, seed)
        for p in scene.people:
            a = p.identity
            assert f"{a.skin} skin" in text and a.hair_color in text and f"a {a.face_shape} face" in text, text
            assert f"a {a.shirt_color} " in text and ("shirt" in text), text
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids, (text, tok.convert_ids_to_tokens(ids))
        assert len(ids) <= Y.YardstickConfig().t5_max_length     # never truncated
        # training captions use the same words
        train_text = Y.training_caption(scene, seed, 0.25, 0.5)
        assert tok.unk_token_id not in tok(train_text).input_ids, train_text
