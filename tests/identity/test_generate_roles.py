"""`refgen generate --head H` with people from files only: the head is loaded (it was silently left out), so a head
trained with slot roles offsets both people of a two-person prompt, as `IdentityPipeline` does with it loaded: the
route of a teacher started from the head's guess (docs/benchmarks.md). On the toy model and the shipped toy head."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from refgen.cli import main
from refgen.identity.generate import GenerateConfig
from refgen.pipeline import IdentityPipeline
from refgen.toyworld.benchmark import default_head, default_model, default_vl_model
from refgen.toyworld.identities import make_identities

PROMPT = "A photo of two people on a beach: on the left, ~ID~; on the right, ~ID~."


def test_generate_applies_the_heads_slot_roles_to_people_from_files(tmp_path, capsys):
    folders = make_identities(tmp_path / "people", n=2, seed=100_000, size=64, progress=False)  # training-range ids
    ip = IdentityPipeline.from_pretrained(default_model(), default_vl_model(), default_head(), device="cpu",
                                          dtype="fp32")
    assert ip.head.slot_roles is not None  # the shipped head learnt them
    files = [str(tmp_path / f"person{k}.safetensors") for k in range(2)]
    for folder, path in zip(folders, files):
        ip.residual_from_refs(folder).save(path)  # a head's person records the head's width
    width = json.loads(Path(default_head()).with_name("head.json").read_text())["config"]["slot_repeat"]
    assert ip.load_residual(files[0]).metadata["slot_repeat"] == str(width) == "3"
    cmd = ["generate", "--model", default_model(), "--prompt", PROMPT, "--residual", files[0], "--residual", files[1],
           "--seeds", "0", "--steps", "2", "--height", "64", "--width", "64", "--device", "cpu", "--dtype", "fp32"]
    head = ["--vl-model", default_vl_model(), "--head", default_head()]
    assert main(cmd + head + ["--out", str(tmp_path / "with")]) == 0
    assert main(cmd + ["--out", str(tmp_path / "without")]) == 0
    got, plain = (np.asarray(Image.open(tmp_path / d / "seed0.png")) for d in ("with", "without"))
    rc = GenerateConfig(prompt=PROMPT, people=[], seeds=[0], steps=2, height=64, width=64).render_config()
    people = [ip.load_residual(f) for f in files]
    want = ip(PROMPT, people, seeds=rc.seeds, steps=rc.steps, true_cfg=rc.true_cfg,
              height=rc.height, width=rc.width, negative_prompt=rc.negative_prompt, batch_size=rc.batch_size,
              cfg_batch=rc.cfg_batch, progress=False)[0]
    assert np.array_equal(got, np.asarray(want))  # what IdentityPipeline renders with the head loaded
    assert not np.array_equal(got, plain)          # and not what the same files give without it
    rec = json.loads((tmp_path / "with" / "generate.json").read_text())
    assert rec["head_metadata"] and [s["length"] for s in rec["slots"]] == [ip.head.L, ip.head.L]
    plain_rec = json.loads((tmp_path / "without" / "generate.json").read_text())["slots"]  # the same windows
    assert plain_rec == rec["slots"] == [{k: s[k] for k in ("start", "length")} for s in ip.slots_for(PROMPT, people)]
    assert main(cmd + ["--head", default_head(), "--out", str(tmp_path / "x")]) == 1
    assert "--head needs --vl-model" in capsys.readouterr().err
