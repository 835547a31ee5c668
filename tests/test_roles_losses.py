"""Distillation losses against hand-computed values, the DM gradient on analytic Gaussians,
and the peft pitfalls that rmd.distill.roles.SharedBase contains."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from rmd.denoisers import SD3Denoiser
from rmd.distill.losses import (dm_direction, dm_generator_loss, fake_score_loss, gan_discriminator_loss,
                                gan_generator_loss, pdm_loss, pseudo_huber, pseudo_huber_c, snr_weight)
from rmd.distill.roles import SharedBase

from helpers import perturb, tiny_base, toy_batch

# --- losses: hand-computed values -----------------------------------------------------------


def test_pseudo_huber_constant_and_value():
    assert pseudo_huber_c(3072) == pytest.approx(0.00054 * 55.42562584220407)  # sqrt(3 * 32 * 32)
    a = torch.zeros(2, 4)
    b = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    c = 0.00054 * 2.0  # d = 4
    want = [math.sqrt(25 + c * c) - c, math.sqrt(1 + c * c) - c]
    assert pseudo_huber(a, b).tolist() == pytest.approx(want, rel=1e-6)
    assert pseudo_huber(a, b, c=1.0).tolist() == pytest.approx([math.sqrt(26) - 1, math.sqrt(2) - 1], rel=1e-6)
    # 4-D input: the norm runs over every value of a sample
    assert pseudo_huber(a.view(2, 1, 2, 2), b.view(2, 1, 2, 2)).tolist() == pytest.approx(want, rel=1e-6)


def test_snr_weight_and_clip_and_fake_score_loss():
    t = torch.tensor([0.5, 0.2, 0.8])
    assert snr_weight(t).tolist() == pytest.approx([1.0, 16.0, 1 / 16])  # ((1 - t) / t)^2
    assert snr_weight(t, clip=5.0).tolist() == pytest.approx([1.0, 5.0, 1 / 16])
    pred = torch.full((3, 2, 2), 0.5)
    target = torch.zeros(3, 2, 2)
    # x0-MSE = 0.25 per sample, times the clipped SNR weight
    assert fake_score_loss(pred, target, t, clip=5.0).tolist() == pytest.approx([0.25, 1.25, 0.25 / 16])
    assert fake_score_loss(pred, target, t, clip=None).tolist() == pytest.approx([0.25, 4.0, 0.25 / 16])


def test_dm_direction_normalisation_and_clamp():
    x = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    real = torch.zeros(1, 4)
    fake = torch.tensor([[1.0, 0.0, 0.0, -1.0]])
    # divisor = mean |x - x0_real| = 2
    assert dm_direction(x, fake, real).tolist() == [[0.5, 0.0, 0.0, -0.5]]
    # the teacher already agrees (|x - real| = 0.05 < 0.2): the divisor is clamped at 0.2
    near = real + 0.05
    assert dm_direction(near, fake, real)[0].tolist() == pytest.approx([5.0, 0.0, 0.0, -5.0])
    assert dm_direction(near, fake, real, min_divisor=0.01)[0].tolist() == pytest.approx([20.0, 0.0, 0.0, -20.0])


def test_dm_generator_loss_gradient_is_the_bounded_direction():
    """d/dx PseudoHuber(x, sg(x - g)) = g / sqrt(||g||^2 + c^2): the DMD step with a bounded norm (Eq. 8)."""
    x = torch.randn(3, 8, requires_grad=True)
    g = torch.randn(3, 8)
    c = pseudo_huber_c(8)
    dm_generator_loss(x, g).sum().backward()
    want = g / torch.sqrt(g.pow(2).sum(1, keepdim=True) + c * c)
    torch.testing.assert_close(x.grad, want)
    # its value is the pseudo-Huber of g itself
    torch.testing.assert_close(dm_generator_loss(x.detach(), g), torch.sqrt(g.pow(2).sum(1) + c * c) - c)


def test_gan_softplus_losses():
    logits = torch.tensor([[0.0], [2.0]])
    assert gan_generator_loss(logits).tolist() == pytest.approx([math.log(2), math.log(1 + math.exp(-2))])
    real, fake = torch.tensor([[1.0, 3.0]]), torch.tensor([[-1.0, 0.0]])
    sp = lambda v: math.log(1 + math.exp(v))  # noqa: E731  softplus
    want = (sp(-1) + sp(-3)) / 2 + (sp(-1) + sp(0)) / 2  # softplus(-D(real)) + softplus(D(fake)), token means
    assert gan_discriminator_loss(real, fake).tolist() == pytest.approx([want])


def test_pdm_linear_kernel_and_rbf():
    fake = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])  # token mean (2, 0)
    real = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # token mean (0, 1)
    c = 1e-3
    assert pdm_loss(fake, real).tolist() == pytest.approx([math.sqrt(5 + c * c) - c])
    assert pdm_loss(real, real).tolist() == pytest.approx([0.0], abs=1e-12)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 16, 4, generator=g), torch.randn(2, 16, 4, generator=g) + 2.0
    assert pdm_loss(a, a, kernel="rbf").abs().max() < 1e-5
    assert (pdm_loss(a, b, kernel="rbf") > 0.1).all()
    with pytest.raises(ValueError, match="kernel"):
        pdm_loss(a, b, kernel="cosine")


# --- the DM gradient on Gaussians with closed-form denoisers ---------------------------------


def gaussian_x0(x_t: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, s: float) -> torch.Tensor:
    """E[x0 | x_t] for x0 ~ N(mu, s^2 I) and x_t = (1 - t) x0 + t eps (the ideal x0 denoiser)."""
    t = t.view(-1, 1)
    gain = (1 - t) * s * s / ((1 - t) ** 2 * s * s + t * t)
    return mu + gain * (x_t - (1 - t) * mu)


def test_dm_gradient_moves_the_generator_to_the_teacher_gaussian():
    """Teacher data N(mu_r, s^2), generator x0 = theta + s z, fake score = the generator's exact
    denoiser N(theta, s^2). One DM step moves theta toward mu_r; repeated steps reach it."""
    d, s = 4, 0.5
    mu_r = torch.tensor([1.0, -1.0, 0.5, 0.0])
    theta = torch.tensor([3.0, 1.0, -1.5, 2.0], requires_grad=True)
    g = torch.Generator().manual_seed(0)

    def dm_step(lr: float) -> None:
        x = theta + s * torch.randn(256, d, generator=g)
        tau = 0.02 + 0.96 * torch.rand(256, generator=g)
        x_tau = (1 - tau[:, None]) * x.detach() + tau[:, None] * torch.randn(256, d, generator=g)
        x0_real = gaussian_x0(x_tau, tau, mu_r, s)
        x0_fake = gaussian_x0(x_tau, tau, theta.detach(), s)
        direction = dm_direction(x.detach(), x0_fake, x0_real)
        loss = dm_generator_loss(x, direction).mean()
        theta.grad = None
        loss.backward()
        with torch.no_grad():
            theta.sub_(lr * theta.grad)

    gap_before = (theta.detach() - mu_r).abs()
    dm_step(lr=0.1)
    gap_after = (theta.detach() - mu_r).abs()
    assert (gap_after < gap_before - 0.01).all()  # every coordinate moved toward the teacher's mean
    for _ in range(300):
        dm_step(lr=0.05)
    torch.testing.assert_close(theta.detach(), mu_r, atol=0.1, rtol=0)


# --- roles on one shared base ---------------------------------------------------------------

def test_generator_and_fake_start_equal_to_the_teacher():
    base = tiny_base()
    den = SD3Denoiser(base.model, vae_scale_factor=1)
    x, t, cond = toy_batch()
    outs = {}
    with torch.no_grad():
        for role in ("teacher", "generator", "fake"):
            base.role(role)
            outs[role] = den(x, t, cond)[0]
    assert all(p.abs().sum() == 0 for n, p in base.model.named_parameters() if "lora_B" in n)
    assert torch.equal(outs["generator"], outs["teacher"]) and torch.equal(outs["fake"], outs["teacher"])
    perturb(base, "generator", seed=1)
    with torch.no_grad():
        base.role("generator")
        gen = den(x, t, cond)[0]
        base.role("fake")
        fake = den(x, t, cond)[0]
    assert (gen - outs["teacher"]).abs().max() > 1e-3  # the roles really are different networks now
    assert torch.equal(fake, outs["teacher"])


def test_adapter_switching_keeps_lora_trainable():
    base = tiny_base()
    model = base.model
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    # the pitfall: peft's disable_adapters / set_adapter switch requires_grad off
    model.disable_adapters()
    assert not any(p.requires_grad for p in lora)
    model.enable_adapters()
    model.set_adapter("fake")
    assert not any(p.requires_grad for p in base.parameters("generator"))
    # SharedBase restores it on every switch, for both roles
    for role in ("teacher", "fake", "generator"):
        base.role(role)
        assert all(p.requires_grad for p in lora), role
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with base.as_role("teacher"):
        assert base.current == "teacher"
    assert base.current == "generator"


def _generator_grads(base: SharedBase, backward_role: str, plain: bool = False) -> list[torch.Tensor]:
    """Build a generator graph, run a fake-score forward in between (as an iteration does), backprop."""
    den = SD3Denoiser(base.model, vae_scale_factor=1)
    x, t, cond = toy_batch(seed=5)
    for p in base.parameters("generator") + base.parameters("fake"):
        p.grad = None
    base.role("generator")
    loss = den(x, t, cond)[0].pow(2).mean()
    base.role("fake")
    with torch.no_grad():
        den(x, t, cond)
    if plain:
        loss.backward()  # whatever role happens to be active (here: fake)
    else:
        base.backward(loss, backward_role)
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in base.parameters("generator")]


def test_gradient_checkpointing_needs_backward_under_the_graph_role():
    plain, ckpt = tiny_base(), tiny_base()
    for b in (plain, ckpt):  # same init seed: same weights; make the two roles differ
        perturb(b, "generator", seed=1)
        perturb(b, "fake", seed=2)
    ckpt.model.enable_gradient_checkpointing()
    ref = _generator_grads(plain, "generator")
    assert sum(g.abs().sum() for g in ref) > 0
    # right role at backward time: checkpointing recomputes with the generator, grads unchanged
    for a, b in zip(ref, _generator_grads(ckpt, "generator")):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # without checkpointing the active role at backward time does not matter ...
    for a, b in zip(ref, _generator_grads(plain, "fake", plain=True)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # ... with it, recomputing under the wrong role (fake) silently gives wrong gradients
    wrong = _generator_grads(ckpt, "fake", plain=True)
    err = max((a - b).abs().max().item() for a, b in zip(ref, wrong))
    scale = max(a.abs().max().item() for a in ref)
    assert err > 1e-3 * scale


# --- one iteration on a latent (VAE) backbone -------------------------------------------------


def test_distill_iteration_works_in_latent_units():
    """Plan sizes are pixels, states are latents (pixel / 8 here): the cascade's upsampling and the
    cross-resolution target must be taken in latent units (a 32 -> 64 px plan is 4 -> 8 latents)."""
    from rmd.distill.algorithm import MethodConfig, distill_iteration
    from rmd.plan import make_plan
    from rmd.tiny import tiny_sd3

    bundle = tiny_sd3()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = SharedBase(bundle.model, rank=4)
    plan = make_plan(4, [32, 64], [-2.5])
    cfg = MethodConfig(stage_weights=[0.0, 1.0])  # always stage 2: simulation crosses the switch
    opt_g = torch.optim.AdamW(base.parameters("generator"), lr=1e-3)
    opt_f = torch.optim.AdamW(base.parameters("fake"), lr=1e-3)
    res = distill_iteration(base, lambda: bundle.denoiser, plan, bundle.make_cond(2, seed=3), bundle.uncond, cfg,
                            iteration=0, seed=11, opt_generator=opt_g, opt_fake=opt_f)
    assert res.stage == 1 and res.step in (2, 3)
    assert math.isfinite(res.loss_generator) and math.isfinite(res.loss_fake)
    assert any(p.abs().max() > 0 for n, p in base.model.named_parameters() if "lora_B" in n and ".generator." in n)


def test_lora_weights_stay_float32_and_learn_on_a_bf16_base():
    # independent truth: bf16 has 8 significant bits, so a weight of 0.01 cannot take a step of
    # 1e-5 (its neighbours are 3.9e-5 away); float32 adapters must keep such steps
    from rmd.distill.roles import SharedBase
    from rmd.toy.teacher import TeacherConfig, build_transformer

    from helpers import TINY

    base = SharedBase(build_transformer(TeacherConfig(**{**TINY, "num_layers": 1})).to(torch.bfloat16), rank=4)
    params = base.parameters("generator")
    assert params and all(p.dtype == torch.float32 for p in params + base.parameters("fake"))
    assert next(base.model.proj_out.parameters()).dtype == torch.bfloat16  # the frozen base is unchanged
    x, t, cond = toy_batch()
    den = SD3Denoiser(base.model)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    had_grad = [False] * len(params)
    for _ in range(3):
        opt.zero_grad()
        x0, _ = den(x.bfloat16(), t, type(cond)(cond.embeds.bfloat16(), cond.pooled.bfloat16()))
        x0.float().square().mean().backward()
        had_grad = [h or (p.grad is not None and bool(p.grad.abs().max() > 0)) for h, p in zip(had_grad, params)]
        opt.step()
    # lora_A has no gradient until lora_B leaves zero; the last block's text query is unused
    assert sum(had_grad) >= len(params) - 2
    stuck = [i for i, (a, p, h) in enumerate(zip(before, params, had_grad)) if h and torch.equal(a, p.detach())]
    assert not stuck, f"{len(stuck)} LoRA tensors with gradients did not move"
