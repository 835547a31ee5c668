"""`rmd bench`: the measurement machinery against a denoiser whose cost is known by construction,
and the command's contract on a tiny real diffusers model."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from rmd.bench import BENCH_FIELDS, Row, Subject, TimedDenoiser, ideal_seconds, rows_for, run_bench, tiny_subject
from rmd.cli import main
from rmd.denoisers import Conditioning
from rmd.plan import make_plan

UNIT = 0.02  # seconds per image at 32 x 32 pixels: large against the sampler's own cost, even on a busy machine


class PixelCostDenoiser(nn.Module):
    """Sleeps UNIT x batch x (pixels / 32^2): the per-step cost proportional to pixel count that the
    paper's Table 5 speedups assume (2+1+1 at 256 -> 512 -> 1024: 4 / (2/16 + 1/4 + 1) = 2.91)."""

    supports_mask = False

    def latent_shape(self, size, frames=None):
        return (3, *size)

    def check_size(self, size, frames=None):
        pass

    def _times(self, t, x):
        t = torch.as_tensor(t, dtype=torch.float64)
        return t.reshape(1).expand(x.shape[0]) if t.ndim == 0 else t

    def forward(self, x, t, cond):
        time.sleep(UNIT * x.shape[0] * x.shape[-1] * x.shape[-2] / 1024)
        return torch.zeros_like(x), x


def _subject(batch: int = 2) -> Subject:
    cond = Conditioning(torch.zeros(batch, 3, 4))
    cascades = (("2+2", make_plan(4, [16, 32], [-2.5])), ("2+1+1", make_plan(4, [8, 16, 32], [-2.5, 0.0])))
    return Subject("sleepy", PixelCostDenoiser(), cond, Conditioning(torch.zeros(1, 3, 4)), 3.0, 4, 32,
                   cascades=cascades)


def test_ideal_speedups_follow_pixel_counts():
    subject = _subject()
    rows, info = run_bench(subject, rows_for(subject), rounds=5, reps=3)
    by = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["teacher", "4-step", "2+2", "2+1+1"]
    # from the measured call costs: 2+2 = 4 / (2/4 + 2) = 1.6, 2+1+1 = 4 / (2/16 + 1/4 + 1) = 2.91,
    # the guided 4-step teacher = 1/2
    assert by["2+2"]["ideal_speedup"] == pytest.approx(1.6, rel=0.06)
    assert by["2+1+1"]["ideal_speedup"] == pytest.approx(2.91, rel=0.06)
    assert by["teacher"]["ideal_speedup"] == pytest.approx(0.5, rel=0.06)
    # the sampler itself costs little next to these sleeps, so the measured speedups follow
    for name in ("2+2", "2+1+1", "teacher"):
        assert by[name]["efficiency"] == pytest.approx(1.0, abs=0.1)
        assert 0.0 <= by[name]["overhead"] < 0.2
    assert by["4-step"]["speedup_vs_single_res"] == 1.0 and by["4-step"]["efficiency"] == 1.0
    assert by["teacher"]["nfe"] == 8 and by["2+1+1"]["steps"] == ["8x8", "8x8", "16x16", "32x32"]
    assert set(info["call_seconds"]) == {"8x8", "16x16", "32x32"}


def test_overhead_counts_time_outside_the_network():
    class SlowSampler(PixelCostDenoiser):  # the network call is free; the caller pays a known cost
        def forward(self, x, t, cond):
            return torch.zeros_like(x), x

    subject = _subject()
    inner = SlowSampler()
    subject.denoiser = inner
    rows, _ = run_bench(subject, [Row("4-step", make_plan(4, [32]), False, 0.0)], rounds=2, reps=2)
    assert rows[0]["overhead"] > 0.5  # nearly all the time is sampler time when the network costs nothing


def test_ideal_seconds_is_the_sum_of_call_costs():
    costs = {(8, 8): 1.0, (16, 16): 2.0, (32, 32): 5.0}
    plan = make_plan(4, [8, 16, 32], [-2.5, 0.0])  # 2+1+1
    assert ideal_seconds(Row("c", plan, False, 0.0), costs) == 1 + 1 + 2 + 5
    assert ideal_seconds(Row("c", plan, True, 0.0), costs) == 2 * 9


def test_timed_denoiser_counts_calls_and_passes_attributes():
    timed = TimedDenoiser(PixelCostDenoiser())
    x = torch.zeros(1, 3, 8, 8)
    timed(x, 0.5, None)
    timed(x, 0.5, None)
    assert timed.calls == 2 and timed.seconds >= 2 * UNIT / 16 * 0.9
    assert timed.latent_shape((8, 8)) == (3, 8, 8) and timed.supports_mask is False


def test_bench_command_on_a_tiny_sd3(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--tiny", "sd3", "--batch", "2", "--rounds", "1", "--teacher-steps", "2", "--json",
                 "--out", str(out)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["teacher", "4-step", "2+2"]
    for r in rows:
        assert set(BENCH_FIELDS) <= set(r) and r["seconds_per_image"] > 0
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["info"]["subject"] == "tiny-sd3"


def test_tiny_subjects_build_for_every_family():
    for family in ("sdxl", "pixart", "sd3", "wan"):
        s = tiny_subject(family, 2, teacher_steps=2)
        assert len(s.cond) == 2 and s.cascades[0][1].stages[-1].size == (s.target, s.target)


def test_bench_on_a_model_folder_with_its_recipe(tmp_path, capsys):
    """`rmd bench --recipe FILE --model FOLDER`: the recipe's cascade, CFG and teacher steps on a saved pipeline."""
    from rmd.bench import recipe_subject
    from rmd.tiny_pipelines import save_tiny_pipeline

    model = save_tiny_pipeline("sdxl", str(tmp_path / "model"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nbackbone: sdxl\nteacher_guidance_scale: 6.0\nteacher_steps: 3\n"
                      "schedule:\n  steps: 4\n  resolutions: [32, 64]\n  thresholds: [-2.5]\n")
    subject = recipe_subject(str(recipe), model, batch=3)
    assert subject.guidance == 6.0 and subject.teacher_steps == 3 and subject.target == 64
    assert len(subject.cond) == 3 and torch.equal(subject.uncond.embeds, torch.zeros_like(subject.uncond.embeds))
    assert [s.size[0] for s in subject.cascades[0][1].steps] == [32, 32, 64, 64]
    out = tmp_path / "bench.json"
    assert main(["bench", "--recipe", str(recipe), "--model", model, "--batch", "2", "--rounds", "1",
                 "--out", str(out), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == ["teacher", "4-step", "2+2"]
    assert rows["teacher"]["nfe"] == 6 and rows["2+2"]["steps"] == ["32x32", "32x32", "64x64", "64x64"]
    calls = json.loads(out.read_text())["info"]["call_seconds"]
    assert rows["2+2"]["ideal_speedup"] == pytest.approx(4 * calls["64x64"] / (2 * calls["32x32"] + 2 * calls["64x64"]))
    assert main(["bench", "--recipe", "toy-rmd", "--model", model]) == 2  # the toy is not a model-folder recipe
    assert main(["bench", "--recipe", str(recipe)]) == 2  # --model missing
