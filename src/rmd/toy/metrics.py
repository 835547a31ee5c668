"""Metrics of the toy benchmark, computed from what the toy evaluator reads.

For a set of generated images and a reference set of real renders of the same scenes
(:mod:`rmd.toy.evaluate` builds both):

* alignment -- share of the prompt's attributes read back as asked, averaged over
  images and the six attributes of :data:`rmd.toy.world.ATTRIBUTES`; also per attribute
  and on the held-out (shape, colour) pairs;
* fd -- Frechet distance between Gaussian fits of the evaluator's features,
  ``|mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2))``;
* detail -- high-frequency energy at 32 px, generated / real (1.0 = as sharp as the
  real renders, below 1 = blurrier, above 1 = noisier or over-sharpened);
* degraded_rate -- share of images whose degraded head says P(degraded) > 0.5.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from .evaluator import Readout, prepare
from .world import ATTRIBUTES, Scene

# Discrete Laplacian: zero on constant and linear ramps, so it measures edges and fine texture only.
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def attribute_accuracy(readout: Readout, scenes: Sequence[Scene]) -> dict:
    """Per-attribute accuracy of the evaluator's reading against the asked scenes.

    Returns ``{"alignment", "alignment_se", "per_attribute": {name: acc}, "alignment_heldout",
    "num_heldout"}``; ``alignment`` = mean over images and attributes of [read == asked];
    ``alignment_se`` is its standard error over images (the attributes of one image are not
    independent, so the image is the unit); ``alignment_heldout`` is the same over the images
    whose (shape, colour) pair is held out of training (None if none).
    """
    n = len(scenes)
    if n == 0 or any(len(v) != n for v in readout.labels.values()):
        sizes = [len(v) for v in readout.labels.values()]
        raise ValueError(f"need one reading per scene: {n} scenes, readings of sizes {sizes}")
    hits = torch.stack([readout.labels[name].cpu() == torch.tensor([s.labels()[name] for s in scenes])
                        for name in ATTRIBUTES], dim=1).float()  # (N, 6)
    held = torch.tensor([s.held_out for s in scenes])
    return {
        "alignment": hits.mean().item(),
        "alignment_se": (hits.mean(dim=1).std() / n ** 0.5).item() if n > 1 else float("nan"),
        "per_attribute": {name: hits[:, j].mean().item() for j, name in enumerate(ATTRIBUTES)},
        "alignment_heldout": hits[held].mean().item() if held.any() else None,
        "num_heldout": int(held.sum()),
    }


def gaussian_fit(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features for a Gaussian fit, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    ``sqrtm`` of the product of two PSD matrices has real eigenvalues, but rounding
    leaves tiny imaginary parts, which are dropped. A singular product (dead ReLU
    features, or fewer samples than dimensions) is expected and still gives an accurate
    root, so scipy's singularity warning is silenced; only a non-finite or clearly
    complex root is retried with ``eps`` added to both diagonals.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all() or _imag_share(covmean) > 1e-3:
        offset = eps * np.eye(mu1.size)
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if _imag_share(covmean) > 1e-3:
        raise ValueError(f"sqrtm has a large imaginary part ({_imag_share(covmean):.2g} of the trace); "
                         "the covariances are not positive semi-definite")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(np.real(covmean))
    return float(max(fd, 0.0))  # rounding can leave -1e-12 for identical inputs


def _imag_share(m: np.ndarray) -> float:
    """|imaginary part| of the trace relative to the real trace (0 for real matrices)."""
    if not np.iscomplexobj(m):
        return 0.0
    return float(np.abs(np.trace(m).imag) / max(1e-12, abs(np.trace(m).real)))


def feature_fd(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussian fits of two (N, D) feature sets."""
    return frechet_distance(*gaussian_fit(features_a), *gaussian_fit(features_b))


def paired_fd_bootstrap(features: dict[str, torch.Tensor], reference: torch.Tensor, rounds: int = 200,
                        seed: int = 0) -> dict[str, dict]:
    """Bootstrap spread of each set's FD and of every pairwise FD difference.

    All sets score the same prompts, so image i of every set and of the reference belong
    together: each round resamples image indices once and recomputes every FD on them
    (a paired bootstrap). The spread of ``FD_a - FD_b`` over rounds is far smaller than
    either FD's own, because the prompts' share of the variation cancels. It measures the
    evaluation set's sampling error only, not the training run's (another seed).

    Returns ``{name: {"fd_se": sd, "fd_diff": {other: {"diff": FD_name - FD_other, "se": sd}}}}``
    where ``diff`` is on the full set and the spreads are standard deviations over rounds.
    """
    if rounds < 2:
        raise ValueError(f"rounds must be at least 2, got {rounds}")
    n = reference.shape[0]
    if any(f.shape[0] != n for f in features.values()):
        raise ValueError("every feature set must hold one row per reference image")
    rng = np.random.default_rng(seed)
    names = list(features)
    boots = {k: np.empty(rounds) for k in names}
    for r in range(rounds):
        idx = torch.as_tensor(rng.integers(0, n, n))
        ref = reference[idx]
        for k in names:
            boots[k][r] = feature_fd(features[k][idx], ref)
    full = {k: feature_fd(features[k], reference) for k in names}
    return {a: {"fd_se": float(boots[a].std(ddof=1)),
                "fd_diff": {b: {"diff": full[a] - full[b], "se": float((boots[a] - boots[b]).std(ddof=1))}
                            for b in names if b != a}}
            for a in names}


def high_frequency_energy(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Per-image mean squared Laplacian response at ``size`` px: (B,).

    Images are first resized to ``size`` (bilinear, as the evaluator sees them); only the
    interior (valid convolution) is used, so padding adds no edges.
    """
    x = prepare(images, size)
    k = LAPLACIAN.to(x)[None, None].repeat(3, 1, 1, 1)
    return F.conv2d(x, k, groups=3).pow(2).flatten(1).mean(1)


def detail_score(generated: torch.Tensor, real: torch.Tensor, size: int = 32) -> float:
    """Mean high-frequency energy of ``generated`` over that of ``real`` (ratio of means, at ``size`` px)."""
    hf_real = high_frequency_energy(real, size).mean().item()
    if hf_real <= 0:
        raise ValueError("the real images have no high-frequency energy; cannot normalise the detail score")
    return high_frequency_energy(generated, size).mean().item() / hf_real


def degraded_rate(readout: Readout, threshold: float = 0.5) -> float:
    """Share of images the degraded head flags (P(degraded) > threshold)."""
    return (readout.degraded_prob > threshold).float().mean().item()


def compute_metrics(generated: torch.Tensor, readout: Readout, scenes: Sequence[Scene],
                    real: torch.Tensor, real_readout: Readout, size: int = 32) -> dict:
    """All metrics of one set of generated images against the real reference set of the same scenes."""
    acc = attribute_accuracy(readout, scenes)
    return {
        "alignment": acc["alignment"],
        "alignment_se": acc["alignment_se"],
        "fd": feature_fd(readout.features, real_readout.features),
        "detail": detail_score(generated, real, size),
        "degraded_rate": degraded_rate(readout),
        "alignment_heldout": acc["alignment_heldout"],
        "per_attribute": acc["per_attribute"],
        "num_heldout": acc["num_heldout"],
    }


__all__ = [
    "attribute_accuracy",
    "compute_metrics",
    "degraded_rate",
    "detail_score",
    "feature_fd",
    "frechet_distance",
    "gaussian_fit",
    "high_frequency_energy",
    "paired_fd_bootstrap",
]
