"""The embedded dataset: scikit-learn's handwritten digits (shipped inside scikit-learn, offline).

1797 grey 8x8 images with values 0..16, classes 0-9. fastdiff upsamples them (bilinear) to 16x16
and scales them to [-1, 1]. The train/test split is fixed (stratified, seed 0, 20% test), so the
embedded model, the FD feature network and the REPA teacher all agree on which images they saw.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
SPLITS = ("train", "test", "all")


@lru_cache(maxsize=4)
def _split_indices(test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    labels = load_digits().target
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(split: str = "train", size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as ``(images [N, 1, size, size] float32 in [-1, 1], labels [N] int64)``.

    Args:
        split: ``"train"`` (1438 images), ``"test"`` (359) or ``"all"`` (1797).
        size: output side length; 8 keeps the original resolution.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    from sklearn.datasets import load_digits as _sk_load

    raw = _sk_load()
    images = torch.from_numpy(raw.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    labels = torch.from_numpy(raw.target.astype(np.int64))
    if split != "all":
        train, test = _split_indices()
        keep = torch.from_numpy(train if split == "train" else test)
        images, labels = images[keep], labels[keep]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, labels
