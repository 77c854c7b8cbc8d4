"""bench/toyworld_invert_sweep.py with every slot K copies of the placeholder's ids (3K tokens; prompts still say
`~ID~`), patched where `placeholder_ids` is imported, as probe.py does. The record of the first GPU check of wide
slots, made before refgen had a setting for it. python docs/results/token_capacity_cpu/wide_sweep.py K SWEEP_ARGS..."""
import sys

from refgen.identity import inject, slots, tokens

K = int(sys.argv[1])
_orig = slots.placeholder_ids


def wide(tokenizer, repeat=1):  # refgen has InvertConfig.slot_repeat since: this patch predates it
    return _orig(tokenizer, repeat) * K


for mod in (slots, tokens, inject):
    mod.placeholder_ids = wide
sys.path.insert(0, "bench")
import toyworld_invert_sweep  # noqa: E402

sys.exit(toyworld_invert_sweep.main(sys.argv[2:]))
