"""Sample-quality metrics: Frechet distance and class accuracy, offline by default.

The Frechet distance between Gaussians fitted to features of real and generated images is FID when the
features are Inception-v3's (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge
to a Local Nash Equilibrium", https://arxiv.org/abs/1706.08500). Both paths run through torchmetrics'
``FrechetInceptionDistance``:

- ``"digits"`` -> **FD-digits**: features of :class:`DigitsFeatureNet`, a small CNN trained on the
  digits training split and shipped in ``fastdiff/models/digits_features`` (recipe and accuracy in its
  ``config.json``; rebuild with ``python -m fastdiff.metrics train --out DIR``). Runs offline.
- ``"inception"`` -> **FID-inception**: the standard torchmetrics FID (2048-d pool features). Needs
  ``torch-fidelity`` and the Inception weights on disk: ``$FASTDIFF_INCEPTION_WEIGHTS`` or torch-fidelity's
  file in the torch hub cache. Never downloads.

Images enter every function as ``[N, 1, 16, 16]`` tensors with an explicit ``value_range`` (diffusers
pipelines give ``(0, 1)``; ``fastdiff.data.load_digits`` gives ``(-1, 1)``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from fastdiff._package import save_network
from fastdiff.data import IMAGE_SIZE, NUM_CLASSES, SPLITS, load_digits

FEATURE_NET_DIR = Path(__file__).parent / "models" / "digits_features"
FEATURES = ("digits", "inception")
METRICS = ("auto", *FEATURES)
METRIC_NAMES = {"digits": "FD-digits", "inception": "FID-inception"}
INCEPTION_WEIGHTS_ENV = "FASTDIFF_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's hub cache name
_BATCH = 512

ValueRange = tuple[float, float]


class DigitsFeatureNet(nn.Module):
    """Small CNN classifier of 16x16 digits; its global-average-pooled last conv layer is the FD feature.

    Inputs are ``[B, 1, 16, 16]`` images in ``value_range`` (default ``(-1, 1)``, the range of
    ``fastdiff.data.load_digits``); pass ``value_range=(0, 1)`` for pipeline outputs.
    """

    def __init__(self, width: int = 16, num_features: int = 64, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.num_features = num_features  # read by torchmetrics instead of a dummy forward pass
        w = width
        self.trunk = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(2 * w, num_features, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: Tensor, value_range: ValueRange = (-1.0, 1.0)) -> Tensor:
        """Penultimate features ``[B, num_features]`` of images ``x`` in ``value_range``."""
        lo, hi = value_range
        return self.trunk((x - lo) * (2.0 / (hi - lo)) - 1.0)

    def forward(self, x: Tensor, value_range: ValueRange = (-1.0, 1.0)) -> Tensor:
        """Class logits ``[B, 10]`` of images ``x`` in ``value_range``."""
        return self.head(self.features(x, value_range))


class _FeatureExtractor(nn.Module):
    """The ``feature`` module torchmetrics' FID expects: float images in [-1, 1] -> ``[N, d]`` features."""

    def __init__(self, net: DigitsFeatureNet) -> None:
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x).double()  # float64 so FD ~ 0 stays ~ 0 after torchmetrics' cast back


# ----------------------------------------------------------------------------------------------------
# loading and training the feature network


@lru_cache(maxsize=8)
def _load_feature_net(device: torch.device) -> DigitsFeatureNet:
    from safetensors.torch import load_file

    config_path, weights_path = FEATURE_NET_DIR / "config.json", FEATURE_NET_DIR / "model.safetensors"
    if not (config_path.exists() and weights_path.exists()):
        raise FileNotFoundError(
            f"digits feature network not found in {FEATURE_NET_DIR}; rebuild it with "
            f"`python -m fastdiff.metrics train --out {FEATURE_NET_DIR}`"
        )
    config = json.loads(config_path.read_text())
    net = DigitsFeatureNet(**config["architecture"])
    net.load_state_dict(load_file(weights_path))
    return net.to(device).eval().requires_grad_(False)


def load_feature_net(device: str | torch.device = "cpu") -> DigitsFeatureNet:
    """The shipped :class:`DigitsFeatureNet` (frozen, eval mode), loaded offline once per device."""
    return _load_feature_net(torch.device(device))


