"""`rmd ablate`: the studies resolve to the paper's allocations, runs are shared between studies,
and one study runs end to end on a tiny teacher."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from rmd.ablate import STUDIES, arm_config, run_key, run_study
from rmd.cli import main

SMALL = dict(batch_size=2, lora_rank=4, sample_every=0, num_sample_images=2, checkpoint_every=2)


def _allocation(cfg) -> list[int]:
    return [len(s.steps) for s in cfg.plan().stages]


def test_split_and_three_stage_studies_give_the_papers_allocations():
    # METHOD 3 / Tables 4-5: thresholds -6, -2.5, 0 give 1+3, 2+2, 3+1; (-6,-2.5), (-6,0), (-2.5,0) give
    # 1+1+2, 1+2+1, 2+1+1 -- the arm labels must be what the plans really are
    for study in ("split", "stages3"):
        for arm in STUDIES[study].arms:
            cfg = arm_config(arm)
            assert "+".join(map(str, _allocation(cfg))) == arm.label.split(",")[0]
    assert [s.size[0] for s in arm_config(STUDIES["stages3"].arms[0]).plan().stages] == [8, 16, 32]


def test_arm_changes_reach_the_run_config_and_nothing_else():
    base = arm_config(STUDIES["gamma"].arms[1])
    for arm, g in zip(STUDIES["gamma"].arms, (0.0, 0.2, 0.5, 1.0)):
        cfg = arm_config(arm)
        assert cfg.method_config.gamma == g
        assert cfg.sampling.gamma == g  # sampled on the trajectory it was trained on
        assert cfg.method_config.warmup_iters == base.method_config.warmup_iters == 50
    no_warm = arm_config(STUDIES["warmup"].arms[1], extra={"method_config": {"gamma": 0.5}})
    assert no_warm.method_config.warmup_iters == 0 and no_warm.method_config.gamma == 0.5
    assert arm_config(STUDIES["tau"].arms[0]).method_config.tau_mode == "stage"
    assert arm_config(STUDIES["tau"].arms[1]).method_config.tau_mode == "full"


def test_run_keys_share_equal_configs_and_separate_different_ones():
    default_in = {name: [run_key(arm_config(a)) if a.train else None for a in s.arms] for name, s in STUDIES.items()}
    # the default RMD 2+2 (gamma 0, tau in the stage) is the same run in warmup, gamma (0), tau, split and table3
    shared = {default_in["warmup"][0], default_in["gamma"][0], default_in["tau"][0], default_in["split"][1],
              default_in["table3"][0]}
    assert len(shared) == 1
    every = [k for keys in default_in.values() for k in keys if k is not None]
    assert len(set(every)) == len(every) - 4  # only those four repeats
    # logistics (how long, how often to save) do not change the key; the budget does
    a = STUDIES["tau"].arms[0]
    assert run_key(arm_config(a, extra={"checkpoint_every": 7})) == run_key(arm_config(a))
    assert run_key(arm_config(a, max_steps=10)) != run_key(arm_config(a))


def test_a_bad_arm_fails_before_training(tmp_path, monkeypatch, teacher_dir):
    from rmd.ablate import Arm, Study
    from rmd.plan import PlanError

    bad = Study("t", "q", (Arm("ok", "toy-rmd"), Arm("bad", "toy-rmd", schedule={"thresholds": [9.0]})), "x")
    monkeypatch.setitem(STUDIES, "bad", bad)
    with pytest.raises(PlanError, match="get no step"):
        run_study("bad", str(tmp_path), num_images=4, max_steps=1, teacher=teacher_dir, overrides=SMALL)
    assert not os.path.exists(os.path.join(tmp_path, "runs"))  # nothing was trained


def test_table3_study_end_to_end(tmp_path, teacher_dir, capsys):
    out = str(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = run_study("table3", out, num_images=4, max_steps=2, rounds=1, timing_batch=2, progress=False,
                         teacher=teacher_dir, overrides=SMALL)
    assert [r["label"] for r in rows] == [a.label for a in STUDIES["table3"].arms]
    with open(os.path.join(out, "table3.json")) as f:
        saved = json.load(f)
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["info"]["num_images"] == 4
    for r in rows:
        assert 0 <= r["alignment"] <= 1 and r["alignment_se"] >= 0 and r["seconds_per_image"] > 0
        assert r["speedup_vs_first"] == pytest.approx(rows[0]["seconds_per_image"] / r["seconds_per_image"])
    trained = [r for r in rows if r["run"]]
    assert len(trained) == 3 and all(r["training"]["generator_updates"] == 2 for r in trained)
    assert rows[2]["run"] is None and rows[2]["plan"] == "2+2"
    for name in ("table3.md", "table3.png", "table3_samples.png"):
        assert os.path.getsize(os.path.join(out, name)) > 500
    # a second study reuses the shared RMD 2+2 run instead of training it again
    before = os.path.getmtime(os.path.join(rows[0]["run"], "metrics.jsonl"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows_tau = run_study("tau", out, num_images=4, max_steps=2, rounds=1, timing_batch=2, progress=False,
                             teacher=teacher_dir, overrides=SMALL)
    assert rows_tau[0]["run"] == rows[0]["run"]  # "tau in stage" is the recipe default
    assert os.path.getmtime(os.path.join(rows[0]["run"], "metrics.jsonl")) == before


def test_untrained_arm_is_the_teacher_on_the_few_step_plan(teacher_dir):
    from rmd.ablate import untrained_method
    from rmd.denoisers import CFGDenoiser
    from rmd.distill.train import build_student
    from rmd.sampler import sample

    cfg = arm_config(STUDIES["table3"].arms[2], teacher=teacher_dir, extra=SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = untrained_method("u", cfg)
        got = method.generate(["a red circle on a black background"], [5])
        student = build_student(cfg, torch.device("cpu"), synced=False)
    bb = student.backbone
    with student.base.as_role("teacher"), torch.no_grad():  # adapters off: the teacher itself
        den = CFGDenoiser(student.denoiser(), bb.encode([""]), cfg.sampling.guidance_scale)
        want = sample(den, cfg.plan(), bb.encode(["a red circle on a black background"]), [5],
                      eta=cfg.sampling.eta, gamma=cfg.sampling.gamma, upsample_mode=cfg.sampling.upsample,
                      decode=bb.decode)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


def test_cli_lists_studies_and_refuses_an_unknown_one(capsys):
    assert main(["ablate", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(f"{name} " in listing for name in STUDIES)
    assert main(["ablate", "tabel3"]) == 2
    assert "unknown study 'tabel3'" in capsys.readouterr().err
