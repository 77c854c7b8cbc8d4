"""The amortised residual head: z (D,) -> slot residual (L, H); and `load_head`, which
loads either kind of head (this linear one, or `refgen.identity.resampler.ResamplerHead`) from a head folder.

Linear baseline, as the seed specifies: W z + b reshaped to (L, H), each token RMS-normalised, times one
learned clamped scale exp(log_scale) in [0.01, 1.5]. Its regression targets are teacher residuals (not zeros,
as the seed's proof of concept did), with loss 0.7 (1 - cos) + 0.3 MSE + 0.05 |RMS(pred) - RMS(target)|;
`refgen.identity.train_e2e` trains either head through the generator instead.

A checkpoint carries everything needed to refuse a mismatch at inference: L, H, the placeholder ids and
tokenizer fingerprint of the Qwen-Image model the teachers were made with, and every feature setting (the
Qwen3-VL model's identity, pixel budget, max side, max images, dtype) the features came from.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from refgen.artifacts import JsonlLogger, atomic_save_safetensors, atomic_write_json, provenance


class LinearHead(nn.Module):
    kind = "linear"

    def __init__(self, dim: int, L: int, H: int, scale_min: float = 0.01, scale_max: float = 1.5):
        super().__init__()
        self.L, self.H, self.scale_min, self.scale_max = L, H, scale_min, scale_max
        self.proj = nn.Linear(dim, L * H)
        self.log_scale = nn.Parameter(torch.tensor(0.0))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D) -> R (B, L, H)."""
        raw = self.proj(z).view(-1, self.L, self.H)  # (B, L, H)
        tok = raw / raw.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()  # per-token RMS 1
        return self.log_scale.exp().clamp(self.scale_min, self.scale_max) * tok


def rms(x: torch.Tensor) -> torch.Tensor:
    """(B, L, H) -> (B,)"""
    return x.pow(2).flatten(1).mean(1).sqrt()


