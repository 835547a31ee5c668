"""GAN head and Patch Distribution Matching (METHOD 6): loss values by hand, where gradients go,
gradient checkpointing, the SwD preset and GAN runs through the trainer, exact resume with the
head, and the errors for a backbone without real data."""

from __future__ import annotations

import copy
import math
import os
import warnings

import pytest
import torch

from rmd.cli import UserError
from rmd.denoisers import Conditioning, SD3Denoiser
from rmd.distill import train as train_mod
from rmd.distill.algorithm import PRESETS, MethodConfig, distill_iteration, generator_extras
from rmd.distill.features import BlockFeatures, DiscriminatorHead, block_index, feature_dim, features
from rmd.distill.losses import pdm_loss
from rmd.distill.train import HEADS_FILE, complete_checkpoints, train
from rmd.plan import make_plan

from helpers import perturb, read_metrics, small, tiny_base, toy_batch



@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: a second adapter on purpose
        yield


# --- losses and features ----------------------------------------------------------------------


def test_pdm_rbf_kernel_by_hand():
    """1-D tokens fake {0, 2}, real {1, 3}: squared distances 0, 1, 4, 9; their median (lower middle) is 1,
    so k(d2) = sum over bandwidths (0.5, 1, 2) of exp(-d2 / bw); biased MMD^2 = mean kxx + mean kyy - 2 mean kxy."""
    fake = torch.tensor([[[0.0], [2.0]]])
    real = torch.tensor([[[1.0], [3.0]]])

    def k(v):
        return math.exp(-v / 0.5) + math.exp(-v) + math.exp(-v / 2)

    kxx = kyy = (2 * k(0) + 2 * k(4)) / 4
    kxy = (k(1) + k(9) + k(1) + k(1)) / 4  # 0-1, 0-3, 2-1, 2-3
    assert pdm_loss(fake, real, kernel="rbf").tolist() == pytest.approx([kxx + kyy - 2 * kxy], rel=1e-6)
    # linear kernel with a custom c: token means 1 and 2
    assert pdm_loss(fake, real, c=0.5).tolist() == pytest.approx([math.sqrt(1 + 0.25) - 0.5], rel=1e-6)


