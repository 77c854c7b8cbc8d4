"""Structured (channel) pruning with torch-pruning's dependency graph, raised in steps with fine-tuning between.

Why structured: unstructured magnitude pruning leaves dense tensors the same size, so it saves no artifact bytes
(spec §7.10: at int8 even a bitmask costs 0.825 of dense at 30 % sparsity). Removing whole channels shrinks every
file and the FLOPs too.

What is never pruned (ignored layers): the gate, the expert graph, the head, and the last Linear of every expert,
whose output width (expert_dim) the graph and the combination need equal across experts. Their *input* channels
follow the pruned convolutions through the dependency graph (e.g. the gate's first Linear loses the inputs of
pruned stem channels).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn


def ignored_layers(deployable: nn.Module, experts_only: bool = False) -> list[nn.Module]:
    """EXPERTS_ONLY (the spec's "experts-only pruned" ablation) keeps the stem's convolutions too, so only the
    experts' channels go."""
    m = deployable.model
    keep = [m.head] + [e[-2] for e in m.experts]  # Expert = (..., Linear, ReLU)
    if experts_only:
        keep += [c for c in m.stem.modules() if isinstance(c, nn.Conv2d)]
    return keep + [x for x in (m.gate, m.graph) if x is not None]


def _loose_params(deployable: nn.Module) -> list[nn.Parameter]:
    owned = {id(p) for m in deployable.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d))
             for p in m.parameters(recurse=False)}
    return [p for p in deployable.parameters() if id(p) not in owned]


def _fix_flatten_mappings(dg) -> int:
    """Flatten (conv C x p x p -> Linear C*p*p) index mappings that torch-pruning 1.6 skips on torch 2.x.

    Its `update_reshape_index_mapping` reads the 4-D input size from `grad_fn._saved_self_sizes`, which torch 2.x
    names `_saved_self_sym_sizes`; without it, it falls back to a legacy flag that any Linear with a 3-D output
    (here the expert graph's mixing) turns off, and then maps a pruned channel to ONE input of the expert's Linear
    instead of p*p (an MNIST expert with pool 2 failed: "mat1 and mat2 shapes cannot be multiplied (64x108 and
    123x96)"). This runs the library's own mapping for every reshape whose input is [B, C, H, W] and whose consumer
    takes C*H*W features. Returns how many reshapes it mapped."""
    from torch_pruning import ops
    from torch_pruning.dependency import index_mapping, shape_infer

    fixed, flag = 0, dg._2d_4d
    try:
        for node in list(dg.module2node.values()):
            if node.type != ops.OPTYPE.RESHAPE:
                continue
            size = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
            if size is None or len(size) != 4 or hasattr(node.grad_fn, "_saved_self_sizes"):
                continue
            outs = [shape_infer.infer_in_channels_recursively(dg, n, [0]) for n in node.outputs]
            ins = [shape_infer.infer_out_channels_recursively(dg, n, [0]) for n in node.inputs]
            out_ch = next((c for c in outs if c is not None), None)
            in_ch = next((c for c in ins if c is not None), None)
            if out_ch is None or in_ch is None or in_ch != int(size[1]) or out_ch != int(size[1] * size[2] * size[3]):
                continue
            if out_ch == in_ch:
                continue
            dg._2d_4d = True  # the library's legacy path: infers the stride from the channel counts
            index_mapping.update_reshape_index_mapping(dg, node)
            fixed += 1
    finally:
        dg._2d_4d = flag
    return fixed


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prune_iterative(deployable: nn.Module, ratio: float, steps: int, example: torch.Tensor, after_step=None,
                    experts_only: bool = False) -> list[dict]:
    """Prune DEPLOYABLE in place to RATIO of its prunable channels removed, in STEPS equal steps (torch-pruning's
    iterative schedule, L2-magnitude importance per channel group); AFTER_STEP(step) runs after each (the
    fine-tuning) and may return a dict merged into that step's record. EXPERTS_ONLY leaves the stem's channels.
    Returns one record per step."""
    import torch_pruning as tp

    if not 0 < ratio < 1:
        raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}")
    if steps < 1:
        raise ValueError(f"pruning steps must be >= 1, got {steps}")
    deployable.eval()
    n0 = num_params(deployable)
    loose = _loose_params(deployable)
    with warnings.catch_warnings():
        # torch-pruning warns about parameters outside a layer (the graph's E x E edge matrix); they are in no
        # channel group with the convolutions, and the test checks they keep their shape
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(deployable, example, importance=tp.importance.MagnitudeImportance(p=2),
                                      iterative_steps=steps, pruning_ratio=ratio,
                                      ignored_layers=ignored_layers(deployable, experts_only),
                                      output_transform=lambda out: out[0].sum() + out[1].sum())
    _fix_flatten_mappings(pruner.DG)
    shapes = [p.shape for p in loose]
    recs = []
    for s in range(steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner.step()
        if [p.shape for p in loose] != shapes:
            raise RuntimeError("torch-pruning changed a parameter outside the layers (the expert graph's edges)")
        rec = {"step": s + 1, "params": num_params(deployable), "params_kept": num_params(deployable) / n0}
        if after_step is not None:
            rec.update(after_step(s + 1) or {})
        recs.append(rec)
    return recs
