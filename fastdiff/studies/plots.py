"""Figures of the notebooks: sample grids (rows x columns of image strips) and saving a figure to disk."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def image_strip(images: torch.Tensor | np.ndarray, count: int = 10) -> np.ndarray:
    """The first ``count`` images ``[N, C, H, W]`` (values in [0, 1]) side by side: ``[H, count W]`` for one
    channel, ``[H, count W, 3]`` for RGB."""
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got shape {tuple(x.shape)}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    strip = torch.cat(list(x[:count].clamp(0, 1)), dim=-1).permute(1, 2, 0).numpy()  # [H, count W, C]
    return strip[..., 0] if strip.shape[-1] == 1 else strip


def sample_grid(images: Mapping[tuple[Any, Any], torch.Tensor | np.ndarray], count: int = 10,
                title: str | None = None, cell_width: float = 3.2):
    """A figure with one image strip per ``(row, column)`` key of ``images``.

    Rows and columns are labelled by the keys' parts, in the order they first appear; a missing cell stays
    blank. Returns the matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    if not isinstance(images, Mapping) or not images:
        raise ValueError("images must be a non-empty mapping {(row, column): images}")
    rows = list(dict.fromkeys(k[0] for k in images))
    cols = list(dict.fromkeys(k[1] for k in images))
    label_width = 0.08 * max(len(str(r)) for r in rows) + 0.3
    height = len(rows) * (cell_width / count + 0.22) + (0.5 if title else 0.3)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(cell_width * len(cols) + label_width, height),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if i == 0:
                ax.set_title(str(col), fontsize=9)
            if j == 0:
                ax.set_ylabel(str(row), fontsize=8, rotation=0, ha="right", va="center")
            if (row, col) in images:
                strip = image_strip(images[(row, col)], count)
                ax.imshow(strip, cmap="gray" if strip.ndim == 2 else None, vmin=0, vmax=1)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` as ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
