"""Cascaded few-step sampling, low to high resolution (METHOD 4, Algorithm 2).

One function, :func:`sample`. Start from Gaussian noise at the first step's resolution;
at step i (native time t_i) the denoiser predicts ``x0_hat`` and ``eps_hat``; then

- next step at the same resolution:
      x = (1 - t_{i+1}) x0_hat + t_{i+1} (eta * eps_hat + sqrt(1 - eta^2) z)
- next step at a higher resolution (Eq. 10):
      x = (1 - t_{i+1}) Up(x0_hat) + t_{i+1} (gamma * Up_n(eps_hat) + sqrt(1 - gamma^2) z)
  with ``Up`` = :func:`rmd.upsample.upsample` and ``Up_n`` = :func:`rmd.upsample.upsample_noise`
  (variance-corrected, so the noise stays unit-variance per element);
- after the last step return ``x0_hat`` (or ``decode(x0_hat)``).

With eta = 1 and one stage this is exactly Euler sampling of the probability-flow ODE in
the RF frame (= diffusers' FlowMatchEulerDiscreteScheduler) and, for VP backbones at the
matching logSNRs, DDIM with eta_DDIM = 0; eta = 0 is DMD2's fresh-noise multistep sampling.

Randomness is per image: image i owns a ``torch.Generator`` seeded with ``seeds[i]`` and
draws, always in this order, its initial noise and then one ``z`` per step transition (also
when eta or gamma = 1 makes it unused, so the stream does not depend on those settings;
only unused draws at the end of the stream are skipped, as no other draw follows them).
Draws happen on the CPU in float32, so a sample depends only on (condition, seed, plan,
settings): not on batch size, chunking, process count or the other images in the batch.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .denoisers import CFGDenoiser, Conditioning
from .plan import StagePlan
from .schedules import marginal_std
from .upsample import MODES, renoise, upsample, upsample_noise

# Defaults: the reasoning is under "Defaults" in the docstring of sample().
DEFAULT_ETA = 0.9
DEFAULT_GAMMA = 1.0

Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class Trajectory:
    """Per-step states of a run (full batch, in input order): the input ``x`` of step i and
    the denoiser's ``x0_hat`` / ``eps_hat`` there. Latents, on the sampling device."""

    x: list[torch.Tensor] = field(default_factory=list)
    x0_hat: list[torch.Tensor] = field(default_factory=list)
    eps_hat: list[torch.Tensor] = field(default_factory=list)


