"""The app's slot box shows the windows the page's people will fill: as wide as the inversion it runs (the toy
world's slot_repeat), or as the loaded head's window. No browser: the page's logic object on the toy model."""

from __future__ import annotations

from pathlib import Path

from refgen.app import AppConfig, IdentityApp, load
from refgen.toyworld.benchmark import default_head, default_vl_model, toy_invert_settings

TWO = "A photo of two people on a beach: on the left, ~ID~; on the right, ~ID~."


def test_slot_box_is_as_wide_as_the_people_the_page_makes(tmp_path):
    inverted = IdentityApp(load(AppConfig(threads=1)), AppConfig(), tmp_path)
    k = toy_invert_settings()["slot_repeat"]
    ph = len(inverted.ip.slots("~ID~", slot_repeat=1)[0]["token_ids"])  # the placeholder's own length
    assert inverted.slot_repeat() == k > 1
    assert f"L = {k * ph} tokens" in inverted.slots_text(TWO) and "**2 slots**" in inverted.slots_text(TWO)
    cfg = AppConfig(head=str(Path(default_head()).parent), vl_model=default_vl_model(), threads=1)
    headed = IdentityApp(load(cfg), cfg, tmp_path)
    assert headed.slot_repeat() == headed.ip.head.L // ph  # the shipped head: its own window
    assert f"L = {headed.ip.head.L} tokens" in headed.slots_text(TWO)
