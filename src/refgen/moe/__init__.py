"""refgen.moe: a small, energy-aware Mixture-of-Experts image classifier (docs/moe.md).

One concept per module:
    data         offline data sets (pinned wheels, sklearn digits, ToyWorld-27, a user-supplied CIFAR folder)
    corruptions  the 7 CIFAR-10-C-style corruptions with the CIFAR-10-C severity constants
    graph        the learnable expert graph (raw non-negative edges, L1, row normalisation)
    model        stem + experts + flat / hierarchical / graph gates; dense masked and sparse dispatch paths
    cost         FLOPs, bytes, the energy proxy, CostNormalizer
    monitor      timing, memory, NVML energy windows
    routing      the RL gate: a contextual-bandit environment, Gumbel-top-k + REINFORCE, the lambda sweep
    meta         the plateau heuristic (ReduceLROnPlateau) with gate / expert parameter groups
    train        the training loop behind `refgen moe train`
    bench        the measurements behind `refgen moe bench`
"""
