"""Noise schedules in logSNR terms (METHOD.md sections 1-2).

Every backbone is handled in one frame: the rectified-flow (RF) state
``x_t = (1 - t) x0 + t eps`` with ``t`` in [0, 1]. A variance-preserving (VP)
state with the same logSNR is the same state up to a scale factor, so VP
backbones only need a conversion at their input (see :mod:`rmd.denoisers`).

All functions are stateless and accept floats or tensors.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

Number = Union[float, torch.Tensor]


def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def logsnr_from_t(t: Number) -> Number:
    """RF logSNR, Eq. 1: ``lambda(t) = 2 log((1 - t) / t)``; -inf at t=1, +inf at t=0."""
    if _is_tensor(t):
        t = t.double() if t.dtype != torch.float64 else t
        return 2.0 * (torch.log1p(-t) - torch.log(t))
    if t <= 0.0:
        return math.inf
    if t >= 1.0:
        return -math.inf
    return 2.0 * math.log((1.0 - t) / t)


def t_from_logsnr(lam: Number) -> Number:
    """Inverse of Eq. 1: ``t(lambda) = 1 / (1 + exp(lambda / 2))`` (a sigmoid of -lambda/2)."""
    if _is_tensor(lam):
        return torch.sigmoid(-lam.double() / 2.0)
    if lam == math.inf:
        return 0.0
    if lam == -math.inf:
        return 1.0
    # sigmoid written to avoid overflow for large |lam|
    if lam >= 0:
        e = math.exp(-lam / 2.0)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(lam / 2.0))


def flow_shift(t: Number, shift: float) -> Number:
    """SD3-style time shift ``s t / (1 + (s - 1) t)``; in logSNR terms ``lambda - 2 log s``."""
    if shift <= 0:
        raise ValueError(f"flow shift must be positive, got {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(t: Number, native_resolution: float, teacher_resolution: float) -> Number:
    """Eq. 2: the teacher-resolution time equivalent to native time ``t`` at ``native_resolution``.

    A lower-resolution state is more corrupted at the same t, so its
    teacher-equivalent logSNR is ``lambda(t) - 2 log(R / r)``; this equals a
    flow shift by ``R / r``.
    """
    return flow_shift(t, teacher_resolution / native_resolution)


def uniform_times(steps: int, shift: float = 1.0) -> list[float]:
    """Student step times ``t_i = shift_s(1 - i / N)`` for i = 0..N-1 (METHOD 1)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [float(flow_shift(1.0 - i / steps, shift)) for i in range(steps)]


# --- VP (alphas_cumprod) parameterisation -------------------------------------------------


def vp_logsnr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """logSNR of each discrete VP timestep: ``log(a / (1 - a))`` (float64)."""
    a = alphas_cumprod.double()
    return torch.log(a) - torch.log1p(-a)


def t_from_alpha(alpha_cumprod: Number) -> Number:
    """RF time with the same logSNR as a VP state with ``alpha_cumprod`` = a.

    From ``(1 - t) / t = sqrt(a / (1 - a))``: ``t = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a))``.
    """
    if _is_tensor(alpha_cumprod):
        a = alpha_cumprod.double()
        return torch.sqrt(1 - a) / (torch.sqrt(a) + torch.sqrt(1 - a))
    return math.sqrt(1 - alpha_cumprod) / (math.sqrt(alpha_cumprod) + math.sqrt(1 - alpha_cumprod))


def alpha_from_t(t: Number) -> Number:
    """VP ``alpha_cumprod`` with the same logSNR as RF time t: ``(1-t)^2 / ((1-t)^2 + t^2)``."""
    return (1 - t) ** 2 / ((1 - t) ** 2 + t**2)


def vp_scale(t: Number) -> Number:
    """Factor ``c`` with ``x_VP = c * x_RF`` at equal logSNR: ``c = sqrt(a) + sqrt(1 - a) = 1 / sqrt((1-t)^2 + t^2)``."""
    if _is_tensor(t):
        return torch.rsqrt((1 - t) ** 2 + t**2)
    return 1.0 / math.sqrt((1 - t) ** 2 + t**2)


def vp_timestep_from_t(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The (fractional) VP timestep index whose logSNR equals that of RF time t.

    Piecewise-linear interpolation of the index against logSNR, so integer
    indices come back exactly (``t_from_alpha(a[k]) -> k``). Times beyond the
    backbone's range are clamped to its first/last index: a VP model was never
    trained past ``alphas_cumprod[-1]``.
    """
    lam_grid = vp_logsnr(alphas_cumprod)  # decreasing in the index
    lam = logsnr_from_t(t.double().clamp(1e-12, 1 - 1e-12))
    # flip so the grid increases, as searchsorted requires
    grid = lam_grid.flip(0)
    n = grid.numel()
    lam_c = lam.clamp(grid[0], grid[-1])
    hi = torch.searchsorted(grid, lam_c).clamp(1, n - 1)
    lo = hi - 1
    frac = (lam_c - grid[lo]) / (grid[hi] - grid[lo])
    pos = lo.double() + frac  # position in the flipped grid
    return (n - 1) - pos


def marginal_std(t: Number) -> Number:
    """Std of ``x_t`` for unit-variance data: ``sqrt((1-t)^2 + t^2)``; the sampler's start scale."""
    if _is_tensor(t):
        return torch.sqrt((1 - t) ** 2 + t**2)
    return math.sqrt((1 - t) ** 2 + t**2)


def ratio_from_sizes(low: Sequence[int], high: Sequence[int]) -> float:
    """Resolution ratio R / r for sizes (H, W[, ...]): square root of the area ratio (METHOD 2)."""
    a_low = 1.0
    for s in low:
        a_low *= s
    a_high = 1.0
    for s in high:
        a_high *= s
    return math.sqrt(a_high / a_low)
