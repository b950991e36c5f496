"""Datasets and a deterministic, resumable batch order.

The global batch of optimisation step ``s`` is a pure function of ``(seed, s)``: the sample stream is the
concatenation of per-epoch permutations, and step ``s`` takes stream items ``[s B, (s + 1) B)``. Process
``r`` of ``W`` takes the ``r``-th contiguous ``B / W`` slice. So resuming at step ``s`` needs no saved
loader state, and ``W`` processes see exactly the single-process global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, TensorDataset

from fastdiff.data import load_digits

DATASETS = ("digits", "image_folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


class ImageFolderDataset(Dataset):
    """Images under ``root`` (recursively) as ``([C, R, R] in [-1, 1], label)``.

    With class subfolders (``root/<class>/*.png``) labels are the sorted subfolder indices; with images
    directly in ``root`` every label is 0. Images are resized (shorter side) and centre-cropped to ``R``.
    """

    def __init__(self, root: str | Path, resolution: int, channels: int = 3) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data.path must be an existing directory of images, got {str(root)!r}")
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3, got {channels}")
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
        self.classes = sorted({p.parent.relative_to(root).as_posix() for p in self.files} - {"."})
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index.get(p.parent.relative_to(root).as_posix(), 0) for p in self.files]
        self.resolution, self.mode = resolution, "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.files[i]) as img:
            img = img.convert(self.mode)
            scale = self.resolution / min(img.size)
            img = img.resize((max(self.resolution, round(img.width * scale)),
                              max(self.resolution, round(img.height * scale))), Image.BICUBIC)
            left, top = (img.width - self.resolution) // 2, (img.height - self.resolution) // 2
            img = img.crop((left, top, left + self.resolution, top + self.resolution))
            array = np.asarray(img, dtype=np.float32) / 127.5 - 1
        x = torch.from_numpy(array)
        return (x[None] if x.ndim == 2 else x.permute(2, 0, 1)).contiguous(), self.labels[i]


def build_dataset(dataset: str, path: str | None = None, split: str = "train", resolution: int = 16,
                  channels: int = 1) -> Dataset:
    """``digits`` (the embedded scikit-learn digits) or ``image_folder`` (``path``)."""
    if dataset == "digits":
        if channels != 1:
            raise ValueError(f"the digits dataset has 1 channel, got data.channels={channels}")
        images, labels = load_digits(split, size=resolution)
        return TensorDataset(images, labels)
    if dataset == "image_folder":
        if path is None:
            raise ValueError("data.path is required for dataset 'image_folder'")
        return ImageFolderDataset(path, resolution, channels)
    raise ValueError(f"data.dataset must be one of {DATASETS}, got {dataset!r}")


@lru_cache(maxsize=4)
def _epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(step: int, global_batch: int, num_samples: int, seed: int) -> torch.Tensor:
    """Dataset indices of the global batch of optimisation ``step`` (``[global_batch]``)."""
    start = step * global_batch
    positions = torch.arange(start, start + global_batch)
    epochs, offsets = positions // num_samples, positions % num_samples
    return torch.stack([_epoch_permutation(num_samples, seed, int(e))[o] for e, o in zip(epochs, offsets)])


class StepBatchSampler(Sampler[list[int]]):
    """This process's slice of the global batch for steps ``start_step .. max_steps - 1``."""

    def __init__(self, num_samples: int, global_batch: int, seed: int, start_step: int, max_steps: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise ValueError(f"train.batch_size ({global_batch}) must be divisible by the number of processes "
                             f"({world_size})")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.start_step, self.max_steps = start_step, max_steps
        self.local = global_batch // world_size
        self.rank = rank

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.max_steps):
            idx = batch_indices(step, self.global_batch, self.num_samples, self.seed)
            yield idx[self.rank * self.local:(self.rank + 1) * self.local].tolist()
