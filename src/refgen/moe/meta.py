"""The plateau heuristic, gate and experts in separate optimizer parameter groups.

Halving the LR when the validation loss stagnated for `plateau_epochs` epochs is torch's
ReduceLROnPlateau(factor=0.5); this wraps it instead of re-implementing it. One catch, tested: torch reduces when
the number of bad epochs *exceeds* `patience`, so patience=3 halves on the 4th stagnant epoch. To halve after
exactly `plateau_epochs` stagnant epochs the wrapper passes patience = plateau_epochs - 1.

Gate and graph parameters get their own group with a smaller LR (a conservative gate, aggressive experts);
each epoch's LR and weight decay per group go to the JSONL log (the timeline).
"""

from __future__ import annotations

import torch


def make_optimizer(model, lr: float, gate_lr_scale: float = 0.5, weight_decay: float = 1e-4,
                   gate_weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with param groups 'experts' (LR) and 'gate' (LR x GATE_LR_SCALE); no decay on the gate: L1 on the
    graph edges is its regulariser."""
    groups = model.param_groups()
    pg = [{"params": groups["experts"], "lr": lr, "weight_decay": weight_decay, "name": "experts"}]
    if groups["gate"]:
        pg.append({"params": groups["gate"], "lr": lr * gate_lr_scale, "weight_decay": gate_weight_decay,
                   "name": "gate"})
    return torch.optim.AdamW(pg)


class PlateauController:
    def __init__(self, optimizer: torch.optim.Optimizer, plateau_epochs: int = 3, factor: float = 0.5,
                 min_lr: float = 1e-6, threshold: float = 1e-4, logger=None):
        if plateau_epochs < 1:
            raise ValueError(f"plateau_epochs must be >= 1, got {plateau_epochs}")
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        self.optimizer, self.logger = optimizer, logger
        self.plateau_epochs = plateau_epochs
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=factor, patience=plateau_epochs - 1, threshold=threshold, min_lr=min_lr)
        self.timeline: list[dict] = []

    def hparams(self) -> dict:
        return {g.get("name", str(i)): {"lr": g["lr"], "weight_decay": g["weight_decay"]}
                for i, g in enumerate(self.optimizer.param_groups)}

    def step(self, val_loss: float, epoch: int) -> dict:
        """Call once per epoch with the validation loss; returns (and logs) this epoch's timeline entry."""
        before = {k: v["lr"] for k, v in self.hparams().items()}
        self.scheduler.step(val_loss)
        rec = {"kind": "hparams", "epoch": epoch, "val_loss": float(val_loss), "groups": self.hparams(),
               "bad_epochs": int(self.scheduler.num_bad_epochs),
               "reduced": any(self.hparams()[k]["lr"] < before[k] for k in before)}
        self.timeline.append(rec)
        if self.logger is not None:
            self.logger.log(**rec)
        return rec

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "timeline": list(self.timeline),
                "plateau_epochs": self.plateau_epochs}

    def load_state_dict(self, d: dict) -> None:
        self.scheduler.load_state_dict(d["scheduler"])
        self.timeline = list(d["timeline"])
        self.plateau_epochs = d["plateau_epochs"]
