"""One iteration of cross-resolution distribution matching distillation (Algorithm 1).

The same function runs RMD and its neighbours; they differ only in settings
(:class:`MethodConfig`, presets in :data:`PRESETS`):

- RMD: stage plan with several resolutions; the generator's x0 at stage k is
  upsampled to the teacher resolution (Eq. 4) and diffused to a teacher time drawn
  inside stage k's teacher-frame interval; matched there (Eqs. 5-8).
- DMD2: one stage; fresh-noise trajectory (eta 0); tau over [0.02, 0.98]; 5 fake
  updates per generator update.
- TDM: one stage; deterministic trajectory (eta 1); tau inside the sampled step's
  interval; 1:1 updates.
- naive cascade ("UP without RM"): the cascade plan, but each step is matched at its
  own resolution against the teacher there (no cross-resolution matching).
- SwD ("Scale-wise Distillation of Diffusion Models", Starodubcev et al., arXiv): one scale per step,
  fresh noise after each upscale, DMD2-style matching at the target resolution, plus
  Patch Distribution Matching and a GAN head (METHOD 6).

Two extra objectives any method can switch on (METHOD 6; both need real images at the
matching resolution, passed as ``real``):

- GAN (DMD2): ``gan_weight`` > 0 puts a discriminator head on the fake score's inner
  token features (block ``gan_block``). The head is trained with the fake score
  (``gan_disc_weight`` x the softplus classifier loss, real vs generated, noised at the
  same tau); the generator adds ``gan_weight`` x the non-saturating loss of its noised
  sample under the fake role.
- PDM (SwD): ``pdm_weight`` > 0 adds an MMD between the ``pdm_role`` network's token
  features (block ``pdm_block``) of the noised generator sample and of real images
  noised with the same tau and noise (``pdm_kernel``: linear or rbf).

Their generator terms are differentiated under the role their graph was built with
(``torch.autograd.grad`` to the generator's sample only), and the result is chained into
the generator's graph under the generator role: correct with gradient checkpointing, and
no gradient ever reaches the head or the fake LoRA in the generator update.

All randomness comes from one ``torch.Generator`` per iteration, so an iteration is
a pure function of (weights, optimiser state, iteration seed): resume is exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..denoisers import CFGDenoiser, Conditioning
from ..plan import StagePlan
from ..schedules import marginal_std
from ..upsample import renoise, upsample, upsample_noise
from .features import BlockFeatures, features
from .losses import (dm_direction, dm_generator_loss, fake_score_loss, gan_discriminator_loss, gan_generator_loss,
                     pdm_loss)
from .roles import SharedBase


class MethodConfig(BaseModel):
    """Distillation settings shared by every method (METHOD 5-6)."""

    model_config = ConfigDict(extra="forbid")

    cross_resolution: bool = Field(True, description="match at the teacher resolution after upsampling (RMD)")
    tau_mode: Literal["stage", "full", "step"] = "stage"
    tau_range: tuple[float, float] = (0.02, 0.98)
    eta: float = Field(0.0, ge=0, le=1, description="within-stage re-noising in backward simulation")
    gamma: float = Field(0.2, ge=0, le=1, description="predicted-noise share when re-noising across resolutions (Eq. 10)")
    upsample: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    guidance_scale: float = Field(3.0, ge=0)
    fake_updates: int = Field(1, ge=1, description="fake-score updates per generator update")
    stage_weights: Optional[list[float]] = None
    warmup_iters: int = Field(0, ge=0, description="first iterations distil stage 1 only")
    min_divisor: float = Field(0.2, gt=0)
    huber_c: Optional[float] = None
    snr_clip: Optional[float] = Field(5.0, description="clip of the fake score's SNR weight (None: no clip)")
    gan_weight: float = Field(0.0, ge=0, description="generator GAN loss weight (0: no GAN; DMD2: 5e-3)")
    gan_disc_weight: float = Field(1e-2, ge=0, description="classifier loss weight in the fake update (DMD2: 1e-2)")
    gan_block: Optional[int] = Field(None, ge=0, description="block the head reads (None: the middle one)")
    gan_hidden: int = Field(64, ge=1, description="hidden width of the discriminator head")
    pdm_weight: float = Field(0.0, ge=0, description="Patch Distribution Matching weight (0: off)")
    pdm_kernel: Literal["linear", "rbf"] = "linear"
    pdm_block: Optional[int] = Field(None, ge=0, description="block PDM compares (None: the middle one)")
    # METHOD 6 reads SwD's PDM on an inner block of the fake score; the frozen teacher is the default here:
    # a fixed feature space that the generator cannot move by training the network that measures it
    pdm_role: Literal["teacher", "fake"] = Field("teacher", description="network whose features PDM compares")

    @property
    def needs_real(self) -> bool:
        """GAN and PDM compare with real images at the matching resolution."""
        return self.gan_weight > 0 or self.pdm_weight > 0


PRESETS: dict[str, dict] = {
    "rmd": dict(cross_resolution=True, tau_mode="stage", eta=0.0, gamma=0.2, fake_updates=1),
    "dmd2": dict(cross_resolution=True, tau_mode="full", eta=0.0, gamma=0.0, fake_updates=5),
    "tdm": dict(cross_resolution=True, tau_mode="step", eta=1.0, gamma=1.0, fake_updates=1),
    "naive": dict(cross_resolution=False, tau_mode="full", eta=0.0, gamma=0.0, fake_updates=1),
    # SwD: a new scale at every step with fresh noise after each upscale (gamma 0), DMD2's matching
    # (tau over [0.02, 0.98], 5 fake updates) at the target resolution, plus PDM and the GAN head
    # (METHOD 6; the GAN weights are DMD2's). PDM's weight is a first guess, not from the paper.
    "swd": dict(cross_resolution=True, tau_mode="full", eta=0.0, gamma=0.0, fake_updates=5,
                pdm_weight=1.0, pdm_kernel="rbf", gan_weight=5e-3),
}


@dataclass
class StepLosses:
    loss_generator: float
    loss_fake: float
    stage: int
    step: int
    dm_norm: float
    loss_gan_generator: Optional[float] = None  # set when gan_weight > 0
    loss_gan_discriminator: Optional[float] = None
    loss_pdm: Optional[float] = None  # set when pdm_weight > 0
    skipped_generator: bool = False  # the generator update was skipped: non-finite loss or gradient
    skipped_fake: int = 0  # fake-score updates skipped for the same reason

    @property
    def faulty(self) -> bool:
        return self.skipped_generator or self.skipped_fake > 0

    def extras(self) -> dict[str, float]:
        """The optional losses that were computed, by name."""
        names = ("loss_gan_generator", "loss_gan_discriminator", "loss_pdm")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


def guarded_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], loss: torch.Tensor,
                 grad_clip: float) -> bool:
    """Clip and apply the update unless the loss or the gradient norm is not finite; True if applied.

    A skipped update leaves weights and optimiser state untouched (Adam's moments would carry
    a NaN forever). Across processes the decision is shared (a max over ranks), so all ranks
    skip together and their weights stay identical.
    """
    from .sharding import clip_grad_norm

    norm = clip_grad_norm(params, grad_clip)  # torch's clip_grad_norm_, or its sharded (FSDP) equivalent
    bad = (~torch.isfinite(norm)) | (~torch.isfinite(loss.detach())).any()
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        bad = bad.to(torch.float32).reshape(1)
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # one rank's NaN loss stops all
        bad = bad > 0
    if bool(bad):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


def pick_stage_and_step(plan: StagePlan, cfg: MethodConfig, iteration: int, rng: random.Random) -> tuple[int, int]:
    """Stage k by the stage weights (stage 1 only during warm-up), then a step uniformly inside it."""
    k_stages = len(plan.stages)
    if iteration < cfg.warmup_iters:
        k = 0
    else:
        weights = cfg.stage_weights or [len(s.steps) for s in plan.stages]
        if len(weights) != k_stages:
            raise ValueError(f"stage_weights has {len(weights)} entries for {k_stages} stages")
        k = rng.choices(range(k_stages), weights=weights)[0]
    return k, rng.choice(plan.stages[k].steps)


def draw_tau(plan: StagePlan, cfg: MethodConfig, stage: int, step: int, batch: int, g: torch.Generator) -> torch.Tensor:
    """Teacher time for the matching noise: inside the stage interval, the step interval, or a fixed range."""
    lo_r, hi_r = cfg.tau_range
    if cfg.tau_mode == "full" or not cfg.cross_resolution:
        lo, hi = lo_r, hi_r
    elif cfg.tau_mode == "stage":
        st = plan.stages[stage]
        lo, hi = max(st.t_lo, lo_r), min(st.t_hi, hi_r)
    else:  # TDM: between this step's and the next step's teacher-frame times
        hi = min(plan.steps[step].t_teacher, hi_r)
        lo = max(plan.steps[step + 1].t_teacher if step + 1 < plan.num_steps else 0.0, lo_r)
    if hi <= lo:
        lo, hi = lo_r, hi_r
    return lo + (hi - lo) * torch.rand(batch, generator=g, dtype=torch.float64).float()


def simulate(generator, plan: StagePlan, cond: Conditioning, upto: int, cfg: MethodConfig,
             g: torch.Generator, latent_shape: Callable[[tuple[int, int]], tuple[int, ...]]) -> torch.Tensor:
    """Backward simulation: run the cascade from noise to the *input* state of step ``upto``, no gradients."""
    b = len(cond)
    dev = cond.embeds.device  # draws stay on the CPU generator (same stream on any device), then move
    first = plan.steps[0]
    x = torch.randn((b,) + tuple(latent_shape(first.size)), generator=g).to(dev)
    x = x * marginal_std(first.t)
    with torch.no_grad():
        for i in range(upto):
            s, nxt = plan.steps[i], plan.steps[i + 1]
            x0, eps = generator(x, torch.full((b,), s.t, device=dev), cond)
            if nxt.size != s.size:
                # plan sizes are pixels; the state lives in latent space (pixel / vae_scale_factor)
                hw = tuple(latent_shape(nxt.size)[-2:])
                x0 = upsample(x0, hw, cfg.upsample)
                eps = upsample_noise(eps, hw, cfg.upsample)
                mix = cfg.gamma
            else:
                mix = cfg.eta
            z = torch.randn(x0.shape, generator=g).to(dev)
            x = renoise(x0, eps, nxt.t, mix, z)
    return x


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def _real_at(real: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Real samples on ``like``'s device and dtype, resized (anti-aliased) to its spatial size if needed."""
    real = real.to(device=like.device, dtype=like.dtype)
    if real.shape[0] != like.shape[0] or real.shape[1:-2] != like.shape[1:-2]:
        raise ValueError(f"real samples {tuple(real.shape)} do not fit the generator's {tuple(like.shape)}")
    if real.shape[-2:] != like.shape[-2:]:
        if real.dim() != 4:
            raise ValueError("real samples must come at the matching resolution for video backbones")
        real = torch.nn.functional.interpolate(real.float(), size=like.shape[-2:], mode="bilinear",
                                               align_corners=False, antialias=True).to(like.dtype)
    return real