def head_loss_terms(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Per-sample loss (B,) and its terms (B,) each; B may be 0."""
    cos = F.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1)
    mse = (pred - target).pow(2).flatten(1).mean(1)
    rms_err = (rms(pred) - rms(target)).abs()
    return 0.7 * (1 - cos) + 0.3 * mse + 0.05 * rms_err, {"cos": cos, "mse": mse, "rms_err": rms_err}


def head_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
    per, terms = head_loss_terms(pred, target)
    return per.mean(), {k: v.mean().item() for k, v in terms.items()}


@dataclass
class HeadConfig:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if not (0 <= self.val_fraction < 1):
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size must be >= 1 and lr > 0")


def load_pairs(root: str | Path) -> tuple[list[str], torch.Tensor, torch.Tensor, dict, dict]:
    """(ids, Z (N, D), R (N, L, H), residual metadata, feature metadata) for identities that have both a
    teacher residual and cached features. All residuals must share L/H/tokenizer; all features one VL setup."""
    from safetensors import safe_open

    from refgen.identity.features import FEATURE_SETTING_KEYS, features_path
    from refgen.identity.inject import read_residual

    ids, zs, rs, rmd, fmd = [], [], [], None, None
    for d in sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name.startswith("seed_")):
        rf, ff = d / "teacher_residual.safetensors", features_path(d)
        if not (rf.exists() and ff.exists()):
            continue
        r, md = read_residual(rf)
        with safe_open(str(ff), framework="pt") as h:
            z, fm = h.get_tensor("z"), h.metadata()
        key = {k: md[k] for k in ("L", "H", "placeholder_token_ids", "tokenizer_fingerprint")}
        missing = [k for k in (*FEATURE_SETTING_KEYS, "D") if k not in fm]
        if missing:
            raise ValueError(f"{ff} does not record the feature setting(s) {', '.join(missing)}: re-run "
                             "`refgen features` for this root")
        fkey = {k: fm[k] for k in (*FEATURE_SETTING_KEYS, "D")}
        if rmd is None:
            rmd, fmd, rkey0, fkey0 = md, fm, key, fkey
        elif key != rkey0 or fkey != fkey0:
            raise ValueError(f"{d.name}: teacher/feature settings {key} {fkey} differ from the first identity's "
                             f"{rkey0} {fkey0}; train one head per model/tokenizer/VL setup")
        ids.append(d.name)
        zs.append(z.float())
        rs.append(r.float())
    if not ids:
        tokens = next(Path(root).glob("seed_*/teacher_tokens.safetensors"), None)
        hint = (f"; {tokens.parent.name} has teacher_tokens.safetensors: the head regresses slot residuals, so invert "
                "with parametrisation rms_scaled or free for it, or train it end to end (--objective e2e)"
                if tokens else "")
        raise ValueError(f"no identity under {root} has both teacher_residual.safetensors and vl_features.safetensors "
                         f"(run `refgen invert` and `refgen features` first){hint}")
    return ids, torch.stack(zs), torch.stack(rs), rmd, fmd


def split_by_identity(ids: list[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(len(ids)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(ids) * val_fraction)) if len(ids) > 1 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


@torch.no_grad()
def evaluate(head: nn.Module, Z: torch.Tensor, R: torch.Tensor) -> dict:
    if len(Z) == 0:
        return {}
    _, m = head_loss(head(Z), R)
    return m


def train_head(root: str | Path, out: str | Path, cfg: HeadConfig | None = None, device: str = "cpu",
               progress: bool = True) -> dict:
    """`refgen train-head`. Data-parallel under torchrun (DDP, each rank its slice of every batch order)."""
    from tqdm.auto import tqdm

    from refgen.identity.features import FEATURE_SETTING_KEYS

    cfg = cfg or HeadConfig()
    out = Path(out)
    from refgen.runtime import init_distributed

    rank, world, device = init_distributed(device)
    dev = torch.device(device)
    ids, Z, R, rmd, fmd = load_pairs(root)
    tr, va = split_by_identity(ids, cfg.val_fraction, cfg.seed)
    Z, R = Z.to(dev), R.to(dev)
    torch.manual_seed(cfg.seed)
    L, H, D = R.shape[1], R.shape[2], Z.shape[1]
    head = LinearHead(D, L, H).to(dev)
    model = torch.nn.parallel.DistributedDataParallel(head) if world > 1 else head
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    log = JsonlLogger(out / "metrics.jsonl") if rank == 0 else None
    meta = {"kind": "linear", "head_config": json.dumps(head_config(head)), "L": str(L), "H": str(H), "D": str(D),
            "placeholder_token_ids": rmd["placeholder_token_ids"],
            "tokenizer_fingerprint": rmd["tokenizer_fingerprint"], "qwen_image_model": rmd.get("model", ""),
            "vl_model": fmd.get("vl_model", ""),
            "feature_settings": json.dumps({k: fmd[k] for k in FEATURE_SETTING_KEYS}),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    g = torch.Generator().manual_seed(cfg.seed)
    summary = {}
    for epoch in tqdm(range(1, cfg.epochs + 1), desc="train-head", disable=not progress or rank != 0):
        order = torch.tensor(tr)[torch.randperm(len(tr), generator=g)]  # identities mixed in every batch
        head.train()
        losses = []
        for b in range(0, len(order), cfg.batch_size):
            batch = order[b:b + cfg.batch_size]
            idx = batch[rank::world]  # each rank its share of the same batch; the last one may leave a rank none
            per, _ = head_loss_terms(model(Z[idx]), R[idx])
            # Every rank runs backward, an empty share included (a zero gradient that still joins DDP's
            # all-reduce: a rank that skipped it would crash gloo and hang NCCL). DDP averages over ranks, so
            # each sums its share / batch size x world: the gradient is the mean over the whole batch, as in
            # one process, however unevenly the batch splits.
            opt.zero_grad(set_to_none=True)
            (per.sum() * (world / len(batch))).backward()
            opt.step()
            total = per.detach().sum()
            if world > 1:
                torch.distributed.all_reduce(total)
            losses.append(total.item() / len(batch))
        head.eval()
        m_tr, m_va = evaluate(head, Z[tr], R[tr]), evaluate(head, Z[va], R[va])
        rec = {"epoch": epoch, "loss": sum(losses) / max(1, len(losses)),
               **{f"train_{k}": v for k, v in m_tr.items()}, **{f"val_{k}": v for k, v in m_va.items()}}
        summary = rec
        if rank == 0:
            log.log(**rec)
            md = {**meta, "epoch": str(epoch), "metrics": json.dumps(rec), "git_commit": str(provenance()["git_commit"]),
                  "config": json.dumps(dataclasses.asdict(cfg))}
            sd = {k: v.detach().cpu() for k, v in head.state_dict().items()}
            atomic_save_safetensors(sd, out / f"head_epoch{epoch:03d}.safetensors", md)
            atomic_save_safetensors(sd, out / "head.safetensors", md)
            atomic_write_json(out / "head.json", provenance(cfg, **meta, epoch=epoch,
                                                             metrics=rec, train_ids=[ids[i] for i in tr],
                                                             val_ids=[ids[i] for i in va]))
    if world > 1:
        # Rank 0 is still writing the last epoch's files: a rank that tears gloo down alone can abort at exit
        # ("terminate called without an active exception", seen on 2 CPU ranks), so all leave together; DDP, whose
        # reducer holds work on the group, is freed before the group is destroyed (as train_e2e and dit/train do).
        del model, opt
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


HEAD_KINDS = ("linear", "resampler")
HEAD_FILE, HEAD_JSON = "head.safetensors", "head.json"
# A token head (output "tokens") stores beside its weights the placeholder embeddings T_ph its output is added to
# (T = T_ph + token_scale * out), so inference can refuse a text encoder whose placeholder differs.
PLACEHOLDER_KEY = "output.placeholder"
SLOT_ROLES_KEY = "slot_roles"  # (2, L, H): the head's offsets for the first and second slot of a two-person prompt
# what a head's weights file and its head.json must agree on, or the weights are not the head the record describes
RECORD_KEYS = ("kind", "head_config", "L", "H", "D", "feature_settings", "placeholder_token_ids",
               "tokenizer_fingerprint", "output")


def build_head(kind: str, dim: int, L: int, H: int, config: dict | None = None) -> nn.Module:
    """A fresh head of `kind` ("linear" | "resampler") mapping features of dim D to a residual (L, H)."""
    config = dict(config or {})
    if kind == "linear":
        return LinearHead(dim, L, H, **config)
    if kind == "resampler":
        from refgen.identity.resampler import ResamplerConfig, ResamplerHead

        return ResamplerHead(dim, L, H, ResamplerConfig(**config))
    raise ValueError(f"unknown head kind {kind!r}; choose one of {HEAD_KINDS}")


def head_config(head: nn.Module) -> dict:
    """The architecture settings `build_head` needs to rebuild `head` (recorded in every head file)."""
    if head.kind == "resampler":
        return head.cfg.to_dict()
    return {"scale_min": head.scale_min, "scale_max": head.scale_max}


def _head_paths(path: Path) -> tuple[Path, Path | None]:
    """(weights, head.json or None) for a head folder or a weights file (its head.json, if any, beside it)."""
    if path.is_dir():
        w, j = path / HEAD_FILE, path / HEAD_JSON
        if not w.is_file():
            raise FileNotFoundError(f"head folder {path} has no {HEAD_FILE} (train one with `refgen train-head`)")
        return w, j if j.is_file() else None
    if not path.is_file():
        raise FileNotFoundError(f"head checkpoint not found: {path}")
    j = path.parent / HEAD_JSON
    return path, j if j.is_file() and path.name == HEAD_FILE else None


def read_weights(weights: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a head's weights file, as written."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_head(path: str | Path, device: torch.device, dtype: torch.dtype, kind: str | None = None
              ) -> tuple[nn.Module, dict]:
    """(head in eval mode, weights metadata) from a head folder (head.safetensors + head.json) or a weights file.

    Either kind: the weights file records `kind` and `head_config` (files from before the resampler have neither
    and are linear). Refused with HeadMismatchError, naming both sides: a head.json beside the weights that
    disagrees with them on kind, architecture, L/H/D, feature settings or tokenizer (the record would describe
    another head); `kind` given and not the file's; weights that do not fit the recorded architecture."""
    from refgen.identity.generate import HeadMismatchError

    weights, record = _head_paths(Path(path))
    sd, md = read_weights(weights)
    if "L" not in md:
        raise ValueError(f"{weights} is not a refgen head checkpoint (no L/H metadata)")
    md.setdefault("kind", "linear")
    if md["kind"] not in HEAD_KINDS:
        raise HeadMismatchError(f"{weights}: unknown head kind {md['kind']!r} (known: {', '.join(HEAD_KINDS)})")
    if kind is not None and kind != md["kind"]:
        raise HeadMismatchError(f"{weights} is a {md['kind']} head, not the {kind} head asked for")
    if record is not None:
        rec = json.loads(record.read_text())
        rec_kind = "linear" if rec.get("kind") in (None, "residual_head") else rec["kind"]
        for key in RECORD_KEYS:
            want, got = md.get(key), (rec_kind if key == "kind" else rec.get(key))
            if key == "head_config" and want is None:
                continue  # a linear head from before the architecture was recorded
            if key != "kind" and got is not None and not isinstance(got, str):
                got = json.dumps(got) if key in ("head_config", "feature_settings") else str(got)
            if got is not None and canonical(key, got) != canonical(key, want):
                raise HeadMismatchError(f"{record} and {weights} disagree on {key}: {got!r} in the record, {want!r} "
                                        "in the weights (a weights file copied over another head's folder?)")
    md.setdefault("output", "residual")  # heads from before token output
    placeholder = sd.pop(PLACEHOLDER_KEY, None)
    if md["output"] not in ("residual", "tokens"):
        raise HeadMismatchError(f"{weights}: unknown head output {md['output']!r} (known: residual, tokens)")
    if md["output"] == "tokens" and (placeholder is None or "token_scale" not in md):
        raise HeadMismatchError(f"{weights} is a token head without its placeholder embeddings ({PLACEHOLDER_KEY}) "
                                "or token_scale: not a file `refgen train-head --output tokens` wrote")
    config = json.loads(md["head_config"]) if md.get("head_config") else {}
    if md["kind"] == "resampler":
        config.setdefault("pooled_query", False)  # resamplers recorded before the option had no pooled query
    head = build_head(md["kind"], int(md["D"]), int(md["L"]), int(md["H"]), config)
    if SLOT_ROLES_KEY in sd:  # trained with slot_roles: an offset per slot of a two-person prompt
        head.slot_roles = nn.Parameter(torch.zeros_like(sd[SLOT_ROLES_KEY]))
    try:
        head.load_state_dict(sd)
    except RuntimeError as e:
        raise HeadMismatchError(f"{weights}: the weights do not fit a {md['kind']} head with D={md['D']} L={md['L']} "
                                f"H={md['H']} {config}: {str(e).splitlines()[0]} ...") from e
    head = head.to(device, dtype).eval()
    head.output = md["output"]
    if placeholder is not None:  # plain attributes, not weights: the head's output is read against them
        head.token_base, head.token_scale = placeholder.float(), float(md["token_scale"])
    return head, md


def check_start_head(head: str | Path, parametrisation: str, slot_repeat: int = 1) -> None:
    """A head whose prediction starts an inversion must make what the inversion optimises: token embeddings for
    parametrisation 'tokens', a slot residual for the others, of the inversion's width (the head's
    E2EConfig.slot_repeat is the inversion's). Reads head.json only (no model loads)."""
    rec = Path(head) / HEAD_JSON
    if not rec.is_file():
        raise FileNotFoundError(f"start head {head} has no {HEAD_JSON} (a head folder from `refgen train-head`)")
    d = json.loads(rec.read_text())
    output = d.get("output", "residual")
    if (output == "tokens") != (parametrisation == "tokens"):
        raise ValueError(f"start head {head} outputs {output}, but the inversion's parametrisation is "
                         f"{parametrisation!r}: a token head starts token inversion, a residual head the others")
    theirs = int(d.get("config", {}).get("slot_repeat", 1))  # E2EConfig.slot_repeat; heads before it: 1
    if theirs != slot_repeat:
        raise ValueError(f"start head {head} was trained with slot_repeat {theirs} (L = {d.get('L')} tokens), but the "
                         f"inversion's slot_repeat is {slot_repeat}: a head starts inversions of its own width")


def canonical(key: str, v):
    """JSON-valued metadata compared as values, not as spellings."""
    if v is not None and key in ("head_config", "feature_settings", "placeholder_token_ids"):
        return json.loads(v)
    return v


@torch.no_grad()
def person_from_photos(head: nn.Module, features, photos: list) -> tuple[str, torch.Tensor]:
    """Reference photos of one person -> ("residual", R (L, H)) or, for a token head, ("tokens", T (L, H_in) =
    T_ph + token_scale * out); float32 on the CPU. A head from `load_head`."""
    out = residual_from_photos(head, features, photos)[0].float().cpu()
    if getattr(head, "output", "residual") == "tokens":
        return "tokens", head.token_base + head.token_scale * out
    return "residual", out


def with_slot_role(head: nn.Module, kind: str, person: torch.Tensor, k: int, n_people: int) -> torch.Tensor:
    """PERSON of KIND ("residual": R (L, H), "tokens": T (L, H_in), as `person_from_photos` makes them) in slot K of
    a prompt with N_PEOPLE people: plus the head's learnt offset for that slot when the head has `slot_roles`, the
    prompt has two people and the person is of the head's own output kind (in token units for a token head);
    unchanged otherwise (one person, more than two, a head without roles, or a person of the other kind)."""
    roles = getattr(head, "slot_roles", None)
    output = getattr(head, "output", "residual")
    if roles is None or n_people != 2 or kind != output:
        return person
    off = roles[k].detach().to(person.device, person.dtype)
    return person + (head.token_scale * off if output == "tokens" else off)


@torch.no_grad()
def residual_from_photos(head: nn.Module, features, photos: list) -> torch.Tensor:
    """Reference photos of one person -> the head's output (1, L, H) on the head's device and dtype, each kind fed
    as it was trained: the linear head the pooled z, the resampler every token of every photo. For a token head
    this is the step from the placeholder in units of token_scale; `person_from_photos` makes the tokens."""
    p = next(head.parameters())
    if head.kind == "resampler":
        tok, mask = features.tokens(photos)  # (n, T, D), (n, T)
        return head(tok.reshape(1, -1, tok.shape[-1]).to(p.device, p.dtype), mask.reshape(1, -1).to(p.device))
    return head(features(photos).to(p.device, p.dtype)[None])
