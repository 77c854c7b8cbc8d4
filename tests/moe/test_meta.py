import torch

from refgen.artifacts import JsonlLogger, read_jsonl
from refgen.moe.meta import PlateauController, make_optimizer
from refgen.moe.model import MoEClassifier, MoEModelConfig

from .conftest import TINY_MODEL


def _opt():
    m = MoEClassifier(MoEModelConfig(**TINY_MODEL, kind="graph"), 1, 10)
    return m, make_optimizer(m, lr=1e-2, gate_lr_scale=0.1, weight_decay=1e-4)


def test_gate_and_experts_have_their_own_groups():
    m, opt = _opt()
    g = {pg["name"]: pg for pg in opt.param_groups}
    assert g["experts"]["lr"] == 1e-2 and g["gate"]["lr"] == 1e-3
    assert g["experts"]["weight_decay"] == 1e-4 and g["gate"]["weight_decay"] == 0.0
    assert sum(len(pg["params"]) for pg in opt.param_groups) == len(list(m.parameters()))


def test_lr_halves_after_exactly_three_stagnant_epochs(tmp_path):
    _, opt = _opt()
    pc = PlateauController(opt, plateau_epochs=3, logger=JsonlLogger(tmp_path / "m.jsonl"))
    losses = [1.0, 0.9, 0.95, 0.93, 0.92, 0.91, 0.99, 0.98]
    lrs = [pc.step(v, e)["groups"]["experts"]["lr"] for e, v in enumerate(losses)]
    # best 0.9 at epoch 1; epochs 2, 3, 4 stagnate -> halved at the end of epoch 4, then 3 more -> epoch 7
    assert lrs == [1e-2] * 4 + [5e-3] * 3 + [2.5e-3]
    recs = read_jsonl(tmp_path / "m.jsonl")
    assert [r["reduced"] for r in recs] == [False] * 4 + [True, False, False, True]
    assert recs[4]["groups"]["gate"]["lr"] == 5e-4  # both groups halve


def test_torch_patience_3_would_wait_a_fourth_epoch():
    """Why the wrapper passes patience = plateau_epochs - 1: torch reduces when bad epochs *exceed* patience."""
    _, opt = _opt()
    s = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=3)
    lrs = []
    for v in [1.0, 0.9, 0.95, 0.93, 0.92, 0.91]:
        s.step(v)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1e-2] * 5 + [5e-3]


def test_state_round_trip_continues_identically():
    _, opt = _opt()
    a = PlateauController(opt, 3)
    for e, v in enumerate([1.0, 0.9, 0.95]):
        a.step(v, e)
    _, opt2 = _opt()
    b = PlateauController(opt2, 3)
    b.load_state_dict(a.state_dict())
    opt2.load_state_dict(opt.state_dict())
    ra, rb = a.step(0.96, 3), b.step(0.96, 3)
    assert ra == rb and a.step(0.97, 4) == b.step(0.97, 4) and a.timeline == b.timeline
