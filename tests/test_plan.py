"""Stage plans against the paper's Tables 4, 5 and 6, and the bad-plan errors."""

import json
import math

import pytest

from rmd.cli import main
from rmd.plan import PlanError, make_plan
from rmd.recipes import list_recipes, load_recipe


def _teacher_steps(plan):
    # the paper truncates to integer timesteps (909 -> 937.5 is printed as 937)
    return [int(1000 * s.t_teacher + 1e-9) for s in plan.steps]


def test_table6_sdxl_pixart():
    p = make_plan(4, "512,1024", [-2.5])
    assert p.label == "2+2"
    assert _teacher_steps(p) == [1000, 857, 500, 250]
    assert [round(1000 * s.t) for s in p.steps] == [1000, 750, 500, 250]
    assert [s.size for s in p.steps] == [(512, 512)] * 2 + [(1024, 1024)] * 2


def test_table6_sd35():
    p = make_plan(4, "512,1024", [-4.5], flow_shift=3.0)
    assert p.label == "2+2"
    assert [round(1000 * s.t) for s in p.steps] == [1000, 900, 750, 500]
    assert _teacher_steps(p) == [1000, 947, 750, 500]


def test_table6_wan():
    p = make_plan(6, "480x832,720x1248", [-4.5], flow_shift=5.0)
    assert p.label == "3+3"
    assert [round(1000 * s.t) for s in p.steps[:3]] == [1000, 962, 909]
    assert _teacher_steps(p)[:3] == [1000, 974, 937]
    assert p.steps[3].size == (720, 1248)


@pytest.mark.parametrize("lam,label", [(-6.0, "1+3"), (-2.5, "2+2"), (0.0, "3+1")])
def test_table4_two_stage_allocations(lam, label):
    assert make_plan(4, "512,1024", [lam]).label == label


@pytest.mark.parametrize("lams,label,paper_speedup", [((-6.0, -2.5), "1+1+2", 1.73), ((-6.0, 0.0), "1+2+1", 2.54),
                                                     ((-2.5, 0.0), "2+1+1", 2.90)])
def test_table5_three_stage_allocations_and_pixel_cost_speedups(lams, label, paper_speedup):
    p = make_plan(4, "256,512,1024", lams)
    assert p.label == label
    # METHOD 3: per-step cost ~ pixel count reproduces Table 5's speedups to ~1%
    assert p.ideal_speedup() == pytest.approx(paper_speedup, rel=0.012)


@pytest.mark.parametrize("shift,steps,sizes,lo,hi,label", [
    (3.0, 4, "512,1024", -5.78, -3.58, "2+2"),
    (5.0, 6, "480x832,720x1248", -5.42, -4.03, "3+3"),
])
def test_threshold_ranges_quoted_in_method(shift, steps, sizes, lo, hi, label):
    # inside (lo, hi] (METHOD rounds the bounds to 0.01) the allocation holds; outside it does not
    for lam in (lo + 0.01, (lo + hi) / 2, hi - 0.01):
        assert make_plan(steps, sizes, [lam], flow_shift=shift).label == label
    for lam in (lo - 0.01, hi + 0.01):
        assert make_plan(steps, sizes, [lam], flow_shift=shift).label != label


def test_stage_intervals_follow_thresholds():
    p = make_plan(4, "256,512,1024", [-6.0, 0.0])
    t = lambda lam: 1 / (1 + math.exp(lam / 2))
    assert [st.t_hi for st in p.stages] == pytest.approx([1.0, t(-6.0), t(0.0)])
    assert [st.t_lo for st in p.stages] == pytest.approx([t(-6.0), t(0.0), 0.0])
    # every step's teacher-frame time lies inside its stage's interval
    for s in p.steps:
        st = p.stages[s.stage]
        assert st.t_lo <= s.t_teacher <= st.t_hi


def test_single_stage_and_explicit_times():
    p = make_plan(4, "1024")
    assert p.label == "4" and p.ideal_speedup() == 1.0
    q = make_plan(None, "32", times=[0.99, 0.5, 0.1])
    assert q.times() == [0.99, 0.5, 0.1]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(steps=4, resolutions="1024,512", thresholds=[-2.5]), "must increase"),
    (dict(steps=4, resolutions="512,512", thresholds=[-2.5]), "must increase"),
    (dict(steps=4, resolutions="256,512,1024", thresholds=[-2.5]), "need 2 logSNR threshold"),
    (dict(steps=4, resolutions="512,1024", thresholds=[]), "need 1 logSNR threshold"),
    (dict(steps=4, resolutions="256,512,1024", thresholds=[0.0, -2.5]), "strictly increase"),
    (dict(steps=4, resolutions="256,512,1024", thresholds=[-20.0, -19.0]), "get no step"),
    (dict(steps=4, resolutions="512,1024", thresholds=[20.0]), "get no step"),
    (dict(steps=4, resolutions="256,512,1024", thresholds=[-2.6, -2.5]), "get no step"),
    (dict(steps=0, resolutions="512"), "positive integer"),
    (dict(steps=4, resolutions="512,abc", thresholds=[-2.5]), "not a size"),
    (dict(steps=4, resolutions="512", flow_shift=-1.0), "flow shift"),
    (dict(steps=None, resolutions="512", times=[0.5, 0.7]), "strictly decrease"),
])
def test_bad_plans_fail_with_a_message_that_names_the_fix(kwargs, needle):
    with pytest.raises(PlanError, match=needle):
        make_plan(**kwargs)