def _augment(x: Tensor, gen: torch.Generator, max_shift: float, max_rotate: float, max_scale: float,
             noise_std: float) -> Tensor:
    """Random shift / rotation / scale (an affine resample) and light Gaussian noise of images in [-1, 1]."""
    b = x.shape[0]
    u = lambda: torch.rand(b, generator=gen) * 2 - 1  # noqa: E731  uniform on [-1, 1]
    angle = u() * math.radians(max_rotate)
    scale = 1 + u() * max_scale
    shift = torch.stack([u(), u()], 1) * (2 * max_shift / x.shape[-1])  # pixels -> grid units
    rot = torch.stack([torch.cos(angle), -torch.sin(angle), torch.sin(angle), torch.cos(angle)], 1)
    theta = torch.cat([(rot / scale[:, None]).view(b, 2, 2), shift[:, :, None]], 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x01 = F.grid_sample((x + 1) / 2, grid, align_corners=False)  # zero padding = black background
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * noise_std
    x01 = x01 + sigma * torch.randn(x.shape, generator=gen)
    return x01.clamp(0, 1) * 2 - 1


@torch.no_grad()
def _accuracy(net: DigitsFeatureNet, images: Tensor, labels: Tensor) -> float:
    return (net(images).argmax(1) == labels).float().mean().item()


def train_feature_net(
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    max_shift: float = 2.0,
    max_rotate: float = 10.0,
    max_scale: float = 0.1,
    noise_std: float = 0.1,
    seed: int = 0,
    width: int = 16,
    num_features: int = 64,
    log: Callable[[str], None] | None = print,
) -> tuple[DigitsFeatureNet, dict]:
    """Train :class:`DigitsFeatureNet` on the digits training split (AdamW, cosine LR, augmentation).

    Returns ``(net, record)``; ``record`` holds the architecture, the recipe and the train/test accuracy
    (the test split is only measured, never used for selection). Seeded; bitwise reproducibility holds
    for a fixed torch version and thread count.
    """
    recipe = dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, max_shift=max_shift,
                  max_rotate=max_rotate, max_scale=max_scale, noise_std=noise_std, seed=seed)
    architecture = dict(width=width, num_features=num_features, num_classes=NUM_CLASSES)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DigitsFeatureNet(**architecture)
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            x = _augment(x_train[idx], gen, max_shift, max_rotate, max_scale, noise_std)
            loss = F.cross_entropy(net(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if log is not None and (epoch + 1) % 5 == 0:
            net.eval()
            log(f"epoch {epoch + 1:3d}  loss {total / len(x_train):.4f}  "
                f"test acc {_accuracy(net, x_test, y_test):.4f}  {time.perf_counter() - t0:.0f}s")
    net.eval().requires_grad_(False)
    record = {
        "architecture": architecture,
        "input": {"shape": [1, IMAGE_SIZE, IMAGE_SIZE], "value_range": [-1.0, 1.0]},
        "features": "global average pool of the last conv layer (after ReLU), before the linear head",
        "data": "fastdiff.data.load_digits: train split (1438 images) for training, test split (359) for accuracy",
        "recipe": {**recipe, "optimizer": "AdamW", "lr_schedule": "OneCycle",
                   "augmentation": "random affine (shift/rotate/scale) + Gaussian noise, sigma ~ U(0, noise_std)",
                   "command": "python -m fastdiff.metrics train --out DIR"},
        "accuracy": {"train": round(_accuracy(net, x_train, y_train), 4),
                     "test": round(_accuracy(net, x_test, y_test), 4)},
        "versions": {"torch": torch.__version__, "threads": torch.get_num_threads()},
        "num_parameters": sum(p.numel() for p in net.parameters()),
    }
    return net, record


def save_feature_net(net: DigitsFeatureNet, record: dict, out: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (``record``) into directory ``out``."""
    return save_network(net, record, out)


# ----------------------------------------------------------------------------------------------------
# input checks


def _check_value_range(value_range: Sequence[float]) -> ValueRange:
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise TypeError(f"value_range must be a pair (low, high) such as (0, 1) or (-1, 1), got {value_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"value_range must be finite with low < high, such as (0, 1) or (-1, 1), got {value_range!r}")
    return lo, hi


def _as_images(images: Tensor | np.ndarray, value_range: Sequence[float], name: str = "images",
               min_count: int = 1) -> Tensor:
    """Validate ``[N, 1, 16, 16]`` images in ``value_range`` and return them as float32 in [-1, 1]."""
    lo, hi = _check_value_range(value_range)
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array [N, 1, 16, 16], got {type(images).__name__}")
    if images.dtype == torch.bool or images.is_complex():
        raise TypeError(f"{name} must have a real numeric dtype, got {images.dtype}")
    shape = tuple(images.shape)
    expected = f"[N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}] (channels first, one grey channel)"
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape {expected}, got {list(shape)}")
    if shape[1] != 1:
        hint = " (looks channels-last: use .permute(0, 3, 1, 2))" if shape[-1] in (1, 3) else ""
        raise ValueError(f"{name} must have 1 channel, shape {expected}; got {list(shape)}{hint}")
    if shape[2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{name} must be {IMAGE_SIZE}x{IMAGE_SIZE}, shape {expected}; got {list(shape)}")
    if shape[0] < min_count:
        raise ValueError(f"{name} needs at least {min_count} image(s), got {shape[0]}")
    images = images.float()
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    tol = 1e-4 * (hi - lo)
    vmin, vmax = images.min().item(), images.max().item()
    if vmin < lo - tol or vmax > hi + tol:
        raise ValueError(
            f"{name} has values in [{vmin:.3g}, {vmax:.3g}], outside value_range=({lo:g}, {hi:g}); pass the "
            "range the images are in (pipelines: (0, 1); fastdiff.data.load_digits: (-1, 1)) or clamp them"
        )
    return (images - lo) * (2.0 / (hi - lo)) - 1.0


def _check_labels(labels: Tensor | np.ndarray | Sequence[int], n: int) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [N] = [{n}] (one per image), got {list(labels.shape)}")
    if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must lie in 0..{NUM_CLASSES - 1}, got {labels.min().item()}..{labels.max().item()}")
    return labels.long()


def _check_choice(value: object, name: str, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------
# Frechet distance


def inception_status() -> tuple[bool, str]:
    """``(available, reason)`` for the standard Inception FID: torch-fidelity and weights on disk."""
    if importlib.util.find_spec("torch_fidelity") is None:
        return False, 'torch-fidelity is not installed (pip install "fastdiff[fid]")'
    path = inception_weights_path()
    if path is None:
        return False, (f"no Inception weights on disk (set ${INCEPTION_WEIGHTS_ENV} or place "
                       f"{INCEPTION_WEIGHTS_FILE} in {Path(torch.hub.get_dir()) / 'checkpoints'})")
    return True, f"Inception weights at {path}"


def inception_weights_path() -> Path | None:
    """Inception weights file: ``$FASTDIFF_INCEPTION_WEIGHTS`` if set, else torch-fidelity's hub cache file."""
    env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    path = Path(env) if env else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    return path if path.is_file() else None


def _to_inception_input(x: Tensor) -> Tensor:
    return ((x + 1) / 2).expand(-1, 3, -1, -1)  # [-1, 1] grey -> [0, 1] RGB; torchmetrics resizes to 299


def _new_fd_metric(feature: str, device: torch.device) -> FrechetInceptionDistance:
    if feature == "digits":
        extractor = _FeatureExtractor(load_feature_net(device))
        metric = FrechetInceptionDistance(feature=extractor, normalize=True, reset_real_features=False)
    else:
        available, reason = inception_status()
        if not available:
            raise RuntimeError(f"FID-inception is unavailable: {reason}. Use feature='digits' (FD-digits), "
                               "or metric='auto', which falls back to it.")
        metric = FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=False,
                                          feature_extractor_weights_path=str(inception_weights_path()))
    return metric.to(device)


def _update(metric: FrechetInceptionDistance, feature: str, images: Tensor, real: bool) -> None:
    for chunk in images.split(_BATCH):
        metric.update(_to_inception_input(chunk) if feature == "inception" else chunk, real=real)


@lru_cache(maxsize=16)
def _reference_metric(reference: str, feature: str, device: torch.device) -> FrechetInceptionDistance:
    """A metric holding the real-image statistics of a digits split (kept across ``reset``)."""
    metric = _new_fd_metric(feature, device)
    _update(metric, feature, load_digits(reference)[0].to(device), real=True)
    return metric


def frechet_distance(
    images: Tensor | np.ndarray,
    reference: str | Tensor | np.ndarray = "train",
    value_range: Sequence[float] = (0.0, 1.0),
    feature: str = "digits",
) -> float:
    """Frechet distance between the feature Gaussians of ``images`` and of ``reference`` (Heusel et al. 2017).

    Args:
        images: ``[N, 1, 16, 16]`` images, ``N >= 2``, with values in ``value_range``.
        reference: a digits split, ``"train"``, ``"test"`` or ``"all"`` (statistics cached per device), or
            ``[M, 1, 16, 16]`` reference images in the same ``value_range``.
        value_range: ``(low, high)`` of the pixel values, e.g. ``(0, 1)`` for pipeline outputs.
        feature: ``"digits"`` (FD-digits, offline) or ``"inception"`` (FID; raises ``RuntimeError`` when
            torch-fidelity or the weights are missing).
    """
    feature = _check_choice(feature, "feature", FEATURES)
    x = _as_images(images, value_range, "images", min_count=2)
    device = x.device
    if isinstance(reference, str):
        metric = _reference_metric(_check_choice(reference, "reference", SPLITS), feature, device)
    elif isinstance(reference, (Tensor, np.ndarray)):
        metric = _new_fd_metric(feature, device)
        _update(metric, feature, _as_images(reference, value_range, "reference", min_count=2).to(device), real=True)
    else:
        raise TypeError(f"reference must be one of {SPLITS} or a tensor of images, got {type(reference).__name__}")
    metric.reset()  # drops the previous fake statistics, keeps the reference ones
    _update(metric, feature, x, real=False)
    return float(metric.compute())


@torch.no_grad()
def class_accuracy(
    images: Tensor | np.ndarray, labels: Tensor | np.ndarray | Sequence[int], value_range: Sequence[float] = (0.0, 1.0)
) -> float:
    """Fraction of ``images`` ([N, 1, 16, 16] in ``value_range``) the digits classifier assigns to ``labels``."""
    x = _as_images(images, value_range, "images")
    y = _check_labels(labels, x.shape[0]).to(x.device)
    net = load_feature_net(x.device)
    pred = torch.cat([net(chunk).argmax(1) for chunk in x.split(_BATCH)])
    return (pred == y).float().mean().item()


@dataclass
class SampleMetrics:
    """Result of :func:`evaluate_samples`; ``metric`` says which Frechet distance ran."""

    metric: str  # "FD-digits" or "FID-inception"
    fd: float
    accuracy: float | None  # digits-classifier accuracy against the conditioning labels, if given
    n: int
    reference: str
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_samples(
    images: Tensor | np.ndarray,
    labels: Tensor | np.ndarray | Sequence[int] | None = None,
    reference: str | Tensor | np.ndarray = "train",
    value_range: Sequence[float] = (0.0, 1.0),
    metric: str = "auto",
) -> SampleMetrics:
    """Frechet distance of samples to a reference, plus class accuracy of conditional samples.

    ``metric="auto"`` runs FID-inception when torch-fidelity and the Inception weights are available and
    FD-digits otherwise, with a warning saying so; the result's ``metric`` and ``note`` record which ran.
    ``"digits"`` / ``"inception"`` force one (``"inception"`` raises when unavailable).
    """
    metric = _check_choice(metric, "metric", METRICS)
    note = ""
    if metric == "auto":
        available, reason = inception_status()
        metric = "inception" if available else "digits"
        if not available:
            note = f"FD-digits ran instead of FID-inception: {reason}"
            warnings.warn(note, stacklevel=2)
    fd = frechet_distance(images, reference, value_range, feature=metric)
    accuracy = None if labels is None else class_accuracy(images, labels, value_range)
    ref_name = reference if isinstance(reference, str) else f"tensor[{len(reference)}]"
    return SampleMetrics(METRIC_NAMES[metric], fd, accuracy, len(images), ref_name, note)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fastdiff.metrics train --out DIR``: rebuild the digits feature network."""
    parser = argparse.ArgumentParser(prog="python -m fastdiff.metrics", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train DigitsFeatureNet on the digits training split")
    train.add_argument("--out", type=Path, required=True, help=f"output directory (shipped: {FEATURE_NET_DIR})")
    train.add_argument("--epochs", type=int, default=40)
    train.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    net, record = train_feature_net(epochs=args.epochs, seed=args.seed)
    out = save_feature_net(net, record, args.out)
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {out}: test accuracy {record['accuracy']['test']:.4f}, weights {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
