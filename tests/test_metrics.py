"""FD-digits / class accuracy: sanity on real data and noise, a scipy reference, input checks."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from fastdiff import metrics
from fastdiff.data import load_digits

DIGITS = (-1.0, 1.0)  # value range of fastdiff.data.load_digits


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits("test")


@pytest.fixture(scope="module")
def train_images() -> torch.Tensor:
    return load_digits("train")[0]


@pytest.fixture(scope="module")
def noise() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (0.5 * torch.randn(359, 1, 16, 16, generator=g)).clamp(-1, 1)


def digits_features(x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return metrics.load_feature_net().features(x).double().numpy()


def scipy_frechet_distance(fx: np.ndarray, fy: np.ndarray) -> float:
    """Reference FD (Heusel et al. 2017) of two feature sets, in numpy/scipy float64."""
    mu_x, mu_y = fx.mean(0), fy.mean(0)
    cov_x, cov_y = np.cov(fx, rowvar=False), np.cov(fy, rowvar=False)
    with warnings.catch_warnings():  # features dead on the data make the covariances singular
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov_x @ cov_y).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x + cov_y - 2 * covmean))


def test_shipped_feature_net(test_split):
    images, labels = test_split
    config = json.loads((metrics.FEATURE_NET_DIR / "config.json").read_text())
    accuracy = metrics.class_accuracy(images, labels, value_range=DIGITS)
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(config["accuracy"]["test"], abs=1e-3)  # the recorded number is true
    assert (metrics.FEATURE_NET_DIR / "model.safetensors").stat().st_size <= 1_000_000
    assert metrics.load_feature_net() is metrics.load_feature_net("cpu")  # cached per device


def test_fd_of_data_against_itself_and_noise(test_split, train_images, noise):
    assert abs(metrics.frechet_distance(train_images, "train", value_range=DIGITS)) < 1e-6
    fd_test = metrics.frechet_distance(test_split[0], "train", value_range=DIGITS)
    fd_noise = metrics.frechet_distance(noise, "train", value_range=DIGITS)
    assert 0 < fd_test < 20
    assert fd_noise > 100 * fd_test


def test_fd_matches_scipy_reference(test_split, train_images, noise):
    test = test_split[0]
    train_features = digits_features(train_images)
    for x in (test, torch.cat([test[:200], noise[200:]])):
        fast = metrics.frechet_distance(x, "train", value_range=DIGITS)
        assert fast == pytest.approx(scipy_frechet_distance(digits_features(x), train_features), rel=1e-3)


def test_fd_symmetric(test_split, train_images):
    test, train = test_split[0], train_images[:400]
    forward = metrics.frechet_distance(test, reference=train, value_range=DIGITS)
    assert metrics.frechet_distance(train, "test", value_range=DIGITS) == pytest.approx(forward, rel=1e-6)
    assert metrics.frechet_distance(train, reference=test, value_range=DIGITS) == pytest.approx(forward, rel=1e-6)


def test_fd_monotone_in_noise_fraction(test_split, noise):
    images = test_split[0][:200]
    fds = []
    for fraction in (0.0, 0.1, 0.25, 0.5, 1.0):
        k = int(fraction * len(images))
        fds.append(metrics.frechet_distance(torch.cat([noise[:k], images[k:]]), "train", value_range=DIGITS))
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


def test_value_range_handling(test_split):
    images = test_split[0][:100]
    fd = metrics.frechet_distance(images, "train", value_range=DIGITS)
    assert metrics.frechet_distance((images + 1) / 2, "train") == pytest.approx(fd, rel=1e-5)  # default (0, 1)
    assert metrics.frechet_distance((images + 1) * 127.5, "train", value_range=(0, 255)) == pytest.approx(fd, rel=1e-5)
    assert metrics.frechet_distance(images.numpy(), "train", value_range=DIGITS) == pytest.approx(fd, rel=1e-9)
    net = metrics.load_feature_net()
    torch.testing.assert_close(net((images + 1) / 2, value_range=(0, 1)), net(images), rtol=1e-4, atol=1e-4)


def test_class_accuracy_on_shuffled_labels(test_split):
    images, labels = test_split
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert 0.03 < metrics.class_accuracy(images, shuffled, value_range=DIGITS) < 0.2


def test_evaluate_samples_auto_reports_fd_digits_offline(test_split, monkeypatch):
    monkeypatch.setenv(metrics.INCEPTION_WEIGHTS_ENV, "/nonexistent/inception.pth")
    images, labels = (v[:100] for v in test_split)
    with pytest.warns(UserWarning, match="FD-digits ran instead of FID-inception"):
        result = metrics.evaluate_samples((images + 1) / 2, labels)
    assert result.metric == "FD-digits" and "FID-inception" in result.note
    assert result.fd == pytest.approx(metrics.frechet_distance(images, "train", value_range=DIGITS))
    assert result.accuracy >= 0.95 and result.n == len(images) and result.reference == "train"
    assert set(result.to_dict()) == {"metric", "fd", "accuracy", "n", "reference", "note"}
    assert metrics.evaluate_samples(images, value_range=DIGITS, metric="digits").accuracy is None
    with pytest.raises(RuntimeError, match="FID-inception is unavailable.*feature='digits'"):
        metrics.evaluate_samples(images, value_range=DIGITS, metric="inception")


@pytest.mark.slow
def test_training_recipe_runs_and_round_trips(tmp_path, monkeypatch, capsys):
    metrics.main(["train", "--out", str(tmp_path), "--epochs", "1"])
    assert "test accuracy" in capsys.readouterr().out
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["recipe"]["epochs"] == 1 and config["recipe"]["seed"] == 0
    monkeypatch.setattr(metrics, "FEATURE_NET_DIR", tmp_path)
    metrics._load_feature_net.cache_clear()
    try:
        loaded = metrics.load_feature_net()
        images, labels = load_digits("test")
        assert metrics._accuracy(loaded, images, labels) == pytest.approx(config["accuracy"]["test"], abs=1e-3)
    finally:
        metrics._load_feature_net.cache_clear()


BAD_IMAGES = [
    ([[0.0]], {}, TypeError, "images must be a torch.Tensor"),
    (torch.zeros(4, 16, 16), {}, ValueError, r"shape \[N, 1, 16, 16\]"),
    (torch.zeros(4, 3, 16, 16), {}, ValueError, "1 channel"),
    (torch.zeros(4, 16, 16, 1), {}, ValueError, "channels-last"),
    (torch.zeros(4, 1, 8, 8), {}, ValueError, "16x16"),
    (torch.zeros(1, 1, 16, 16), {}, ValueError, "at least 2"),
    (torch.full((4, 1, 16, 16), float("nan")), {}, ValueError, "non-finite"),
    (torch.full((4, 1, 16, 16), -1.0), {}, ValueError, r"outside value_range=\(0, 1\)"),
    (torch.zeros(4, 1, 16, 16, dtype=torch.bool), {}, TypeError, "real numeric dtype"),
    (torch.zeros(4, 1, 16, 16), {"reference": "val"}, ValueError, "reference must be one of"),
    (torch.zeros(4, 1, 16, 16), {"reference": 3}, TypeError, "reference must be one of"),
    (torch.zeros(4, 1, 16, 16), {"reference": torch.zeros(4, 1, 16, 16) - 1}, ValueError, "reference has values"),
    (torch.zeros(4, 1, 16, 16), {"feature": "clip"}, ValueError, "feature must be one of"),
    (torch.zeros(4, 1, 16, 16), {"value_range": (1, 0)}, ValueError, "low < high"),
    (torch.zeros(4, 1, 16, 16), {"value_range": 1.0}, TypeError, "value_range must be a pair"),
]


@pytest.mark.parametrize(("images", "kwargs", "error", "match"), BAD_IMAGES)
def test_frechet_distance_rejects_bad_input(images, kwargs, error, match):
    with pytest.raises(error, match=match):
        metrics.frechet_distance(images, **kwargs)


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        (torch.zeros(3, dtype=torch.long), ValueError, r"shape \[N\] = \[4\]"),
        (torch.zeros(4), TypeError, "integer class ids"),
        (torch.tensor([0, 1, 2, 10]), ValueError, r"0\.\.9"),
    ],
)
def test_class_accuracy_rejects_bad_labels(labels, error, match):
    with pytest.raises(error, match=match):
        metrics.class_accuracy(torch.zeros(4, 1, 16, 16), labels)


def test_evaluate_samples_rejects_unknown_metric():
    with pytest.raises(ValueError, match=r"metric must be one of \('auto', 'digits', 'inception'\)"):
        metrics.evaluate_samples(torch.zeros(4, 1, 16, 16), metric="fid")