def _check_unit(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _draw(gens: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per image, each from that image's generator."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]).to(device)


@functools.lru_cache(maxsize=None)
def _split_draws_match() -> bool:
    """Whether one long ``randn`` equals consecutive shorter ones (sizes that are multiples of 16).

    torch's CPU normal sampler turns consecutive uniforms into normals in blocks of 16, so
    this holds today; it is checked once at run time rather than assumed, and sampling falls
    back to one draw per step if a torch release ever changes it.
    """
    a, b = torch.Generator().manual_seed(20261203), torch.Generator().manual_seed(20261203)
    sizes = (48, 768, 3072, 16)
    parts = torch.cat([torch.randn(n, generator=a, dtype=torch.float32) for n in sizes])
    return torch.equal(parts, torch.randn(sum(sizes), generator=b, dtype=torch.float32))


def _noise_streams(gens: Sequence[torch.Generator], shapes: Sequence[tuple[int, ...]],
                   device: torch.device) -> list[torch.Tensor]:
    """Every draw of a chunk, in stream order: ``out[k]`` is the (B, *shapes[k]) noise of draw k.

    The same numbers as one :func:`_draw` per step. When every draw's size is a multiple of
    16, each image's whole stream comes from one ``randn`` call and is cut into steps: one
    call per image instead of one per image and step, which is most of the sampler's own
    time on small, fast networks.
    """
    sizes = [math.prod(shape) for shape in shapes]
    if not all(n % 16 == 0 for n in sizes) or not _split_draws_match():
        return [_draw(gens, shape, device) for shape in shapes]
    whole = torch.stack([torch.randn(sum(sizes), generator=g, dtype=torch.float32) for g in gens]).to(device)
    out, start = [], 0
    for shape, n in zip(shapes, sizes):
        out.append(whole[:, start:start + n].reshape(len(gens), *shape))
        start += n
    return out


def _device_of(denoiser: Any, cond: Conditioning) -> torch.device:
    """Where the network lives (its first parameter), else where the conditioning is."""
    params = getattr(denoiser, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return cond.embeds.device


def sample(
    denoiser: Any,
    plan: StagePlan,
    cond: Conditioning,
    seeds: Sequence[int],
    *,
    eta: float = DEFAULT_ETA,
    gamma: float = DEFAULT_GAMMA,
    upsample_mode: str = "bilinear",
    num_frames: Optional[int] = None,
    batch_size: Optional[int] = None,
    callback: Optional[Callback] = None,
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    return_intermediates: bool = False,
    device: Union[str, torch.device, None] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, Trajectory]]:
    """Run the cascade of ``plan`` with ``denoiser`` (Algorithm 2); see the module docstring.

    Args:
        denoiser: ``x0_hat, eps_hat = denoiser(x, t, cond)`` in the RF frame (rmd.denoisers),
            e.g. a CFGDenoiser for guided sampling.
        plan: the stage plan (native times and pixel sizes per step).
        cond: a ``rmd.denoisers.Conditioning`` for the whole batch (B entries).
        seeds: B integer seeds; image i's noise comes only from ``seeds[i]``.
        eta: same-resolution noise re-use, in [0, 1] (0 fresh noise / DMD2, 1 deterministic / TDM).
        gamma: predicted-noise re-use at a resolution switch (Eq. 10), in [0, 1].
        upsample_mode: "bilinear" (paper), "bicubic" or "nearest".
        num_frames: pixel frame count, for video backbones.
        batch_size: run at most this many images per denoiser call (results do not change).
        callback: ``callback(step_index, x, x0_hat, eps_hat)`` after each denoiser call
            (once per chunk when ``batch_size`` splits the batch).
        decode: applied to the final latents, chunk by chunk (e.g. a VAE codec's ``decode``).
        return_intermediates: also return a :class:`Trajectory`.
        device: where to run; default the denoiser's parameters' device, else the conditioning's.

    Returns:
        ``(B, C, h, w)`` / ``(B, C, T, h, w)`` latents at the last step's resolution (or the
        decoded output), and the trajectory if asked.

    Defaults (provisional: METHOD asks for measured defaults, and random tiny backbones
    cannot measure quality; the tests always pass both explicitly):

    * ``eta = 0.9``, the official RMD code's inference value. A distilled student is trained
      along a (nearly) deterministic trajectory (TDM: eta = 1), so re-using eps_hat keeps it
      there; the fresh ``z`` enters with weight sqrt(1 - 0.81) = 0.44 (19% of the noise
      variance), which damps errors in eps_hat before they compound. For a student that
      samples its posterior every eta keeps the exact marginals; for a posterior-MEAN
      (regression-like) student eta < 1 shrinks the output variance (Gaussian test: 0.93 of
      the data variance at eta = 0.9, 0.49 at eta = 0), so do not go far below 1 without
      measuring.
    * ``gamma = 1.0``, the paper's inference value for the SD family (Wan: 0.9): the high
      stages keep the layout the low stage settled on. ``Up_n`` makes the re-used noise
      unit-variance per element, but not white: after 2x bilinear only ~6% of its power lies
      above the low resolution's Nyquist frequency (white noise: 75%), so gamma < 1 is the
      only source of fine-scale noise at the switch. Revisit with the toy teacher.
    """
    # ---- validate everything before any network call -------------------------------------
    eta = _check_unit("eta", eta)
    gamma = _check_unit("gamma", gamma)
    if upsample_mode not in MODES:
        raise ValueError(f"upsample_mode must be one of {MODES}, got {upsample_mode!r}")
    if plan.num_steps < 1:
        raise ValueError("the plan has no steps")
    n = len(cond)
    if n == 0:
        raise ValueError("empty batch: the conditioning has no rows")
    seeds = [operator.index(s) for s in seeds]  # integers only: a float seed is a caller bug
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {n} conditions; give one seed per image")
    if batch_size is None:
        batch_size = n
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    for size in dict.fromkeys(step.size for step in plan.steps):  # distinct sizes, in order
        denoiser.check_size(size, num_frames)  # raises rmd.denoisers.SizeError naming the fix
    shapes = [tuple(denoiser.latent_shape(step.size, num_frames)) for step in plan.steps]
    dev = torch.device(device) if device is not None else _device_of(denoiser, cond)
    cond = cond.to(device=dev)  # encoders (e.g. an embedding cache) may hand back CPU tensors

    outs: list[torch.Tensor] = []
    parts: list[Trajectory] = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        part = Trajectory() if return_intermediates else None
        lat = _run_chunk(denoiser, plan, shapes, cond.index(slice(start, stop)), seeds[start:stop],
                         eta, gamma, upsample_mode, callback, part, dev)
        if decode is not None:
            with torch.no_grad():  # sampling never needs gradients; decoders keep them unless told
                lat = decode(lat)
        outs.append(lat)
        if part is not None:
            parts.append(part)
    out = torch.cat(outs, dim=0)
    if not return_intermediates:
        return out
    # chunks -> one full-batch tensor per step, in input order
    def joined(name: str) -> list[torch.Tensor]:
        return [torch.cat(per_step) for per_step in zip(*(getattr(p, name) for p in parts))]

    return out, Trajectory(x=joined("x"), x0_hat=joined("x0_hat"), eps_hat=joined("eps_hat"))


def sample_with(
    denoiser: Any,
    plan: StagePlan,
    settings: Any,
    encode: Callable[[Sequence[str]], Conditioning],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    uncond: Optional[Conditioning] = None,
    **kwargs: Any,
) -> torch.Tensor:
    """:func:`sample` with a run's sampling settings (``guidance_scale``, ``eta``, ``gamma``, ``upsample``).

    Guided (CFG against ``uncond``, default ``encode([""])``) when ``settings.guidance_scale``
    is not 1; returns float32 images (or latents) on the CPU. ``kwargs`` go to :func:`sample`.
    """
    if settings.guidance_scale != 1.0:
        denoiser = CFGDenoiser(denoiser, uncond if uncond is not None else encode([""]), settings.guidance_scale)
    with torch.no_grad():
        out = sample(denoiser, plan, encode(list(prompts)), list(seeds), eta=settings.eta, gamma=settings.gamma,
                     upsample_mode=settings.upsample, **kwargs)
    return out.float().cpu()


@torch.no_grad()
def _run_chunk(
    denoiser: Any,
    plan: StagePlan,
    shapes: list[tuple[int, ...]],
    cond: Conditioning,
    seeds: Sequence[int],
    eta: float,
    gamma: float,
    mode: str,
    callback: Optional[Callback],
    traj: Optional[Trajectory],
    device: torch.device,
) -> torch.Tensor:
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    b = len(seeds)
    steps = plan.steps
    # draw k: the initial noise (k = 0), then the z of the transition into step k, whose
    # weight is sqrt(1 - mix^2). Unused draws keep their place in the stream, except the
    # trailing ones: nothing is drawn after them, so skipping them changes no other draw
    # (with gamma = 1 the last switch's z, most of the stream, is never drawn).
    mixes = [eta if shapes[k] == shapes[k - 1] else gamma for k in range(1, len(steps))]
    used = 1 + max((k for k, mix in enumerate(mixes, start=1) if mix < 1.0), default=0)
    noise = _noise_streams(gens, shapes[:used], device)
    # x_{t_0} = t_0 eps + (1 - t_0) x0 has std marginal_std(t_0) for unit-variance data; at
    # t_0 = 1 this is pure noise, and for VP backbones it is exactly DDIM's N(0, 1) start.
    x = float(marginal_std(steps[0].t)) * noise[0]
    for i, step in enumerate(steps):
        # float64 so plan times reach the adapter unrounded (VP adapters map t to a timestep index)
        t = torch.full((b,), step.t, dtype=torch.float64, device=device)
        x0_hat, eps_hat = denoiser(x, t, cond)
        if callback is not None:
            callback(i, x, x0_hat, eps_hat)
        if traj is not None:
            traj.x.append(x)
            traj.x0_hat.append(x0_hat)
            traj.eps_hat.append(eps_hat)
        if i + 1 == len(steps):
            return x0_hat
        nxt_shape, t_next = shapes[i + 1], steps[i + 1].t
        z = noise[i + 1] if i + 1 < used else None  # None only where its weight is 0
        if nxt_shape == shapes[i]:
            x = renoise(x0_hat, eps_hat, t_next, eta, z)
        else:
            hw = nxt_shape[-2:]
            x = renoise(upsample(x0_hat, hw, mode), upsample_noise(eps_hat, hw, mode), t_next, gamma, z)
    raise AssertionError("unreachable: the plan has at least one step")