def generator_extras(base: SharedBase, den: torch.nn.Module, cfg: MethodConfig, X: torch.Tensor,
                     real: torch.Tensor, tau: torch.Tensor, z: torch.Tensor, cond: Conditioning,
                     head: Optional[torch.nn.Module], w_k: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The generator's GAN and PDM terms (METHOD 6): their gradient with respect to ``X``, and their values.

    Both read the generator sample noised as ``(1 - tau) X + tau z`` -- the construction the
    discriminator is trained on, and (with the same tau and z applied to ``real``) PDM's
    "same noise" pairing. Each term's graph runs through another role's forward (fake for
    the GAN, ``pdm_role`` for PDM), so it is differentiated under that role, to ``X`` only.
    """
    x = X.detach().requires_grad_(True)
    tb = _bcast(tau, x)
    grad = torch.zeros_like(x, dtype=torch.float32)
    logs: dict[str, float] = {}
    if cfg.gan_weight > 0:
        with base.as_role("fake"):
            logits = head(features(base.model, cfg.gan_block, den, (1 - tb) * x + tb * z, tau, cond))
            loss = gan_generator_loss(logits)  # non-saturating softplus(-D) (DMD2)
            (g,) = torch.autograd.grad((w_k * cfg.gan_weight * loss).mean(), x)
        grad += g.float()
        logs["loss_gan_generator"] = loss.mean().item()
    if cfg.pdm_weight > 0:
        with base.as_role(cfg.pdm_role):
            with torch.no_grad():
                f_real = features(base.model, cfg.pdm_block, den, (1 - tb) * real + tb * z, tau, cond)
            f_gen = features(base.model, cfg.pdm_block, den, (1 - tb) * x + tb * z, tau, cond)
            loss = pdm_loss(f_gen, f_real, cfg.pdm_kernel)
            (g,) = torch.autograd.grad((w_k * cfg.pdm_weight * loss).mean(), x)
        grad += g.float()
        logs["loss_pdm"] = loss.mean().item()
    return grad, logs


def distill_iteration(
    base: SharedBase,
    make_denoiser: Callable[[], torch.nn.Module],
    plan: StagePlan,
    cond: Conditioning,
    uncond: Conditioning,
    cfg: MethodConfig,
    iteration: int,
    seed: int,
    opt_generator: torch.optim.Optimizer,
    opt_fake: torch.optim.Optimizer,
    stage_loss_weight: Optional[Sequence[float]] = None,
    grad_clip: float = 1.0,
    real: Optional[torch.Tensor] = None,
    head: Optional[torch.nn.Module] = None,
    schedule_seed: Optional[int] = None,
) -> StepLosses:
    """One generator update and ``cfg.fake_updates`` fake-score updates (Algorithm 1).

    ``schedule_seed`` (default: from ``seed``) draws the stage and step alone. Sharded (FSDP)
    training passes the same value on every rank: each network call is then a collective, so
    every rank must make the same calls (the backward simulation's length depends on the step).

    With GAN or PDM on, ``real`` holds clean real samples for the batch's prompts in the
    denoiser's state space (resized to the matching resolution if they differ), and with
    the GAN on, ``head`` is the discriminator head, whose parameters must be in ``opt_fake``.
    """
    if cfg.needs_real and real is None:
        raise ValueError("gan_weight / pdm_weight > 0 need real samples: pass real=")
    if cfg.gan_weight > 0 and head is None:
        raise ValueError("gan_weight > 0 needs the discriminator head: pass head=")
    gan = cfg.gan_weight > 0
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(rng.randrange(2**63))
    den = make_denoiser()  # the adapter over base.model; its behaviour follows base's active role
    b = len(cond)
    dev = cond.embeds.device  # random draws come from the CPU generator ``g`` and are moved here
    stage, step = pick_stage_and_step(plan, cfg, iteration, rng if schedule_seed is None else random.Random(schedule_seed))
    s = plan.steps[step]
    # matching resolution in latent units (plan sizes are pixels; they differ for VAE backbones)
    target = tuple(den.latent_shape(plan.teacher_size if cfg.cross_resolution else s.size)[-2:])
    w_k = 1.0 if stage_loss_weight is None else float(stage_loss_weight[stage])

    def generate() -> tuple[torch.Tensor, torch.Tensor]:
        base.role("generator")
        x = simulate(den, plan, cond, step, cfg, g, den.latent_shape)
        return den(x, torch.full((b,), s.t, device=dev), cond)

    def lift(x0: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x0.shape[-2:] == tuple(target):
            return x0, eps
        return upsample(x0, target, cfg.upsample), upsample_noise(eps, target, cfg.upsample)

    # --- generator update (Eqs. 4-8) ---
    x0_hat, eps_hat = generate()
    X, E = lift(x0_hat, eps_hat.detach())
    tau = draw_tau(plan, cfg, stage, step, b, g).to(dev)
    z = torch.randn(X.shape, generator=g).to(dev)
    gamma = cfg.gamma if cfg.cross_resolution and X.shape != x0_hat.shape else 0.0
    x_tau = renoise(X, E, tau, gamma, z).detach()  # Eq. 4 with the Eq. 10 noise mix
    with torch.no_grad():
        with base.as_role("teacher"):
            x0_real, _ = CFGDenoiser(den, uncond, cfg.guidance_scale)(x_tau, tau, cond)
        with base.as_role("fake"):
            x0_fake, _ = den(x_tau, tau, cond)
    direction = dm_direction(X.detach(), x0_fake, x0_real, cfg.min_divisor)
    loss_g = (w_k * dm_generator_loss(X, direction, cfg.huber_c)).mean()
    logs: dict[str, float] = {}
    loss_g_value = None
    if cfg.needs_real:
        real = _real_at(real, X.detach())
        grad_x, logs = generator_extras(base, den, cfg, X, real, tau, z, cond, head, w_k)
        # (X * grad_x).sum() has gradient grad_x in X: chains the extra terms into the generator's graph
        loss_g_value = loss_g.item() + w_k * (cfg.gan_weight * logs.get("loss_gan_generator", 0.0)
                                              + cfg.pdm_weight * logs.get("loss_pdm", 0.0))
        loss_g = loss_g + (X.float() * grad_x).sum()
    opt_generator.zero_grad(set_to_none=True)
    base.backward(loss_g, "generator")
    skipped_generator = not guarded_step(opt_generator, base.parameters("generator"), loss_g, grad_clip)

    # --- fake-score updates (Eq. 9), with the discriminator head's classifier loss when the GAN is on ---
    fake_params = base.parameters("fake") + (list(head.parameters()) if gan else [])
    fake_losses, disc_losses = [], []
    skipped_fake = 0
    X_fake = X.detach()
    for j in range(cfg.fake_updates):
        if j > 0:  # later updates see fresh generator samples, as in DMD2
            with torch.no_grad():
                x0_new, eps_new = generate()
            X_fake, _ = lift(x0_new, eps_new)
        tau_f = draw_tau(plan, cfg, stage, step, b, g).to(dev)
        tf = tau_f.view(-1, *([1] * (X_fake.dim() - 1)))
        x_t = (1 - tf) * X_fake + tf * torch.randn(X_fake.shape, generator=g).to(dev)
        base.role("fake")
        if gan:
            with BlockFeatures(base.model, cfg.gan_block) as tap:
                x0_pred, _ = den(x_t, tau_f, cond)
                f_fake = tap.value
            # real images noised at the same tau' (DMD2 classifies noisy real vs noisy generated)
            x_r = (1 - tf) * real + tf * torch.randn(real.shape, generator=g).to(dev)
            f_real = features(base.model, cfg.gan_block, den, x_r, tau_f, cond)
            loss_d = gan_discriminator_loss(head(f_real), head(f_fake)).mean()
        else:
            x0_pred, _ = den(x_t, tau_f, cond)
        loss_f = fake_score_loss(x0_pred, X_fake, tau_f, cfg.snr_clip).mean()
        opt_fake.zero_grad(set_to_none=True)
        total_f = loss_f + cfg.gan_disc_weight * loss_d if gan else loss_f
        base.backward(total_f, "fake")
        skipped_fake += not guarded_step(opt_fake, fake_params, total_f, grad_clip)
        fake_losses.append(loss_f.item())
        if gan:
            disc_losses.append(loss_d.item())
    base.role("generator")
    if disc_losses:
        logs["loss_gan_discriminator"] = sum(disc_losses) / len(disc_losses)
    return StepLosses(loss_g.item() if loss_g_value is None else loss_g_value, sum(fake_losses) / len(fake_losses),
                      stage, step, float(direction.flatten(1).norm(dim=1).mean()), **logs,
                      skipped_generator=skipped_generator, skipped_fake=skipped_fake)
