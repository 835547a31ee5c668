"""Distillation losses (METHOD.md section 5-6), EDM style.

Each loss is a small function returning unreduced per-sample values, shape (B,);
the training loop reduces, weights and scales them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _flat(x: Tensor) -> Tensor:
    return x.flatten(1)


def pseudo_huber_c(numel_per_sample: int) -> float:
    """The paper's constant ``c = 0.00054 sqrt(d)`` for d values per sample (iCT's choice)."""
    return 0.00054 * math.sqrt(numel_per_sample)


def pseudo_huber(a: Tensor, b: Tensor, c: Optional[float] = None) -> Tensor:
    """``sqrt(||a - b||^2 + c^2) - c`` per sample (Appendix B); ``c`` defaults to 0.00054 sqrt(d)."""
    d = _flat(a).shape[1]
    c = pseudo_huber_c(d) if c is None else c
    sq = _flat(a.float() - b.float()).pow(2).sum(1)
    return torch.sqrt(sq + c * c) - c


def dm_direction(x: Tensor, x0_fake: Tensor, x0_real: Tensor, min_divisor: float = 0.2) -> Tensor:
    """The normalised distribution-matching gradient of Eqs. 7-8.

    ``g = (x0_fake - x0_real) / mean|x - x0_real|`` per sample; the divisor is
    clamped from below (the official code uses 0.2 for unit-scale latents) so a
    sample the teacher already agrees with does not get an exploding step.
    """
    div = _flat(x.float() - x0_real.float()).abs().mean(1).clamp_min(min_divisor)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (x0_fake.float() - x0_real.float()) / div.view(shape)


def dm_generator_loss(x: Tensor, direction: Tensor, c: Optional[float] = None) -> Tensor:
    """``PseudoHuber(x, stopgrad(x - g))``: its gradient in x points along g (Eq. 8).

    For small steps the pseudo-Huber gradient is ``g / sqrt(||g||^2 + c^2)``, the
    DMD update direction with a bounded norm.
    """
    target = (x - direction).detach()
    return pseudo_huber(x, target, c)


def snr_weight(t: Tensor, clip: Optional[float] = None) -> Tensor:
    """``((1 - t) / t)^2`` = SNR(t) in the RF frame; optionally clipped from above (TDM clips at 5)."""
    w = ((1 - t) / t.clamp_min(1e-6)).pow(2)
    return w.clamp(max=clip) if clip is not None else w


def fake_score_loss(x0_pred: Tensor, x0_target: Tensor, t: Tensor, clip: Optional[float] = None) -> Tensor:
    """Eq. 9: denoising loss of the fake score, x0-MSE weighted by the SNR at t (per sample)."""
    mse = _flat(x0_pred.float() - x0_target.float()).pow(2).mean(1)
    return snr_weight(t.float(), clip) * mse


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss ``softplus(-D(fake))``, per sample (DMD2)."""
    return F.softplus(-fake_logits.float()).flatten(1).mean(1)


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """``softplus(-D(real)) + softplus(D(fake))``, per sample."""
    return F.softplus(-real_logits.float()).flatten(1).mean(1) + F.softplus(fake_logits.float()).flatten(1).mean(1)


def pdm_loss(feat_fake: Tensor, feat_real: Tensor, kernel: str = "linear", c: float = 1e-3,
             bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0)) -> Tensor:
    """Patch Distribution Matching (SwD): an MMD between token features of two image sets.

    ``feat_*`` are (B, N, D) token features of one inner block, from samples noised
    with the same noise. Linear kernel: the squared difference of per-image token
    means, through a pseudo-Huber with constant c. RBF kernel: the biased MMD^2
    between the two token sets of each image, over a few bandwidths relative to the
    median token distance. Returns (B,).
    """
    ff, fr = feat_fake.float(), feat_real.float()
    if kernel == "linear":
        diff = ff.mean(1) - fr.mean(1)
        return torch.sqrt(diff.pow(2).sum(1) + c * c) - c
    if kernel != "rbf":
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    both = torch.cat([ff, fr], 1)
    d2 = torch.cdist(both, both).pow(2)
    scale = d2.detach().flatten(1).median(1).values.clamp_min(1e-8).view(-1, 1, 1)
    k = sum(torch.exp(-d2 / (bw * scale)) for bw in bandwidths)
    n = ff.shape[1]
    kxx, kyy, kxy = k[:, :n, :n], k[:, n:, n:], k[:, :n, n:]
    return kxx.mean((1, 2)) + kyy.mean((1, 2)) - 2 * kxy.mean((1, 2))
