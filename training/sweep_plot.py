"""The popularity-penalty trade-off of `encore evaluate --sweep`, drawn as a PNG."""

from __future__ import annotations

from pathlib import Path


def plot_sweep(rows: list[dict], path: Path, *, title: str) -> Path:
    """recall@10 against catalog coverage@10, one point per penalty, the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    try:
        coverage = [row["coverage@10"] for row in rows]
        recall = [row["recall@10"] for row in rows]
        axes.plot(coverage, recall, marker="o", color="#3b6ea5")
        for row in rows:
            axes.annotate(
                f"{row['popularity_penalty']:g}",
                (row["coverage@10"], row["recall@10"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        for row in rows:
            if row.get("chosen"):
                axes.scatter(
                    [row["coverage@10"]],
                    [row["recall@10"]],
                    s=140,
                    facecolors="none",
                    edgecolors="#c0392b",
                    linewidths=2,
                    label=f"chosen on the inner split: {row['popularity_penalty']:g}",
                    zorder=3,
                )
        axes.set_xlabel("catalog coverage@10")
        axes.set_ylabel("recall@10")
        axes.set_title(title, fontsize=10)
        axes.grid(alpha=0.3)
        if any(row.get("chosen") for row in rows):
            axes.legend(loc="lower left", fontsize=8)
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
    finally:
        plt.close(figure)
    return path