def test_cli_schedule_json_contract(capsys):
    assert main(["schedule", "--steps", "4", "--resolutions", "512,1024", "--thresholds=-2.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in out["steps"]] == [0, 0, 1, 1]
    assert set(out["steps"][0]) >= {"index", "t", "t_teacher", "resolution", "stage"}
    assert out["steps"][1]["t_teacher"] == pytest.approx(6 / 7)
    assert [st["steps"] for st in out["stages"]] == [[0, 1], [2, 3]]
    assert set(out["stages"][0]) >= {"resolution", "t_hi", "t_lo", "steps"}
    assert out["stages"][0]["resolution"] == 512


def test_cli_schedule_table_and_errors(capsys):
    assert main(["schedule", "--recipe", "wan21-14b"]) == 0
    text = capsys.readouterr().out
    assert "3+3" in text and "720x1248" in text
    assert main(["schedule", "--steps", "4", "--resolutions", "1024,512", "--thresholds=-2.5"]) == 2
    err = capsys.readouterr().err
    assert "must increase" in err and "Traceback" not in err


@pytest.mark.parametrize("name", list_recipes())
def test_builtin_recipes_validate(name):
    r = load_recipe(name)
    assert r.name == name
    assert r.schedule.plan().num_steps == r.schedule.steps


def test_recipe_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbackbone: toy\nteacher_guidance_scale: 3\nteacher_steps: 50\n"
                   "schedule: {steps: four, resolutions: [16, 32], thresholds: [-2.5], flow_shfit: 2}\n")
    with pytest.raises(PlanError) as e:
        load_recipe(str(bad))
    msg = str(e.value)
    assert "schedule.steps" in msg and "schedule.flow_shfit: unknown key" in msg
    impossible = tmp_path / "impossible.yaml"
    impossible.write_text("name: x\nbackbone: toy\nteacher_guidance_scale: 3\nteacher_steps: 50\n"
                          "schedule: {steps: 4, resolutions: [16, 32], thresholds: [30]}\n")
    with pytest.raises(PlanError, match="get no step"):
        load_recipe(str(impossible))
    with pytest.raises(PlanError, match="built-in recipes"):
        load_recipe("no-such-recipe")


def test_recipe_times_place_the_steps_and_the_cli_follows_them(tmp_path, capsys):
    head = "name: x\nbackbone: toy\nteacher_guidance_scale: 3\nteacher_steps: 50\n"
    path = tmp_path / "early.yaml"
    path.write_text(head + "schedule: {steps: 4, resolutions: [16, 32], thresholds: [-4.5], times: [1.0, 0.9, 0.75, 0.25]}\n")
    plan = load_recipe(str(path)).schedule.plan()
    assert [s.t for s in plan.steps] == pytest.approx([1.0, 0.9, 0.75, 0.25])
    # step 1 at t = 0.9 seen at 32 px: shift by 2 gives t' = 1.8 / 1.9, logSNR 2 log(0.1 / 1.8) = -5.78 < -4.5,
    # so it stays at 16 px; step 2 (t = 0.75): 2 log(0.25 / 1.5) = -3.58 >= -4.5 moves on
    assert [s.stage for s in plan.steps] == [0, 0, 1, 1]
    assert main(["schedule", "--recipe", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == json.loads(json.dumps(plan.to_dict()))
    assert main(["schedule", "--times", "1,0.9,0.75,0.25", "--resolutions", "16,32", "--thresholds=-4.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == got
    assert main(["schedule", "--times", "1,0.9,x", "--resolutions", "16,32"]) == 2
    assert "times '1,0.9,x' must be comma-separated numbers" in capsys.readouterr().err
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(head + "schedule: {steps: 3, resolutions: [16, 32], thresholds: [-4.5], times: [1.0, 0.5]}\n")
    with pytest.raises(PlanError, match="explicit times"):
        load_recipe(str(wrong))
