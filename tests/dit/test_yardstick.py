"""The DiT yardstick (refgen.dit.yardstick, bench/dit_yardstick.py): its tiny CPU run goes through every stage, and
the parts its numbers depend on can fail here: the judge must read the held-out renders and their VAE round trip
(a wrong latent normalisation or VAE wiring drops those), seed ranges must be disjoint, every held-out caption word
must be a token of the tiny T5, and time-to-quality must pick the first crossing."""

from __future__ import annotations

import json

import pytest

from refgen.dit import yardstick as Y


def test_tiny_yardstick_runs_every_stage_and_its_ceilings_read_the_images(tmp_path, capsys, bench_module):
    out = tmp_path / "yard"
    assert bench_module("dit_yardstick").main(["--tiny", "--out", str(out), "--variants", "default,repa"]) == 0
    table = capsys.readouterr().out
    assert "| default |" in table and "| repa |" in table
    rep = json.loads((out / "yardstick.json").read_text())
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
    assert bench_module("dit_yardstick").main(["--tiny", "--out", str(out), "--variants", "repa"]) == 0
    again = json.loads((out / "yardstick.json").read_text())
    assert list(again["variants"]) == ["default", "repa"] and again["variants"]["default"] == v
    assert next((out / "shards" / "train" / "buckets").rglob("*.tar")).stat().st_mtime_ns == shard   # not redone


def test_time_to_quality_is_the_first_scoring_at_or_above_each_threshold():
    def rec(step, acc):
        return {"step": step, "train_s": 30.0 * step, "images_seen": 8 * step,
                "text": {"attribute": {"acc": acc, "ci": [acc - 0.05, acc + 0.05]}}}

    recs = [rec(1, 0.5), rec(2, 0.82), rec(3, 0.79), rec(4, 0.95)]
    ttq = Y.time_to_quality(recs, [0.8, 0.9, 0.99])
    assert ttq["80%"]["step"] == 2 and ttq["80%"]["train_min"] == 1.0 and ttq["80%"]["images_seen"] == 16
    assert ttq["90%"]["step"] == 4 and ttq["99%"] is None


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