def test_block_features_are_the_image_tokens_of_the_chosen_block():
    base = tiny_base(layers=3)
    model = base.model
    assert block_index(model, None) == 1 and feature_dim(model) == 16
    with pytest.raises(ValueError, match="out of range"):
        block_index(model, 3)
    den = SD3Denoiser(model, vae_scale_factor=1)
    x, t, cond = toy_batch(size=32)
    seen = {}
    handle = model.transformer_blocks[1].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    with torch.no_grad():
        with BlockFeatures(model, None) as tap:  # full forward: output and features
            den(x, t, cond)
        early = features(model, None, den, x, t, cond)  # stopped after the block
    handle.remove()
    assert tap.value.shape == (2, (32 // 4) ** 2, 16)  # (B, tokens, width): the image stream
    assert torch.equal(tap.value, seen["out"][1]) and torch.equal(early, tap.value)
    head = DiscriminatorHead(16, hidden=8, seed=3)
    assert head(early).shape == (2, 64)
    again = DiscriminatorHead(16, hidden=8, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(head.parameters(), again.parameters()))  # seeded init


# --- where the gradients go -------------------------------------------------------------------


def setup(gan_weight=1.0, pdm_weight=0.0, checkpointing=False, layers=2):
    torch.manual_seed(0)
    base = tiny_base(layers)
    perturb(base, "generator", seed=1)
    perturb(base, "fake", seed=2)
    if checkpointing:
        base.model.enable_gradient_checkpointing()
    head = DiscriminatorHead(16, hidden=8, seed=0)
    cfg = MethodConfig(gan_weight=gan_weight, pdm_weight=pdm_weight, pdm_kernel="rbf", tau_mode="full",
                       gamma=0.0, fake_updates=1)
    opt_g = torch.optim.AdamW(base.parameters("generator"), lr=1e-2)
    opt_f = torch.optim.AdamW(base.parameters("fake") + list(head.parameters()), lr=1e-2)
    return base, head, cfg, opt_g, opt_f


def run_iteration(base, head, cfg, opt_g, opt_f, seed=7):
    plan = make_plan(2, [16, 32], [-2.0])
    _, _, cond = toy_batch(size=32, seed=1)
    uncond = Conditioning(torch.zeros(1, 5, 16), torch.zeros(1, 16))
    real = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    return distill_iteration(base, lambda: SD3Denoiser(base.model, vae_scale_factor=1), plan, cond, uncond, cfg,
                             iteration=0, seed=seed, opt_generator=opt_g, opt_fake=opt_f, real=real,
                             head=head if cfg.gan_weight > 0 else None)


def spy(opt, params, store):
    """Record which of ``params`` hold a non-zero gradient when ``opt.step`` runs."""
    step = opt.step

    def wrapped(*a, **kw):
        store.append([p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params])
        return step(*a, **kw)

    opt.step = wrapped


def test_head_learns_in_the_fake_update_only_and_the_generator_gets_gan_gradients():
    base, head, cfg, opt_g, opt_f = setup(gan_weight=1.0)
    at_g, at_f, gen_at_g = [], [], []
    spy(opt_g, list(head.parameters()), at_g)
    spy(opt_f, list(head.parameters()), at_f)
    gen = base.parameters("generator")
    step_g = opt_g.step

    def grab(*a, **kw):
        gen_at_g.append([p.grad.clone() for p in gen])
        return step_g(*a, **kw)

    opt_g.step = grab
    before = [p.detach().clone() for p in head.parameters()]
    res = run_iteration(base, head, cfg, opt_g, opt_f)
    assert at_g == [[False] * len(before)]  # no head gradient in the generator update ...
    assert all(at_f[0])  # ... every head parameter has one in the fake update
    assert all(not torch.equal(a, b) for a, b in zip(before, head.parameters()))
    assert res.loss_gan_generator is not None and res.loss_gan_discriminator is not None and res.loss_pdm is None
    assert math.isfinite(res.loss_gan_generator) and res.loss_gan_discriminator > 0

    # the same iteration without the GAN: same draws, different generator gradient
    base0, _, cfg0, opt_g0, opt_f0 = setup(gan_weight=0.0)
    ref = []
    step0 = opt_g0.step
    opt_g0.step = lambda *a, **kw: (ref.append([p.grad.clone() for p in base0.parameters("generator")]),
                                    step0(*a, **kw))[1]
    res0 = run_iteration(base0, None, cfg0, opt_g0, opt_f0)
    assert res0.extras() == {} and res0.step == res.step
    diff = sum((a - b).abs().sum() for a, b in zip(gen_at_g[0], ref[0]))
    assert diff > 1e-6 * sum(a.abs().sum() for a in ref[0])


def test_generator_extras_reach_the_sample_only():
    base, head, cfg, _, _ = setup(gan_weight=1.0, pdm_weight=1.0)
    den = SD3Denoiser(base.model, vae_scale_factor=1)
    x, tau, cond = toy_batch(size=32, seed=2)
    X = x.clone().requires_grad_(True)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    real = torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) * 2 - 1
    base.role("generator")
    grad, logs = generator_extras(base, den, cfg, X, real, tau, z, cond, head, w_k=1.0)
    assert set(logs) == {"loss_gan_generator", "loss_pdm"} and grad.abs().sum() > 0
    assert base.current == "generator"
    everything = base.parameters("generator") + base.parameters("fake") + list(head.parameters())
    assert all(p.grad is None for p in everything) and X.grad is None
    # the PDM part is the gradient of pdm_loss through the teacher's features (autograd by hand here)
    cfg_p = cfg.model_copy(update={"gan_weight": 0.0})
    grad_p, logs_p = generator_extras(base, den, cfg_p, X, real, tau, z, cond, None, w_k=2.0)
    xx = x.clone().requires_grad_(True)
    t4 = tau.view(-1, 1, 1, 1)
    with base.as_role("teacher"):
        f_gen = features(base.model, None, den, (1 - t4) * xx + t4 * z, tau, cond)
        with torch.no_grad():
            f_real = features(base.model, None, den, (1 - t4) * real + t4 * z, tau, cond)
        (2.0 * pdm_loss(f_gen, f_real, "rbf")).mean().backward()
    torch.testing.assert_close(grad_p, xx.grad)
    assert logs_p["loss_pdm"] == pytest.approx(logs["loss_pdm"])


def test_gan_and_pdm_are_exact_under_gradient_checkpointing():
    """Each term is differentiated under the role its graph was built with, so recomputation
    (checkpointing) sees the same network: same updates as without checkpointing."""
    runs = []
    for ckpt in (False, True):
        base, head, cfg, opt_g, opt_f = setup(gan_weight=1.0, pdm_weight=1.0, checkpointing=ckpt)
        res = run_iteration(base, head, cfg, opt_g, opt_f)
        runs.append((res, [p.detach().clone() for p in base.parameters("generator") + base.parameters("fake")
                           + list(head.parameters())]))
    (a, pa), (b, pb) = runs
    assert a.loss_generator == pytest.approx(b.loss_generator, rel=1e-5)
    assert a.loss_gan_discriminator == pytest.approx(b.loss_gan_discriminator, rel=1e-5)
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_iteration_errors_without_real_samples_or_head():
    base, head, cfg, opt_g, opt_f = setup(gan_weight=1.0)
    plan = make_plan(2, [32], [])
    _, _, cond = toy_batch(size=32)
    with pytest.raises(ValueError, match="real"):
        distill_iteration(base, lambda: SD3Denoiser(base.model, vae_scale_factor=1), plan, cond, cond, cfg, 0, 1,
                          opt_g, opt_f)
    with pytest.raises(ValueError, match="head"):
        distill_iteration(base, lambda: SD3Denoiser(base.model, vae_scale_factor=1), plan, cond, cond, cfg, 0, 1,
                          opt_g, opt_f, real=torch.zeros(2, 3, 32, 32))


# --- through the trainer ----------------------------------------------------------------------


def test_swd_preset_and_recipe(teacher_dir, tmp_path):
    cfg = small("toy-swd", teacher_dir, max_steps=2, checkpoint_every=2, method_config={"fake_updates": 1})
    plan = cfg.plan()
    assert plan.label == "1+1+1+1" and [s.size for s in plan.steps] == [(8, 8), (16, 16), (24, 24), (32, 32)]
    m = cfg.method_config
    assert m.pdm_weight > 0 and m.pdm_kernel == "rbf" and m.gan_weight > 0 and m.gamma == 0.0
    assert PRESETS["swd"]["fake_updates"] == 5 and cfg.sampling.gamma == 0.0
    run = str(tmp_path / "swd")
    train(cfg, run, progress=False)
    lines = read_metrics(run)
    assert [x["step"] for x in lines] == [1, 2]
    for x in lines:
        for k in ("loss_generator", "loss_fake", "loss_pdm", "loss_gan_generator", "loss_gan_discriminator"):
            assert math.isfinite(x[k]), k
        assert x["loss_pdm"] >= 0
    assert os.path.isfile(os.path.join(complete_checkpoints(run)[-1][1], HEADS_FILE))


def test_rmd_with_gan_runs_and_plain_runs_write_no_head(teacher_dir, tmp_path):
    cfg = small("toy-rmd", teacher_dir, max_steps=2, checkpoint_every=2, method_config={"gan_weight": 0.1})
    run = str(tmp_path / "gan")
    train(cfg, run, progress=False)
    lines = read_metrics(run)
    assert all(math.isfinite(x["loss_gan_generator"]) and math.isfinite(x["loss_gan_discriminator"]) for x in lines)
    assert "loss_pdm" not in lines[0]
    assert os.path.isfile(os.path.join(complete_checkpoints(run)[-1][1], HEADS_FILE))
    plain = str(tmp_path / "plain")
    train(small("toy-rmd", teacher_dir, max_steps=1, checkpoint_every=1), plain, progress=False)
    assert not os.path.exists(os.path.join(complete_checkpoints(plain)[-1][1], HEADS_FILE))
    assert "loss_gan_generator" not in read_metrics(plain)[0]


class Crash(Exception):
    pass


def test_resume_is_exact_with_the_gan_head(teacher_dir, tmp_path):
    kw = dict(max_steps=4, checkpoint_every=2, method_config={"gan_weight": 0.5, "pdm_weight": 0.5,
                                                              "warmup_iters": 0})
    straight = str(tmp_path / "straight")
    train(small("toy-rmd", teacher_dir, **kw), straight, progress=False)
    run = str(tmp_path / "run")

    def crash(line):
        if line["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        train(small("toy-rmd", teacher_dir, **kw), run, progress=False, on_step=crash)
    assert train(small("toy-rmd", teacher_dir, **kw), run, resume=True, progress=False).start_step == 2
    keys = ("step", "loss_generator", "loss_fake", "dm_norm", "loss_gan_generator", "loss_gan_discriminator",
            "loss_pdm")
    ref, got = read_metrics(straight), read_metrics(run)
    assert [[m[k] for k in keys] for m in got] == [[m[k] for k in keys] for m in ref]  # exactly equal
    from safetensors.torch import load_file

    for name in (HEADS_FILE, "generator.safetensors", "fake.safetensors"):
        a = load_file(os.path.join(straight, "checkpoints", "step-00000004", name))
        b = load_file(os.path.join(run, "checkpoints", "step-00000004", name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    opt = torch.load(os.path.join(run, "checkpoints", "step-00000004", "optimizer.pt"), weights_only=True)
    n_fake = len(load_file(os.path.join(run, "checkpoints", "step-00000004", "fake.safetensors")))
    n_head = len(load_file(os.path.join(run, "checkpoints", "step-00000004", HEADS_FILE)))
    assert len(opt["fake"]["state"]) == n_fake + n_head  # the head's Adam moments are saved with the fake's


def test_clear_errors_before_training(teacher_dir, tmp_path, monkeypatch):
    cfg = small("toy-rmd", teacher_dir, max_steps=1, method_config={"pdm_weight": 1.0})

    def no_real(c, **kw):
        bb = train_mod._toy_backbone(c)
        return copy.copy(bb).__class__(**{**bb.__dict__, "train_batch": None})

    monkeypatch.setitem(train_mod.BACKBONES, "toy", no_real)
    with pytest.raises(UserError, match="train_batch"):
        train(cfg, str(tmp_path / "a"), progress=False)
    assert not os.path.exists(os.path.join(tmp_path, "a", "metrics.jsonl"))
    monkeypatch.undo()
    bad = small("toy-rmd", teacher_dir, max_steps=1, method_config={"gan_weight": 1.0, "gan_block": 5})
    with pytest.raises(UserError, match="gan_block"):
        train(bad, str(tmp_path / "b"), progress=False)
