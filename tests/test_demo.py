"""`rmd demo` end to end on a tiny toy teacher: the report contract, the shipped-student path,
and its refusal of a student trained on another teacher."""

from __future__ import annotations

import json
import statistics
import os
import warnings

import pytest
import torch

from rmd.cli import UserError, main
from rmd.demo import REPORT_FIELDS, run_demo, run_method, ship_student, shipped_method

from helpers import save_tiny_teacher

SMALL = dict(batch_size=2, lora_rank=4, sample_every=0, num_sample_images=2, checkpoint_every=2)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    teacher = save_tiny_teacher(str(tmp_path_factory.mktemp("teacher")), seed=0)
    out = str(tmp_path_factory.mktemp("demo"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = run_demo(out, num_images=4, max_steps=2, train_baselines=True, rounds=3, teacher_rounds=2,
                        timing_batch=2, teacher_steps=2, progress=False, teacher=teacher, overrides=SMALL)
    return teacher, out, rows


def test_report_rows_follow_the_contract(demo):
    _, out, rows = demo
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f) == json.loads(json.dumps(rows))
    assert [r["name"] for r in rows] == ["teacher", "dmd2", "naive", "rmd", "rmd-early32"]
    by = {r["name"]: r for r in rows}
    for r in rows:
        assert set(REPORT_FIELDS) <= set(r)
        assert r["seconds_per_image"] > 0 and 0 <= r["alignment"] <= 1 and 0 <= r["degraded_rate"] <= 1
        # speedups are ratios of the measured times, nothing else
        assert r["speedup_vs_teacher"] == pytest.approx(by["teacher"]["seconds_per_image"] / r["seconds_per_image"])
        assert r["speedup_vs_4step"] == pytest.approx(by["dmd2"]["seconds_per_image"] / r["seconds_per_image"])
        # the speed is the median round; the rounds behind it are kept (the teacher's capped at 2)
        rounds = r["seconds_per_image_rounds"]
        assert len(rounds) == (2 if r["name"] == "teacher" else 3)
        assert r["seconds_per_image"] == statistics.median(rounds) and r["seconds_per_image_fastest"] == min(rounds)
        four = by["dmd2"]["seconds_per_image_rounds"]
        if r["name"] != "teacher":
            assert r["speedup_vs_4step_rounds"] == pytest.approx([f / t for f, t in zip(four, rounds)])
    assert by["teacher"]["nfe"] == 4  # 2 steps with CFG
    assert by["dmd2"]["nfe"] == by["rmd"]["nfe"] == by["naive"]["nfe"] == by["rmd-early32"]["nfe"] == 4
    assert by["rmd-early32"]["training"]["recipe"] == "toy-rmd-early32"
    assert by["rmd"]["training"]["generator_updates"] == by["dmd2"]["training"]["generator_updates"] == 2
    text = open(os.path.join(out, "report.md")).read()
    assert "| rmd | rmd |" in text and "speed_quality.png" in text and "Unequal" not in text
    assert "within each timing round" in text and "rmd-early32 " in text.split("within each timing round")[1]
    for name in ("samples.png", "speed_quality.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000


def test_second_run_reuses_finished_distillations(demo, capsys):
    teacher, out, _ = demo
    before = os.path.getmtime(os.path.join(out, "rmd", "metrics.jsonl"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_demo(out, num_images=4, max_steps=2, train_baselines=True, rounds=1, timing_batch=2, teacher_steps=2,
                 progress=False, teacher=teacher, overrides=SMALL)
    assert os.path.getmtime(os.path.join(out, "rmd", "metrics.jsonl")) == before
    assert "reusing" in capsys.readouterr().err


def test_shipped_student_equals_its_run_and_is_tied_to_its_teacher(demo, tmp_path):
    teacher, out, _ = demo
    students = str(tmp_path / "students")
    ship_student(os.path.join(out, "dmd2"), "dmd2", command="test", dest_root=students)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shipped = shipped_method("dmd2", teacher, students)
        from_run = run_method("dmd2", os.path.join(out, "dmd2"))
        prompts = ["a red circle on the left on a black background"] * 2
        assert torch.equal(shipped.generate(prompts, [3, 4]), from_run.generate(prompts, [3, 4]))
        # `rmd toy eval --run NAME=DIR` takes a shipped student's folder as well as a run folder
        by_folder = run_method("dmd2", os.path.join(students, "dmd2"), teacher_dir=teacher)
        assert by_folder.source == "shipped"
        assert torch.equal(by_folder.generate(prompts, [3, 4]), from_run.generate(prompts, [3, 4]))
        other = save_tiny_teacher(str(tmp_path / "other"), seed=5)
        with pytest.raises(UserError, match="another toy teacher"):
            shipped_method("dmd2", other, students)
        with pytest.raises(UserError, match="another toy teacher.*--teacher"):
            run_method("mine", os.path.join(students, "dmd2"), teacher_dir=other)  # `rmd toy eval --run`
    os.remove(os.path.join(students, "dmd2", "record.json"))
    with pytest.raises(UserError, match="incomplete"):
        shipped_method("dmd2", teacher, students)


def test_cli_rejects_bad_options_before_work(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--num-images", "1"]) == 2
    assert "--num-images" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--timing-batch", "500"]) == 2
    assert "--timing-batch" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--out", str(blocker / "sub")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_toy_eval_scores_a_run_folder(demo, tmp_path, capsys):
    _, out, _ = demo
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["toy", "eval", "--rows", "real", "--run", f"student={out}/rmd", "--num-images", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["real", "student"] and rows[1]["nfe"] == 4
    assert main(["toy", "eval", "--run", f"x={tmp_path}", "--num-images", "4"]) == 2
    assert "no exported generator" in capsys.readouterr().err
    assert main(["toy", "eval", "--run", "nodir", "--num-images", "4"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err


def test_missing_shipped_students_and_changed_settings_fail_before_training(demo, tmp_path):
    teacher, out, _ = demo
    fresh = str(tmp_path / "fresh")
    with pytest.raises(UserError, match="incomplete"):
        run_demo(fresh, num_images=4, max_steps=2, progress=False, teacher=teacher,
                 students_dir=str(tmp_path / "none"), overrides=SMALL)
    assert not os.path.exists(os.path.join(fresh, "rmd"))  # nothing trained
    with pytest.raises(UserError, match="other settings"):
        run_demo(out, num_images=4, max_steps=2, train_baselines=True, progress=False, teacher=teacher,
                 overrides={**SMALL, "lora_rank": 2})
