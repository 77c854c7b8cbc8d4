"""The MoE image classifier: a shared conv stem, E conv experts, a gate, an optional expert graph, a linear head.

Gates (how each is read from the design is in docs/moe.md):
    flat    softmax over E experts, top-k, weights renormalised over the k chosen
    hier    a group gate picks the top group, an in-group gate the top-k experts in it; weight =
            p(group) * p(expert | group) renormalised within the group (top-1: straight-through, as flat), so
            both gates get gradients
    graph   the flat gate plus the expert graph (graph.py): the chosen team exchanges features
    dense   no gate: one expert (the dense CNN baselines of equal active FLOPs / equal stored bytes)

Two execution paths with identical results in eval mode (tested):
    dense   every expert runs on every input and unchosen outputs are masked: no data-dependent control flow,
            exports to ONNX, but top-k saves no time
    sparse  each expert runs only on the inputs that chose it (index_select / index_put): the path whose
            measured time falls with k, and the one to train with
Experts use BatchNorm by default. In training, the sparse path normalises each expert over the inputs routed to it
(its own batch statistics), the dense path over all inputs, so the two differ while training; in eval mode both
use the running statistics and agree. expert_norm='gn' (GroupNorm, per sample) makes them agree in training too,
but learns far slower (docs/moe.md: the ToyWorld-27 comparison), so BatchNorm stays the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from refgen.moe.graph import MESSAGES, SELF_LOOPS, ExpertGraph

KINDS = ("flat", "hier", "graph", "dense")
PATHS = ("dense", "sparse")


@dataclass
class MoEModelConfig:
    kind: str = "graph"
    num_experts: int = 4
    top_k: int = 2
    stem_channels: int = 32
    expert_channels: int = 48
    expert_dim: int = 96
    pool: int = 2                   # experts pool to pool x pool before their linear layer
    expert_stages: int = 1          # stride-2 stages per expert (each: conv, conv stride 2)
    expert_norm: str = "bn"         # bn or gn (see the module docstring)
    groups: int = 2                 # hier: experts are split into this many equal groups
    graph_init: str = "identity"    # graph: identity (+ small positive off-diagonal) or random
    graph_strength: float = 1.0
    graph_self_loop: str = "fixed"  # graph: self weight 1, edges relative to it (learned: the pre-fix free diagonal)
    graph_messages: str = "neighbours"  # graph: m_i mixes the other team members only (team: h_i too, pre-fix)
    gate_hidden: int = 0            # 0: a linear router (one bias-free layer on the normalised features)
    gate_norm: str = "bn"           # bn: standardise the gate's input per feature (BatchNorm1d, no affine); none
    gate_bias: bool = False         # bias on the gate's output layer (the pre-fix gate had one)
    gate_noise: float = 0.0         # std of Gaussian noise on the gate logits while training (noisy top-k)
    dropout: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"model.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "dense":
            self.num_experts, self.top_k = 1, 1
        for k in ("num_experts", "top_k", "stem_channels", "expert_channels", "expert_dim", "pool", "groups",
                  "expert_stages"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"model.{k} must be >= 1, got {getattr(self, k)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"model.top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        if self.kind == "hier":
            if self.num_experts % self.groups:
                raise ValueError(f"model.groups={self.groups} must divide num_experts={self.num_experts}")
            if self.top_k > self.num_experts // self.groups:
                raise ValueError(f"hier: top_k={self.top_k} exceeds the group size {self.num_experts // self.groups}")
        if self.graph_self_loop not in SELF_LOOPS:
            raise ValueError(f"model.graph_self_loop must be one of {SELF_LOOPS}, got {self.graph_self_loop!r}")
        if self.graph_messages not in MESSAGES:
            raise ValueError(f"model.graph_messages must be one of {MESSAGES}, got {self.graph_messages!r}")
        if self.gate_hidden < 0:
            raise ValueError(f"model.gate_hidden must be >= 0, got {self.gate_hidden}")
        if self.gate_norm not in ("bn", "none"):
            raise ValueError(f"model.gate_norm must be 'bn' or 'none', got {self.gate_norm!r}")
        if self.expert_norm not in ("bn", "gn"):
            raise ValueError(f"model.expert_norm must be 'bn' or 'gn', got {self.expert_norm!r}")
        if self.gate_noise < 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"model.gate_noise must be >= 0 and dropout in [0, 1), got {self.gate_noise}, "
                             f"{self.dropout}")


@dataclass
class Routing:
    probs: torch.Tensor     # [B, E] the gate's full distribution (for balance loss and routing statistics)
    mask: torch.Tensor      # [B, E] 1 where the expert is in the input's team
    weights: torch.Tensor   # [B, E] combination weights, 0 outside the team
    logits: torch.Tensor | None = None  # [B, E(+G)] the gate's logits (router z-loss); None without a gate


@dataclass
class MoEOutput:
    logits: torch.Tensor
    routing: Routing
    balance_loss: torch.Tensor                  # balance_loss(): Switch + importance CV^2 + per-input entropy
    switch_loss: torch.Tensor | None = None     # switch_balance_loss() alone (Switch / GShard f . P)
    z_loss: torch.Tensor | None = None          # router z-loss (ST-MoE): mean logsumexp(gate logits)^2


def _conv(cin, cout, stride=1, norm="bn"):
    n = nn.BatchNorm2d(cout) if norm == "bn" else nn.GroupNorm(math.gcd(8, cout), cout)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), n, nn.ReLU(inplace=True))


class Expert(nn.Sequential):
    def __init__(self, cin: int, width: int, dim: int, pool: int, stages: int = 1, norm: str = "bn"):
        layers = []
        for i in range(stages):
            layers += [_conv(cin if i == 0 else width, width, norm=norm), _conv(width, width, 2, norm=norm)]
        super().__init__(*layers, nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(width * pool * pool, dim),
                         nn.ReLU(inplace=True))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    idx = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores).scatter(1, idx, 1.0)


def team_weights(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The gate's probabilities restricted to the team and renormalised (how an externally chosen team, e.g.
    the RL gate's, is combined)."""
    w = probs * mask
    return w / w.sum(dim=1, keepdim=True).clamp_min(1e-9)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over inputs of logsumexp(logits)^2 (keeps the gate's logits small; ST-MoE
    uses weight 1e-3)."""
    return torch.logsumexp(logits.float(), dim=1).pow(2).mean()


def switch_balance_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balance term E * sum_e f_e * P_e (f = share of team slots, P = mean probability);
    1 when routing is uniform, E when everything goes to one expert."""
    E = probs.shape[1]
    f = mask.sum(0) / mask.sum().clamp_min(1)
    return E * (f * probs.mean(0)).sum()


