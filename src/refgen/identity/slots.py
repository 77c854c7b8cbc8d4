"""Slots: where each `~ID~` lands in the prompt embeddings.

Why not search the placeholder's ids in the tokenized prompt: byte-level BPE is context-sensitive.
Qwen2's pre-tokenizer turns "of ~ID~, studio" into ' ~', 'ID', '~,' and "(~ID~)" into '(~', 'ID', '~)':
the same placeholder gets other ids and even another length depending on its neighbours, and a
token can straddle the placeholder and the comma. So we never let the tokenizer see the placeholder
in context. The templated prompt is split at every `~ID~`, each text piece is tokenized on its own,
and the placeholder's one fixed id sequence (the tokenization of "~ID~" alone) is spliced in between.
Every occurrence then has the same ids and the same length L, whatever stands around it, and its
window is known exactly. A prompt without a placeholder tokenizes exactly as the pipeline does.

`repeat` fills each slot with that sequence repeated: L = repeat x its length. Learnt token people then have
`repeat` times the room (a 3-token placeholder holds less than the words that describe a person:
docs/benchmarks.md, "Wider slots"). A person file records its placeholder ids, so the repeat a person was made
with is read back from it (`repeat_of_length`), and every person in one prompt must share it.
"""

from __future__ import annotations

from dataclasses import dataclass

PLACEHOLDER = "~ID~"
# The repeat people are made with unless told otherwise (InvertConfig / E2EConfig.slot_repeat, `refgen slots`):
# the wider window measured better for one person and for pairs (docs/benchmarks.md, docs/head.md); 1 is the
# seed's one placeholder.
SLOT_REPEAT = 3


class SlotError(ValueError):
    """A prompt/tokenizer/identity-count problem that makes slot injection ill-defined."""


@dataclass(frozen=True)
class Slot:
    start: int  # index in the prompt embeddings E (template prefix already dropped)
    length: int  # L, the same for every slot of a tokenizer


@dataclass
class TokenizedPrompt:
    prompt: str
    input_ids: list[int]  # the whole templated prompt, as fed to the text encoder
    slots: list[Slot]  # left to right, in E coordinates


def check_repeat(repeat) -> int:
    """`repeat` if it is a slot repeat (an integer >= 1: InvertConfig / E2EConfig.slot_repeat), else SlotError."""
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise SlotError(f"slot_repeat must be an integer >= 1 (each ~ID~'s slot repeat), got {repeat!r}")
    return repeat


def placeholder_ids(tokenizer, repeat: int = 1) -> list[int]:
    """The placeholder's one fixed token sequence (`repeat` times over); refuses tokenizers that cannot give one."""
    check_repeat(repeat)
    ids = tokenizer(PLACEHOLDER, add_special_tokens=False).input_ids
    if not ids:
        raise SlotError(f"tokenizer {tokenizer.name_or_path!r} maps {PLACEHOLDER!r} to no tokens")
    unk = tokenizer.unk_token_id
    if unk is not None and unk in ids:
        raise SlotError(f"tokenizer {tokenizer.name_or_path!r} maps {PLACEHOLDER!r} to the unknown token: "
                        f"{tokenizer.convert_ids_to_tokens(ids)}")
    decoded = tokenizer.decode(ids)
    if decoded != PLACEHOLDER:
        raise SlotError(f"tokenizer {tokenizer.name_or_path!r} cannot give {PLACEHOLDER!r} one fixed token "
                        f"sequence: its tokens {tokenizer.convert_ids_to_tokens(ids)} decode to {decoded!r}")
    return list(ids) * repeat


def repeat_of_length(tokenizer, length: int, what: str = "a person") -> int:
    """The slot repeat of a window of `length` tokens (a residual's or a token set's L): length / the
    placeholder's own length; refuses a length that is not a multiple of it."""
    base = len(placeholder_ids(tokenizer))
    r, rest = divmod(int(length), base)
    if rest or r < 1:
        raise SlotError(f"{what} has L = {length} tokens; a slot is a multiple of {PLACEHOLDER!r}'s {base} tokens "
                        "here (made with another tokenizer?)")
    return r


def common_repeat(tokenizer, lengths: list[int], what: str = "the people") -> int:
    """The one slot repeat of windows of these lengths (1 for none); refuses people made with different repeats in
    one prompt (their slots would differ in length, and the text between them would be read differently)."""
    reps = [repeat_of_length(tokenizer, n, what) for n in lengths]
    if len(set(reps)) > 1:
        raise SlotError(f"{what} were made with different slot repeats {reps} (L = {list(lengths)}): one prompt "
                        "takes people of one repeat")
    return reps[0] if reps else 1


def tokenize_with_slots(tokenizer, prompt: str, template: str, drop_idx: int, max_length: int,
                        n_identities: int | None = None, repeat: int = 1) -> TokenizedPrompt:
    """Tokenize `template.format(prompt)` with every `~ID~` as the fixed placeholder ids (`repeat` times over).

    `drop_idx` is the number of template-prefix tokens the pipeline drops from the embeddings;
    `max_length` the tokenizer truncation length (prefix included), as in QwenImagePipeline.
    `n_identities`, when given, must equal the number of placeholders.
    """
    if not isinstance(prompt, str):
        raise SlotError(f"prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
    n_slots = prompt.count(PLACEHOLDER)
    if n_identities is not None:
        if n_slots == 0:
            raise SlotError(f"prompt has no placeholder {PLACEHOLDER!r}: {prompt!r}")
        if n_slots != n_identities:
            raise SlotError(f"prompt has {n_slots} placeholder(s) {PLACEHOLDER!r} but {n_identities} "
                            f"identit{'y was' if n_identities == 1 else 'ies were'} given: {prompt!r}")
    text = template.format(prompt)
    pieces = text.split(PLACEHOLDER)
    ph = placeholder_ids(tokenizer, repeat) if n_slots else []
    ids: list[int] = []
    starts: list[int] = []
    for i, piece in enumerate(pieces):
        if piece:
            ids += tokenizer(piece, add_special_tokens=False).input_ids
        if i < len(pieces) - 1:
            starts.append(len(ids))
            ids += ph
    prefix_len = len(tokenizer(template.split("{}")[0], add_special_tokens=False).input_ids)
    if prefix_len != drop_idx:
        raise SlotError(f"tokenizer {tokenizer.name_or_path!r} does not match the pipeline's chat template: its "
                        f"prefix is {prefix_len} tokens but the pipeline drops {drop_idx}")
    for k, s in enumerate(starts):
        if s + len(ph) > max_length:
            raise SlotError(f"placeholder #{k + 1} of {n_slots} is cut off by truncation at {max_length} tokens "
                            f"(it ends at token {s + len(ph)}); shorten the prompt: {prompt!r}")
    ids = ids[:max_length]
    return TokenizedPrompt(prompt, ids, [Slot(s - drop_idx, len(ph)) for s in starts])


def describe_slots(tokenizer, tp: TokenizedPrompt, drop_idx: int) -> list[dict]:
    """What an injection touches, for `refgen slots`: start, L, ids and decoded tokens per window."""
    out = []
    for k, sl in enumerate(tp.slots):
        ids = tp.input_ids[sl.start + drop_idx: sl.start + drop_idx + sl.length]
        out.append({"slot": k, "start": sl.start, "length": sl.length, "token_ids": ids,
                    "tokens": tokenizer.convert_ids_to_tokens(ids)})
    return out
