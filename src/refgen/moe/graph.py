"""The expert graph: a learnable E x E adjacency over experts that lets the experts of a team exchange
their features before the gate combines them.

Why raw non-negative edges and not a softmax over edges with an L1 on them: every row of softmax(A) sums to 1, so
its L1 norm is the constant E and the L1 term has zero gradient, and softmax never gives an exact zero, so the
edges could never become sparse. Here the edges are W projected onto W >= 0 (the proximal step clamps them), an
edge pulled to zero is exactly zero, and rows are normalised by their sum *within the team the gate selected*.

An edge at zero still receives its gradient (the forward clamps the value, the gradient passes straight
through), so the task can bring it back; with relu(W) an edge the L1 pushed to 0 would be dead for good
(docs/moe.md, "Why the gate did not learn").

The L1 term is applied as a proximal step (`prox_l1`: soft-thresholding + projection onto W >= 0 after each
optimizer step, i.e. projected proximal gradient), not added to the loss: Adam divides every gradient by its own
running scale, so an L1 subgradient that dominates an edge's gradient moves that edge by the full learning rate
whatever its coefficient (docs/moe.md, "Graph L1"). The threshold is taken in Adam's own metric (train.py,
`graph_prox_threshold`: lr x graph_l1 / (sqrt(v_hat) + eps) per edge, as ProxGen / proximal Adam do), so graph_l1
is an L1 coefficient in loss units and the fixed points are those of loss + graph_l1 x (sum of off-diagonal
edges), whatever the number of steps. A threshold of lr x graph_l1 in absolute units would instead drift every
edge whose gradient's mean is below graph_l1 x its RMS to zero, more so the longer the run (docs/moe.md, "Why
the graph emptied over 30 epochs").

Two more choices make the edges mean something (`self_loop`, `messages`; checkpoints written before carry
"learned" / "team"):
- self_loop "fixed": the diagonal is the constant 1 and an off-diagonal edge is the weight of expert j's message
  relative to expert i's own. With a learnable diagonal the row normalisation makes every row scale-free, so an
  L1 on the raw edges can always be lowered by shrinking the whole row (it has no minimiser).
- messages "neighbours": m_i mixes only the *other* team members (the self weight stays in the normaliser), so
  A = I switches the message off. With "team", m_i = sum_j A_ij h_j includes h_i at a large weight, the block is
  mostly a per-expert MLP on h_i, and the edges only nudge a convex mix: their gradient is near-zero-mean noise.

Message passing (one GraphConv-like step on the team's expert vectors h_j, j in S):
    m_i  = sum_{j in S, j != i} A_ij h_j / sum_{j in S} A_ij        (messages "team": j = i included)
    h'_i = h_i + strength * relu(W m_i)
With A = I, m_i = 0 ("neighbours") or h_i ("team"); off-diagonal sparsity is what is measured.

Instead of an L1 coefficient the sparsity can be stated as such (train.py, `graph_target_sparsity`): the smallest
off-diagonal edges are pruned by magnitude on a gradual schedule to that share of the edges (`prune_smallest`),
pruned edges stay 0 and the others keep training.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-6
SELF_LOOPS = ("fixed", "learned")
MESSAGES = ("neighbours", "team")


class ExpertGraph(nn.Module):
    def __init__(self, num_experts: int, dim: int, init: str = "identity", strength: float = 1.0,
                 generator: torch.Generator | None = None, self_loop: str = "fixed", messages: str = "neighbours"):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if init not in ("identity", "random"):
            raise ValueError(f"graph init must be 'identity' or 'random', got {init!r}")
        if self_loop not in SELF_LOOPS:
            raise ValueError(f"graph self_loop must be one of {SELF_LOOPS}, got {self_loop!r}")
        if messages not in MESSAGES:
            raise ValueError(f"graph messages must be one of {MESSAGES}, got {messages!r}")
        self.self_loop, self.messages = self_loop, messages
        E = num_experts
        # identity: off-diagonal edges start small but positive, so every team mixes a little from step 0
        off = 0.05 if init == "identity" else 0.5
        w = torch.full((E, E), off) + 0.05 * torch.rand(E, E, generator=generator)
        w.fill_diagonal_(1.0)
        self.weight = nn.Parameter(w)
        self.msg = nn.Linear(dim, dim)
        self.strength = float(strength)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def adjacency(self) -> torch.Tensor:
        """Raw non-negative edges max(W, 0), [E, E]; the gradient passes to W whatever its sign (straight-through),
        so an edge at zero can grow back when the task asks for it. self_loop "fixed": the diagonal is 1."""
        w = self.weight
        a = w + (w.clamp_min(0.0) - w).detach()
        if self.self_loop == "fixed":
            eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
            a = a * (1 - eye) + eye
        return a

    def normalized(self) -> torch.Tensor:
        """Row-normalised adjacency over all experts (what the graph looks like when every expert is active)."""
        a = self.adjacency()
        return a / a.sum(dim=1, keepdim=True).clamp_min(EPS)

    def l1(self) -> torch.Tensor:
        """L1 of the raw off-diagonal edges: the sparsity penalty."""
        a = self.adjacency()
        return (a - torch.diag_embed(torch.diagonal(a))).sum()

    @torch.no_grad()
    def prox_l1(self, step: float | torch.Tensor) -> None:
        """The proximal operator of STEP x L1 on the off-diagonal edges under W >= 0: off-diagonal W becomes
        max(W - STEP, 0), the diagonal max(W, 0). STEP is a number or an [E, E] tensor of per-edge thresholds
        (Adam's metric: train.graph_prox_threshold)."""
        w = self.weight
        step = torch.as_tensor(step, dtype=w.dtype, device=w.device)
        if not bool(torch.isfinite(step).all()) or bool((step < 0).any()):
            raise ValueError(f"prox step must be finite and >= 0, got {step}")
        off = ~torch.eye(w.shape[0], dtype=torch.bool, device=w.device)
        w.sub_(step * off.to(w.dtype)).clamp_(min=0.0)

    @torch.no_grad()
    def prune_smallest(self, pruned: torch.Tensor, count: int) -> torch.Tensor:
        """Magnitude pruning of the off-diagonal edges: PRUNED ([E, E] bool, the edges pruned so far, which stay
        pruned) grows by the smallest remaining edges until COUNT are pruned, and every pruned weight is set to 0.
        An edge's magnitude is its weight relative to its row's self weight (the raw edge when self_loop is
        "fixed"), i.e. the weight of that neighbour's message in a team of two. Returns the new mask."""
        a = self.adjacency()
        rel = a / a.diagonal().clamp_min(EPS).unsqueeze(1)
        off = ~torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
        if not 0 <= count <= int(off.sum()):
            raise ValueError(f"count must be in 0..{int(off.sum())} off-diagonal edges, got {count}")
        pruned = pruned & off
        extra = count - int(pruned.sum())
        if extra > 0:  # ties broken by the edge's index (torch.sort is stable)
            alive = torch.nonzero((off & ~pruned).flatten()).squeeze(1)
            order = torch.sort(rel.flatten()[alive], stable=True).indices
            pruned.view(-1)[alive[order[:extra]]] = True
        self.weight.masked_fill_(pruned, 0.0)
        return pruned

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h [B, E, D] expert vectors (anything where mask is 0), mask [B, E] in {0, 1} -> h' [B, E, D] (rows of
        unselected experts are 0)."""
        a = self.adjacency()
        m = mask.to(h.dtype)
        team = a.unsqueeze(0) * m.unsqueeze(2) * m.unsqueeze(1)          # [B, E, E]: edges inside the team
        team = team / team.sum(dim=2, keepdim=True).clamp_min(EPS)
        if self.messages == "neighbours":  # the self weight stays in the normaliser, its message is dropped
            team = team * (1 - torch.eye(a.shape[0], dtype=team.dtype, device=team.device))
        hm = h * m.unsqueeze(-1)
        msg = torch.einsum("bij,bjd->bid", team, hm)
        return (hm + self.strength * F.relu(self.msg(msg))) * m.unsqueeze(-1)


@torch.no_grad()
def graph_stats(graph: ExpertGraph, rel_threshold: float = 0.01) -> dict:
    """Off-diagonal sparsity (share of off-diagonal edges below REL_THRESHOLD x their row's largest edge), the
    Frobenius distance of the row-normalised adjacency from the identity, and the matrices themselves."""
    a = graph.adjacency().detach().float().cpu()
    E = a.shape[0]
    off = ~torch.eye(E, dtype=torch.bool)
    row_max = a.max(dim=1, keepdim=True).values
    small = (a < rel_threshold * row_max) & off
    n = graph.normalized().detach().float().cpu()
    return {"sparsity": float(small.sum() / off.sum()) if E > 1 else 0.0,
            "dist_from_identity": float(torch.linalg.matrix_norm(n - torch.eye(E))),
            "threshold": rel_threshold, "adjacency": a.tolist(), "normalized": n.tolist()}
