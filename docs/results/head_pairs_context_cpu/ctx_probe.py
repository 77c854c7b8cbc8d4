"""CPU probe: how much of 'on the left' / 'on the right' reaches a person's part of the text encoder's output, for the
head's tokens and for the person spelled out in words. The s2 head (bf16 copy), 8 validation people (400000+, never
test people) in 4 pairs; the relative change ||E(swapped) - E|| / ||E|| of the encoder output over the person's
window (3 tokens) or over the description's tokens when "left" and "right" trade places in the prompt.
python docs/results/head_pairs_context_cpu/ctx_probe.py OUT.json   (from the repo root; ~1 min on 2 CPU threads)
The s2 head (docs/results/head_e2e_idloss/s2_head_bf16) left the tree: `git checkout 80e51ce -- docs/results/head_e2e_idloss/s2_head_bf16` first.
"""
import sys, json
from pathlib import Path
import torch
sys.path.insert(0, "bench")
import toyworld_head_e2e as H
from refgen.identity.prompts import encode_prompts, tokenize
from refgen.identity.tokens import at_alpha, placeholder_embeds
from refgen.toyworld import world
from refgen.toyworld.benchmark import attributes_of, default_model, default_vl_model
from refgen.toyworld.identities import make_identities
torch.set_num_threads(2)
root = Path("/tmp/probe_ctx/val")
if not root.exists():
    make_identities(root, n=8, seed=H.VAL_SEED, progress=False)
pipe, head, fx, net, neg = H.scoring_setup(default_model(), default_vl_model(),
                                           Path("docs/results/head_e2e_idloss/s2_head_bf16"), "cpu", "fp32")
dirs = H._dirs(root)
kind, toks = H.residuals(head, fx, dirs)
ph = placeholder_embeds(pipe)
P = "A photo of two people at the beach: on the {a}, ~ID~; on the {b}, ~ID~."
def rel(x, y):
    return float((x - y).norm() / y.norm())
rows = []
for i in range(0, 8, 2):
    A, B = toks[i], toks[i + 1]
    t = [at_alpha(A, ph, 1.0)[None], at_alpha(B, ph, 1.0)[None]]
    e1 = encode_prompts(pipe, P.format(a="left", b="right"), tokens=t)
    e2 = encode_prompts(pipe, P.format(a="right", b="left"), tokens=t)
    s = tokenize(pipe, P.format(a="left", b="right"), 2).slots
    n = int(e1.mask.sum())
    ta = rel(e2.embeds[0, s[0].start:s[0].start + 3], e1.embeds[0, s[0].start:s[0].start + 3])
    tb = rel(e2.embeds[0, s[1].start:s[1].start + 3], e1.embeds[0, s[1].start:s[1].start + 3])
    # bare placeholder (no person): how much the window itself carries left/right
    b1 = encode_prompts(pipe, P.format(a="left", b="right")); b2 = encode_prompts(pipe, P.format(a="right", b="left"))
    pa = rel(b2.embeds[0, s[0].start:s[0].start + 3], b1.embeds[0, s[0].start:s[0].start + 3])
    # words: the full description in place of the first slot, its tokens
    wa = world.full_description(world.IdentityAttributes.from_dict(attributes_of(dirs[i])))
    wb = world.full_description(world.IdentityAttributes.from_dict(attributes_of(dirs[i + 1])))
    W = "A photo of two people at the beach: on the {a}, " + wa + "; on the {b}, " + wb + "."
    w1 = encode_prompts(pipe, W.format(a="left", b="right")); w2 = encode_prompts(pipe, W.format(a="right", b="left"))
    pre = len(pipe.tokenizer(pipe.prompt_template_encode.format("A photo of two people at the beach: on the left, ")).input_ids) - pipe.prompt_template_encode_start_idx
    nw = len(pipe.tokenizer(" " + wa, add_special_tokens=False).input_ids)
    wd = rel(w2.embeds[0, pre:pre + nw], w1.embeds[0, pre:pre + nw])
    rows.append({"token_window_A": ta, "token_window_B": tb, "bare_window_A": pa, "words_A": wd,
                 "token_norm_ratio": float(e1.embeds[0, s[0].start:s[0].start+3].norm() / b1.embeds[0, s[0].start:s[0].start+3].norm())})
    print(rows[-1], flush=True)
m = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
print("mean", m)
json.dump({"rows": rows, "mean": m}, open(sys.argv[1] if len(sys.argv) > 1 else "ctx.json", "w"), indent=1)
