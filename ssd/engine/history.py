"""A training's history, one row per epoch: the CSV (``train_history.csv``) and the curve figure."""
from __future__ import annotations

import csv
import io

HISTORY_COLUMNS = ["epoch", "loss", "class_err", "bbox_mae", "examples_per_sec"]


def history_csv(history: list[dict[str, float]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def curve_figure(history: list[dict[str, float]], epochs: int):
    """The seed's training picture: class error and bbox MAE per epoch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.add_subplot()
    x = [h["epoch"] for h in history]
    ax.plot(x, [h["class_err"] for h in history], label="class error")
    ax.plot(x, [h["bbox_mae"] for h in history], "m--", label="bbox mae")
    ax.set_xlabel("epoch")
    ax.set_xlim(1, max(epochs, 2))
    ax.grid(True)
    ax.legend()
    fig.tight_layout()
    return fig
