"""The RL gate. Reward = accuracy - lambda x cost, per sample.

Set up as BlockDrop did it (why not one reward per mini-batch with Gumbel-Softmax and PPO: docs/moe.md, "RL gate"):
  - a contextual bandit: each input is one decision with its own reward r_i = 1[correct_i] - lambda x c(a_i), and
    the batch mean reward is the REINFORCE baseline (one reward per batch for B decisions would be a
    high-variance credit assignment);
  - the action is a team: a count m in 1..max_experts and an ordered choice of m experts, sampled exactly with
    the Gumbel-top-k trick (Plackett-Luce without replacement) at an annealed temperature; log pi(a|s) is the
    count's log probability plus the Plackett-Luce log probability of the sampled prefix;
  - cost c(a) = active FLOPs of the team / active FLOPs of the static top-2 team, from the static cost table
    (cost.py): deterministic, so the environment is too; live timings go to reports only.
Experts can be fine-tuned by cross-entropy on the sampled teams at the same time (a hybrid loss: experts by CE,
the gate by RL).

The random gate of equal expected cost gives every input the team size the RL gate gave some other input (the RL
gate's counts, shuffled) with uniformly random experts: the same cost distribution, no input dependence.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from refgen.artifacts import JsonlLogger, atomic_save_safetensors, atomic_write_json, provenance
from refgen.config import from_yaml
from refgen.moe.cost import CostTable, cost_table
from refgen.moe.model import switch_balance_loss, topk_mask


@dataclass
class RLConfig:
    lambdas: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.4, 0.8])
    max_experts: int = 3            # team sizes 1..max_experts
    ref_k: int = 2                  # cost is relative to the static top-REF_K team
    steps: int = 400                # episodes (mini-batches) per lambda
    batch_size: int = 128
    lr: float = 3e-3
    hidden: int = 64
    tau_start: float = 1.0          # Gumbel temperature, annealed linearly
    tau_end: float = 0.5
    entropy_coef: float = 0.01
    balance_coef: float = 0.01      # Switch load-balance term on the policy's expert choice (against collapse)
    grad_clip: float = 1.0
    finetune_experts: bool = True   # hybrid loss: experts (and stem, head) trained by CE on the sampled teams
    expert_lr: float = 3e-4
    ce_weight: float = 1.0
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    log_every: int = 20
    eval_batch: int = 512

    def __post_init__(self):
        self.lambdas = [float(x) for x in self.lambdas]
        if not self.lambdas or any(not math.isfinite(x) or x < 0 for x in self.lambdas):
            raise ValueError(f"lambdas must be a non-empty list of finite numbers >= 0, got {self.lambdas}")
        for k in ("max_experts", "ref_k", "steps", "batch_size", "hidden", "log_every", "eval_batch"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not (0 < self.tau_end <= self.tau_start):
            raise ValueError(f"need 0 < tau_end <= tau_start, got {self.tau_start}, {self.tau_end}")
        for k in ("lr", "expert_lr"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} must be > 0, got {getattr(self, k)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @classmethod
    def from_yaml(cls, path, **overrides) -> RLConfig:
        return from_yaml(cls, path, **overrides)


# ---- the environment ----------------------------------------------------------------------------------

class RoutingEnv:
    """Gym-style contextual bandit over a trained MoE. reset() draws a mini-batch and returns the state [B, S]:
    the pooled stem features, the gate's log-probabilities, the static per-expert cost (normalised) and lambda.
    step(mask) runs the MoE with those teams and returns (state, reward [B], done=True, info)."""

    def __init__(self, model, data, table: CostTable, lam: float, batch_size: int, seed: int = 0, ref_k: int = 2,
                 path: str = "sparse"):
        if model.gate is None:
            raise ValueError("the RL gate needs a model with experts and a gate (kind flat, hier or graph)")
        self.model, self.data, self.table, self.lam = model, data, table, float(lam)
        self.batch_size, self.path, self.seed = batch_size, path, seed
        self.ref_flops = table.static_topk_flops(ref_k)
        e = torch.tensor(table.expert_flops, dtype=torch.float32)
        self.expert_cost = e / self.ref_flops
        self.gen = torch.Generator().manual_seed(seed)
        self._idx = None

    @property
    def num_experts(self) -> int:
        return self.model.cfg.num_experts

    @property
    def state_dim(self) -> int:
        return self.model.cfg.stem_channels + 2 * self.num_experts + 1

    def reset(self, seed: int | None = None, idx: torch.Tensor | None = None) -> torch.Tensor:
        if seed is not None:
            self.gen = torch.Generator().manual_seed(seed)
        if idx is None:
            idx = torch.randint(0, len(self.data), (self.batch_size,), generator=self.gen)
        self._idx = idx.to(self.data.y.device)
        return self.observe(self._idx)

    @torch.no_grad()
    def observe(self, idx: torch.Tensor) -> torch.Tensor:
        x, _ = self.data.get(idx)
        z = self.model.features(x)
        r = self.model.route(z)
        B = len(idx)
        dev = x.device
        return torch.cat([self.model.gate_input(z), r.probs.clamp_min(1e-9).log(),
                          self.expert_cost.to(dev).expand(B, -1), torch.full((B, 1), self.lam, device=dev)], 1)

    def cost(self, mask: torch.Tensor) -> torch.Tensor:
        return (self.table.active_flops(mask) / self.ref_flops).float()

    def step(self, mask: torch.Tensor):
        """Rewards for the teams MASK [B, E] on the batch of the last reset(). Gradients flow into info['ce'] when
        grad mode is on (for fine-tuning the experts); the reward itself is detached."""
        if self._idx is None:
            raise RuntimeError("RoutingEnv.step before reset()")
        if mask.shape != (len(self._idx), self.num_experts):
            raise ValueError(f"mask must be [{len(self._idx)}, {self.num_experts}], got {tuple(mask.shape)}")
        if bool((mask.sum(1) < 1).any()):
            raise ValueError("every input needs at least one expert in its team")
        x, y = self.data.get(self._idx)
        out = self.model(x, path=self.path, mask=mask)
        correct = (out.logits.detach().argmax(1) == y).float()
        cost = self.cost(mask).to(correct.device)
        reward = correct - self.lam * cost
        info = {"correct": correct, "cost": cost, "acc": float(correct.mean()), "mean_cost": float(cost.mean()),
                "ce": F.cross_entropy(out.logits, y, reduction="none")}
        return self.observe(self._idx), reward, True, info


# ---- the policy ---------------------------------------------------------------------------------------

class TeamPolicy(nn.Module):
    """MLP state -> (expert scores [B, E], team-size logits [B, M])."""

    def __init__(self, state_dim: int, num_experts: int, max_experts: int, hidden: int = 64):
        super().__init__()
        if not 1 <= max_experts <= num_experts:
            raise ValueError(f"max_experts must be in 1..{num_experts}, got {max_experts}")
        self.num_experts, self.max_experts = num_experts, max_experts
        self.body = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.scores = nn.Linear(hidden, num_experts)
        self.count = nn.Linear(hidden, max_experts)

    def forward(self, state):
        h = self.body(state)
        return self.scores(h), self.count(h)


def plackett_luce_logp(scores: torch.Tensor, order: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """log P(the first m items of ORDER, in that order) when items are drawn without replacement with
    probabilities softmax(scores) over those left. scores, order [B, E]; m [B] -> [B]."""
    s = scores.gather(1, order)
    lse = torch.logcumsumexp(s.flip(1), dim=1).flip(1)      # logsumexp over the items not drawn yet
    t = torch.arange(scores.shape[1], device=scores.device)
    return ((s - lse) * (t.unsqueeze(0) < m.unsqueeze(1))).sum(1)


def sample_team(scores, count_logits, tau: float, gen: torch.Generator | None = None):
    """Gumbel-top-k: (mask [B, E], log pi [B], m [B]). Adding Gumbel noise to scores / tau and sorting draws
    an exact Plackett-Luce sample without replacement."""
    B, E = scores.shape
    u = torch.rand(B, E, generator=gen).to(scores.device).clamp(1e-12, 1 - 1e-12)
    s = scores / tau
    order = (s.detach() - torch.log(-torch.log(u))).argsort(1, descending=True)
    cnt = torch.distributions.Categorical(logits=count_logits)
    m_idx = torch.multinomial(cnt.probs.detach().cpu(), 1, generator=gen).squeeze(1).to(scores.device)
    m = m_idx + 1
    t = torch.arange(E, device=scores.device)
    mask = torch.zeros(B, E, device=scores.device).scatter(1, order, (t.unsqueeze(0) < m.unsqueeze(1)).float())
    logp = cnt.log_prob(m_idx) + plackett_luce_logp(s, order, m)
    return mask, logp, m


def greedy_team(scores, count_logits) -> tuple[torch.Tensor, torch.Tensor]:
    m = count_logits.argmax(1) + 1
    order = scores.argsort(1, descending=True)
    t = torch.arange(scores.shape[1], device=scores.device)
    return torch.zeros_like(scores).scatter(1, order, (t.unsqueeze(0) < m.unsqueeze(1)).float()), m


def random_team(m: torch.Tensor, num_experts: int, gen: torch.Generator) -> torch.Tensor:
    order = torch.rand(len(m), num_experts, generator=gen).argsort(1).to(m.device)
    t = torch.arange(num_experts, device=m.device)
    return torch.zeros(len(m), num_experts, device=m.device).scatter(1, order, (t.unsqueeze(0) < m.unsqueeze(1)).float())


def policy_entropy(scores, count_logits) -> torch.Tensor:
    return (torch.distributions.Categorical(logits=count_logits).entropy()
            + torch.distributions.Categorical(logits=scores).entropy())


# ---- training one lambda and the sweep ----------------------------------------------------------------

def train_gate(model, train_data, table: CostTable, lam: float, cfg: RLConfig, log=None, progress: bool = False):
    """REINFORCE with a batch-mean baseline for one lambda. Returns (policy, model): the model is a fine-tuned
    copy when cfg.finetune_experts, else the input model (untouched)."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(model) if cfg.finetune_experts else model
    model.eval()  # BatchNorm statistics of the stem stay those of supervised training
    for p in model.parameters():
        p.requires_grad_(cfg.finetune_experts)
    env = RoutingEnv(model, train_data, table, lam, cfg.batch_size, seed=cfg.seed, ref_k=cfg.ref_k)
    dev = next(model.parameters()).device
    policy = TeamPolicy(env.state_dim, env.num_experts, cfg.max_experts, cfg.hidden).to(dev)
    groups = [{"params": policy.parameters(), "lr": cfg.lr}]
    if cfg.finetune_experts:
        groups.append({"params": [p for n, p in model.named_parameters() if not n.startswith("gate.")],
                       "lr": cfg.expert_lr})
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for step in tqdm(range(cfg.steps), desc=f"rl gate lambda={lam:g}", disable=not progress, leave=False):
        tau = cfg.tau_start + (cfg.tau_end - cfg.tau_start) * step / max(cfg.steps - 1, 1)
        state = env.reset()
        scores, counts = policy(state)
        mask, logp, m = sample_team(scores, counts, tau, gen)
        with torch.set_grad_enabled(cfg.finetune_experts):
            _, reward, _, info = env.step(mask)
        adv = reward - reward.mean()
        ent = policy_entropy(scores, counts).mean()
        loss = -(adv.detach() * logp).mean() - cfg.entropy_coef * ent
        if cfg.balance_coef > 0:
            loss = loss + cfg.balance_coef * switch_balance_loss(scores.softmax(1), mask)
        if cfg.finetune_experts:
            loss = loss + cfg.ce_weight * info["ce"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        opt.step()
        if log is not None and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            log.log(kind="episode", lam=lam, episode=step, reward=float(reward.mean()), acc=info["acc"],
                    cost=info["mean_cost"], mean_team=float(m.float().mean()), entropy=float(ent.detach()), tau=tau,
                    action=torch.bincount(m - 1, minlength=cfg.max_experts).tolist())
    for p in model.parameters():
        p.requires_grad_(True)
    return policy.eval(), model


@torch.no_grad()
def evaluate_gate(model, policy, data, table: CostTable, cfg: RLConfig, seed: int = 0) -> dict:
    """Greedy RL gate vs the random gate of equal expected cost on DATA."""
    env = RoutingEnv(model, data, table, 0.0, cfg.eval_batch, ref_k=cfg.ref_k)
    gen = torch.Generator().manual_seed(seed)
    n = len(data)
    rl_ok, rnd_ok, flops, ms = 0, 0, 0.0, []
    masks = []
    for i in range(0, n, cfg.eval_batch):
        idx = torch.arange(i, min(i + cfg.eval_batch, n), device=data.y.device)
        state = env.observe(idx)
        env._idx = idx
        mask, m = greedy_team(*policy(state))
        _, _, _, info = env.step(mask)
        rl_ok += float(info["correct"].sum())
        flops += float(table.active_flops(mask).sum())
        ms.append(m)
        masks.append(mask)
    m_all = torch.cat(ms)
    m_shuffled = m_all[torch.randperm(len(m_all), generator=gen).to(m_all.device)]
    for i in range(0, n, cfg.eval_batch):
        idx = torch.arange(i, min(i + cfg.eval_batch, n), device=data.y.device)
        env._idx = idx
        rmask = random_team(m_shuffled[i:i + len(idx)], env.num_experts, gen)
        _, _, _, info = env.step(rmask)
        rnd_ok += float(info["correct"].sum())
    share = torch.cat(masks).sum(0) / torch.cat(masks).sum()
    return {"acc": rl_ok / n, "random_gate_acc": rnd_ok / n, "active_flops_per_image": flops / n,
            "flops_vs_static_ref": flops / n / table.static_topk_flops(cfg.ref_k),
            "team_size_hist": torch.bincount(m_all - 1, minlength=cfg.max_experts).tolist(),
            "routing_share": share.tolist()}


@torch.no_grad()
def static_topk(model, data, table: CostTable, k: int, batch: int = 512) -> dict:
    ok, n = 0, len(data)
    for i in range(0, n, batch):
        idx = torch.arange(i, min(i + batch, n), device=data.y.device)
        x, y = data.get(idx)
        z = model.features(x)
        r = model.route(z)
        out = model(x, path="sparse", mask=topk_mask(r.probs, k))
        ok += int((out.logits.argmax(1) == y).sum())
    return {"k": k, "acc": ok / n, "active_flops_per_image": table.static_topk_flops(k)}


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (cost, accuracy) points: True where no other point is at most as costly and at least as accurate,
    and strictly better in one."""
    flags = []
    for i, (c, a) in enumerate(points):
        flags.append(not any((c2 <= c and a2 >= a and (c2 < c or a2 > a)) for j, (c2, a2) in enumerate(points)
                             if j != i))
    return flags


def rl_sweep(model_dir: str | Path, cfg: RLConfig, out: str | Path, progress: bool = True, data=None) -> dict:
    """Train one RL gate per lambda on a trained MoE (a `refgen moe train` folder); evaluate each greedily on the
    test split against the random gate of equal expected cost and the static top-k gates; write rl.json,
    rl_metrics.jsonl and lambda_<l>/ (policy and, when fine-tuned, model weights)."""
    from refgen.moe.data import load_dataset
    from refgen.moe.train import Batches, MoETrainConfig, load_model, split_data
    from refgen.runtime import resolve_device, seed_everything

    out = Path(out)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    model, info = load_model(model_dir, device)
    if model.gate is None:
        raise ValueError(f"{model_dir} holds a dense model (no gate): the RL gate needs an MoE")
    if cfg.max_experts > model.cfg.num_experts:
        raise ValueError(f"max_experts={cfg.max_experts} exceeds the model's {model.cfg.num_experts} experts")
    tcfg = MoETrainConfig(**{k: v for k, v in info["config"].items() if k in {f.name for f in
                                                                            dataclasses.fields(MoETrainConfig)}})
    ds = data if data is not None else load_dataset(tcfg.dataset, tcfg.cache, tcfg.data_dir, tcfg.n_train,
                                                    tcfg.n_test)
    tr, _, mean, std = split_data(tcfg, ds)
    train_b = Batches(ds.x_train[tr], ds.y_train[tr], mean, std, device)
    test_b = Batches(ds.x_test, ds.y_test, mean, std, device)
    table = cost_table(model, ds.shape)
    log = JsonlLogger(out / "rl_metrics.jsonl")
    t0 = time.perf_counter()
    static = [static_topk(model, test_b, table, k, cfg.eval_batch) for k in range(1, cfg.max_experts + 1)]
    ref = next(s for s in static if s["k"] == cfg.ref_k) if cfg.ref_k <= cfg.max_experts else \
        static_topk(model, test_b, table, cfg.ref_k, cfg.eval_batch)
    rows = []
    for lam in cfg.lambdas:
        policy, tuned = train_gate(model, train_b, table, lam, cfg, log, progress)
        ev = evaluate_gate(tuned, policy, test_b, table, cfg, seed=cfg.seed)
        ev.update(lam=lam, delta_acc_pp_vs_static_ref=100 * (ev["acc"] - ref["acc"]),
                  margin_over_random_pp=100 * (ev["acc"] - ev["random_gate_acc"]))
        rows.append(ev)
        log.log(kind="lambda", **ev)
        d = out / f"lambda_{lam:g}"
        atomic_save_safetensors({k: v.detach().cpu() for k, v in policy.state_dict().items()},
                                d / "policy.safetensors", {"lambda": str(lam)})
        if cfg.finetune_experts:
            atomic_save_safetensors({k: v.detach().cpu() for k, v in tuned.state_dict().items()},
                                    d / "model.safetensors", {"lambda": str(lam)})
    result = provenance(cfg, model_dir=str(model_dir), dataset=ds.name, static_topk=static, reference=ref,
                        lambdas=rows, pareto_points=_mark_front(rows), seconds=time.perf_counter() - t0,
                        device=str(device), cost=table.to_json(),
                        cost_definition=f"active FLOPs / active FLOPs of static top-{cfg.ref_k} (FlopCounterMode)")
    atomic_write_json(out / "rl.json", result)
    return result


def _mark_front(rows: list[dict]) -> int:
    """Flag each lambda's row on_pareto_front (active FLOPs down, accuracy up); returns how many are on it."""
    front = pareto_front([(r["active_flops_per_image"], r["acc"]) for r in rows])
    for r, f in zip(rows, front):
        r["on_pareto_front"] = f
    return int(sum(front))


def merge_sweeps(parts: list[dict], out: str | Path | None = None) -> dict:
    """One rl.json from sweeps over disjoint lambda subsets of the same MoE (one process per subset, e.g. spread
    over GPUs): each lambda's gate is trained and evaluated on its own (seeded per lambda), so the rows are what
    one sweep would give; they are put in lambda order, the Pareto flags and pareto_points are recomputed over all
    of them and every row's delta against static top-REF_K uses the first part's reference (the spread of the
    parts' reference accuracies is recorded). Refuses parts of different models, data sets or configs (other than
    lambdas, device and threads) and a lambda that is in two parts. `seconds` is the parts' sum (process time, not
    wall time; each part's own in `merged_from`). Writes OUT/rl.json when OUT is given."""
    if not parts:
        raise ValueError("merge_sweeps needs at least one sweep")
    skip = {"lambdas", "device", "threads"}
    first = parts[0]
    for i, p in enumerate(parts[1:], 1):
        for k in ("model_dir", "dataset"):
            if p.get(k) != first.get(k):
                raise ValueError(f"part {i} has {k} {p.get(k)!r}, part 0 {first.get(k)!r}: not one sweep")
        diff = sorted(k for k in set(p["config"]) | set(first["config"])
                      if k not in skip and p["config"].get(k) != first["config"].get(k))
        if diff:
            raise ValueError(f"part {i} differs from part 0 in config {diff}: not one sweep")
    rows = [dict(r) for p in parts for r in p["lambdas"]]
    lams = [r["lam"] for r in rows]
    if len(set(lams)) != len(lams):
        raise ValueError(f"a lambda is in more than one part: {sorted(lams)}")
    rows.sort(key=lambda r: r["lam"])
    ref = first["reference"]
    for r in rows:
        r["delta_acc_pp_vs_static_ref"] = 100 * (r["acc"] - ref["acc"])
    refs = [p["reference"]["acc"] for p in parts]
    result = {**first, "config": {**first["config"], "lambdas": [r["lam"] for r in rows]}, "lambdas": rows,
              "pareto_points": _mark_front(rows), "seconds": sum(p["seconds"] for p in parts),
              "merged_from": [{"lambdas": [r["lam"] for r in p["lambdas"]], "seconds": p["seconds"],
                               "created": p.get("created"), "device": p.get("device"),
                               "reference_acc": p["reference"]["acc"]} for p in parts],
              "reference_acc_spread_pp": 100 * (max(refs) - min(refs))}
    if out is not None:
        atomic_write_json(Path(out) / "rl.json", result)
    return result
