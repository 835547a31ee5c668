"""Schedule math against closed forms and against diffusers' own schedulers."""

import math

import pytest
import torch

from rmd import schedules as S


@pytest.mark.parametrize("t", [1e-4, 0.1, 0.25, 0.5, 0.75, 0.9, 0.9999])
def test_logsnr_round_trip_and_definition(t):
    lam = S.logsnr_from_t(t)
    # closed form: SNR = ((1 - t) / t)^2 for x_t = (1 - t) x0 + t eps
    assert lam == pytest.approx(math.log(((1 - t) / t) ** 2), rel=1e-12, abs=1e-12)
    assert S.t_from_logsnr(lam) == pytest.approx(t, rel=1e-12)
    assert float(S.t_from_logsnr(torch.tensor(lam, dtype=torch.float64))) == pytest.approx(t, rel=1e-9)


def test_logsnr_endpoints_and_tensor_agreement():
    assert S.logsnr_from_t(1.0) == -math.inf and S.logsnr_from_t(0.0) == math.inf
    assert S.t_from_logsnr(-math.inf) == 1.0 and S.t_from_logsnr(math.inf) == 0.0
    assert S.t_from_logsnr(-2000.0) == pytest.approx(1.0) and S.t_from_logsnr(2000.0) == pytest.approx(0.0, abs=1e-300)
    ts = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    got = S.logsnr_from_t(ts)
    want = torch.tensor([S.logsnr_from_t(float(t)) for t in ts], dtype=torch.float64)
    assert torch.allclose(got, want)


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 5.0])
@pytest.mark.parametrize("t", [0.1, 0.5, 0.8])
def test_flow_shift_is_a_logsnr_offset(shift, t):
    # METHOD 1: lambda(shift_s(t)) = lambda(t) - 2 log s
    assert S.logsnr_from_t(S.flow_shift(t, shift)) == pytest.approx(S.logsnr_from_t(t) - 2 * math.log(shift), abs=1e-12)


def test_flow_shift_matches_diffusers_flow_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    # diffusers' training sigmas are the shifted uniform grid t = k / 1000, k = 1000..1
    base = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    want = S.flow_shift(base, 3.0)
    assert torch.allclose(sched.sigmas.double(), want, atol=1e-6)


def test_resolution_shift_examples_from_the_paper():
    # Table 6: 750 at 512 px is 857 at 1024 px; 900 at 512 px is 947; Wan 480p -> 720p: 962 -> 974, 909 -> 937
    assert round(1000 * S.resolution_shift(0.75, 512, 1024)) == 857
    assert round(1000 * S.resolution_shift(0.9, 512, 1024)) == 947
    assert round(1000 * S.resolution_shift(S.flow_shift(5 / 6, 5.0), 480, 720)) == 974
    assert round(1000 * S.resolution_shift(S.flow_shift(4 / 6, 5.0), 480, 720)) == 937
    # Eq. 2 in logSNR form
    t = 0.6
    assert S.logsnr_from_t(S.resolution_shift(t, 256, 1024)) == pytest.approx(S.logsnr_from_t(t) - 2 * math.log(4))


def test_uniform_times_and_ratio():
    assert S.uniform_times(4) == [1.0, 0.75, 0.5, 0.25]
    assert [round(1000 * t) for t in S.uniform_times(4, 3.0)] == [1000, 900, 750, 500]
    assert S.ratio_from_sizes((480, 832), (720, 1248)) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        S.uniform_times(0)
    with pytest.raises(ValueError):
        S.flow_shift(0.5, 0.0)


def _sdxl_alphas():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod


def test_vp_rf_equivalence_closed_form():
    a = _sdxl_alphas()
    t = S.t_from_alpha(a)
    # same logSNR
    assert torch.allclose(S.logsnr_from_t(t), S.vp_logsnr(a), atol=1e-9)
    assert torch.allclose(S.alpha_from_t(t), a.double(), atol=1e-12)
    # x_VP = c * x_RF with c = sqrt(a) + sqrt(1 - a): compare the coefficients of x0 and eps
    c = S.vp_scale(t)
    assert torch.allclose(c * (1 - t), a.double().sqrt(), atol=1e-12)
    assert torch.allclose(c * t, (1 - a.double()).sqrt(), atol=1e-12)
    assert torch.allclose(S.marginal_std(t) * c, torch.ones_like(t), atol=1e-12)


def test_vp_timestep_is_exact_at_integer_indices_and_monotone():
    a = _sdxl_alphas()
    idx = torch.tensor([0, 1, 249, 499, 749, 998, 999])
    got = S.vp_timestep_from_t(S.t_from_alpha(a[idx]), a)
    assert torch.allclose(got, idx.double(), atol=1e-6)
    ts = torch.linspace(0.05, 0.9, 50, dtype=torch.float64)  # inside SDXL's trained range
    steps = S.vp_timestep_from_t(ts, a)
    assert bool((steps[1:] > steps[:-1]).all())
    # beyond the trained range the index is clamped, never extrapolated
    assert float(S.vp_timestep_from_t(torch.tensor([1.0]), a)) == pytest.approx(999.0)
    assert float(S.vp_timestep_from_t(torch.tensor([1e-9]), a)) == pytest.approx(0.0)
