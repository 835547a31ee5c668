"""rmd.sampler: the cascaded sampler (METHOD 4, Algorithm 2).

Independent truths used here:
- diffusers' own schedulers (FlowMatchEulerDiscreteScheduler, DDIMScheduler) driving the
  same tiny networks: with eta = 1 and one stage the sampler must reproduce them;
- Gaussian data, for which the ideal denoiser and the exact moments of every step are
  closed-form scalar recursions;
- Monte-Carlo variances of the re-noised state after a resolution switch;
- re-running images alone, in other batches and orders.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

from rmd import tiny
from rmd.denoisers import CFGDenoiser, Conditioning, Denoiser, SizeError
from rmd.plan import make_plan
from rmd.sampler import sample
from rmd.schedules import t_from_alpha, uniform_times
from rmd.upsample import MODES, upsample, upsample_noise

# ---------------------------------------------------------------------------------------
# Test-local pixel-space denoisers (vae factor 1) with closed-form behaviour
# ---------------------------------------------------------------------------------------


def _dummy_cond(batch: int) -> Conditioning:
    return Conditioning(torch.zeros(batch, 1, 1))


class _PixelDenoiser(Denoiser):
    """Size bookkeeping of the real base class, with a closed-form ``predict``; counts calls."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__(nn.Identity(), latent_channels=channels)
        self.calls = 0

    def forward(self, x, t, cond):
        self.check_latent(x)
        self.calls += 1
        tb = t.double().view(-1, *([1] * (x.ndim - 1)))
        x0 = self.predict(x.double(), tb)
        eps = (x.double() - (1 - tb) * x0) / tb  # the RF identity x = (1 - t) x0 + t eps
        return x0.float(), eps.float()


class GaussianMMSE(_PixelDenoiser):
    """Ideal (MMSE) denoiser for data x0 ~ N(mu, s^2) i.i.d. per element.

    x_t = (1 - t) x0 + t eps is jointly Gaussian with x0, so
    E[x0 | x_t] = mu + k(t) (x_t - (1 - t) mu),  k(t) = (1 - t) s^2 / ((1 - t)^2 s^2 + t^2).
    """

    def __init__(self, mu: float, s: float) -> None:
        super().__init__()
        self.mu, self.s = mu, s

    def gain(self, t):
        return (1 - t) * self.s**2 / ((1 - t) ** 2 * self.s**2 + t**2)

    def predict(self, x, t):
        return self.mu + self.gain(t) * (x - (1 - t) * self.mu)


class GaussianPosteriorSampler(GaussianMMSE):
    """The ideal few-step generator: a draw from p(x0 | x_t) = N(E[x0 | x_t], v(t)),
    v(t) = s^2 t^2 / ((1 - t)^2 s^2 + t^2). Then (x0_hat, eps_hat) is distributed as the
    true (x0, eps), so every eta keeps every step at its exact marginal."""

    def __init__(self, mu: float, s: float, seed: int) -> None:
        super().__init__(mu, s)
        self.gen = torch.Generator().manual_seed(seed)

    def predict(self, x, t):
        var = self.s**2 * t**2 / ((1 - t) ** 2 * self.s**2 + t**2)
        noise = torch.randn(x.shape, generator=self.gen, dtype=torch.float64)
        return super().predict(x, t) + var.sqrt() * noise


def _mmse_moments(times, mu, s, eta):
    """Exact mean and variance of the sampler's output with GaussianMMSE (scalar recursion).

    With m = E[x], V = Var[x] at step i: x0_hat = mu + k (x - (1 - t) mu) and
    eps_hat = (x - (1 - t) x0_hat) / t are affine in x, z is independent fresh noise, so
    x' = (1 - t') x0_hat + t' (eta eps_hat + sqrt(1 - eta^2) z) has
    slope a = (1 - t') k + t' eta (1 - (1 - t) k) / t and Var' = a^2 V + t'^2 (1 - eta^2).
    """
    m, var = 0.0, 1.0  # the start: pure noise at t = 1
    for i, t in enumerate(times):
        k = (1 - t) * s**2 / ((1 - t) ** 2 * s**2 + t**2)
        m0 = mu + k * (m - (1 - t) * mu)
        if i + 1 == len(times):
            return m0, k * k * var
        tn = times[i + 1]
        me = (m - (1 - t) * m0) / t
        a = (1 - tn) * k + tn * eta * (1 - (1 - t) * k) / t
        m = (1 - tn) * m0 + tn * eta * me
        var = a * a * var + tn * tn * (1 - eta * eta)


