"""CPU probe, modes joint | isolated | region | region-segment (+ combinations such as region+isolated);
regional attention: image tokens of the left/right half do not attend the other slot's window (or segment); two people in one prompt with token heads, joint encoding (today) vs isolated slots (each slot's
segment encoded with only its own person's tokens, the other slots as the bare placeholder; the causal text encoder
then never lets person B's words read person A's tokens). Validation people (400000+), never test people."""
import argparse, importlib.util, json, time
from pathlib import Path
import torch

spec = importlib.util.spec_from_file_location("bench", "bench/toyworld_head_e2e.py")  # run from the repo root
B = importlib.util.module_from_spec(spec); spec.loader.exec_module(B)
ap = argparse.ArgumentParser()
ap.add_argument("--head", required=True); ap.add_argument("--out", required=True)
ap.add_argument("--root", default="/tmp/iso_val"); ap.add_argument("--n-people", type=int, default=48)
ap.add_argument("--n-pairs", type=int, default=24); ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--alpha", type=float, default=1.0); ap.add_argument("--modes", default="region,region+isolated")
ap.add_argument("--scenes", type=int, default=5); ap.add_argument("--seeds", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
from refgen.identity import prompts as P
from refgen.identity.tokens import placeholder_embeds
from refgen.toyworld.benchmark import BenchmarkConfig, attributes_of, default_model, default_vl_model, test_pairs
from refgen.toyworld.identities import make_identities

orig = P.encode_tokenized

import diffusers.models.transformers.transformer_qwenimage as QT
from refgen.identity import render as RD

SEGMENT = False
SPEC = {"rows": None}  # per cond row: (starts, L) of the batch being rendered
orig_dispatch = QT.dispatch_attention_fn
orig_ewt = RD.encode_with_tokens


SPEC["all"] = []
orig_ri = RD.render_images


def ewt(pipe, prompts, tokens, alphas):
    # render_rows encodes every prompt's jobs first, in the order the rows are then rendered
    SPEC["all"] += [[(sl.start, sl.length) for sl in P.tokenize(pipe, p, len(tokens)).slots] for p in prompts]
    return orig_ewt(pipe, prompts, tokens, alphas)


def render_images(pipe, embeds, mask, seeds, cfg, neg=None, progress=True, output_type="pil"):
    assert len(SPEC["all"]) == embeds.shape[0], (len(SPEC["all"]), embeds.shape)
    out = []
    for i in range(0, embeds.shape[0], cfg.batch_size):
        sl = slice(i, i + cfg.batch_size)
        SPEC["rows"] = SPEC["all"][sl]
        out += list(orig_ri(pipe, embeds[sl], mask[sl], seeds[sl], cfg, neg, False, output_type))
    SPEC["all"], SPEC["rows"] = [], None
    return out


def regional(q, k, v, attn_mask=None, **kw):
    rows = SPEC["rows"]
    if attn_mask is None or rows is None or len(rows[0]) < 2:
        return orig_dispatch(q, k, v, attn_mask=attn_mask, **kw)
    B2, T = q.shape[0], q.shape[1]
    n_img = GRID[0] * GRID[1]
    S = T - n_img
    assert B2 == 2 * len(rows), (B2, len(rows))  # cond rows, then the negative prompt's
    m = attn_mask.bool().expand(B2, 1, T, T).clone()
    col = torch.arange(n_img, device=q.device) % GRID[1]
    band = (col * len(rows[0])) // GRID[1]  # (n_img,) 0 = left ... K-1 = right
    for b, slots in enumerate(rows):
        for j, (st, L) in enumerate(slots):
            qi = S + torch.nonzero(band != j).flatten()  # image queries outside slot j's band
            end = st + L if not SEGMENT else (slots[j + 1][0] if j + 1 < len(slots) else S)
            m[b, 0, qi[:, None], torch.arange(st, end, device=q.device)[None, :]] = False
    return orig_dispatch(q, k, v, attn_mask=m, **kw)


QT.dispatch_attention_fn = regional
RD.encode_with_tokens = ewt
RD.render_images = render_images


def isolated(pipe, tps, device=None, dtype=None, tokens=None):
    if tokens is None or len(tokens) < 2:
        return orig(pipe, tps, device, dtype, tokens)
    ph = placeholder_embeds(pipe)
    encs = []
    for k in range(len(tokens)):
        toks = [t if j == k else ph.to(t.device, t.dtype).expand_as(t) for j, t in enumerate(tokens)]
        encs.append(orig(pipe, tps, device, dtype, toks))
    E = torch.stack([e.embeds for e in encs])  # (K, B, S, H)
    starts = torch.tensor([[sl.start for sl in e] for e in encs[0].slots], device=E.device)  # (B, K)
    pos = torch.arange(E.shape[2], device=E.device)
    owner = ((pos[None, None, :] >= starts[:, :, None]).sum(1) - 1).clamp(min=0)  # (B, S)
    emb = torch.gather(E.permute(1, 2, 0, 3), 2, owner[:, :, None, None].expand(-1, -1, 1, E.shape[3]))[:, :, 0]
    return P.Encoded(emb, encs[0].mask, encs[0].slots, encs[0].prompts, encs[0].input_ids)


model, vl = default_model(), default_vl_model()
bcfg = BenchmarkConfig(device="cpu", dtype="fp32", n_train=1200, n_test=a.n_people, n_pairs=a.n_pairs, head_alphas=[a.alpha])
bcfg.scenes = bcfg.scenes[:a.scenes]; bcfg.seeds = bcfg.seeds[:a.seeds]
root = Path(a.root)
if not root.exists():
    make_identities(root, n=a.n_people, seed=B.VAL_SEED, progress=False)
head_dir = Path(a.head)
rec = json.loads((head_dir / "head.json").read_text())
assert not ({p.name for p in root.iterdir()} & set(rec.get("train_ids", []))), "head trained on these people"
pipe, head, fx, net, neg = B.scoring_setup(model, vl, head_dir, "cpu", "fp32")
dirs = B._dirs(root); attrs = [attributes_of(d) for d in dirs]
pairs = test_pairs(len(dirs), a.n_pairs)
GRID = (bcfg.size // 16, bcfg.size // 16)
res = B.residuals(head, fx, dirs)
out = {"head": str(head_dir), "people": [d.name for d in dirs], "pairs": pairs, "alpha": a.alpha,
       "scenes": bcfg.scenes, "seeds": bcfg.seeds}
for mode in a.modes.split(","):
    t = time.time()
    P.encode_tokenized = isolated if "isolated" in mode else orig
    QT.dispatch_attention_fn = regional if "region" in mode else orig_dispatch
    SEGMENT = "segment" in mode
    m = B.two_slot(pipe, net, "cpu", attrs, res, pairs, a.alpha, bcfg, neg)
    m["seconds"] = time.time() - t
    out[mode] = m
    print(mode, {k: m[k] for k in m if isinstance(m[k], (int, float))}, flush=True)
Path(a.out).write_text(json.dumps(out, indent=1))