def balance_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Switch term + squared coefficient of variation of the mean gate probability (Shazeer et al.'s importance
    loss) + the mean per-input gate entropy / log E.

    The Switch term reaches an expert that is never chosen (its f is 0) only through the softmax, in proportion to
    that expert's already small probability, so alone it lets an expert starve. The first two terms are both
    satisfied by a gate that gives every input the *same* near-uniform distribution, whose top-k is then decided by
    tiny fixed margins: every input routed to the same experts. The entropy term asks each input to commit while
    the other two keep the average balanced (together: high mutual information between input and expert). The
    runs that showed both failures: docs/moe.md, "Expert collapse"."""
    P = probs.mean(0)
    cv2 = P.var(unbiased=False) / P.mean().pow(2).clamp_min(1e-12)
    ent = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean() / math.log(max(probs.shape[1], 2))
    return switch_balance_loss(probs, mask) + cv2 + ent


class GateNorm(nn.BatchNorm1d):
    """BatchNorm1d without affine parameters over the gate's input features; a training-mode batch of one (which
    BatchNorm cannot normalise) uses the running statistics instead."""

    def __init__(self, num_features: int):
        super().__init__(num_features, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, None, None, False, 0.0, self.eps)
        return super().forward(x)


def make_gate(cin: int, out: int, hidden: int, norm: str = "bn", bias: bool = False) -> nn.Sequential:
    """The router: [GateNorm(cin)] -> [Linear(cin, hidden) -> ReLU] -> Linear(-, out[, bias]).

    Why the norm and no output bias (docs/moe.md, "Why the gate did not learn"): the gate reads the spatial mean of
    the stem's post-ReLU features, non-negative vectors whose per-input variation is ~25 % of their mean. Through
    PyTorch's default Linear init, the constant part plus the output bias gave logit offsets of 0.1-0.4 between
    experts against an input-dependent spread of 0.01-0.04: at step 0 every input was sent to the same two experts,
    and the Switch term then only levelled the offsets (a tie broken by ~0.005 logits). Standardising each input
    feature removes the constant part (as the LayerNorm before a transformer's router does), and a bias-free output
    layer has no input-independent preference to start from."""
    layers: list[nn.Module] = [GateNorm(cin)] if norm == "bn" else []
    if hidden:
        layers += [nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out, bias=bias)]
    else:
        layers += [nn.Linear(cin, out, bias=bias)]
    return nn.Sequential(*layers)


class MoEClassifier(nn.Module):
    def __init__(self, cfg: MoEModelConfig, in_channels: int, num_classes: int):
        super().__init__()
        self.cfg, self.in_channels, self.num_classes = cfg, in_channels, num_classes
        s, E = cfg.stem_channels, cfg.num_experts
        self.stem = nn.Sequential(_conv(in_channels, s), _conv(s, s, 2))
        self.experts = nn.ModuleList(Expert(s, cfg.expert_channels, cfg.expert_dim, cfg.pool, cfg.expert_stages,
                                           cfg.expert_norm) for _ in range(E))
        self.gate = None
        if cfg.kind != "dense":
            out = cfg.groups + E if cfg.kind == "hier" else E
            self.gate = make_gate(s, out, cfg.gate_hidden, cfg.gate_norm, cfg.gate_bias)
        self.graph = (ExpertGraph(E, cfg.expert_dim, cfg.graph_init, cfg.graph_strength, self_loop=cfg.graph_self_loop,
                                  messages=cfg.graph_messages) if cfg.kind == "graph" else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.expert_dim, num_classes)

    # ---- parts, so the RL gate and the cost model can call them separately ----
    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        return self.stem(x)

    def gate_input(self, z: torch.Tensor) -> torch.Tensor:
        return z.mean(dim=(2, 3))

    def route(self, z: torch.Tensor) -> Routing:
        B, E, k = z.shape[0], self.cfg.num_experts, self.cfg.top_k
        if self.gate is None:
            one = torch.ones(B, 1, device=z.device, dtype=z.dtype)
            return Routing(one, one, one)
        logits = self.gate(self.gate_input(z))
        if self.training and self.cfg.gate_noise > 0:
            logits = logits + self.cfg.gate_noise * torch.randn_like(logits)
        if self.cfg.kind == "hier":
            G = self.cfg.groups
            pg = logits[:, :G].softmax(1)                                        # [B, G]
            pe = logits[:, G:].view(B, G, E // G).softmax(2)                     # [B, G, E/G]
            probs = (pg.unsqueeze(2) * pe).reshape(B, E)
            g = pg.argmax(1)
            in_group = topk_mask(pe[torch.arange(B), g], k)                      # [B, E/G]
            mask = torch.zeros(B, G, E // G, device=z.device, dtype=z.dtype)
            mask[torch.arange(B), g] = in_group
            mask = mask.view(B, E)
            pe_sel = pe.reshape(B, E) * mask
            if k == 1:
                # as for the flat gate: renormalised over a team of one, the in-group weight is the constant 1 and
                # the task loss would not reach the in-group gate: value 1, gradient of p(expert | group)
                inner = pe_sel / pe.reshape(B, E).detach().clamp_min(1e-9)
            else:
                inner = pe_sel / pe_sel.sum(1, keepdim=True).clamp_min(1e-9)
            weights = pg.gather(1, g[:, None]) * inner
            return Routing(probs, mask, weights, logits)
        probs = logits.softmax(1)
        mask = topk_mask(probs, k)
        w = team_weights(probs, mask)
        if k == 1:
            # renormalised over a team of one the weight is the constant 1 and the task loss would not reach the
            # gate at all: value 1, gradient of p (straight-through)
            w = mask * probs / probs.detach().clamp_min(1e-9)
        return Routing(probs, mask, w, logits)

    def expert_outputs(self, z: torch.Tensor, mask: torch.Tensor, path: str = "dense") -> torch.Tensor:
        """[B, E, D]; rows of experts outside an input's team are 0."""
        if path == "dense":
            h = torch.stack([e(z) for e in self.experts], dim=1)
            return h * mask.unsqueeze(-1)
        if path != "sparse":
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        B, E, D = z.shape[0], len(self.experts), self.cfg.expert_dim
        h = z.new_zeros(B, E, D)
        for e, expert in enumerate(self.experts):
            idx = mask[:, e].nonzero().squeeze(1)
            if idx.numel():
                h = h.index_put((idx, torch.full_like(idx, e)), expert(z.index_select(0, idx)))
        return h

    def combine(self, h: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.graph is not None:
            h = self.graph(h, routing.mask)
        y = (routing.weights.unsqueeze(-1) * h).sum(1)
        return self.head(self.drop(y))

    def forward(self, x: torch.Tensor, path: str = "dense", mask: torch.Tensor | None = None) -> MoEOutput:
        """MASK (optional, [B, E]) replaces the gate's top-k team; the team is then weighted by the gate's
        probabilities restricted to it."""
        z = self.features(x)
        r = self.route(z)
        if mask is not None:
            if mask.shape != r.probs.shape:
                raise ValueError(f"mask must have shape {tuple(r.probs.shape)}, got {tuple(mask.shape)}")
            r = Routing(r.probs, mask.to(r.probs.dtype), team_weights(r.probs, mask.to(r.probs.dtype)), r.logits)
        logits = self.combine(self.expert_outputs(z, r.mask, path), r)
        if self.gate is None:
            zero = logits.new_zeros(())
            return MoEOutput(logits, r, zero, zero, zero)
        return MoEOutput(logits, r, balance_loss(r.probs, r.mask), switch_balance_loss(r.probs, r.mask),
                         router_z_loss(r.logits))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """'gate' (gate and graph: trained conservatively) and 'experts' (stem, experts, head)."""
        gate = [p for m in (self.gate, self.graph) if m is not None for p in m.parameters()]
        ids = {id(p) for p in gate}
        return {"gate": gate, "experts": [p for p in self.parameters() if id(p) not in ids]}


class DenseLogits(nn.Module):
    """The model as torch.export / ONNX see it: logits through the dense masked path (no data-dependent control
    flow, a plain tensor out)."""

    def __init__(self, model: MoEClassifier):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, path="dense").logits