MU, S = 0.3, 0.5
N_IMG, SIDE = 16, 64  # 16 x 64 x 64 = 65536 i.i.d. elements: sd of a variance estimate ~ 0.55 %


def _moments(out):
    return out.double().mean().item(), out.double().var().item()


def test_gaussian_ode_limit_reproduces_the_data():
    # eta = 1 is Euler/DDIM on the probability-flow ODE; with the ideal denoiser and many
    # steps its output distribution is the data distribution
    n_steps = 500
    plan = make_plan(n_steps, str(SIDE))
    out = sample(GaussianMMSE(MU, S), plan, _dummy_cond(N_IMG), list(range(N_IMG)), eta=1.0, gamma=1.0)
    mean, var = _moments(out)
    assert mean == pytest.approx(MU, abs=0.01)  # sd of the mean estimate: 0.002
    assert var == pytest.approx(S**2, rel=0.03)
    # the discretisation bias at 500 steps (first order in 1/N) is 0.6 %; the recursion confirms it
    assert _mmse_moments(plan.times(), MU, S, 1.0)[1] == pytest.approx(S**2, rel=0.01)


@pytest.mark.parametrize("eta", [0.0, 0.5, 0.9, 1.0])
def test_gaussian_few_steps_match_the_exact_moment_recursion(eta):
    plan = make_plan(6, str(SIDE))
    out = sample(GaussianMMSE(MU, S), plan, _dummy_cond(N_IMG), list(range(100, 100 + N_IMG)), eta=eta, gamma=1.0)
    want_mean, want_var = _mmse_moments(plan.times(), MU, S, eta)
    mean, var = _moments(out)
    assert mean == pytest.approx(want_mean, abs=0.01)
    assert var == pytest.approx(want_var, rel=0.03)


def test_fresh_noise_with_an_mmse_denoiser_loses_variance():
    # a fact about MMSE denoisers, not a sampler bug: re-noising the posterior MEAN with fresh
    # noise (eta = 0) ends near half the data variance even with 200 steps (eta = 0.9: 0.93);
    # only eta = 1 (the ODE) or a generator that samples the posterior (next test) keeps it.
    # Checked on the sampler itself, not only on the recursion:
    plan = make_plan(200, "16")
    for eta, want in ((0.0, 0.485), (1.0, 0.985)):
        assert _mmse_moments(plan.times(), MU, S, eta)[1] / S**2 == pytest.approx(want, abs=0.005)
        out = sample(GaussianMMSE(MU, S), plan, _dummy_cond(64), list(range(64)), eta=eta, gamma=1.0)
        assert _moments(out)[1] / S**2 == pytest.approx(want, rel=0.03)


@pytest.mark.parametrize("eta", [0.0, 0.5, 0.9, 1.0])
def test_gaussian_ideal_generator_reproduces_the_data_for_every_eta(eta):
    # 4 steps, fresh noise (eta = 0, DMD2) included: exact marginals at every step, hence
    # exact data moments; a wrong mixing rule (e.g. (1 - eta) z) would shrink the variance
    plan = make_plan(4, str(SIDE))
    den = GaussianPosteriorSampler(MU, S, seed=7)
    out = sample(den, plan, _dummy_cond(N_IMG), list(range(200, 200 + N_IMG)), eta=eta, gamma=1.0)
    mean, var = _moments(out)
    assert mean == pytest.approx(MU, abs=0.01)
    assert var == pytest.approx(S**2, rel=0.03)


# ---------------------------------------------------------------------------------------
# The resolution switch keeps the noise at unit variance (Eq. 10 with Up_n)
# ---------------------------------------------------------------------------------------


class _NoiseOnly(_PixelDenoiser):
    """x0_hat = 0, so eps_hat = x / t and, after the switch, x / t is exactly the noise part."""

    def predict(self, x, t):
        return torch.zeros_like(x)


