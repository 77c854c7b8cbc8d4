import json

import pytest

from refgen.cli import main
from refgen.identity.prompts import template_of, tokenize
from refgen.identity.invert import InvertConfig
from refgen.identity.slots import PLACEHOLDER, SLOT_REPEAT, SlotError, placeholder_ids, tokenize_with_slots


@pytest.fixture(scope="module")
def tok_pipe(tiny_models):
    from refgen.identity.render import load_tokenizer_only

    return load_tokenizer_only(tiny_models["qwen_image"])


def test_bpe_really_merges_across_the_placeholder(tok_pipe):
    # The reason the slot finder exists: in context the placeholder tokenizes differently.
    tok = tok_pipe.tokenizer
    alone = tok.convert_ids_to_tokens(placeholder_ids(tok))
    in_context = tok.convert_ids_to_tokens(tok("of ~ID~, studio", add_special_tokens=False).input_ids)
    assert "~," in in_context and in_context[1:4] != alone


@pytest.mark.parametrize("prompt,n", [
    ("~ID~ at the start", 1), ("a photo of ~ID~", 1), ("a photo of ~ID~, studio lighting", 1),
    ("this is ~ID~.", 1), ("(~ID~) and [~ID~]", 2), ("~ID~~ID~ twins", 2), ("~ID~ and ~ID~ on a beach", 2),
    ("~ID~,~ID~.~ID~", 3), ("\"~ID~\" riding a bike at sunset!", 1)])
def test_every_occurrence_gets_the_same_ids(tok_pipe, prompt, n):
    tok = tok_pipe.tokenizer
    ph = placeholder_ids(tok)
    tp = tokenize(tok_pipe, prompt, n_identities=n)
    _, drop, _ = template_of(tok_pipe)
    assert len(tp.slots) == n
    starts = [s.start for s in tp.slots]
    assert starts == sorted(starts) and len(set(starts)) == n  # left to right, distinct
    for s in tp.slots:
        assert s.length == len(ph)
        assert tp.input_ids[drop + s.start: drop + s.start + s.length] == ph
    # The text around the slots is preserved exactly.
    assert tok.decode(tp.input_ids[drop:]).startswith(prompt)


def test_prompt_without_placeholder_tokenizes_like_the_pipeline(tok_pipe):
    template, drop, max_len = template_of(tok_pipe)
    p = "a dog, on a beach (sunset)."
    tp = tokenize(tok_pipe, p)
    assert tp.slots == []
    assert tp.input_ids == tok_pipe.tokenizer(template.format(p)).input_ids


def test_errors(tok_pipe):
    with pytest.raises(SlotError, match="no placeholder"):
        tokenize(tok_pipe, "a dog on a beach", n_identities=1)
    with pytest.raises(SlotError, match="2 placeholder.*3 identities"):
        tokenize(tok_pipe, "~ID~ and ~ID~", n_identities=3)
    template, drop, _ = template_of(tok_pipe)
    long_prompt = "word " * 40 + "~ID~"
    with pytest.raises(SlotError, match="cut off by truncation"):
        tokenize_with_slots(tok_pipe.tokenizer, long_prompt, template, drop, drop + 20, 1)
    with pytest.raises(SlotError, match="drops 30"):
        tokenize_with_slots(tok_pipe.tokenizer, "~ID~", template, 30, 1000, 1)


def test_tokenizer_without_a_fixed_placeholder_sequence_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wl = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "photo": 2}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]")
    with pytest.raises(SlotError, match="unknown token|fixed token"):
        placeholder_ids(tok)


def test_slots_cli(tiny_models, capsys):
    assert main(["slots", "--model", tiny_models["qwen_image"], "--prompt", "~ID~ and ~ID~, hi", "--json",
                 "--slot-repeat", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["slots"]) == 2 and out["slots"][0]["start"] == 0
    assert "".join(out["slots"][1]["tokens"]).replace("Ġ", " ") == PLACEHOLDER
    # by default the windows are as wide as the people refgen makes by default (InvertConfig / E2EConfig)
    assert main(["slots", "--model", tiny_models["qwen_image"], "--prompt", "~ID~ and ~ID~, hi", "--json"]) == 0
    default = json.loads(capsys.readouterr().out)["slots"]
    assert default[0]["length"] == SLOT_REPEAT * out["slots"][0]["length"] and SLOT_REPEAT == InvertConfig().slot_repeat
    assert main(["slots", "--model", tiny_models["qwen_image"], "--prompt", "no slot", "--identities", "1"]) == 1
    assert "no placeholder" in capsys.readouterr().err
    # the windows of people made with --slot-repeat 2: twice as long, the second slot pushed right by the first
    assert main(["slots", "--model", tiny_models["qwen_image"], "--prompt", "~ID~ and ~ID~, hi", "--json",
                 "--slot-repeat", "2"]) == 0
    wide = json.loads(capsys.readouterr().out)["slots"]
    L = out["slots"][0]["length"]
    assert [w["length"] for w in wide] == [2 * L, 2 * L] and wide[1]["start"] == out["slots"][1]["start"] + L
    assert wide[0]["token_ids"] == out["slots"][0]["token_ids"] * 2


def test_slot_repeat_fills_each_slot_with_the_placeholder_repeated(tok_pipe):
    from refgen.identity.slots import common_repeat, repeat_of_length

    tok = tok_pipe.tokenizer
    ph = placeholder_ids(tok)
    _, drop, _ = template_of(tok_pipe)
    tp = tokenize(tok_pipe, "~ID~ and ~ID~ on a beach", n_identities=2, repeat=3)
    one = tokenize(tok_pipe, "~ID~ and ~ID~ on a beach", n_identities=2)
    for s in tp.slots:
        assert s.length == 3 * len(ph) and tp.input_ids[drop + s.start: drop + s.start + s.length] == ph * 3
    # the words between and after the slots are the same words
    assert tp.slots[1].start - tp.slots[0].start == one.slots[1].start - one.slots[0].start + 2 * len(ph)
    assert tp.input_ids[drop + tp.slots[1].start + 3 * len(ph):] == one.input_ids[drop + one.slots[1].start + len(ph):]
    assert repeat_of_length(tok, 3 * len(ph)) == 3 and common_repeat(tok, []) == 1
    with pytest.raises(SlotError, match="multiple of"):
        repeat_of_length(tok, 3 * len(ph) + 1, "a residual")
    with pytest.raises(SlotError, match="different slot repeats"):
        common_repeat(tok, [len(ph), 2 * len(ph)])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(SlotError, match="slot repeat"):
            placeholder_ids(tok, bad)
    from refgen.identity.invert import InvertConfig
    from refgen.identity.train_e2e import E2EConfig

    for make in (InvertConfig, E2EConfig):  # the configs refuse it before any model loads
        for bad in (0, 2.0, True):
            with pytest.raises(ValueError, match="slot_repeat must be an integer >= 1"):
                make(slot_repeat=bad)


def test_a_start_head_must_be_as_wide_as_the_inversions_slots():
    from refgen.identity.head import check_start_head
    from pathlib import Path

    from refgen.toyworld.benchmark import default_head

    head = Path(default_head()).parent
    check_start_head(head, "tokens", 3)  # the toy head: 9 tokens, the placeholder three times over
    with pytest.raises(ValueError, match="slot_repeat is 1"):
        check_start_head(head, "tokens", 1)
    with pytest.raises(ValueError, match="outputs tokens"):
        check_start_head(head, "free")
