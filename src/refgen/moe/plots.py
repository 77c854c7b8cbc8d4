"""The evaluation's and compression's PNGs (matplotlib, Agg backend, written atomically): accuracy vs severity per
corruption, reliability diagrams before / after temperature scaling, and accuracy vs artifact size."""

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