@pytest.mark.parametrize("sizes", ["8,16", "16,24"])  # x2 and the non-integer x1.5
@pytest.mark.parametrize("mode", MODES)
def test_noise_after_the_switch_is_unit_variance_per_element(mode, sizes):
    # two steps: t = 1 at the low size, t = 0.5 at the high size (threshold -2 puts the switch there)
    plan = make_plan(None, sizes, thresholds=[-2.0], times=[1.0, 0.5])
    assert plan.allocation == (1, 1)
    n = 1000
    seen = {}

    def record(i, x, x0_hat, eps_hat):
        seen[i] = (x, eps_hat)

    den = _NoiseOnly(channels=4)  # 4 channels x 1000 images = 4000 samples per position
    for gamma in (0.0, 0.2, 0.5, 0.9, 1.0):
        # eta is set to something else on purpose: only gamma may act at a switch
        sample(den, plan, _dummy_cond(n), list(range(n)), eta=0.3, gamma=gamma, upsample_mode=mode, callback=record)
        e = seen[1][0] / 0.5  # noise component of the re-noised state at t = 0.5
        eps_low = seen[0][1]  # the predicted noise at the low size (white: the start noise)
        hw = tuple(e.shape[-2:])
        var = e.transpose(0, 1).reshape(-1, *hw).var(dim=0)  # per position
        # sd of each estimate: sqrt(2 / 4000) = 0.022; 24 x 24 positions -> max within 5 sd
        assert (var - 1).abs().max() < 0.11, (gamma, var.min().item(), var.max().item())
        assert var.mean().item() == pytest.approx(1.0, abs=0.01)
        # gamma is the correlation with the (variance-corrected) upsampled predicted noise
        up = upsample_noise(eps_low, hw, mode)
        corr = (e * up).mean() / (e.std() * up.std())
        assert corr.item() == pytest.approx(gamma, abs=0.02)
        if mode != "nearest" and gamma == 1.0:
            # without the correction the same state would carry far too little noise
            assert upsample(eps_low, hw, mode).var().item() < 0.8


# ---------------------------------------------------------------------------------------
# Oracles: diffusers' schedulers on the same tiny networks
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundles():
    return {name: tiny.tiny(name) for name in ("sdxl", "pixart", "sd3", "wan")}


