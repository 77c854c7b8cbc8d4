"""The evaluation's, compression's and acceptance report's PNGs (matplotlib, Agg backend, written atomically):
accuracy vs severity per corruption, reliability diagrams before / after temperature scaling, accuracy vs artifact
size, expert-graph edge heatmaps and cost vs accuracy per run."""

from __future__ import annotations

from pathlib import Path


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    from refgen.artifacts import atomic_write_file

    atomic_write_file(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def robustness_curves(rows: list[dict], corruptions, severities, path: Path) -> None:
    """One panel per corruption: accuracy (mean over seeds) vs severity, one line per setup, clean at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(corruptions)
    cols = min(4, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.2 * cols, 2.8 * ((n + cols - 1) // cols)),
                             squeeze=False, sharey=True)
    for ax, c in zip(axes.flat, corruptions):
        for r in rows:
            xs = [0] + [s for s in severities if f"{c}@{s}" in r["acc_by_split"]]
            ys = [r["acc"]] + [r["acc_by_split"][f"{c}@{s}"] for s in xs[1:]]
            ax.plot(xs, [100 * y for y in ys], marker="o", label=r["setup"])
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("severity (0 = clean)")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy %")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    _save(fig, path)


def reliability_diagram(records: list[dict], path: Path) -> None:
    """Per setup (clean split, first seed): accuracy vs confidence per bin, before and after temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(records), 1), figsize=(3.4 * max(len(records), 1), 3.2), squeeze=False)
    for ax, r in zip(axes.flat, records):
        for key, label in (("reliability", f"raw (ECE {r['ece']:.3f})"),
                           ("reliability_ts", f"T={r['temperature']:.2f} (ECE {r['ece_ts']:.3f})")):
            b = r[key]
            pts = [(c, a) for c, a in zip(b["confidence"], b["accuracy"]) if c is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_title(r["setup"], fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7)
    _save(fig, path)


def accuracy_vs_size(points: list[dict], budget: int, path: Path) -> None:
    """`refgen moe compress`: test accuracy vs artifact bytes, one labelled point per variant ({'label', 'bytes',
    'acc'}; the first is the float reference, drawn as a dotted line too), the byte budget as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, p in enumerate(points):
        ax.scatter(p["bytes"], 100 * p["acc"], s=30, marker="*" if i == 0 else "o", zorder=3)
        ax.annotate(p["label"], (p["bytes"], 100 * p["acc"]), fontsize=7, xytext=(4, 3 - 9 * (i % 2)),
                    textcoords="offset points")
    if points:
        ax.axhline(100 * points[0]["acc"], color="grey", ls=":", lw=0.8)
    ax.axvline(budget, color="red", ls="--", lw=1, label=f"budget {budget:,} B")
    ax.set_xscale("log")
    ax.set_xlabel("artifact bytes (every file, log scale)")
    ax.set_ylabel("test accuracy %")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def edge_heatmaps(panels: list[dict], path: Path, threshold: float = 0.01, cols: int = 4) -> list[list[list[float]]]:
    """Small multiple of expert-graph adjacencies ({'title', 'adjacency' [E][E] raw edges, 'experts' the expert
    ids of the rows/columns}); row i = the receiving expert, column j = the sender (m_i = sum_j A_ij h_j). The
    diagonal is grey: with self_loop "fixed" it is the constant 1 and only scales the off-diagonal edges, and on
    one colour scale it would wash them out. One colour scale for every panel (0 .. the largest off-diagonal
    edge), so snapshots over epochs compare. Edges below THRESHOLD x their row's largest are printed as '.' (what
    the sparsity counts as zero). Returns the matrices drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not panels:
        raise ValueError(f"edge_heatmaps({path}): no adjacency to draw")
    mats = [np.asarray(p["adjacency"], dtype=float) for p in panels]
    for p, a in zip(panels, mats):
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"edge_heatmaps({path}): panel {p['title']!r} is not a square matrix: shape {a.shape}")
    off = [a[~np.eye(len(a), dtype=bool)] for a in mats]
    vmax = max([float(o.max()) for o in off if o.size] + [1e-12])
    cols = min(cols, len(panels))
    rows = (len(panels) + cols - 1) // cols
    E = max(len(a) for a in mats)
    side = 0.42 * E + 0.9
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 0.8, side * rows), squeeze=False)
    im = None
    for ax, p, a in zip(axes.flat, panels, mats):
        n = len(a)
        diag = np.eye(n, dtype=bool)
        im = ax.imshow(np.ma.masked_where(diag, a), cmap="viridis", vmin=0, vmax=vmax)
        ax.imshow(np.ma.masked_where(~diag, np.ones_like(a)), cmap="Greys", vmin=0, vmax=3)
        row_max = a.max(axis=1, keepdims=True)
        for i in range(n):
            for j in range(n):
                if i == j:
                    txt, colour = "1", "black"
                elif a[i, j] < threshold * row_max[i, 0]:
                    txt, colour = ".", "white"
                else:
                    txt, colour = f"{a[i, j]:.2f}", "white" if a[i, j] < 0.6 * vmax else "black"
                ax.text(j, i, txt, ha="center", va="center", fontsize=6, color=colour)
        ids = [str(e) for e in p.get("experts", range(n))]
        ax.set_xticks(range(n), ids, fontsize=6)
        ax.set_yticks(range(n), ids, fontsize=6)
        ax.set_title(p["title"], fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("to expert i", fontsize=7)
    for ax in axes[-1, :]:
        ax.set_xlabel("from expert j", fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="edge A_ij (diagonal fixed)")
    _save(fig, path)
    return [a.tolist() for a in mats]


KIND_MARKERS = {"graph": "o", "flat": "s", "graph_k1": "v", "graph_k3": "^", "dense_flops": "D", "dense_bytes": "P"}


def cost_accuracy(runs: list[dict], path: Path, rl: dict | None = None) -> dict:
    """Per run ({'variant', 'seed', 'acc', 'flops' active FLOPs/image, 'bytes' stored}): test accuracy vs active
    MFLOP/image and vs stored bytes, marker by variant, colour by seed. With RL (rl.json's content) a third panel:
    the greedy RL gate per lambda (the Pareto front drawn as a step line), the random gate of equal expected cost
    at each lambda, and the static top-k gates of the same model. Returns the number of points drawn per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError(f"cost_accuracy({path}): no run to draw")
    # numeric seeds in numeric order; a run folder without _s<seed> has seed '-'
    seeds = sorted({r["seed"] for r in runs}, key=lambda s: (isinstance(s, str), s if isinstance(s, int) else 0))
    colour = {s: plt.cm.tab10(i % 10) for i, s in enumerate(seeds)}
    fig, axes = plt.subplots(1, 3 if rl else 2, figsize=(5.0 * (3 if rl else 2), 4.0), squeeze=False)
    axes = axes[0]
    fig.subplots_adjust(wspace=0.3)
    drawn = {}
    for ax, key, xlabel, scale in ((axes[0], "flops", "active MFLOP / image", 1e-6),
                                   (axes[1], "bytes", "stored kB (fp32 weights)", 1e-3)):
        for r in runs:
            ax.scatter(r[key] * scale, 100 * r["acc"], marker=KIND_MARKERS.get(r["variant"], "x"),
                       color=colour[r["seed"]], s=40, alpha=0.75, edgecolors="black", linewidths=0.4, zorder=3)
        drawn[key] = sum(len(c.get_offsets()) for c in ax.collections)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
    # the legend says marker = variant and colour = seed with proxies, not once per point
    handles = [plt.Line2D([], [], ls="", marker=KIND_MARKERS.get(v, "x"), color="grey", label=v)
               for v in sorted({r["variant"] for r in runs}, key=lambda v: (list(KIND_MARKERS) + [v]).index(v))]
    handles += [plt.Line2D([], [], ls="", marker="o", color=colour[s], label=f"seed {s}") for s in seeds]
    fig.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 9))
    axes[0].set_title("accuracy vs active compute", fontsize=9)
    axes[1].set_title("accuracy vs stored bytes", fontsize=9)
    if rl:
        ax = axes[2]
        pts = sorted(rl["lambdas"], key=lambda r: r["active_flops_per_image"])
        ax.scatter([r["active_flops_per_image"] / 1e6 for r in pts], [100 * r["acc"] for r in pts], color="C0",
                   zorder=3, label="RL gate (greedy), per lambda")
        at = {}  # lambdas that land on the same point share one label
        for r in pts:
            at.setdefault((r["active_flops_per_image"] / 1e6, 100 * r["acc"]), []).append(f"{r['lam']:g}")
        for k, (xy, lams) in enumerate(at.items()):
            ax.annotate("λ " + ", ".join(lams), xy, fontsize=6, xytext=(3, 3 - 10 * (k % 2)),
                        textcoords="offset points")
        front = [r for r in pts if r.get("on_pareto_front")]
        if front:
            ax.step([r["active_flops_per_image"] / 1e6 for r in front], [100 * r["acc"] for r in front],
                    where="post", color="C0", lw=1, label=f"Pareto front ({len(front)} points)")
        ax.scatter([r["active_flops_per_image"] / 1e6 for r in pts], [100 * r["random_gate_acc"] for r in pts],
                   color="C3", marker="x", zorder=3, label="random gate, equal expected cost")
        st = rl.get("static_topk") or []
        if st:
            ax.scatter([s["active_flops_per_image"] / 1e6 for s in st], [100 * s["acc"] for s in st], color="k",
                       marker="*", s=60, zorder=3, label="static top-k (k = " + ", ".join(str(s["k"]) for s in st)
                       + ")")
        drawn["rl"] = len(pts)
        ax.set_xlabel("active MFLOP / image")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"RL gate, lambda sweep ({rl.get('dataset', '?')})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)
    return drawn
