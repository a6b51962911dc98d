"""Matplotlib figures of the benchmarks (written as PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _save(fig, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(histories: dict, path) -> None:
    """Test accuracy and train/test loss against epochs and against wall time, per optimizer."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        wall = [h["wall_time_s"] for h in history]
        for col, xs in enumerate((epochs, wall)):
            line, = axes[0, col].plot(xs, [100 * h["test_acc"] for h in history], marker=".", label=name)
            axes[1, col].plot(xs, [h["train_loss"] for h in history], color=line.get_color(),
                              label=f"{name} train")
            axes[1, col].plot(xs, [h["test_loss"] for h in history], color=line.get_color(),
                              linestyle="--", label=f"{name} test")
    for col, xlabel in enumerate(("epoch", "wall time [s]")):
        axes[0, col].set(xlabel=xlabel, ylabel="test accuracy [%]")
        axes[1, col].set(xlabel=xlabel, ylabel="loss", yscale="log")
        axes[0, col].legend(fontsize=8)
        axes[1, col].legend(fontsize=8)
    _save(fig, path)


def plot_bars(panels: list, labels: list, path, title: str = "", log: bool = False,
              columns: int = 3) -> None:
    """Horizontal bar charts on a grid; each panel is (xlabel, values, reference line or None)."""
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, rows * (0.3 * len(labels) + 1.2) + 0.6),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for i, (ax, (xlabel, values, reference)) in enumerate(zip(axes.flat, panels)):
        ax.barh(range(len(labels)), values, color="tab:blue")
        ax.set_yticks(range(len(labels)), labels if i % cols == 0 else [""] * len(labels), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel, fontsize=9)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only
        if reference is not None:
            ax.axvline(reference, color="black", linewidth=0.8, linestyle="--")
        for j, v in enumerate(values):
            if v > 0:
                ax.text(v, j, f" {v:.3g}", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)