def _start_noise(seeds, shape):
    """The sampler's documented first draw: image i's initial noise from Generator(seeds[i])."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def _close(got, want, rel=1e-5):
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * want.abs().max().item())


@pytest.mark.parametrize("guided", [False, True])
def test_one_stage_eta1_is_flow_match_euler(bundles, guided):
    b = bundles["sd3"]
    times = uniform_times(4, shift=3.0)  # [1, 0.9, 0.75, 0.5]: non-uniform steps
    plan = make_plan(None, "32", times=times)
    seeds = [5, 6, 7]
    cond = b.make_cond(3, seed=40)
    den = CFGDenoiser(b.denoiser, b.uncond, b.guidance) if guided else b.denoiser
    got = sample(den, plan, cond, seeds, eta=1.0, gamma=0.0)

    # the reference: diffusers' Euler scheduler calling the raw SD3 transformer (velocity)
    model = b.model
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(sigmas=times)
    torch.testing.assert_close(sched.sigmas[:-1].double(), torch.tensor(times, dtype=torch.float64))
    x = _start_noise(seeds, (4, 4, 4))
    uncond = b.uncond.expand(3)
    with torch.no_grad():
        for ts in sched.timesteps:
            def velocity(c):
                return model(hidden_states=x, encoder_hidden_states=c.embeds, pooled_projections=c.pooled,
                             timestep=ts.expand(3), return_dict=False)[0]

            v = velocity(cond)
            if guided:
                v_u = velocity(uncond)
                v = v_u + b.guidance * (v - v_u)
            x = sched.step(v, ts, x).prev_sample  # the last step goes to sigma = 0: x0
    _close(got, x)


@pytest.mark.parametrize("family", ["sdxl", "pixart"])
def test_one_stage_eta1_on_vp_backbone_is_ddim(bundles, family):
    b = bundles[family]
    sched = DDIMScheduler.from_config({**b.scheduler_config, "clip_sample": False, "set_alpha_to_one": True,
                                       "timestep_spacing": "trailing"})
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 749, 499, 249]
    # DDIM's last step goes to alpha = 1 (set_alpha_to_one), so its output is the x0 predicted at
    # k = 249: the sampler's x0_hat after the last step; the steps are the same logSNRs in the RF frame
    ac = sched.alphas_cumprod.double()
    times = [float(t_from_alpha(ac[k])) for k in sched.timesteps.tolist()]
    plan = make_plan(None, "32", times=times)
    seeds = [1, 2, 3]
    cond = b.make_cond(3, seed=50)
    got = sample(b.denoiser, plan, cond, seeds, eta=1.0, gamma=0.0)

    model = b.model
    x = _start_noise(seeds, (4, 4, 4))  # DDIM starts from N(0, I) (init_noise_sigma = 1)
    with torch.no_grad():
        for k in sched.timesteps:
            kk = k.expand(3)
            if family == "sdxl":  # SDXL pipeline's added conditioning: (orig, crop (0, 0), target) = 32 px
                added = {"text_embeds": cond.pooled, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 3)}
                out = model(x, kk, encoder_hidden_states=cond.embeds, added_cond_kwargs=added,
                            encoder_attention_mask=cond.mask, return_dict=False)[0]
            else:  # PixArt learns sigma: the first 4 of its 8 output channels are eps
                out = model(x, encoder_hidden_states=cond.embeds, timestep=kk,
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                            encoder_attention_mask=cond.mask, return_dict=False)[0][:, :4]
            x = sched.step(out, k, x, eta=0.0).prev_sample
    _close(got, x)


# ---------------------------------------------------------------------------------------
# Cascades on the four backbone families: shapes, seeds, batch-size and order independence
# ---------------------------------------------------------------------------------------

PLANS = {
    # 4 uniform steps; METHOD 3's rule: 32 -> 64 at -2.5 gives 2+2; 32 -> 48 -> 64 at (-3.5, -2) gives 1+1+2
    "2-stage": ("32,64", [-2.5], (2, 2)),
    "3-stage": ("32,48,64", [-3.5, -2.0], (1, 1, 2)),  # 32 -> 48 is the non-integer x1.5 switch
}
CASES = [(f, None) for f in ("sdxl", "pixart", "sd3")] + [("wan", n) for n in (1, 5, 9)]


def _plan(kind):
    sizes, thresholds, allocation = PLANS[kind]
    plan = make_plan(4, sizes, thresholds)
    assert plan.allocation == allocation
    return plan


def _allclose(a, b):
    # tight: only float32 rounding of batched kernels may differ (outputs are O(1..100))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("kind", PLANS)
@pytest.mark.parametrize("family,frames", CASES)
def test_cascade_shapes_seeds_batching_and_order(bundles, family, frames, kind):
    b = bundles[family]
    plan = _plan(kind)
    den = CFGDenoiser(b.denoiser, b.uncond, b.guidance)
    cond = b.make_cond(4, seed=10)
    seeds = [11, 22, 33, 44]
    # eta, gamma < 1, so the fresh-noise streams matter at every transition
    kw = dict(eta=0.5, gamma=0.5, num_frames=frames)

    full = sample(den, plan, cond, seeds, **kw)
    t_lat = 1 if frames is None else (frames - 1) // 4 + 1
    assert full.shape == ((4, 4, 8, 8) if frames is None else (4, 4, t_lat, 8, 8))  # 64 px / VAE 8
    assert torch.isfinite(full).all()

    # deterministic under seeds ...
    torch.testing.assert_close(sample(den, plan, cond, seeds, **kw), full, rtol=0, atol=0)
    # ... and the seeds matter: a different seed for image 0 changes image 0 only
    other = sample(den, plan, cond, [12, 22, 33, 44], **kw)
    assert (other[0] - full[0]).abs().max() > 1e-2 * full[0].abs().max()
    _allclose(other[1:], full[1:])

    # independent of batch size: two batches of 2, and batch_size=1
    halves = torch.cat([sample(den, plan, cond.index(slice(0, 2)), seeds[:2], **kw),
                        sample(den, plan, cond.index(slice(2, 4)), seeds[2:], **kw)])
    _allclose(halves, full)
    _allclose(sample(den, plan, cond, seeds, batch_size=1, **kw), full)
    _allclose(sample(den, plan, cond, seeds, batch_size=3, **kw), full)

    # independent of order and company: reversed batch, and image 2 among other prompts/seeds
    rev = sample(den, plan, cond.index([3, 2, 1, 0]), seeds[::-1], **kw)
    _allclose(rev.flip(0), full)
    mixed = Conditioning.cat([b.make_cond(2, seed=90), cond.index(2)])
    _allclose(sample(den, plan, mixed, [7, 8, 33], **kw)[2], full[2])


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_every_transition_replays_algorithm_2(bundles, family):
    # rebuild each state from the previous step's predictions and the per-image noise stream
    # (initial noise, then one z per transition, in order), with the formulas of METHOD 4
    b = bundles[family]
    if family == "sdxl":  # DDIM's logSNRs: the first time is 0.936 < 1, so the start is scaled
        ac = b.denoiser.alphas_cumprod
        plan = make_plan(None, "32,64", [-2.5], times=[float(t_from_alpha(ac[k])) for k in (999, 749, 499, 249)])
        mode = "bilinear"
    else:
        plan = _plan("3-stage")
        mode = "bicubic"
    eta, gamma, seeds = 0.7, 0.4, [3, 9]
    calls = []
    out, traj = sample(b.denoiser, plan, b.make_cond(2, seed=4), seeds, eta=eta, gamma=gamma, upsample_mode=mode,
                       return_intermediates=True, callback=lambda i, *tensors: calls.append((i, tensors)))
    assert [i for i, _ in calls] == [0, 1, 2, 3]
    for i, (x, x0, eps) in enumerate(zip(traj.x, traj.x0_hat, traj.eps_hat)):
        assert all(torch.equal(u, v) for u, v in zip(calls[i][1], (x, x0, eps)))
        assert x.shape[-1] == plan.steps[i].size[-1] // 8
    torch.testing.assert_close(out, traj.x0_hat[-1], rtol=0, atol=0)

    gens = [torch.Generator().manual_seed(s) for s in seeds]
    draw = lambda shape: torch.stack([torch.randn(shape, generator=g) for g in gens])  # noqa: E731
    t0 = plan.steps[0].t
    _close(traj.x[0], math.sqrt((1 - t0) ** 2 + t0**2) * draw(traj.x[0].shape[1:]))
    for i in range(plan.num_steps - 1):
        x0, eps, nxt = traj.x0_hat[i], traj.eps_hat[i], traj.x[i + 1]
        t = plan.steps[i + 1].t
        z = draw(nxt.shape[1:])
        if plan.steps[i + 1].size == plan.steps[i].size:
            want = (1 - t) * x0 + t * (eta * eps + math.sqrt(1 - eta**2) * z)
        else:
            hw = nxt.shape[-2:]
            want = (1 - t) * upsample(x0, hw, mode) + t * (gamma * upsample_noise(eps, hw, mode)
                                                             + math.sqrt(1 - gamma**2) * z)
        _close(nxt, want)


@pytest.mark.parametrize("family,frames", [("sd3", None), ("wan", 5)])
def test_decode_returns_pixels(bundles, family, frames):
    b = bundles[family]
    plan = _plan("2-stage")
    cond, seeds = b.make_cond(2, seed=3), [1, 2]
    lat = sample(b.denoiser, plan, cond, seeds, eta=0.9, gamma=1.0, num_frames=frames)
    img = sample(b.denoiser, plan, cond, seeds, eta=0.9, gamma=1.0, num_frames=frames, decode=b.codec.decode,
                 batch_size=1)
    assert img.shape == ((2, 3, 64, 64) if frames is None else (2, 3, frames, 64, 64))
    with torch.no_grad():
        _close(img, b.codec.decode(lat), rel=1e-4)


# ---------------------------------------------------------------------------------------
# Bad input fails before any network call
# ---------------------------------------------------------------------------------------


def test_bad_input_raises_before_work(bundles):
    den = _NoiseOnly(channels=4)
    plan = make_plan(4, "16,32", [-2.5])
    cond = _dummy_cond(2)
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        sample(den, plan, cond, [1, 2, 3], eta=0.5, gamma=0.5)
    with pytest.raises(TypeError):
        sample(den, plan, cond, [1, 2.5], eta=0.5, gamma=0.5)
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="eta"):
            sample(den, plan, cond, [1, 2], eta=bad, gamma=0.5)
        with pytest.raises(ValueError, match="gamma"):
            sample(den, plan, cond, [1, 2], eta=0.5, gamma=bad)
    with pytest.raises(ValueError, match="upsample_mode"):
        sample(den, plan, cond, [1, 2], eta=0.5, gamma=0.5, upsample_mode="area")
    with pytest.raises(ValueError, match="batch_size"):
        sample(den, plan, cond, [1, 2], eta=0.5, gamma=0.5, batch_size=0)
    assert den.calls == 0

    # sizes the backbones cannot take (rmd.denoisers.SizeError is a ValueError)
    sd3, wan = bundles["sd3"], bundles["wan"]
    c1 = sd3.make_cond(1)
    with pytest.raises(SizeError, match="multiple of 16"):  # 40 px: VAE 8 x patch 2
        sample(sd3.denoiser, make_plan(4, "32,40", [-2.5]), c1, [0], eta=0.5, gamma=0.5)
    with pytest.raises(SizeError, match="pos_embed_max_size"):  # 144 px > 8 patches x 2 x 8
        sample(sd3.denoiser, make_plan(4, "64,144", [-2.5]), c1, [0], eta=0.5, gamma=0.5)
    with pytest.raises(SizeError, match="image model"):
        sample(sd3.denoiser, _plan("2-stage"), c1, [0], eta=0.5, gamma=0.5, num_frames=5)
    with pytest.raises(SizeError, match="4k\\+1|not 4"):
        sample(wan.denoiser, _plan("2-stage"), wan.make_cond(1), [0], eta=0.5, gamma=0.5, num_frames=4)


class _ZeroX0:
    """A 3-channel denoiser predicting x0_hat = 0 and a constant eps_hat, so every state is
    the noise mixture alone and the per-image draws can be read back from it."""

    def __init__(self, eps: float):
        self.eps = eps

    def check_size(self, s, f):
        pass

    def latent_shape(self, s, f):
        return (3, *s)

    def __call__(self, x, t, c):
        return torch.zeros_like(x), torch.full_like(x, self.eps)


@pytest.mark.parametrize("size", [8, 5])  # 3 x 8 x 8 draws in one call per image; 3 x 5 x 5 one per step
def test_each_image_draws_its_initial_noise_then_one_z_per_transition(size):
    """The stream an image's seed gives, recovered from the states: x_0 = std(t_0) eps_0 and,
    with x0_hat = 0 and eta = 0, x_1 = t_1 z_1 and x_2 = t_2 z_2."""
    from rmd.plan import make_plan
    from rmd.schedules import marginal_std

    plan = make_plan(3, [size])
    cond = Conditioning(torch.zeros(2, 1, 4))
    _, traj = sample(_ZeroX0(eps=1.0), plan, cond, [11, 12], eta=0.0, gamma=1.0, return_intermediates=True)
    for i, seed in enumerate([11, 12]):
        g = torch.Generator().manual_seed(seed)
        want = [torch.randn((3, size, size), generator=g) for _ in range(3)]
        torch.testing.assert_close(traj.x[0][i], float(marginal_std(plan.steps[0].t)) * want[0], rtol=0, atol=1e-6)
        for k in (1, 2):
            torch.testing.assert_close(traj.x[k][i], plan.steps[k].t * want[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("eta,gamma", [(1.0, 0.5), (0.0, 1.0), (0.3, 0.6)])
def test_unused_draws_keep_their_place_in_the_stream(eta, gamma):
    """With x0_hat = eps_hat = 0 every state is x_k = t_k sqrt(1 - mix_k^2) z_k, so each z_k
    can be read back: it must be the k-th draw of the image's full stream whether or not the
    draws before it had any weight (a trailing unused draw is skipped; its state is 0)."""
    from rmd.plan import make_plan

    plan = make_plan(4, [8, 16], [-2.5])
    assert [s.size[-1] for s in plan.steps] == [8, 8, 16, 16]
    mixes = [None, eta, gamma, eta]
    _, traj = sample(_ZeroX0(eps=0.0), plan, Conditioning(torch.zeros(2, 1, 4)), [5, 6], eta=eta, gamma=gamma,
                     return_intermediates=True)
    for i, seed in enumerate([5, 6]):
        g = torch.Generator().manual_seed(seed)
        want = [torch.randn((3, s.size[-1], s.size[-1]), generator=g) for s in plan.steps]
        for k in (1, 2, 3):
            weight = plan.steps[k].t * math.sqrt(1 - mixes[k] ** 2)
            torch.testing.assert_close(traj.x[k][i], weight * want[k], rtol=0, atol=1e-6)
