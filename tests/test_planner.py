"""`rmd plan`: FLOPs counted on meta equal torch's counter on a real forward (tiny configs of the
real classes), LoRA sizes equal what peft creates, the byte accounting's closed form, and the
real recipes' published parameter counts and the paper's speedups (METHOD 7)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from rmd.cli import main
from rmd.planner import PAPER, build_on_meta, count_flops, latent_shape, lora_params, memory_plan, plan_recipe
from rmd.recipes import Architecture, load_recipe
from rmd.tiny import tiny


def _arch(family: str):
    b = tiny(family)
    model = b.model
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    arch = Architecture(class_name=type(model).__name__, config=config, text_tokens=b.seq_len,
                        text_dim=b.embed_dim, pooled_dim=b.pooled_dim, vae_scale_factor=8,
                        vae_temporal_factor=4)
    return b, model, arch


@pytest.mark.parametrize("family", ["sdxl", "pixart", "sd3", "wan"])
def test_meta_flops_equal_a_real_forward(family):
    b, model, arch = _arch(family)
    frames = b.frames[-1]
    meta = build_on_meta(arch)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for side in b.sizes[:2]:
        # the counter has no formula for the CPU's fused attention kernel; the math kernel's matmuls it counts
        with warnings.catch_warnings(), sdpa_kernel(SDPBackend.MATH):
            warnings.simplefilter("ignore")
            want = count_flops(model.float(), arch, (side, side), frames, device="cpu")
            got = count_flops(meta, arch, (side, side), frames)
        assert got == want and got > 0
    assert latent_shape(arch, (32, 32), frames)[-2:] == (4, 4)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "wan"])
def test_lora_size_equals_what_peft_creates(family):
    from rmd.distill.roles import SharedBase

    _, model, _ = _arch(family)
    planned = lora_params(model, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = SharedBase(model, rank=4)
    assert planned == sum(p.numel() for p in base.parameters("generator")) > 0


def test_memory_accounting_closed_form():
    p, lora = 1_000_000, 1_000
    m = memory_plan(p, lora)
    gib = 2**30
    assert m["shared_base"]["total"] == pytest.approx((2 * p + 2 * 16 * lora) / gib)
    assert m["three_copies"]["total"] == pytest.approx((2 * p + 2 * 16 * p) / gib)


def test_speedups_are_the_flops_ratios(tmp_path):
    b, model, arch = _arch("sd3")
    recipe = {"name": "tiny", "backbone": "sd3", "teacher_guidance_scale": 4.5, "teacher_steps": 10,
              "schedule": {"steps": 4, "resolutions": [32, 64], "thresholds": [-2.5], "flow_shift": 1.0},
              "architecture": arch.model_dump()}
    path = tmp_path / "tiny.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    r = plan_recipe(str(path), lora_rank=2, batch=1)
    f32, f64 = r["flops_per_call"]["32x32"], r["flops_per_call"]["64x64"]
    assert r["allocation"] == "2+2"
    assert r["speedup_vs_single_res"] == pytest.approx(4 * f64 / (2 * f32 + 2 * f64))
    assert r["speedup_vs_teacher"] == pytest.approx(10 * 2 * f64 / (2 * f32 + 2 * f64))
    assert r["memory_gib"]["activations_generator_backward"]["gib"] > 0


def test_real_recipes_match_their_published_sizes():
    for name in ("sdxl", "pixart-sigma", "sd35-medium", "wan21-14b", "wan21-1.3b"):
        arch = load_recipe(name).architecture
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            n = sum(p.numel() for p in build_on_meta(arch).parameters())
        assert n == pytest.approx(arch.params, rel=0.12), name


def test_sdxl_plan_matches_the_paper_and_the_memory_target(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["plan", "--recipe", "sdxl", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"speedup_vs_single_res", "speedup_vs_teacher", "memory_gib"} <= set(r)
    assert r["speedup_vs_single_res"] == pytest.approx(PAPER["sdxl"]["speedup_vs_single_res"], rel=0.10)
    assert r["speedup_vs_teacher"] == pytest.approx(PAPER["sdxl"]["speedup_vs_teacher"], rel=0.10)
    m = r["memory_gib"]
    assert m["shared_base_fits_with_activations"] and not m["three_copies_fit_without_activations"]


def test_a_recipe_without_architecture_is_refused(capsys):
    assert main(["plan", "--recipe", "toy-rmd"]) == 2
    assert "no architecture section" in capsys.readouterr().err


def test_activations_count_saved_tensors_not_weights():
    from rmd.planner import _count_saved

    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.GELU(), torch.nn.Linear(1000, 1000))
    net.requires_grad_(False)
    x = torch.zeros(2, 1000, device="meta", requires_grad=True)
    # the frozen linears save only their weights (for the input gradient), which are not activations;
    # GELU saves its input: 2 x 1000 fp32
    assert _count_saved(lambda: net(x), net) == 2 * 1000 * 4
