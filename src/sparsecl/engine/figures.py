"""The accuracy-matrix heatmap, drawn by the loggers after each task and by ``sparsecl report
--plots`` over finished runs (one drawing for both). Figures are built with matplotlib's object
API, without pyplot, so logging never touches the user's backend or pyplot's figure list."""
from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure


def draw_accuracy_matrix(ax: Any, matrix: Any, title: str) -> Any:
    """Draw ``matrix`` (percent; row i = after training task i, column j = evaluated task j; NaN
    for rows not trained yet, left blank) on ``ax`` with each cell's value; returns the image."""
    R = np.asarray(matrix, dtype=float)
    T = R.shape[0]
    im = ax.imshow(np.ma.masked_invalid(R), vmin=0, vmax=100, cmap="viridis")
    for i in range(T):
        for j in range(R.shape[1]):
            if np.isfinite(R[i, j]):
                ax.text(j, i, f"{R[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if R[i, j] < 60 else "black")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training task")
    ax.set_xticks(range(R.shape[1]), [str(t + 1) for t in range(R.shape[1])])
    ax.set_yticks(range(T), [str(t + 1) for t in range(T)])
    return im


def accuracy_matrix_figure(matrix: list[list[float | None]], title: str) -> Figure:
    """A one-panel figure of a run's accuracy matrix so far (``None`` = not evaluated yet)."""
    R = np.array([[np.nan if a is None else a for a in row] for row in matrix], dtype=float)
    fig = Figure(figsize=(4.2, 3.6))
    # Fixed panel and colour-bar boxes: a layout engine would cost more than drawing the matrix.
    im = draw_accuracy_matrix(fig.add_axes((0.13, 0.14, 0.66, 0.76)), R, title)
    fig.colorbar(im, cax=fig.add_axes((0.8, 0.14, 0.035, 0.76)), label="accuracy (%)")
    return fig
