"""The identity benchmark and the demo on the embedded toy model, at smoke-test sizes (CPU)."""

import json
from pathlib import Path

import pytest

from refgen.toyworld import benchmark as B
from refgen.toyworld import world

A = {"skin": "pale", "hair_color": "red", "hair_style": "long", "face_shape": "round", "glasses": "none",
     "shirt_color": "blue", "shirt_pattern": "plain"}
C = {**A, "skin": "dark", "glasses": "sunglasses"}


def test_score_counts_people_in_left_to_right_order():
    rows = [{"people": [A], "scene": "beach"}, {"people": [A, C], "scene": "city"}, {"people": [A, C], "scene": "city"}]
    preds = [{"scene": "beach", "people": [dict(A)]},
             {"scene": "forest", "people": [dict(C), dict(A)]},  # both there, swapped: no identity right
             {"scene": "city", "people": [dict(A), dict(C)]}]
    m = B.score(preds, rows)
    assert m["identity_acc"] == pytest.approx(3 / 5)  # A; (swapped: 0 of 2); A and C
    assert m["all_people_acc"] == pytest.approx(2 / 3)
    assert m["scene_acc"] == pytest.approx(2 / 3)
    assert m["per_attribute"]["skin"] == pytest.approx(3 / 5)
    assert m["per_attribute"]["hair_color"] == 1.0  # red for everyone: order does not matter for it
    missing = B.score([{"scene": "beach", "people": []}], rows[:1])
    assert missing["identity_acc"] == 0 and missing["people_count_acc"] == 0
    # the swapped row: its 4 wrong attributes (skin, glasses, each person) are all the other person's values
    assert m["leak_n"] == 4 and m["leak"] == 1.0
    assert m["leak_chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)  # skin has 4 values, glasses 3
    blur = B.score([{"scene": "city", "people": [{**A, "skin": "tan"}, dict(C)]}], rows[1:2])
    assert blur["leak_n"] == 1 and blur["leak"] == 0.0  # wrong, but not the other person's skin
    assert "leak" not in B.score(preds[:1], rows[:1])  # one-person rows have no other person


def test_best_alpha_skips_alphas_that_lose_the_scene():
    pa = {"0": {"identity_acc": 0.0, "attribute_acc": 0.3, "scene_acc": 1.0},
          "1": {"identity_acc": 0.5, "attribute_acc": 0.8, "scene_acc": 0.95},
          "2": {"identity_acc": 0.9, "attribute_acc": 0.9, "scene_acc": 0.4}}
    assert B._best_alpha(pa) == "1"
    assert B._best_alpha({"0": pa["0"], "2": pa["2"]}) is None


def test_yaml_mirrors_the_dataclass_defaults():
    import dataclasses

    y = B.BenchmarkConfig.from_yaml(Path(__file__).resolve().parents[2] / "configs" / "toyworld_benchmark.yaml")
    d = B.BenchmarkConfig()
    assert dataclasses.asdict(y) | {"invert": None} == dataclasses.asdict(d) | {"invert": None}
    assert y.invert_config() == d.invert_config()  # the YAML spells out what the code defaults to


def test_config_validation():
    with pytest.raises(ValueError, match="overlap"):
        B.BenchmarkConfig(n_train=10, n_test=5, train_seed=0, test_seed=5)
    with pytest.raises(ValueError, match="scenes"):
        B.BenchmarkConfig(scenes=["moon"])
    with pytest.raises(ValueError, match="steps"):
        B.BenchmarkConfig(invert={"steps": 0})
    for bad in (-1, 1):
        with pytest.raises(ValueError, match="photos"):
            B.BenchmarkConfig(photos=bad)


RESIDUAL = {"steps": 3, "images_per_step": 1, "parametrisation": "rms_scaled"}  # a teacher the head can regress


def test_benchmark_runs_every_stage_and_is_idempotent(tmp_path):
    cfg = B.BenchmarkConfig.tiny(invert=RESIDUAL)
    r = B.run_benchmark(cfg, tmp_path, progress=False)
    per = r["teacher"]["per_alpha"]
    assert set(per) == {"0", "1"}
    n = cfg.n_test * len(cfg.scenes) * len(cfg.seeds)
    assert all(m["n_images"] == n for m in per.values())
    assert r["two_slot"]["teacher"]["n_images"] == cfg.n_pairs * len(cfg.scenes) * len(cfg.seeds)
    assert r["head"]["n_train_identities"] == cfg.n_train  # the head saw training identities only
    head_ids = json.loads((tmp_path / "head" / "head.json").read_text())["train_ids"]
    assert all(cfg.train_seed <= int(i.split("_")[1]) < cfg.train_seed + cfg.n_train for i in head_ids)
    assert len(head_ids) == cfg.n_train
    assert r["inversion"]["all"]["identities"] == cfg.n_test + cfg.n_train
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["teacher"]["per_alpha"] == json.loads(json.dumps(per))
    md = (tmp_path / "benchmark.md").read_text()
    assert "alpha 0 (floor" in md and "Two-slot" in md and "Caption ceiling" in md and "95 % CI" in md
    c = r["ceiling"]  # same identities, scenes and seeds as the method rows
    assert c["single"]["n_people"] == n and c["pair"]["n_images"] == r["two_slot"]["teacher"]["n_images"]
    assert r["held_out_ranges"]["test identities"] == [cfg.test_seed, cfg.test_seed + cfg.n_test]
    assert r["two_slot"]["floor"]["alpha"] == 0
    assert (tmp_path / "grids" / "teacher_alpha.png").exists() and (tmp_path / "grids" / "two_slot.png").exists()
    again = B.run_benchmark(cfg, tmp_path, progress=False)
    assert again["inversion"] == {}  # every teacher was complete: nothing re-inverted
    assert again["teacher"]["per_alpha"] == per  # renders are seeded: same pictures, same scores
    other = B.BenchmarkConfig.tiny(invert={**RESIDUAL, "steps": 4})
    with pytest.raises(ValueError, match="other settings"):  # stale teachers are never reported as this config's
        B.run_benchmark(other, tmp_path, progress=False)


def test_person_clustered_interval_is_wider_when_a_person_is_all_right_or_all_wrong():
    # 20 people x 10 images at 50 %: the same hits, spread within each person or all-or-nothing per person
    mixed = [(5, 10)] * 20
    lumped = [(10, 10)] * 10 + [(0, 10)] * 10
    w = B.wilson(100, 200)
    assert B.clustered_interval(mixed) == pytest.approx(w)                # design effect < 1: never below Wilson
    deff = (20 / 19 * 20 * 25 / 200 ** 2) / (0.25 / 200)                   # 10.5: 19 trials, the people count
    assert B.clustered_interval(lumped) == pytest.approx(B.wilson(0.5 * 200 / deff, 200 / deff))
    assert 200 / deff == pytest.approx(19)
    assert B.clustered_interval(lumped)[0] < w[0] - 0.1
    assert B.clustered_interval([(10, 10)] * 3) == pytest.approx(B.wilson(2, 2))      # p = 1: C - 1 trials
    assert B.clustered_interval([(3, 4)]) == [0.0, 1.0]
    # score() clusters by the person's attributes
    a, b = {k: v[0] for k, v in world.ATTRIBUTES.items()}, {k: v[1] for k, v in world.ATTRIBUTES.items()}
    rows = [{"people": [a], "scene": "beach"}] * 4 + [{"people": [b], "scene": "beach"}] * 4
    preds = [{"people": [a], "scene": "beach"}] * 8                       # b is never drawn right
    s = B.score(preds, rows)
    assert s["identity_acc"] == 0.5 and s["n_distinct_people"] == 2
    assert s["identity_by_person"] == [["|".join(a.values()), 4, 4], ["|".join(b.values()), 0, 4]]
    assert s["identity_ci_people"] == pytest.approx(B.wilson(0.5, 1))    # two people, all-or-nothing: one trial
    assert s["identity_ci_people"][1] - s["identity_ci_people"][0] > s["identity_ci"][1] - s["identity_ci"][0]


def test_wilson_interval_matches_the_textbook_values():
    # Wilson (1927) score interval, z = 1.96: 5/10 -> [0.2366, 0.7634], 0/10 -> [0, 0.2775], 10/10 -> [0.7225, 1]
    assert B.wilson(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert B.wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert B.wilson(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    lo, hi = B.wilson(460, 480)
    assert lo < 460 / 480 < hi and hi - lo < 0.04  # 480 images: intervals narrow enough to compare methods


def test_held_out_ranges_refuse_a_test_set_the_judge_or_the_model_has_seen():
    from refgen.toyworld import recognizer as R
    from refgen.toyworld import model_recipe as T

    ok = B.held_out_ranges(B.BenchmarkConfig(), B.default_model())
    assert set(ok) >= {"test identities", "train identities", "recognizer training scenes",
                       "toy model training scenes", "toy model validation identities"}
    with pytest.raises(ValueError, match="recognizer training scenes"):
        B.held_out_ranges(B.BenchmarkConfig(test_seed=R.TRAIN_SEED_BASE + 5), B.default_model())
    with pytest.raises(ValueError, match="toy model training scenes"):
        B.held_out_ranges(B.BenchmarkConfig(n_train=0, test_seed=T.DATA_SEED_BASE), B.default_model())
    with pytest.raises(ValueError, match="toy model validation identities"):
        B.held_out_ranges(B.BenchmarkConfig(test_seed=T.VAL_ID_BASE + 10), B.default_model())


def test_shipped_model_draws_people_spelled_out_in_words():
    """The yardstick's premise: the shipped toy model draws a person whose 7 attributes are written out, alone
    and beside a second person, in order. Validation identities (never the benchmark's test ones)."""
    from refgen.identity.prompts import encode_prompts
    from refgen.identity.render import load_pipeline
    from refgen.toyworld import recognizer as R
    from refgen.toyworld import model_recipe as T

    pipe = load_pipeline(B.default_model(), "cpu", "fp32")
    attrs = [world.identity_from_seed(T.VAL_ID_BASE + i).to_dict() for i in range(4)]
    rc = B.render_config(B.BenchmarkConfig(device="cpu", dtype="fp32"))
    ne = encode_prompts(pipe, " ")
    c = B.caption_ceiling(pipe, R.load(), attrs, [(0, 1), (2, 3)], ["beach", "city"], [0], rc, (ne.embeds, ne.mask),
                          "cpu")
    assert c["single"]["n_images"] == 8 and c["pair"]["n_images"] == 4
    assert c["single"]["identity_acc"] >= 6 / 8, c["single"]
    assert c["pair"]["all_people_acc"] >= 3 / 4, c["pair"]
    assert c["single"]["scene_acc"] == 1.0


def test_benchmark_reads_a_token_teacher_through_the_text_encoder(tmp_path):
    cfg = B.BenchmarkConfig.tiny(invert={"steps": 3, "images_per_step": 1, "parametrisation": "tokens",
                                         "image_prompts": True, "id_weight": 0.5},  # the ID loss with the toy VL
                                 pair_images=1, photos=2)  # photos beside someone too; exactly 2 alone
    r = B.run_benchmark(cfg, tmp_path, progress=False)
    d = tmp_path / "teacher" / f"seed_{cfg.test_seed}"
    assert (d / "teacher_tokens.safetensors").exists() and not (d / "teacher_residual.safetensors").exists()
    assert json.loads((d / "teacher.json").read_text())["config"]["id_weight"] == 0.5
    assert all(json.loads(x)["id"] > 0 for x in (d / "teacher_metrics.jsonl").read_text().splitlines()
               if '"id"' in x)
    images = json.loads((d / "teacher.json").read_text())["images"]
    assert any("pair_0.png" in f for f in images)
    assert sorted(Path(f).name for f in images if "img_" in Path(f).name) == ["img_0.png", "img_1.png"]
    assert set(r["teacher"]["per_alpha"]) == {"0", "1"}
    assert "skipped" in r["head"]  # the head predicts slot residuals: no head row from a token teacher
    assert r["two_slot"]["teacher"]["n_images"] == cfg.n_pairs * len(cfg.scenes) * len(cfg.seeds)
    # alpha 0 is the untouched prompt whatever the mode: the floor equals a slot-residual run's floor
    res = B.run_benchmark(B.BenchmarkConfig.tiny(n_train=0, invert=RESIDUAL), tmp_path / "res", progress=False)
    assert r["teacher"]["per_alpha"]["0"] == res["teacher"]["per_alpha"]["0"]


def test_short_inversions_start_from_a_head(tmp_path):
    """start_head: the short inversions run again from the head's prediction of each test person, and the
    prediction alone is scored as 0 steps; a head with slot roles also renders every token source of the pair
    rows with its offsets; a head of the other output kind is refused before any work."""
    from refgen.identity.train_e2e import E2EConfig, train_e2e
    from refgen.toyworld.identities import make_identities

    make_identities(tmp_path / "people", n=3, seed=100_000, progress=False)  # training-range people, not the test ones
    head = tmp_path / "head"
    train_e2e(tmp_path / "people", head, B.default_model(), B.default_vl_model(),
              E2EConfig(head="linear", steps=2, batch_size=2, warmup_steps=0, eval_identities=0,
                        two_person_fraction=1.0, two_person_images=2, slot_roles=True,
                        slot_repeat=B.toy_invert_settings()["slot_repeat"]),  # as wide as the toy inversions
              device="cpu", dtype="fp32", progress=False)
    tok = {"steps": 3, "images_per_step": 1, "parametrisation": "tokens", "image_prompts": True}
    cfg = B.BenchmarkConfig.tiny(n_train=0, invert=tok, short_steps=[2], start_head=str(head), pair_alphas=[0.5],
                                 start_head_alphas=[0.5, 1.0])
    r = B.run_benchmark(cfg, tmp_path / "bench", progress=False)
    rows = r["head_start"]["per_steps"]  # each start-head row at each of start_head_alphas
    assert set(rows) == {"0", "2"} and all(set(pa) == {"0.5", "1"} for pa in rows.values())
    assert all(m["n_images"] == 4 for pa in rows.values() for m in pa.values())
    assert r["inversion"]["test_s2_from_head"]["identities"] == cfg.n_test
    rec = json.loads((tmp_path / "bench" / "teacher_s2_head" / f"seed_{cfg.test_seed}" / "teacher.json").read_text())
    assert rec["started_from"] and rec["steps_run"] == 2
    assert "steps from the head's start" in (tmp_path / "bench" / "benchmark.md").read_text()
    two = r["two_slot"]  # the teacher at an extra alpha, and the head's own prediction, in two-person prompts
    assert two["teacher_a0.5"]["alpha"] == 0.5 and two["start_head"]["n_images"] == two["teacher"]["n_images"]
    assert two["head_s2"]["n_images"] == two["teacher"]["n_images"]  # the refined head starts, in pairs too
    # the head learnt slot roles (two pair steps): each source but the floor again with them, as IdentityPipeline
    # would render it with this head loaded
    assert {k for k in two if k.endswith("+roles")} == {"teacher+roles", "teacher_a0.5+roles", "start_head+roles",
                                                        "head_s2+roles"}
    assert two["start_head+roles"]["alpha"] == 1.0 and two["teacher_a0.5+roles"]["alpha"] == 0.5
    with pytest.raises(ValueError, match="outputs tokens, but the inversion's parametrisation is 'free'"):
        B.BenchmarkConfig.tiny(invert={**tok, "parametrisation": "free"}, start_head=str(head))
    shipped = str(Path(B.default_head()).parent)  # the toy head is as wide as the toy inversions, not the seed's one
    with pytest.raises(ValueError, match="slot_repeat"):
        B.BenchmarkConfig.tiny(invert={**tok, "slot_repeat": 1}, start_head=shipped)
    B.BenchmarkConfig.tiny(invert=tok, start_head=shipped)
    with pytest.raises(ValueError, match="start_head_alphas needs a start_head"):
        B.BenchmarkConfig.tiny(invert=tok, start_head_alphas=[1.0])
