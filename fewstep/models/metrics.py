"""Sample quality for the bundled digits model, measured by a digit classifier trained on the same data set.

* :func:`class_accuracy` -- the fraction of generated samples the classifier assigns to their conditioning
  label.
* :func:`frechet_distance` -- the Frechet distance between Gaussians fitted to the classifier's penultimate
  features (64-d) of generated and real digits (FID's recipe with a domain-specific feature extractor).

The classifier is a small CNN trained by ``scripts/train_digits.py`` on the training split of
:func:`~fewstep.models.digits.load_digits_data`; its held-out test accuracy is recorded in
``data/digit_classifier.json``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .digits import DATA_DIR, SAMPLE_SHAPE, check_class_labels, load_digits_data, load_state_dict_checked

__all__ = ["DigitClassifier", "load_digit_classifier", "class_accuracy", "frechet_distance", "feature_stats",
           "frechet_distance_from_stats", "real_feature_stats"]

CLASSIFIER_WEIGHTS = "digit_classifier.pt"
CLASSIFIER_CONFIG = "digit_classifier.json"
FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """A small CNN on (batch, 1, 8, 8) digits in [-1, 1]: two 3x3 convs, a 64-d feature layer, 10 logits."""

    def __init__(self, width: int = 32, features: int = FEATURE_DIM):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * width * 16, features), nn.ReLU(),
        )
        self.head = nn.Linear(features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, (batch, 64); inputs are clamped to the data range [-1, 1]."""
        return self.body(x.float().clamp(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@lru_cache(maxsize=4)
def _load_classifier_cached(data_dir: str) -> DigitClassifier:
    d = Path(data_dir)
    cfg_path = d / CLASSIFIER_CONFIG
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    state = load_state_dict_checked(d / CLASSIFIER_WEIGHTS, cfg.get("weights_sha256"), "digit classifier")
    clf = DigitClassifier(**cfg.get("arch", {}))
    try:
        clf.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise RuntimeError(f"digit classifier weights file {d / CLASSIFIER_WEIGHTS} does not fit the "
                           f"classifier: {e}") from e
    return clf.eval().requires_grad_(False)


def load_digit_classifier(data_dir: str | Path | None = None) -> DigitClassifier:
    """The bundled digit classifier (float32, eval mode, cached)."""
    return _load_classifier_cached(str(Path(data_dir) if data_dir is not None else DATA_DIR))


def _check_samples(samples: torch.Tensor) -> torch.Tensor:
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"samples must be a torch.Tensor, got {type(samples).__name__}")
    if samples.dim() != 4 or tuple(samples.shape[1:]) != SAMPLE_SHAPE:
        raise ValueError(f"samples must have shape (N, 1, 8, 8), got {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        raise ValueError("samples contain NaN or Inf")
    return samples.detach().cpu().float()


@torch.no_grad()
def class_accuracy(samples: torch.Tensor, labels, classifier: DigitClassifier | None = None) -> float:
    """Fraction of ``samples`` (N, 1, 8, 8) the classifier assigns to their conditioning ``labels`` (N,)."""
    x = _check_samples(samples)
    y = check_class_labels(labels, allow_null=False)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} samples but {y.shape[0]} labels")
    clf = classifier or load_digit_classifier()
    return float((clf(x).argmax(1) == y).double().mean())


@torch.no_grad()
def feature_stats(samples: torch.Tensor,
                  classifier: DigitClassifier | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean (64,) and covariance (64, 64) of the classifier's penultimate features, float64."""
    x = _check_samples(samples)
    if x.shape[0] < 2:
        raise ValueError("a Frechet distance needs at least 2 samples")
    f = (classifier or load_digit_classifier()).features(x).double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance_from_stats(mu1, cov1, mu2, cov2) -> float:
    """``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))`` (Dowson & Landau 1982), via a symmetric form.

    ``tr (C1 C2)^(1/2) = tr (C1^(1/2) C2 C1^(1/2))^(1/2)``, whose argument is symmetric PSD, so eigenvalues
    replace scipy's sqrtm and its complex round-off.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    w1, v1 = np.linalg.eigh(cov1)
    s1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = s1 @ cov2 @ s1
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


@lru_cache(maxsize=4)
def _real_stats_cached(split: str, data_dir: str):
    x, _ = load_digits_data(split)
    return feature_stats(x, load_digit_classifier(data_dir))


def real_feature_stats(split: str = "all", classifier_dir: str | Path | None = None):
    """Feature mean and covariance of the real digits (``split`` of :func:`load_digits_data`), cached."""
    return _real_stats_cached(split, str(Path(classifier_dir) if classifier_dir is not None else DATA_DIR))


def frechet_distance(samples: torch.Tensor, reference: torch.Tensor | None = None,
                     classifier: DigitClassifier | None = None) -> float:
    """Frechet distance in the classifier's feature space between ``samples`` and ``reference`` digits
    (default: all 1797 real digits).  Lower is better; it is biased upwards for small sample counts, so
    compare values computed from the same number of samples."""
    clf = classifier or load_digit_classifier()
    mu1, c1 = feature_stats(samples, clf)
    if reference is None and classifier is None:
        mu2, c2 = real_feature_stats()
    else:
        mu2, c2 = feature_stats(reference if reference is not None else load_digits_data("all")[0], clf)
    return frechet_distance_from_stats(mu1, c1, mu2, c2)
